package agent

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
)

// peerTracker is the agent's stage between the view of etcd and the
// datapath: it turns the leases the watch has shown into the peers to
// program (lease.PeerSet), and those into changes for the backend. It is
// the one place that computes what changed; the backend applies changes.
// It owns the grace period after a lost lease and the logging of rejected
// leases. Not safe for concurrent use.
type peerTracker struct {
	dirty map[string]bool // nodes whose lease changed since the last update
	set   *lease.PeerSet  // the peer filter, kept up to date with dirty
	reset bool            // the view has a new records map: set is stale
	cfg   *lease.Config   // the config and
	self  *lease.Record   // own lease set was computed for
	// What the datapath was handed (the programmed set) is the peer
	// filter's accepted peers plus kept: after this host lost its own
	// lease (it was cut off from etcd, and so, most likely, were its
	// peers), peers that vanish from etcd are kept until graceUntil unless
	// another node claims their subnet: their leases may have expired for
	// the same reason, and they are re-claiming. The accepted map is not
	// copied: at 50,000 peers a second map of every peer is 1.7 MB.
	kept       map[string]*lease.Record // programmed, not accepted: the grace period's
	graceUntil time.Time
	rejected   map[string]string // node → reason last logged
}

// acceptedBefore is what the peer filter accepted before a refilter: its
// accepted map as it was then (orig) and the old entries of the nodes the
// refilter changed in that map in place (journal).
type acceptedBefore struct {
	orig    map[string]*lease.Record
	journal map[string]*lease.Record // node → its entry in orig before (nil: none)
}

func (b acceptedBefore) get(node string) *lease.Record {
	if r, ok := b.journal[node]; ok {
		return r
	}
	return b.orig[node]
}

// peerChanges is what changed in the programmed peer set: the peers to add
// or replace, and the nodes to drop (sorted).
type peerChanges struct {
	ups     []*lease.Record
	removed []string
}

func (c peerChanges) empty() bool { return len(c.ups) == 0 && len(c.removed) == 0 }

// upserts returns the peers to add or replace, oldest lease first (see
// toPeers). It is computed only when needed: a new backend gets the whole
// set instead.
func (c peerChanges) upserts() []backend.Peer { return sortedPeers(c.ups) }

func newPeerTracker() *peerTracker {
	return &peerTracker{dirty: map[string]bool{}, kept: map[string]*lease.Record{}, rejected: map[string]string{}}
}

// saw notes the leases a watch batch, already applied to v, changed, and
// logs malformed lease records once each.
func (t *peerTracker) saw(b lease.Batch, v *lease.View) {
	if b.Reset {
		t.reset = true // the view has a new records map; set's accepted map stays what was programmed
	}
	for _, e := range b.Events {
		if e.Kind == lease.LeasePut || e.Kind == lease.LeaseDelete {
			t.dirty[e.Node] = true
		}
	}
	for node, err := range v.Malformed {
		if t.rejected[node] != err.Error() {
			klog.Warningf("ignoring malformed lease of %q: %v", node, err)
			t.rejected[node] = err.Error()
		}
	}
}

// changed reports whether leases changed since the last update.
func (t *peerTracker) changed() bool { return len(t.dirty) > 0 }

// update brings the accepted peers in line with v for cfg and this host's
// lease self, and returns how the programmed set changed. Its cost follows
// the leases that changed, except when the filter has to be recomputed
// (new config or own lease, a rejected lease involved).
func (t *peerTracker) update(v *lease.View, cfg *lease.Config, self *lease.Record) peerChanges {
	touched, before := t.refilter(v, cfg, self)
	accepted := t.set.Accepted()
	var ch peerChanges
	var held map[netip.Prefix]bool // subnets accepted peers and self hold (grace only)
	for _, node := range touched {
		acc, old := accepted[node], t.kept[node] // kept nodes were not accepted
		if old == nil {
			old = before.get(node)
		}
		switch {
		case acc != nil:
			delete(t.kept, node)
			if acc != old {
				ch.ups = append(ch.ups, acc)
			}
		case old == nil:
		case !t.graceUntil.IsZero() && !takenBy(old, t.heldOnce(&held, accepted)):
			t.kept[node] = old // vanished during the grace period
		default:
			ch.removed = append(ch.removed, node)
			delete(t.kept, node)
		}
	}
	ch.removed = t.dropKept(ch.removed, held, accepted)
	slices.Sort(ch.removed)
	return ch
}

// refilter brings the peer filter up to date with the leases that changed
// and returns the nodes whose programmed entry may have to change, and
// what the filter accepted before.
func (t *peerTracker) refilter(v *lease.View, cfg *lease.Config, self *lease.Record) ([]string, acceptedBefore) {
	defer clear(t.dirty)
	var before acceptedBefore
	if t.set != nil {
		before.orig = t.set.Accepted()
	}
	if t.set == nil || t.reset || t.cfg != cfg || t.self != self {
		t.set, t.reset, t.cfg, t.self = lease.NewPeerSet(cfg, self, v.Records), false, cfg, self
		t.logRejected(v)
		return t.everyNode(before), before
	}
	var touched []string
	all := false
	for node := range t.dirty {
		// Until the filter recomputes its accepted map, Update may change
		// it in place (also just before recomputing): note the node's old
		// entry first.
		if !all {
			if _, noted := before.journal[node]; !noted {
				if before.journal == nil {
					before.journal = map[string]*lease.Record{}
				}
				before.journal[node] = before.orig[node]
			}
		}
		c, recomputed := t.set.Update(node)
		all = all || recomputed
		if c {
			touched = append(touched, node)
		}
	}
	if all || len(touched) > 0 {
		t.logRejected(v)
	}
	if all {
		return t.everyNode(before), before
	}
	return touched, before
}

// everyNode returns the nodes accepted, accepted before, or kept.
func (t *peerTracker) everyNode(before acceptedBefore) []string {
	accepted := t.set.Accepted()
	out := make([]string, 0, len(accepted))
	for node := range accepted {
		out = append(out, node)
	}
	seen := func(node string) bool {
		_, ok := accepted[node]
		return ok
	}
	for node := range before.orig {
		if !seen(node) {
			out = append(out, node)
		}
	}
	for node := range before.journal {
		if _, ok := before.orig[node]; !ok && !seen(node) {
			out = append(out, node)
		}
	}
	for node := range t.kept {
		_, orig := before.orig[node]
		_, journal := before.journal[node]
		if !seen(node) && !orig && !journal {
			out = append(out, node)
		}
	}
	return out
}

// dropKept adds to removed the peers kept for the grace period that go:
// all once it is over, else those whose subnet another node or this host
// now holds. held is the index of held subnets if update built it already.
func (t *peerTracker) dropKept(removed []string, held map[netip.Prefix]bool, accepted map[string]*lease.Record) []string {
	over := t.graceOver()
	if len(t.kept) == 0 {
		return removed
	}
	for node := range t.kept {
		if over || takenBy(t.kept[node], t.heldOnce(&held, accepted)) {
			removed = append(removed, node)
			delete(t.kept, node)
		}
	}
	return removed
}

// heldOnce returns *held, building it first when nil (see held).
func (t *peerTracker) heldOnce(held *map[netip.Prefix]bool, accepted map[string]*lease.Record) map[netip.Prefix]bool {
	if *held == nil {
		*held = t.held(accepted)
	}
	return *held
}

// logRejected logs each rejected lease once per reason, and forgets
// reasons that no longer apply.
func (t *peerTracker) logRejected(v *lease.View) {
	rejected := t.set.Rejected()
	for node, err := range rejected {
		if t.rejected[node] != err.Error() {
			klog.Warningf("ignoring lease of %q: %v", node, err)
			t.rejected[node] = err.Error()
		}
	}
	for node := range t.rejected {
		_, bad := rejected[node]
		_, malformed := v.Malformed[node]
		if !bad && !malformed {
			delete(t.rejected, node)
		}
	}
}

// all returns the whole programmed set, oldest lease first: what a new
// backend is handed.
func (t *peerTracker) all() []backend.Peer {
	var accepted map[string]*lease.Record
	if t.set != nil {
		accepted = t.set.Accepted()
	}
	recs := make([]*lease.Record, 0, len(accepted)+len(t.kept))
	for _, r := range accepted {
		recs = append(recs, r)
	}
	for _, r := range t.kept {
		recs = append(recs, r)
	}
	return sortedPeers(recs)
}

// counts returns the number of programmed and of rejected peers (the
// malformed ones of v included).
func (t *peerTracker) counts(v *lease.View) (programmed, rejected int) {
	if t.set != nil {
		rejected = len(t.set.Rejected())
		programmed = len(t.set.Accepted())
	}
	return programmed + len(t.kept), rejected + len(v.Malformed)
}

// startGrace keeps vanishing peers for one lease TTL (see programmed).
func (t *peerTracker) startGrace(ttl time.Duration) {
	t.graceUntil = time.Now().Add(ttl)
	klog.InfoS("this host lost its lease; peers whose leases vanish meanwhile stay programmed until they re-claim or the grace period ends", "until", t.graceUntil.Format(time.RFC3339))
}

// extendGrace is called when this host holds its lease again: peers cut
// off from etcd with it re-claim once they reach it again, which may be a
// little later than this host did: their routes stay for one more TTL.
func (t *peerTracker) extendGrace(ttl time.Duration) {
	if t.graceUntil.IsZero() {
		return
	}
	if until := time.Now().Add(ttl); until.After(t.graceUntil) {
		t.graceUntil = until
		klog.V(2).InfoS("lease held again; peers that have not re-claimed theirs stay programmed for one more lease TTL", "until", t.graceUntil.Format(time.RFC3339))
	}
}

// graceEnds returns when the grace period ends (zero: none), for the
// agent's timer.
func (t *peerTracker) graceEnds() time.Time { return t.graceUntil }

// graceOver ends a grace period whose time is up and reports whether it did.
func (t *peerTracker) graceOver() bool {
	if t.graceUntil.IsZero() || !time.Now().After(t.graceUntil) {
		return false
	}
	t.graceUntil = time.Time{}
	klog.InfoS("grace period over; peers without a lease are dropped")
	return true
}

// held returns the subnets the accepted peers and this host hold.
func (t *peerTracker) held(accepted map[string]*lease.Record) map[netip.Prefix]bool {
	held := map[netip.Prefix]bool{}
	for _, r := range accepted {
		for _, s := range r.Subnets() {
			held[s] = true
		}
	}
	if t.self != nil {
		for _, s := range t.self.Subnets() {
			held[s] = true
		}
	}
	return held
}

// takenBy reports whether one of r's subnets is in held.
func takenBy(r *lease.Record, held map[netip.Prefix]bool) bool {
	return slices.ContainsFunc(r.Subnets(), func(s netip.Prefix) bool { return held[s] })
}

// toPeers returns the backend's peers for recs, oldest lease (lowest create
// revision, then node name) first. The backend resolves a conflict between
// two peers (both wanting one kernel object) in favour of the first, so the
// order must not change from one call to the next, and the older holder
// wins as in the peer filter.
func toPeers(recs map[string]*lease.Record) []backend.Peer {
	return sortedPeers(slices.Collect(maps.Values(recs)))
}

// sortedPeers is toPeers for a slice, which it sorts.
func sortedPeers(recs []*lease.Record) []backend.Peer {
	slices.SortFunc(recs, func(a, b *lease.Record) int {
		if c := cmp.Compare(a.Rev, b.Rev); c != 0 {
			return c
		}
		return strings.Compare(a.Node, b.Node)
	})
	out := make([]backend.Peer, 0, len(recs))
	for _, r := range recs {
		out = append(out, toPeer(r))
	}
	return out
}

func toPeer(r *lease.Record) backend.Peer {
	return backend.Peer{
		Node: r.Node, Subnet: r.Subnet, PublicIP: r.PublicIP,
		BackendType: r.BackendType, BackendData: r.BackendData,
	}
}

// prepare builds what the filter needs for the next lease change (the
// index of held subnets), so that the first change after a start does not
// wait for it.
func (t *peerTracker) prepare() {
	if t.set != nil {
		t.set.IndexHeld()
	}
}
