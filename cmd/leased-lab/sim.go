package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/fleetsim"
)

const simUsage = `usage: leased-lab sim [flags]

Simulates fleets of K leased hosts in this process against a real 3-member
etcd cluster (each member its own process and data directory, fsync on).
Every simulated host has its own etcd client, etcd lease, claim and prefix
watch: the agent's leasing code, with a recorder in place of the kernel.
For each K (and each proxy count) it runs: a join storm, the steady state,
one new host at a time, a rolling restart, a mass expiry; then prints one
table. Exit status 1 when an invariant broke (a subnet held twice, a lease
lost, a peer flapping, an incomplete peer set). See Documentation/scale.md.

flags:
`

func runSim(args []string) int {
	fs := flag.NewFlagSet("leased-lab sim", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(os.Stderr, simUsage); fs.PrintDefaults() }
	sizes := fs.String("hosts", "250", "comma-separated fleet sizes K")
	proxies := fs.String("proxies", "0", "comma-separated numbers of etcd gRPC proxies to spread the hosts over (0: hosts connect to the members); each K runs once per number")
	members := fs.Int("members", 3, "etcd cluster members")
	embedded := fs.Bool("embedded", false, "run the members embedded in this process instead of the etcd binary (no per-member CPU and memory figures; no proxies)")
	ttl := fs.Duration("lease-ttl", 20*time.Second, "the hosts' --lease-ttl (keep-alives are sent every TTL/3)")
	steady := fs.Duration("steady", 30*time.Second, "how long the steady state is measured")
	joins := fs.Int("joins", 50, "single new hosts timed one after the other")
	step := fs.Float64("restart-step", 0.01, "fraction of the fleet restarted at a time in the rolling restart")
	expire := fs.Float64("expire", 0.1, "fraction of the fleet killed at once in the mass expiry")
	dual := fs.Bool("dual", false, "dual-stack config (one more lock key per host)")
	dir := fs.String("dir", "", "keep the etcd data here (default: a temporary directory, removed)")
	agents := fs.String("agent", "current", "comma-separated agent behaviours to run each K with: current, or previous (the whole-prefix watch and a new etcd lease per restart, as before Documentation/scale.md \"What was wasted\" 1 and 2), for before/after figures in one run")
	heartbeat := fs.Duration("etcd-heartbeat", 0, "the members' --heartbeat-interval (0: etcd's default, 100ms); raise it with --etcd-election on a loaded machine; members started from the binary only")
	election := fs.Duration("etcd-election", 0, "the members' --election-timeout (0: etcd's default, 1s)")
	verbose := fs.Bool("v", false, "print progress")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ks, err := intList(*sizes, 2)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased-lab sim: --hosts: %v\n", err)
		return 2
	}
	ps, err := intList(*proxies, 0)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased-lab sim: --proxies: %v\n", err)
		return 2
	}
	var previous []bool
	for _, a := range strings.Split(*agents, ",") {
		switch strings.TrimSpace(a) {
		case "current":
			previous = append(previous, false)
		case "previous":
			previous = append(previous, true)
		default:
			fmt.Fprintf(os.Stderr, "leased-lab sim: --agent: %q: want current or previous, comma-separated\n", a)
			return 2
		}
	}
	var memberFlags []string
	if *heartbeat > 0 {
		memberFlags = append(memberFlags, "--heartbeat-interval", strconv.FormatInt(heartbeat.Milliseconds(), 10))
	}
	if *election > 0 {
		memberFlags = append(memberFlags, "--election-timeout", strconv.FormatInt(election.Milliseconds(), 10))
	}
	if *embedded && (len(ps) > 1 || ps[0] != 0) {
		fmt.Fprintln(os.Stderr, "leased-lab sim: --embedded runs no proxies: drop --proxies or --embedded")
		return 2
	}
	base := *dir
	if base == "" {
		if base, err = os.MkdirTemp("", "leased-sim-"); err != nil {
			fmt.Fprintf(os.Stderr, "leased-lab sim: %v\n", err)
			return 1
		}
		defer os.RemoveAll(base)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	logf := func(string, ...any) {}
	if *verbose {
		logf = func(f string, a ...any) {
			fmt.Fprintf(os.Stderr, "%s sim: "+f+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
		}
	}
	var results []*fleetsim.Result
	failed := false
	for _, k := range ks {
		for _, np := range ps {
			for _, prev := range previous {
				o := fleetsim.Options{Hosts: k, LeaseTTL: *ttl, Steady: *steady, Joins: *joins,
					RestartStep: *step, ExpireFraction: *expire, Dual: *dual, Log: logf, Previous: prev}
				run := filepath.Join(base, fmt.Sprintf("k%d-p%d-prev%v", k, np, prev))
				res, err := simOnce(ctx, run, *members, np, *embedded, memberFlags, o, logf)
				if res != nil && prev {
					res.Label += ", previous agent"
				}
				if res != nil {
					results = append(results, res)
					if v := res.Violations(); len(v) > 0 {
						fmt.Fprintf(os.Stderr, "leased-lab sim: K=%d, %d proxies: INVARIANT BROKEN: %s\n", k, np, strings.Join(v, "; "))
						failed = true
					}
				}
				if err != nil {
					fmt.Fprintf(os.Stderr, "leased-lab sim: K=%d, %d proxies: %v\n", k, np, err)
					failed = true
				}
				if ctx.Err() != nil {
					break
				}
			}
		}
	}
	fleetsim.Print(os.Stdout, results)
	if failed {
		return 1
	}
	return 0
}

// simOnce runs one K on a fresh cluster (and proxies) under dir.
func simOnce(ctx context.Context, dir string, members, proxies int, embedded bool, memberFlags []string, o fleetsim.Options, logf func(string, ...any)) (*fleetsim.Result, error) {
	if embedded {
		c, err := etcdserver.StartCluster(dir, members, etcdserver.ClusterOptions{})
		if err != nil {
			return nil, err
		}
		defer c.Stop()
		o.Endpoints = c.Endpoints()
		res, err := fleetsim.Run(ctx, o)
		if res != nil {
			res.Label = fmt.Sprintf("%d embedded members", members)
		}
		return res, err
	}
	c, err := etcdserver.StartBinaryCluster(dir, members, memberFlags...)
	if err != nil {
		return nil, err
	}
	defer c.Stop()
	logf("etcd %s: %d members at %v", c.Version, members, c.Endpoints())
	o.AdminEndpoints = c.Endpoints()
	o.Endpoints = c.Endpoints()
	for _, m := range c.Members {
		o.Procs = append(o.Procs, fleetsim.Proc{Name: m.Name, Pid: m.Pid(), MetricsURL: m.MetricsURL, Member: true})
	}
	if proxies > 0 {
		o.Endpoints = nil
		for i := range proxies {
			name := "proxy" + strconv.Itoa(i)
			p, err := etcdserver.StartGRPCProxy(name, filepath.Join(dir, name), c.Endpoints(), etcdserver.ProxyTLS{})
			if err != nil {
				return nil, err
			}
			defer p.Stop()
			o.Endpoints = append(o.Endpoints, p.ClientURL)
			o.Procs = append(o.Procs, fleetsim.Proc{Name: name, Pid: p.Pid(), MetricsURL: p.MetricsURL})
		}
	}
	res, err := fleetsim.Run(ctx, o)
	if res != nil {
		res.Label = fmt.Sprintf("%d members (etcd %s)", members, c.Version)
		if proxies > 0 {
			res.Label = fmt.Sprintf("%d proxies, %d members", proxies, members)
		}
	}
	return res, err
}

func intList(s string, least int) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < least {
			return nil, fmt.Errorf("%q: want comma-separated numbers of at least %d", s, least)
		}
		out = append(out, n)
	}
	return out, nil
}
