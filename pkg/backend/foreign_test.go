package backend

import (
	"context"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/testutil"
)

// mainRoutes returns the main-table routes to dst (every protocol).
func mainRoutes(t testing.TB, h *netlink.Handle, dst string) []netlink.Route {
	t.Helper()
	p := netip.MustParsePrefix(dst)
	fam := netlink.FAMILY_V4
	if p.Addr().Is6() {
		fam = netlink.FAMILY_V6
	}
	rs, err := h.RouteListFiltered(fam, &netlink.Route{Dst: ipNet(p)}, netlink.RT_FILTER_DST)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// onlyForeign reports whether the main table routes dst only by the
// foreign route on link with protocol proto, and by no route of leased.
func onlyForeign(t testing.TB, h *netlink.Handle, dst string, link int, proto netlink.RouteProtocol) (bool, string) {
	t.Helper()
	rs := mainRoutes(t, h, dst)
	var desc []string
	ok := len(rs) == 1
	for _, r := range rs {
		desc = append(desc, r.String())
		if r.Protocol != proto || r.LinkIndex != link || r.Gw != nil {
			ok = false
		}
	}
	return ok, strings.Join(desc, "; ")
}

// TestForeignRoutesAreNotLeaseds gives host a peers whose subnets are the
// host's own LAN (a connected route, IPv4 and IPv6) and a static IPv6 route
// with the metric leased uses: leased must refuse those peers with a log
// line naming both, leave the routes as they are while the peers come and
// go, and withdraw its route when a LAN appears later over a programmed
// peer's subnet.
func TestForeignRoutesAreNotLeaseds(t *testing.T) {
	ns, h, ext := hostGWLab(t)
	logs := testutil.CaptureKlog(t)
	ctx := context.Background()

	// The host's second LAN, inside the cluster network.
	testutil.Run(t, "ip", "-n", ns, "link", "add", "a0", "type", "veth", "peer", "name", "a0p")
	testutil.Run(t, "ip", "-n", ns, "link", "set", "a0p", "up")
	testutil.Run(t, "ip", "-n", ns, "link", "set", "a0", "up")
	testutil.Run(t, "ip", "-n", ns, "addr", "add", "10.100.7.1/24", "dev", "a0")
	testutil.Run(t, "ip", "-n", ns, "addr", "add", "fd00:100:7::1/64", "dev", "a0", "nodad")
	testutil.Run(t, "ip", "-n", ns, "-6", "route", "add", "fd00:100:8::/64", "dev", "a0", "metric", "1024", "proto", "static")
	a0, err := h.LinkByName("a0")
	if err != nil {
		t.Fatal(err)
	}
	lan := Peer{Node: "lan",
		Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.7.0/24"), V6: netip.MustParsePrefix("fd00:100:7::/64")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.77.9"), V6: netip.MustParseAddr("2001:db8:77::9")},
	}
	static6 := Peer{Node: "static6",
		Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("fd00:100:8::/64")}, PublicIP: ipfam.Pair[netip.Addr]{V6: netip.MustParseAddr("2001:db8:77::8")}}
	foreign := map[string]netlink.RouteProtocol{
		"10.100.7.0/24": unix.RTPROT_KERNEL, "fd00:100:7::/64": unix.RTPROT_KERNEL, "fd00:100:8::/64": unix.RTPROT_STATIC,
	}
	assertForeignKept := func(when string) {
		t.Helper()
		for dst, proto := range foreign {
			if ok, got := onlyForeign(t, h, dst, a0.Attrs().Index, proto); !ok {
				t.Errorf("%s: the main table routes %s by %q, want only the host's own route (dev a0 proto %s)", when, dst, got, proto)
			}
		}
	}

	b := mustNew(t, `{"Type":"host-gw"}`, ext, "a", ns, Options{Resync: 300 * time.Millisecond})
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	if err := b.SetPeers(ctx, []Peer{peerB, lan, static6}); err != nil {
		t.Fatal(err)
	}
	assertForeignKept("with the peers")
	if rs := ourRoutes(t, h); len(rs) != 2 {
		t.Errorf("leased's routes = %v, want only the two of peer b", rs)
	}
	assertSteady(t, b)
	klog.Flush()
	for _, want := range []string{
		`peer subnet overlaps 10.100.7.0/24 dev a0 proto kernel, a route leased did not install: refused`,
		`peer subnet overlaps fd00:100:7::/64 dev a0 proto kernel metric 256, a route leased did not install: refused`,
		`peer subnet overlaps fd00:100:8::/64 dev a0 proto static metric 1024, a route leased did not install: refused`,
	} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("no log line %q; log:\n%s", want, logs.String())
		}
	}
	for _, node := range []string{`node="lan" subnet="10.100.7.0/24"`, `node="static6" subnet="fd00:100:8::/64"`} {
		if !strings.Contains(logs.String(), node) {
			t.Errorf("the refusal does not name the peer (%s); log:\n%s", node, logs.String())
		}
	}

	// Removing the peers leaves the host's routes in place, through the
	// incremental path, a full pass and the resync loop.
	if err := b.UpdatePeers(ctx, nil, []string{"lan"}); err != nil {
		t.Fatal(err)
	}
	if err := b.SetPeers(ctx, []Peer{peerB}); err != nil {
		t.Fatal(err)
	}
	assertSteady(t, b)

	// A foreign route that appears under a peer's key after the last full
	// pass (no Run here to notice it) fails the incremental put instead of
	// being replaced; the next pass refuses the peer.
	testutil.Run(t, "ip", "-n", ns, "route", "add", "10.100.11.0/24", "dev", "a0", "proto", "static")
	testutil.Run(t, "ip", "-n", ns, "-6", "route", "add", "fd00:100:11::/64", "dev", "a0", "metric", "1024", "proto", "static")
	race := Peer{Node: "race",
		Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.11.0/24"), V6: netip.MustParsePrefix("fd00:100:11::/64")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.77.11"), V6: netip.MustParseAddr("2001:db8:77::11")},
	}
	foreign["10.100.11.0/24"], foreign["fd00:100:11::/64"] = unix.RTPROT_STATIC, unix.RTPROT_STATIC
	if err := b.UpdatePeers(ctx, []Peer{race}, nil); err == nil || !strings.Contains(err.Error(), "a route leased did not install has this destination") {
		t.Errorf("UpdatePeers over a foreign route's key: err %v, want EEXIST explained", err)
	}
	assertForeignKept("after a put raced a foreign route")
	if err := b.pass(ctx); err != nil {
		t.Fatal(err)
	}
	assertSteady(t, b)
	if err := b.UpdatePeers(ctx, nil, []string{"race"}); err != nil {
		t.Fatal(err)
	}
	assertForeignKept("after the racing peer was refused and removed")

	runBackend(t, b)
	time.Sleep(time.Second) // a few resyncs
	assertForeignKept("after removing the peers")

	// A LAN that appears over a programmed peer's subnet (dockerd making a
	// bridge later) wins: leased withdraws its route, leaves the new one,
	// and routes the peer again once the LAN is gone.
	late := Peer{Node: "late",
		Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.9.0/24"), V6: netip.MustParsePrefix("fd00:100:9::/64")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.77.10"), V6: netip.MustParseAddr("2001:db8:77::10")},
	}
	if err := b.UpdatePeers(ctx, []Peer{late}, nil); err != nil {
		t.Fatal(err)
	}
	for _, dst := range []string{"10.100.9.0/24", "fd00:100:9::/64"} {
		if _, ok := ourRoutes(t, h)[dst]; !ok {
			t.Fatalf("peer late's route to %s was not installed", dst)
		}
	}
	testutil.Run(t, "ip", "-n", ns, "link", "add", "br-late", "type", "veth", "peer", "name", "br-latep")
	testutil.Run(t, "ip", "-n", ns, "link", "set", "br-latep", "up")
	testutil.Run(t, "ip", "-n", ns, "link", "set", "br-late", "up")
	testutil.Run(t, "ip", "-n", ns, "addr", "add", "10.100.9.1/24", "dev", "br-late")
	testutil.Run(t, "ip", "-n", ns, "addr", "add", "fd00:100:9::1/64", "dev", "br-late", "nodad")
	br, err := h.LinkByName("br-late")
	if err != nil {
		t.Fatal(err)
	}
	for dst, proto := range map[string]netlink.RouteProtocol{"10.100.9.0/24": unix.RTPROT_KERNEL, "fd00:100:9::/64": unix.RTPROT_KERNEL} {
		testutil.Eventually(t, 10*time.Second, "leased's route to "+dst+" withdrawn for the new bridge's", func() bool {
			ok, _ := onlyForeign(t, h, dst, br.Attrs().Index, proto)
			return ok
		})
	}
	time.Sleep(time.Second)
	for dst, proto := range map[string]netlink.RouteProtocol{"10.100.9.0/24": unix.RTPROT_KERNEL, "fd00:100:9::/64": unix.RTPROT_KERNEL} {
		if ok, got := onlyForeign(t, h, dst, br.Attrs().Index, proto); !ok {
			t.Errorf("later: %s is routed by %q, want only the bridge's route", dst, got)
		}
	}
	testutil.Run(t, "ip", "-n", ns, "link", "del", "br-late")
	for _, dst := range []string{"10.100.9.0/24", "fd00:100:9::/64"} {
		testutil.Eventually(t, 10*time.Second, "peer late routed again once the bridge is gone", func() bool {
			_, ok := ourRoutes(t, h)[dst]
			return ok
		})
	}
	assertForeignKept("at the end")
}

// The selection of foreign routes: inside a cluster network without
// covering all of it, of another protocol, in the main table.
func TestForeignSetSelection(t *testing.T) {
	local := Local{Network: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.0.0/16"), V6: netip.MustParsePrefix("2001:db8:ab11:0:8000::/65")}}
	mk := func(dst string, proto netlink.RouteProtocol, table int) netlink.Route {
		r := fakeRoute(dst, "", proto)
		r.Table = table
		return r
	}
	rs := []netlink.Route{
		mk("10.100.7.0/24", unix.RTPROT_KERNEL, unix.RT_TABLE_MAIN),         // a LAN inside: counts
		mk("10.100.8.0/24", RouteProtocol, unix.RT_TABLE_MAIN),              // leased's own
		mk("10.100.9.0/24", unix.RTPROT_STATIC, 100),                        // another table
		mk("10.100.0.0/16", unix.RTPROT_STATIC, unix.RT_TABLE_MAIN),         // the whole network
		mk("10.0.0.0/8", unix.RTPROT_BOOT, unix.RT_TABLE_MAIN),              // covers it
		mk("0.0.0.0/0", unix.RTPROT_DHCP, unix.RT_TABLE_MAIN),               // default
		mk("192.168.1.0/24", unix.RTPROT_KERNEL, unix.RT_TABLE_MAIN),        // outside
		mk("2001:db8:ab11::/64", unix.RTPROT_KERNEL, unix.RT_TABLE_MAIN),    // proxy-ndp's on-link /64
		mk("2001:db8:ab11:0:8000::/80", unix.RTPROT_RA, unix.RT_TABLE_MAIN), // inside: counts
	}
	s := newForeignSet(local, rs, func(int) string { return "a0" })
	var got []string
	for _, r := range s.routes {
		got = append(got, r.Desc)
	}
	want := []string{"10.100.7.0/24 dev a0 proto kernel", "2001:db8:ab11:0:8000::/80 dev a0 proto ra metric 1024"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("foreign routes %q, want %q", got, want)
	}
	for _, c := range []struct {
		subnet string
		hit    bool
	}{
		{"10.100.7.0/24", true}, {"10.100.7.128/25", true}, {"10.100.6.0/23", true}, {"10.100.5.0/24", false},
		{"2001:db8:ab11:0:8000::/80", true}, {"2001:db8:ab11:0:8001::/80", false},
	} {
		if _, hit := s.overlapping(netip.MustParsePrefix(c.subnet)); hit != c.hit {
			t.Errorf("overlapping(%s) = %v, want %v", c.subnet, hit, c.hit)
		}
	}
	var fs atomic.Pointer[foreignSet]
	fs.Store(s)
	for _, c := range []struct {
		r    netlink.Route
		typ  uint16
		want bool
	}{
		{mk("10.100.20.0/24", unix.RTPROT_KERNEL, unix.RT_TABLE_MAIN), unix.RTM_NEWROUTE, true},  // a new bridge
		{mk("10.100.7.0/24", unix.RTPROT_KERNEL, unix.RT_TABLE_MAIN), unix.RTM_NEWROUTE, false},  // known
		{mk("10.100.7.0/24", unix.RTPROT_KERNEL, unix.RT_TABLE_MAIN), unix.RTM_DELROUTE, true},   // gone
		{mk("10.100.21.0/24", unix.RTPROT_KERNEL, unix.RT_TABLE_MAIN), unix.RTM_DELROUTE, false}, // never known
		{mk("10.0.0.0/8", unix.RTPROT_BOOT, unix.RT_TABLE_MAIN), unix.RTM_NEWROUTE, false},       // covers the network
		{mk("10.100.22.0/24", unix.RTPROT_KERNEL, 100), unix.RTM_NEWROUTE, false},                // another table
		{mk("10.100.23.0/24", RouteProtocol, unix.RT_TABLE_MAIN), unix.RTM_NEWROUTE, false},      // ours
	} {
		if got := foreignEventMatters(&fs, netlink.RouteUpdate{Type: c.typ, Route: c.r}); got != c.want {
			t.Errorf("event %d for %s proto %d table %d matters = %v, want %v", c.typ, c.r.Dst, c.r.Protocol, c.r.Table, got, c.want)
		}
	}
}
