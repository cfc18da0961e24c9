package agent

import (
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
)

// trackerHarness drives a peer tracker as the agent does, with lease
// changes made directly in the view, and keeps the set the datapath would
// hold by applying the tracker's changes to it.
type trackerHarness struct {
	t    *testing.T
	cfg  *lease.Config
	self *lease.Record
	view lease.View
	tr   *peerTracker
	rev  int64
	held []backend.Peer // the datapath's set, changes applied
	last peerChanges
}

func newTrackerHarness(t *testing.T) *trackerHarness {
	cfg, _, err := lease.ParseConfig([]byte(`{"Network":"10.100.0.0/16","Backend":{"Type":"host-gw"}}`))
	if err != nil {
		t.Fatal(err)
	}
	h := &trackerHarness{t: t, cfg: cfg, tr: newPeerTracker()}
	h.self = h.record("self", 1)
	h.view.Apply(lease.Batch{Reset: true, Rev: 1})
	h.view.Records["self"] = h.self
	return h
}

func (h *trackerHarness) record(node string, third int) *lease.Record {
	h.rev++
	return &lease.Record{Node: node, Subnet: ipfam.Pair[netip.Prefix]{V4: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 100, byte(third), 0}), 24)},
		PublicIP: ipfam.Pair[netip.Addr]{V4: netip.AddrFrom4([4]byte{192, 168, 1, byte(third)})}, BackendType: backend.TypeHostGW, Rev: h.rev}
}

// put and del change a lease in the view and tell the tracker.
func (h *trackerHarness) put(node string, third int) {
	r := h.record(node, third)
	h.view.Records[node] = r
	h.tr.saw(lease.Batch{Rev: h.rev, Events: []lease.Event{{Kind: lease.LeasePut, Node: node, Record: r}}}, &h.view)
}

func (h *trackerHarness) del(node string) {
	delete(h.view.Records, node)
	h.tr.saw(lease.Batch{Events: []lease.Event{{Kind: lease.LeaseDelete, Node: node}}}, &h.view)
}

// step runs one update and applies its changes to held.
func (h *trackerHarness) step() {
	h.last = h.tr.update(&h.view, h.cfg, h.self)
	h.held = patchPeers(h.held, h.last.upserts(), h.last.removed)
}

func (h *trackerHarness) heldNodes() []string {
	var out []string
	for _, p := range h.held {
		out = append(out, p.Node)
	}
	slices.Sort(out)
	return out
}

func (h *trackerHarness) want(what string, nodes ...string) {
	h.t.Helper()
	if got := h.heldNodes(); !slices.Equal(got, nodes) {
		h.t.Fatalf("%s: the datapath holds %v, want %v", what, got, nodes)
	}
	// The set the tracker reports as programmed is the one the changes led to.
	var all []string
	for _, p := range h.tr.all() {
		all = append(all, p.Node)
	}
	slices.Sort(all)
	if !slices.Equal(all, nodes) {
		h.t.Fatalf("%s: the tracker's whole set is %v, the changes led to %v", what, all, nodes)
	}
}

// The peer tracker hands the datapath changes, not sets: one lease changed
// is one upsert, one lease gone one removal, an unchanged view nothing.
func TestPeerTrackerHandsChanges(t *testing.T) {
	h := newTrackerHarness(t)
	for i := range 50 {
		h.put(fmt.Sprintf("p%02d", i), 10+i)
	}
	h.step()
	if len(h.last.ups) != 50 || len(h.last.removed) != 0 {
		t.Fatalf("first update: %d upserts, %d removals, want 50 and 0", len(h.last.ups), len(h.last.removed))
	}
	for i, p := range h.last.upserts()[1:] { // oldest lease first
		if p.Node < h.last.upserts()[i].Node {
			t.Fatalf("upserts not oldest first: %s after %s", p.Node, h.last.upserts()[i].Node)
		}
	}
	h.step()
	if !h.last.empty() {
		t.Fatalf("nothing changed, yet the tracker hands %+v", h.last)
	}
	h.put("p07", 200) // moved to another subnet
	h.step()
	if len(h.last.ups) != 1 || h.last.upserts()[0].Node != "p07" || len(h.last.removed) != 0 {
		t.Fatalf("one lease changed: got %+v", h.last)
	}
	h.del("p08")
	h.step()
	if len(h.last.ups) != 0 || !slices.Equal(h.last.removed, []string{"p08"}) {
		t.Fatalf("one lease gone: got %+v", h.last)
	}
	if len(h.held) != 49 {
		t.Fatalf("the datapath holds %d peers, want 49", len(h.held))
	}
	// A lease that overlaps another is rejected (the filter recomputes
	// everything): the change is still only that lease, not the whole set.
	h.put("thief", 12) // p02's subnet, younger
	h.step()
	if !h.last.empty() {
		t.Fatalf("a rejected lease: got %+v, want no change", h.last)
	}
	h.del("p02") // the older holder leaves: the thief is accepted
	h.step()
	if !slices.Equal(h.last.removed, []string{"p02"}) || len(h.last.ups) != 1 || h.last.upserts()[0].Node != "thief" {
		t.Fatalf("the older holder left: got %+v, want p02 removed and thief added", h.last)
	}
}

// After this host lost its lease, peers whose leases vanish stay programmed
// (no removal is handed to the datapath) until the grace period ends or
// another node holds their subnet; changes go as changes throughout.
func TestPeerTrackerGrace(t *testing.T) {
	h := newTrackerHarness(t)
	h.put("a", 10)
	h.put("b", 11)
	h.put("c", 12)
	h.step()
	h.want("start", "a", "b", "c")

	h.tr.startGrace(time.Hour)
	h.del("a")
	h.del("b")
	h.step()
	if !h.last.empty() {
		t.Fatalf("leases vanished during the grace period: got %+v, want no change", h.last)
	}
	h.want("grace", "a", "b", "c")

	h.put("d", 13) // a new peer during the grace period: just that one
	h.step()
	if len(h.last.ups) != 1 || h.last.upserts()[0].Node != "d" || len(h.last.removed) != 0 {
		t.Fatalf("new peer during the grace period: got %+v", h.last)
	}
	h.put("thief", 10) // a's subnet, taken by another node: a goes
	h.step()
	if !slices.Equal(h.last.removed, []string{"a"}) || len(h.last.ups) != 1 || h.last.upserts()[0].Node != "thief" {
		t.Fatalf("a's subnet taken: got %+v, want a removed and thief added", h.last)
	}
	h.want("subnet taken", "b", "c", "d", "thief")

	h.put("b", 11) // b re-claims: it stays, now as an accepted peer
	h.step()
	h.del("b")
	h.step()
	if len(h.last.removed) != 0 {
		t.Fatalf("b vanished again within the grace period: got %+v, want it kept", h.last)
	}

	h.tr.graceUntil = time.Now().Add(-time.Second) // the grace period is over
	h.step()
	if !slices.Equal(h.last.removed, []string{"b"}) || len(h.last.ups) != 0 {
		t.Fatalf("grace period over: got %+v, want b removed", h.last)
	}
	if !h.tr.graceEnds().IsZero() {
		t.Fatal("grace period still set after it ended")
	}
	h.want("after grace", "c", "d", "thief")
	h.del("c")
	h.step()
	if !slices.Equal(h.last.removed, []string{"c"}) {
		t.Fatalf("a lease gone after the grace period: got %+v, want c removed", h.last)
	}
}

// The tracker keeps no copy of the accepted set: its changes must still
// lead the datapath to exactly the filter's accepted peers when one update
// mixes changes the filter makes in place with one that makes it recompute
// (an overlapping lease), and after the view is listed anew (a new records
// map). Random batches of puts (some onto another node's subnet) and
// deletes, checked after each update against lease.Peers from scratch.
func TestPeerTrackerChangesMatchFilter(t *testing.T) {
	for seed := range uint64(10) {
		r := rand.New(rand.NewPCG(seed, 2))
		h := newTrackerHarness(t)
		for step := range 200 {
			for range 1 + r.IntN(5) {
				node := fmt.Sprintf("n%d", r.IntN(30))
				if _, ok := h.view.Records[node]; ok && r.IntN(3) == 0 {
					h.del(node)
				} else {
					h.put(node, 10+r.IntN(40)) // subnets repeat: some leases are refused
				}
			}
			if r.IntN(15) == 0 { // a new listing: a new records map
				h.view.Records = maps.Clone(h.view.Records)
				h.tr.saw(lease.Batch{Reset: true, Rev: h.rev}, &h.view)
			}
			h.step()
			peers, _ := lease.Peers(h.cfg, h.self, h.view.Records)
			var want []string
			for _, p := range peers {
				want = append(want, p.Node)
				i := slices.IndexFunc(h.held, func(q backend.Peer) bool { return q.Node == p.Node })
				if i >= 0 && h.held[i].Subnet != p.Subnet {
					t.Fatalf("seed %d step %d: the datapath holds %s with %v, the lease says %v", seed, step, p.Node, h.held[i].Subnet, p.Subnet)
				}
			}
			slices.Sort(want)
			h.want(fmt.Sprintf("seed %d step %d", seed, step), want...)
		}
	}
}
