// Command leased-lab holds the tools that need an etcd server: the
// multi-host lab and the datapath benchmark. They are kept out of the leased
// binary so that the agent does not carry (and initialise) an embedded etcd
// server: that alone was 20 MB of binary and several MB of resident memory.
//
//	leased-lab [lab] [flags]      bring up a multi-host lab in network namespaces
//	leased-lab bench-datapath     the datapath benchmark (Documentation/performance.md)
//	leased-lab sim                the fleet simulator (Documentation/scale.md)
//
// `leased lab` and `leased bench-datapath` run this binary too.
package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

const usage = `usage:
  leased-lab [lab] [flags]       a multi-host lab in network namespaces
  leased-lab bench-datapath      the datapath benchmark
  leased-lab sim                 the fleet simulator: K hosts' leasing code against one etcd cluster
Each command takes -h. lab and bench-datapath run the leased agent binary found next to
leased-lab (or in $PATH); --leased PATH picks another.
`

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) > 0 {
		switch args[0] {
		case "lab":
			return runLab(args[1:])
		case "bench-datapath":
			return runBench(args[1:])
		case "sim":
			return runSim(args[1:])
		case "help", "-h", "--help":
			fmt.Fprint(os.Stderr, usage)
			return 0
		}
	}
	return runLab(args)
}

// agentBinary finds the leased executable the lab and the benchmark run:
// explicit, else next to this executable, else in $PATH.
func agentBinary(explicit string) (string, error) {
	if explicit != "" {
		return filepath.Abs(explicit)
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "leased")
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	p, err := exec.LookPath("leased")
	if err != nil {
		return "", errors.New("no leased binary next to leased-lab or in $PATH: build it (make build) or give --leased PATH")
	}
	return filepath.Abs(p)
}
