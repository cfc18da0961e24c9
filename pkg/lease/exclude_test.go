package lease

import (
	"errors"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"strings"
	"testing"

	"github.com/leased/leased/internal/testutil/etcdtest"
)

// A host never claims a subnet that overlaps one of its own routes, not
// even the one its subnet.env or lease record names; an Own route (its
// Docker bridge) inside a subnet it held before does not count; when every
// free subnet overlaps, the error names the routes.
func TestAcquireSkipsExcluded(t *testing.T) {
	_, cli := etcdtest.Start(t)
	reg := NewRegistry(cli, "")
	mp := netip.MustParsePrefix
	cases := []struct {
		name    string
		cfg     string
		claim   Claim
		want4   string
		want6   string
		wantErr string
	}{
		{name: "LAN of eth1 named by the hint, another LAN, IPv4 and IPv6",
			cfg: `{"Network":"10.10.8.0/22","IPv6Network":"fd00:10::/62","IPv6SubnetLen":64}`,
			claim: Claim{Node: "lan", Hint: ipfam.Pair[netip.Prefix]{V4: mp("10.10.10.0/24"), V6: mp("fd00:10:0:2::/64")}, Exclude: []Excluded{
				{Prefix: mp("10.10.10.0/24"), Route: "10.10.10.0/24 dev eth1 proto kernel"},
				{Prefix: mp("10.10.8.0/23"), Route: "10.10.8.0/23 dev eth2 proto kernel"},
				{Prefix: mp("fd00:10:0:2::/64"), Route: "fd00:10:0:2::/64 dev eth1 proto kernel metric 256"},
				{Prefix: mp("fd00:10::/63"), Route: "fd00:10::/63 dev wg0 proto static"},
				{Prefix: mp("192.168.1.0/24"), Route: "outside the network"},
			}},
			want4: "10.10.11.0/24", want6: "fd00:10:0:3::/64"},
		{name: "own bridge inside the subnet held before",
			cfg: `{"Network":"10.11.8.0/22"}`,
			claim: Claim{Node: "own", Hint: ipfam.Pair[netip.Prefix]{V4: mp("10.11.9.0/24")}, Exclude: []Excluded{
				{Prefix: mp("10.11.9.0/24"), Route: "10.11.9.0/24 dev docker0 proto kernel", Own: true},
				{Prefix: mp("10.11.9.1/32"), Route: "local 10.11.9.1 dev docker0 proto kernel", Own: true},
			}},
			want4: "10.11.9.0/24"},
		{name: "a host address inside a subnet",
			cfg: `{"Network":"10.12.8.0/23","SubnetLen":24}`,
			claim: Claim{Node: "addr", Hint: ipfam.Pair[netip.Prefix]{V4: mp("10.12.8.0/24")}, Exclude: []Excluded{
				{Prefix: mp("10.12.8.7/32"), Route: "local 10.12.8.7 dev lo proto kernel"},
			}},
			want4: "10.12.9.0/24"},
		{name: "every subnet overlaps",
			cfg: `{"Network":"10.13.8.0/23","SubnetLen":24}`,
			claim: Claim{Node: "none", Exclude: []Excluded{
				{Prefix: mp("10.13.0.0/16"), Route: "10.13.0.0/16 dev eth1 proto kernel"},
			}},
			wantErr: "overlap routes of this host (10.13.0.0/16 dev eth1 proto kernel)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rec, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), mustConfig(t, tc.cfg), tc.claim)
			if tc.wantErr != "" {
				var ex *ExhaustedError
				if !errors.As(err, &ex) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want out of subnets naming %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rec.Subnet.V4.String() != tc.want4 && !(tc.want4 == "" && !rec.Subnet.V4.IsValid()) {
				t.Errorf("IPv4 subnet %v, want %s", rec.Subnet.V4, tc.want4)
			}
			if tc.want6 != "" && rec.Subnet.V6.String() != tc.want6 {
				t.Errorf("IPv6 subnet %v, want %s", rec.Subnet.V6, tc.want6)
			}
		})
	}
}

// In a huge range the random pick and the gap search both avoid
// exclusions much larger than a subnet.
func TestAcquireSkipsExcludedHugeRange(t *testing.T) {
	cli, reg, cfg := startRegistry(t, `{"IPv6Network":"2001:db8::/46","IPv6SubnetLen":64}`)
	ex := []Excluded{{Prefix: netip.MustParsePrefix("2001:db8::/47")}, {Prefix: netip.MustParsePrefix("2001:db8:2::/48")}}
	free := netip.MustParsePrefix("2001:db8:3::/48")
	for i := range 20 {
		rec, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), cfg, Claim{Node: "h" + string(rune('a'+i)), Exclude: ex})
		if err != nil {
			t.Fatal(err)
		}
		if !free.Contains(rec.Subnet.V6.Addr()) {
			t.Fatalf("got %v, inside an excluded prefix", rec.Subnet.V6)
		}
	}
	// The gap search: only the last subnet is free.
	p := cfg.IPv6
	excl := []Excluded{{Prefix: netip.MustParsePrefix("2001:db8::/47")}, {Prefix: netip.MustParsePrefix("2001:db8:2::/48")},
		{Prefix: netip.MustParsePrefix("2001:db8:3::/49")}}
	taken := map[netip.Prefix]bool{}
	last := netip.MustParsePrefix("2001:db8:3:ffff::/64")
	for i := 0x8000; i < 0xffff; i++ {
		if i%4096 == 0 || i >= 0xfff0 {
			taken[netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 3, byte(i >> 8), byte(i)}), 64)] = true
		}
	}
	excl = append(excl, Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:8000::/50")}, Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:c000::/51")},
		Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:e000::/52")}, Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:f000::/53")},
		Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:f800::/54")}, Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:fc00::/55")},
		Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:fe00::/56")}, Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:ff00::/57")},
		Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:ff80::/58")}, Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:ffc0::/59")},
		Excluded{Prefix: netip.MustParsePrefix("2001:db8:3:ffe0::/60")})
	for range 10 {
		s, ok := p.freeSubnet(taken, excl)
		if !ok || s != last {
			t.Fatalf("freeSubnet = %v, %v; want %v, the only free subnet", s, ok, last)
		}
	}
	taken[last] = true
	if s, ok := p.freeSubnet(taken, excl); ok {
		t.Fatalf("freeSubnet = %v with nothing free", s)
	}
}
