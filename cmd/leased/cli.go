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

	"github.com/leased/leased/internal/leaseview"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
)

// cliTimeout bounds every etcd request of the CLI commands.
const cliTimeout = 10 * time.Second

// cliFlags returns a flag set with the etcd flags (and LEASED_* variables).
func cliFlags(name, usage string, o *options) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	o.registerEtcd(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: %s\n\nflags (each also settable as LEASED_<FLAG>):\n", usage)
		fs.PrintDefaults()
	}
	return fs
}

func parseCLI(fs *flag.FlagSet, args []string) bool {
	if err := fs.Parse(args); err != nil {
		return false
	}
	if err := applyEnv(fs); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", fs.Name(), err)
		return false
	}
	return true
}

// etcdErr turns an etcd client error into advice.
func etcdErr(o *options, err error) string {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Sprintf("etcd at %s did not answer within %s: check that it runs, --etcd-endpoints, and the TLS flags (%v)", o.etcdEndpoints, cliTimeout, err)
	}
	return fmt.Sprintf("etcd at %s: %v", o.etcdEndpoints, err)
}

// runConfig is `leased config validate|put|get`.
func runConfig(args []string) int {
	const usage = "leased config validate FILE | put FILE | get [flags]"
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintf(os.Stderr, "usage: %s\n\n  validate FILE  check a network config offline (exit 1 when invalid); --host: and list\n                 the parts of it this host cannot lease a subnet in\n  put FILE       validate, then write it to <prefix>/config\n  get            print the config stored in etcd\n\nRun 'leased config put -h' for the etcd flags.\n", usage)
		return 2
	}
	cmd := args[0]
	o := &options{}
	fs := cliFlags("leased config "+cmd, "leased config "+cmd+" [flags]"+map[bool]string{true: " FILE"}[cmd != "get"], o)
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
		data, ok := validateFile(fs.Arg(0))
		if !ok {
			return 1
		}
		if cmd == "validate" {
			if *host {
				return hostReport(data)
			}
			return 0
		}
		cli, err := newEtcdClient(o)
		if err != nil {
			fmt.Fprintf(os.Stderr, "leased config put: %v\n", err)
			return 1
		}
		defer cli.Close()
		ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
		defer cancel()
		key := lease.NewKeys(o.etcdPrefix).Config()
		if _, err := cli.Put(ctx, key, string(bytes.TrimSpace(data))); err != nil {
			fmt.Fprintf(os.Stderr, "leased config put: %s\n", etcdErr(o, err))
			return 1
		}
		fmt.Printf("wrote %s\n", key)
		return 0
	case "get":
		cli, err := newEtcdClient(o)
		if err != nil {
			fmt.Fprintf(os.Stderr, "leased config get: %v\n", err)
			return 1
		}
		defer cli.Close()
		ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
		defer cancel()
		key := lease.NewKeys(o.etcdPrefix).Config()
		resp, err := cli.Get(ctx, key)
		if err != nil {
			fmt.Fprintf(os.Stderr, "leased config get: %s\n", etcdErr(o, err))
			return 1
		}
		if len(resp.Kvs) == 0 {
			fmt.Fprintf(os.Stderr, "leased config get: no config at %s; write one with: leased config put FILE\n", key)
			return 1
		}
		var out bytes.Buffer
		if json.Indent(&out, resp.Kvs[0].Value, "", "  ") != nil {
			out.Reset()
			out.Write(resp.Kvs[0].Value)
		}
		fmt.Println(out.String())
		return 0
	}
	fmt.Fprintf(os.Stderr, "leased config: unknown command %q\nusage: %s\n", cmd, usage)
	return 2
}

// validateFile reads a config file ("-": standard input) and checks it
// as the agent would; it prints warnings and errors naming the file.
func validateFile(path string) ([]byte, bool) {
	var data []byte
	var err error
	if path == "-" {
		data, err = io.ReadAll(os.Stdin)
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%v\n", err)
		return nil, false
	}
	cfg, warnings, err := lease.ParseConfig(data)
	for _, w := range warnings {
		fmt.Fprintf(os.Stderr, "%s: warning: %s\n", path, w)
	}
	if err == nil {
		err = backend.ValidateConfig(cfg.Backend.Raw)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
		return nil, false
	}
	fmt.Fprintf(os.Stderr, "%s: valid: IPv4 %s; IPv6 %s; backend %s\n", path, poolString(cfg.IPv4), poolString(cfg.IPv6), cfg.Backend.Type)
	return data, true
}

// runLeases is `leased leases [-o table|json]`.
func runLeases(args []string) int {
	o := &options{}
	fs := cliFlags("leased leases", "leased leases [-o table|json] [flags]", o)
	format := fs.String("o", "table", "output format: table or json")
	if !parseCLI(fs, args) {
		return 2
	}
	if *format != "table" && *format != "json" {
		fmt.Fprintf(os.Stderr, "leased leases: -o %q: use table or json\n", *format)
		return 2
	}
	cli, err := newEtcdClient(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased leases: %v\n", err)
		return 1
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	rows, bad, err := leaseview.Read(ctx, cli, o.etcdPrefix)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased leases: %s\n", etcdErr(o, err))
		return 1
	}
	for _, e := range bad {
		fmt.Fprintf(os.Stderr, "leased leases: warning: %v\n", e)
	}
	if *format == "json" {
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
	o := &options{}
	fs := flag.NewFlagSet("leased status", flag.ContinueOnError)
	o.register(fs)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "usage: leased status [flags]\n\nRun on a host with the agent's flags (or /etc/default/leased in the environment).\nExit 0 when the kernel matches the leases, 1 otherwise.\n\nflags:\n")
		fs.PrintDefaults()
	}
	if !parseCLI(fs, args) {
		return 2
	}
	node := o.nodeName
	if node == "" {
		var err error
		if node, err = defaultNodeName(); err != nil {
			fmt.Fprintf(os.Stderr, "leased status: %v\n", err)
			return 1
		}
	}
	cli, err := newEtcdClient(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased status: %v\n", err)
		return 1
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	code := 0
	fail := func(format string, a ...any) { fmt.Printf(format+"\n", a...); code = 1 }

	k := lease.NewKeys(o.etcdPrefix)
	resp, err := cli.Txn(ctx).Then(clientv3.OpGet(k.Config()), clientv3.OpGet(k.Leases(), clientv3.WithPrefix())).Commit()
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased status: %s\n", etcdErr(o, err))
		return 1
	}
	ckvs := resp.Responses[0].GetResponseRange().Kvs
	if len(ckvs) == 0 {
		fmt.Fprintf(os.Stderr, "leased status: no network config at %s; write one with: leased config put FILE\n", k.Config())
		return 1
	}
	cfg, _, err := lease.ParseConfig(ckvs[0].Value)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased status: the config in etcd is invalid: %v\n", err)
		return 1
	}
	var view lease.View
	view.Apply(lease.Batch{Reset: true, Events: lease.LeaseEvents(k, resp.Responses[1].GetResponseRange().Kvs)})
	self := view.Records[node]
	fmt.Printf("node:        %s\n", node)
	if self == nil {
		fail("lease:       none in etcd under %s (is the agent running?)", k.Lease(node))
		return code
	}
	fmt.Printf("lease:       %v (backend %s)\n", self.Subnets(), self.BackendType)
	env, err := subnetenv.Read(o.subnetFile)
	switch {
	case err != nil:
		fail("subnet.env:  %v", err)
	case env.Subnet4 != self.Subnet || env.Subnet6 != self.IPv6Subnet:
		fail("subnet.env:  %s holds %v, the lease %v: the agent has not caught up or dockerd's file is stale", o.subnetFile, []any{env.Subnet4, env.Subnet6}, self.Subnets())
	default:
		fmt.Printf("subnet.env:  %s matches the lease (MTU %d)\n", o.subnetFile, env.MTU)
	}
	ext, _, err := findExtIface(o)
	if err != nil {
		fail("datapath:    %v", err)
		return code
	}
	be, err := backend.New(cfg.Backend.Raw, ext, node, backend.Options{})
	if err != nil {
		fail("datapath:    %v", err)
		return code
	}
	ps := lease.NewPeerSet(cfg, self, view.Records)
	peers, rejected := ps.Accepted(), ps.Rejected()
	local := backend.Local{Node: node, Subnet4: self.Subnet, Subnet6: self.IPv6Subnet}
	if cfg.IPv4 != nil {
		local.Network4 = cfg.IPv4.Network
	}
	if cfg.IPv6 != nil {
		local.Network6 = cfg.IPv6.Network
	}
	drift, err := backend.Check(ctx, be, local, toPeers(peers))
	if err != nil {
		fail("datapath:    %v", err)
		return code
	}
	fmt.Printf("peers:       %d programmed, %d refused\n", len(peers), len(rejected)+len(view.Malformed))
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
