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

	"github.com/leased/leased/internal/lab"
)

// runBench is `leased bench-datapath`: the datapath benchmark of
// Documentation/performance.md.
func runBench(args []string) int {
	fs := flag.NewFlagSet("leased bench-datapath", flag.ContinueOnError)
	sizes := fs.String("peers", "1000,5000", "comma-separated peer counts")
	newPeers := fs.Int("new-peers", 200, "new peer leases to time (lease → route)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var ns []int
	for _, s := range strings.Split(*sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "leased bench-datapath: --peers %q: want positive numbers\n", *sizes)
			return 2
		}
		ns = append(ns, n)
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	res, err := lab.BenchDatapath(ctx, exe, ns, *newPeers, func(string, ...any) {})
	lab.PrintBench(os.Stdout, res)
	if err != nil {
		fmt.Fprintf(os.Stderr, "leased bench-datapath: %v\n", err)
		return 1
	}
	return 0
}
