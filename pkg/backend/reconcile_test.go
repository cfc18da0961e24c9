package backend

import (
	"context"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

type netIPNet = net.IPNet

func cidrMask(p netip.Prefix) net.IPMask { return net.CIDRMask(p.Bits(), p.Addr().BitLen()) }

func fakeRoute(dst, gw string, proto netlink.RouteProtocol) netlink.Route {
	_, n, _ := net.ParseCIDR(dst)
	r := netlink.Route{Dst: n, Gw: net.ParseIP(gw), LinkIndex: 2, Protocol: proto, Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST}
	if n.IP.To4() == nil {
		r.Priority = 1024
	}
	return r
}

func gwPeer(node, sub4, gw4, sub6, gw6 string) Peer {
	p := Peer{Node: node}
	if sub4 != "" {
		p.Subnet.V4, p.PublicIP.V4 = netip.MustParsePrefix(sub4), netip.MustParseAddr(gw4)
	}
	if sub6 != "" {
		p.Subnet.V6, p.PublicIP.V6 = netip.MustParsePrefix(sub6), netip.MustParseAddr(gw6)
	}
	return p
}

// TestReconcileTable runs host-gw passes on the fake kernel: each case from
// its own starting state, then all cases one after another in random order
// to show that any state reaches any other.
func TestReconcileTable(t *testing.T) {
	foreign := fakeRoute("10.100.9.0/24", "192.168.77.9", unix.RTPROT_STATIC)
	cases := []struct {
		name  string
		peers []Peer
		start []netlink.Route
		want  []string
	}{
		{name: "no peers, stale route removed, foreign kept",
			start: []netlink.Route{fakeRoute("10.100.4.0/24", "192.168.77.4", RouteProtocol)},
			want:  []string{"10.100.9.0/24 via 192.168.77.9 dev 2 proto 4"}},
		{name: "dual-stack peer",
			peers: []Peer{gwPeer("b", "10.100.2.0/24", "192.168.77.3", "fd00:100:2::/64", "2001:db8:77::3")},
			want: []string{"10.100.2.0/24 via 192.168.77.3 dev 2 proto 76", "10.100.9.0/24 via 192.168.77.9 dev 2 proto 4",
				"fd00:100:2::/64 via 2001:db8:77::3 dev 2 proto 76"}},
		{name: "gateway moved",
			peers: []Peer{gwPeer("b", "10.100.2.0/24", "192.168.77.30", "", "")},
			start: []netlink.Route{fakeRoute("10.100.2.0/24", "192.168.77.3", RouteProtocol)},
			want:  []string{"10.100.2.0/24 via 192.168.77.30 dev 2 proto 76", "10.100.9.0/24 via 192.168.77.9 dev 2 proto 4"}},
		{name: "off-link, outside the network, own subnet and own node skipped",
			peers: []Peer{
				gwPeer("far", "10.100.3.0/24", "10.9.9.9", "", ""),
				gwPeer("alien", "10.200.3.0/24", "192.168.77.5", "", ""),
				gwPeer("thief", "10.100.1.0/25", "192.168.77.6", "", ""),
				gwPeer("a", "10.100.7.0/24", "192.168.77.7", "", ""),
				gwPeer("c", "10.100.5.0/24", "192.168.77.5", "", ""),
			},
			want: []string{"10.100.5.0/24 via 192.168.77.5 dev 2 proto 76", "10.100.9.0/24 via 192.168.77.9 dev 2 proto 4"}},
	}
	newFake := func() *fakeKernel {
		k := newFakeKernel()
		k.addrs[2] = []netip.Prefix{netip.MustParsePrefix("192.168.77.2/24"), netip.MustParsePrefix("2001:db8:77::2/64")}
		k.routes[routeID(&foreign)] = foreign
		return k
	}
	ext := ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500}}
	run := func(t *testing.T, e *engine, k *fakeKernel, peers []Peer, want []string) {
		t.Helper()
		if err := e.SetPeers(context.Background(), peers); err != nil {
			t.Fatal(err)
		}
		if got := k.dump(); !slices.Equal(got, want) {
			t.Fatalf("kernel routes:\n got %q\nwant %q", got, want)
		}
		calls := k.calls
		if err := e.SetPeers(context.Background(), peers); err != nil {
			t.Fatal(err)
		}
		if k.calls != calls {
			t.Fatalf("a repeated pass made %d kernel calls, want 0", k.calls-calls)
		}
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			k := newFake()
			for _, r := range tc.start {
				k.routes[routeID(&r)] = r
			}
			e := newEngine(TypeHostGW, ext, Options{}, k, hostGW{})
			e.started, e.local = true, localA()
			run(t, e, k, tc.peers, tc.want)
		})
	}
	k := newFake()
	e := newEngine(TypeHostGW, ext, Options{}, k, hostGW{})
	e.started, e.local = true, localA()
	for range 20 {
		for _, i := range rand.Perm(len(cases)) {
			run(t, e, k, cases[i].peers, cases[i].want)
		}
	}
}

// TestReconcileKeepsGoing checks that one failing route neither blocks the
// others nor is forgotten: the error is returned and the next pass retries.
func TestReconcileKeepsGoing(t *testing.T) {
	k := newFakeKernel()
	k.addrs[2] = []netip.Prefix{netip.MustParsePrefix("192.168.77.2/24")}
	k.failRoute = "10.100.2.0/24"
	e := newEngine(TypeHostGW, ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500}}, Options{}, k, hostGW{})
	e.started, e.local = true, localA()
	peers := []Peer{gwPeer("b", "10.100.2.0/24", "192.168.77.3", "", ""), gwPeer("c", "10.100.3.0/24", "192.168.77.4", "", "")}
	if err := e.SetPeers(context.Background(), peers); err == nil {
		t.Fatal("SetPeers returned no error for a failed route")
	}
	if got := k.dump(); !slices.Equal(got, []string{"10.100.3.0/24 via 192.168.77.4 dev 2 proto 76"}) {
		t.Fatalf("routes = %q", got)
	}
	k.failRoute = ""
	if err := e.pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := k.dump(); len(got) != 2 {
		t.Fatalf("failed route not retried: %q", got)
	}
}
