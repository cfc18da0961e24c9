package backend

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// nhTable is how the engine uses nexthop objects (kernel_nexthop.go): on a
// kernel that has them, each route of ours (one per peer and family in
// host-gw and vxlan) goes through a nexthop object of its own, created
// with protocol RouteProtocol and an id that no other nexthop object has.
// The desired and applied states keep routes in their gateway form; the
// nexthop form exists only at the kernel boundary: a dumped route through
// one of our nexthop objects reads as a route with that object's gateway,
// and a put of a route whose key already has our nexthop object replaces
// the object only (one message; the route follows).
//
// Nexthop objects of other protocols are never changed or deleted and
// their ids are never used. Ours that no route uses any more (a restart
// that missed a delete, a route deleted by hand) are deleted by the next
// full pass.
type nhTable struct {
	// probed: Start tried a nexthop object once; use: it worked and new
	// routes go through nexthop objects. disabled makes the engine behave
	// as on a kernel without them (tests of the fallback).
	probed, use, disabled bool

	// mu guards ids and byID for the event goroutine; writers also hold
	// engine.mu. ids is the nexthop object each route of ours uses, by
	// route key; byID the reverse.
	mu   sync.RWMutex
	ids  map[nhKey]uint32
	byID map[uint32]nhKey

	// taken are the ids of nexthop objects that are not (or no longer)
	// in ids: other programs' and our orphans, from the last full pass;
	// orphans are ours that no route used then. Both guarded by engine.mu.
	taken   map[uint32]struct{}
	orphans []uint32
	next    uint32
}

// nhKey is a routeKey in the nexthop table's maps: 24 bytes without a
// pointer instead of 40 with one (netip's zone), so that the two maps of
// 100,000 entries at 50,000 peers are smaller and the GC does not scan
// them. nhKeyOf(k).routeKey() == k for every route key of ours (a
// prefix without zone, a metric the kernel can hold).
type nhKey struct {
	addr   [16]byte
	bits   int16
	family uint8 // 0: invalid prefix, 4, 6
	metric uint32
}

func nhKeyOf(k routeKey) nhKey {
	n := nhKey{addr: k.Dst.Addr().As16(), bits: int16(k.Dst.Bits()), metric: uint32(k.Priority)}
	switch a := k.Dst.Addr(); {
	case a.Is4():
		n.family = 4
	case a.Is6():
		n.family = 6
	}
	return n
}

func (n nhKey) routeKey() routeKey {
	var a netip.Addr
	switch n.family {
	case 4:
		a = netip.AddrFrom16(n.addr).Unmap()
	case 6:
		a = netip.AddrFrom16(n.addr)
	default:
		return routeKey{Priority: int(n.metric)}
	}
	return routeKey{netip.PrefixFrom(a, int(n.bits)), int(n.metric)}
}

// nhFirstID is where leased starts allocating nexthop ids (0x4c = "L").
const nhFirstID = 0x4c000001

func (t *nhTable) init() {
	t.ids = map[nhKey]uint32{}
	t.byID = map[uint32]nhKey{}
	t.taken = map[uint32]struct{}{}
	t.next = nhFirstID
}

func (t *nhTable) set(rk routeKey, id uint32) {
	k := nhKeyOf(rk)
	t.mu.Lock()
	if old, ok := t.ids[k]; ok {
		delete(t.byID, old)
	}
	t.ids[k], t.byID[id] = id, k
	t.mu.Unlock()
}

func (t *nhTable) unset(rk routeKey) {
	k := nhKeyOf(rk)
	t.mu.Lock()
	if id, ok := t.ids[k]; ok {
		delete(t.byID, id)
		delete(t.ids, k)
	}
	t.mu.Unlock()
}

func (t *nhTable) lookup(id uint32) (routeKey, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	k, ok := t.byID[id]
	return k.routeKey(), ok
}

// id returns the nexthop object the route of key k uses, if any.
func (t *nhTable) id(k routeKey) (uint32, bool) {
	id, ok := t.ids[nhKeyOf(k)]
	return id, ok
}

// alloc returns an id that no nexthop object known to the engine has.
func (t *nhTable) alloc() uint32 {
	for {
		id := t.next
		t.next++
		if t.next == 0 {
			t.next = 1
		}
		if _, ok := t.taken[id]; ok {
			continue
		}
		if _, ok := t.byID[id]; ok || id == 0 {
			continue
		}
		return id
	}
}

// nhk returns the kernel's nexthop interface, or nil (the unit tests'
// fake, a closed backend).
func (e *engine) nhk() nexthopKernel { return e.k.Nexthops() }

// probeNexthopsLocked decides, once, whether routes go through nexthop
// objects, and logs the choice. e.mu must be held.
func (e *engine) probeNexthopsLocked() {
	if e.nh.probed {
		return
	}
	e.nh.probed = true
	nk := e.nhk()
	switch {
	case nk == nil:
		return
	case e.nh.disabled:
		klog.InfoS("Using plain gateway routes to peers (nexthop objects are turned off)")
		return
	}
	if err := nk.NexthopProbe(); err != nil {
		klog.InfoS("Using plain gateway routes to peers: the kernel refused a nexthop object (nexthop objects need Linux 5.3 or later)", "err", err)
		return
	}
	e.nh.use = true
	e.nhOn.Store(true)
	klog.InfoS("Using nexthop objects for the routes to peers (one per peer and family)")
}

// routeDump is what a route and nexthop dump found, before the engine
// adopts it (adoptDump, under e.mu): our routes in their gateway form, the
// foreign routes of the main table, and the nexthop objects.
type routeDump struct {
	routes  []route
	foreign []netlink.Route
	ids     map[nhKey]uint32    // our routes through our nexthop objects
	byID    map[uint32]nhKey    // ids reversed
	orphans []uint32            // our nexthop objects no route uses
	taken   map[uint32]struct{} // other programs' nexthop objects, and orphans
	maxOwn  uint32
	// neighs and fdbs are the permanent neighbours and the FDB entries
	// on the devices neighOwned, when neighsListed (dumpNeighs).
	neighs       []neigh
	fdbs         []fdb
	neighOwned   []int
	neighsListed bool
}

// dumpRoutesNH lists the nexthop objects and then the routes of both
// families. It touches no engine state, so it runs without e.mu. hint is
// about how many nexthop objects of ours to expect.
func dumpRoutesNH(nk nexthopKernel, hint int) (*routeDump, error) {
	// Our objects, decoded straight from the dump (at 50,000 peers there
	// are 100,000), in a slice sorted by id rather than a map: the dump
	// comes in id order, and the slice is a fifth of the map's size.
	type ownNH struct {
		id     uint32
		link   int32
		gw     netip.Addr
		onLink bool
		used   bool
	}
	var own []ownNH
	d := &routeDump{}
	err := nk.NexthopDump(func() {
		own = make([]ownNH, 0, hint)
		d.taken, d.maxOwn = make(map[uint32]struct{}), 0
	}, func(n nexthop) {
		if n.Proto == uint8(RouteProtocol) && !n.Other {
			own = append(own, ownNH{id: n.ID, link: int32(n.Link), gw: n.Gw, onLink: n.OnLink})
			d.maxOwn = max(d.maxOwn, n.ID)
		} else {
			d.taken[n.ID] = struct{}{}
		}
	})
	if err != nil && !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) {
		return nil, err // (a kernel without nexthop objects refuses the dump)
	}
	cmpID := func(n ownNH, id uint32) int { return cmp.Compare(n.id, id) }
	if !slices.IsSortedFunc(own, func(a, b ownNH) int { return cmp.Compare(a.id, b.id) }) {
		slices.SortFunc(own, func(a, b ownNH) int { return cmp.Compare(a.id, b.id) })
	}
	d.ids = make(map[nhKey]uint32, len(own))
	// About one route per object of ours: sized once, not grown by
	// doubling through 100,000 routes.
	d.routes = make([]route, 0, len(own)+64)
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		n0, a0 := len(d.routes), len(d.foreign)
		err := nk.RouteDump(fam, func() {
			d.routes, d.foreign = d.routes[:n0], d.foreign[:a0]
		}, func(r *kroute) {
			i, ours := -1, false
			if r.NH != 0 {
				if i, ours = slices.BinarySearchFunc(own, r.NH, cmpID); ours {
					own[i].used = true
				}
			}
			if r.Table != 0 && r.Table != unix.RT_TABLE_MAIN {
				return
			}
			if r.Protocol != uint8(RouteProtocol) {
				d.foreign = append(d.foreign, r.netlinkRoute())
				return
			}
			rr := route{Dst: r.Dst, Priority: r.Priority, Gw: r.Gw.Unmap(), Link: r.Link, OnLink: r.Flags&unix.RTNH_F_ONLINK != 0}
			switch {
			case ours:
				n := own[i]
				rr.Gw, rr.Link, rr.OnLink = n.gw, int(n.link), n.onLink
				d.ids[nhKeyOf(rr.key())] = r.NH
			case r.NH != 0:
				// Through a nexthop object not ours: differ from every
				// desired route, so that it is replaced. (A plain
				// gateway route, as an earlier version or a kernel
				// without nexthop objects left it, is adopted as it is:
				// converting it would touch every route at an upgrade;
				// it goes through a nexthop object once its peer
				// changes.)
				rr.Link = -1
			}
			if r.Type != unix.RTN_UNICAST || r.Multipath {
				rr.Link = -1
			}
			d.routes = append(d.routes, rr)
		})
		if err != nil {
			return nil, err
		}
	}
	for _, n := range own {
		if !n.used {
			d.orphans = append(d.orphans, n.id)
			d.taken[n.id] = struct{}{}
		}
	}
	d.byID = make(map[uint32]nhKey, len(d.ids))
	for k, id := range d.ids {
		d.byID[id] = k
	}
	return d, nil
}

// adoptDump makes the nexthop table follow d and returns our routes and
// the foreign set. touched are the route keys the engine changed since
// the dump began (nil: none, the dump ran under e.mu): for them the
// applied state, not the dump, tells what the kernel holds. e.mu must be
// held.
//
// The routes it returns are the dump's own, in their order, followed by
// those of the touched keys: kept tells how many are the dump's.
func (e *engine) adoptDump(d *routeDump, local Local, touched map[routeKey]struct{}) (routes []route, kept int, fs *foreignSet) {
	routes = d.routes
	if len(touched) > 0 {
		routes = slices.DeleteFunc(routes, func(r route) bool { _, t := touched[r.key()]; return t })
	}
	kept = len(routes)
	if len(touched) > 0 {
		for k := range touched {
			nk := nhKeyOf(k)
			if old, ok := d.ids[nk]; ok {
				delete(d.ids, nk)
				delete(d.byID, old)
			}
			if r, ok := e.applied.routes[k]; ok {
				routes = append(routes, r)
				if id, ok := e.nh.id(k); ok {
					d.ids[nk], d.byID[id] = id, nk
				}
			}
		}
		// An object created since is not an orphan; one deleted since
		// is deleted again harmlessly (ENOENT).
		kept2 := d.orphans[:0]
		for _, id := range d.orphans {
			if _, now := e.nh.byID[id]; !now {
				kept2 = append(kept2, id)
			}
		}
		d.orphans = kept2
	}
	e.nh.mu.Lock()
	e.nh.ids, e.nh.byID = d.ids, d.byID
	e.nh.mu.Unlock()
	e.nh.orphans = d.orphans
	e.nh.taken = d.taken
	if d.maxOwn >= e.nh.next && d.maxOwn != ^uint32(0) {
		e.nh.next = d.maxOwn + 1
	}
	return routes, kept, newForeignSet(local, d.foreign, linkNamer(e.k))
}

// listRoutesNH is listAllRoutesFor on a kernel with its own dumps, under
// e.mu.
func (e *engine) listRoutesNH(nk nexthopKernel, local Local) ([]route, *foreignSet, error) {
	d, err := dumpRoutesNH(nk, len(e.nh.byID))
	if err != nil {
		return nil, nil, err
	}
	routes, _, fs := e.adoptDump(d, local, nil)
	return routes, fs, nil
}

// gcNexthopsLocked deletes our nexthop objects that no route used at the
// last full pass's dump. e.mu must be held.
func (e *engine) gcNexthopsLocked() error {
	nk := e.nhk()
	if nk == nil || len(e.nh.orphans) == 0 {
		return nil
	}
	var errs []error
	for i, err := range nk.NexthopsDel(e.nh.orphans) {
		if err != nil && !isGone(err) {
			errs = append(errs, fmt.Errorf("deleting unused nexthop object %d: %w", e.nh.orphans[i], err))
			continue
		}
		klog.V(2).InfoS("deleted unused nexthop object", "id", e.nh.orphans[i])
		delete(e.nh.taken, e.nh.orphans[i])
	}
	e.nh.orphans = e.nh.orphans[:0]
	return errors.Join(errs...)
}

func nexthopOf(id uint32, r route) nexthop {
	return nexthop{ID: id, Gw: r.Gw, Link: r.Link, OnLink: r.OnLink}
}

// putRoutesNH is putRoutes through nexthop objects: a route whose key
// already goes through our nexthop object changes that object only; any
// other gets a new object (created with NLM_F_EXCL, so another program's
// object is never replaced) and then its route, replacing our route of
// that key (e.routeHave) or created with NLM_F_EXCL.
func (e *engine) putRoutesNH(nk nexthopKernel, rs []route) []error {
	// In chunks, so that a first pass over 100,000 routes does not hold
	// its messages for all of them at once.
	const chunk = 2048
	if len(rs) <= chunk {
		return e.putRoutesNHChunk(nk, rs)
	}
	errs := make([]error, 0, len(rs))
	for len(rs) > 0 {
		n := min(chunk, len(rs))
		errs = append(errs, e.putRoutesNHChunk(nk, rs[:n])...)
		rs = rs[n:]
	}
	return errs
}

func (e *engine) putRoutesNHChunk(nk nexthopKernel, rs []route) []error {
	errs := make([]error, len(rs))
	var repNH, newNH []nexthop
	var repI, newI []int
	for i, r := range rs {
		if id, ok := e.nh.id(r.key()); ok {
			repNH, repI = append(repNH, nexthopOf(id, r)), append(repI, i)
		} else {
			id := e.nh.alloc()
			// Known before the kernel announces it, for the event filter.
			e.nh.set(r.key(), id)
			newNH, newI = append(newNH, nexthopOf(id, r)), append(newI, i)
		}
	}
	if len(repNH) > 0 {
		for j, err := range nk.NexthopsPut(repNH, true) {
			errs[repI[j]] = err
		}
	}
	if len(newNH) == 0 {
		return errs
	}
	var rep, add []nhRoute
	var repJ, addJ []int // indexes into newNH
	for j, err := range nk.NexthopsPut(newNH, false) {
		r := rs[newI[j]]
		if err != nil {
			e.nh.unset(r.key())
			if errors.Is(err, unix.EEXIST) {
				// Another program created an object with this id since
				// the last dump: never ours to replace.
				e.nh.taken[newNH[j].ID] = struct{}{}
				err = fmt.Errorf("%w: nexthop object %d was created by another program meanwhile; left alone, another id is used on the next pass", err, newNH[j].ID)
				e.kickPass()
			}
			errs[newI[j]] = err
			continue
		}
		nr := nhRoute{Dst: r.Dst, Priority: r.Priority, NH: newNH[j].ID}
		if e.routeHave != nil && e.routeHave(r.key()) {
			rep, repJ = append(rep, nr), append(repJ, j)
		} else {
			add, addJ = append(add, nr), append(addJ, j)
		}
	}
	var undo []uint32
	settle := func(js []int, rerrs []error) {
		for x, err := range rerrs {
			j := js[x]
			if err == nil {
				continue
			}
			e.nh.unset(rs[newI[j]].key())
			undo = append(undo, newNH[j].ID)
			if errors.Is(err, unix.EEXIST) {
				err = fmt.Errorf("%w: a route leased did not install has this destination and metric; it is left alone and the peer refused by the next pass", err)
				e.kickPass()
			}
			errs[newI[j]] = err
		}
	}
	if len(rep) > 0 {
		settle(repJ, nk.NHRoutesPut(rep, true))
	}
	if len(add) > 0 {
		settle(addJ, nk.NHRoutesPut(add, false))
	}
	if len(undo) > 0 {
		// Objects whose route failed: not left behind.
		nk.NexthopsDel(undo)
	}
	return errs
}

// delRoutesNH deletes routes of ours on a kernel with nexthop objects: by
// destination, metric and protocol only (a delete naming a gateway or
// device does not match a route through a nexthop object), then the
// nexthop objects they used.
func (e *engine) delRoutesNH(nk nexthopKernel, rs []route) []error {
	del := make([]nhRoute, len(rs))
	for i, r := range rs {
		del[i] = nhRoute{Dst: r.Dst, Priority: r.Priority}
	}
	errs := nk.NHRoutesDel(del)
	var ids []uint32
	for i, r := range rs {
		if id, ok := e.nh.id(r.key()); ok && (errs[i] == nil || isGone(errs[i])) {
			e.nh.unset(r.key())
			ids = append(ids, id)
		}
	}
	if len(ids) > 0 {
		for i, err := range nk.NexthopsDel(ids) {
			if err != nil && !isGone(err) {
				// Left for the next full pass's collection.
				klog.ErrorS(err, "deleting a nexthop object; retried by the next full pass", "id", ids[i])
			}
		}
	}
	return errs
}

// nexthopEventMatters reports whether a nexthop event shows the kernel
// departing from what the engine keeps: one of our objects deleted, or
// changed to something other than its route's wanted gateway.
func (e *engine) nexthopEventMatters(typ uint16, n nexthop) bool {
	if n.Proto != uint8(RouteProtocol) && typ == unix.RTM_NEWNEXTHOP {
		return false
	}
	key, ours := e.nh.lookup(n.ID)
	if !ours {
		return false // not (or no longer) ours; a full pass collects strays
	}
	if typ == unix.RTM_DELNEXTHOP {
		return true
	}
	return e.wanted.read(func(w *state) bool {
		if w == nil {
			return true
		}
		r, in := w.routes[key]
		return !in || r.Gw != n.Gw || r.Link != n.Link || r.OnLink != n.OnLink
	})
}

// watchNexthops requests a pass for each nexthop event that matters, until
// ctx is done. The kernel flushes (without RTM_DELROUTE for IPv4) the
// routes through a deleted nexthop object, so this is how such drift is
// seen without dumping the route table.
func (e *engine) watchNexthops(ctx context.Context, nk nexthopKernel) {
	for ctx.Err() == nil {
		if !e.nhOn.Load() { // plain routes (so far): nothing to watch
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		err := nk.SubscribeNexthops(ctx, func(typ uint16, n nexthop) {
			if e.nexthopEventMatters(typ, n) {
				klog.V(4).InfoS("netlink event", "nexthop", n.String(), "type", typ)
				e.kickPass()
			}
		})
		switch {
		case err == nil || ctx.Err() != nil:
		case isOverflow(err) && e.inBurst():
			// Mostly the agent's own events were lost (see inBurst).
			klog.InfoS("netlink events overflowed while leased programmed many kernel objects; subscribing again, the kernel is compared in full at the next resync", "kind", "nexthop", "err", err)
			e.passDue.Store(true)
		default:
			klog.ErrorS(err, "netlink subscription failed; subscribing again", "kind", "nexthop")
			e.kickPass() // events may have been lost
		}
		select {
		case <-ctx.Done():
		case <-time.After(resubscribeDelay):
		}
	}
}
