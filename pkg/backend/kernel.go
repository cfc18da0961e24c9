package backend

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteProtocol is the rtnetlink protocol number that marks a route as
// leased's own. It is 76 (0x4c, "L"), which neither the kernel's
// include/uapi/linux/rtnetlink.h nor iproute2's rt_protos assigns; `ip route`
// shows it as "proto 76" (an rt_protos.d entry "76 leased" names it).
//
// The reconciler replaces and deletes only routes in the main table that
// carry this protocol; every other route on the host is left alone, and a
// peer subnet that overlaps one of them is refused (foreign.go).
//
// systemd-networkd: with its default ManageForeignRoutes=yes, networkd removes
// routes it did not configure (it keeps only proto kernel routes) when it
// starts or reconfigures a link. Routes of this protocol are therefore
// removed whenever networkd reconfigures the external interface; Run sees the
// deletion event and restores them within a pass (logged as "route
// restored"). To avoid that window set ManageForeignRoutes=no in
// networkd.conf. Marking our routes proto kernel, as some agents do, would
// hide them from networkd but would also make them indistinguishable from the
// kernel's own routes, so the reconciler could not tell what it owns.
const RouteProtocol netlink.RouteProtocol = 76

// kernel is the engine's only way to the kernel: every route, neighbour,
// FDB entry, link and address it reads or writes, the sysctls and firewall
// rules it keeps, the netlink events it listens to, the packet sockets
// `leased status` looks for and the connection of the proxy-NDP responder
// (package ndp: its packet socket, neighbour dumps and probes). Only
// CheckPrivileges, which runs before a backend exists, probes the kernel
// directly. netlinkKernel implements it in one network
// namespace; tests use an in-memory fake (fake_test.go), against which a
// backend's Start runs as a pass does. It is composed of small interfaces,
// one per kind of kernel object.
//
// The table methods (routeTable, neighTable, linkTable and the nexthopSource's
// nexthopKernel) are not safe for concurrent use; the engine serialises them
// with its mutex (dumps excepted: see nexthopKernel). The others
// (sysctls, firewall, eventSource, sideOpener, packetSockets) may be called from any
// goroutine, also while a table method runs.
type kernel interface {
	routeTable
	neighTable
	linkTable
	sysctls
	firewall
	eventSource
	sideOpener
	packetSockets
	nexthopSource
	// Close releases the handles and sockets; the kernel state stays.
	Close() error
}

// routeTable is the main routing table as the reconciler sees it.
// Lists return complete dumps: an interrupted dump is retried.
type routeTable interface {
	// RouteList returns the main-table routes of family, of every
	// protocol: the reconciler's own (RouteProtocol) and the foreign ones
	// it must not collide with.
	RouteList(family int) ([]netlink.Route, error)
	// RoutesReplace replaces or creates each route and RoutesDel deletes
	// each; errs[i] is the outcome for rs[i]. The production kernel sends
	// many requests per system call; a failure does not stop the others.
	RoutesReplace(rs []*netlink.Route) (errs []error)
	RoutesDel(rs []*netlink.Route) (errs []error)
	// RoutesAdd creates each route and fails with EEXIST for one whose
	// table, destination and metric another route already has (which it
	// leaves alone), as RoutesReplace would not.
	RoutesAdd(rs []*netlink.Route) (errs []error)
	// RouteListAll returns the routes of family in every table for which
	// keep returns true; keep sees each route while the dump is read, so
	// that a large dump is never held whole (HostRoutes).
	RouteListAll(family int, keep func(*netlink.Route) bool) ([]netlink.Route, error)
}

// nexthopSource gives the kernel's nexthop objects and its route dump that
// reports them, where it has them.
type nexthopSource interface {
	// Nexthops returns them, or nil for a kernel that offers neither (the
	// in-memory fake of the unit tests, a closed backend's): the engine
	// then lists routes with RouteList and puts plain gateway routes. The
	// netlink kernel always returns them; on Linux before 5.3 its
	// NexthopProbe fails, so routes stay plain gateway routes, and its
	// nexthop dumps fail with EOPNOTSUPP or EINVAL.
	Nexthops() nexthopKernel
}

// neighTable is the neighbour table, FDB entries (AF_BRIDGE) included.
type neighTable interface {
	// NeighList returns every neighbour entry of family (AF_BRIDGE for FDB)
	// on every link.
	NeighList(family int) ([]netlink.Neigh, error)
	NeighSet(n *netlink.Neigh) error
	NeighDel(n *netlink.Neigh) error
	// NeighProxyList returns the proxy entries (ip neigh add proxy) of
	// family on the link with index.
	NeighProxyList(index, family int) ([]netlink.Neigh, error)
}

// linkTable is the links and their addresses.
type linkTable interface {
	LinkByName(name string) (netlink.Link, error)
	LinkByIndex(index int) (netlink.Link, error)
	LinkAdd(l netlink.Link) error
	LinkDel(l netlink.Link) error
	LinkSetUp(l netlink.Link) error
	LinkSetMTU(l netlink.Link, mtu int) error
	LinkSetHardwareAddr(l netlink.Link, mac []byte) error
	// AddrList returns the addresses of family on the link with index,
	// or on every link when index is 0.
	AddrList(index, family int) ([]netlink.Addr, error)
	AddrReplace(l netlink.Link, a *netlink.Addr) error
	AddrDel(l netlink.Link, a *netlink.Addr) error
}

// netlinkKernel is the production kernel: every call goes through one handle,
// which is bound to the backend's network namespace. It is not safe for
// concurrent use; the backend serialises calls with its mutex.
type netlinkKernel struct {
	h  *netlink.Handle
	b  *routeBatcher // route puts and deletes, in the handle's namespace
	d  *dumper       // route and nexthop dumps, on a socket of their own (nil: on b)
	ns nsExec        // the namespace, for sysctls, iptables, sockets and subscriptions
	// ipts keeps the iptables of each family (nil: made on every call).
	ipts *iptCache
}

// dumpTries is how often a dump the kernel interrupted is tried. A full
// pass dumps without the engine's lock, so the agent's own peer changes
// interrupt it too: at 50,000 peers the nexthop dump takes about 0.2 s, and
// with a join every 150 ms most tries are interrupted (then pass dumps once
// more holding the lock, which makes the joins wait).
const dumpTries = 10

// retryDump repeats a dump the kernel interrupted because the table changed
// while it was being read.
func retryDump[T any](what string, list func() ([]T, error)) ([]T, error) {
	var err error
	for range dumpTries {
		var out []T
		out, err = list()
		if err == nil {
			return out, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return nil, fmt.Errorf("listing %s: %w", what, err)
		}
	}
	return nil, fmt.Errorf("listing %s: %w (after %d tries)", what, err, dumpTries)
}

func (k netlinkKernel) RouteList(family int) ([]netlink.Route, error) {
	return retryDump("routes", func() ([]netlink.Route, error) {
		// No filter: the main table. The library decodes every route of
		// the dump before filtering, so the foreign routes come at no
		// extra cost.
		return k.h.RouteListFiltered(family, &netlink.Route{}, 0)
	})
}

func (k netlinkKernel) RoutesReplace(rs []*netlink.Route) []error {
	return k.b.do(unix.RTM_NEWROUTE, rs)
}
func (k netlinkKernel) RoutesDel(rs []*netlink.Route) []error { return k.b.do(unix.RTM_DELROUTE, rs) }
func (k netlinkKernel) RoutesAdd(rs []*netlink.Route) []error { return k.b.add(rs) }

func (k netlinkKernel) NeighList(family int) ([]netlink.Neigh, error) {
	return retryDump("neighbours", func() ([]netlink.Neigh, error) { return k.h.NeighList(0, family) })
}

func (k netlinkKernel) NeighSet(n *netlink.Neigh) error { return k.h.NeighSet(n) }
func (k netlinkKernel) NeighDel(n *netlink.Neigh) error { return k.h.NeighDel(n) }

func (k netlinkKernel) LinkByName(name string) (netlink.Link, error) { return k.h.LinkByName(name) }
func (k netlinkKernel) LinkByIndex(index int) (netlink.Link, error)  { return k.h.LinkByIndex(index) }
func (k netlinkKernel) LinkAdd(l netlink.Link) error                 { return k.h.LinkAdd(l) }
func (k netlinkKernel) LinkDel(l netlink.Link) error                 { return k.h.LinkDel(l) }
func (k netlinkKernel) LinkSetUp(l netlink.Link) error               { return k.h.LinkSetUp(l) }
func (k netlinkKernel) LinkSetMTU(l netlink.Link, mtu int) error     { return k.h.LinkSetMTU(l, mtu) }
func (k netlinkKernel) LinkSetHardwareAddr(l netlink.Link, mac []byte) error {
	return k.h.LinkSetHardwareAddr(l, mac)
}

func (k netlinkKernel) AddrList(index, family int) ([]netlink.Addr, error) {
	var link netlink.Link // nil: every link
	if index != 0 {
		attrs := netlink.NewLinkAttrs()
		attrs.Index = index
		link = &netlink.Device{LinkAttrs: attrs}
	}
	return retryDump("addresses", func() ([]netlink.Addr, error) { return k.h.AddrList(link, family) })
}

func (k netlinkKernel) AddrReplace(l netlink.Link, a *netlink.Addr) error {
	return k.h.AddrReplace(l, a)
}
func (k netlinkKernel) AddrDel(l netlink.Link, a *netlink.Addr) error { return k.h.AddrDel(l, a) }

// isGone reports whether a delete failed only because the object did not
// exist, which the reconciler treats as success.
func isGone(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENODEV)
}

// isLinkNotFound reports whether LinkByName failed because no such link exists.
func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}
