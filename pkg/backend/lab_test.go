package backend

import (
	"context"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/leased/leased/internal/testutil"
)

// Test hosts are network namespaces made with testutil.NewNS.

// extOf describes an interface in the namespace as an ExtIface.
func extOf(t testing.TB, h *netlink.Handle, name string, addr4, addr6 string) ExtIface {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	ext := ExtIface{V4: ExtLink{Name: name, Index: l.Attrs().Index, MTU: l.Attrs().MTU, HardwareAddr: l.Attrs().HardwareAddr}}
	if addr4 != "" {
		ext.V4.Addr = netip.MustParseAddr(addr4)
		ext.V4.Public = ext.V4.Addr
	}
	if addr6 != "" {
		ext.V6.Addr = netip.MustParseAddr(addr6)
		ext.V6.Public = ext.V6.Addr
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
	opts.NetNS = testutil.NSPath(ns)
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
