package backend

import (
	"context"
	"github.com/leased/leased/pkg/ipfam"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/leased/leased/internal/testutil"
)

// Tests of ExtIface's per-family links: IPv4 and IPv6 may leave the host
// through different interfaces (each family's default route's).

func TestExtIfaceLink(t *testing.T) {
	mac4 := net.HardwareAddr{2, 0, 0, 0, 0, 4}
	mac6 := net.HardwareAddr{2, 0, 0, 0, 0, 6}
	cases := []struct {
		name         string
		ext          ExtIface
		want4, want6 ExtLink
		split        bool
		mtu          map[string]int // minMTU by enabled families: "4", "6", "46", "" (before Start)
	}{
		{
			name:  "V4 only: IPv6 uses the same link",
			ext:   ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: mac4}},
			want4: ExtLink{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: mac4}, want6: ExtLink{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: mac4},
			mtu: map[string]int{"4": 1500, "6": 1500, "46": 1500, "": 1500},
		},
		{
			name:  "V6.Index equal to V4.Index: the same link",
			ext:   ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500}, V6: ExtLink{Name: "eth0", Index: 2, MTU: 1280}},
			want4: ExtLink{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: nil}, want6: ExtLink{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: nil},
			mtu: map[string]int{"46": 1500},
		},
		{
			name:  "IPv6 on another link",
			ext:   ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: mac4}, V6: ExtLink{Name: "eth1", Index: 3, MTU: 1400, HardwareAddr: mac6}},
			want4: ExtLink{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: mac4}, want6: ExtLink{Name: "eth1", Index: 3, MTU: 1400, HardwareAddr: mac6}, split: true,
			mtu: map[string]int{"4": 1500, "6": 1400, "46": 1400, "": 1400},
		},
		{
			name:  "V6.MTU zero means V4.MTU",
			ext:   ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 9000}, V6: ExtLink{Name: "eth1", Index: 3}},
			want4: ExtLink{Name: "eth0", Index: 2, MTU: 9000, HardwareAddr: nil}, want6: ExtLink{Name: "eth1", Index: 3, MTU: 9000, HardwareAddr: nil}, split: true,
			mtu: map[string]int{"46": 9000},
		},
	}
	locals := map[string]Local{
		"4": {Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24")}}, "6": {Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("fd00:100:1::/64")}},
		"46": localA(), "": {},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.ext.Link(ipfam.IPv4); got.Name != tc.want4.Name || got.Index != tc.want4.Index || got.MTU != tc.want4.MTU || got.HardwareAddr.String() != tc.want4.HardwareAddr.String() {
				t.Errorf("Link(IPv4) = %+v, want %+v", got, tc.want4)
			}
			if got := tc.ext.Link(ipfam.IPv6); got.Name != tc.want6.Name || got.Index != tc.want6.Index || got.MTU != tc.want6.MTU || got.HardwareAddr.String() != tc.want6.HardwareAddr.String() {
				t.Errorf("Link(IPv6) = %+v, want %+v", got, tc.want6)
			}
			if tc.ext.Split() != tc.split {
				t.Errorf("Split() = %v, want %v", tc.ext.Split(), tc.split)
			}
			if err := tc.ext.validate(); err != nil {
				t.Errorf("validate: %v", err)
			}
			for fams, want := range tc.mtu {
				if got := tc.ext.minMTU(locals[fams]); got != want {
					t.Errorf("minMTU(families %q) = %d, want %d", fams, got, want)
				}
			}
		})
	}
}

func TestExtIfaceValidate(t *testing.T) {
	for _, tc := range []struct {
		ext  ExtIface
		want string
	}{
		{ExtIface{V4: ExtLink{Name: "eth0"}}, "needs an index and an MTU"},
		{ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500}, V6: ExtLink{Index: 3}}, "needs a name"},
		{ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500}, V6: ExtLink{Name: "eth1", Index: -1}}, "positive index"},
		{ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500}, V6: ExtLink{Name: "eth1", Index: 3, MTU: -1}}, "MTU"},
	} {
		err := tc.ext.validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("validate(%+v) = %v, want an error saying %q", tc.ext, err, tc.want)
		}
		if _, err := New([]byte(`{}`), tc.ext, "a", Options{}); err == nil {
			t.Errorf("New accepted %+v", tc.ext)
		}
	}
}

// splitExt is eth0 (#2, IPv4, MTU 1500) and eth1 (#3, IPv6, MTU 1400).
func splitExt() ExtIface {
	return ExtIface{
		V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500, Addr: netip.MustParseAddr("192.168.77.2"), Public: netip.MustParseAddr("192.168.77.2")}, V6: ExtLink{Name: "eth1", Index: 3, MTU: 1400, Addr: netip.MustParseAddr("2001:db8:88::2"), Public: netip.MustParseAddr("2001:db8:88::2")},
	}
}

func TestVXLANUnderlayPerFamily(t *testing.T) {
	cfg, err := parseConfig([]byte(`{"Type":"vxlan"}`))
	if err != nil {
		t.Fatal(err)
	}
	v := newVXLAN(cfg, splitExt(), "a")
	if d := v.devs[0]; d.underlay6 || d.underIndex != 2 || d.mtu != 1500-50 || d.src != splitExt().V4.Addr {
		t.Errorf("%s: underlay6 %v on #%d mtu %d src %s, want IPv4 on #2 mtu 1450 src 192.168.77.2", d.name, d.underlay6, d.underIndex, d.mtu, d.src)
	}
	if d := v.devs[1]; !d.underlay6 || d.underIndex != 3 || d.mtu != 1400-70 || d.src != splitExt().V6.Addr {
		t.Errorf("%s: underlay6 %v on #%d mtu %d src %s, want IPv6 on #3 mtu 1330 src 2001:db8:88::2", d.name, d.underlay6, d.underIndex, d.mtu, d.src)
	}
	if got := v.mtu(localA()); got != 1330 {
		t.Errorf("MTU with both overlays = %d, want 1330 (the smaller device's)", got)
	}
	if got := v.mtu(Local{Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24")}}); got != 1450 {
		t.Errorf("MTU with the IPv4 overlay only = %d, want 1450", got)
	}

	// Without an IPv6 address the IPv6 overlay borrows the IPv4 underlay,
	// and with it the IPv4 link.
	ext := splitExt()
	ext.V6.Addr = netip.Addr{}
	v = newVXLAN(cfg, ext, "a")
	if d := v.devs[1]; d.underlay6 || d.underIndex != 2 || d.mtu != 1450 {
		t.Errorf("%s without an IPv6 address: underlay6 %v on #%d mtu %d, want IPv4 on #2 mtu 1450", d.name, d.underlay6, d.underIndex, d.mtu)
	}
}

func TestProxyNDPAnswersOnIPv6Link(t *testing.T) {
	cfg, err := parseConfig([]byte(`{"Type":"proxy-ndp"}`))
	if err != nil {
		t.Fatal(err)
	}
	k := newFakeKernel()
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 3}
	k.addLink(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "eth1", Index: 3, MTU: 1400, HardwareAddr: mac}}, "2001:db8:88::2/64", "fe80::3/64")
	b, err := newProxyNDP(newEngine(TypeProxyNDP, splitExt(), Options{}, k, hostGW{}), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	if err := b.Answer(Local{Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8:88:0:8000::/80")}, Network: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8:88:0:8000::/65")}}); err != nil {
		t.Fatal(err)
	}
	if len(k.conns) != 1 || k.conns[0].ifname != "eth1" || k.conns[0].ifindex != 3 {
		t.Fatalf("packet sockets %+v, want one on eth1 #3 (the IPv6 link)", k.conns)
	}
}

// With the fake kernel: each family's routes go out of its own link, and a
// peer is on-link only on the prefixes of its family's link.
func TestHostGWRoutesPerFamilyLink(t *testing.T) {
	k := newFakeKernel()
	k.addrs[2] = []netip.Prefix{netip.MustParsePrefix("192.168.77.2/24"), netip.MustParsePrefix("2001:db8:77::2/64")}
	k.addrs[3] = []netip.Prefix{netip.MustParsePrefix("2001:db8:88::2/64"), netip.MustParsePrefix("192.168.88.2/24")}
	e := newEngine(TypeHostGW, splitExt(), Options{}, k, hostGW{})
	if err := e.Start(context.Background(), localA()); err != nil { // the fake kernel: no sysctl or rule of this host changes
		t.Fatal(err)
	}
	if err := e.SetPeers(context.Background(), splitPeers()); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(k.dump(), "\n")
	want := strings.Join([]string{
		"10.100.2.0/24 via 192.168.77.3 dev 2 proto 76",
		"10.100.3.0/24 via 192.168.77.4 dev 2 proto 76",
		"fd00:100:2::/64 via 2001:db8:88::3 dev 3 proto 76",
	}, "\n")
	if got != want {
		t.Errorf("routes:\n%s\nwant:\n%s", got, want)
	}
	if m := e.MTU(); m != 1400 {
		t.Errorf("MTU() = %d, want 1400 (the smaller of the two links)", m)
	}
}

// splitPeers: b is on-link for both families (IPv6 on eth1's prefix); c's
// IPv6 address is on eth0's IPv6 prefix, which is not the IPv6 link's, so
// its IPv6 subnet is skipped; d's IPv4 address is on eth1's IPv4 prefix,
// which is not the IPv4 link's.
func splitPeers() []Peer {
	return []Peer{
		{
			Node:     "b",
			Subnet:   ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.2.0/24"), V6: netip.MustParsePrefix("fd00:100:2::/64")},
			PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.77.3"), V6: netip.MustParseAddr("2001:db8:88::3")},
		},
		{
			Node:     "c",
			Subnet:   ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.3.0/24"), V6: netip.MustParsePrefix("fd00:100:3::/64")},
			PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.77.4"), V6: netip.MustParseAddr("2001:db8:77::4")},
		},
		{
			Node:     "d",
			Subnet:   ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.4.0/24")},
			PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.168.88.5")},
		},
	}
}

// The same in a real namespace: eth0 carries IPv4 (and an IPv6 prefix
// that is not the IPv6 link's), eth1 (MTU 1400) carries IPv6.
func TestHostGWIPv6LinkKernel(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.NewNS(t, "hgw6")
	for _, c := range [][]string{
		{"link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"},
		{"link", "add", "eth1", "mtu", "1400", "type", "veth", "peer", "name", "eth1p", "mtu", "1400"},
		{"link", "set", "eth0p", "up"}, {"link", "set", "eth1p", "up"},
		{"link", "set", "eth0", "up"}, {"link", "set", "eth1", "up"},
		{"addr", "add", "192.168.77.2/24", "dev", "eth0"},
		{"addr", "add", "2001:db8:77::2/64", "dev", "eth0", "nodad"},
		{"addr", "add", "192.168.88.2/24", "dev", "eth1"},
		{"addr", "add", "2001:db8:88::2/64", "dev", "eth1", "nodad"},
	} {
		testutil.Run(t, append([]string{"ip", "-n", ns}, c...)...)
	}
	h := testutil.NSHandle(t, ns)
	ext := extOf(t, h, "eth0", "192.168.77.2", "")
	l6 := extOf(t, h, "eth1", "", "2001:db8:88::2")
	ext.V6.Name, ext.V6.Index, ext.V6.MTU, ext.V6.HardwareAddr = l6.V4.Name, l6.V4.Index, l6.V4.MTU, l6.V4.HardwareAddr
	ext.V6.Addr, ext.V6.Public = l6.V6.Addr, l6.V6.Public

	ctx := context.Background()
	b := mustNew(t, `{"Type":"host-gw"}`, ext, "a", ns, Options{})
	if m := b.MTU(); m != 1400 {
		t.Errorf("MTU() before Start = %d, want 1400 (eth1's, the smaller)", m)
	}
	if err := b.SetPeers(ctx, splitPeers()); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	assertSteady(t, b)
	rs := ourRoutes(t, h)
	for dst, want := range map[string]struct {
		gw   string
		link int
	}{
		"10.100.2.0/24":   {"192.168.77.3", ext.V4.Index},
		"10.100.3.0/24":   {"192.168.77.4", ext.V4.Index},
		"fd00:100:2::/64": {"2001:db8:88::3", ext.V6.Index},
	} {
		r, ok := rs[dst]
		if !ok {
			t.Errorf("no route to %s", dst)
			continue
		}
		if r.Gw.String() != want.gw || r.LinkIndex != want.link {
			t.Errorf("route %s = via %s dev#%d, want via %s dev#%d", dst, r.Gw, r.LinkIndex, want.gw, want.link)
		}
	}
	if len(rs) != 3 {
		t.Errorf("routes %v, want only the three above (c's IPv6 and d's IPv4 are not on-link on their family's link)", rs)
	}
	if ra := testutil.RunIn(t, ns, "sysctl", "-n", "net.ipv6.conf.eth1.accept_ra"); strings.TrimSpace(ra) != "2" {
		t.Errorf("eth1 accept_ra = %s, want 2 (raised from 1 on the IPv6 link when forwarding)", strings.TrimSpace(ra))
	}
}
