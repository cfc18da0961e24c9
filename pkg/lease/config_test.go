package lease

import (
	"errors"
	"github.com/leased/leased/pkg/ipfam"
	"math/big"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func mustPool(network string, subnetLen int, min, max string) *Pool {
	return &Pool{
		Network:   netip.MustParsePrefix(network),
		SubnetLen: subnetLen,
		Min:       netip.MustParsePrefix(min),
		Max:       netip.MustParsePrefix(max),
	}
}

func TestParseConfigValid(t *testing.T) {
	tests := []struct {
		name        string
		in          string
		v4, v6      *Pool
		backend     string
		raw         string // expected Backend.Raw; "" means don't check
		count4      int64  // expected number of IPv4 subnets; 0 means don't check
		count6      int64
		wantWarning []string // substrings, each must appear in some warning
	}{
		{
			name:    "IPv4 default /24",
			in:      `{"Network":"10.100.0.0/16"}`,
			v4:      mustPool("10.100.0.0/16", 24, "10.100.0.0/24", "10.100.255.0/24"),
			backend: "host-gw",
			raw:     `{"Type":"host-gw"}`,
			count4:  256,
		},
		{
			name:   "IPv4 /22 still gets the default",
			in:     `{"Network":"10.100.0.0/22"}`,
			v4:     mustPool("10.100.0.0/22", 24, "10.100.0.0/24", "10.100.3.0/24"),
			count4: 4,
		},
		{
			name:   "flannel example: SubnetLen 25, addresses as bounds, exactly 3 subnets",
			in:     `{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.0.0","SubnetMax":"10.100.1.0"}`,
			v4:     mustPool("10.100.0.0/16", 25, "10.100.0.0/25", "10.100.1.0/25"),
			count4: 3,
		},
		{
			name:   "bounds as prefixes",
			in:     `{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.0.128/25","SubnetMax":"10.100.1.128/25"}`,
			v4:     mustPool("10.100.0.0/16", 25, "10.100.0.128/25", "10.100.1.128/25"),
			count4: 3,
		},
		{
			name:   "IPv4 /30 subnets",
			in:     `{"Network":"10.0.0.0/24","SubnetLen":30}`,
			v4:     mustPool("10.0.0.0/24", 30, "10.0.0.0/30", "10.0.0.252/30"),
			count4: 64,
		},
		{
			name:   "two subnets is enough",
			in:     `{"Network":"10.0.0.0/29","SubnetLen":30}`,
			v4:     mustPool("10.0.0.0/29", 30, "10.0.0.0/30", "10.0.0.4/30"),
			count4: 2,
		},
		{
			name:    "dual-stack with vxlan",
			in:      `{"Network":"10.100.0.0/16","EnableIPv6":true,"IPv6Network":"2003:ab11::/48","IPv6SubnetLen":64,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}`,
			v4:      mustPool("10.100.0.0/16", 24, "10.100.0.0/24", "10.100.255.0/24"),
			v6:      mustPool("2003:ab11::/48", 64, "2003:ab11::/64", "2003:ab11:0:ffff::/64"),
			backend: "vxlan",
			raw:     `{"Type":"vxlan","VNI":1,"Port":8472}`,
			count6:  65536,
		},
		{
			name: "IPv6 default /64",
			in:   `{"IPv6Network":"2001:db8::/62"}`,
			v6:   mustPool("2001:db8::/62", 64, "2001:db8::/64", "2001:db8:0:3::/64"),
		},
		{
			name:    "IPv6-only /80 with proxy-ndp",
			in:      `{"IPv6Network":"2003:ab11::/64","IPv6SubnetLen":80,"Backend":{"Type":"proxy-ndp"}}`,
			v6:      mustPool("2003:ab11::/64", 80, "2003:ab11::/80", "2003:ab11::ffff:0:0:0/80"),
			backend: "proxy-ndp",
			count6:  65536,
		},
		{
			name:   "IPv6-only /126 with bounds",
			in:     `{"IPv6Network":"2600:1f18:47b:ca03::/120","IPv6SubnetLen":126,"IPv6SubnetMin":"2600:1f18:47b:ca03::8","IPv6SubnetMax":"2600:1f18:47b:ca03::c/126"}`,
			v6:     mustPool("2600:1f18:47b:ca03::/120", 126, "2600:1f18:47b:ca03::8/126", "2600:1f18:47b:ca03::c/126"),
			count6: 2,
		},
		{
			name:        "IPv6 disabled explicitly, its keys ignored",
			in:          `{"Network":"10.100.0.0/16","EnableIPv6":false,"IPv6Network":"2001:db8::/48"}`,
			v4:          mustPool("10.100.0.0/16", 24, "10.100.0.0/24", "10.100.255.0/24"),
			wantWarning: []string{"IPv6 is disabled by EnableIPv6=false", "IPv6Network"},
		},
		{
			name:        "IPv4 disabled explicitly",
			in:          `{"EnableIPv4":false,"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`,
			v6:          mustPool("2001:db8::/48", 64, "2001:db8::/64", "2001:db8:0:ffff::/64"),
			wantWarning: []string{"IPv4 is disabled by EnableIPv4=false: ignoring Network"},
		},
		{
			name: "EnableIPv4 true with network",
			in:   `{"EnableIPv4":true,"Network":"10.100.0.0/16"}`,
			v4:   mustPool("10.100.0.0/16", 24, "10.100.0.0/24", "10.100.255.0/24"),
		},
		{
			name:        "unknown key close to a known one",
			in:          `{"Network":"10.100.0.0/16","SubnetLenn":25}`,
			v4:          mustPool("10.100.0.0/16", 24, "10.100.0.0/24", "10.100.255.0/24"),
			wantWarning: []string{`unknown key "SubnetLenn" (did you mean "SubnetLen"?)`},
		},
		{
			name:        "unknown key differing in case",
			in:          `{"Network":"10.100.0.0/16","subnetmax":"10.100.3.0"}`,
			v4:          mustPool("10.100.0.0/16", 24, "10.100.0.0/24", "10.100.255.0/24"),
			wantWarning: []string{`unknown key "subnetmax" (did you mean "SubnetMax"?)`},
		},
		{
			name:        "unknown key far from everything",
			in:          `{"Network":"10.100.0.0/16","Colour":"blue"}`,
			v4:          mustPool("10.100.0.0/16", 24, "10.100.0.0/24", "10.100.255.0/24"),
			wantWarning: []string{`unknown key "Colour" is ignored`},
		},
		{
			name:        "IPv6 keys without IPv6Network",
			in:          `{"Network":"10.100.0.0/16","IPv6SubnetLen":80}`,
			v4:          mustPool("10.100.0.0/16", 24, "10.100.0.0/24", "10.100.255.0/24"),
			wantWarning: []string{"IPv6Network is not set", "IPv6SubnetLen"},
		},
		{
			name:    "Backend without Type defaults to host-gw but keeps options",
			in:      `{"Network":"10.100.0.0/16","Backend":{"DirectRouting":true}}`,
			v4:      mustPool("10.100.0.0/16", 24, "10.100.0.0/24", "10.100.255.0/24"),
			backend: "host-gw",
			raw:     `{"DirectRouting":true}`,
		},
		{
			name:    "null values count as absent",
			in:      `{"Network":"10.100.0.0/16","SubnetLen":null,"Backend":null}`,
			v4:      mustPool("10.100.0.0/16", 24, "10.100.0.0/24", "10.100.255.0/24"),
			backend: "host-gw",
			raw:     `{"Type":"host-gw"}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, warnings, err := ParseConfig([]byte(tt.in))
			if err != nil {
				t.Fatalf("ParseConfig(%s): %v", tt.in, err)
			}
			checkPool(t, "IPv4", cfg.IPv4, tt.v4)
			checkPool(t, "IPv6", cfg.IPv6, tt.v6)
			if tt.count4 != 0 && cfg.IPv4.count().Cmp(big.NewInt(tt.count4)) != 0 {
				t.Errorf("IPv4 pool has %s subnets, want %d", cfg.IPv4.count(), tt.count4)
			}
			if tt.count6 != 0 && cfg.IPv6.count().Cmp(big.NewInt(tt.count6)) != 0 {
				t.Errorf("IPv6 pool has %s subnets, want %d", cfg.IPv6.count(), tt.count6)
			}
			backend := tt.backend
			if backend == "" {
				backend = "host-gw"
			}
			if cfg.Backend.Type != backend {
				t.Errorf("Backend.Type = %q, want %q", cfg.Backend.Type, backend)
			}
			if tt.raw != "" && string(cfg.Backend.Raw) != tt.raw {
				t.Errorf("Backend.Raw = %s, want %s", cfg.Backend.Raw, tt.raw)
			}
			for _, w := range tt.wantWarning {
				if !slices.ContainsFunc(warnings, func(s string) bool { return strings.Contains(s, w) }) {
					t.Errorf("warnings %q: none contains %q", warnings, w)
				}
			}
			if len(tt.wantWarning) == 0 && len(warnings) != 0 {
				t.Errorf("unexpected warnings %q", warnings)
			}
		})
	}
}

func checkPool(t *testing.T, fam string, got, want *Pool) {
	t.Helper()
	if (got == nil) != (want == nil) {
		t.Fatalf("%s pool = %v, want %v", fam, got, want)
	}
	if got != nil && *got != *want {
		t.Errorf("%s pool = %v, want %v", fam, got, want)
	}
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []string // substrings of the error
	}{
		{"empty", ``, []string{"empty", "Network"}},
		{"syntax error with position", "{\n  \"Network\": \"10.100.0.0/16\",\n}", []string{"not valid JSON", "line 3, column 1 (byte offset 32)"}},
		{"truncated", `{"Network": "10.1`, []string{"not valid JSON", "line 1, column 17", "unexpected end"}},
		{"not an object", `["10.100.0.0/16"]`, []string{"JSON object", "an array"}},
		{"null", `null`, []string{"JSON object"}},
		{"no family", `{}`, []string{"Network", "IPv6Network"}},
		{"no family, case-mismatched key", `{"network":"10.100.0.0/16"}`, []string{"set Network", `did you mean "Network"`}},
		{"all families disabled", `{"Network":"10.100.0.0/16","EnableIPv4":false}`, []string{"enables no address family", "EnableIPv4"}},
		{"EnableIPv4 without Network", `{"EnableIPv4":true,"IPv6Network":"2001:db8::/48"}`, []string{"EnableIPv4 is true", "set Network"}},
		{"EnableIPv6 without IPv6Network", `{"Network":"10.100.0.0/16","EnableIPv6":true}`, []string{"EnableIPv6 is true", "set IPv6Network"}},
		{"EnableIPv6 wrong type", `{"Network":"10.100.0.0/16","EnableIPv6":"yes"}`, []string{"EnableIPv6 must be true or false", `the string "yes"`}},
		{"Network not a network address", `{"Network":"10.100.1.0/16"}`, []string{"Network 10.100.1.0/16 is not a network address: did you mean 10.100.0.0/16?"}},
		{"IPv6Network not a network address", `{"IPv6Network":"2001:db8::1/64"}`, []string{"IPv6Network 2001:db8::1/64 is not a network address: did you mean 2001:db8::/64?"}},
		{"Network unparsable", `{"Network":"10.100.0.0"}`, []string{`Network "10.100.0.0" is not a CIDR prefix`}},
		{"Network wrong type", `{"Network":167772160}`, []string{"Network must be a string", "the number 167772160"}},
		{"IPv6 in Network", `{"Network":"2001:db8::/48"}`, []string{"Network", "is IPv6, not IPv4", "IPv6Network"}},
		{"IPv4 in IPv6Network", `{"IPv6Network":"10.0.0.0/8"}`, []string{"IPv6Network", "is IPv4, not IPv6", "Network"}},
		{"IPv4-mapped in IPv6Network", `{"IPv6Network":"::ffff:10.0.0.0/104"}`, []string{"IPv6Network", "IPv4-mapped"}},
		{"IPv4 network too long for default", `{"Network":"10.100.0.0/23"}`, []string{"SubnetLen is required when Network is longer than /22", "from 24 to 30"}},
		{"IPv6 network too long for default", `{"IPv6Network":"2001:db8::/63"}`, []string{"IPv6SubnetLen is required when IPv6Network is longer than /62", "from 64 to 126"}},
		{"IPv4 network too small for any subnet", `{"Network":"10.0.0.0/30","SubnetLen":30}`, []string{"Network 10.0.0.0/30 is too small", "/29 or shorter"}},
		{"IPv6 network too small for any subnet", `{"IPv6Network":"2001:db8::/126"}`, []string{"IPv6Network", "too small", "/125 or shorter"}},
		{"SubnetLen equal to network", `{"Network":"10.100.0.0/16","SubnetLen":16}`, []string{"SubnetLen 16", "from 17 to 30"}},
		{"SubnetLen too long", `{"Network":"10.100.0.0/16","SubnetLen":31}`, []string{"SubnetLen 31", "from 17 to 30"}},
		{"SubnetLen negative", `{"Network":"10.100.0.0/16","SubnetLen":-1}`, []string{"SubnetLen -1"}},
		{"SubnetLen string", `{"Network":"10.100.0.0/16","SubnetLen":"24"}`, []string{"SubnetLen must be an integer", `the string "24"`}},
		{"SubnetLen fraction", `{"Network":"10.100.0.0/16","SubnetLen":24.5}`, []string{"SubnetLen must be an integer", "24.5"}},
		{"IPv6SubnetLen too long", `{"IPv6Network":"2001:db8::/48","IPv6SubnetLen":127}`, []string{"IPv6SubnetLen 127", "from 49 to 126"}},
		{"SubnetMin outside", `{"Network":"10.100.0.0/16","SubnetMin":"10.101.0.0"}`, []string{"SubnetMin 10.101.0.0 is outside Network 10.100.0.0/16", "from 10.100.0.0 to 10.100.255.0"}},
		{"SubnetMax outside as prefix", `{"Network":"10.100.0.0/16","SubnetMax":"10.101.0.0/24"}`, []string{"SubnetMax", "from 10.100.0.0/24 to 10.100.255.0/24"}},
		{"SubnetMin off boundary rounds down", `{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.0.5"}`, []string{"SubnetMin 10.100.0.5 is not on a /25 subnet boundary", "did you mean 10.100.0.0?"}},
		{"SubnetMax off boundary rounds up", `{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMax":"10.100.1.100"}`, []string{"SubnetMax", "did you mean 10.100.1.128?"}},
		{"boundary suggestion stays in network", `{"Network":"10.100.0.0/16","SubnetMax":"10.100.255.200"}`, []string{"did you mean 10.100.255.0?"}},
		{"SubnetMin off boundary as prefix", `{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.0.100/25"}`, []string{"SubnetMin", "did you mean 10.100.0.128/25?"}},
		{"SubnetMin prefix of wrong length", `{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.0.0/24"}`, []string{"SubnetMin 10.100.0.0/24 is a /24 but SubnetLen is 25", "10.100.0.0/25"}},
		{"SubnetMin unparsable", `{"Network":"10.100.0.0/16","SubnetMin":"10.100"}`, []string{`SubnetMin "10.100" is not an address`}},
		{"SubnetMin wrong family", `{"Network":"10.100.0.0/16","SubnetMin":"2001:db8::"}`, []string{"SubnetMin", "is IPv6, not IPv4"}},
		{"IPv6SubnetMin with zone", `{"IPv6Network":"2001:db8::/48","IPv6SubnetMin":"2001:db8::%eth0"}`, []string{"IPv6SubnetMin", "zone"}},
		{"IPv6SubnetMax off boundary", `{"IPv6Network":"2001:db8::/48","IPv6SubnetLen":80,"IPv6SubnetMax":"2001:db8::1"}`, []string{"IPv6SubnetMax", "/80 subnet boundary", "did you mean 2001:db8::?"}},
		{"Min after Max", `{"Network":"10.100.0.0/16","SubnetMin":"10.100.5.0","SubnetMax":"10.100.1.0"}`, []string{"SubnetMin 10.100.5.0 is after SubnetMax 10.100.1.0"}},
		{"Backend not an object", `{"Network":"10.100.0.0/16","Backend":"vxlan"}`, []string{"Backend must be an object", `the string "vxlan"`}},
		{"Backend unknown type", `{"Network":"10.100.0.0/16","Backend":{"Type":"udp"}}`, []string{`Backend.Type "udp" is not supported`, `"host-gw", "vxlan", "proxy-ndp"`}},
		{"Backend type wrong case", `{"Network":"10.100.0.0/16","Backend":{"Type":"VXLAN"}}`, []string{`Backend.Type "VXLAN"`, `did you mean "vxlan"?`}},
		{"Backend type wrong JSON type", `{"Network":"10.100.0.0/16","Backend":{"Type":1}}`, []string{"Backend.Type must be a string"}},
		{"whole IPv4 space", `{"Network":"0.0.0.0/0"}`, []string{"Network 0.0.0.0/0 is the whole address space", "10.100.0.0/16"}},
		{"whole IPv6 space", `{"IPv6Network":"::/0","IPv6SubnetLen":64}`, []string{"IPv6Network ::/0 is the whole address space"}},
		{"IPv4 loopback", `{"Network":"127.0.0.0/16"}`, []string{"Network 127.0.0.0/16 is inside loopback addresses (127.0.0.0/8)"}},
		{"IPv4 network containing loopback", `{"Network":"96.0.0.0/3"}`, []string{"contains loopback addresses"}},
		{"IPv4 this network", `{"Network":"0.0.0.0/16"}`, []string{"Network 0.0.0.0/16", "0.0.0.0/8"}},
		{"IPv4 link-local", `{"Network":"169.254.0.0/16"}`, []string{"Network 169.254.0.0/16 is inside link-local addresses"}},
		{"IPv4 multicast", `{"Network":"224.1.0.0/16"}`, []string{"Network 224.1.0.0/16 is inside multicast addresses (224.0.0.0/4)"}},
		{"IPv6 link-local", `{"IPv6Network":"fe80::/48"}`, []string{"IPv6Network fe80::/48 is inside link-local addresses (fe80::/10)", "2001:db8:cd11::/48"}},
		{"IPv6 multicast", `{"IPv6Network":"ff00::/8","IPv6SubnetLen":64}`, []string{"IPv6Network ff00::/8 is inside multicast addresses (ff00::/8)"}},
		{"IPv6 loopback", `{"IPv6Network":"::/64","IPv6SubnetLen":80}`, []string{"IPv6Network ::/64 contains the unspecified address"}},
		{"proxy-ndp without IPv6", `{"Network":"10.100.0.0/16","Backend":{"Type":"proxy-ndp"}}`, []string{`"proxy-ndp" needs IPv6`, "set IPv6Network", `"host-gw"`}},
		{"proxy-ndp with IPv6 disabled", `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","EnableIPv6":false,"Backend":{"Type":"proxy-ndp"}}`, []string{`"proxy-ndp" needs IPv6`}},
		{"Backend type key wrong case", `{"Network":"10.100.0.0/16","Backend":{"type":"vxlan"}}`, []string{`Backend has "type"`, `"Type"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, _, err := ParseConfig([]byte(tt.in))
			if err == nil {
				t.Fatalf("ParseConfig(%s) = %+v, want an error", tt.in, cfg)
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("error %q does not wrap ErrInvalidConfig", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestPoolContains(t *testing.T) {
	p := mustPool("10.100.0.0/16", 25, "10.100.0.0/25", "10.100.1.0/25")
	p6 := mustPool("2001:db8::/48", 80, "2001:db8::/80", "2001:db8:0:ffff:ffff::/80")
	tests := []struct {
		pool *Pool
		s    string
		want bool
	}{
		{p, "10.100.0.0/25", true},
		{p, "10.100.0.128/25", true},
		{p, "10.100.1.0/25", true},
		{p, "10.100.1.128/25", false}, // after Max
		{p, "10.100.0.0/24", false},   // wrong length
		{p, "10.100.0.64/25", false},  // not aligned
		{p, "10.101.0.0/25", false},   // outside
		{p6, "2001:db8:0:ffff:ffff::/80", true},
		{p6, "2001:db8::/80", true},
		{p6, "2001:db8::1/80", false},
		{p6, "2001:db9::/80", false},
		{p6, "10.100.0.0/25", false},
		{nil, "10.100.0.0/25", false},
	}
	for _, tt := range tests {
		if got := tt.pool.Contains(netip.MustParsePrefix(tt.s)); got != tt.want {
			t.Errorf("%v.Contains(%s) = %v, want %v", tt.pool, tt.s, got, tt.want)
		}
	}
	if p.Contains(netip.Prefix{}) {
		t.Error("Contains(zero prefix) = true")
	}
}

func TestPoolString(t *testing.T) {
	cfg, _, err := ParseConfig([]byte(`{"Network":"10.100.0.0/16"}`))
	if err != nil {
		t.Fatal(err)
	}
	want := "10.100.0.0/16 (/24 subnets from 10.100.0.0/24 to 10.100.255.0/24)"
	if got := cfg.IPv4.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got := (*Pool)(nil).String(); got != "<disabled>" {
		t.Errorf("nil String() = %q", got)
	}
}

func TestSuggestKey(t *testing.T) {
	tests := []struct{ in, want string }{
		{"SubnetLenn", "SubnetLen"},
		{"subnetlen", "SubnetLen"},
		{"Netwrk", "Network"},
		{"IPV6Network", "IPv6Network"},
		{"EnableIpv6", "EnableIPv6"},
		{"Backnd", "Backend"},
		{"Colour", ""},
		{"", ""},
	}
	for _, tt := range tests {
		if got := suggestKey(tt.in, knownKeys); got != tt.want {
			t.Errorf("suggestKey(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// FuzzParseConfig checks that ParseConfig never panics and that every config
// it accepts has consistent pools.
func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{
		`{"Network":"10.100.0.0/16"}`,
		`{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.0.0","SubnetMax":"10.100.1.0"}`,
		`{"Network":"10.100.0.0/16","EnableIPv6":true,"IPv6Network":"2003:ab11::/48","IPv6SubnetLen":64,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}`,
		`{"IPv6Network":"2600:1f18:47b:ca03::/120","IPv6SubnetLen":126,"IPv6SubnetMin":"2600:1f18:47b:ca03::8/126"}`,
		`{"IPv6Network":"::/0","IPv6SubnetLen":126}`, `{"IPv6Network":"2000::/3","IPv6SubnetLen":126}`,
		`{"Network":"0.0.0.0/0","SubnetMax":"255.255.255.0"}`,
		`{"Network":"10.100.1.0/16","SubnetLenn":3}`,
		`{"EnableIPv4":false,"Network":"x","Backend":{"Type":"proxy-ndp"}}`,
		"{\n\"Network\": [1,2,\n",
		`null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, _, err := ParseConfig(data)
		if err != nil {
			if cfg != nil {
				t.Fatalf("non-nil config with error %v", err)
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("error %q does not wrap ErrInvalidConfig", err)
			}
			return
		}
		if cfg.IPv4 == nil && cfg.IPv6 == nil {
			t.Fatal("valid config without pools")
		}
		if !slices.Contains(backendTypes, cfg.Backend.Type) || len(cfg.Backend.Raw) == 0 {
			t.Fatalf("bad backend %q %s", cfg.Backend.Type, cfg.Backend.Raw)
		}
		for _, p := range []*Pool{cfg.IPv4, cfg.IPv6} {
			if p == nil {
				continue
			}
			if p.Network.Masked() != p.Network {
				t.Fatalf("%v: network is not masked", p)
			}
			if (p == cfg.IPv4) != p.Network.Addr().Is4() || p.Network.Addr().Is4In6() {
				t.Fatalf("%v: wrong family", p)
			}
			for _, s := range []netip.Prefix{p.Min, p.Max} {
				if s.Bits() != p.SubnetLen || !p.Network.Contains(s.Addr()) || s.Masked() != s || !p.Contains(s) {
					t.Fatalf("%v: bound %s is not a subnet of the pool", p, s)
				}
			}
			if p.SubnetLen <= p.Network.Bits() || p.Min.Addr().Compare(p.Max.Addr()) > 0 {
				t.Fatalf("%v: inconsistent", p)
			}
			if p.count().Sign() <= 0 {
				t.Fatalf("%v: no subnets", p)
			}
			_ = p.String()
		}
	})
}

// Configs that differ only in formatting are Equal; any change is not.
func TestConfigEqual(t *testing.T) {
	parse := func(s string) *Config {
		t.Helper()
		c, _, err := ParseConfig([]byte(s))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	base := parse(`{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","Backend":{"Type":"vxlan","VNI":2}}`)
	same := "{\n  \"Backend\": { \"VNI\": 2, \"Type\": \"vxlan\" },\n  \"IPv6Network\": \"2001:db8::/48\",\n  \"Network\": \"10.100.0.0/16\", \"SubnetLen\": 24\n}"
	if !base.Equal(parse(same)) {
		t.Error("a reformatted config is not Equal")
	}
	for _, other := range []string{
		`{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","Backend":{"Type":"vxlan","VNI":3}}`,
		`{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","Backend":{"Type":"host-gw"}}`,
		`{"Network":"10.100.0.0/17","IPv6Network":"2001:db8::/48","Backend":{"Type":"vxlan","VNI":2}}`,
		`{"Network":"10.100.0.0/16","SubnetMax":"10.100.7.0","IPv6Network":"2001:db8::/48","Backend":{"Type":"vxlan","VNI":2}}`,
		`{"Network":"10.100.0.0/16","Backend":{"Type":"vxlan","VNI":2}}`,
	} {
		if base.Equal(parse(other)) {
			t.Errorf("%s is Equal to the base config", other)
		}
	}
}

// ConfigConflicts names every live lease a change strands, and nothing else.
func TestConfigConflicts(t *testing.T) {
	parse := func(s string) *Config {
		t.Helper()
		c, _, err := ParseConfig([]byte(s))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	old := parse(`{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`)
	recs := map[string]*Record{
		"low":   {Node: "low", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24"), V6: netip.MustParsePrefix("2001:db8:0:1::/64")}, BackendType: "host-gw"},
		"high":  {Node: "high", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.200.0/24"), V6: netip.MustParsePrefix("2001:db8:0:2::/64")}, BackendType: "host-gw"},
		"stale": {Node: "stale", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.99.0.0/24")}, BackendType: "host-gw"},
	}
	tests := []struct {
		name string
		new  string
		want []string // Conflict.String of each, in order
	}{
		{"same", `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`, nil},
		{"wider", `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/32"}`, nil},
		{"narrower network", `{"Network":"10.100.0.0/17","IPv6Network":"2001:db8::/48"}`,
			[]string{"high [10.100.200.0/24]: 10.100.200.0/24: it is outside 10.100.0.0/17"}},
		{"SubnetMax", `{"Network":"10.100.0.0/16","SubnetMax":"10.100.100.0","IPv6Network":"2001:db8::/48"}`,
			[]string{"high [10.100.200.0/24]: 10.100.200.0/24: it is outside 10.100.0.0/24..10.100.100.0/24"}},
		{"SubnetLen", `{"Network":"10.100.0.0/16","SubnetLen":25,"IPv6Network":"2001:db8::/48"}`,
			[]string{"high [10.100.200.0/24]: 10.100.200.0/24: it is a /24, the IPv4 subnets are /25", "low [10.100.1.0/24]: 10.100.1.0/24: it is a /24, the IPv4 subnets are /25"}},
		{"IPv6 disabled", `{"Network":"10.100.0.0/16"}`,
			[]string{"high [2001:db8:0:2::/64]: 2001:db8:0:2::/64: IPv6 is disabled", "low [2001:db8:0:1::/64]: 2001:db8:0:1::/64: IPv6 is disabled"}},
		{"backend", `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","Backend":{"Type":"vxlan"}}`,
			[]string{"high [10.100.200.0/24 2001:db8:0:2::/64]: the host runs the host-gw backend", "low [10.100.1.0/24 2001:db8:0:1::/64]: the host runs", "stale [10.99.0.0/24]: the host runs"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ConfigConflicts(old, parse(tt.new), recs)
			if len(got) != len(tt.want) {
				t.Fatalf("got %v, want %d conflicts %v", got, len(tt.want), tt.want)
			}
			for i, c := range got {
				if !strings.HasPrefix(c.String(), tt.want[i]) {
					t.Errorf("conflict %d = %q, want %q...", i, c, tt.want[i])
				}
			}
		})
	}
	// A host on another backend than the config says blocks only a change
	// of the backend type: its lease is refused as a peer either way.
	recs["odd"] = &Record{Node: "odd", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.3.0/24")}, BackendType: "vxlan"}
	if got := ConfigConflicts(old, parse(`{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/48"}`), recs); len(got) != 0 {
		t.Errorf("a widening blocked by a host on another backend: %v", got)
	}
	delete(recs, "odd")
	// Without an old config every lease outside the new one counts.
	if got := ConfigConflicts(nil, parse(`{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`), recs); len(got) != 1 || got[0].Node != "stale" {
		t.Errorf("no old config: got %v, want stale only", got)
	}
}
