package systemd_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The helpers below boot Debian machines with systemd as PID 1
// (systemd-nspawn), each in a network namespace of its own on one lab
// bridge, as ../shared/lab-notes.md describes. Everything they create is
// removed in t.Cleanup, also when the test fails.

// run runs a command on this host and returns its combined output.
func run(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// mustRun is run that fails the test when the command fails.
func mustRun(t *testing.T, ctx context.Context, name string, args ...string) string {
	t.Helper()
	out, err := run(ctx, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func randomTag() string {
	b := make([]byte, 2)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// lan is a bridge in a namespace of its own, with an address for etcd.
type lan struct {
	ns     string
	prefix string // e.g. 10.77.0 and fd77::
}

func newLAN(t *testing.T, tag string) *lan {
	l := &lan{ns: "s" + tag + "-lan", prefix: "10.77.0"}
	ctx := context.Background()
	mustRun(t, ctx, "ip", "netns", "add", l.ns)
	t.Cleanup(func() { delNS(l.ns) })
	for _, c := range [][]string{
		{"-n", l.ns, "link", "set", "lo", "up"},
		{"-n", l.ns, "link", "add", "br0", "type", "bridge"},
		{"-n", l.ns, "link", "set", "br0", "up"},
		{"-n", l.ns, "addr", "add", "10.77.0.1/24", "dev", "br0"},
		{"-n", l.ns, "addr", "add", "fd77::1/64", "dev", "br0", "nodad"},
	} {
		mustRun(t, ctx, "ip", c...)
	}
	return l
}

func delNS(name string) {
	if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
		for _, pid := range strings.Fields(string(out)) {
			exec.Command("kill", "-9", pid).Run()
		}
	}
	exec.Command("ip", "netns", "del", name).Run()
}

// machine is one booted Debian machine.
type machine struct {
	t      *testing.T
	name   string
	ns     string
	addr4  string
	addr6  string
	pid1   int // the machine's PID 1 (systemd), in this host's PID namespace
	nspawn *exec.Cmd
	log    *bytes.Buffer
}

// boot starts machine i on l from the unpacked tree root (shared by every
// machine: --volatile=overlay keeps each one's writes apart), with the
// files in binds (host path → machine path) bound in read-only.
func boot(t *testing.T, l *lan, tag string, i int, root string, binds map[string]string) *machine {
	t.Helper()
	return bootUntil(t, l, tag, i, root, binds, func(state string) bool { return state == "running" || state == "degraded" })
}

// bootUntil is boot that waits until `systemctl is-system-running` prints
// a state that booted accepts.
func bootUntil(t *testing.T, l *lan, tag string, i int, root string, binds map[string]string, booted func(state string) bool) *machine {
	t.Helper()
	ctx := context.Background()
	m := &machine{t: t, name: fmt.Sprintf("s%s-m%d", tag, i), addr4: fmt.Sprintf("10.77.0.%d", 10+i), addr6: fmt.Sprintf("fd77::%d", 10+i), log: &bytes.Buffer{}}
	m.ns = m.name
	mustRun(t, ctx, "ip", "netns", "add", m.ns)
	t.Cleanup(func() { delNS(m.ns) })
	peer := fmt.Sprintf("s%sp%d", tag, i)
	for _, c := range [][]string{
		{"-n", m.ns, "link", "set", "lo", "up"},
		{"-n", m.ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", l.ns},
		{"-n", l.ns, "link", "set", peer, "master", "br0", "up"},
	} {
		mustRun(t, ctx, "ip", c...)
	}
	for _, s := range []string{"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.eth0.accept_dad=0"} {
		mustRun(t, ctx, "ip", "netns", "exec", m.ns, "sysctl", "-qw", s)
	}
	for _, c := range [][]string{
		{"-n", m.ns, "addr", "add", m.addr4 + "/24", "dev", "eth0"},
		{"-n", m.ns, "addr", "add", m.addr6 + "/64", "dev", "eth0", "nodad"},
		{"-n", m.ns, "link", "set", "eth0", "up"},
		{"-n", m.ns, "route", "add", "default", "via", "10.77.0.1"},
		{"-n", m.ns, "-6", "route", "add", "default", "via", "fd77::1"},
	} {
		mustRun(t, ctx, "ip", c...)
	}

	// Each nspawn gets cgroups of its own (with --keep-unit, machines
	// started side by side otherwise collide on the same payload cgroup).
	var cgs []string
	for _, h := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"} {
		if _, err := os.Stat(h); err == nil {
			d := filepath.Join(h, "leased-test-"+m.name)
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
			cgs = append(cgs, d)
		}
	}
	args := []string{"--register=no", "--keep-unit", "--link-journal=no", "--boot", "--quiet",
		"--machine=" + m.name, "--hostname=" + m.name, "--directory=" + root, "--volatile=overlay",
		"--network-namespace-path=/run/netns/" + m.ns,
		"--capability=CAP_NET_ADMIN,CAP_NET_RAW", "--system-call-filter=add_key keyctl bpf",
		"--tmpfs=/var/lib/docker"}
	for src, dst := range binds {
		args = append(args, "--bind-ro="+src+":"+dst)
	}
	script := ""
	for _, d := range cgs {
		script += "echo $$ > " + d + "/cgroup.procs; "
	}
	script += `exec systemd-nspawn "$@"`
	cmd := exec.Command("sh", append([]string{"-c", script, "sh"}, args...)...)
	cmd.Env = append(os.Environ(), "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1", "SYSTEMD_NSPAWN_API_VFS_WRITABLE=network")
	cmd.Stdout, cmd.Stderr = m.log, m.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	m.nspawn = cmd
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := m.sh(10*time.Second, "journalctl --no-pager -n 100 -u leased; journalctl --no-pager -n 30 -p warning -u docker 2>&1")
			t.Logf("%s: journal of leased and docker:\n%s", m.name, out)
		}
		cmd.Process.Signal(os.Interrupt) // nspawn: power off the machine
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		for _, d := range cgs {
			os.Remove(d)
		}
		if t.Failed() {
			out := m.log.String()
			if len(out) > 3000 {
				out = "..." + out[len(out)-3000:]
			}
			t.Logf("%s: nspawn output:\n%s", m.name, out)
		}
	})

	deadline := time.Now().Add(60 * time.Second)
	for m.pid1 == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s: no PID 1 within 60s; nspawn said:\n%s", m.name, m.log.String())
		}
		time.Sleep(50 * time.Millisecond)
		m.pid1 = childOf(cmd.Process.Pid)
	}
	for {
		out, _ := m.sh(10*time.Second, "systemctl is-system-running")
		s := strings.TrimSpace(out)
		if booted(s) {
			if s == "degraded" {
				failed, _ := m.sh(10*time.Second, "systemctl --failed --no-legend")
				t.Logf("%s booted degraded: %s", m.name, failed)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not booted within 60s (%q); nspawn said:\n%s", m.name, s, m.log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return m
}

// childOf returns the child of pid that runs systemd (nspawn's child that
// is the machine's PID 1; nspawn forks short-lived helpers too), or 0.
func childOf(pid int) int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, f := range tasks {
		data, _ := os.ReadFile(f)
		for _, c := range strings.Fields(string(data)) {
			n, err := strconv.Atoi(c)
			if err != nil {
				continue
			}
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", n)); strings.TrimSpace(string(comm)) == "systemd" {
				return n
			}
		}
	}
	return 0
}

// sh runs a shell command inside the machine (all its namespaces).
func (m *machine) sh(timeout time.Duration, script string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return run(ctx, "nsenter", "-t", strconv.Itoa(m.pid1), "-a", "/bin/sh", "-c", script)
}

// must runs script in the machine and fails the test if it fails.
func (m *machine) must(script string) string {
	m.t.Helper()
	out, err := m.sh(2*time.Minute, script)
	if err != nil {
		m.t.Fatalf("%s: %v", m.name, err)
	}
	return strings.TrimSpace(out)
}

// show returns systemctl show's value of prop for unit.
func (m *machine) show(unit, prop string) string {
	m.t.Helper()
	return m.must("systemctl show -P " + prop + " " + unit)
}
