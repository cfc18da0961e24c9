package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
)

// statusArgs are `leased status`'s arguments for h, as its agent runs.
func statusArgs(l *lab.Lab, h *lab.Host) []string {
	return []string{"status", "--etcd-endpoints=" + l.EtcdEndpoint, "--iface=eth0", "--node-name=" + h.Name, "--subnet-file=" + h.SubnetFile()}
}

// statusClean waits until `leased status` on h exits 0 saying that the
// kernel matches the leases.
func statusClean(t *testing.T, l *lab.Lab, h *lab.Host) {
	t.Helper()
	testutil.Eventually(t, 30*time.Second, "leased status clean on "+h.Name, func() error {
		out, code := cli(t, h.NS, statusArgs(l, h)...)
		if code != 0 || !strings.Contains(out, "the kernel matches the leases") {
			return fmt.Errorf("exit %d:\n%s", code, out)
		}
		return nil
	})
}

// statusNames runs `leased status` on h and checks that it exits 1 and
// prints each of lines (e.g. "missing  route 10.100.3.0/24 ...").
func statusNames(t *testing.T, l *lab.Lab, h *lab.Host, lines ...string) {
	t.Helper()
	out, code := cli(t, h.NS, statusArgs(l, h)...)
	if code != 1 {
		t.Errorf("leased status: exit %d, want 1:\n%s", code, out)
	}
	for _, s := range lines {
		if !strings.Contains(out, s) {
			t.Errorf("leased status does not say %q:\n%s", s, out)
		}
	}
}

// On a converged vxlan host `leased status` says the kernel matches; with
// the agent stopped, a deleted FDB and neighbour entry and an FDB entry
// added by hand are each named.
func TestCLIStatusVXLAN(t *testing.T) {
	l := up(t, lab.Config{Hosts: 2, Backend: "vxlan"})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	statusClean(t, l, h1)

	rec, err := leaseRecord(t, l.Client, h2.Name)
	if err != nil || rec == nil {
		t.Fatalf("lease of %s: %v %v", h2.Name, rec, err)
	}
	var macs struct{ VtepMAC, VtepMAC6 string }
	if err := json.Unmarshal(rec.BackendData, &macs); err != nil {
		t.Fatal(err)
	}
	if err := l.StopAgent(h1, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	gw := rec.Subnet.V4.Masked().Addr().String()
	mustIP(t, h1, "neigh", "del", gw, "dev", "leased.4")
	if out, err := runCmd("ip", "netns", "exec", h1.NS, "bridge", "fdb", "del", macs.VtepMAC6, "dev", "leased.6", "dst", h2.Addr6.String()); err != nil {
		t.Fatalf("bridge fdb del: %v: %s", err, out)
	}
	if out, err := runCmd("ip", "netns", "exec", h1.NS, "bridge", "fdb", "append", "0e:11:22:33:44:55", "dev", "leased.4", "dst", "192.168.100.99", "permanent"); err != nil {
		t.Fatalf("bridge fdb append: %v: %s", err, out)
	}
	statusNames(t, l, h1,
		"missing  neighbour "+gw+" lladdr "+macs.VtepMAC,
		"missing  fdb "+macs.VtepMAC6+" dst "+h2.Addr6.String(),
		"extra    fdb 0e:11:22:33:44:55 dst 192.168.100.99")
}

// On a converged proxy-ndp host `leased status` says the kernel matches
// and the agent answers; a kernel proxy entry added by hand for a peer's
// address, a deleted route and the answers gone with the agent are each
// named. The agent without CAP_NET_RAW exits before claiming.
func TestCLIStatusProxyNDP(t *testing.T) {
	l := up(t, lab.Config{Hosts: 2, Backend: lab.UpstreamBackend})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	statusClean(t, l, h1)

	env1, _ := h1.Env()
	env2, _ := h2.Env()
	a := env2.Subnet.V6.Masked().Addr().As16()
	a[15] = 5
	peerAddr := netip.AddrFrom16(a).String()
	mustIP(t, h1, "-6", "neigh", "add", "proxy", peerAddr, "dev", "eth0")
	statusNames(t, l, h1, "extra    ndp proxy entry "+peerAddr+" dev eth0")
	mustIP(t, h1, "-6", "neigh", "del", "proxy", peerAddr, "dev", "eth0")
	statusClean(t, l, h1)

	t.Run("as another user", func(t *testing.T) {
		// It may not see the agent's sockets: it says so rather than
		// reporting the answers missing.
		bin := publicBinary(t)
		args := append([]string{"netns", "exec", h1.NS, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", bin}, statusArgs(l, h1)...)
		out, err := exec.Command("ip", args...).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "run leased status as root") || strings.Contains(string(out), "missing  ndp answers") {
			t.Errorf("leased status as nobody: %v:\n%s", err, out)
		}
	})

	if err := l.StopAgent(h1, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	mustIP(t, h1, "-6", "route", "del", env2.Subnet.V6.String())
	statusNames(t, l, h1,
		"missing  route "+env2.Subnet.V6.String(),
		"missing  ndp answers for "+env1.Subnet.V6.String()+" on eth0")

	t.Run("without CAP_NET_RAW", func(t *testing.T) {
		runUnprivileged(t, l, h1, "unprivndp", unprivileged{"bounding set without net_raw",
			[]string{"--inh-caps=-all", "--bounding-set=-net_raw"}, []string{"CAP_NET_RAW is missing"}, false})
	})
}
