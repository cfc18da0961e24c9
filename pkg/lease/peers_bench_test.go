package lease

import (
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"testing"
)

// BenchmarkPeers5000 is the agent's per-event cost of filtering 5,000
// dual-stack lease records down to peers.
func BenchmarkPeers5000(b *testing.B) { benchPeers(b, 5000) }

// BenchmarkPeers50k is the same for 50,000 records (the agent's start in
// the 50,000-lease network of Ready50k).
func BenchmarkPeers50k(b *testing.B) { benchPeers(b, 50000) }

func benchPeers(b *testing.B, n int) {
	cfg := mustConfig(b, `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/32","IPv6SubnetLen":64}`)
	records := map[string]*Record{}
	for i := range n {
		node := fmt.Sprintf("peer-%d", i)
		records[node] = &Record{Node: node, Rev: int64(i / 100),
			Subnet:   ipfam.Pair[netip.Prefix]{V4: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte((i + 1) >> 8), byte(i + 1), 0}), 24), V6: netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, byte((i + 1) >> 8), byte(i + 1)}), 64)},
			PublicIP: ipfam.Pair[netip.Addr]{V4: netip.AddrFrom4([4]byte{192, 168, byte(i >> 8), byte(i)}), V6: netip.AddrFrom16([16]byte{0xfd, 0, 14: byte(i >> 8), 15: byte(i)})},
		}
	}
	for b.Loop() {
		if peers, _ := Peers(cfg, nil, records); len(peers) != n {
			b.Fatalf("%d peers", len(peers))
		}
	}
}
