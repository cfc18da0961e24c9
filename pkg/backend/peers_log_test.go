package backend

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"testing"

	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/ipfam"
)

// TestFirstPeersLogged checks that the agent's first peer set is logged
// as logPeerChanges logs it from an empty set, also when logFirstPeers only
// counts the subnets: the same summary with the same counts, or the same
// lines per subnet.
func TestFirstPeersLogged(t *testing.T) {
	logs := testutil.CaptureKlog(t)
	peer := func(i int) Peer {
		return Peer{Node: fmt.Sprintf("n%d", i),
			Subnet: ipfam.Pair[netip.Prefix]{
				V4: netip.MustParsePrefix(fmt.Sprintf("10.1.%d.0/24", i)),
				V6: netip.MustParsePrefix(fmt.Sprintf("fd00:1:%x::/64", i))},
			PublicIP: ipfam.Pair[netip.Addr]{
				V4: netip.AddrFrom4([4]byte{192, 168, byte(i / 256), byte(i)}),
				V6: netip.MustParseAddr(fmt.Sprintf("2001:db8::%x", i))}}
	}
	peers := func(n int, v4only bool) []Peer {
		out := make([]Peer, n)
		for i := range out {
			out[i] = peer(i)
			if v4only {
				out[i].Subnet.V6, out[i].PublicIP.V6 = netip.Prefix{}, netip.Addr{}
			}
		}
		return out
	}
	twice := append(peers(40, false), peers(40, false)...) // 80 subnets, each listed twice
	for _, tc := range []struct {
		name    string
		peers   []Peer
		summary string // the summary line wanted, "" for one line per subnet
	}{
		{"few", peers(3, false), ""},
		{"64 subnets", peers(64, true), ""},
		{"65 subnets", peers(65, true), `"Subnets changed" added=65 changed=0 removed=0`},
		{"many", peers(200, false), `"Subnets changed" added=400 changed=0 removed=0`},
		{"repeated nodes", twice, `"Subnets changed" added=80 changed=0 removed=0`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			capture := func(fn func()) string {
				klog.Flush()
				n := len(logs.String())
				fn()
				klog.Flush()
				return messages(logs.String()[n:])
			}
			var ix peerIndex
			ix.rebuild(tc.peers)
			fast := capture(func() { logFirstPeers(tc.peers, ix.pos != nil) })
			full := capture(func() { logPeerChanges(nil, tc.peers) })
			if tc.summary != "" {
				if !strings.HasPrefix(fast, tc.summary) || strings.Contains(fast, "Subnet added") {
					t.Errorf("logged\n%s\nwant only the summary %s", fast, tc.summary)
				}
			} else if got, want := strings.Count(fast, `"Subnet added"`), len(peerRoutes(tc.peers)); got != want {
				t.Errorf("logged %d subnets, want %d:\n%s", got, want, fast)
			}
			if sortedLines(fast) != sortedLines(full) {
				t.Errorf("the first set logs\n%s\nlogPeerChanges from an empty set logs\n%s", fast, full)
			}
		})
	}
}

var logHeader = regexp.MustCompile(`(?m)^[IWE]\d{4} [^\]]*\] `)

// messages strips klog's headers (time, pid, file:line) from log text.
func messages(s string) string { return logHeader.ReplaceAllString(s, "") }

func sortedLines(s string) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	slices.Sort(ls)
	return strings.Join(ls, "\n")
}

// TestNHKeyRoundTrip checks that the nexthop table's compact keys name
// exactly the route keys they were made from.
func TestNHKeyRoundTrip(t *testing.T) {
	keys := []routeKey{
		{},
		{Priority: 1024},
		{netip.MustParsePrefix("10.1.2.0/24"), 0},
		{netip.MustParsePrefix("10.1.2.0/24"), 1024},
		{netip.MustParsePrefix("0.0.0.0/0"), 0},
		{netip.MustParsePrefix("::/0"), 1024},
		{netip.MustParsePrefix("2001:db8:8881:3837::/64"), 1024},
		{netip.MustParsePrefix("::ffff:10.1.2.0/120"), 0},
		{netip.MustParsePrefix("fd00::1/128"), 1<<32 - 1},
	}
	seen := map[nhKey]routeKey{}
	for _, k := range keys {
		n := nhKeyOf(k)
		if got := n.routeKey(); got != k {
			t.Errorf("nhKeyOf(%v).routeKey() = %v", k, got)
		}
		if o, dup := seen[n]; dup {
			t.Errorf("%v and %v have one nexthop key", o, k)
		}
		seen[n] = k
	}
}
