package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/agent"
	"github.com/leased/leased/internal/leaseview"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
)

// cliTimeout bounds every etcd request of the CLI commands.
const cliTimeout = 10 * time.Second

// cliFlags returns a flag set with the etcd flags (and LEASED_* variables).
func cliFlags(name, usage string, o *agent.Options) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	registerEtcd(fs, o)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: %s\n\nflags (each also settable as LEASED_<FLAG>):\n", usage)
		fs.PrintDefaults()
	}
	return fs
}

// parseCLI parses a command's flags, from args and then from LEASED_*
// variables, and checks the etcd flags; it reports errors on stderr.
// Flags may also follow the positional arguments, as operators type them
// (leased config put FILE --etcd-endpoints=...).
func parseCLI(fs *flag.FlagSet, args []string) bool {
	if err := parseInterspersed(fs, args); err != nil {
		return false
	}
	if err := applyEnv(fs); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", fs.Name(), err)
		return false
	}
	if err := etcdOptions(fs).ValidateEtcd(); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", fs.Name(), err)
		return false
	}
	return true
}

// parseInterspersed is fs.Parse that also takes flags after positional
// arguments. "--" ends the flags: everything after it is positional. On
// success fs.Args() holds the positional arguments in order.
func parseInterspersed(fs *flag.FlagSet, args []string) error {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			pos = append(pos, rest...) // the flag package stopped at "--"
			break
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
	return fs.Parse(append([]string{"--"}, pos...))
}

// etcdErr turns an etcd client error into advice.
func etcdErr(o *agent.Options, err error) string {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Sprintf("etcd at %s did not answer within %s: check that it runs, --etcd-endpoints, and the TLS flags (%v)", o.EtcdEndpoints, cliTimeout, err)
	}
	if why, _ := agent.WhyEtcd(o, err); why != err.Error() {
		return why
	}
	return fmt.Sprintf("etcd at %s: %v", o.EtcdEndpoints, err)
}

// runConfig is `leased config validate|put|get`.
func runConfig(args []string) int { return runConfigTo(args, os.Stdout, os.Stderr) }

// runConfigTo is runConfig writing to stdout and stderr.
func runConfigTo(args []string, stdout, stderr io.Writer) int {
	const usage = "leased config validate FILE | put [--dry-run] [--force] FILE | get [flags]"
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintf(stderr, "usage: %s\n\n  validate FILE  check a network config offline (exit 1 when invalid); --host: and list\n                 the parts of it this host cannot lease a subnet in\n  put FILE       validate, check it against the live leases, then write it to <prefix>/config\n                 (exit 1 when it would leave a held subnet outside; --force writes anyway,\n                 --dry-run only prints what would change)\n  get            print the config stored in etcd\n\nRun 'leased config put -h' for the etcd flags.\n", usage)
		return 2
	}
	cmd := args[0]
	o := &agent.Options{}
	fs := cliFlags("leased config "+cmd, "leased config "+cmd+" [flags]"+map[bool]string{true: " FILE"}[cmd != "get"], o)
	fs.SetOutput(stderr)
	var force, dryRun *bool
	if cmd == "put" {
		force = fs.Bool("force", false, "write the config even when it leaves subnets that hosts hold outside it, or changes the backend type while hosts run (those hosts refuse it until they are drained and restarted)")
		dryRun = fs.Bool("dry-run", false, "print what would change and which hosts would be affected; write nothing (exit 1 when the put would be refused)")
	}
	host := new(bool)
	if cmd == "validate" {
		host = fs.Bool("host", false, "also list the parts of the network this host cannot lease a subnet in (its own routes there); run it on the host")
	}
	if !parseCLI(fs, args[1:]) {
		return 2
	}
	switch cmd {
	case "validate", "put":
		if fs.NArg() != 1 {
			fs.Usage()
			return 2
		}
		data, cfg, ok := validateFile(fs.Arg(0), stderr)
		if !ok {
			return 1
		}
		if cmd == "validate" {
			if *host {
				return agent.HostReport(data)
			}
			return 0
		}
		cli, err := agent.NewEtcdClient(o)
		if err != nil {
			fmt.Fprintf(stderr, "leased config put: %v\n", err)
			return agent.ExitCode(err)
		}
		defer cli.Close()
		ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
		defer cancel()
		return putConfig(ctx, o, cli, bytes.TrimSpace(data), cfg, *force, *dryRun, stdout, stderr)
	case "get":
		cli, err := agent.NewEtcdClient(o)
		if err != nil {
			fmt.Fprintf(stderr, "leased config get: %v\n", err)
			return agent.ExitCode(err)
		}
		defer cli.Close()
		ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
		defer cancel()
		key := lease.NewKeys(o.EtcdPrefix).Config()
		resp, err := cli.Get(ctx, key)
		if err != nil {
			fmt.Fprintf(stderr, "leased config get: %s\n", etcdErr(o, err))
			return 1
		}
		if len(resp.Kvs) == 0 {
			fmt.Fprintf(stderr, "leased config get: no config at %s; write one with: leased config put FILE\n", key)
			return 1
		}
		var out bytes.Buffer
		if json.Indent(&out, resp.Kvs[0].Value, "", "  ") != nil {
			out.Reset()
			out.Write(resp.Kvs[0].Value)
		}
		fmt.Fprintln(stdout, out.String())
		return 0
	}
	fmt.Fprintf(stderr, "leased config: unknown command %q\nusage: %s\n", cmd, usage)
	return 2
}

// beforeConfigWrite, when set, runs between put's read and its write (tests
// use it to make another writer win the race).
var beforeConfigWrite func()

// putConfig is `leased config put` after validation: it reads the stored
// config and the live leases at one revision, refuses (exit 1) a config
// that strands held subnets unless force, and writes data with a
// compare-and-swap on the config key's mod revision, so that a write made
// by someone else since the read is never overwritten unseen. With dryRun
// it prints what would change and writes nothing.
func putConfig(ctx context.Context, o *agent.Options, cli *clientv3.Client, data []byte, cfg *lease.Config, force, dryRun bool, stdout, stderr io.Writer) int {
	reg := lease.NewRegistry(cli, o.EtcdPrefix)
	k := reg.Keys()
	view, err := reg.List(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "leased config put: %s\n", etcdErr(o, err))
		return 1
	}
	modRev, oldRaw := view.ConfigRev, view.Config // 0, nil: the key does not exist
	var old *lease.Config
	if oldRaw != nil {
		if old, _, err = lease.ParseConfig(oldRaw); err != nil {
			fmt.Fprintf(stderr, "leased config put: note: the config in etcd is invalid (%v); hosts run on the last valid one they saw\n", err)
		}
	}

	if old != nil && old.Equal(cfg) {
		fmt.Fprintf(stdout, "%s already holds this config (at most the formatting differs); nothing written\n", k.Config())
		return 0
	}
	for _, line := range configChanges(old, oldRaw != nil, cfg) {
		fmt.Fprintln(stdout, line)
	}
	conflicts := lease.ConfigConflicts(old, cfg, view.Records)
	if len(conflicts) > 0 {
		w, verdict := stderr, "refused"
		if force {
			verdict = "written anyway (--force)"
		}
		if dryRun {
			w = stdout
			verdict = map[bool]string{true: "would be written (--force)", false: "would be refused"}[force]
		}
		fmt.Fprintf(w, "leased config put: %s: the config leaves %d live host(s) with subnets or a backend it does not allow; those hosts keep serving their subnets and every host refuses this config while they hold them:\n", verdict, len(conflicts))
		for _, c := range conflicts {
			fmt.Fprintf(w, "  %s\n", c)
		}
		if !force {
			fmt.Fprintf(w, "fix: keep every held subnet inside the new config (leased leases lists them), or drain those hosts first (stop leased there; their leases expire after --lease-ttl); --force writes it anyway\n")
		}
	}
	refused := len(conflicts) > 0 && !force
	if dryRun {
		fmt.Fprintln(stdout, "dry run: nothing written")
		if refused {
			return 1
		}
		return 0
	}
	if refused {
		return 1
	}
	if beforeConfigWrite != nil {
		beforeConfigWrite()
	}
	tresp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(k.Config()), "=", modRev)).
		Then(clientv3.OpPut(k.Config(), string(data))).
		Else(clientv3.OpGet(k.Config())).Commit()
	if err != nil {
		fmt.Fprintf(stderr, "leased config put: %s\n", etcdErr(o, err))
		return 1
	}
	if !tresp.Succeeded {
		now := "deleted"
		if kvs := tresp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			now = fmt.Sprintf("written at revision %d", kvs[0].ModRevision)
		}
		fmt.Fprintf(stderr, "leased config put: %s changed while this put ran (%s; it was read at revision %d), probably by another operator; nothing written: run 'leased config get' to see it, then put again\n", k.Config(), now, modRev)
		return 1
	}
	fmt.Fprintf(stdout, "wrote %s (revision %d)\n", k.Config(), tresp.Header.Revision)
	return 0
}

// configChanges describes, one line each, what differs between the stored
// config old (nil: none, or invalid when stored) and new.
func configChanges(old *lease.Config, stored bool, new *lease.Config) []string {
	if old == nil {
		what := "no config is stored"
		if stored {
			what = "the stored config is invalid"
		}
		return []string{fmt.Sprintf("%s; the new one: IPv4 %s; IPv6 %s; backend %s", what, agent.PoolString(new.IPv4), agent.PoolString(new.IPv6), new.Backend.Raw)}
	}
	var out []string
	for _, f := range []struct {
		name     string
		old, new *lease.Pool
	}{{"IPv4", old.IPv4, new.IPv4}, {"IPv6", old.IPv6, new.IPv6}} {
		if agent.PoolString(f.old) != agent.PoolString(f.new) {
			out = append(out, fmt.Sprintf("%s: %s -> %s", f.name, agent.PoolString(f.old), agent.PoolString(f.new)))
		}
	}
	if !backend.SameConfig(old.Backend.Raw, new.Backend.Raw) {
		out = append(out, fmt.Sprintf("Backend: %s -> %s", old.Backend.Raw, new.Backend.Raw))
	}
	return out
}

// validateFile reads a config file ("-": standard input) and checks it
// as the agent would; it prints warnings and errors naming the file to w.
func validateFile(path string, w io.Writer) ([]byte, *lease.Config, bool) {
	var data []byte
	var err error
	if path == "-" {
		data, err = io.ReadAll(os.Stdin)
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		fmt.Fprintf(w, "%v\n", err)
		return nil, nil, false
	}
	cfg, warnings, err := lease.ParseConfig(data)
	for _, x := range warnings {
		fmt.Fprintf(w, "%s: warning: %s\n", path, x)
	}
	if err == nil {
		err = backend.ValidateConfig(cfg.Backend.Raw)
	}
	if err != nil {
		fmt.Fprintf(w, "%s: %v\n", path, err)
		return nil, nil, false
	}
	fmt.Fprintf(w, "%s: valid: IPv4 %s; IPv6 %s; backend %s\n", path, agent.PoolString(cfg.IPv4), agent.PoolString(cfg.IPv6), cfg.Backend.Type)
	return data, cfg, true
}

// runLeases is `leased leases [-o table|json]`.
func runLeases(args []string) int {
	o := &agent.Options{}
	fs := cliFlags("leased leases", "leased leases [-o table|json] [flags]", o)
	format := fs.String("o", "table", "output format: table or json")
	ipamState := fs.String("docker-ipam-state", "/var/lib/leased/docker-ipam.json", "with -o json, this host's Docker network pools are read from here and shown on its row")
	node := fs.String("node-name", "", "this host's node name (default: as the agent derives it)")
	if !parseCLI(fs, args) {
		return 2
	}
	if *format != "table" && *format != "json" {
		fmt.Fprintf(os.Stderr, "leased leases: -o %q: use table or json\n", *format)
		return 2
	}
	cli, err := agent.NewEtcdClient(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased leases: %v\n", err)
		return agent.ExitCode(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	rows, bad, err := leaseview.Read(ctx, cli, o.EtcdPrefix)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased leases: %s\n", etcdErr(o, err))
		return 1
	}
	for _, e := range bad {
		fmt.Fprintf(os.Stderr, "leased leases: warning: %v\n", e)
	}
	if *format == "json" {
		agent.AddDockerPools(rows, *node, *ipamState)
		if err := leaseview.JSON(os.Stdout, rows); err != nil {
			return 1
		}
		return 0
	}
	leaseview.Table(os.Stdout, rows, time.Now())
	return 0
}

// runStatus is `leased status`: this host's lease, its subnet.env and the
// difference between the leases and the kernel. Exit 0 when they agree,
// 1 when they differ or something could not be read.
func runStatus(args []string) int {
	o := &agent.Options{}
	fs := flag.NewFlagSet("leased status", flag.ContinueOnError)
	register(fs, o)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "usage: leased status [flags]\n\nRun on a host with the agent's flags (or /etc/default/leased in the environment).\nExit 0 when the kernel matches the leases, 1 otherwise.\n\nflags:\n")
		fs.PrintDefaults()
	}
	if !parseCLI(fs, args) {
		return 2
	}
	node := o.NodeName
	if node == "" {
		var err error
		if node, err = agent.DefaultNodeName(); err != nil {
			fmt.Fprintf(os.Stderr, "leased status: %v\n", err)
			return 1
		}
	}
	cli, err := agent.NewEtcdClient(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased status: %v\n", err)
		return agent.ExitCode(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	code := 0
	fail := func(format string, a ...any) { fmt.Printf(format+"\n", a...); code = 1 }

	reg := lease.NewRegistry(cli, o.EtcdPrefix)
	k := reg.Keys()
	view, err := reg.List(ctx)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased status: %s\n", etcdErr(o, err))
		return 1
	}
	if view.Config == nil {
		fmt.Fprintf(os.Stderr, "leased status: no network config at %s; write one with: leased config put FILE\n", k.Config())
		return 1
	}
	cfg, _, err := lease.ParseConfig(view.Config)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased status: the config in etcd is invalid: %v\n", err)
		return 1
	}
	self := view.Records[node]
	fmt.Printf("node:        %s\n", node)
	if self == nil {
		fail("lease:       none in etcd under %s (is the agent running?)", k.Lease(node))
		return code
	}
	fmt.Printf("lease:       %v (backend %s)\n", self.Subnets(), self.BackendType)
	env, err := subnetenv.Read(o.SubnetFile)
	switch {
	case err != nil:
		fail("subnet.env:  %v", err)
	case env.Subnet != self.Subnet:
		fail("subnet.env:  %s holds %v, the lease %v: the agent has not caught up or dockerd's file is stale", o.SubnetFile, []any{env.Subnet.V4, env.Subnet.V6}, self.Subnets())
	default:
		fmt.Printf("subnet.env:  %s matches the lease (MTU %d)\n", o.SubnetFile, env.MTU)
	}
	if o.DockerIPAM.On {
		if msg, ok := agent.DockerPoolsStatus(o.DockerIPAM.State, self.Subnet); ok {
			fmt.Println(msg)
		} else {
			fail("%s", msg)
		}
	}
	drift, npeers, nrefused, err := agent.CheckDatapath(ctx, o, node, cfg, self, view.Records)
	if err != nil {
		fail("datapath:    %v", err)
		return code
	}
	fmt.Printf("peers:       %d programmed, %d refused\n", npeers, nrefused+len(view.Malformed))
	if drift.Empty() {
		fmt.Println("datapath:    the kernel matches the leases")
		return code
	}
	code = 1
	fmt.Println("datapath:    the kernel differs from the leases (the agent repairs this within its resync interval):")
	for _, m := range drift.Missing {
		fmt.Printf("  missing  %s\n", m)
	}
	for _, x := range drift.Extra {
		fmt.Printf("  extra    %s\n", x)
	}
	return code
}
