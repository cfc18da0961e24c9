package backend

import (
	"context"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/testutil"
)

var (
	net4 = netip.MustParsePrefix("10.100.0.0/16")
	net6 = netip.MustParsePrefix("fd00:100::/32")
)

func localA() Local {
	return Local{
		Node:    "a",
		Subnet:  ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24"), V6: netip.MustParsePrefix("fd00:100:1::/64")},
		Network: ipfam.Pair[netip.Prefix]{V4: net4, V6: net6},
	}
}

// hostGWLab is one host namespace whose eth0 sits on 192.168.77.0/24 and
// 2001:db8:77::/64 (the other veth end stays in the namespace, up).
func hostGWLab(t *testing.T) (string, *netlink.Handle, ExtIface) {
	testutil.RequireRoot(t)
	ns := testutil.UplinkNS(t, "hgw", "192.168.77.2/24", "2001:db8:77::2/64")
	h := testutil.NSHandle(t, ns)
	return ns, h, extOf(t, h, "eth0", "192.168.77.2", "2001:db8:77::2")
}

var (
	peerB = Peer{
		Node:     "b",
		Subnet:   ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.2.0/24"), V6: netip.MustParsePrefix("fd00:100:2::/64")},
		PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.77.3"), V6: netip.MustParseAddr("2001:db8:77::3")},
	}
	// peerFar is behind a router: host-gw cannot reach it.
	peerFar = Peer{
		Node:     "far",
		Subnet:   ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.3.0/24")},
		PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("10.9.9.9")},
	}
)

func TestHostGWRoutes(t *testing.T) {
	ns, h, ext := hostGWLab(t)
	ctx := context.Background()

	// State a previous run left: a still-valid route, a route to a peer
	// that is gone, and someone else's route that must be left alone.
	testutil.Run(t, "ip", "-n", ns, "route", "add", "10.100.2.0/24", "via", "192.168.77.3", "dev", "eth0", "proto", "76")
	testutil.Run(t, "ip", "-n", ns, "route", "add", "fd00:100:2::/64", "via", "2001:db8:77::3", "dev", "eth0", "proto", "76")
	testutil.Run(t, "ip", "-n", ns, "route", "add", "10.100.4.0/24", "via", "192.168.77.4", "dev", "eth0", "proto", "76")
	testutil.Run(t, "ip", "-n", ns, "route", "add", "10.100.9.0/24", "via", "192.168.77.9", "dev", "eth0", "proto", "static")

	events := make(chan netlink.RouteUpdate, 100)
	done := make(chan struct{})
	defer close(done)
	nsh := nsHandleNS(t, ns)
	if err := netlink.RouteSubscribeWithOptions(events, done, netlink.RouteSubscribeOptions{Namespace: &nsh}); err != nil {
		t.Fatal(err)
	}

	b := mustNew(t, `{"Type":"host-gw"}`, ext, "a", ns, Options{})
	if err := b.SetPeers(ctx, []Peer{peerB, peerFar}); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	assertSteady(t, b)
	if got := b.MTU(); got != ext.V4.MTU {
		t.Errorf("MTU() = %d, want %d", got, ext.V4.MTU)
	}

	rs := ourRoutes(t, h)
	if len(rs) != 2 {
		t.Errorf("our routes = %v, want exactly the two of peer b", rs)
	}
	for dst, gw := range map[string]string{"10.100.2.0/24": "192.168.77.3", "fd00:100:2::/64": "2001:db8:77::3"} {
		r, ok := rs[dst]
		if !ok {
			t.Errorf("no route to %s", dst)
			continue
		}
		if r.Gw.String() != gw || r.LinkIndex != ext.V4.Index || r.Protocol != RouteProtocol {
			t.Errorf("route %s = via %s dev#%d proto %d, want via %s dev#%d proto %d", dst, r.Gw, r.LinkIndex, r.Protocol, gw, ext.V4.Index, RouteProtocol)
		}
	}
	all, _ := h.RouteList(nil, netlink.FAMILY_V4)
	foreign := false
	for _, r := range all {
		if r.Dst != nil && r.Dst.String() == "10.100.9.0/24" && r.Protocol == unix.RTPROT_STATIC {
			foreign = true
		}
	}
	if !foreign {
		t.Error("the foreign proto static route was removed")
	}

	// The still-valid route must be the same kernel object: no event for it,
	// while the stale one's deletion did produce an event.
	sawStaleDel := false
	timeout := time.After(500 * time.Millisecond)
collect:
	for {
		select {
		case u := <-events:
			switch u.Dst.String() {
			case "10.100.2.0/24", "fd00:100:2::/64":
				t.Errorf("valid route was touched at Start: event type %d", u.Type)
			case "10.100.4.0/24":
				sawStaleDel = sawStaleDel || u.Type == unix.RTM_DELROUTE
			}
		case <-timeout:
			break collect
		}
	}
	if !sawStaleDel {
		t.Error("stale route of a gone peer was not deleted")
	}

	// Removing a peer removes its routes.
	if err := b.SetPeers(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if rs := ourRoutes(t, h); len(rs) != 0 {
		t.Errorf("routes left after removing every peer: %v", rs)
	}
}

func nsHandleNS(t *testing.T, name string) netnsHandle {
	t.Helper()
	ns, err := netnsFromPath(testutil.NSPath(name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

// resyncingHostGW runs host "a" of hostGWLab with host-gw, peer B and a
// 300 ms resync, for tests that break the kernel state and wait for the
// repair; it returns the namespace of host a and the lab's h.
func resyncingHostGW(t *testing.T) (string, *netlink.Handle) {
	t.Helper()
	ns, h, ext := hostGWLab(t)
	ctx := context.Background()
	b := mustNew(t, `{}`, ext, "a", ns, Options{Resync: 300 * time.Millisecond})
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	if err := b.SetPeers(ctx, []Peer{peerB}); err != nil {
		t.Fatal(err)
	}
	runBackend(t, b)
	return ns, h
}

func TestHostGWRepairsDeletedRoute(t *testing.T) {
	ns, h := resyncingHostGW(t)
	for _, dst := range []string{"10.100.2.0/24", "fd00:100:2::/64"} {
		testutil.Run(t, "ip", "-n", ns, "route", "del", dst)
		testutil.Eventually(t, 3*time.Second, "route "+dst+" restored", func() bool { _, ok := ourRoutes(t, h)[dst]; return ok })
	}
	// A gateway changed by hand is put back.
	testutil.Run(t, "ip", "-n", ns, "route", "replace", "10.100.2.0/24", "via", "192.168.77.50", "dev", "eth0", "proto", "76")
	testutil.Eventually(t, 3*time.Second, "gateway restored", func() bool {
		r, ok := ourRoutes(t, h)["10.100.2.0/24"]
		return ok && r.Gw.String() == "192.168.77.3"
	})
}
