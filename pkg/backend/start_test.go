package backend

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/backend/ndp"
	"github.com/leased/leased/pkg/backend/vtep"
)

// links renders the links the backend created (index ≥ 100), sorted by
// name, e.g. "leased.4 vxlan vni 1 port 8472 mtu 1450 up 10.100.1.0/32".
func (f *fakeKernel) linkDump() []string {
	var out []string
	for idx, l := range f.links {
		if idx < 100 {
			continue
		}
		a := l.Attrs()
		s := a.Name + " " + l.Type()
		if vx, ok := l.(*netlink.Vxlan); ok {
			s += fmt.Sprintf(" vni %d port %d local %s dev %d", vx.VxlanId, vx.Port, vx.SrcAddr, vx.VtepDevIndex)
		}
		s += fmt.Sprintf(" mtu %d mac %s", a.MTU, a.HardwareAddr)
		if a.Flags&net.FlagUp != 0 {
			s += " up"
		}
		for _, p := range f.addrs[idx] {
			s += " " + p.String()
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// neighDump renders the neighbour and FDB entries, sorted.
func (f *fakeKernel) neighDump() []string {
	var out []string
	for _, n := range f.neighs {
		if n.Family == unix.AF_BRIDGE {
			out = append(out, fmt.Sprintf("fdb %s dst %s dev %d", n.HardwareAddr, n.IP, n.LinkIndex))
		} else {
			out = append(out, fmt.Sprintf("neigh %s lladdr %s dev %d", n.IP, n.HardwareAddr, n.LinkIndex))
		}
	}
	slices.Sort(out)
	return out
}

func vxPeer(node, sub4, gw4, sub6, gw6 string) Peer {
	p := gwPeer(node, sub4, gw4, sub6, gw6)
	p.BackendType, p.BackendData = TypeVXLAN, json.RawMessage(vtep.Data(node))
	return p
}

// Fake-kernel hosts: eth0 (#2) on 192.168.77.0/24 and 2001:db8:77::/64
// for host-gw and vxlan, on 2001:db8:ab11::/64 for proxy-ndp.
var (
	fakeMAC = net.HardwareAddr{2, 0, 0, 0, 0, 0x11}
	fakeExt = ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: fakeMAC, Addr: netip.MustParseAddr("192.168.77.2"), Public: netip.MustParseAddr("192.168.77.2")}, V6: ExtLink{Addr: netip.MustParseAddr("2001:db8:77::2"), Public: netip.MustParseAddr("2001:db8:77::2")}}
	ndpExt  = ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: fakeMAC}, V6: ExtLink{Addr: netip.MustParseAddr("2001:db8:ab11::11"), Public: netip.MustParseAddr("2001:db8:ab11::11")}}
)

// Start, a first peer set and a changed one of each backend type run
// against the fake kernel: the sysctls, iptables rules, devices, routes and
// neighbour entries they leave, and what Run subscribes to.
func TestStartOnFakeKernel(t *testing.T) {
	fwd4 := []string{
		`filter -A FORWARD -m comment --comment "leased: jump to LEASED-FWD" -j LEASED-FWD`,
		`filter -A LEASED-FWD -s 10.100.1.0/24 -d 10.100.1.0/24 -m comment --comment "leased: traffic within this host subnet is left to Docker rules" -j RETURN`,
		`filter -A LEASED-FWD -s 10.100.0.0/16 -m comment --comment "leased: from the cluster network" -j ACCEPT`,
		`filter -A LEASED-FWD -d 10.100.0.0/16 -m comment --comment "leased: to the cluster network" -j ACCEPT`,
	}
	masq4 := []string{
		`nat -A LEASED-POSTRTG -s 10.100.1.0/24 -d 10.100.0.0/16 -m comment --comment "leased: no NAT inside the cluster network" -j RETURN`,
		`nat -A LEASED-POSTRTG -s 10.100.1.0/24 -d 224.0.0.0/4 -m comment --comment "leased: no NAT for multicast" -j RETURN`,
		`nat -A LEASED-POSTRTG -s 10.100.1.0/24 -m comment --comment "leased: NAT leaving the cluster network" -j MASQUERADE`,
		`nat -A POSTROUTING -m comment --comment "leased: jump to LEASED-POSTRTG" -j LEASED-POSTRTG`,
	}
	fwd6 := func(network string) []string {
		return []string{
			`filter -A FORWARD -m comment --comment "leased: jump to LEASED-FWD" -j LEASED-FWD`,
			`filter -A LEASED-FWD -s ` + network + ` -m comment --comment "leased: from the cluster network" -j ACCEPT`,
			`filter -A LEASED-FWD -d ` + network + ` -m comment --comment "leased: to the cluster network" -j ACCEPT`,
		}
	}
	ndpLocal := Local{Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8:ab11:0:8000::/80")}, Network: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8:ab11:0:8000::/65")}}
	cases := []struct {
		name   string
		raw    string
		ext    ExtIface
		opts   Options
		addrs  []string // on eth0
		local  Local
		peers  []Peer // the first set
		update []Peer // the changed set

		sysctls      map[string]string
		ipt4, ipt6   []string
		links        []string
		routes       []string // after the first set
		routesAfter  []string // after the changed set
		neighsAfter  []string
		answersSlice bool // proxy-ndp: a packet socket on eth0 answers for local.Subnet.V6
	}{
		{
			name: "host-gw dual-stack with --ip-masq", raw: `{"Type":"host-gw"}`, ext: fakeExt, opts: Options{IPMasq: true},
			addrs: []string{"192.168.77.2/24", "2001:db8:77::2/64"}, local: localA(),
			peers: []Peer{
				gwPeer("b", "10.100.2.0/24", "192.168.77.3", "fd00:100:2::/64", "2001:db8:77::3"),
				gwPeer("c", "10.100.3.0/24", "192.168.77.4", "", ""),
			},
			update: []Peer{
				gwPeer("b", "10.100.2.0/24", "192.168.77.30", "fd00:100:2::/64", "2001:db8:77::3"), // moved
				gwPeer("d", "10.100.4.0/24", "192.168.77.5", "", ""),                               // new; c left
			},
			sysctls: map[string]string{"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1", "net/ipv6/conf/eth0/accept_ra": "2"},
			ipt4:    append(slices.Clone(fwd4), masq4...),
			ipt6: append(fwd6("fd00:100::/32"),
				`nat -A LEASED-POSTRTG -s fd00:100:1::/64 -d fd00:100::/32 -m comment --comment "leased: no NAT inside the cluster network" -j RETURN`,
				`nat -A LEASED-POSTRTG -s fd00:100:1::/64 -d ff00::/8 -m comment --comment "leased: no NAT for multicast" -j RETURN`,
				`nat -A LEASED-POSTRTG -s fd00:100:1::/64 -m comment --comment "leased: NAT leaving the cluster network" -j MASQUERADE`,
				`nat -A POSTROUTING -m comment --comment "leased: jump to LEASED-POSTRTG" -j LEASED-POSTRTG`),
			routes: []string{
				"10.100.2.0/24 via 192.168.77.3 dev 2 proto 76", "10.100.3.0/24 via 192.168.77.4 dev 2 proto 76",
				"fd00:100:2::/64 via 2001:db8:77::3 dev 2 proto 76",
			},
			routesAfter: []string{
				"10.100.2.0/24 via 192.168.77.30 dev 2 proto 76", "10.100.4.0/24 via 192.168.77.5 dev 2 proto 76",
				"fd00:100:2::/64 via 2001:db8:77::3 dev 2 proto 76",
			},
		},
		{
			name: "host-gw IPv4 only, --iptables-forward-rules=false", raw: `{"Type":"host-gw"}`, ext: fakeExt, opts: Options{NoForwardRules: true},
			addrs: []string{"192.168.77.2/24"},
			local: Local{Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24")}, Network: ipfam.Pair[netip.Prefix]{V4: net4}},
			peers: []Peer{gwPeer("b", "10.100.2.0/24", "192.168.77.3", "", "")},
			// b leaves.
			sysctls:     map[string]string{"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "0", "net/ipv6/conf/eth0/accept_ra": "1"},
			routes:      []string{"10.100.2.0/24 via 192.168.77.3 dev 2 proto 76"},
			routesAfter: nil,
		},
		{
			name: "vxlan dual-stack", raw: `{"Type":"vxlan"}`, ext: fakeExt,
			addrs: []string{"192.168.77.2/24", "2001:db8:77::2/64"}, local: localA(),
			peers: []Peer{vxPeer("b", "10.100.2.0/24", "192.168.77.3", "fd00:100:2::/64", "2001:db8:77::3")},
			update: []Peer{
				vxPeer("b", "10.100.2.0/24", "192.168.77.3", "fd00:100:2::/64", "2001:db8:77::3"),
				vxPeer("c", "10.100.3.0/24", "192.168.88.4", "", ""), // behind a router: fine for vxlan
			},
			sysctls: map[string]string{"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1", "net/ipv6/conf/eth0/accept_ra": "2"},
			ipt4:    fwd4,
			ipt6:    fwd6("fd00:100::/32"),
			links: []string{
				fmt.Sprintf("leased.4 vxlan vni 1 port 8472 local 192.168.77.2 dev 2 mtu 1450 mac %s up 10.100.1.0/32", vtep.MAC("a", false)),
				fmt.Sprintf("leased.6 vxlan vni 1 port 8472 local 2001:db8:77::2 dev 2 mtu 1430 mac %s up fd00:100:1::/128", vtep.MAC("a", true)),
			},
			routes: []string{"10.100.2.0/24 via 10.100.2.0 dev 100 proto 76", "fd00:100:2::/64 via fd00:100:2:: dev 101 proto 76"},
			routesAfter: []string{
				"10.100.2.0/24 via 10.100.2.0 dev 100 proto 76", "10.100.3.0/24 via 10.100.3.0 dev 100 proto 76",
				"fd00:100:2::/64 via fd00:100:2:: dev 101 proto 76",
			},
			neighsAfter: []string{
				fmt.Sprintf("fdb %s dst 192.168.77.3 dev 100", vtep.MAC("b", false)),
				fmt.Sprintf("fdb %s dst 192.168.88.4 dev 100", vtep.MAC("c", false)),
				fmt.Sprintf("fdb %s dst 2001:db8:77::3 dev 101", vtep.MAC("b", true)),
				fmt.Sprintf("neigh 10.100.2.0 lladdr %s dev 100", vtep.MAC("b", false)),
				fmt.Sprintf("neigh 10.100.3.0 lladdr %s dev 100", vtep.MAC("c", false)),
				fmt.Sprintf("neigh fd00:100:2:: lladdr %s dev 101", vtep.MAC("b", true)),
			},
		},
		{
			name: "proxy-ndp", raw: `{"Type":"proxy-ndp"}`, ext: ndpExt,
			addrs: []string{"2001:db8:ab11::11/64", "fe80::11/64"}, local: ndpLocal,
			peers:        []Peer{gwPeer("b", "", "", "2001:db8:ab11:0:8001::/80", "2001:db8:ab11::12")},
			update:       []Peer{gwPeer("b", "", "", "2001:db8:ab11:0:8001::/80", "2001:db8:ab11::13")},
			sysctls:      map[string]string{"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "1", "net/ipv6/conf/eth0/accept_ra": "2"},
			ipt6:         fwd6("2001:db8:ab11:0:8000::/65"),
			routes:       []string{"2001:db8:ab11:0:8001::/80 via 2001:db8:ab11::12 dev 2 proto 76"},
			routesAfter:  []string{"2001:db8:ab11:0:8001::/80 via 2001:db8:ab11::13 dev 2 proto 76"},
			answersSlice: true,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			k := newFakeKernel()
			k.sysctl["net/ipv6/conf/eth0/accept_ra"] = "1"
			k.addLink(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: fakeMAC, Flags: net.FlagUp}}, tc.addrs...)
			cfg, err := parseConfig([]byte(tc.raw))
			if err != nil {
				t.Fatal(err)
			}
			dp, err := datapathFor(cfg, tc.ext, tc.local.Node)
			if err != nil {
				t.Fatal(err)
			}
			b, err := assemble(cfg, tc.ext, tc.opts, k, dp)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { b.(Closer).Close() })
			ctx := context.Background()
			if err := b.Start(ctx, tc.local); err != nil {
				t.Fatalf("Start: %v", err)
			}
			for name, want := range tc.sysctls {
				if got := k.sysctl[name]; got != want {
					t.Errorf("sysctl %s = %s, want %s", name, got, want)
				}
			}
			check := func(what string, got, want []string) {
				t.Helper()
				if !slices.Equal(got, want) {
					t.Errorf("%s:\n%s\nwant:\n%s", what, strings.Join(got, "\n"), strings.Join(want, "\n"))
				}
			}
			check("iptables", k.ipt[0].dump(), tc.ipt4)
			check("ip6tables", k.ipt[1].dump(), tc.ipt6)
			check("devices", k.linkDump(), tc.links)
			if len(k.routes) != 0 {
				t.Errorf("Start installed routes before the peer set: %v", k.dump())
			}

			if err := b.SetPeers(ctx, tc.peers); err != nil {
				t.Fatalf("SetPeers: %v", err)
			}
			check("routes", k.dump(), tc.routes)
			if err := b.SetPeers(ctx, tc.update); err != nil {
				t.Fatalf("SetPeers (changed): %v", err)
			}
			check("routes after the change", k.dump(), tc.routesAfter)
			want := slices.Clone(tc.neighsAfter)
			slices.Sort(want)
			check("neighbour and FDB entries after the change", k.neighDump(), want)

			// A second Start changes nothing.
			calls, ipt := k.calls, k.ipt[0].calls+k.ipt[1].calls
			if err := b.Start(ctx, tc.local); err != nil {
				t.Fatalf("second Start: %v", err)
			}
			if k.calls != calls || k.ipt[0].calls+k.ipt[1].calls != ipt {
				t.Errorf("a second Start made %d kernel and %d iptables changes, want none", k.calls-calls, k.ipt[0].calls+k.ipt[1].calls-ipt)
			}

			if tc.answersSlice {
				checkAnswers(t, k, tc.local.Subnet.V6)
			} else if len(k.conns) != 0 {
				t.Errorf("%d packet sockets opened, want none", len(k.conns))
			}

			// Run listens to route, link and neighbour events.
			rctx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() { done <- b.Run(rctx) }()
			deadline := time.Now().Add(30 * time.Second)
			for {
				k.host.Lock()
				n := len(k.subs)
				k.host.Unlock()
				if n == 3 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("Run subscribed to %v, want route, link and neighbour events", k.subs)
				}
				time.Sleep(10 * time.Millisecond)
			}
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run = %v", err)
			}
		})
	}
}

// checkAnswers checks that proxy-ndp's packet socket sits on eth0, lets
// only solicitations for slice through, and answers one with eth0's MAC.
func checkAnswers(t *testing.T, k *fakeKernel, slice netip.Prefix) {
	t.Helper()
	k.host.Lock()
	conns := slices.Clone(k.conns)
	k.host.Unlock()
	if len(conns) != 1 || conns[0].ifname != "eth0" || conns[0].ifindex != 2 {
		t.Fatalf("packet sockets %+v, want one on eth0 #2", conns)
	}
	c := conns[0]
	in, out := slice.Addr().Next(), netip.MustParseAddr("2001:db8:ab11:0:8001::5")
	if !c.passes(testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, in, true)) {
		t.Errorf("the socket's filter drops a solicitation for %s, in the slice", in)
	}
	if c.passes(testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, out, true)) {
		t.Errorf("the socket's filter passes a solicitation for %s, outside the slice", out)
	}
	c.in <- testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, in, true)
	deadline := time.Now().Add(30 * time.Second)
	for {
		c.mu.Lock()
		n := len(c.out)
		c.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no advertisement written for a solicitation in the slice")
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.mu.Lock()
	na := c.out[0]
	c.mu.Unlock()
	// Ethernet source and the target link-layer option: eth0's MAC.
	if !slices.Equal(na[6:12], fakeMAC) || !slices.Equal(na[len(na)-6:], fakeMAC) || na[14+40] != 136 {
		t.Errorf("answer % x: want a neighbour advertisement from and for %s", na, fakeMAC)
	}
	var _ ndp.PacketConn = c
}

// Check, against the fake kernel, finds nothing after Start and SetPeers of
// vxlan, and names a deleted route, a deleted FDB entry and a device with
// the wrong VNI.
func TestCheckOnFakeKernel(t *testing.T) {
	k := newFakeKernel()
	k.addLink(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: fakeMAC, Flags: net.FlagUp}}, "192.168.77.2/24")
	cfg, err := parseConfig([]byte(`{"Type":"vxlan"}`))
	if err != nil {
		t.Fatal(err)
	}
	ext := fakeExt
	ext.V6.Addr, ext.V6.Public = netip.Addr{}, netip.Addr{}
	local := Local{Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24")}, Network: ipfam.Pair[netip.Prefix]{V4: net4}}
	peers := []Peer{vxPeer("b", "10.100.2.0/24", "192.168.77.3", "", "")}
	newB := func() Backend {
		dp, err := datapathFor(cfg, ext, "a")
		if err != nil {
			t.Fatal(err)
		}
		b, err := assemble(cfg, ext, Options{}, k, dp)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	b := newB()
	if err := b.Start(context.Background(), local); err != nil {
		t.Fatal(err)
	}
	if err := b.SetPeers(context.Background(), peers); err != nil {
		t.Fatal(err)
	}
	d, err := Check(context.Background(), newB(), local, peers)
	if err != nil || !d.Empty() {
		t.Fatalf("Check after Start = %+v, %v; want no drift", d, err)
	}
	for id, r := range k.routes {
		if r.Protocol == RouteProtocol {
			delete(k.routes, id)
		}
	}
	for id, n := range k.neighs {
		if n.Family == unix.AF_BRIDGE {
			delete(k.neighs, id)
		}
	}
	l, _ := k.LinkByName(VXLANDev4)
	l.(*netlink.Vxlan).VxlanId = 7
	d, err = Check(context.Background(), newB(), local, peers)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(append(d.Missing, d.Extra...), "\n")
	for _, want := range []string{"route 10.100.2.0/24", "fdb ", "device leased.4 (VNI 7, want 1)"} {
		if !strings.Contains(got, want) {
			t.Errorf("drift:\n%s\nlacks %q", got, want)
		}
	}
}

// teardown on the fake kernel removes what Start and SetPeers of vxlan with
// --ip-masq created — routes, devices, both families' chains and jumps —
// and leaves a foreign route, a foreign rule and the sysctls alone.
func TestTeardownOnFakeKernel(t *testing.T) {
	k := newFakeKernel()
	k.addLink(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: fakeMAC, Flags: net.FlagUp}}, "192.168.77.2/24", "2001:db8:77::2/64")
	foreign := fakeRoute("10.100.9.0/24", "192.168.77.9", unix.RTPROT_STATIC)
	k.routes[routeID(&foreign)] = foreign
	if err := k.ipt[0].Append("filter", "FORWARD", "-j", "DROP"); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseConfig([]byte(`{"Type":"vxlan"}`))
	if err != nil {
		t.Fatal(err)
	}
	dp, err := datapathFor(cfg, fakeExt, "a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := assemble(cfg, fakeExt, Options{IPMasq: true}, k, dp)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(context.Background(), localA()); err != nil {
		t.Fatal(err)
	}
	if err := b.SetPeers(context.Background(), []Peer{vxPeer("b", "10.100.2.0/24", "192.168.77.3", "fd00:100:2::/64", "2001:db8:77::3")}); err != nil {
		t.Fatal(err)
	}
	removed, err := teardown(k)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("removed:\n%s", strings.Join(removed, "\n"))
	if got, want := k.dump(), []string{"10.100.9.0/24 via 192.168.77.9 dev 2 proto 4"}; !slices.Equal(got, want) {
		t.Errorf("routes after teardown: %v, want %v", got, want)
	}
	if l := k.linkDump(); len(l) != 0 {
		t.Errorf("devices after teardown: %v", l)
	}
	if got, want := k.ipt[0].dump(), []string{"filter -A FORWARD -j DROP"}; !slices.Equal(got, want) {
		t.Errorf("iptables after teardown: %v, want %v", got, want)
	}
	if got := k.ipt[1].dump(); len(got) != 0 {
		t.Errorf("ip6tables after teardown: %v", got)
	}
	if k.sysctl["net/ipv4/ip_forward"] != "1" {
		t.Error("teardown changed ip_forward")
	}
	if again, err := teardown(k); err != nil || len(again) != 0 {
		t.Errorf("second teardown = %v, %v; want nothing", again, err)
	}
}

// hostRoutes on the fake kernel: a LAN and a bridge inside the network
// count (the bridge's as Own), the local address inside the LAN adds
// nothing, and routes via a gateway, leased's own and one covering the
// whole network are left out.
func TestHostRoutesOnFakeKernel(t *testing.T) {
	k := newFakeKernel()
	k.addLink(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "eth1", Index: 3}})
	k.addLink(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "docker0", Index: 4}})
	add := func(dst string, table int, typ int, link int, gw string, proto netlink.RouteProtocol) {
		r := fakeRoute(dst, gw, proto)
		r.Table, r.Type, r.LinkIndex = table, typ, link
		if gw == "" {
			r.Gw = nil
		}
		k.routes[routeID(&r)] = r
	}
	add("10.100.5.0/24", unix.RT_TABLE_MAIN, unix.RTN_UNICAST, 3, "", unix.RTPROT_KERNEL)
	add("10.100.5.7/32", unix.RT_TABLE_LOCAL, unix.RTN_LOCAL, 3, "", unix.RTPROT_KERNEL)
	add("10.100.1.0/24", unix.RT_TABLE_MAIN, unix.RTN_UNICAST, 4, "", unix.RTPROT_KERNEL)
	add("10.100.8.0/24", unix.RT_TABLE_MAIN, unix.RTN_UNICAST, 3, "10.100.5.1", unix.RTPROT_STATIC)
	add("10.100.9.0/24", unix.RT_TABLE_MAIN, unix.RTN_UNICAST, 3, "", RouteProtocol)
	add("10.0.0.0/8", unix.RT_TABLE_MAIN, unix.RTN_UNICAST, 3, "", unix.RTPROT_STATIC)
	rs, err := hostRoutes(k, net4, net6)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range rs {
		got = append(got, fmt.Sprintf("%s own=%v (%s)", r.Dst, r.Own, r.Desc))
	}
	slices.Sort(got)
	want := []string{
		"10.100.1.0/24 own=true (10.100.1.0/24 dev docker0 proto kernel)",
		"10.100.5.0/24 own=false (10.100.5.0/24 dev eth1 proto kernel)",
	}
	if !slices.Equal(got, want) {
		t.Errorf("host routes:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// Check of proxy-ndp on the fake kernel: with no packet socket on the
// uplink the answers are missing, and a kernel proxy entry for an address
// of the cluster network is extra (one outside it is not leased's concern).
func TestCheckProxyNDPOnFakeKernel(t *testing.T) {
	k := newFakeKernel()
	k.addLink(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "eth0", Index: 2, MTU: 1500, HardwareAddr: fakeMAC, Flags: net.FlagUp}}, "2001:db8:ab11::11/64")
	k.proxies = []netlink.Neigh{
		{LinkIndex: 2, Family: unix.AF_INET6, IP: net.ParseIP("2001:db8:ab11:0:8000::9")},
		{LinkIndex: 2, Family: unix.AF_INET6, IP: net.ParseIP("2001:db8:ab11::99")},
	}
	cfg, err := parseConfig([]byte(`{"Type":"proxy-ndp"}`))
	if err != nil {
		t.Fatal(err)
	}
	dp, err := datapathFor(cfg, ndpExt, "a")
	if err != nil {
		t.Fatal(err)
	}
	local := Local{Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8:ab11:0:8000::/80")}, Network: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8:ab11:0:8000::/65")}}
	b, err := assemble(cfg, ndpExt, Options{}, k, dp)
	if err != nil {
		t.Fatal(err)
	}
	d, err := Check(context.Background(), b, local, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Missing) != 1 || !strings.HasPrefix(d.Missing[0], "ndp answers for 2001:db8:ab11:0:8000::/80 on eth0") {
		t.Errorf("missing = %q, want the answers on eth0", d.Missing)
	}
	if len(d.Extra) != 1 || !strings.HasPrefix(d.Extra[0], "ndp proxy entry 2001:db8:ab11:0:8000::9 dev eth0") {
		t.Errorf("extra = %q, want the proxy entry inside the network only", d.Extra)
	}
}
