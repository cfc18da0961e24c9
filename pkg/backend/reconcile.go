package backend

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"reflect"
	"runtime"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/hoptrace"
	"github.com/leased/leased/pkg/metrics"
)

// passLocked is one reconcile pass; e.mu must be held. It repairs devices,
// computes the desired state, lists the actual state with one dump per
// object kind and family, puts what is missing or differs, then deletes what
// is ours and no longer wanted. Failures do not stop the pass; they are
// joined and retried by the next one.
func (e *engine) passLocked(ctx context.Context) error { return e.passLockedWith(ctx, nil, nil) }

// passLockedWith is passLocked with the dump d made before e.mu was taken
// (nil: dump now); touched are the keys changed since d began (see
// adoptDump). When the engine is trusted and d was made without e.mu
// (touched is e.dumpTouched, still collecting), the comparison lets peer
// changes in too (verifyLocked).
func (e *engine) passLockedWith(ctx context.Context, d *routeDump, touched *touchedSet) error {
	if !e.started || !e.peersSet {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	e.passes++
	if d == nil {
		e.fullPasses.Add(1) // before the lists: this pass sees every earlier event
	}
	e.lastChanges = 0
	var errs []error
	owned, err := e.dp.ensure(e.k, e.local)
	errs = append(errs, err)
	e.owned.Store(&owned)

	wasTrusted := e.trusted
	e.trusted = false
	connected, err := e.connected()
	if err != nil {
		// Without ext's prefixes every host-gw peer would look off-link
		// and its route would be deleted: change nothing this pass.
		return errors.Join(append(errs, err)...)
	}
	e.connectedCache = connected
	// Our routes and the foreign ones come from one dump, listed before
	// the desired state is computed: a peer overlapping a foreign route
	// is not wanted.
	var routes []route
	var foreign *foreignSet
	nRoutes := -1 // routes[:nRoutes] are the dump's, sorted (dumpAll)
	if d != nil {
		routes, nRoutes, foreign = e.adoptDump(d, e.local, touched.routeKeys())
	} else {
		routes, foreign, err = e.listAllRoutes()
	}
	if err != nil {
		// Without the foreign routes a peer could replace one: change
		// nothing this pass.
		return errors.Join(append(errs, err)...)
	}
	e.foreign.Store(foreign)
	from := wantInputs{local: e.local, owned: owned, connected: connected, foreign: foreign}
	// A trusted engine's wanted state is what the desired state would be
	// (the peer changes since it was computed went through
	// applyObjectChangesLocked) unless its inputs changed: at 50,000 peers
	// recomputing it is 100 ms and 16 MB for nothing.
	verify := wasTrusted && d != nil && touched != nil && e.wanted.set && e.wantFrom.same(from)
	var want state
	if verify {
		want = e.wanted.st
	} else {
		want = e.wantAll(input{local: e.local, peers: e.peers, ext: e.ext, connected: connected, foreign: foreign}, from)
	}

	listN := len(owned) > 0 || len(e.applied.neighs) > 0 || len(e.applied.fdbs) > 0
	var neighs []neigh
	var fdbs []fdb
	nNeighs, nFDBs := -1, -1 // as nRoutes
	var errL error
	switch {
	case !listN:
		nNeighs, nFDBs = 0, 0
	case d != nil && d.neighsListed && slices.Equal(d.neighOwned, owned):
		neighs, nNeighs = adoptKind(d.neighs, touched.neighKeys(), e.applied.neighs)
		fdbs, nFDBs = adoptKind(d.fdbs, touched.fdbKeys(), e.applied.fdbs)
	default: // (devices changed since the dump, or no dump)
		neighs, fdbs, errL = e.listNeighs(owned)
	}
	if verify && errL == nil && nRoutes >= 0 && nNeighs >= 0 && nFDBs >= 0 {
		e.trusted = errors.Join(errs...) == nil
		// The touched keys' objects (after the dump's) are left out: the
		// comparison leaves those keys to the changes that touched them.
		err := e.verifyLocked(want, fdbs[:nFDBs], neighs[:nNeighs], routes[:nRoutes])
		errs = append(errs, err, e.gcNexthopsLocked())
		joined := errors.Join(errs...)
		e.trusted = e.trusted && joined == nil
		return joined
	}
	reached := newState()
	if listN {
		if errL == nil {
			// FDB entries, then the neighbours that lead to them, then the
			// routes that use those: a new peer is complete before any
			// route points at it.
			var errF, errN error
			var nF, nN int
			reached.fdbs, nF, errF = applyKind(want.fdbs, fdbs, e.applied.fdbs, e.putFDBs, e.delFDBs, "fdb entry")
			reached.neighs, nN, errN = applyKind(want.neighs, neighs, e.applied.neighs, e.putNeighs, e.delNeighs, "neighbour")
			e.lastChanges += nF + nN
			errL = errors.Join(errF, errN)
		}
		errs = append(errs, errL)
	}
	var n int
	e.routeHave = lazyKeys(routes)
	reached.routes, n, err = applyKind(want.routes, routes, e.applied.routes, e.putRoutes, e.delRoutes, "route")
	e.routeHave = nil
	e.lastChanges += n
	errs = append(errs, err, e.gcNexthopsLocked())
	e.applied = reached
	joined := errors.Join(errs...)
	e.trusted = joined == nil
	return joined
}

// adoptKind returns the dumped objects have with those of the touched
// keys replaced by what applied holds for them (see adoptDump): the
// dump's, in their order, then the touched keys'; kept is how many are
// the dump's.
func adoptKind[K comparable, V keyed[K]](have []V, touched map[K]struct{}, applied map[K]V) ([]V, int) {
	if len(touched) == 0 {
		return have, len(have)
	}
	have = slices.DeleteFunc(have, func(v V) bool { _, t := touched[v.key()]; return t })
	kept := len(have)
	for k := range touched {
		if v, ok := applied[k]; ok {
			have = append(have, v)
		}
	}
	return have, kept
}

// verifyEvery is how many objects a full pass compares between two
// moments it lets peer changes in (verifyLocked): about a millisecond of
// map lookups.
const verifyEvery = 2048

// verifyLocked brings the kernel's FDB entries, neighbours and routes (as
// dumped, sorted, without the touched keys) to want, the wanted state
// itself, for a trusted engine. Every verifyEvery objects it releases e.mu
// for a moment, so that
// a peer change arriving during the comparison (0.3 s at 50,000 peers)
// waits for a chunk of it, not all of it. Keys a change touched meanwhile
// (e.dumpTouched) are left out: the change applied them. If the wanted
// state was replaced meanwhile (a whole peer set), the pass that replaced
// it compared against the applied state, and this one stops and asks for
// another full pass. e.mu must be held.
func (e *engine) verifyLocked(want state, fdbs []fdb, neighs []neigh, routes []route) error {
	gen := e.wanted.gen
	yield := func() bool {
		e.mu.Unlock()
		if h := e.compareHook; h != nil {
			h()
		}
		runtime.Gosched()
		e.mu.Lock()
		return !e.closedLocked() && e.wanted.gen == gen
	}
	touched := e.dumpTouched
	defer func() { e.dumpTouched = nil }()
	anyTouched := touched.any
	var errs []error
	var n int
	var ok bool
	n, errs, ok = verifyKind(e, want.fdbs, fdbs, &e.applied.fdbs, touched.fdbs, compareFDBKey, yield, anyTouched, e.putFDBs, e.delFDBs, "fdb entry", n, errs)
	if ok {
		n, errs, ok = verifyKind(e, want.neighs, neighs, &e.applied.neighs, touched.neighs, compareNeighKey, yield, anyTouched, e.putNeighs, e.delNeighs, "neighbour", n, errs)
	}
	if ok {
		n, errs, ok = verifyKind(e, want.routes, routes, &e.applied.routes, touched.routes, compareRouteKey, yield, anyTouched, e.routeHaveIn(routes, e.putRoutes), e.delRoutes, "route", n, errs)
	}
	e.lastChanges = n // (a peer change meanwhile set its own count)
	if !ok {
		if e.closedLocked() {
			return ErrClosed
		}
		e.kickPass()
		return nil
	}
	if !e.trusted {
		// A change meanwhile could not be applied: the applied state no
		// longer mirrors the kernel, and the next pass lists it again.
		e.kickPass()
	}
	return errors.Join(errs...)
}

// verifyKind is verifyLocked for one kind of object: it adds its changes
// to n and its errors to errs, and reports false when the pass is to stop.
func verifyKind[K comparable, V object[K, V]](e *engine, want map[K]V, have []V, applied *map[K]V, touched map[K]struct{}, keyCmp func(V, K) int,
	yield, anyTouched func() bool, put, del func([]V) []error, kind string, n int, errs []error) (int, []error, bool) {
	puts, dels, ok := diffYielding(want, have, keyCmp, verifyEvery, yield, anyTouched)
	if !ok {
		return n, errs, false
	}
	stale := func(v V) bool { _, t := touched[v.key()]; return t }
	puts = slices.DeleteFunc(puts, stale)
	dels = slices.DeleteFunc(dels, stale)
	failed := func(K) {}
	if e.trusted {
		shared := sameMap(*applied, want)
		if !shared {
			// (Not expected: a trusted engine's applied objects are its
			// wanted ones since its last pass.)
			*applied = maps.Clone(want)
		}
		failed = unshareDrop(applied, &shared)
	}
	c, err := applyChanges(puts, dels, *applied, len(want), failed, put, del, kind)
	if err != nil {
		e.trusted = false // the next pass looks at the kernel again
	}
	return n + c, append(errs, err), true
}

// routeHaveIn returns put wrapped so that it runs with e.routeHave telling
// which keys hold a route of ours in have, sorted by route.compare.
func (e *engine) routeHaveIn(have []route, put func([]route) []error) func([]route) []error {
	return func(rs []route) []error {
		e.routeHave = func(k routeKey) bool { // have is sorted (diffYielding)
			_, found := slices.BinarySearchFunc(have, k, compareRouteKey)
			return found
		}
		defer func() { e.routeHave = nil }()
		return put(rs)
	}
}

// wantAll computes the desired state from the whole peer set, publishes it
// as the wanted state and records what it was computed from.
func (e *engine) wantAll(in input, from wantInputs) state {
	defer hoptrace.Span("desired state", time.Now())
	want, skips := e.dp.desired(in)
	e.wanted.store(want)
	e.wantFrom = from
	e.idx.clean = isClean(want, skips)
	e.logSkips(skips)
	return want
}

// wantInputs are the inputs of a desired state besides the peer set: the
// same peer set with the same inputs gives the same desired state.
type wantInputs struct {
	local     Local
	owned     []int
	connected []netip.Prefix
	foreign   *foreignSet
}

func (a wantInputs) same(b wantInputs) bool {
	return a.local == b.local && slices.Equal(a.owned, b.owned) && slices.Equal(a.connected, b.connected) && a.foreign.equal(b.foreign)
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
	var owned []int
	if o := e.owned.Load(); o != nil {
		owned = *o
	}
	foreign := e.foreign.Load()
	want := e.wantAll(input{local: e.local, peers: e.peers, ext: e.ext, connected: e.connectedCache, foreign: foreign},
		wantInputs{local: e.local, owned: owned, connected: e.connectedCache, foreign: foreign})
	reached := newState()
	var errF, errN, errR error
	var nF, nN, nR int
	reached.fdbs, nF, errF = applyKind(want.fdbs, values(e.applied.fdbs), e.applied.fdbs, e.putFDBs, e.delFDBs, "fdb entry")
	reached.neighs, nN, errN = applyKind(want.neighs, values(e.applied.neighs), e.applied.neighs, e.putNeighs, e.delNeighs, "neighbour")
	had := e.applied.routes
	e.routeHave = func(k routeKey) bool { _, ok := had[k]; return ok }
	reached.routes, nR, errR = applyKind(want.routes, values(e.applied.routes), e.applied.routes, e.putRoutes, e.delRoutes, "route")
	e.routeHave = nil
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
// pass left; a put of an object it held is drift being repaired. When every
// put succeeded, reached is want itself, not a copy: the applied state then
// shares its map with the wanted state (see sameMap), which at 50,000 peers
// saves a map of 100,000 routes.
func applyKind[K comparable, V object[K, V]](want map[K]V, have []V, applied map[K]V, put, del func([]V) []error, kind string) (reached map[K]V, changes int, err error) {
	puts, dels := diff(want, have)
	var failed []K
	changes, err = applyChanges(puts, dels, applied, len(want), func(k K) { failed = append(failed, k) }, put, del, kind)
	if len(failed) == 0 {
		return want, changes, err
	}
	reached = maps.Clone(want)
	for _, k := range failed {
		delete(reached, k)
	}
	return reached, changes, err
}

// sameMap reports whether a and b are one map (not two equal ones).
func sameMap[K comparable, V any](a, b map[K]V) bool {
	return a != nil && reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}

// applyChanges puts then deletes objects of one kind, in a deterministic
// order, logging each at V(2). For each put that fails it calls failed
// with its key (the caller removes it from what it records as applied).
// It returns the number of changes and the joined failures; deletes that
// find the object already gone succeed. nWant is the size of the wanted
// state, for the log.
func applyChanges[K comparable, V object[K, V]](puts, dels []V, applied map[K]V, nWant int, failed func(K), put, del func([]V) []error, kind string) (int, error) {
	if len(puts) == 0 && len(dels) == 0 {
		return 0, nil
	}
	sortObjects(puts)
	sortObjects(dels)
	if v := klog.V(4); v.Enabled() {
		v.InfoS("reconcile diff", "kind", kind, "want", nWant, "put", puts, "delete", dels)
	}
	var errs []error
	if len(puts) > 0 {
		v2 := klog.V(2)
		for _, p := range puts {
			if a, ok := applied[p.key()]; ok && a == p {
				klog.Warningf("%s restored: %s (it was changed or removed outside leased)", kind, p)
				metrics.DriftRepairs.WithLabelValues(kind).Inc()
			} else if v2.Enabled() {
				v2.InfoS("setting "+kind, kind, p.String())
			}
		}
		for i, err := range put(puts) {
			if err != nil {
				failed(puts[i].key())
				metrics.ReconcileErrors.WithLabelValues(kind).Inc()
				errs = append(errs, fmt.Errorf("setting %s %s: %w", kind, puts[i], err))
			}
		}
	}
	if len(dels) > 0 {
		if v2 := klog.V(2); v2.Enabled() {
			for _, d := range dels {
				v2.InfoS("deleting "+kind, kind, d.String())
			}
		}
		for i, err := range del(dels) {
			if err != nil && !isGone(err) {
				// ENOENT/ESRCH: it was already gone, which is what we wanted.
				metrics.ReconcileErrors.WithLabelValues(kind).Inc()
				errs = append(errs, fmt.Errorf("deleting %s %s: %w", kind, dels[i], err))
			}
		}
	}
	return len(puts) + len(dels), errors.Join(errs...)
}

// connected returns the prefixes configured on the external interface
// (per family: see extPrefixes).
func (e *engine) connected() ([]netip.Prefix, error) { return extPrefixes(e.k, e.ext) }

// listRoutes returns our routes of both families (one dump each): routes of
// a family that is now disabled are stale and get deleted.
func (e *engine) listRoutes() ([]route, error) {
	out, _, err := e.listAllRoutes()
	return out, err
}

// listAllRoutes is listRoutes that also returns, from the same dumps, the
// foreign routes that overlap the cluster networks (foreign.go).
func (e *engine) listAllRoutes() ([]route, *foreignSet, error) { return e.listAllRoutesFor(e.local) }

// listAllRoutesFor is listAllRoutes for the networks of local.
func (e *engine) listAllRoutesFor(local Local) ([]route, *foreignSet, error) {
	if nk := e.nhk(); nk != nil {
		return e.listRoutesNH(nk, local)
	}
	var out []route
	var all []netlink.Route
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rs, err := e.k.RouteList(fam)
		if err != nil {
			return nil, nil, err
		}
		for _, r := range rs {
			if r.Table != 0 && r.Table != unix.RT_TABLE_MAIN {
				continue
			}
			if r.Protocol != RouteProtocol {
				all = append(all, r)
				continue
			}
			if rr, ok := routeFromNetlink(r); ok {
				out = append(out, rr)
			}
		}
	}
	return out, newForeignSet(local, all, linkNamer(e.k)), nil
}

// listNeighs returns the permanent neighbour and FDB entries on the owned
// devices: one neighbour dump per family and one FDB dump, through the
// kernel's own dumps where it has them (dumpNeighs), else the library's.
func (e *engine) listNeighs(owned []int) ([]neigh, []fdb, error) {
	if nk := e.nhk(); nk != nil {
		return dumpNeighs(nk, owned, len(e.applied.neighs)+64, len(e.applied.fdbs)+64)
	}
	return e.listNeighsLib(owned)
}

// listNeighsLib is listNeighs through the netlink library (the in-memory
// fake has no dumps of its own).
func (e *engine) listNeighsLib(owned []int) ([]neigh, []fdb, error) {
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

// dumpNeighs is listNeighs through nk's own dumps, which need no e.mu:
// one dump per family, decoded straight into neigh and fdb values (at
// 50,000 vxlan peers the library's decoding allocated 400 MB per pass).
// nHint and fHint are about how many of each to expect.
func dumpNeighs(nk nexthopKernel, owned []int, nHint, fHint int) ([]neigh, []fdb, error) {
	neighs := make([]neigh, 0, nHint)
	fdbs := make([]fdb, 0, fHint)
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6, unix.AF_BRIDGE} {
		n0, f0 := len(neighs), len(fdbs)
		err := nk.NeighDump(fam, func() { neighs, fdbs = neighs[:n0], fdbs[:f0] }, func(n *kneigh) {
			if !slices.Contains(owned, n.Link) {
				return
			}
			if fam != unix.AF_BRIDGE {
				if n.State&netlink.NUD_PERMANENT != 0 && n.IP.IsValid() {
					neighs = append(neighs, neigh{Link: n.Link, IP: n.IP.Unmap(), MAC: net.HardwareAddr(n.MAC).String()})
				}
				return
			}
			if len(n.MAC) == 6 && n.MAC[0]&1 == 0 { // we only create unicast entries
				fdbs = append(fdbs, fdb{Link: n.Link, MAC: net.HardwareAddr(n.MAC).String(), Dst: n.IP.Unmap()})
			}
		})
		if err != nil {
			return nil, nil, err
		}
	}
	return neighs, fdbs, nil
}

// putRoutes replaces the routes whose key holds a route of ours in the
// kernel (e.routeHave) and creates the others with NLM_F_EXCL, so that a
// foreign route that appeared under a peer's key since the foreign set was
// refreshed fails the put (EEXIST) instead of being replaced; a full pass
// is then requested, which refuses the peer.
func (e *engine) putRoutes(rs []route) []error {
	e.touch(rs)
	defer e.burst(len(rs))()
	nk := e.nhk()
	if nk != nil && e.nh.use {
		return e.putRoutesNH(nk, rs)
	}
	errs := e.putPlainRoutes(rs)
	if nk != nil && len(e.nh.ids) > 0 {
		// A plain route replaced one through our nexthop object; the
		// object, now unused, goes with the next full pass.
		for i, r := range rs {
			if errs[i] == nil {
				e.nh.unset(r.key())
			}
		}
	}
	return errs
}

// putPlainRoutes is putRoutes with gateway routes.
func (e *engine) putPlainRoutes(rs []route) []error {
	have := e.routeHave
	nRep := 0
	for _, r := range rs {
		if have != nil && have(r.key()) {
			nRep++
		}
	}
	switch nRep {
	case len(rs):
		return inChunks(rs, e.k.RoutesReplace)
	case 0:
		return e.addRoutes(rs)
	}
	var rep, add []route
	var repI, addI []int
	for i, r := range rs {
		if have(r.key()) {
			rep, repI = append(rep, r), append(repI, i)
		} else {
			add, addI = append(add, r), append(addI, i)
		}
	}
	errs := make([]error, len(rs))
	for j, err := range inChunks(rep, e.k.RoutesReplace) {
		errs[repI[j]] = err
	}
	for j, err := range e.addRoutes(add) {
		errs[addI[j]] = err
	}
	return errs
}

// addRoutes creates routes with NLM_F_EXCL (see putRoutes).
func (e *engine) addRoutes(rs []route) []error {
	errs := inChunks(rs, e.k.RoutesAdd)
	for i, err := range errs {
		if errors.Is(err, unix.EEXIST) {
			errs[i] = fmt.Errorf("%w: a route leased did not install has this destination and metric; it is left alone and the peer refused by the next pass", err)
			e.kickPass()
		}
	}
	return errs
}

// lazyKeys returns a membership test for the keys of rs that indexes them
// on its first call only.
func lazyKeys(rs []route) func(routeKey) bool {
	var idx map[routeKey]struct{}
	return func(k routeKey) bool {
		if idx == nil {
			idx = make(map[routeKey]struct{}, len(rs))
			for _, r := range rs {
				idx[r.key()] = struct{}{}
			}
		}
		_, ok := idx[k]
		return ok
	}
}
func (e *engine) delRoutes(rs []route) []error {
	e.touch(rs)
	defer e.burst(len(rs))()
	if nk := e.nhk(); nk != nil {
		return e.delRoutesNH(nk, rs)
	}
	return inChunks(rs, e.k.RoutesDel)
}
func (e *engine) putNeighs(ns []neigh) []error {
	if e.dumpTouched != nil {
		touchEach(e.dumpTouched.neighs, ns)
	}
	return each(ns, func(n neigh) error { return e.k.NeighSet(n.netlink()) })
}
func (e *engine) delNeighs(ns []neigh) []error {
	if e.dumpTouched != nil {
		touchEach(e.dumpTouched.neighs, ns)
	}
	return each(ns, func(n neigh) error { return e.k.NeighDel(n.netlink()) })
}
func (e *engine) putFDBs(fs []fdb) []error {
	if e.dumpTouched != nil {
		touchEach(e.dumpTouched.fdbs, fs)
	}
	return each(fs, func(f fdb) error { return e.k.NeighSet(f.netlink()) })
}
func (e *engine) delFDBs(fs []fdb) []error {
	if e.dumpTouched != nil {
		touchEach(e.dumpTouched.fdbs, fs)
	}
	return each(fs, func(f fdb) error { return e.k.NeighDel(f.netlink()) })
}

// inChunks converts routes to netlink.Route a chunk at a time, so that a
// pass over thousands of routes does not hold a netlink.Route for each.
func inChunks(rs []route, fn func([]*netlink.Route) []error) []error {
	const chunk = 256
	errs := make([]error, 0, len(rs))
	for len(rs) > 0 {
		n := min(chunk, len(rs))
		errs = append(errs, fn(routesNetlink(rs[:n]))...)
		rs = rs[n:]
	}
	return errs
}

func routesNetlink(rs []route) []*netlink.Route {
	out := make([]*netlink.Route, len(rs))
	for i, r := range rs {
		out[i] = r.netlink()
	}
	return out
}

// each runs fn on every object and returns the outcomes.
func each[V any](vs []V, fn func(V) error) []error {
	errs := make([]error, len(vs))
	for i, v := range vs {
		errs[i] = fn(v)
	}
	return errs
}

// touchedSet collects the keys of the kernel objects the engine changed,
// or whose wanted value a peer change changed, while a full pass dumps the
// kernel or compares without e.mu (see pass). A nil set collects nothing.
type touchedSet struct {
	routes map[routeKey]struct{}
	neighs map[neighKey]struct{}
	fdbs   map[fdbKey]struct{}
}

func newTouchedSet() *touchedSet {
	return &touchedSet{routes: map[routeKey]struct{}{}, neighs: map[neighKey]struct{}{}, fdbs: map[fdbKey]struct{}{}}
}

func (t *touchedSet) any() bool {
	return t != nil && len(t.routes)+len(t.neighs)+len(t.fdbs) > 0
}

func (t *touchedSet) clear() {
	clear(t.routes)
	clear(t.neighs)
	clear(t.fdbs)
}

func (t *touchedSet) routeKeys() map[routeKey]struct{} {
	if t == nil {
		return nil
	}
	return t.routes
}

func (t *touchedSet) neighKeys() map[neighKey]struct{} {
	if t == nil {
		return nil
	}
	return t.neighs
}

func (t *touchedSet) fdbKeys() map[fdbKey]struct{} {
	if t == nil {
		return nil
	}
	return t.fdbs
}

// touchState records the keys of every object of st (a peer change's
// objects gone or added).
func (t *touchedSet) touchState(st state) {
	if t == nil {
		return
	}
	touchKeys(t.routes, st.routes)
	touchKeys(t.neighs, st.neighs)
	touchKeys(t.fdbs, st.fdbs)
}

func touchKeys[K comparable, V any](dst map[K]struct{}, m map[K]V) {
	for k := range m {
		dst[k] = struct{}{}
	}
}

func touchEach[K comparable, V keyed[K]](dst map[K]struct{}, vs []V) {
	for _, v := range vs {
		dst[v.key()] = struct{}{}
	}
}

// touch records the keys of routes put or deleted (see touchedSet).
func (e *engine) touch(rs []route) {
	if e.dumpTouched != nil {
		touchEach(e.dumpTouched.routes, rs)
	}
}
