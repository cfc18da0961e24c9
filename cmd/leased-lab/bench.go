package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/leased/leased/internal/lab"
)

// runBench is `leased-lab bench-datapath`: the datapath benchmark of
// Documentation/performance.md.
func runBench(args []string) int {
	fs := flag.NewFlagSet("leased-lab bench-datapath", flag.ContinueOnError)
	sizes := fs.String("peers", "1000,5000,50000", "comma-separated peer counts")
	runs := fs.Int("runs", 1, "runs per peer count; more than one adds a median row")
	newPeers := fs.Int("new-peers", 200, "new peer leases to time (lease → route)")
	joinEvery := fs.Duration("join-interval", 150*time.Millisecond, "wait between timed new peers (200 × 150ms spreads them over three 10s resync periods)")
	idle := fs.Duration("idle", 5*time.Minute, "average the idle agent's CPU over this window, at the largest peer count (0: skip)")
	plainMax := fs.Int("plain-max", 0, "skip the plain-route ip -batch above this many peers (0: never skip)")
	verbose := fs.Bool("v", false, "print progress and the agent's log")
	leased := fs.String("leased", "", "the leased agent binary (default: next to leased-lab, else in $PATH)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var ns []int
	for _, s := range strings.Split(*sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "leased-lab bench-datapath: --peers %q: want positive numbers\n", *sizes)
			return 2
		}
		ns = append(ns, n)
	}
	exe, err := agentBinary(*leased)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased-lab bench-datapath: %v\n", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	logf := func(string, ...any) {}
	if *verbose {
		logf = func(f string, a ...any) { fmt.Fprintf(os.Stderr, "bench: "+f+"\n", a...) }
	}
	res, err := lab.BenchDatapathWith(ctx, lab.BenchOptions{Binary: exe, Sizes: ns, Runs: *runs, NewPeers: *newPeers,
		JoinInterval: *joinEvery, IdleWindow: *idle, PlainMax: *plainMax, Log: logf})
	lab.PrintBench(os.Stdout, res)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased-lab bench-datapath: %v\n", err)
		return 1
	}
	return 0
}
