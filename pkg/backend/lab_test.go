package backend

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/leased/leased/internal/testutil"
)

// Test hosts are network namespaces made with `ip netns add`, named with a
// random suffix so parallel runs do not collide, and deleted in t.Cleanup.

func requireRoot(t testing.TB) { testutil.RequireRoot(t) }

func sh(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newNS creates a namespace with lo up and IPv6 DAD off, and returns its name.
func newNS(t testing.TB, role string) string {
	t.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "leased-" + role + "-" + hex.EncodeToString(b)
	sh(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	for _, s := range []string{"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"} {
		sh(t, "ip", "netns", "exec", name, "sysctl", "-qw", s)
	}
	sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

func nsPath(name string) string { return "/var/run/netns/" + name }

// nsHandle returns a netlink handle in the namespace for inspecting it.
func nsHandle(t testing.TB, name string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(nsPath(name))
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// extOf describes an interface in the namespace as an ExtIface.
func extOf(t testing.TB, h *netlink.Handle, name string, addr4, addr6 string) ExtIface {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	ext := ExtIface{Name: name, Index: l.Attrs().Index, MTU: l.Attrs().MTU, HardwareAddr: l.Attrs().HardwareAddr}
	if addr4 != "" {
		ext.Addr4 = netip.MustParseAddr(addr4)
		ext.Public4 = ext.Addr4
	}
	if addr6 != "" {
		ext.Addr6 = netip.MustParseAddr(addr6)
		ext.Public6 = ext.Addr6
	}
	return ext
}

// ourRoutes returns the main-table routes carrying RouteProtocol, by destination.
func ourRoutes(t testing.TB, h *netlink.Handle) map[string]netlink.Route {
	t.Helper()
	out := map[string]netlink.Route{}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := h.RouteListFiltered(fam, &netlink.Route{Protocol: RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			out[r.Dst.String()] = r
		}
	}
	return out
}

// eventually polls cond until it holds or the timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runBackend runs b.Run until the test ends.
func runBackend(t testing.TB, b Backend) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

func mustNew(t testing.TB, raw string, ext ExtIface, node, ns string, opts Options) *engine {
	t.Helper()
	opts.NetNS = nsPath(ns)
	b, err := New([]byte(raw), ext, node, opts)
	if err != nil {
		t.Fatal(err)
	}
	e := b.(*engine)
	t.Cleanup(func() { e.Close() })
	return e
}

type netnsHandle = netns.NsHandle

func netnsFromPath(p string) (netns.NsHandle, error) { return netns.GetFromPath(p) }

// assertSteady runs one more pass and fails if it changed anything: the
// kernel's view of what we installed must compare equal to what we want.
func assertSteady(t testing.TB, e *engine) {
	t.Helper()
	if err := e.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	n := e.lastChanges
	e.mu.Unlock()
	if n != 0 {
		t.Errorf("a repeated pass made %d changes, want 0", n)
	}
}
