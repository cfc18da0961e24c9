package backend

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// fakeKernel is an in-memory kernel for reconciler tests: routes keyed by
// family, table, destination and metric; neighbour and FDB entries keyed by
// link and address. It implements kernel, the seam production calls through.
type fakeKernel struct {
	routes map[string]netlink.Route
	neighs map[string]netlink.Neigh
	addrs  map[int][]netip.Prefix // by ifindex
	// failRoute makes RouteReplace fail for this destination.
	failRoute string
	calls     int // mutating calls
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{routes: map[string]netlink.Route{}, neighs: map[string]netlink.Neigh{}, addrs: map[int][]netip.Prefix{}}
}

func routeID(r *netlink.Route) string {
	table := r.Table
	if table == 0 {
		table = unix.RT_TABLE_MAIN
	}
	return fmt.Sprintf("%d/%s/%d", table, r.Dst, r.Priority)
}

func (f *fakeKernel) RouteList(family int) ([]netlink.Route, error) {
	var out []netlink.Route
	for _, r := range f.routes {
		is4 := r.Dst.IP.To4() != nil
		if is4 == (family == unix.AF_INET) {
			out = append(out, r)
		}
	}
	return out, nil
}

func (f *fakeKernel) RouteReplace(r *netlink.Route) error {
	f.calls++
	if r.Dst.String() == f.failRoute {
		return unix.ENETUNREACH
	}
	f.routes[routeID(r)] = *r
	return nil
}

func (f *fakeKernel) RoutesReplace(rs []*netlink.Route) []error {
	errs := make([]error, len(rs))
	for i, r := range rs {
		errs[i] = f.RouteReplace(r)
	}
	return errs
}

func (f *fakeKernel) RoutesAdd(rs []*netlink.Route) []error {
	errs := make([]error, len(rs))
	for i, r := range rs {
		if _, ok := f.routes[routeID(r)]; ok {
			errs[i] = unix.EEXIST
			continue
		}
		errs[i] = f.RouteReplace(r)
	}
	return errs
}

func (f *fakeKernel) RoutesDel(rs []*netlink.Route) []error {
	errs := make([]error, len(rs))
	for i, r := range rs {
		errs[i] = f.RouteDel(r)
	}
	return errs
}

func (f *fakeKernel) RouteDel(r *netlink.Route) error {
	f.calls++
	id := routeID(r)
	if _, ok := f.routes[id]; !ok {
		return unix.ESRCH
	}
	delete(f.routes, id)
	return nil
}

func neighID(n *netlink.Neigh) string {
	return fmt.Sprintf("%d/%d/%s/%s", n.Family, n.LinkIndex, n.IP, n.HardwareAddr)
}

func (f *fakeKernel) NeighList(family int) ([]netlink.Neigh, error) {
	var out []netlink.Neigh
	for _, n := range f.neighs {
		if n.Family == family {
			out = append(out, n)
		}
	}
	return out, nil
}

func (f *fakeKernel) NeighSet(n *netlink.Neigh) error {
	f.calls++
	f.neighs[neighID(n)] = *n
	return nil
}
func (f *fakeKernel) NeighDel(n *netlink.Neigh) error {
	f.calls++
	if _, ok := f.neighs[neighID(n)]; !ok {
		return unix.ENOENT
	}
	delete(f.neighs, neighID(n))
	return nil
}

func (f *fakeKernel) LinkByName(name string) (netlink.Link, error) {
	return nil, netlink.LinkNotFoundError{}
}
func (f *fakeKernel) LinkByIndex(int) (netlink.Link, error)          { return nil, unix.ENODEV }
func (f *fakeKernel) LinkAdd(netlink.Link) error                     { return unix.EOPNOTSUPP }
func (f *fakeKernel) LinkDel(netlink.Link) error                     { return unix.EOPNOTSUPP }
func (f *fakeKernel) LinkSetUp(netlink.Link) error                   { return unix.EOPNOTSUPP }
func (f *fakeKernel) LinkSetMTU(netlink.Link, int) error             { return unix.EOPNOTSUPP }
func (f *fakeKernel) LinkSetHardwareAddr(netlink.Link, []byte) error { return unix.EOPNOTSUPP }
func (f *fakeKernel) AddrReplace(netlink.Link, *netlink.Addr) error  { return unix.EOPNOTSUPP }
func (f *fakeKernel) AddrDel(netlink.Link, *netlink.Addr) error      { return unix.EOPNOTSUPP }

func (f *fakeKernel) AddrList(index, family int) ([]netlink.Addr, error) {
	var out []netlink.Addr
	for _, p := range f.addrs[index] {
		out = append(out, netlink.Addr{IPNet: &netIPNet{IP: p.Addr().AsSlice(), Mask: cidrMask(p)}})
	}
	return out, nil
}

// dump renders the routes as sorted text, e.g. "10.0.1.0/24 via 192.0.2.1 dev 2 proto 76".
func (f *fakeKernel) dump() []string {
	var out []string
	for _, r := range f.routes {
		out = append(out, fmt.Sprintf("%s via %s dev %d proto %d", r.Dst, r.Gw, r.LinkIndex, r.Protocol))
	}
	slices.Sort(out)
	return out
}
