package lease

import (
	"encoding/json"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/leased/leased/pkg/backend/vtep"
)

func TestPeersRefusesHostileRecords(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","IPv6SubnetLen":64}`)
	self := &Record{Node: "me", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24"), V6: netip.MustParsePrefix("2001:db8:0:1::/64")},
		PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.1.1"), V6: netip.MustParseAddr("fd00::1")}}
	rec := func(node, s4, s6, ip string, rev int64) *Record {
		r := &Record{Node: node, Rev: rev}
		if s4 != "" {
			r.Subnet.V4 = netip.MustParsePrefix(s4)
		}
		if s6 != "" {
			r.Subnet.V6 = netip.MustParsePrefix(s6)
		}
		if ip != "" {
			a := netip.MustParseAddr(ip)
			if a.Is4() {
				r.PublicIP.V4 = a
			} else {
				r.PublicIP.V6 = a
			}
		}
		return r
	}
	records := map[string]*Record{
		"me":          self,
		"good":        rec("good", "10.100.2.0/24", "2001:db8:0:2::/64", "192.168.1.2", 10),
		"good6":       rec("good6", "", "2001:db8:0:3::/64", "fd00::3", 11),
		"outside":     rec("outside", "10.200.0.0/24", "", "192.168.1.4", 12),
		"wronglen":    rec("wronglen", "10.100.4.0/25", "", "192.168.1.5", 13),
		"overlapself": rec("overlapself", "10.100.1.0/24", "", "192.168.1.6", 1),
		"overlapgood": rec("overlapgood", "10.100.2.0/24", "", "192.168.1.7", 20),
		"selfip":      rec("selfip", "10.100.8.0/24", "", "192.168.1.1", 14),
		"loopback":    rec("loopback", "10.100.9.0/24", "", "127.0.0.1", 15),
		"multicast":   rec("multicast", "", "2001:db8:0:9::/64", "ff02::1", 16),
		"linklocal":   rec("linklocal", "", "2001:db8:0:a::/64", "fe80::1", 17),
		"noaddr":      rec("noaddr", "10.100.11.0/24", "", "", 18),
	}
	peers, rejected := Peers(cfg, self, records)
	var got []string
	for _, p := range peers {
		got = append(got, p.Node)
	}
	if strings.Join(got, ",") != "good,good6" {
		t.Errorf("peers %v, want good,good6", got)
	}
	for _, n := range []string{"outside", "wronglen", "overlapself", "overlapgood", "selfip", "loopback", "multicast", "linklocal", "noaddr"} {
		if rejected[n] == nil {
			t.Errorf("%s was not rejected", n)
		}
	}
	if err := rejected["overlapgood"]; err == nil || !strings.Contains(err.Error(), "good") {
		t.Errorf("overlap reason %v should name the older holder", err)
	}
}

func TestDecodeRecord(t *testing.T) {
	for _, bad := range []string{
		`{`, `[]`, `{"Node":"x"}`, `{"Node":"y","Subnet":"10.0.0.0/8"}`,
		`{"Node":"x","Subnet":"10.0.0.1/8"}`, `{"Node":"x","Subnet":"2001:db8::/64"}`,
		`{"Node":"x","IPv6Subnet":"10.0.0.0/8"}`, `{"Node":"x","Subnet":"10.0.0.0/8","PublicIP":"::1"}`,
	} {
		if _, err := DecodeRecord("x", []byte(bad)); err == nil {
			t.Errorf("DecodeRecord(%s) accepted", bad)
		}
	}
	if _, err := DecodeRecord("x", []byte(`{"Node":"x","Subnet":"10.0.0.0/24","PublicIP":"192.0.2.1"}`)); err != nil {
		t.Error(err)
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add("x", []byte(`{"Node":"x","Subnet":"10.0.0.0/24","PublicIP":"192.0.2.1"}`))
	f.Add("n", []byte(`{"Node":"n","IPv6Subnet":"2001:db8::/64","BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:ff"}}`))
	f.Fuzz(func(t *testing.T, node string, data []byte) {
		r, err := DecodeRecord(node, data)
		if err == nil && (r.Node != node || len(r.Subnets()) == 0) {
			t.Fatalf("accepted inconsistent record %+v", r)
		}
	})
}

func FuzzParseSubnetKey(f *testing.F) {
	f.Add("10.100.15.0-24")
	f.Add("2001:db8::-64")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseSubnetKey(s)
		if err == nil && SubnetKey(p) != s && p.Masked() != p {
			t.Fatalf("%q parsed to unmasked %v", s, p)
		}
	})
}

// Peers gives what its reference, peersByAge, gives: the unordered fast path
// must never change a result.
func TestPeersMatchesByAge(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	for _, js := range []string{
		`{"Network":"10.0.0.0/16","IPv6Network":"2001:db8::/48","IPv6SubnetLen":64}`,
		`{"Network":"10.0.0.0/22","SubnetLen":26}`,
		`{"EnableIPv4":false,"IPv6Network":"2001:db8::/104","IPv6SubnetLen":120}`,
		`{"Network":"10.0.0.0/20","SubnetLen":24,"IPv6Network":"2000::/3","IPv6SubnetLen":126}`,
	} {
		cfg := mustConfig(t, js)
		fast := 0
		for round := range 300 {
			n := 1 + rnd.IntN(40)
			space := n * (1 + rnd.IntN(4)) // small spaces repeat subnets
			pick4 := func() netip.Prefix {
				switch rnd.IntN(10) {
				case 0:
					return netip.Prefix{}
				case 1:
					return netip.MustParsePrefix("192.168.0.0/24") // outside
				}
				bits := 24
				if cfg.IPv4 != nil {
					bits = cfg.IPv4.SubnetLen
				}
				a := uint32(0x0a000000) + uint32(rnd.IntN(space))<<(32-bits)
				return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}), bits)
			}
			pick6 := func() netip.Prefix {
				if rnd.IntN(8) == 0 || cfg.IPv6 == nil {
					return netip.Prefix{}
				}
				a := cfg.IPv6.Network.Addr().As16()
				i := uint64(rnd.IntN(space))
				bits := cfg.IPv6.SubnetLen
				// add i << (128-bits) to the network address
				for b, j := 128-bits, 15; i != 0 && j >= 0; j-- {
					if b >= 8 {
						b -= 8
						continue
					}
					v := uint64(a[j]) + (i<<b)&0xff
					a[j] = byte(v)
					i = i>>(8-b) + v>>8
					b = 0
				}
				return netip.PrefixFrom(netip.AddrFrom16(a), bits).Masked()
			}
			records := map[string]*Record{}
			for i := range n {
				node := fmt.Sprintf("n%d", i)
				r := &Record{Node: node, Rev: int64(rnd.IntN(n)), Subnet: ipfam.Pair[netip.Prefix]{V4: pick4(), V6: pick6()},
					PublicIP: ipfam.Pair[netip.Addr]{V4: netip.AddrFrom4([4]byte{192, 0, 2, byte(rnd.IntN(4))})}}
				if rnd.IntN(20) == 0 {
					r.PublicIP.V4 = netip.MustParseAddr("127.0.0.1")
				}
				records[node] = r
			}
			var self *Record
			if rnd.IntN(2) == 0 {
				self = records["n0"]
			}
			if _, _, ok := peersUnordered(cfg, self, records); ok {
				fast++
			}
			wantPeers, wantRejected := peersByAge(cfg, self, records)
			peers, rejected := Peers(cfg, self, records)
			if got, want := peerNames(peers), peerNames(wantPeers); got != want {
				t.Fatalf("%s round %d: peers %s, want %s", js, round, got, want)
			}
			if len(rejected) != len(wantRejected) {
				t.Fatalf("%s round %d: rejected %v, want %v", js, round, rejected, wantRejected)
			}
			for node, err := range wantRejected {
				if rejected[node] == nil || rejected[node].Error() != err.Error() {
					t.Fatalf("%s round %d: %s rejected for %v, want %v", js, round, node, rejected[node], err)
				}
			}
		}
		if fast < 30 && !strings.Contains(js, "2000::/3") { // a pool of 2^123 subnets is always sorted
			t.Errorf("%s: the unordered path was taken in only %d of 300 rounds", js, fast)
		}
	}
}

func peerNames(peers []*Record) string {
	var names []string
	for _, p := range peers {
		names = append(names, p.Node)
	}
	slices.Sort(names)
	return strings.Join(names, ",")
}

// A vxlan record that carries another host's VTEP MAC is refused, whether
// it is in the listing or arrives later, and whichever path Peers takes;
// the honest record stays accepted.
func TestPeersRefusesCopiedVTEPMAC(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.100.0.0/16","Backend":{"Type":"vxlan"}}`)
	self := &Record{Node: "me", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.1.1")}}
	rec := func(node, s4, ip, data string, rev int64) *Record {
		return &Record{Node: node, Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix(s4)}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr(ip)},
			BackendType: "vxlan", BackendData: json.RawMessage(data), Rev: rev}
	}
	honest := rec("honest", "10.100.2.0/24", "192.168.1.2", string(vtep.Data("honest")), 10)
	for _, tc := range []struct {
		name  string
		extra []*Record // besides honest and the forged record
	}{
		{"unordered", nil},
		// Two records on one subnet send Peers down the by-age path.
		{"by age", []*Record{rec("dup1", "10.100.9.0/24", "192.168.1.9", string(vtep.Data("dup1")), 5), rec("dup2", "10.100.9.0/24", "192.168.1.10", string(vtep.Data("dup2")), 6)}},
	} {
		for _, forgedRev := range []int64{1, 20} { // older and younger than honest
			t.Run(fmt.Sprintf("%s/rev%d", tc.name, forgedRev), func(t *testing.T) {
				records := map[string]*Record{"me": self, "honest": honest}
				for _, r := range tc.extra {
					records[r.Node] = r
				}
				forged := rec("mallory", "10.100.3.0/24", "192.168.1.3", string(vtep.Data("honest")), forgedRev)
				// Both through a fresh filter and as a change of a running one.
				ps := NewPeerSet(cfg, self, records)
				records["mallory"] = forged
				ps.Update("mallory")
				_, fresh := Peers(cfg, self, records)
				for name, rejected := range map[string]map[string]error{"Peers": fresh, "PeerSet.Update": ps.Rejected()} {
					err := rejected["mallory"]
					if err == nil || !strings.Contains(err.Error(), "is not") || !strings.Contains(err.Error(), `"mallory"`) {
						t.Errorf("%s: the record copying honest's MAC: rejected with %v", name, err)
					}
					if rejected["honest"] != nil {
						t.Errorf("%s: honest rejected: %v", name, rejected["honest"])
					}
				}
				if ps.Accepted()["honest"] == nil || ps.Accepted()["mallory"] != nil {
					t.Errorf("accepted %v", slices.Sorted(maps.Keys(ps.Accepted())))
				}
			})
		}
	}
}
