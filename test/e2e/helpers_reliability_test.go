package e2e

import (
	"context"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/pkg/backend/vtep"
	"github.com/leased/leased/pkg/lease"
)

// agentPID returns the pid of the leased process running in h's namespace,
// or 0 when there is none.
func agentPID(h *lab.Host) int {
	out, err := exec.Command("ip", "netns", "pids", h.NS).Output()
	if err != nil {
		return 0
	}
	for _, f := range strings.Fields(string(out)) {
		pid, _ := strconv.Atoi(f)
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if strings.TrimSpace(string(comm)) == "leased" {
			return pid
		}
	}
	return 0
}

// procRSS returns the resident set (VmRSS) and its peak (VmHWM) of pid, in bytes.
func procRSS(pid int) (rss, hwm int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = kb * 1024
		case "VmHWM:":
			hwm = kb * 1024
		}
	}
	return rss, hwm
}

// datapath returns the kernel state leased programs on h, one entry per
// line: its routes (proto 76), permanent FDB entries and neighbours of the
// vxlan devices, and proxy-NDP entries.
func leasedState(t *testing.T, h *lab.Host) []string {
	t.Helper()
	var lines []string
	add := func(prefix, out string) {
		for _, l := range strings.Split(out, "\n") {
			if l = strings.TrimSpace(l); l != "" {
				lines = append(lines, prefix+l)
			}
		}
	}
	for _, fam := range []string{"-4", "-6"} {
		add("route ", mustIP(t, h, fam, "route", "show", "proto", "76"))
		add("neigh ", mustIP(t, h, fam, "neigh", "show", "nud", "permanent"))
	}
	add("proxy ", mustIP(t, h, "-6", "neigh", "show", "proxy"))
	out, err := exec.Command("ip", "netns", "exec", h.NS, "bridge", "fdb", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("bridge fdb show in %s: %v: %s", h.Name, err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "dev leased.") && strings.Contains(l, " dst ") {
			lines = append(lines, "fdb "+strings.TrimSpace(l))
		}
	}
	slices.Sort(lines)
	return lines
}

// missing returns the entries of before that are not in now.
func missingFrom(before, now []string) []string {
	var out []string
	for _, l := range before {
		if !slices.Contains(now, l) {
			out = append(out, l)
		}
	}
	return out
}

// mentions reports whether some datapath line names s (a subnet, address or MAC).
func mentions(lines []string, s string) bool {
	for _, l := range lines {
		if strings.Contains(l, s+" ") || strings.HasSuffix(l, s) {
			return true
		}
	}
	return false
}

// pinger is a ping running in the background.
type pinger struct {
	dst   string
	count int
	cmd   *exec.Cmd
	out   *strings.Builder
}

// startPing pings dst from namespace ns every interval, for about d.
func startPing(t *testing.T, ns string, dst netip.Addr, interval, d time.Duration) *pinger {
	t.Helper()
	n := int(d / interval)
	cmd := exec.Command("ip", "netns", "exec", ns, "ping", "-n", "-q", "-i", strconv.FormatFloat(interval.Seconds(), 'f', 3, 64),
		"-c", strconv.Itoa(n), "-W", "1", dst.String())
	var b strings.Builder
	cmd.Stdout, cmd.Stderr = &b, &b
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	return &pinger{dst: dst.String(), count: n, cmd: cmd, out: &b}
}

// wait waits for the ping to finish and fails the test unless every
// packet came back.
func (p *pinger) wait(t *testing.T, what string) {
	t.Helper()
	p.cmd.Wait()
	m := lossRE.FindStringSubmatch(p.out.String())
	if m == nil {
		t.Errorf("ping %s %s: %s", p.dst, what, p.out)
		return
	}
	sent, _ := strconv.Atoi(m[1])
	got, _ := strconv.Atoi(m[2])
	t.Logf("ping %s %s: %d sent, %d received", p.dst, what, sent, got)
	if sent != p.count || got != sent {
		t.Errorf("ping %s %s: %d sent, %d received, want %d and no loss", p.dst, what, sent, got, p.count)
	}
}

// lastSubnet returns the highest subnet of the given length in network.
func lastSubnet(network string, bits int) netip.Prefix {
	n := netip.MustParsePrefix(network)
	a := new(big.Int).SetBytes(n.Addr().AsSlice())
	total := n.Addr().BitLen()
	for i := n.Bits(); i < bits; i++ {
		a.SetBit(a, total-1-i, 1)
	}
	b := a.FillBytes(make([]byte, total/8))
	addr, _ := netip.AddrFromSlice(b)
	return netip.PrefixFrom(addr, bits)
}

// record reads h's lease record from etcd (nil if there is none).
func leaseRecord(t *testing.T, cli *clientv3.Client, node string) (*lease.Record, error) {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(c, lease.NewKeys("").Lease(node))
	if err != nil {
		return nil, err
	}
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	r, err := lease.DecodeRecord(node, resp.Kvs[0].Value)
	if err != nil {
		return nil, err
	}
	r.Lease = resp.Kvs[0].Lease
	return r, nil
}

// synthPeer is a peer lease record for a host that does not exist, with
// public addresses on the lab LAN and the VTEP MACs a vxlan agent of that
// node name publishes (peers refuse any others).
func synthPeer(l *lab.Lab, node string, s4, s6 netip.Prefix, host byte) map[string]any {
	pub6 := fmt.Sprintf("fd00:100::%x", host)
	if l.Cfg.Backend == lab.UpstreamBackend { // hosts' IPv6 addresses are in the upstream prefix
		a := lab.UpstreamPrefix.Addr().As16()
		a[15] = host
		pub6 = netip.AddrFrom16(a).String()
	}
	rec := map[string]any{
		"Node": node, "PublicIP": fmt.Sprintf("192.168.100.%d", host), "PublicIPv6": pub6,
		"BackendType": l.Cfg.Backend,
		"BackendData": map[string]string{"VtepMAC": vtep.MAC(node, false).String(), "VtepMAC6": vtep.MAC(node, true).String()},
	}
	if s4.IsValid() {
		rec["Subnet"] = s4.String()
	}
	if s6.IsValid() {
		rec["IPv6Subnet"] = s6.String()
	}
	return rec
}

// runCmd runs a command and returns its combined output.
func runCmd(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// monitor records the kernel's netlink notifications in a host namespace
// (routes, neighbours, FDB entries), so that a withdrawal is seen however
// briefly it lasted: polling the tables can miss a route that is deleted
// and put back a millisecond later.
type nlMonitor struct {
	h    *lab.Host
	mu   sync.Mutex
	buf  strings.Builder
	cmds []*exec.Cmd
}

func startMonitor(t *testing.T, h *lab.Host) *nlMonitor {
	t.Helper()
	m := &nlMonitor{h: h}
	for _, args := range [][]string{
		{"ip", "-n", h.NS, "monitor", "route", "neigh"},
		{"ip", "netns", "exec", h.NS, "bridge", "monitor", "fdb"},
	} {
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Stdout = m
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		m.cmds = append(m.cmds, cmd)
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	}
	time.Sleep(100 * time.Millisecond) // subscribed before anything happens
	return m
}

func (m *nlMonitor) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.buf.Write(p)
}

// withdrawn returns the notifications so far of leased's entries being
// deleted (routes of proto 76, anything on the leased.* devices), except
// those that name one of the strings in except.
func (m *nlMonitor) withdrawn(except ...string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
next:
	for _, l := range strings.Split(m.buf.String(), "\n") {
		if !strings.HasPrefix(l, "Deleted ") || !(strings.Contains(l, "proto 76") || strings.Contains(l, "dev leased.")) {
			continue
		}
		for _, e := range except {
			if strings.Contains(l, e) {
				continue next
			}
		}
		out = append(out, m.h.Name+": "+l)
	}
	return out
}
