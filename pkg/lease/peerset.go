package lease

import "github.com/leased/leased/pkg/ipfam"

// PeerSet is the result of Peers kept up to date record by record, so that
// one changed lease costs O(1) instead of a pass over every lease. It gives
// exactly what Peers would give for the same records: whenever a change
// could alter which of two overlapping records wins (a rejected record
// exists, or the changed one is refused), it recomputes everything with
// Peers. Not safe for concurrent use.
type PeerSet struct {
	cfg      *Config
	self     *Record
	records  map[string]*Record // the caller's map, read on recomputes
	accepted map[string]*Record
	rejected map[string]error
	held     heldSet
}

// NewPeerSet filters records (a map the caller keeps updating and reports
// changes of through Update) for cfg and self.
func NewPeerSet(cfg *Config, self *Record, records map[string]*Record) *PeerSet {
	ps := &PeerSet{cfg: cfg, self: self, records: records}
	ps.recompute()
	return ps
}

func (ps *PeerSet) recompute() {
	peers, rejected := Peers(ps.cfg, ps.self, ps.records)
	ps.accepted = make(map[string]*Record, len(peers))
	for _, r := range peers {
		ps.accepted[r.Node] = r
	}
	ps.rejected = rejected
	// The index of held subnets is built by IndexHeld or the first Update
	// that needs it: with tens of thousands of peers that takes
	// milliseconds, which need not delay the agent's first hand-over to
	// the backend.
	ps.held = heldSet{}
}

// IndexHeld builds the index of held subnets that Update needs, unless it
// is built already. The agent calls it after handing the peers over, so
// that the first lease change after a start (or a recompute) does not
// wait for it: at 50,000 peers that is about 40 ms.
func (ps *PeerSet) IndexHeld() { ps.buildHeld() }

// buildHeld indexes the subnets of this host and of the accepted peers,
// unless they are indexed already.
func (ps *PeerSet) buildHeld() {
	if ps.held.v4 != nil {
		return
	}
	ps.held = newHeldSet(len(ps.accepted)+1, ps.self)
	for _, r := range ps.accepted {
		ps.addHeld(r)
	}
}

func (ps *PeerSet) addHeld(r *Record) {
	for _, s := range ipfam.Valid(r.Subnet) {
		ps.held.add(s, r)
	}
}

func (ps *PeerSet) delHeld(r *Record) {
	for _, s := range ipfam.Valid(r.Subnet) {
		ps.held.del(s)
	}
}

// Update takes the change of node's record in the records map (already
// applied there; a missing entry means deleted). It reports whether the
// set of accepted peers changed, and whether it had to recompute it all
// (recomputed): otherwise the only change is node's own entry in Accepted.
func (ps *PeerSet) Update(node string) (changed, recomputed bool) {
	if ps.self != nil && node == ps.self.Node {
		return false, false
	}
	rec := ps.records[node]
	old, wasAccepted := ps.accepted[node]
	if wasAccepted && rec == old {
		return false, false
	}
	if len(ps.rejected) > 0 {
		// A rejected record may win or lose differently now: start over.
		ps.recompute()
		return true, true
	}
	ps.buildHeld()
	if wasAccepted {
		ps.delHeld(old)
		delete(ps.accepted, node)
	}
	if rec == nil {
		return wasAccepted, false
	}
	if err := checkPeer(ps.cfg, ps.self, rec, ps.held); err != nil {
		// Which of two overlapping records wins depends on their age:
		// let Peers decide.
		ps.recompute()
		return true, true
	}
	ps.accepted[node] = rec
	ps.addHeld(rec)
	return true, false
}

// Accepted returns the peers to program, keyed by node. The map is owned by
// the PeerSet; do not modify it.
func (ps *PeerSet) Accepted() map[string]*Record { return ps.accepted }

// Rejected returns the refused records with the reason, keyed by node.
func (ps *PeerSet) Rejected() map[string]error { return ps.rejected }
