package backend

import (
	"context"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"testing"

	"github.com/leased/leased/internal/testutil"
)

// BenchmarkHostGWSetPeers measures one SetPeers that installs n host-gw
// routes from scratch in a fresh namespace (removal is not timed).
func BenchmarkHostGWSetPeers(b *testing.B) {
	for _, n := range []int{1000, 5000} {
		b.Run(fmt.Sprintf("peers=%d", n), func(b *testing.B) {
			testutil.RequireRoot(b)
			ns := testutil.UplinkNS(b, "bench", "192.168.0.1/16")
			h := testutil.NSHandle(b, ns)
			ext := extOf(b, h, "eth0", "192.168.0.1", "")
			e := mustNew(b, `{"Type":"host-gw"}`, ext, "bench", ns, Options{})
			local := Local{Node: "bench", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.0.0.0/24")}, Network: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.0.0.0/8")}}
			ctx := context.Background()
			if err := e.Start(ctx, local); err != nil {
				b.Fatal(err)
			}
			peers := make([]Peer, n)
			for i := range peers {
				peers[i] = Peer{
					Node:     fmt.Sprintf("peer-%d", i),
					Subnet:   ipfam.Pair[netip.Prefix]{V4: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte((i + 1) >> 8), byte(i + 1), 0}), 24)},
					PublicIP: ipfam.Pair[netip.Addr]{V4: netip.AddrFrom4([4]byte{192, 168, byte((i + 2) / 250), byte((i+2)%250 + 1)})},
				}
			}
			b.ResetTimer()
			for range b.N {
				if err := e.SetPeers(ctx, peers); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if got := len(ourRoutes(b, h)); got != n {
					b.Fatalf("%d routes, want %d", got, n)
				}
				if err := e.SetPeers(ctx, nil); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
