package backend

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The reconciler compares kernel objects as small comparable values: two
// values are equal exactly when the kernel object needs no change. Keys are
// the kernel's own identity of the object, so a put of a value replaces the
// object with the same key in place.

// route is a unicast route in the main table carrying RouteProtocol.
type route struct {
	Dst      netip.Prefix
	Priority int // kernel metric; IPv6 routes default to 1024
	Gw       netip.Addr
	Link     int
	OnLink   bool
}

type routeKey struct {
	Dst      netip.Prefix
	Priority int
}

func (r route) key() routeKey { return routeKey{r.Dst, r.Priority} }

func (r route) String() string {
	s := fmt.Sprintf("%s via %s dev#%d", r.Dst, r.Gw, r.Link)
	if r.OnLink {
		s += " onlink"
	}
	return s
}

func (r route) compare(o route) int {
	return cmp.Or(comparePrefix(r.Dst, o.Dst), cmp.Compare(r.Priority, o.Priority), r.Gw.Compare(o.Gw),
		cmp.Compare(r.Link, o.Link), compareBool(r.OnLink, o.OnLink))
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func compareBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// neigh is a permanent neighbour (ARP/NDP) entry on one of our VXLAN devices.
type neigh struct {
	Link int
	IP   netip.Addr
	MAC  string // net.HardwareAddr.String()
}

func (n neigh) compare(o neigh) int {
	return cmp.Or(cmp.Compare(n.Link, o.Link), n.IP.Compare(o.IP), cmp.Compare(n.MAC, o.MAC))
}

type neighKey struct {
	Link int
	IP   netip.Addr
}

func (n neigh) key() neighKey  { return neighKey{n.Link, n.IP} }
func (n neigh) String() string { return fmt.Sprintf("%s lladdr %s dev#%d", n.IP, n.MAC, n.Link) }

// fdb is a forwarding-database entry of one of our VXLAN devices: frames for
// MAC are sent to the VTEP at Dst. A MAC may have several remotes in the
// kernel; the key is the MAC, so extra remotes are deleted.
type fdb struct {
	Link int
	MAC  string
	Dst  netip.Addr
}

func (f fdb) compare(o fdb) int {
	return cmp.Or(cmp.Compare(f.Link, o.Link), cmp.Compare(f.MAC, o.MAC), f.Dst.Compare(o.Dst))
}

type fdbKey struct {
	Link int
	MAC  string
}

func (f fdb) key() fdbKey    { return fdbKey{f.Link, f.MAC} }
func (f fdb) String() string { return fmt.Sprintf("%s dst %s dev#%d", f.MAC, f.Dst, f.Link) }

// state is a set of kernel objects, desired or actual.
type state struct {
	routes map[routeKey]route
	neighs map[neighKey]neigh
	fdbs   map[fdbKey]fdb
}

func newState() state {
	return state{routes: map[routeKey]route{}, neighs: map[neighKey]neigh{}, fdbs: map[fdbKey]fdb{}}
}

// newStateFor is newState with room for the routes of n peers.
func newStateFor(n int) state {
	return state{routes: make(map[routeKey]route, 2*n), neighs: map[neighKey]neigh{}, fdbs: map[fdbKey]fdb{}}
}

// defaultPriority is the metric the kernel gives a route added with none.
func defaultPriority(p netip.Prefix) int {
	if p.Addr().Is6() {
		return 1024
	}
	return 0
}

func routeFromNetlink(r netlink.Route) (route, bool) {
	var dst netip.Prefix
	switch {
	case r.Dst != nil:
		var ok bool
		if dst, ok = prefixFromIPNet(r.Dst); !ok {
			return route{}, false
		}
	case r.Family == unix.AF_INET:
		dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	case r.Family == unix.AF_INET6:
		dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	default:
		return route{}, false
	}
	gw, _ := netip.AddrFromSlice(r.Gw)
	out := route{
		Dst:      dst,
		Priority: r.Priority,
		Gw:       gw.Unmap(),
		Link:     r.LinkIndex,
		OnLink:   r.Flags&int(netlink.FLAG_ONLINK) != 0,
	}
	if r.Type != unix.RTN_UNICAST || len(r.MultiPath) > 0 {
		// Not a shape we create: make it differ from every desired route so
		// it is replaced (same key) or deleted.
		out.Link = -1
	}
	return out, true
}

func (r route) netlink() *netlink.Route {
	nr := &netlink.Route{
		Dst:       ipNet(r.Dst),
		Gw:        net.IP(r.Gw.AsSlice()),
		LinkIndex: r.Link,
		Protocol:  RouteProtocol,
		Priority:  r.Priority,
		Table:     unix.RT_TABLE_MAIN,
		Type:      unix.RTN_UNICAST,
	}
	if r.OnLink {
		nr.Flags = int(netlink.FLAG_ONLINK)
	}
	return nr
}

func family(a netip.Addr) int {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func neighFromNetlink(n netlink.Neigh) (neigh, bool) {
	ip, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return neigh{}, false
	}
	return neigh{Link: n.LinkIndex, IP: ip.Unmap(), MAC: n.HardwareAddr.String()}, true
}

func (n neigh) netlink() *netlink.Neigh {
	mac, _ := net.ParseMAC(n.MAC)
	return &netlink.Neigh{
		LinkIndex:    n.Link,
		Family:       family(n.IP),
		State:        netlink.NUD_PERMANENT,
		IP:           net.IP(n.IP.AsSlice()),
		HardwareAddr: mac,
	}
}

func fdbFromNetlink(n netlink.Neigh) (fdb, bool) {
	dst, _ := netip.AddrFromSlice(n.IP)
	return fdb{Link: n.LinkIndex, MAC: n.HardwareAddr.String(), Dst: dst.Unmap()}, true
}

func (f fdb) netlink() *netlink.Neigh {
	mac, _ := net.ParseMAC(f.MAC)
	var ip net.IP
	if f.Dst.IsValid() {
		ip = net.IP(f.Dst.AsSlice())
	}
	return &netlink.Neigh{
		LinkIndex:    f.Link,
		Family:       unix.AF_BRIDGE,
		State:        netlink.NUD_PERMANENT,
		Flags:        netlink.NTF_SELF,
		IP:           ip,
		HardwareAddr: mac,
	}
}

func prefixFromIPNet(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

func ipNet(p netip.Prefix) *net.IPNet {
	bits := 32
	if p.Addr().Is6() {
		bits = 128
	}
	return &net.IPNet{IP: net.IP(p.Masked().Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), bits)}
}
