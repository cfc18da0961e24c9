// Command leased is the node agent: it leases this host a slice of the
// cluster network from etcd, writes it to subnet.env for dockerd and
// programs routes to every other host's slice.
//
//	leased [flags]          run the agent
//	leased config validate|put|get, leases, status, teardown   operator commands
//	leased lab [flags]      runs leased-lab: a multi-host lab in network namespaces
//	leased bench-datapath   runs leased-lab: the datapath benchmark
//	leased version, man, completion bash
//	leased help             this text
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/agent"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/metrics"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

// run is the one place that decides the exit code.
func run(args []string) int {
	if len(args) > 0 {
		switch args[0] {
		case "lab", "bench-datapath":
			return execLab(args)
		case "config":
			return runConfig(args[1:])
		case "leases":
			return runLeases(args[1:])
		case "status":
			return runStatus(args[1:])
		case "teardown":
			return runTeardown(args[1:])
		case "help", "-h", "--help":
			fmt.Fprint(os.Stderr, usage)
			printGroupedDefaults(os.Stderr)
			return 0
		case "version":
			fmt.Print(versionText())
			return 0
		case "man":
			writeMan(os.Stdout)
			return 0
		case "completion":
			if len(args) != 2 || args[1] != "bash" {
				fmt.Fprintln(os.Stderr, "usage: leased completion bash")
				return 2
			}
			writeBashCompletion(os.Stdout)
			return 0
		}
		if isVersionFlag(args[0]) {
			fmt.Print(versionText())
			return 0
		}
	}
	o := &agent.Options{}
	fs := newFlagSet("leased", o)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "leased: unknown command %q\n%s", fs.Arg(0), usage)
		return 2
	}
	if err := applyEnv(fs); err != nil {
		fmt.Fprintf(os.Stderr, "leased: %v\n", err)
		return 2
	}
	if err := o.Validate(); err != nil {
		fmt.Fprintf(os.Stderr, "leased: %v\n", err)
		return 2
	}
	defer klog.Flush()
	if os.Getenv("GOGC") == "" {
		// The agent's memory comes out of every host's budget: collect at
		// half the default heap growth (about 10% more GC CPU, a peak heap
		// a quarter smaller). GOGC in the environment overrides this.
		debug.SetGCPercent(50)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if p := os.Getenv("LEASED_CPUPROFILE"); p != "" { // for performance work
		if f, err := os.Create(p); err == nil {
			pprof.StartCPUProfile(f) //nolint:errcheck
			defer pprof.StopCPUProfile()
		}
	}
	if p := os.Getenv("LEASED_MEMPROFILE"); p != "" { // the heap when READY
		runtime.MemProfileRate = 4096
		go writeHeapWhenReady(ctx, p)
	}
	klog.InfoS("leased starting", "version", buildVersion(), "go", runtime.Version())
	metrics.SetBuildInfo(buildVersion(), runtime.Version())
	if err := agent.Run(ctx, o); err != nil {
		var pe *backend.PrivilegeError
		if errors.As(err, &pe) {
			klog.ErrorS(err, "leased stopped without claiming a subnet; restarting cannot help", "exitStatus", backend.PrivilegeExitStatus)
			return backend.PrivilegeExitStatus
		}
		klog.ErrorS(err, "leased stopped")
		return agent.ExitCode(err)
	}
	klog.InfoS("leased stopped; the lease and the datapath stay in place until the lease expires")
	return 0
}

const usage = `usage:
  leased [flags]                 run the agent
  leased config validate FILE    check a network config offline (--host: and this host's routes in it)
  leased config put FILE         validate, check against the live leases, then write it to etcd
                                 (--dry-run: show the change; --force: write a config that strands held subnets)
  leased config get              print the network config in etcd
  leased leases [-o table|json]  every host's lease
  leased status                  this host: lease, subnet.env, kernel vs leases
  leased teardown [--release]    remove what leased programmed on this host (the agent must be stopped);
                                 --release: also this host's lease in etcd and subnet.env
  leased version                 print the version (also --version)
  leased man                     print the leased(8) manual page
  leased completion bash         print a bash completion script
  leased lab [flags]             a multi-host lab in network namespaces
  leased bench-datapath          the datapath benchmark
Each command takes -h.

flags (each also settable as LEASED_<FLAG>, e.g. LEASED_ETCD_ENDPOINTS):
`

func newFlagSet(name string, o *agent.Options) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	register(fs, o)
	klog.InitFlags(fs)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		printGroupedDefaults(fs.Output())
	}
	return fs
}

// execLab runs `leased-lab args...` from next to this executable (or $PATH).
// The lab and the benchmark embed an etcd server, which the agent binary
// does not carry.
func execLab(args []string) int {
	path := ""
	if exe, err := os.Executable(); err == nil {
		if p := filepath.Join(filepath.Dir(exe), "leased-lab"); fileExists(p) {
			path = p
		}
	}
	if path == "" {
		p, err := exec.LookPath("leased-lab")
		if err != nil {
			fmt.Fprintf(os.Stderr, "leased %s: needs the leased-lab binary next to leased or in $PATH: build it with make build (go build -o bin/leased-lab ./cmd/leased-lab)\n", args[0])
			return 2
		}
		path = p
	}
	err := syscall.Exec(path, append([]string{path}, args...), os.Environ())
	fmt.Fprintf(os.Stderr, "leased %s: running %s: %v\n", args[0], path, err)
	return 1
}

func fileExists(p string) bool { st, err := os.Stat(p); return err == nil && !st.IsDir() }
