package backend

import (
	"context"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// randomPeer draws a peer from a small space, so that sequences hit every
// case: on- and off-link gateways, subnets outside the network or
// overlapping this host's, two peers with one subnet, this host's node
// name, single-stack peers, changed backend data.
func randomPeer(r *rand.Rand, node string) Peer {
	p := Peer{Node: node, BackendType: TypeHostGW}
	if r.IntN(8) == 0 {
		p.BackendData = []byte(fmt.Sprintf(`{"x":%d}`, r.IntN(3)))
	}
	if r.IntN(5) > 0 {
		third := 2 + r.IntN(40)
		switch r.IntN(30) {
		case 0:
			third = 1 // this host's subnet
		case 1:
			p.Subnet.V4 = netip.MustParsePrefix("10.200.0.0/24") // outside the network
		}
		if !p.Subnet.V4.IsValid() {
			p.Subnet.V4 = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 100, byte(third), 0}), 24)
		}
		p.PublicIP.V4 = netip.AddrFrom4([4]byte{192, 168, 77, byte(2 + r.IntN(20))})
		if r.IntN(20) == 0 {
			p.PublicIP.V4 = netip.MustParseAddr("10.9.9.9") // off-link
		}
	}
	if r.IntN(4) > 0 {
		p.Subnet.V6 = netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 1, 0, 0, byte(2 + r.IntN(40))}), 64)
		p.PublicIP.V6 = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x77, 15: byte(2 + r.IntN(20))})
	}
	return p
}

// kernelRoutes renders every route of the fake, all attributes included.
func kernelRoutes(k *fakeKernel) []string {
	var out []string
	for id, r := range k.routes {
		out = append(out, fmt.Sprintf("%s: %s via %s dev %d proto %d metric %d flags %d type %d", id, r.Dst, r.Gw, r.LinkIndex, r.Protocol, r.Priority, r.Flags, r.Type))
	}
	slices.Sort(out)
	return out
}

func newHostGWFake() (*engine, *fakeKernel) {
	k := newFakeKernel()
	k.addrs[2] = []netip.Prefix{netip.MustParsePrefix("192.168.77.2/24"), netip.MustParsePrefix("2001:db8:77::2/64")}
	stale := fakeRoute("10.100.39.0/24", "192.168.77.99", RouteProtocol)
	k.routes[routeID(&stale)] = stale
	e := newEngine(TypeHostGW, ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500}}, Options{}, k, hostGW{})
	e.started, e.local = true, localA()
	return e, k
}

// TestIncrementalMatchesFullPass applies random sequences of peer changes,
// with UpdatePeers (the change alone, applied incrementally whenever it can
// be) or SetPeers (the whole set), and checks after every step that the
// kernel, the applied and the wanted state are exactly what a from-scratch
// full pass over the same set produces.
func TestIncrementalMatchesFullPass(t *testing.T) {
	ctx := context.Background()
	for seed := range uint64(20) {
		r := rand.New(rand.NewPCG(seed, 1))
		e, k := newHostGWFake()
		cur := map[string]Peer{}
		prevDup := false
		for step := range 150 {
			// Mutate a few peers: add, change, remove.
			var upserts []Peer
			var removed []string
			touched := map[string]bool{}
			for range 1 + r.IntN(4) {
				node := fmt.Sprintf("n%d", r.IntN(60))
				if r.IntN(50) == 0 {
					node = "a" // this host's node name
				}
				if _, ok := cur[node]; ok && r.IntN(3) == 0 {
					delete(cur, node)
				} else {
					cur[node] = randomPeer(r, node)
				}
				touched[node] = true
			}
			for node := range touched { // the net change of this step
				if p, ok := cur[node]; ok {
					upserts = append(upserts, p)
				} else {
					removed = append(removed, node)
				}
			}
			peers := slices.Collect(maps.Values(cur))
			slices.SortFunc(peers, func(a, b Peer) int { return cmpString(a.Node, b.Node) })
			dup := r.IntN(10) == 0 && len(peers) > 0
			if dup { // the same node twice
				peers = append(peers, randomPeer(r, peers[0].Node))
			}
			var err error
			if !dup && !prevDup && r.IntN(2) == 0 {
				err = e.UpdatePeers(ctx, upserts, removed) // the change alone
				// When two peers want one object the first in the set wins;
				// compare with a full pass over the set in the engine's order.
				peers = slices.Clone(e.peers)
				if len(peers) != len(cur) {
					t.Fatalf("seed %d step %d: engine holds %d peers, want %d", seed, step, len(peers), len(cur))
				}
				for _, p := range peers {
					if !samePeer(p, cur[p.Node]) {
						t.Fatalf("seed %d step %d: engine holds %+v, want %+v", seed, step, p, cur[p.Node])
					}
				}
			} else {
				err = e.SetPeers(ctx, peers)
			}
			prevDup = dup
			if err != nil {
				t.Fatalf("seed %d step %d: %v", seed, step, err)
			}
			if r.IntN(25) == 0 { // a full pass in between changes nothing
				if err := e.pass(ctx); err != nil || e.lastChanges != 0 {
					t.Fatalf("seed %d step %d: full pass after SetPeers: %d changes, %v", seed, step, e.lastChanges, err)
				}
			}
			ref, rk := newHostGWFake()
			if err := ref.SetPeers(ctx, peers); err != nil {
				t.Fatalf("seed %d step %d: reference: %v", seed, step, err)
			}
			if got, want := kernelRoutes(k), kernelRoutes(rk); !slices.Equal(got, want) {
				t.Fatalf("seed %d step %d: kernel\n got %q\nwant %q", seed, step, got, want)
			}
			if !maps.Equal(e.applied.routes, ref.applied.routes) {
				t.Fatalf("seed %d step %d: applied %v, want %v", seed, step, e.applied.routes, ref.applied.routes)
			}
			if !maps.Equal(e.wanted.st.routes, ref.wanted.st.routes) {
				t.Fatalf("seed %d step %d: wanted %v, want %v", seed, step, e.wanted.st.routes, ref.wanted.st.routes)
			}
			if !maps.Equal(e.skipped, ref.skipped) {
				t.Fatalf("seed %d step %d: skips %v, want %v", seed, step, slices.Sorted(maps.Keys(e.skipped)), slices.Sorted(maps.Keys(ref.skipped)))
			}
		}
	}
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// TestSetPeersCostsWhatChanged checks that, with many peers programmed, a
// new, a changed and a removed peer each cost only their own kernel calls,
// and that an unchanged set costs none.
func TestSetPeersCostsWhatChanged(t *testing.T) {
	ctx := context.Background()
	e, k := newHostGWFake()
	e.local.Network.V4 = netip.MustParsePrefix("10.0.0.0/8")
	var peers []Peer
	for i := range 2000 {
		peers = append(peers, Peer{Node: fmt.Sprintf("p%d", i),
			Subnet:   ipfam.Pair[netip.Prefix]{V4: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(101 + i/250), byte(i % 250), 0}), 24), V6: netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 1, 0, byte(0x10 + i>>8), byte(i)}), 64)},
			PublicIP: ipfam.Pair[netip.Addr]{V4: netip.AddrFrom4([4]byte{192, 168, 77, byte(3 + i%200)}), V6: netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x77, 15: byte(3 + i%200)})},
		})
	}
	if err := e.SetPeers(ctx, peers); err != nil {
		t.Fatal(err)
	}
	if n := len(k.routes); n != 4000 {
		t.Fatalf("%d routes, want 4000", n)
	}
	step := func(what string, peers []Peer, wantCalls int) {
		t.Helper()
		before := k.calls
		if err := e.SetPeers(ctx, peers); err != nil {
			t.Fatal(err)
		}
		if got := k.calls - before; got != wantCalls {
			t.Errorf("%s: %d kernel calls, want %d", what, got, wantCalls)
		}
	}
	step("unchanged", peers, 0)
	added := append(slices.Clone(peers), Peer{Node: "new", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.120.0.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.77.250")}})
	step("one new single-stack peer", added, 1)
	changed := slices.Clone(added)
	changed[7].PublicIP.V4 = netip.MustParseAddr("192.168.77.251")
	step("one peer's IPv4 gateway moved", changed, 1)
	changed[8].BackendData = []byte(`{}`)
	step("one peer's backend data changed, no route change", changed, 0)
	removed := slices.Delete(slices.Clone(changed), 9, 10)
	step("one dual-stack peer removed", removed, 2)
	if !e.idx.clean || !e.trusted {
		t.Fatalf("clean %v trusted %v, want both", e.idx.clean, e.trusted)
	}
	// A subnet taken twice falls back to the whole-set computation, which
	// skips the later peer; removing the first holder routes the second.
	twice := append(slices.Clone(removed), Peer{Node: "thief", Subnet: ipfam.Pair[netip.Prefix]{V4: removed[0].Subnet.V4}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.77.252")}})
	step("a subnet taken twice", twice, 0)
	if e.idx.clean {
		t.Fatal("clean after a duplicate subnet")
	}
	step("the first holder removed", twice[1:], 2) // its v6 route deleted, its v4 route replaced by the thief's
	got := e.applied.routes[routeKey{removed[0].Subnet.V4, 0}]
	if got.Gw != netip.MustParseAddr("192.168.77.252") {
		t.Fatalf("route of the twice-taken subnet goes via %s, want the remaining peer's 192.168.77.252", got.Gw)
	}
}

// When every put succeeded the applied state is the wanted state's map
// itself, not a copy (at 50,000 peers a copy is 16 MB); a put that fails
// leaves the route wanted but not applied, without touching the wanted
// state, and the next full pass that succeeds shares the map again.
func TestAppliedSharesWantedUntilAPutFails(t *testing.T) {
	ctx := context.Background()
	e, k := newHostGWFake()
	peer := func(node string, i byte) Peer {
		return Peer{Node: node, Subnet: ipfam.Pair[netip.Prefix]{V4: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 100, i, 0}), 24)}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.AddrFrom4([4]byte{192, 168, 77, i})}}
	}
	if err := e.SetPeers(ctx, []Peer{peer("b", 2), peer("c", 3)}); err != nil {
		t.Fatal(err)
	}
	if !sameMap(e.applied.routes, e.wanted.st.routes) || len(e.applied.routes) != 2 {
		t.Fatalf("after a pass without failures applied (%d routes) is not the wanted map (%d)", len(e.applied.routes), len(e.wanted.st.routes))
	}
	k.failRoute = "10.100.4.0/24"
	if err := e.UpdatePeers(ctx, []Peer{peer("d", 4)}, nil); err == nil {
		t.Fatal("UpdatePeers with a failing put succeeded")
	}
	key := routeKey{netip.MustParsePrefix("10.100.4.0/24"), 0}
	if _, in := e.wanted.st.routes[key]; !in {
		t.Error("the route whose put failed is no longer wanted")
	}
	if _, in := e.applied.routes[key]; in {
		t.Error("the route whose put failed is recorded as applied")
	}
	if sameMap(e.applied.routes, e.wanted.st.routes) || len(e.applied.routes) != 2 {
		t.Errorf("applied after the failure: %v", e.applied.routes)
	}
	k.failRoute = ""
	if err := e.pass(ctx); err != nil {
		t.Fatal(err)
	}
	if _, in := e.applied.routes[key]; !in || !sameMap(e.applied.routes, e.wanted.st.routes) || len(kernelRoutes(k)) != 3 {
		t.Errorf("after the retry: applied %v, kernel %q", e.applied.routes, kernelRoutes(k))
	}
}
