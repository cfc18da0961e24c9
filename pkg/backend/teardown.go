package backend

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Teardown removes from the network namespace netNS (a path, "" for the
// caller's own) everything any leased backend creates there, whatever the
// backend type and whatever the lease was:
//
//   - the main-table routes of protocol RouteProtocol, IPv4 and IPv6 (the
//     routes to peers of host-gw, vxlan and proxy-ndp); routes of every
//     other protocol are left alone;
//   - the VXLAN devices VXLANDev4 and VXLANDev6 (only links of type vxlan
//     with those names), and with them their addresses and the neighbour
//     and FDB entries leased put on them, which the kernel deletes with the
//     device;
//   - the iptables and ip6tables chains ForwardChain (filter) and MasqChain
//     (nat) and the jumps to them from FORWARD and POSTROUTING.
//
// It does not touch sysctls (IP forwarding, accept_ra): other software
// may rely on them, and leased does not record their earlier values.
// proxy-ndp answers Neighbor Solicitations from the agent process itself,
// so once the agent has stopped there is nothing of it left in the kernel.
// Teardown must not run while an agent programs the namespace: the agent
// would restore what it removed.
//
// It returns one line per removed object, in the order removed; a second
// call returns none. An error (joining every failure) leaves the objects
// it could not remove in place; running it again retries them.
func Teardown(netNS string) (removed []string, err error) {
	k, err := openKernel(nsExec{path: netNS})
	if err != nil {
		return nil, err
	}
	defer k.Close()
	return teardown(k)
}

// teardown is Teardown on k: leased's routes (those the reconciler lists
// as its own: main table, RouteProtocol), then its VXLAN devices, then its
// iptables chains.
func teardown(k kernel) (removed []string, err error) {
	removed, kerr := teardownKernel(k)
	var errs []error
	for _, v6 := range []bool{false, true} {
		ipt, err := k.IPTables(v6)
		if err != nil {
			if errors.Is(err, ErrNoIptables) {
				continue // no binary: leased could not have added rules with it
			}
			errs = append(errs, err)
			continue
		}
		c := chains{ipt: ipt, bin: ipt.Cmd()}
		for _, ch := range []struct{ table, parent, chain string }{
			{"filter", "FORWARD", ForwardChain},
			{"nat", "POSTROUTING", MasqChain},
		} {
			changed := false
			if err := c.remove(ch.table, ch.parent, ch.chain, &changed); err != nil {
				errs = append(errs, err)
			} else if changed {
				removed = append(removed, fmt.Sprintf("%s chain %s/%s and the jumps to it from %s", c.bin, ch.table, ch.chain, ch.parent))
			}
		}
	}
	return removed, errors.Join(kerr, errors.Join(errs...))
}

// teardownKernel is teardown's netlink part: leased's routes, then its
// VXLAN devices.
func teardownKernel(k kernel) (removed []string, err error) {
	var errs []error
	name := linkNamer(k)
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rs, err := k.RouteList(fam)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var del []*netlink.Route
		var descs []string
		for i := range rs {
			r := &rs[i]
			if r.Protocol != RouteProtocol || (r.Table != 0 && r.Table != unix.RT_TABLE_MAIN) {
				continue
			}
			rr, ok := routeFromNetlink(*r)
			if !ok {
				continue
			}
			del = append(del, r)
			descs = append(descs, "route "+describeRoute(r, rr.Dst, name))
		}
		for i, err := range delOwnRoutes(k, del) {
			if err != nil && !isGone(err) {
				errs = append(errs, fmt.Errorf("deleting %s: %w", descs[i], err))
				continue
			}
			removed = append(removed, descs[i])
		}
	}
	if nk := k.Nexthops(); nk != nil {
		// The nexthop objects of those routes (protocol RouteProtocol);
		// others' are left alone. A kernel without them has none.
		nhs, err := nk.NexthopList()
		if err != nil && !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, err)
		}
		var ids []uint32
		var descs []string
		for _, n := range nhs {
			if n.Proto == uint8(RouteProtocol) {
				ids = append(ids, n.ID)
				d := fmt.Sprintf("nexthop object id %d", n.ID)
				if n.Gw.IsValid() {
					d += " via " + n.Gw.String()
				}
				if nm := name(n.Link); nm != "" {
					d += " dev " + nm
				}
				descs = append(descs, d)
			}
		}
		for i, err := range nk.NexthopsDel(ids) {
			if err != nil && !isGone(err) {
				errs = append(errs, fmt.Errorf("deleting %s: %w", descs[i], err))
				continue
			}
			removed = append(removed, descs[i])
		}
	}
	for _, dev := range []string{VXLANDev4, VXLANDev6} {
		l, err := k.LinkByName(dev)
		if err != nil {
			if !isLinkNotFound(err) {
				errs = append(errs, fmt.Errorf("looking up %s: %w", dev, err))
			}
			continue
		}
		if l.Type() != "vxlan" {
			errs = append(errs, fmt.Errorf("a link named %s exists but is of type %s, not a VXLAN device leased created: left alone; delete it yourself if it is a leftover", dev, l.Type()))
			continue
		}
		if err := k.LinkDel(l); err != nil && !isGone(err) {
			errs = append(errs, fmt.Errorf("deleting %s: %w", dev, err))
			continue
		}
		removed = append(removed, "VXLAN device "+dev+" (with its addresses, neighbour and FDB entries)")
	}
	return removed, errors.Join(errs...)
}

// delOwnRoutes deletes routes of ours. On the netlink kernel a delete
// names only the destination, metric, table and protocol, which also
// matches a route through a nexthop object (a delete naming its gateway
// and device does not).
func delOwnRoutes(k kernel, rs []*netlink.Route) []error {
	nk := k.Nexthops()
	if nk == nil {
		return k.RoutesDel(rs)
	}
	del := make([]nhRoute, len(rs))
	for i, r := range rs {
		rr, _ := routeFromNetlink(*r)
		del[i] = nhRoute{Dst: rr.Dst, Priority: r.Priority}
	}
	return nk.NHRoutesDel(del)
}
