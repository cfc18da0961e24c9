package backend

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// passLocked is one reconcile pass; e.mu must be held. It repairs devices,
// computes the desired state, lists the actual state with one dump per
// object kind and family, puts what is missing or differs, then deletes what
// is ours and no longer wanted. Failures do not stop the pass; they are
// joined and retried by the next one.
func (e *engine) passLocked(ctx context.Context) error {
	if !e.started || !e.peersSet {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	e.passes++
	e.lastChanges = 0
	var errs []error
	owned, err := e.dp.ensure(e.k, e.local)
	errs = append(errs, err)
	e.owned.Store(&owned)

	e.trusted = false
	connected, err := e.connected()
	if err != nil {
		// Without ext's prefixes every host-gw peer would look off-link
		// and its route would be deleted: change nothing this pass.
		return errors.Join(append(errs, err)...)
	}
	e.connectedCache = connected
	want, skips := e.dp.desired(input{local: e.local, peers: e.peers, ext: e.ext, connected: connected})
	e.wanted.Store(&want)
	e.logSkips(skips)

	reached := newState()
	if len(owned) > 0 || len(e.applied.neighs) > 0 || len(e.applied.fdbs) > 0 {
		neighs, fdbs, err := e.listNeighs(owned)
		if err == nil {
			// FDB entries, then the neighbours that lead to them, then the
			// routes that use those: a new peer is complete before any
			// route points at it.
			var errF, errN error
			var nF, nN int
			reached.fdbs, nF, errF = applyKind(want.fdbs, fdbs, e.applied.fdbs, e.putFDB, e.delFDB, "fdb entry")
			reached.neighs, nN, errN = applyKind(want.neighs, neighs, e.applied.neighs, e.putNeigh, e.delNeigh, "neighbour")
			e.lastChanges += nF + nN
			err = errors.Join(errF, errN)
		}
		errs = append(errs, err)
	}
	routes, err := e.listRoutes()
	if err == nil {
		var n int
		reached.routes, n, err = applyKind(want.routes, routes, e.applied.routes, e.putRoute, e.delRoute, "route")
		e.lastChanges += n
	}
	errs = append(errs, err)
	e.applied = reached
	joined := errors.Join(errs...)
	e.trusted = joined == nil
	return joined
}

// quickPassLocked applies a new peer set against what the last pass left
// in the kernel (e.applied), without dumping routes and neighbours: the
// cost is proportional to the peer set, not to the kernel's tables. When
// applied cannot be trusted it runs a full pass instead. e.mu must be held.
func (e *engine) quickPassLocked(ctx context.Context) error {
	if !e.trusted || !e.started || !e.peersSet {
		return e.passLocked(ctx)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	e.passes++
	want, skips := e.dp.desired(input{local: e.local, peers: e.peers, ext: e.ext, connected: e.connectedCache})
	e.wanted.Store(&want)
	e.logSkips(skips)
	reached := newState()
	var errF, errN, errR error
	var nF, nN, nR int
	reached.fdbs, nF, errF = applyKind(want.fdbs, values(e.applied.fdbs), e.applied.fdbs, e.putFDB, e.delFDB, "fdb entry")
	reached.neighs, nN, errN = applyKind(want.neighs, values(e.applied.neighs), e.applied.neighs, e.putNeigh, e.delNeigh, "neighbour")
	reached.routes, nR, errR = applyKind(want.routes, values(e.applied.routes), e.applied.routes, e.putRoute, e.delRoute, "route")
	e.lastChanges = nF + nN + nR
	e.applied = reached
	err := errors.Join(errF, errN, errR)
	if err != nil {
		e.trusted = false // the next pass looks at the kernel again
	}
	return err
}

func values[K comparable, V any](m map[K]V) []V {
	out := make([]V, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// applyKind diffs one kind of object, puts then deletes, and returns the
// objects now known to be in the kernel as wanted. applied is what the last
// pass left; a put of an object it held is drift being repaired.
func applyKind[K comparable, V interface {
	keyed[K]
	String() string
}](want map[K]V, have []V, applied map[K]V, put, del func(V) error, kind string) (reached map[K]V, changes int, err error) {
	puts, dels := diff(want, have)
	sortByString(puts)
	sortByString(dels)
	if klog.V(4).Enabled() {
		klog.V(4).InfoS("reconcile diff", "kind", kind, "want", len(want), "have", len(have), "put", puts, "delete", dels)
	}
	changes += len(puts) + len(dels)
	reached = make(map[K]V, len(want))
	for k, w := range want {
		reached[k] = w
	}
	var errs []error
	for _, p := range puts {
		if a, ok := applied[p.key()]; ok && a == p {
			klog.Warningf("%s restored: %s (it was changed or removed outside leased)", kind, p)
		} else {
			klog.V(2).InfoS("setting "+kind, kind, p.String())
		}
		if err := put(p); err != nil {
			delete(reached, p.key())
			errs = append(errs, fmt.Errorf("setting %s %s: %w", kind, p, err))
		}
	}
	for _, d := range dels {
		klog.V(2).InfoS("deleting "+kind, kind, d.String())
		if err := del(d); err != nil && !isGone(err) {
			// ENOENT/ESRCH: it was already gone, which is what we wanted.
			errs = append(errs, fmt.Errorf("deleting %s %s: %w", kind, d, err))
		}
	}
	return reached, changes, errors.Join(errs...)
}

// connected returns the prefixes configured on the external interface.
func (e *engine) connected() ([]netip.Prefix, error) {
	addrs, err := e.k.AddrList(e.ext.Index, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("listing addresses of %s: %w", e.ext.Name, err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		if p, ok := prefixFromIPNet(a.IPNet); ok {
			out = append(out, p.Masked())
		}
	}
	return out, nil
}

// listRoutes returns our routes of both families (one dump each): routes of
// a family that is now disabled are stale and get deleted.
func (e *engine) listRoutes() ([]route, error) {
	var out []route
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rs, err := e.k.RouteList(fam)
		if err != nil {
			return nil, err
		}
		for _, r := range rs {
			if r.Protocol != RouteProtocol || (r.Table != 0 && r.Table != unix.RT_TABLE_MAIN) {
				continue
			}
			if rr, ok := routeFromNetlink(r); ok {
				out = append(out, rr)
			}
		}
	}
	return out, nil
}

// listNeighs returns the permanent neighbour and FDB entries on the owned
// devices: one neighbour dump per family and one FDB dump.
func (e *engine) listNeighs(owned []int) ([]neigh, []fdb, error) {
	var neighs []neigh
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		ns, err := e.k.NeighList(fam)
		if err != nil {
			return nil, nil, err
		}
		for _, n := range ns {
			if !slices.Contains(owned, n.LinkIndex) || n.State&netlink.NUD_PERMANENT == 0 {
				continue // dynamic entries belong to the kernel
			}
			if nn, ok := neighFromNetlink(n); ok {
				neighs = append(neighs, nn)
			}
		}
	}
	ns, err := e.k.NeighList(unix.AF_BRIDGE)
	if err != nil {
		return nil, nil, err
	}
	var fdbs []fdb
	for _, n := range ns {
		if !slices.Contains(owned, n.LinkIndex) || len(n.HardwareAddr) != 6 || n.HardwareAddr[0]&1 != 0 {
			continue // we only create unicast entries
		}
		if f, ok := fdbFromNetlink(n); ok {
			fdbs = append(fdbs, f)
		}
	}
	return neighs, fdbs, nil
}

func (e *engine) putRoute(r route) error { return e.k.RouteReplace(r.netlink()) }
func (e *engine) delRoute(r route) error { return e.k.RouteDel(r.netlink()) }
func (e *engine) putNeigh(n neigh) error { return e.k.NeighSet(n.netlink()) }
func (e *engine) delNeigh(n neigh) error { return e.k.NeighDel(n.netlink()) }
func (e *engine) putFDB(f fdb) error     { return e.k.NeighSet(f.netlink()) }
func (e *engine) delFDB(f fdb) error     { return e.k.NeighDel(f.netlink()) }
