package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/leaseview"
)

const labUsage = `usage: leased-lab [lab] [flags]   (also: leased lab [flags])

Builds hosts in network namespaces on a LAN, runs a real etcd (embedded) and
one leased agent per host, gives each host a container behind a bridge
addressed from its subnet.env, prints the leases and a container-to-container
connectivity matrix, and tears everything down (at once, or with --hold on
Ctrl-C). Needs root. Exit status 1 when any pair cannot reach another.

flags:
`

func runLab(args []string) int {
	var (
		cfg      lab.Config
		families string
		hold     bool
		verbose  int
	)
	fs := flag.NewFlagSet("leased-lab lab", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(os.Stderr, labUsage); fs.PrintDefaults() }
	fs.IntVar(&cfg.Hosts, "hosts", 3, "number of hosts")
	fs.StringVar(&cfg.Backend, "backend", "host-gw", "backend: host-gw, vxlan or proxy-ndp (proxy-ndp adds an upstream router that knows only the hosts' on-link /64)")
	fs.StringVar(&families, "families", "dual", "leased families: dual, ipv4 or ipv6")
	fs.StringVar(&cfg.Network, "network", "10.100.0.0/16", "IPv4 cluster network")
	fs.IntVar(&cfg.SubnetLen, "subnet-len", 24, "IPv4 subnet length")
	fs.StringVar(&cfg.IPv6Network, "ipv6-network", "", "IPv6 cluster network (default 2001:db8:cd11::/48; proxy-ndp: 2001:db8:ab11:0:8000::/65)")
	fs.IntVar(&cfg.IPv6SubnetLen, "ipv6-subnet-len", 0, "IPv6 subnet length (64, 80, ... 126; default 64, proxy-ndp: 80)")
	fs.StringVar(&cfg.Underlay, "underlay", "dual", "families of the LAN between hosts: dual, v4 or v6")
	fs.BoolVar(&cfg.Routed, "routed", false, "put every second host on a second LAN behind a router (use with vxlan)")
	fs.DurationVar(&cfg.LeaseTTL, "lease-ttl", 30*time.Second, "the agents' --lease-ttl")
	fs.StringVar(&cfg.Dir, "dir", "", "keep etcd data, subnet files and agent logs here (default: a temporary directory, removed)")
	fs.BoolVar(&hold, "hold", false, "keep the lab up until Ctrl-C (inspect with: ip netns; ip netns exec <ns> ip route)")
	fs.IntVar(&verbose, "agent-v", 0, "the agents' klog verbosity (-v)")
	leased := fs.String("leased", "", "the leased agent binary (default: next to leased-lab, else in $PATH)")
	var endpoints string
	fs.StringVar(&endpoints, "etcd-endpoints", "", "use this external etcd (comma-separated http:// URLs) instead of the embedded one; the lab relays it into the LAN")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if endpoints != "" {
		cfg.EtcdEndpoints = strings.Split(endpoints, ",")
	}
	switch families {
	case "dual":
		cfg.IPv4, cfg.IPv6 = true, true
	case "ipv4":
		cfg.IPv4 = true
	case "ipv6":
		cfg.IPv6 = true
	default:
		fmt.Fprintf(os.Stderr, "leased lab: --families %q: use dual, ipv4 or ipv6\n", families)
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "leased lab: needs root (network namespaces): run it with sudo")
		return 2
	}
	bin, err := agentBinary(*leased)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased lab: %v\n", err)
		return 2
	}
	cfg.Binary = bin
	cfg.AgentArgs = []string{fmt.Sprintf("-v=%d", verbose)}
	cfg.Log = func(f string, a ...any) { fmt.Printf("lab: "+f+"\n", a...) }

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	start := time.Now()
	l, err := lab.Up(ctx, cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased lab: %v\n", err)
		return 1
	}
	defer func() {
		l.Close()
		fmt.Println("lab: torn down (namespaces, agents, etcd)")
	}()
	fmt.Printf("lab: %d hosts up with %s in %s (tag %s, etcd at %s)\n", len(l.Hosts), cfg.Backend, time.Since(start).Round(time.Millisecond), l.Tag, l.EtcdEndpoint)
	rows, _, err := leaseview.Read(ctx, l.Client, "")
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased lab: reading leases: %v\n", err)
		return 1
	}
	fmt.Println("\nleases in etcd (leased leases):")
	leaseview.Table(os.Stdout, rows, time.Now())
	for _, h := range l.Hosts {
		b, _ := os.ReadFile(h.SubnetFile())
		fmt.Printf("\n%s %s:\n  %s\n", h.Name, h.SubnetFile(), strings.ReplaceAll(strings.TrimSpace(string(b)), "\n", "\n  "))
	}
	failed := lab.PrintMatrix(os.Stdout, l, l.Matrix(ctx, 10*time.Second))
	failed += lab.PrintUpstream(os.Stdout, l, l.UpstreamMatrix(ctx, 10*time.Second)) // proxy-ndp only
	if failed > 0 {
		for _, h := range l.Hosts {
			fmt.Printf("\n--- agent log of %s (last lines) ---\n%s\n", h.Name, l.LogTail(h, 15))
		}
	}
	if hold {
		fmt.Println("\nlab: holding; Ctrl-C tears it down")
		<-ctx.Done()
	}
	if failed > 0 {
		fmt.Printf("\nlab: %d pairs could not reach each other\n", failed)
		return 1
	}
	fmt.Println("\nlab: every container reaches every other container")
	return 0
}
