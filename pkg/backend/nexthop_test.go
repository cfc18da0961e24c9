package backend

import (
	"context"
	"encoding/json"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/leased/leased/internal/testutil"
)

// ipRoute is one route of `ip -j route show proto 76`.
type ipRoute struct {
	Dst     string `json:"dst"`
	Gateway string `json:"gateway"`
	Dev     string `json:"dev"`
	NHID    uint32 `json:"nhid"`
}

// ipNexthop is one object of `ip -j nexthop`.
type ipNexthop struct {
	ID       uint32 `json:"id"`
	Gateway  string `json:"gateway"`
	Dev      string `json:"dev"`
	Protocol string `json:"protocol"`
}

func nsRoutes(t *testing.T, ns string) map[string]ipRoute {
	t.Helper()
	out := map[string]ipRoute{}
	for _, fam := range []string{"-4", "-6"} {
		var rs []ipRoute
		if err := json.Unmarshal([]byte(testutil.Run(t, "ip", "-n", ns, "-j", fam, "route", "show", "proto", "76")), &rs); err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			out[r.Dst] = r
		}
	}
	return out
}

func nsNexthops(t *testing.T, ns string) map[uint32]ipNexthop {
	t.Helper()
	var nhs []ipNexthop
	if err := json.Unmarshal([]byte(testutil.Run(t, "ip", "-n", ns, "-j", "nexthop", "show")), &nhs); err != nil {
		t.Fatal(err)
	}
	out := map[uint32]ipNexthop{}
	for _, n := range nhs {
		out[n.ID] = n
	}
	return out
}

var peerC = Peer{
	Node:     "c",
	Subnet:   ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.5.0/24"), V6: netip.MustParsePrefix("fd00:100:5::/64")},
	PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.77.5"), V6: netip.MustParseAddr("2001:db8:77::5")},
}

// wantNH checks that the route to dst goes through a nexthop object of
// protocol 76 whose gateway is gw, and returns the object's id.
func wantNH(t *testing.T, ns, dst, gw string) uint32 {
	t.Helper()
	r, ok := nsRoutes(t, ns)[dst]
	if !ok {
		t.Fatalf("no route to %s", dst)
	}
	if r.NHID == 0 {
		t.Fatalf("route to %s has no nexthop object: %+v", dst, r)
	}
	n, ok := nsNexthops(t, ns)[r.NHID]
	if !ok {
		t.Fatalf("route to %s names nexthop %d, which does not exist", dst, r.NHID)
	}
	if n.Gateway != gw || n.Dev != "eth0" || n.Protocol != "76" {
		t.Fatalf("nexthop %d of %s = via %s dev %s proto %s, want via %s dev eth0 proto 76", n.ID, dst, n.Gateway, n.Dev, n.Protocol, gw)
	}
	return r.NHID
}

// TestNexthopRoutes: host-gw routes go through one nexthop object per peer
// and family, with the peer's gateway; another program's nexthop object
// and its route are left alone (also when every peer goes); a peer's new
// public IP changes its nexthop object in place (same id, the route is not
// touched); an unused nexthop object of protocol 76 is collected; a
// restarted engine adopts the objects without changing anything.
func TestNexthopRoutes(t *testing.T) {
	ns, _, ext := hostGWLab(t)
	ctx := context.Background()
	// Another program's nexthop object and route over it, and an unused
	// object of ours a previous run left.
	testutil.Run(t, "ip", "-n", ns, "nexthop", "add", "id", "7", "via", "192.168.77.50", "dev", "eth0", "proto", "static")
	testutil.Run(t, "ip", "-n", ns, "route", "add", "10.100.9.0/24", "nhid", "7", "proto", "static")
	testutil.Run(t, "ip", "-n", ns, "nexthop", "add", "id", "1275068500", "via", "192.168.77.51", "dev", "eth0", "proto", "76")

	b := mustNew(t, `{"Type":"host-gw"}`, ext, "a", ns, Options{})
	if err := b.SetPeers(ctx, []Peer{peerB, peerC}); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	if !b.nh.use {
		t.Fatal("the engine does not use nexthop objects on this kernel")
	}
	idB4 := wantNH(t, ns, "10.100.2.0/24", "192.168.77.3")
	idB6 := wantNH(t, ns, "fd00:100:2::/64", "2001:db8:77::3")
	idC4 := wantNH(t, ns, "10.100.5.0/24", "192.168.77.5")
	if idB4 == idB6 || idB4 == idC4 {
		t.Errorf("nexthop ids shared: b4 %d b6 %d c4 %d", idB4, idB6, idC4)
	}
	nhs := nsNexthops(t, ns)
	if _, ok := nhs[1275068500]; ok {
		t.Error("the unused nexthop object of protocol 76 was not collected")
	}
	if n, ok := nhs[7]; !ok || n.Gateway != "192.168.77.50" || n.Protocol != "static" {
		t.Errorf("the foreign nexthop object 7 changed: %+v", n)
	}
	assertSteady(t, b)

	// A new public IP: the same object, now via the new address; the
	// route (through the same id) is not replaced.
	events := subscribeRoutes(t, ns)
	b2 := peerB
	b2.PublicIP.V4 = netip.MustParseAddr("192.168.77.33")
	if err := b.UpdatePeers(ctx, []Peer{b2}, nil); err != nil {
		t.Fatal(err)
	}
	if id := wantNH(t, ns, "10.100.2.0/24", "192.168.77.33"); id != idB4 {
		t.Errorf("IP change: nexthop id %d, want the same object %d", id, idB4)
	}
	for _, dst := range routeEvents(events, 300*time.Millisecond) {
		if dst == "10.100.2.0/24" {
			// With nexthop_compat_mode the kernel announces the
			// route again; a delete or a new id would be a failure,
			// which wantNH checks.
			continue
		}
		t.Errorf("IP change of b touched the route to %s", dst)
	}
	assertSteady(t, b)

	// A restart: a new engine adopts every object as it is.
	before := nsNexthops(t, ns)
	e2 := mustNew(t, `{"Type":"host-gw"}`, ext, "a", ns, Options{})
	events = subscribeRoutes(t, ns)
	if err := e2.SetPeers(ctx, []Peer{b2, peerC}); err != nil {
		t.Fatal(err)
	}
	if err := e2.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	if got := routeEvents(events, 300*time.Millisecond); len(got) != 0 {
		t.Errorf("restart touched routes: %v", got)
	}
	e2.mu.Lock()
	n := e2.lastChanges
	e2.mu.Unlock()
	if n != 0 {
		t.Errorf("restart made %d changes, want 0", n)
	}
	if after := nsNexthops(t, ns); len(after) != len(before) {
		t.Errorf("restart changed the nexthop objects: %v → %v", before, after)
	}
	if id := wantNH(t, ns, "10.100.5.0/24", "192.168.77.5"); id != idC4 {
		t.Errorf("restart: c's nexthop id %d, want %d", id, idC4)
	}

	// Every peer gone: our routes and objects go, the foreign ones stay.
	if err := e2.SetPeers(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if rs := nsRoutes(t, ns); len(rs) != 0 {
		t.Errorf("routes of protocol 76 left: %v", rs)
	}
	nhs = nsNexthops(t, ns)
	if len(nhs) != 1 || nhs[7].Gateway != "192.168.77.50" {
		t.Errorf("nexthop objects left: %v, want only the foreign 7", nhs)
	}
	if out := testutil.Run(t, "ip", "-n", ns, "route", "show", "10.100.9.0/24"); !strings.Contains(out, "nhid 7") {
		t.Errorf("the foreign route over nexthop 7 is gone: %q", out)
	}
}

// TestNexthopFallback: with nexthop objects off (as on a kernel before
// 5.3) the routes are plain gateway routes, and a steady pass changes
// nothing.
func TestNexthopFallback(t *testing.T) {
	ns, h, ext := hostGWLab(t)
	ctx := context.Background()
	b := mustNew(t, `{"Type":"host-gw"}`, ext, "a", ns, Options{})
	b.nh.disabled = true
	if err := b.SetPeers(ctx, []Peer{peerB, peerC}); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	for dst, r := range nsRoutes(t, ns) {
		if r.NHID != 0 {
			t.Errorf("route to %s uses nexthop %d with nexthop objects off", dst, r.NHID)
		}
	}
	rs := ourRoutes(t, h)
	if r := rs["10.100.5.0/24"]; r.Gw.String() != "192.168.77.5" {
		t.Errorf("route to c via %s, want 192.168.77.5", r.Gw)
	}
	if len(nsNexthops(t, ns)) != 0 {
		t.Errorf("nexthop objects created with them off: %v", nsNexthops(t, ns))
	}
	assertSteady(t, b)
	b2 := peerB
	b2.PublicIP.V4 = netip.MustParseAddr("192.168.77.33")
	if err := b.UpdatePeers(ctx, []Peer{b2}, nil); err != nil {
		t.Fatal(err)
	}
	if r := ourRoutes(t, h)["10.100.2.0/24"]; r.Gw.String() != "192.168.77.33" {
		t.Errorf("after the IP change the route goes via %s", r.Gw)
	}
	if err := b.SetPeers(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if rs := nsRoutes(t, ns); len(rs) != 0 {
		t.Errorf("routes left: %v", rs)
	}
}

// TestNexthopDriftRepaired: our nexthop object deleted by hand (the kernel
// flushes the IPv4 routes through it without a route event) or changed
// to another gateway is put back by Run from the nexthop events, with
// the periodic resync far away.
func TestNexthopDriftRepaired(t *testing.T) {
	ns, _, ext := hostGWLab(t)
	ctx := context.Background()
	b := mustNew(t, `{}`, ext, "a", ns, Options{Resync: time.Hour})
	if err := b.SetPeers(ctx, []Peer{peerB}); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	runBackend(t, b)
	id := wantNH(t, ns, "10.100.2.0/24", "192.168.77.3")
	time.Sleep(200 * time.Millisecond) // the subscriptions are up
	testutil.Run(t, "ip", "-n", ns, "nexthop", "del", "id", itoa(id))
	testutil.Eventually(t, 5*time.Second, "route to b restored", func() bool {
		r, ok := nsRoutes(t, ns)["10.100.2.0/24"]
		return ok && r.NHID != 0
	})
	id = wantNH(t, ns, "10.100.2.0/24", "192.168.77.3")
	testutil.Run(t, "ip", "-n", ns, "nexthop", "replace", "id", itoa(id), "via", "192.168.77.60", "dev", "eth0", "proto", "76")
	testutil.Eventually(t, 5*time.Second, "gateway restored", func() bool {
		r := nsRoutes(t, ns)["10.100.2.0/24"]
		n := nsNexthops(t, ns)[r.NHID]
		return n.Gateway == "192.168.77.3"
	})
}

// TestTeardownRemovesNexthops: Teardown removes our routes through
// nexthop objects and those objects, and leaves another program's.
func TestTeardownRemovesNexthops(t *testing.T) {
	ns, _, _ := hostGWLab(t)
	ip := func(args ...string) string { return testutil.Run(t, append([]string{"ip", "-n", ns}, args...)...) }
	ip("nexthop", "add", "id", "1275068417", "via", "192.168.77.3", "dev", "eth0", "proto", "76")
	ip("route", "add", "10.100.2.0/24", "nhid", "1275068417", "proto", "76")
	ip("nexthop", "add", "id", "7", "via", "192.168.77.50", "dev", "eth0", "proto", "static")
	ip("route", "add", "10.100.9.0/24", "nhid", "7", "proto", "static")
	removed, err := Teardown(testutil.NSPath(ns))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(removed, "nexthop object id 1275068417 via 192.168.77.3 dev eth0") {
		t.Errorf("removed %q lacks the nexthop object", removed)
	}
	if rs := nsRoutes(t, ns); len(rs) != 0 {
		t.Errorf("routes of protocol 76 left: %v", rs)
	}
	nhs := nsNexthops(t, ns)
	if len(nhs) != 1 || nhs[7].Protocol != "static" {
		t.Errorf("nexthop objects after teardown: %v, want the static 7 only", nhs)
	}
	if out := ip("route", "show", "10.100.9.0/24"); !strings.Contains(out, "nhid 7") {
		t.Errorf("the static route is gone: %q", out)
	}
}

func itoa(id uint32) string { return strconv.FormatUint(uint64(id), 10) }

// subscribeRoutes returns the route events of namespace ns from now until
// the test ends.
func subscribeRoutes(t *testing.T, ns string) chan netlink.RouteUpdate {
	t.Helper()
	ch := make(chan netlink.RouteUpdate, 256)
	done := make(chan struct{})
	t.Cleanup(func() { close(done) })
	nsh := nsHandleNS(t, ns)
	if err := netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{Namespace: &nsh}); err != nil {
		t.Fatal(err)
	}
	return ch
}

// routeEvents returns the destinations of the protocol 76 route events
// that arrive within d.
func routeEvents(ch chan netlink.RouteUpdate, d time.Duration) []string {
	var out []string
	timeout := time.After(d)
	for {
		select {
		case u := <-ch:
			if u.Protocol == RouteProtocol && u.Dst != nil {
				out = append(out, u.Dst.String())
			}
		case <-timeout:
			return out
		}
	}
}

// TestFullPassDoesNotBlockPeerChanges: while a full pass dumps the kernel,
// a peer change is applied at once (the engine lock is not held across
// the dump), and the pass does not undo or redo it: the new peer's route
// stays, the removed peer's route stays gone, and the pass changes
// nothing.
func TestFullPassDoesNotBlockPeerChanges(t *testing.T) {
	ns, _, ext := hostGWLab(t)
	ctx := context.Background()
	b := mustNew(t, `{"Type":"host-gw"}`, ext, "a", ns, Options{})
	if err := b.SetPeers(ctx, []Peer{peerB}); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	inDump, release := make(chan struct{}), make(chan struct{})
	b.mu.Lock()
	b.dumpHook = func() { close(inDump); <-release }
	b.mu.Unlock()
	passDone := make(chan error, 1)
	go func() { passDone <- b.pass(ctx) }()
	<-inDump
	changed := make(chan error, 1)
	go func() { changed <- b.UpdatePeers(ctx, []Peer{peerC}, []string{"b"}) }()
	select {
	case err := <-changed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		close(release)
		t.Fatal("UpdatePeers waited for the full pass's dump")
	}
	close(release)
	if err := <-passDone; err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	b.dumpHook = nil
	n := b.lastChanges
	b.mu.Unlock()
	if n != 0 {
		t.Errorf("the full pass after the change made %d changes, want 0", n)
	}
	rs := nsRoutes(t, ns)
	if _, ok := rs["10.100.2.0/24"]; ok {
		t.Error("the removed peer b's route is back")
	}
	wantNH(t, ns, "10.100.5.0/24", "192.168.77.5")
	assertSteady(t, b)
}
