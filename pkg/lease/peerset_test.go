package lease

import (
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"sort"
	"testing"
)

// PeerSet, fed one change at a time, always equals Peers run from scratch,
// including overlaps, hostile records and deletions.
func TestPeerSetMatchesPeers(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","IPv6SubnetLen":64}`)
	self := &Record{Node: "me", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.0.1")}}
	for seed := range uint64(30) {
		rng := rand.New(rand.NewPCG(seed, 7))
		records := map[string]*Record{"me": self}
		ps := NewPeerSet(cfg, self, records)
		rev := int64(10)
		for step := range 300 {
			node := fmt.Sprintf("n%d", rng.IntN(12))
			if rng.IntN(4) == 0 {
				delete(records, node)
			} else {
				rev++
				r := &Record{Node: node, Rev: rev, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.AddrFrom4([4]byte{192, 168, 0, byte(2 + rng.IntN(3))})}}
				if old := records[node]; old != nil && rng.IntN(2) == 0 {
					r.Rev = old.Rev // a modification keeps the create revision
				}
				// Few subnets, so that overlaps (with peers and self) are common.
				r.Subnet.V4 = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 100, byte(rng.IntN(8)), 0}), 24)
				if rng.IntN(3) == 0 {
					r.Subnet.V6 = netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, byte(rng.IntN(8))}), 64)
				}
				if rng.IntN(15) == 0 {
					r.PublicIP.V4 = netip.MustParseAddr("127.0.0.1") // hostile
				}
				records[node] = r
			}
			if rng.IntN(5) == 0 {
				ps.IndexHeld() // as the agent does after each hand-over
			}
			ps.Update(node)
			want, wantRej := Peers(cfg, self, records)
			if got := nodesOf(ps.Accepted()); fmt.Sprint(got) != fmt.Sprint(sortedNodes(want)) {
				t.Fatalf("seed %d step %d: PeerSet %v, Peers %v", seed, step, got, sortedNodes(want))
			}
			if len(ps.Rejected()) != len(wantRej) {
				t.Fatalf("seed %d step %d: %d rejected, Peers %d", seed, step, len(ps.Rejected()), len(wantRej))
			}
		}
	}
}

func nodesOf(m map[string]*Record) []string {
	var out []string
	for n := range m {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func sortedNodes(rs []*Record) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Node)
	}
	sort.Strings(out)
	return out
}

// Without repeated subnets, the unsorted filter decides exactly as the one
// that orders records by age.
func TestPeersUnorderedMatchesByAge(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","IPv6SubnetLen":64}`)
	self := &Record{Node: "me", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.0.1")}}
	for seed := range uint64(50) {
		rng := rand.New(rand.NewPCG(seed, 9))
		records := map[string]*Record{"me": self}
		for i := range 40 {
			r := &Record{Node: fmt.Sprintf("n%d", i), Rev: int64(rng.IntN(1000)), PublicIP: ipfam.Pair[netip.Addr]{V4: netip.AddrFrom4([4]byte{192, 168, 0, byte(2 + rng.IntN(3))})}}
			r.Subnet.V4 = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 100, byte(i), 0}), 24) // distinct; n1 overlaps self
			if rng.IntN(8) == 0 {
				r.PublicIP.V4 = netip.MustParseAddr("224.0.0.1") // hostile
			}
			if rng.IntN(10) == 0 {
				r.Subnet.V4 = netip.MustParsePrefix("10.200.0.0/24") // outside (may repeat: then by age)
			}
			records[r.Node] = r
		}
		fast, fastRej, ok := peersUnordered(cfg, self, records)
		slow, slowRej := peersByAge(cfg, self, records)
		if !ok {
			continue
		}
		if fmt.Sprint(sortedNodes(fast)) != fmt.Sprint(sortedNodes(slow)) || len(fastRej) != len(slowRej) {
			t.Fatalf("seed %d: unordered %v (%d rejected), by age %v (%d rejected)", seed, sortedNodes(fast), len(fastRej), sortedNodes(slow), len(slowRej))
		}
	}
}

// TestIndexHeldBuildsTheIndexOnce: IndexHeld leaves the index that Update
// needs built, so that the agent's first lease change after a start does
// not build it (about 40 ms at 50,000 peers), and a second call keeps it.
func TestIndexHeldBuildsTheIndexOnce(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.100.0.0/16"}`)
	self := &Record{Node: "me", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.0.1")}}
	peer := &Record{Node: "p", Rev: 1, Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.2.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.0.2")}}
	ps := NewPeerSet(cfg, self, map[string]*Record{"me": self, "p": peer})
	if ps.held.v4 != nil {
		t.Fatal("the index is built before anything needs it")
	}
	ps.IndexHeld()
	idx := ps.held.v4
	if len(idx) != 2 {
		t.Fatalf("index holds %d IPv4 subnets, want 2 (this host's and the peer's)", len(idx))
	}
	ps.IndexHeld()
	if len(ps.held.v4) != 2 || reflect.ValueOf(ps.held.v4).UnsafePointer() != reflect.ValueOf(idx).UnsafePointer() {
		t.Error("a second IndexHeld rebuilt the index")
	}
}
