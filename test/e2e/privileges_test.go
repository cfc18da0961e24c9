package e2e

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/pkg/backend"
)

// unprivileged is one way to start the agent without a privilege its
// backend needs: setpriv arguments, and what the message must name.
type unprivileged struct {
	name    string
	setpriv []string
	want    []string
	// legacy puts iptables-legacy first in the agent's PATH.
	legacy bool
}

// runUnprivileged runs the real agent binary in h's namespace under
// setpriv, as node, and checks that it exits with
// backend.PrivilegeExitStatus and a message naming each of tc.want, and
// that no lease key for node appears in etcd.
func runUnprivileged(t *testing.T, l *lab.Lab, h *lab.Host, node string, tc unprivileged) {
	t.Helper()
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("setpriv not found: CI must install util-linux")
		}
		t.Skip("setpriv not found (Debian package util-linux)")
	}
	bin := publicBinary(t)
	dir := filepath.Dir(bin) // the agent's files and tools, where it may read them

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	args := append([]string{"netns", "exec", h.NS, setpriv}, tc.setpriv...)
	args = append(args, "--", bin,
		"--etcd-endpoints="+l.EtcdEndpoint, "--iface=eth0", "--node-name="+node,
		"--subnet-file="+filepath.Join(dir, "subnet.env"), "--lease-ttl=30s", "--docker-ipam=false")
	cmd := exec.CommandContext(ctx, "ip", args...)
	if tc.legacy {
		multi := "/usr/sbin/xtables-legacy-multi"
		if _, err := os.Stat(multi); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("%s not found: CI must install iptables", multi)
			}
			t.Skipf("%s not found", multi)
		}
		for _, n := range []string{"iptables", "ip6tables"} {
			if err := os.Symlink(multi, filepath.Join(dir, n)); err != nil {
				t.Fatal(err)
			}
		}
		cmd.Env = append(os.Environ(), "PATH="+dir+":"+os.Getenv("PATH"))
	}
	out, err := cmd.CombinedOutput()
	code := -1
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("running the agent: %v\n%s", err, out)
	}
	if ctx.Err() != nil {
		t.Fatalf("the agent did not exit within 90s (it should stop before claiming):\n%s", out)
	}
	t.Logf("agent output:\n%s", out)
	if code != backend.PrivilegeExitStatus {
		t.Errorf("exit status %d, want %d:\n%s", code, backend.PrivilegeExitStatus, out)
	}
	for _, w := range append(tc.want, "leased stopped without claiming a subnet") {
		if !strings.Contains(string(out), w) {
			t.Errorf("output does not say %q:\n%s", w, out)
		}
	}
	if strings.Contains(string(out), "Lease acquired") {
		t.Errorf("the agent claimed a subnet:\n%s", out)
	}
	rec, err := leaseRecord(t, l.Client, node)
	if err != nil {
		t.Fatal(err)
	}
	if rec != nil {
		t.Errorf("etcd holds a lease for %s: %+v", node, rec)
	}
	if _, err := os.Stat(filepath.Join(dir, "subnet.env")); err == nil {
		t.Errorf("the agent wrote subnet.env")
	}
}

// publicBinary returns a copy of the leased binary under test that every
// user may run (the test's temporary directories are private to root),
// removed when t ends. Its directory is readable by all too.
func publicBinary(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "leased-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "leased")
	copyFile(t, binary, bin, 0o755)
	return bin
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// An agent without CAP_NET_ADMIN (a unit missing the capability, or run as
// nobody), or without CAP_NET_RAW where iptables is iptables-legacy, says
// so and exits with the status its unit does not restart, before it claims
// a subnet: peers never route to a host that cannot forward.
func TestAgentWithoutPrivilegesExitsBeforeClaiming(t *testing.T) {
	l := up(t, lab.Config{Hosts: 1})
	h := l.Hosts[0]
	for i, tc := range []unprivileged{
		{"bounding set without net_admin", []string{"--inh-caps=-all", "--bounding-set=-net_admin"}, []string{"CAP_NET_ADMIN is missing"}, false},
		{"as nobody", []string{"--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"},
			[]string{"CAP_NET_ADMIN is missing", "cannot write the sysctl net.ipv4.ip_forward", "cannot write the sysctl net.ipv6.conf.all.forwarding"}, false},
		{"iptables-legacy without net_raw", []string{"--inh-caps=-all", "--bounding-set=-net_raw"},
			[]string{"iptables is iptables-legacy", "ip6tables is iptables-legacy", "which needs CAP_NET_RAW"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			runUnprivileged(t, l, h, "unpriv"+string(rune('a'+i)), tc)
		})
	}
}
