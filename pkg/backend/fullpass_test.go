package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/ipfam"
)

// benchPeersOf is benchPeers for backend type typ: vxlan peers carry
// their VTEP MACs.
func benchPeersOf(n, offset int, typ string) []Peer {
	peers := benchPeers(n, offset)
	if typ == TypeVXLAN {
		for i := range peers {
			p := &peers[i]
			p.BackendType = TypeVXLAN
			p.BackendData, _ = json.Marshal(VXLANLeaseData{VtepMAC: vtepMAC(p.Node, false).String(), VtepMAC6: vtepMAC(p.Node, true).String()})
		}
	}
	return peers
}

// benchPeers returns n dual-stack peers, each with a public IP of its own
// inside 192.168.0.0/16 and fd00::/64 (a real cluster: one gateway per peer).
func benchPeers(n, offset int) []Peer {
	peers := make([]Peer, n)
	for j := range peers {
		i := j + offset
		peers[j] = Peer{
			Node: fmt.Sprintf("peer-%d", i),
			Subnet: ipfam.Pair[netip.Prefix]{
				V4: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte((i + 1) >> 8), byte(i + 1), 0}), 24),
				V6: netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 1, 0, 0, 0, 0, byte((i + 1) >> 8), byte(i + 1)}), 64),
			},
			PublicIP: ipfam.Pair[netip.Addr]{
				V4: netip.AddrFrom4([4]byte{192, 168, byte((i + 2) >> 8), byte(i + 2)}),
				V6: netip.AddrFrom16([16]byte{0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, byte((i + 2) >> 8), byte(i + 2)}),
			},
		}
	}
	return peers
}

// fullPassLab is a host namespace with a /16 and a /64 on eth0, and a
// started dual-stack host-gw engine holding the n peers of benchPeers,
// after one full pass (trusted, nexthop objects adopted).
func fullPassLab(t testing.TB, n int) (*engine, string) { return fullPassLabOf(t, n, TypeHostGW) }

// fullPassLabOf is fullPassLab for backend type typ (host-gw or vxlan).
func fullPassLabOf(t testing.TB, n int, typ string) (*engine, string) {
	t.Helper()
	testutil.RequireRoot(t)
	ns := testutil.UplinkNS(t, "bfp", "192.168.0.1/16", "fd00::1/64")
	h := testutil.NSHandle(t, ns)
	ext := extOf(t, h, "eth0", "192.168.0.1", "fd00::1")
	e := mustNew(t, `{"Type":"`+typ+`"}`, ext, "bench", ns, Options{})
	local := Local{Node: "bench",
		Subnet:  ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.255.255.0/24"), V6: netip.MustParsePrefix("fd01::/64")},
		Network: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.0.0.0/8"), V6: netip.MustParsePrefix("fd01::/16")}}
	ctx := context.Background()
	if err := e.Start(ctx, local); err != nil {
		t.Fatal(err)
	}
	if err := e.SetPeers(ctx, benchPeersOf(n, 0, typ)); err != nil {
		t.Fatal(err)
	}
	if err := e.pass(ctx); err != nil {
		t.Fatal(err)
	}
	return e, ns
}

// BenchmarkFullPassDelaysUpdate runs full passes over n dual-stack host-gw
// peers (2n routes through nexthop objects) in a namespace while another
// goroutine applies one peer join or removal every 150 ms (the join rate of
// leased-lab bench-datapath) or every 20 ms (a fleet rebooting at once), as
// the agent does when a lease changes. It reports the pass's duration and how long the
// slowest update took during the pass (update-max-ms): what a join waits
// for when a full pass is in its way. Compare it with update-idle-ms, the
// same update with no pass running.
func BenchmarkFullPassDelaysUpdate(b *testing.B) {
	for _, c := range []struct {
		typ   string
		n     int
		every time.Duration
	}{
		{TypeHostGW, 5000, 150 * time.Millisecond}, {TypeHostGW, 50000, 150 * time.Millisecond}, {TypeHostGW, 50000, 20 * time.Millisecond},
		{TypeVXLAN, 5000, 150 * time.Millisecond}, {TypeVXLAN, 50000, 150 * time.Millisecond},
	} {
		n := c.n
		b.Run(fmt.Sprintf("%s/peers=%d/change-every=%s", c.typ, n, c.every), func(b *testing.B) {
			e, _ := fullPassLabOf(b, n, c.typ)
			ctx := context.Background()
			extra := benchPeersOf(1, n, c.typ)[0]
			update := func(i int) time.Duration {
				t0 := time.Now()
				var err error
				if i%2 == 0 {
					err = e.UpdatePeers(ctx, []Peer{extra}, nil)
				} else {
					err = e.UpdatePeers(ctx, nil, []string{extra.Node})
				}
				if err != nil {
					b.Error(err) // (not Fatal: also called off the benchmark's goroutine)
				}
				return time.Since(t0)
			}
			var idle time.Duration
			for i := range 20 {
				idle = max(idle, update(i))
			}
			var worst, passTime time.Duration
			b.ResetTimer()
			for range b.N {
				var wg sync.WaitGroup
				done := make(chan struct{})
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; ; i++ {
						select {
						case <-done:
							return
						default:
						}
						worst = max(worst, update(i))
						time.Sleep(c.every)
					}
				}()
				t0 := time.Now()
				if err := e.pass(ctx); err != nil {
					b.Fatal(err)
				}
				passTime += time.Since(t0)
				close(done)
				wg.Wait()
			}
			b.ReportMetric(float64(passTime.Milliseconds())/float64(b.N), "pass-ms")
			b.ReportMetric(float64(worst.Microseconds())/1000, "update-max-ms")
			b.ReportMetric(float64(idle.Microseconds())/1000, "update-idle-ms")
		})
	}
}

// TestFullPassComparesWithoutBlockingPeerChanges: a full pass of a trusted
// engine compares the kernel with the wanted state in chunks and lets peer
// changes in between them. Changes made while it compares are kept (a new
// peer's routes stay, a removed peer's stay gone, a moved peer's follow its
// new address), and the pass still repairs what changed outside leased: a
// deleted route (and, with vxlan, a deleted neighbour entry) of an
// untouched peer comes back, a route of ours that no peer wants goes.
func TestFullPassComparesWithoutBlockingPeerChanges(t *testing.T) {
	for _, typ := range []string{TypeHostGW, TypeVXLAN} {
		t.Run(typ, func(t *testing.T) { testFullPassLetsChangesIn(t, typ) })
	}
}

func testFullPassLetsChangesIn(t *testing.T, typ string) {
	const n = 1500 // 3,000 routes: the comparison lets changes in several times
	e, ns := fullPassLabOf(t, n, typ)
	ctx := context.Background()
	peers := benchPeersOf(n, 0, typ)
	added := benchPeersOf(1, n, typ)[0]
	removed, moved, drifted := peers[10], peers[20], peers[30]
	moved.PublicIP.V4 = netip.MustParseAddr("192.168.200.200")
	moved.PublicIP.V6 = netip.MustParseAddr("fd00::2:200")

	testutil.Run(t, "ip", "-n", ns, "route", "del", drifted.Subnet.V4.String())
	testutil.Run(t, "ip", "-n", ns, "route", "add", "10.254.0.0/24", "via", "192.168.0.9", "proto", "76")
	wantRepairs := 2
	if typ == TypeVXLAN {
		testutil.Run(t, "ip", "-n", ns, "neigh", "del", drifted.Subnet.V4.Addr().String(), "dev", VXLANDev4)
		wantRepairs = 3
	}

	var hooks int
	changed := make(chan error, 1)
	e.mu.Lock()
	e.compareHook = func() {
		hooks++
		if hooks != 1 {
			return
		}
		go func() { changed <- e.UpdatePeers(ctx, []Peer{added, moved}, []string{removed.Node}) }()
		select {
		case err := <-changed:
			changed <- err
		case <-time.After(20 * time.Second):
			changed <- errors.New("UpdatePeers waited for the full pass's comparison")
		}
	}
	e.mu.Unlock()
	if err := e.pass(ctx); err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.compareHook = nil
	repaired := e.lastChanges
	e.mu.Unlock()
	if hooks == 0 {
		t.Fatal("the full pass compared holding the engine lock throughout (it never let a peer change in)")
	}
	if err := <-changed; err != nil {
		t.Fatal(err)
	}
	if repaired != wantRepairs {
		t.Errorf("the full pass made %d changes, want %d (restore what was deleted, delete the stale route)", repaired, wantRepairs)
	}
	rs := nsRoutes(t, ns)
	for _, gone := range []string{removed.Subnet.V4.String(), removed.Subnet.V6.String(), "10.254.0.0/24"} {
		if _, ok := rs[gone]; ok {
			t.Errorf("route to %s is in the kernel, want it gone", gone)
		}
	}
	if got, want := len(rs), 2*n; got != want { // +1 added, -1 removed per family
		t.Errorf("%d routes of ours in the kernel, want %d", got, want)
	}
	if typ == TypeHostGW {
		wantNH(t, ns, added.Subnet.V4.String(), added.PublicIP.V4.String())
		wantNH(t, ns, added.Subnet.V6.String(), added.PublicIP.V6.String())
		wantNH(t, ns, moved.Subnet.V4.String(), "192.168.200.200")
		wantNH(t, ns, moved.Subnet.V6.String(), "fd00::2:200")
		wantNH(t, ns, drifted.Subnet.V4.String(), drifted.PublicIP.V4.String())
		assertSteady(t, e)
		return
	}
	for _, dst := range []string{added.Subnet.V4.String(), added.Subnet.V6.String(), drifted.Subnet.V4.String()} {
		if _, ok := rs[dst]; !ok {
			t.Errorf("no route to %s", dst)
		}
	}
	mac := vtepMAC(moved.Node, false).String()
	if fdb := testutil.Run(t, "bridge", "-n", ns, "fdb", "show", "dev", VXLANDev4); !strings.Contains(fdb, mac+" dst 192.168.200.200 ") {
		t.Errorf("no FDB entry %s dst 192.168.200.200 for the moved peer on %s:\n%s", mac, VXLANDev4, fdb)
	}
	gw := drifted.Subnet.V4.Addr().String()
	if nb := testutil.Run(t, "ip", "-n", ns, "neigh", "show", gw, "dev", VXLANDev4); !strings.Contains(nb, vtepMAC(drifted.Node, false).String()) {
		t.Errorf("the deleted neighbour entry %s on %s is not back: %q", gw, VXLANDev4, nb)
	}
	assertSteady(t, e)
}

// TestDumpNeighsMatchesNeighList: the engine's own neighbour and FDB
// dump finds what the netlink library's lists find: the permanent
// neighbours and unicast FDB entries on leased's devices, not the
// operator's entries elsewhere.
func TestDumpNeighsMatchesNeighList(t *testing.T) {
	e, ns := fullPassLabOf(t, 300, TypeVXLAN)
	testutil.Run(t, "ip", "-n", ns, "neigh", "add", "192.168.0.77", "lladdr", "02:00:00:00:00:77", "dev", "eth0", "nud", "permanent")
	testutil.Run(t, "ip", "-n", ns, "neigh", "add", "10.9.9.9", "lladdr", "02:00:00:00:00:99", "dev", VXLANDev4, "nud", "permanent")
	testutil.Run(t, "bridge", "-n", ns, "fdb", "append", "00:00:00:00:00:00", "dev", VXLANDev4, "dst", "192.168.0.200")
	e.mu.Lock()
	defer e.mu.Unlock()
	owned := *e.owned.Load()
	wantN, wantF, err := e.listNeighsLib(owned)
	if err != nil {
		t.Fatal(err)
	}
	gotN, gotF, err := dumpNeighs(e.nhk(), owned, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range [][]neigh{wantN, gotN} {
		sortObjects(l)
	}
	for _, l := range [][]fdb{wantF, gotF} {
		sortObjects(l)
	}
	if !slices.Equal(gotN, wantN) {
		t.Errorf("dumpNeighs found %d neighbours, NeighList %d (first: %v / %v)", len(gotN), len(wantN), first(gotN), first(wantN))
	}
	if !slices.Equal(gotF, wantF) {
		t.Errorf("dumpNeighs found %d FDB entries, NeighList %d (first: %v / %v)", len(gotF), len(wantF), first(gotF), first(wantF))
	}
	if len(wantN) != 2*300+1 || len(wantF) != 2*300+1 { // ours and the operator's on leased.4
		t.Errorf("NeighList found %d neighbours and %d FDB entries, want %d and %d", len(wantN), len(wantF), 2*300+1, 2*300+1)
	}
}

func first[V any](vs []V) any {
	if len(vs) == 0 {
		return nil
	}
	return vs[0]
}

// TestFullPassCompletesUnderChurn: peer changes arriving faster than a
// full pass can dump the kernel without being interrupted do not make the
// pass fail; it lists the kernel holding them back, and every change is
// in the kernel afterwards.
func TestFullPassCompletesUnderChurn(t *testing.T) {
	const n = 3000
	e, ns := fullPassLab(t, n)
	ctx := context.Background()
	extra := benchPeers(50, n)
	stop := make(chan struct{})
	churned := make(chan error, 1)
	go func() {
		var err error
		for i := 0; err == nil; i++ {
			select {
			case <-stop:
				churned <- nil
				return
			default:
			}
			p := extra[i%len(extra)]
			if i/len(extra)%2 == 0 {
				err = e.UpdatePeers(ctx, []Peer{p}, nil)
			} else {
				err = e.UpdatePeers(ctx, nil, []string{p.Node})
			}
		}
		churned <- err
	}()
	var passErr error
	for range 3 {
		if passErr = e.pass(ctx); passErr != nil {
			break
		}
	}
	close(stop)
	if err := <-churned; err != nil {
		t.Fatal(err)
	}
	if passErr != nil {
		t.Fatalf("full pass during peer changes: %v", passErr)
	}
	e.mu.Lock()
	want := 2 * len(e.peers)
	e.mu.Unlock()
	if got := len(nsRoutes(t, ns)); got != want {
		t.Errorf("%d routes of ours in the kernel, want %d (two per peer)", got, want)
	}
	assertSteady(t, e)
}
