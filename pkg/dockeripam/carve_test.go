package dockeripam

import (
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"strings"
	"testing"
)

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestCarve(t *testing.T) {
	for _, tc := range []struct {
		name   string
		split  Split
		subnet string
		used   []string
		want   string // "" with wantErr
		err    string
	}{
		{"v4 first after docker0's quarter", DefaultSplit, "10.100.15.0/24", nil, "10.100.15.64/27", ""},
		{"v4 skips used", DefaultSplit, "10.100.15.0/24", []string{"10.100.15.64/27", "10.100.15.96/27"}, "10.100.15.128/27", ""},
		{"v4 fills a hole", DefaultSplit, "10.100.15.0/24", []string{"10.100.15.64/27", "10.100.15.128/27"}, "10.100.15.96/27", ""},
		{"v4 skips a slice a --subnet overlaps", DefaultSplit, "10.100.15.0/24", []string{"10.100.15.70/31"}, "10.100.15.96/27", ""},
		{"v4 skips a larger used pool", DefaultSplit, "10.100.15.0/24", []string{"10.100.15.64/26"}, "10.100.15.128/27", ""},
		{"v4 ignores pools of other subnets", DefaultSplit, "10.100.15.0/24", []string{"10.100.16.64/27", "10.100.14.0/24"}, "10.100.15.64/27", ""},
		{"v4 full", DefaultSplit, "10.100.15.0/24", []string{"10.100.15.64/26", "10.100.15.128/25"}, "", "no free /27 left in this host's leased subnet 10.100.15.0/24 (docker0 keeps 10.100.15.0/26, 2 networks hold the rest)"},
		{"v4 last slice of the address space", DefaultSplit, "255.255.255.0/24", []string{"255.255.255.64/26", "255.255.255.128/26", "255.255.255.192/27"}, "255.255.255.224/27", ""},
		{"v4 last slice taken at the end of the address space", DefaultSplit, "255.255.255.0/24", []string{"255.255.255.64/26", "255.255.255.128/25"}, "", "no free /27"},
		{"v4 half for docker0", Split{Docker0Bits: 1, PoolBits4: 2, PoolBits6: 16}, "10.100.15.0/24", nil, "10.100.15.128/26", ""},
		{"v4 /26 lease", DefaultSplit, "10.100.15.64/26", nil, "10.100.15.80/29", ""},
		{"v6 /64 → /80", DefaultSplit, "2001:db8:cd11:7::/64", nil, "2001:db8:cd11:7:4000::/80", ""},
		{"v6 skips used", DefaultSplit, "2001:db8:cd11:7::/64", []string{"2001:db8:cd11:7:4000::/80"}, "2001:db8:cd11:7:4001::/80", ""},
		{"v6 /80 lease → /96", DefaultSplit, "2001:db8:cd11:0:8000::/80", nil, "2001:db8:cd11:0:8000:4000::/96", ""},
		{"v6 full", Split{Docker0Bits: 1, PoolBits4: 3, PoolBits6: 1}, "2001:db8::/64", []string{"2001:db8:0:0:8000::/65"}, "", "no free /65 left"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.split.Carve(netip.MustParsePrefix(tc.subnet), pfx(tc.used...))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("Carve = %v, %v; want an error with %q", got, err, tc.err)
				}
				return
			}
			if err != nil || got.String() != tc.want {
				t.Fatalf("Carve = %v, %v; want %s", got, err, tc.want)
			}
			sub := netip.MustParsePrefix(tc.subnet)
			if !sub.Contains(got.Addr()) || got.Bits() < sub.Bits() || got.Overlaps(tc.split.Docker0(sub)) {
				t.Fatalf("%s is not in %s outside docker0's %s", got, sub, tc.split.Docker0(sub))
			}
		})
	}
}

func TestCheckRequestedSubnet(t *testing.T) {
	s4, s6 := "10.100.15.0/24", "2001:db8:cd11:7::/64"
	for _, tc := range []struct {
		want, subnet string
		used         []string
		err          string // "" = accepted
	}{
		{"10.100.15.128/25", s4, nil, ""},
		{"10.100.15.64/28", s4, []string{"10.100.15.96/27"}, ""},
		{"10.100.15.252/30", s4, nil, ""},
		{"10.100.15.252/31", s4, nil, "too small for containers: use a /30 or larger"},
		{"10.100.15.65/27", s4, nil, "not a network address: use 10.100.15.64/27"},
		{"10.100.16.0/27", s4, nil, "outside this host's leased subnet 10.100.15.0/24"},
		{"10.100.0.0/16", s4, nil, "outside this host's leased subnet 10.100.15.0/24"},
		{"10.100.15.0/27", s4, nil, "overlaps docker0's share 10.100.15.0/26"},
		{"10.100.15.0/24", s4, nil, "overlaps docker0's share"},
		{"10.100.15.96/28", s4, []string{"10.100.15.96/27"}, "overlaps 10.100.15.96/27, the pool of another network"},
		{"2001:db8:cd11:7:8000::/80", s6, nil, ""},
		{"2001:db8:cd11:7:1::/80", s6, nil, "overlaps docker0's share 2001:db8:cd11:7::/66"},
		{"2001:db8:cd11:8::/80", s6, nil, "outside this host's leased subnet 2001:db8:cd11:7::/64"},
		{"10.100.15.128/25", s6, nil, "not of this host's leased family"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			err := DefaultSplit.Check(netip.MustParsePrefix(tc.want), netip.MustParsePrefix(tc.subnet), pfx(tc.used...))
			if tc.err == "" {
				if err != nil {
					t.Fatalf("Check(%s) = %v, want accepted", tc.want, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("Check(%s) = %v, want an error with %q", tc.want, err, tc.err)
			}
		})
	}
}

func TestSplitValidate(t *testing.T) {
	s4, s6 := netip.MustParsePrefix("10.100.15.0/24"), netip.MustParsePrefix("2001:db8::/64")
	for _, tc := range []struct {
		split Split
		err   string
	}{
		{DefaultSplit, ""},
		{Split{Docker0Bits: 0, PoolBits4: 3, PoolBits6: 16}, "use at least 1"},
		{Split{Docker0Bits: 2, PoolBits4: 1, PoolBits6: 16}, "--docker-ipam-pool-bits4 1 is less than --docker-ipam-docker0-bits 2"},
		{Split{Docker0Bits: 2, PoolBits4: 7, PoolBits6: 16}, "--docker-ipam-pool-bits4 7 makes pools of /31 from the leased 10.100.15.0/24: too small for containers; use at most 6"},
		{Split{Docker0Bits: 2, PoolBits4: 3, PoolBits6: 63}, "use at most 62"},
	} {
		err := tc.split.Validate(ipfam.Pair[netip.Prefix]{V4: s4, V6: s6})
		if (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("%+v.Validate = %v, want %q", tc.split, err, tc.err)
		}
	}
}
