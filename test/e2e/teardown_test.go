package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/lease"
)

// TestTeardown runs leased teardown --release on a host of a lab of each
// backend: afterwards the host's routes, links, addresses, iptables rules
// and forwarding sysctls are those recorded before its agent first started, its lease keys
// are gone from etcd while the other host's remain, and a second run
// changes nothing and exits 0. While the agent runs it is refused.
func TestTeardown(t *testing.T) {
	for _, backend := range []string{"host-gw", "vxlan", "proxy-ndp"} {
		t.Run(backend, func(t *testing.T) {
			var before []string
			var h1 *lab.Host
			l := up(t, lab.Config{Backend: backend, Hosts: 2, NoContainers: true,
				AgentArgs: []string{"--ip-masq"},
				BeforeAgents: func(l *lab.Lab) error {
					h1 = l.Hosts[0]
					// Forwarding on, as dockerd leaves it on a Docker host:
					// teardown leaves the sysctls leased set, and IPv6
					// forwarding makes the kernel add subnet-router
					// anycast routes, which are not leased's.
					for _, s := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
						if out, err := exec.Command("ip", "netns", "exec", h1.NS, "sysctl", "-qw", s).CombinedOutput(); err != nil {
							return fmt.Errorf("sysctl %s: %v: %s", s, err, out)
						}
					}
					before = hostState(t, h1)
					return nil
				}})
			h2 := l.Hosts[1]
			agentArgs := func(h *lab.Host, args ...string) []string {
				return append(args, "--etcd-endpoints="+l.EtcdEndpoint, "--iface=eth0",
					"--node-name="+h.Name, "--subnet-file="+h.SubnetFile())
			}
			// Converged: the kernel matches the leases (leased status).
			testutil.Eventually(t, 60*time.Second, "leased status of host1 reports a converged datapath", func() error {
				out, code := leasedIn(t, h1, agentArgs(h1, "status")...)
				if code != 0 {
					return errors.New(out)
				}
				return nil
			})
			programmed := hostState(t, h1)
			if slices.Equal(programmed, before) {
				t.Fatalf("the agent programmed nothing on host1: the test cannot tell a teardown from none")
			}
			if !mentionsAll(programmed, "LEASED-FWD", "LEASED-POSTRTG", "proto 76") {
				t.Fatalf("host1 lacks leased's chains or routes before the teardown:\n%s", strings.Join(programmed, "\n"))
			}
			if backend == "vxlan" && !mentionsAll(programmed, "leased.4", "leased.6") {
				t.Fatalf("host1 lacks the vxlan devices:\n%s", strings.Join(programmed, "\n"))
			}
			own1, own2 := etcdKeysOf(t, l, h1.Name), etcdKeysOf(t, l, h2.Name)
			if len(own1) < 2 || len(own2) < 2 {
				t.Fatalf("want a lease record and locks per host, host1 has %v, host2 %v", own1, own2)
			}

			// Refused while the agent runs; nothing removed.
			out, code := leasedIn(t, h1, agentArgs(h1, "teardown", "--release")...)
			if code != 1 || !strings.Contains(out, "the leased agent of this host is running") {
				t.Fatalf("teardown while the agent runs: exit %d, want 1 and a refusal:\n%s", code, out)
			}
			if got := etcdKeysOf(t, l, h1.Name); !slices.Equal(got, own1) {
				t.Fatalf("a refused teardown changed host1's keys: %v, before %v", got, own1)
			}
			// With another --subnet-file it does not see the lock, but
			// finds the agent process in the namespace.
			other := append(agentArgs(h1, "teardown", "--release"), "--subnet-file="+filepath.Join(t.TempDir(), "subnet.env"))
			out, code = leasedIn(t, h1, other...)
			if code != 1 || !strings.Contains(out, "a leased agent runs in this network namespace") {
				t.Fatalf("teardown with another --subnet-file while the agent runs: exit %d, want 1 and a refusal:\n%s", code, out)
			}
			if got := etcdKeysOf(t, l, h1.Name); !slices.Equal(got, own1) {
				t.Fatalf("a refused teardown changed host1's keys: %v, before %v", got, own1)
			}
			if now := hostState(t, h1); !slices.Equal(now, programmed) {
				t.Fatalf("a refused teardown changed host1:\n%s", stateDiff(programmed, now))
			}
			if agentPID(h1) == 0 {
				t.Fatal("the agent of host1 is gone after a refused teardown")
			}

			if err := l.StopAgent(h1, syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			out, code = leasedIn(t, h1, agentArgs(h1, "teardown", "--release")...)
			if code != 0 {
				t.Fatalf("teardown --release: exit %d:\n%s", code, out)
			}
			t.Logf("teardown --release:\n%s", out)
			if diff := stateDiff(before, hostState(t, h1)); diff != "" {
				t.Fatalf("after teardown host1 differs from before its agent first started:\n%s", diff)
			}
			if got := etcdKeysOf(t, l, h1.Name); len(got) != 0 {
				t.Errorf("host1's keys are still in etcd after --release: %v", got)
			}
			if got := etcdKeysOf(t, l, h2.Name); !slices.Equal(got, own2) {
				t.Errorf("host2's keys changed: %v, before %v", got, own2)
			}
			if fileExists(h1.SubnetFile()) {
				t.Errorf("%s is still there after --release", h1.SubnetFile())
			}

			out, code = leasedIn(t, h1, agentArgs(h1, "teardown", "--release")...)
			if code != 0 || !strings.Contains(out, "nothing of leased's to remove") {
				t.Fatalf("second teardown --release: exit %d, want 0 and nothing to do:\n%s", code, out)
			}
			if diff := stateDiff(before, hostState(t, h1)); diff != "" {
				t.Fatalf("after the second teardown host1 differs from before:\n%s", diff)
			}
			if got := etcdKeysOf(t, l, h2.Name); !slices.Equal(got, own2) {
				t.Errorf("the second teardown changed host2's keys: %v, before %v", got, own2)
			}
		})
	}
}

// TestTeardownReleaseLeavesKeysItCannotProve: a subnet lock carrying the
// host's node name but not held under an etcd lease of this machine's
// agent (another host with the same name, or written by hand) is left in
// etcd, said so, and the exit status is 1; the host's own keys go.
func TestTeardownReleaseLeavesKeysItCannotProve(t *testing.T) {
	l := up(t, lab.Config{Backend: "host-gw", Hosts: 2, NoContainers: true})
	h1 := l.Hosts[0]
	foreign := lease.NewKeys("").SubnetLock(lastSubnet(l.Cfg.Network, 24))
	if _, err := l.Client.Put(ctx(t), foreign, h1.Name); err != nil {
		t.Fatal(err)
	}
	if err := l.StopAgent(h1, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	args := []string{"teardown", "--release", "--etcd-endpoints=" + l.EtcdEndpoint, "--iface=eth0",
		"--node-name=" + h1.Name, "--subnet-file=" + h1.SubnetFile()}
	out, code := leasedIn(t, h1, args...)
	t.Logf("teardown --release:\n%s", out)
	if code != 1 || !strings.Contains(out, "left in etcd: "+foreign) {
		t.Fatalf("exit %d, want 1 and the lock it cannot prove its own named:\n%s", code, out)
	}
	if got := etcdKeysOf(t, l, h1.Name); !slices.Equal(got, []string{foreign}) {
		t.Fatalf("host1's keys after --release: %v, want only %s", got, foreign)
	}
	if fileExists(h1.SubnetFile()) {
		t.Errorf("%s is still there, though host1's own keys were released", h1.SubnetFile())
	}
	if got := etcdKeysOf(t, l, l.Hosts[1].Name); len(got) < 2 {
		t.Errorf("host2's keys are gone: %v", got)
	}
}

// TestAgentWaitsForTeardown: an agent started while leased teardown holds
// the lock waits, says so, and starts once the lock is released.
func TestAgentWaitsForTeardown(t *testing.T) {
	l := up(t, lab.Config{Backend: "host-gw", Hosts: 1, NoContainers: true})
	h := l.Hosts[0]
	if err := l.StopAgent(h, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(h.Dir, "agent.lock"), os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("the agent left no lock file: %v", err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatalf("the lock is still held after the agent stopped: %v", err)
	}
	if err := os.Remove(h.SubnetFile()); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgent(h); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the agent says it waits for teardown", func() error {
		if !strings.Contains(l.LogTail(h, 0), "leased teardown is running for this host; waiting for it to finish") {
			return errors.New("not yet")
		}
		return nil
	})
	time.Sleep(time.Second)
	if fileExists(h.SubnetFile()) {
		t.Fatal("the agent wrote subnet.env while teardown held the lock")
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN) //nolint:errcheck
	if err := l.WaitSubnetFile(ctx(t), h); err != nil {
		t.Fatal(err)
	}
}

// leasedIn runs the leased binary with args in h's namespace and returns
// its output (stdout and stderr) and exit status.
func leasedIn(t *testing.T, h *lab.Host, args ...string) (string, int) {
	t.Helper()
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(c, "ip", append([]string{"netns", "exec", h.NS, binary}, args...)...)
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return b.String(), 0
	case errors.As(err, &ee):
		return b.String(), ee.ExitCode()
	}
	t.Fatalf("running leased %v in %s: %v", args, h.Name, err)
	return "", -1
}

// hostState is what a teardown must restore in h's namespace: its links
// and addresses, every route of every table, and the filter and nat rules
// of iptables and ip6tables, one entry per line, sorted. Counters and
// expiry times, which change by themselves, are dropped.
func hostState(t *testing.T, h *lab.Host) []string {
	t.Helper()
	volatile := regexp.MustCompile(`\s+expires \S+|\[\d+:\d+\]`)
	var lines []string
	add := func(prefix string, out []byte) {
		for _, ln := range strings.Split(string(out), "\n") {
			if ln = strings.TrimSpace(volatile.ReplaceAllString(ln, "")); ln != "" {
				lines = append(lines, prefix+ln)
			}
		}
	}
	for _, c := range [][]string{
		{"ip", "-br", "link"}, {"ip", "-br", "addr"},
		{"ip", "-4", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
		{"iptables", "-w", "-S"}, {"iptables", "-w", "-t", "nat", "-S"},
		{"ip6tables", "-w", "-S"}, {"ip6tables", "-w", "-t", "nat", "-S"},
		{"sysctl", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.eth0.accept_ra"},
	} {
		out, err := exec.Command("ip", append([]string{"netns", "exec", h.NS}, c...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v in %s: %v: %s", c, h.Name, err, out)
		}
		add(strings.Join(c, " ")+": ", out)
	}
	slices.Sort(lines)
	return lines
}

// stateDiff lists the lines only in before (-) and only in after (+).
func stateDiff(before, after []string) string {
	var b strings.Builder
	for _, l := range before {
		if !slices.Contains(after, l) {
			b.WriteString("- " + l + "\n")
		}
	}
	for _, l := range after {
		if !slices.Contains(before, l) {
			b.WriteString("+ " + l + "\n")
		}
	}
	return b.String()
}

// etcdKeysOf returns, sorted, node's lease record key and the subnet locks
// whose value is node.
func etcdKeysOf(t *testing.T, l *lab.Lab, node string) []string {
	t.Helper()
	k := lease.NewKeys("")
	var keys []string
	for _, p := range []string{k.Leases(), k.SubnetLocks(false), k.SubnetLocks(true)} {
		resp, err := l.Client.Get(ctx(t), p, clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			if string(kv.Key) == k.Lease(node) || p != k.Leases() && string(kv.Value) == node {
				keys = append(keys, string(kv.Key))
			}
		}
	}
	slices.Sort(keys)
	return keys
}

func mentionsAll(lines []string, subs ...string) bool {
	for _, s := range subs {
		if !slices.ContainsFunc(lines, func(l string) bool { return strings.Contains(l, s) }) {
			return false
		}
	}
	return true
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }
