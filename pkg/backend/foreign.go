package backend

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Routes leased did not install are not leased's. A peer subnet that
// overlaps a "foreign" route — any route in the main table (the only table
// leased writes) whose protocol is not RouteProtocol: the host's connected
// LANs, Docker's bridges, VPN and static routes — is refused with a log line
// naming both, so that leased neither replaces that route (a put has the
// same key when the prefix and metric match) nor, when the peer goes away,
// deletes it, nor steals part of its traffic with a more specific route.
//
// Only foreign routes that overlap one of this host's cluster networks can
// collide with a peer, so the engine keeps just those: usually a handful,
// which makes the check a few prefix comparisons per peer family and keeps
// SetPeers' incremental path as fast as before. The set is refreshed by
// every full pass (from the route dump the pass makes anyway) and a
// netlink event that adds or deletes a route that would change it runs a
// full pass, so a route that appears after the peer was programmed (dockerd
// creating a bridge later) takes precedence within a pass: the peer's route
// is withdrawn — deletes name RouteProtocol, so the kernel removes only
// leased's route — and the foreign one is left in place.
//
// Routes that cover a whole cluster network never count (default routes
// among them): the network was carved out of them on purpose, and the
// peers' routes are more specific by design and take none of their other
// destinations. Examples: 10.0.0.0/8 via a VPN gateway around a
// 10.244.0.0/16 network, and proxy-ndp's on-link /64 around its
// IPv6Network.

// foreignRoute is a route leased did not install that overlaps a cluster
// network.
type foreignRoute struct {
	Dst  netip.Prefix
	Desc string // as `ip route` shows it, e.g. "10.1.2.0/24 dev eth1 proto kernel"
}

// foreignSet is the foreign routes of the last full pass and the networks
// they were selected for. It is immutable once published.
type foreignSet struct {
	net4, net6 netip.Prefix
	routes     []foreignRoute
}

// overlapping returns the first foreign route that overlaps p.
func (s *foreignSet) overlapping(p netip.Prefix) (foreignRoute, bool) {
	if s == nil {
		return foreignRoute{}, false
	}
	for _, r := range s.routes {
		if r.Dst.Overlaps(p) {
			return r, true
		}
	}
	return foreignRoute{}, false
}

// equal reports whether two sets hold the same routes for the same networks.
func (s *foreignSet) equal(o *foreignSet) bool {
	if s == nil || o == nil {
		return s == o
	}
	return s.net4 == o.net4 && s.net6 == o.net6 && slices.Equal(s.routes, o.routes)
}

// has reports whether the set holds a route to dst.
func (s *foreignSet) has(dst netip.Prefix) bool {
	return s != nil && slices.ContainsFunc(s.routes, func(r foreignRoute) bool { return r.Dst == dst })
}

// relevant reports whether a foreign route to dst can collide with a peer
// subnet: it lies inside the cluster network of its family (partly or
// wholly) without covering all of it.
func (s *foreignSet) relevant(dst netip.Prefix) bool {
	if s == nil {
		return false
	}
	return insideNetwork(dst, s.net4, s.net6)
}

// insideNetwork reports whether dst overlaps the network of its family
// (net4 or net6) and does not cover all of it.
func insideNetwork(dst, net4, net6 netip.Prefix) bool {
	if !dst.IsValid() {
		return false
	}
	n := net4
	if dst.Addr().Is6() {
		n = net6
	}
	return n.IsValid() && n.Overlaps(dst) && dst.Bits() > n.Bits()
}

// isForeign reports whether r, from a main-table dump or event, is a route
// leased did not install.
func isForeign(r *netlink.Route) bool {
	return r.Protocol != RouteProtocol && (r.Table == 0 || r.Table == unix.RT_TABLE_MAIN) &&
		r.Flags&unix.RTM_F_CLONED == 0
}

// newForeignSet selects the foreign routes among rs (a main-table dump of
// every protocol) for local's networks; name gives a link's name for the
// log line ("" when unknown).
func newForeignSet(local Local, rs []netlink.Route, name func(int) string) *foreignSet {
	s := &foreignSet{net4: local.Network.V4, net6: local.Network.V6}
	for i := range rs {
		r := &rs[i]
		if !isForeign(r) || r.Dst == nil {
			continue
		}
		dst, ok := prefixFromIPNet(r.Dst)
		if !ok || !s.relevant(dst.Masked()) {
			continue
		}
		s.routes = append(s.routes, foreignRoute{Dst: dst.Masked(), Desc: describeRoute(r, dst.Masked(), name)})
	}
	slices.SortFunc(s.routes, func(a, b foreignRoute) int { return comparePrefix(a.Dst, b.Dst) })
	return s
}

// describeRoute writes r the way `ip route` shows it, in short.
func describeRoute(r *netlink.Route, dst netip.Prefix, name func(int) string) string {
	var b strings.Builder
	if r.Type != unix.RTN_UNICAST && r.Type != 0 {
		switch r.Type {
		case unix.RTN_LOCAL:
			b.WriteString("local ")
		case unix.RTN_BLACKHOLE:
			b.WriteString("blackhole ")
		case unix.RTN_UNREACHABLE:
			b.WriteString("unreachable ")
		case unix.RTN_PROHIBIT:
			b.WriteString("prohibit ")
		default:
			fmt.Fprintf(&b, "type %d ", r.Type)
		}
	}
	b.WriteString(dst.String())
	if len(r.Gw) > 0 {
		fmt.Fprintf(&b, " via %s", r.Gw)
	}
	if r.LinkIndex > 0 {
		if n := name(r.LinkIndex); n != "" {
			fmt.Fprintf(&b, " dev %s", n)
		} else {
			fmt.Fprintf(&b, " dev #%d", r.LinkIndex)
		}
	}
	fmt.Fprintf(&b, " proto %s", r.Protocol)
	if r.Priority > 0 {
		fmt.Fprintf(&b, " metric %d", r.Priority)
	}
	return b.String()
}

// foreignRefusal returns why a peer family's subnet must not be routed
// because it overlaps a foreign route, or "".
func foreignRefusal(fs *foreignSet, f peerFamily) string {
	r, ok := fs.overlapping(f.subnet)
	if !ok {
		return ""
	}
	return fmt.Sprintf("peer subnet overlaps %s, a route leased did not install: refused (the route is left alone; free the subnet from the lease or move the route)", r.Desc)
}

// foreignEventMatters reports whether a route event changes the foreign
// set published in fs: a relevant foreign route added that the set lacks,
// or one deleted that it holds.
func foreignEventMatters(fs *atomic.Pointer[foreignSet], u netlink.RouteUpdate) bool {
	if !isForeign(&u.Route) || u.Dst == nil {
		return false
	}
	s := fs.Load()
	dst, ok := prefixFromIPNet(u.Dst)
	if s == nil || !ok {
		return false
	}
	dst = dst.Masked()
	if u.Type == unix.RTM_DELROUTE {
		return s.has(dst)
	}
	return s.relevant(dst) && !s.has(dst)
}

// linkNamer returns a cached link-name lookup for one pass.
func linkNamer(k kernel) func(int) string {
	names := map[int]string{}
	return func(idx int) string {
		if n, ok := names[idx]; ok {
			return n
		}
		n := ""
		if l, err := k.LinkByIndex(idx); err == nil {
			n = l.Attrs().Name
		}
		names[idx] = n
		return n
	}
}

// HostRoute is a route by which this host reaches a prefix itself: a
// connected LAN or another gateway-less route of the main table (a VPN's,
// a static one, a bridge's), or a local address (local table). A subnet
// overlapping one must not be leased to this host (lease.Excluded).
type HostRoute struct {
	Dst  netip.Prefix
	Desc string // as `ip route` shows it
	// Own is set for a route on a bridge (dockerd's, which carries this
	// host's own subnet) or on one of leased's VXLAN devices.
	Own bool
}

// isHostRoute reports whether r is a HostRoute inside net4 or net6: a
// gateway-less unicast route of the main table or a local address, not
// leased's, not covering a whole network.
func isHostRoute(r *netlink.Route, net4, net6 netip.Prefix) bool {
	if r.Dst == nil || r.Protocol == RouteProtocol || len(r.Gw) > 0 || len(r.MultiPath) > 0 || r.Flags&unix.RTM_F_CLONED != 0 {
		return false
	}
	local := r.Table == unix.RT_TABLE_LOCAL && r.Type == unix.RTN_LOCAL
	if !local && (r.Table != unix.RT_TABLE_MAIN || r.Type != unix.RTN_UNICAST) {
		return false
	}
	dst, ok := prefixFromIPNet(r.Dst)
	return ok && insideNetwork(dst.Masked(), net4, net6)
}

// HostRoutes returns the host's routes (see HostRoute) in the agent's
// network namespace that lie inside the cluster networks net4 and net6
// (either may be zero) without covering a whole one, leaving out routes
// via a gateway and leased's own (RouteProtocol).
func HostRoutes(net4, net6 netip.Prefix) ([]HostRoute, error) {
	k, err := openKernel(nsExec{})
	if err != nil {
		return nil, err
	}
	defer k.Close()
	return hostRoutes(k, net4, net6)
}

// hostRoutes is HostRoutes on k.
func hostRoutes(k kernel, net4, net6 netip.Prefix) ([]HostRoute, error) {
	own := map[int]bool{}
	names := map[int]string{}
	name := func(idx int) string {
		if n, ok := names[idx]; ok {
			return n
		}
		if l, err := k.LinkByIndex(idx); err == nil {
			a := l.Attrs()
			names[idx] = a.Name
			own[idx] = l.Type() == "bridge" || a.Name == VXLANDev4 || a.Name == VXLANDev6
		} else {
			names[idx] = ""
		}
		return names[idx]
	}
	var out []HostRoute
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		// Keep only the candidates while the dump is read: after a restart
		// in a large cluster it holds a route per peer, all leased's.
		rs, err := k.RouteListAll(fam, func(r *netlink.Route) bool { return isHostRoute(r, net4, net6) })
		if err != nil {
			return nil, err
		}
		for i := range rs {
			r := &rs[i]
			dst, _ := prefixFromIPNet(r.Dst)
			dst = dst.Masked()
			out = append(out, HostRoute{Dst: dst, Desc: describeRoute(r, dst, name), Own: r.LinkIndex > 0 && name(r.LinkIndex) != "" && own[r.LinkIndex]})
		}
	}
	// A route inside another of the same kind adds nothing (the local
	// route of an address inside its LAN's).
	var kept []HostRoute
	for _, r := range out {
		if !slices.ContainsFunc(out, func(o HostRoute) bool {
			return o.Own == r.Own && o.Dst.Bits() < r.Dst.Bits() && o.Dst.Contains(r.Dst.Addr())
		}) {
			kept = append(kept, r)
		}
	}
	return kept, nil
}
