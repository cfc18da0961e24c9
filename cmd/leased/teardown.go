package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/leased/leased/internal/agent"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
)

// runTeardown is `leased teardown [--release]`: it removes from this host
// what leased programmed (backend.Teardown) and, with --release, this
// host's lease keys in etcd and its runtime files. Exit 0 when everything
// is removed (also when there was nothing to remove), 1 when something
// could not be removed or the agent runs, 2 for bad flags.
func runTeardown(args []string) int { return runTeardownTo(args, os.Stdout, os.Stderr) }

// runTeardownTo is runTeardown writing to stdout and stderr.
func runTeardownTo(args []string, stdout, stderr io.Writer) int {
	o := &agent.Options{}
	fl := flag.NewFlagSet("leased teardown", flag.ContinueOnError)
	fl.SetOutput(stderr)
	register(fl, o)
	release := fl.Bool("release", false, "also delete this host's lease record and subnet locks in etcd (only keys under this host's node name held under an etcd lease this machine's agent granted) and remove subnet.env, own-leases and the lease cache next to --subnet-file")
	fl.Usage = func() {
		fmt.Fprint(fl.Output(), "usage: leased teardown [--release] [flags]\n\n"+
			"Remove what leased programmed on this host: its routes (protocol 76), its VXLAN devices\n"+
			"leased.4 and leased.6 with their neighbour and FDB entries, and the iptables and ip6tables\n"+
			"chains LEASED-FWD and LEASED-POSTRTG with the jumps to them. Sysctls are left as they are.\n"+
			"Stop the agent first: teardown refuses to run while it runs. Run it with the agent's flags\n"+
			"(or /etc/default/leased in the environment). Exit 0 when nothing of leased's is left.\n\nflags:\n")
		fl.PrintDefaults()
	}
	if !parseCLI(fl, args) {
		return 2
	}
	if fl.NArg() > 0 {
		fmt.Fprintf(stderr, "leased teardown: unexpected argument %q\n", fl.Arg(0))
		fl.Usage()
		return 2
	}
	unlock, err := agent.LockOutAgent(o)
	if err != nil {
		fmt.Fprintf(stderr, "leased teardown: %v\n", err)
		return 1
	}
	defer unlock()

	code := 0
	removed, err := backend.Teardown("")
	for _, r := range removed {
		fmt.Fprintf(stdout, "removed %s\n", r)
	}
	if err != nil {
		fmt.Fprintf(stderr, "leased teardown: could not remove everything; the rest is left in place, run leased teardown again once fixed: %v\n", err)
		code = 1
	}
	n := len(removed)
	if *release {
		node := o.NodeName
		if node == "" {
			if node, err = agent.DefaultNodeName(); err != nil {
				fmt.Fprintf(stderr, "leased teardown: %v\n", err)
				return 1
			}
		}
		own := lease.OwnLeases{Path: o.OwnLeasesFile(), Node: node}
		ids, _, err := own.Load()
		if err != nil {
			fmt.Fprintf(stderr, "leased teardown: reading %s: %v\n", own.Path, err)
			return 1
		}
		cli, err := agent.NewEtcdClient(o)
		if err != nil {
			fmt.Fprintf(stderr, "leased teardown: %v\n", err)
			return agent.ExitCode(err)
		}
		defer cli.Close()
		ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
		defer cancel()
		keys, err := agent.ReleaseOwnKeys(ctx, cli, lease.NewKeys(o.EtcdPrefix), node, ids, own.Path)
		for _, k := range keys {
			fmt.Fprintf(stdout, "deleted etcd key %s\n", k)
		}
		n += len(keys)
		switch {
		case errors.As(err, new(*agent.NotOwnError)):
			// This host's own keys are gone: its files go too.
			fmt.Fprintf(stderr, "leased teardown: %v\n", err)
			code = 1
		case errors.Is(err, agent.ErrKeysChanged):
			fmt.Fprintf(stderr, "leased teardown: %v\n", err)
			return 1
		case err != nil:
			fmt.Fprintf(stderr, "leased teardown: %s\n", etcdErr(o, err))
			return 1
		}
		for _, p := range []string{o.SubnetFile, o.OwnLeasesFile(), o.LeaseCachePath()} {
			if p == "" {
				continue
			}
			if err := os.Remove(p); err == nil {
				fmt.Fprintf(stdout, "removed file %s\n", p)
				n++
			} else if !errors.Is(err, fs.ErrNotExist) {
				fmt.Fprintf(stderr, "leased teardown: %v\n", err)
				code = 1
			}
		}
	}
	if n == 0 && code == 0 {
		fmt.Fprintln(stdout, "nothing of leased's to remove on this host")
	}
	return code
}
