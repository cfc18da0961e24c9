package backend

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"maps"
	"slices"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/hoptrace"
)

// The agent computes what changed in the peer set (one place: its peer
// tracker, from lease.PeerSet) and hands the engine either the whole set
// (SetPeers: after the backend was created) or a change (UpdatePeers). The
// engine does not diff peer sets itself:
//
//   - SetPeers replaces the set and computes the desired state from all of
//     it (quickPassLocked: against what the last pass applied; passLocked
//     when the kernel is not trusted).
//   - UpdatePeers applies the given change to the set. When the kernel is
//     trusted to hold exactly the applied state and the desired state is
//     "clean" (no two peers want an object with the same key, so it is the
//     disjoint union of what each peer wants alone), only the changed
//     peers' objects are computed and applied (applyPeerChangesLocked);
//     otherwise — a new peer colliding with another's subnet or VTEP MAC,
//     an untrusted kernel — the whole set is computed as SetPeers does.
//   - Run's resync timer runs one full pass against the kernel (passLocked).
//
// TestIncrementalMatchesFullPass checks that the change path and the
// whole-set path leave the same kernel state.

// peerIndex locates each peer of the engine's set (engine.peers) by node
// name. Guarded by engine.mu.
type peerIndex struct {
	// pos is each node's position in engine.peers; nil while the set
	// holds two peers with one node name (UpdatePeers then rebuilds the
	// whole set).
	pos map[string]int
	// clean is true when the desired state last computed from the whole
	// set had no collision between peers (see isClean).
	clean bool
}

// peerChanges are the differences between two peer sets.
type peerChanges struct {
	added   []Peer
	removed []Peer
	changed [][2]Peer // old, new
}

func (c peerChanges) empty() bool {
	return len(c.added) == 0 && len(c.removed) == 0 && len(c.changed) == 0
}

func newPeerIndex() peerIndex { return peerIndex{pos: map[string]int{}} }

// rebuild indexes peers by node; pos is nil when a node name repeats.
func (x *peerIndex) rebuild(peers []Peer) {
	x.pos = make(map[string]int, len(peers))
	for i, p := range peers {
		if _, dup := x.pos[p.Node]; dup {
			x.pos = nil
			return
		}
		x.pos[p.Node] = i
	}
}

// samePeer compares two peers by value, BackendData by its bytes.
func samePeer(a, b Peer) bool {
	return a.Node == b.Node && a.Subnet == b.Subnet && a.PublicIP == b.PublicIP &&
		a.BackendType == b.BackendType && bytes.Equal(a.BackendData, b.BackendData)
}

// isClean reports whether a desired state computed from a whole peer set
// is the disjoint union of what each peer wants alone: no peer was skipped
// for wanting an object another peer already has, and no neighbour entry
// was claimed twice (every overlay peer family adds one FDB entry, with a
// unique key, and one neighbour entry).
func isClean(want state, skips []skip) bool {
	for _, s := range skips {
		if s.dup {
			return false
		}
	}
	return len(want.neighs) == len(want.fdbs)
}

// wantedSet is the desired state of the current or last pass. Netlink
// event goroutines compare events with it, so that the agent's own changes
// do not trigger passes while anything else does; it is therefore updated
// before the kernel calls that realise it. Writers hold engine.mu and mu;
// event goroutines read under mu.RLock only.
type wantedSet struct {
	mu  sync.RWMutex
	st  state
	set bool // false before the first pass
	// gen counts the stores: a full pass that compares without
	// engine.mu (verifyLocked) learns from it that the state it
	// compares with was replaced meanwhile. Written with engine.mu held.
	gen uint64
}

// store replaces the wanted state; st must not be modified afterwards
// except through the wantedSet.
func (w *wantedSet) store(st state) {
	w.mu.Lock()
	w.st, w.set = st, true
	w.gen++
	w.mu.Unlock()
}

// read calls fn with the wanted state (nil before the first pass) under
// the read lock; fn must not keep st.
func (w *wantedSet) read(fn func(st *state) bool) bool {
	w.mu.RLock()
	defer w.mu.RUnlock()
	if !w.set {
		return fn(nil)
	}
	return fn(&w.st)
}

// errNotIncremental makes UpdatePeers compute the whole set.
var errNotIncremental = errors.New("backend: change needs a whole-set pass")

// setPeersLocked is SetPeers with e.mu held: the whole set, computed whole.
func (e *engine) setPeersLocked(ctx context.Context, peers []Peer) error {
	first := len(e.peers) == 0
	if !first {
		logPeerChanges(e.peers, peers)
	}
	if len(peers) < len(e.peers) {
		clear(e.peers[len(peers):]) // drop references past the new end
	}
	// Sized once: at 50,000 peers, growing by appends would leave about
	// as much garbage as the set itself during the first pass.
	e.peers = slices.Grow(e.peers[:0], len(peers))
	// The peers' strings and BackendData are kept, not copied: the caller
	// does not modify them (see Backend.SetPeers), and a copy per peer
	// would be one more copy of the fleet's lease data.
	e.peers = append(e.peers, peers...)
	e.peersSet = true
	e.idx.rebuild(e.peers)
	if first {
		logFirstPeers(peers, e.idx.pos != nil)
	}
	return e.quickPassLocked(ctx)
}

// logFirstPeers is logPeerChanges from an empty set. When the summary
// line is all that is logged (more than logEachMax subnets, not -v=2) and
// no node name repeats (unique; then no subnet is counted twice), it only
// counts the subnets instead of indexing them: at 50,000 peers the index
// would be tens of megabytes of garbage at the agent's start.
func logFirstPeers(peers []Peer, unique bool) {
	if unique && !klog.V(2).Enabled() {
		n := 0
		for _, p := range peers {
			for range ipfam.Valid(p.Subnet) {
				n++
			}
		}
		if n > logEachMax {
			logEach("Subnets changed", n, n, 0, 0)
			return
		}
	}
	logPeerChanges(nil, peers)
}

// UpdatePeers applies a change to the peer set: upserts are added or
// replace the peers of their nodes, the nodes in removed are dropped. Its
// cost follows the change only, not the size of the set, whenever the
// change collides with no other peer's objects (see the top of this file).
func (e *engine) UpdatePeers(ctx context.Context, upserts []Peer, removed []string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closedLocked() {
		return ErrClosed
	}
	defer observe("peers", time.Now())
	hoptrace.Stage(hoptrace.Apply)
	if !e.peersSet || e.idx.pos == nil {
		return e.setPeersLocked(ctx, e.patched(upserts, removed))
	}
	pos := e.idx.pos
	var ch peerChanges
	for _, node := range removed {
		i, ok := pos[node]
		if !ok {
			continue
		}
		ch.removed = append(ch.removed, e.peers[i])
		last := len(e.peers) - 1
		e.peers[i] = e.peers[last]
		pos[e.peers[i].Node] = i
		e.peers[last] = Peer{}
		e.peers = e.peers[:last]
		delete(pos, node)
	}
	for _, p := range upserts {
		switch i, ok := pos[p.Node]; {
		case !ok:
			ch.added = append(ch.added, p)
			pos[p.Node] = len(e.peers)
			e.peers = append(e.peers, p)
		case !samePeer(e.peers[i], p):
			ch.changed = append(ch.changed, [2]Peer{e.peers[i], p})
			e.peers[i] = p
		}
	}
	var err error
	switch {
	case ch.empty() && e.trusted && e.started:
		// Nothing to do: applied is the wanted state, which only changes
		// with the peer set or in a full pass.
		e.passes++
		e.lastChanges = 0
	case e.trusted && e.started && e.idx.clean:
		err = e.applyPeerChangesLocked(ctx, ch)
		if errors.Is(err, errNotIncremental) {
			err = e.quickPassLocked(ctx)
		}
	default:
		err = e.quickPassLocked(ctx)
	}
	logChanges(ch) // after the kernel work: routes first, then the lines
	return err
}

// patched returns the peer set with a change applied.
func (e *engine) patched(upserts []Peer, removed []string) []Peer {
	drop := make(map[string]bool, len(removed)+len(upserts))
	for _, n := range removed {
		drop[n] = true
	}
	for _, p := range upserts {
		drop[p.Node] = true
	}
	out := make([]Peer, 0, len(e.peers)+len(upserts))
	for _, p := range e.peers {
		if !drop[p.Node] {
			out = append(out, p)
		}
	}
	return append(out, upserts...)
}

// logChanges logs each subnet that appeared or disappeared ("Subnet added",
// "Subnet removed"), as logPeerChanges does for whole sets. A change larger
// than logEachMax peers (an agent starting in a big cluster) is one summary
// line, with the subnets at -v=2.
func logChanges(ch peerChanges) {
	n := len(ch.added) + len(ch.changed) + len(ch.removed)
	if !logEach("Peers changed", n, len(ch.added), len(ch.changed), len(ch.removed)) {
		return
	}
	for _, p := range ch.added {
		logSubnets("Subnet added", p, Peer{})
	}
	for _, c := range ch.changed {
		logSubnets("Subnet added", c[1], c[0])
	}
	for _, c := range ch.changed {
		logSubnets("Subnet removed", c[0], c[1])
	}
	for _, p := range ch.removed {
		logSubnets("Subnet removed", p, Peer{})
	}
}

// logEachMax is the largest peer change logged subnet by subnet at the
// default level: 5,000 peers would be 10,000 lines, which cost more than
// programming their routes and bury everything else.
const logEachMax = 64

// logEach reports whether a change of n peers (or subnets) is to be logged subnet by
// subnet, after logging its summary when it is not (or at -v=2 both).
func logEach(summary string, n, added, changed, removed int) bool {
	if n <= logEachMax {
		return klog.V(0).Enabled()
	}
	klog.InfoS(summary, "added", added, "changed", changed, "removed", removed,
		"note", fmt.Sprintf("more than %d: each subnet is logged at -v=2", logEachMax))
	return klog.V(2).Enabled()
}

func logSubnets(msg string, p, other Peer) {
	for f, s := range ipfam.Valid(p.Subnet) {
		if s != other.Subnet.Get(f) || p.PublicIP.Get(f) != other.PublicIP.Get(f) {
			klog.InfoS(msg, "node", p.Node, "subnet", s.String(), "via", p.PublicIP.Get(f).String())
		}
	}
}

// applyPeerChangesLocked applies ch against the applied state without
// looking at the other peers. It requires e.trusted, e.started and
// e.idx.clean, and returns errNotIncremental, having changed nothing, when
// a new object collides with one another peer wants.
func (e *engine) applyPeerChangesLocked(ctx context.Context, ch peerChanges) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d, ok := e.objectChanges(ch)
	if !ok {
		return errNotIncremental
	}
	e.passes++
	e.updateSkips(d.oldSkips, d.newSkips)
	return e.applyObjectChangesLocked(d.gone, d.added)
}

// objectChanges are the kernel objects a peer change stops and starts
// wanting, and the skips of the peers before and after.
type objectChanges struct {
	gone, added        state
	oldSkips, newSkips []skip
}

// objectChanges computes what ch changes in the desired state from the
// changed peers alone. ok is false when a new object has the key of one
// that stays wanted or of another new one: the first peer in the set would
// win, which only the whole-set computation knows.
func (e *engine) objectChanges(ch peerChanges) (d objectChanges, ok bool) {
	in := input{local: e.local, ext: e.ext, connected: e.connectedCache, foreign: e.foreign.Load()}
	alone := func(p Peer) (state, []skip) {
		in.peers = []Peer{p}
		return e.dp.desired(in)
	}
	d.gone, d.added = newState(), newState()
	drop := func(p Peer) {
		st, sk := alone(p)
		d.oldSkips = append(d.oldSkips, sk...)
		mergeState(d.gone, st)
	}
	for _, p := range ch.removed {
		drop(p)
	}
	for _, c := range ch.changed {
		drop(c[0])
	}
	conflict := false
	take := func(p Peer) {
		st, sk := alone(p)
		d.newSkips = append(d.newSkips, sk...)
		e.wanted.read(func(w *state) bool {
			conflict = conflict || collides(w.routes, d.gone.routes, d.added.routes, st.routes) ||
				collides(w.neighs, d.gone.neighs, d.added.neighs, st.neighs) ||
				collides(w.fdbs, d.gone.fdbs, d.added.fdbs, st.fdbs)
			return false
		})
		mergeState(d.added, st)
	}
	for _, p := range ch.added {
		take(p)
	}
	for _, c := range ch.changed {
		take(c[1])
	}
	return d, !conflict
}

// mergeState adds the objects of src to dst.
func mergeState(dst, src state) {
	mergeInto(dst.routes, src.routes)
	mergeInto(dst.neighs, src.neighs)
	mergeInto(dst.fdbs, src.fdbs)
}

// applyObjectChangesLocked takes the wanted and applied state, and the
// kernel, from wanting gone to wanting added instead.
func (e *engine) applyObjectChangesLocked(gone, added state) error {
	fPut, fDel := changesOf(e.applied.fdbs, gone.fdbs, added.fdbs)
	nPut, nDel := changesOf(e.applied.neighs, gone.neighs, added.neighs)
	rPut, rDel := changesOf(e.applied.routes, gone.routes, added.routes)
	// The puts of keys that hold a route of ours replace it; the others
	// create theirs without replacing a foreign one (putRoutes).
	var rReplace map[routeKey]bool
	for _, r := range rPut {
		if _, ok := e.applied.routes[r.key()]; ok {
			if rReplace == nil {
				rReplace = map[routeKey]bool{}
			}
			rReplace[r.key()] = true
		}
	}
	// Publish before the kernel calls, so that their events match. A
	// kind whose applied map is the wanted one (applyKind) is updated
	// once, under the wanted set's lock.
	sharedF := sameMap(e.applied.fdbs, e.wanted.st.fdbs)
	sharedN := sameMap(e.applied.neighs, e.wanted.st.neighs)
	sharedR := sameMap(e.applied.routes, e.wanted.st.routes)
	e.dumpTouched.touchState(gone) // for a full pass comparing meanwhile
	e.dumpTouched.touchState(added)
	e.wanted.mu.Lock()
	updateMap(e.wanted.st.fdbs, gone.fdbs, added.fdbs)
	updateMap(e.wanted.st.neighs, gone.neighs, added.neighs)
	updateMap(e.wanted.st.routes, gone.routes, added.routes)
	e.wanted.mu.Unlock()
	if !sharedF {
		updateMap(e.applied.fdbs, gone.fdbs, added.fdbs)
	}
	if !sharedN {
		updateMap(e.applied.neighs, gone.neighs, added.neighs)
	}
	if !sharedR {
		updateMap(e.applied.routes, gone.routes, added.routes)
	}

	// FDB entries, then neighbours, then routes, as in a full pass; a
	// failed put is removed from applied again (which then stops sharing
	// the wanted map: the wanted state keeps the object).
	hoptrace.Stage(hoptrace.Kernel)
	defer hoptrace.Stage(hoptrace.Acked)
	nF, errF := applyChanges(fPut, fDel, nil, len(e.wanted.st.fdbs), unshareDrop(&e.applied.fdbs, &sharedF), e.putFDBs, e.delFDBs, "fdb entry")
	nN, errN := applyChanges(nPut, nDel, nil, len(e.wanted.st.neighs), unshareDrop(&e.applied.neighs, &sharedN), e.putNeighs, e.delNeighs, "neighbour")
	e.routeHave = func(k routeKey) bool { return rReplace[k] }
	nR, errR := applyChanges(rPut, rDel, nil, len(e.wanted.st.routes), unshareDrop(&e.applied.routes, &sharedR), e.putRoutes, e.delRoutes, "route")
	e.routeHave = nil
	e.lastChanges = nF + nN + nR
	err := errors.Join(errF, errN, errR)
	if err != nil {
		e.trusted = false // the next pass looks at the kernel again
	}
	return err
}

// unshareDrop returns a function that deletes a key from *m, first giving
// *m a copy of its own when *shared (it is the wanted state's map, which
// keeps the key). Called with engine.mu held, the only writer of both.
func unshareDrop[K comparable, V any](m *map[K]V, shared *bool) func(K) {
	return func(k K) {
		if *shared {
			*m = maps.Clone(*m)
			*shared = false
		}
		delete(*m, k)
	}
}

// collides reports whether an object of add has the key of one that stays
// wanted (in want and not in gone) or of one already added.
func collides[K comparable, V any](want, gone, added, add map[K]V) bool {
	for k := range add {
		if _, ok := added[k]; ok {
			return true
		}
		if _, ok := want[k]; ok {
			if _, going := gone[k]; !going {
				return true
			}
		}
	}
	return false
}

// changesOf returns the puts and deletes that take the kernel, holding
// applied, from wanting gone to wanting added instead.
func changesOf[K comparable, V comparable](applied, gone, added map[K]V) (puts, dels []V) {
	for k, v := range added {
		if a, ok := applied[k]; !ok || a != v {
			puts = append(puts, v)
		}
	}
	for k := range gone {
		if _, again := added[k]; again {
			continue // replaced in place by its put
		}
		if a, ok := applied[k]; ok {
			dels = append(dels, a)
		}
	}
	return puts, dels
}

// updateMap removes the keys of gone from m and adds added.
func updateMap[K comparable, V any](m, gone, added map[K]V) {
	for k := range gone {
		delete(m, k)
	}
	mergeInto(m, added)
}

func mergeInto[K comparable, V any](dst, src map[K]V) {
	for k, v := range src {
		dst[k] = v
	}
}

// updateSkips logs the skips of changed peers that are new, as logSkips
// does for a whole set.
func (e *engine) updateSkips(old, now []skip) {
	if len(old) == 0 && len(now) == 0 {
		return
	}
	keep := make(map[string]bool, len(now))
	for _, s := range now {
		k := s.logKey()
		keep[k] = true
		if !e.skipped[k] {
			klog.InfoS(s.reason, "node", s.node, "subnet", s.subnet, "gateway", s.gateway)
		}
	}
	for _, s := range old {
		if k := s.logKey(); !keep[k] {
			delete(e.skipped, k)
		}
	}
	for k := range keep {
		e.skipped[k] = true
	}
}

func (s skip) logKey() string { return s.node + "|" + s.subnet.String() + "|" + s.reason }
