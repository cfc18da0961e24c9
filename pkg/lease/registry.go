package lease

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"
)

// ErrNoFreeSubnet is the sentinel for "out of subnets"; Acquire wraps it in
// an *ExhaustedError that tells which range and how many are in use.
var ErrNoFreeSubnet = errors.New("lease: out of subnets")

// ExhaustedError says that a pool has no free subnet.
type ExhaustedError struct {
	Pool  *Pool
	InUse int
	// Excluded are the host's own routes that left out the rest of the
	// range (Claim.Exclude), if any.
	Excluded []Excluded
}

func (e *ExhaustedError) Error() string {
	if len(e.Excluded) > 0 {
		return fmt.Sprintf("out of subnets in %s: %d of %s in use and the others overlap routes of this host (%s); move those routes out of the network, raise SubnetMax/IPv6SubnetMax, widen the network or remove stale leases (waiting for one to free up)",
			e.Pool, e.InUse, e.Pool.count(), excludedSummary(e.Excluded))
	}
	return fmt.Sprintf("out of subnets in %s: %d of %s in use; raise SubnetMax/IPv6SubnetMax, widen the network or remove stale leases (waiting for one to free up)",
		e.Pool, e.InUse, e.Pool.count())
}

func (e *ExhaustedError) Is(target error) bool { return target == ErrNoFreeSubnet }

// Registry reads and writes leases in etcd under one key prefix. It is safe
// for concurrent use; it does not own the client.
type Registry struct {
	cli  *clientv3.Client
	keys Keys
}

// NewRegistry returns a registry under prefix ("" means DefaultPrefix).
func NewRegistry(cli *clientv3.Client, prefix string) *Registry {
	return &Registry{cli: cli, keys: NewKeys(prefix)}
}

// Keys returns the registry's key layout.
func (r *Registry) Keys() Keys { return r.keys }

// Claim describes the lease a host asks for.
type Claim struct {
	Node string
	// PublicIP is the host's public address per family (Record.PublicIP).
	PublicIP    ipfam.Pair[netip.Addr]
	BackendType string
	BackendData json.RawMessage
	// Hint are subnets the host used before (e.g. read back from
	// subnet.env); they are tried after the host's records in etcd.
	Hint ipfam.Pair[netip.Prefix]
	// Keep are the subnets the host holds now and serves; they are tried
	// first, before a reservation: a running host is never moved.
	Keep ipfam.Pair[netip.Prefix]
	// Own lists the etcd leases, besides the one the claim is made under,
	// that earlier runs of this agent on this machine granted (see
	// OwnLeases). Keys carrying c.Node under one of them are this host's
	// own and are taken over; keys carrying c.Node under any other live
	// lease belong to another host with the same node name, and Acquire
	// returns a *ConflictError instead of claiming.
	Own []clientv3.LeaseID
	// NoHistory says that this machine has no record of earlier runs (no
	// lease file: the first start since boot, or since an upgrade from a
	// version that kept none). Then the keys of c.Node under another lease
	// are taken over only when that lease's record names exactly this
	// host's public addresses (c.PublicIP), which no other
	// live host can have.
	NoHistory bool
	// Exclude are the host's own routes: no subnet overlapping one is
	// claimed (see Excluded).
	Exclude []Excluded
}

// Acquire looks at probeSize random candidates per family in one read
// (probeRounds times at most) before it lists every taken subnet of the
// family and picks from the gaps. With the range 76% full, one round finds
// a free subnet with probability 1-0.76^32 > 0.9998.
const (
	probeSize   = 32
	probeRounds = 3
)

// Acquire claims one subnet per family enabled in cfg for c.Node, all
// attached to sess's lease, and publishes the lease record. It prefers, in
// order: c.Keep* (the subnets the running host serves), the node's
// reservation, the node's current lease record, the subnets the node held
// last (its affinity record), c.Hint*; then a random free subnet. Every
// claim is an etcd transaction that succeeds only if no other node holds
// the subnet and no other host holds the node's record; a lost race moves
// on to another candidate. Keys carrying c.Node are taken over only when
// they are this host's own (see Claim.Own); otherwise Acquire claims
// nothing and returns a *ConflictError. It returns an error wrapping
// ErrNoFreeSubnet when a pool is full, and ctx's error when cancelled.
func (r *Registry) Acquire(ctx context.Context, leaseID clientv3.LeaseID, cfg *Config, c Claim) (*Record, error) {
	if err := ValidNodeName(c.Node); err != nil {
		return nil, err
	}
	st, err := r.readClaim(ctx, leaseID, c)
	if err != nil {
		return nil, err
	}
	fams, err := st.families(cfg, c, r.keys)
	if err != nil {
		return nil, err
	}
	return r.claim(ctx, leaseID, c, st, fams)
}

// claimState is what Acquire read of the node's keys before it claims.
type claimState struct {
	own    ownSet  // the etcd leases whose keys of the node are this host's
	prev   *Record // the node's lease record; nil when there is none or it is malformed
	cur    stored  // the node's record as read; Rev 0 when there is none
	aff    affinity
	affVal []byte // the affinity record as stored; nil when there is none
	// mine is the node's reservation; reservedForOthers the subnets
	// reserved for other nodes.
	mine              affinity
	reservedForOthers map[netip.Prefix]string
}

// readClaim reads, in one transaction, the node's lease record, its
// affinity record and every reservation. It returns a *ConflictError when
// the node's record is held under an etcd lease that is not this host's
// (see Claim.Own).
func (r *Registry) readClaim(ctx context.Context, leaseID clientv3.LeaseID, c Claim) (*claimState, error) {
	k := r.keys
	resp, err := r.cli.Txn(ctx).Then(
		clientv3.OpGet(k.Lease(c.Node)),
		clientv3.OpGet(k.Node(c.Node)),
		clientv3.OpGet(k.Reservations(), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, fmt.Errorf("reading lease records of %s: %w", c.Node, err)
	}
	st := &claimState{own: ownSet{int64(leaseID): true}}
	for _, id := range c.Own {
		st.own[int64(id)] = true
	}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		if err := r.adoptRecord(ctx, c, kvs[0], st); err != nil {
			return nil, err
		}
	}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		st.aff, _ = decodeAffinity(kvs[0].Value)
		st.affVal = kvs[0].Value
	}
	st.mine, st.reservedForOthers = r.reservations(c.Node, resp.Responses[2].GetResponseRange().Kvs)
	return st, nil
}

// adoptRecord sets st.prev and st.cur from the node's lease record kv,
// if it is this host's own: held under one of st.own, or, with
// c.NoHistory, naming exactly this host's public addresses (then its lease
// joins st.own). Otherwise it returns a *ConflictError.
func (r *Registry) adoptRecord(ctx context.Context, c Claim, kv *mvccpb.KeyValue, st *claimState) error {
	rec, derr := DecodeRecord(c.Node, kv.Value)
	if !st.own[kv.Lease] {
		if c.NoHistory && derr == nil && kv.Lease != 0 && sameAddrs(rec, c) {
			klog.InfoS("taking over the lease keys of this host's previous run (same node name and public addresses)", "node", c.Node, "lease", fmt.Sprintf("%x", kv.Lease))
			st.own[kv.Lease] = true
		} else {
			return r.conflict(ctx, c.Node, string(kv.Key), kv)
		}
	}
	st.cur = stored{Rev: kv.ModRevision, Value: kv.Value, Lease: kv.Lease}
	if st.prev = rec; derr != nil {
		klog.Warningf("ignoring this node's own malformed lease record: %v", derr)
		st.prev = nil
	} else {
		st.prev.Lease = kv.Lease
	}
	return nil
}

// reservations returns node's reservation and the subnets reserved for
// other nodes, from the reservation keys kvs; malformed ones are logged
// and ignored.
func (r *Registry) reservations(node string, kvs []*mvccpb.KeyValue) (mine affinity, reservedForOthers map[netip.Prefix]string) {
	reservedForOthers = map[netip.Prefix]string{}
	for _, kv := range kvs {
		other := strings.TrimPrefix(string(kv.Key), r.keys.Reservations())
		a, err := decodeAffinity(kv.Value)
		if err != nil {
			klog.Warningf("ignoring malformed reservation %s: %v", kv.Key, err)
			continue
		}
		if other == node {
			mine = a
			continue
		}
		for _, s := range ipfam.Valid(a.subnets()) {
			reservedForOthers[s] = other
		}
	}
	return mine, reservedForOthers
}

// families returns Acquire's state for each family cfg enables, with the
// subnets to try first in the order Acquire documents, and logs a
// reservation it cannot or will not use.
func (st *claimState) families(cfg *Config, c Claim, k Keys) ([]*family, error) {
	fams := []*family{}
	for fam, pool := range cfg.Pools().All() {
		if pool == nil {
			continue
		}
		f := &family{fam: fam, pool: pool, taken: map[netip.Prefix]bool{}, reserved: st.reservedForOthers, own: st.own,
			keep: c.Keep.Get(fam), reservation: st.mine.subnets().Get(fam)}
		f.prefs = []netip.Prefix{c.Keep.Get(fam), st.mine.subnets().Get(fam), st.prev.subnet(fam), st.aff.subnets().Get(fam), c.Hint.Get(fam)}
		fams = append(fams, f)
	}
	if len(fams) == 0 {
		return nil, errors.New("lease: the config enables no address family")
	}
	for _, f := range fams {
		f.setExcluded(c.Exclude)
		if r := f.reservation; r.IsValid() && !f.pool.Contains(r) {
			klog.Warningf("reservation %s of %s is not a subnet of %s; ignoring it (fix %s)", r, c.Node, f.pool, k.Reservation(c.Node))
		}
		if r := f.reservation; r.IsValid() && f.keep.IsValid() && r != f.keep && f.pool.Contains(f.keep) {
			klog.InfoS("this host serves another subnet than its reservation; it keeps the one it serves (restart leased to move it to the reservation)", "node", c.Node, "serves", f.keep, "reserved", r)
		}
	}
	return fams, nil
}

// claim picks a candidate per family and commits them with the node's
// record, picking again after each lost race, until a commit succeeds.
func (r *Registry) claim(ctx context.Context, leaseID clientv3.LeaseID, c Claim, st *claimState, fams []*family) (*Record, error) {
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		for _, f := range fams {
			if err := r.pick(ctx, f, c.Node); err != nil {
				return nil, err
			}
		}
		rec := st.record(c, fams)
		ok, err := r.commit(ctx, leaseID, rec, st.prev, &st.cur, st.affVal, fams)
		if err != nil {
			return nil, err
		}
		if ok {
			rec.Lease = int64(leaseID)
			return rec, nil
		}
		klog.V(2).InfoS("claim lost a race, trying another subnet", "node", c.Node, "attempt", attempt+1)
	}
}

// record returns the lease record for the candidates of fams; it keeps the
// previous record's acquisition time when the subnets are the same.
func (st *claimState) record(c Claim, fams []*family) *Record {
	rec := &Record{
		Node: c.Node, PublicIP: c.PublicIP,
		BackendType: c.BackendType, BackendData: c.BackendData,
		Acquired: time.Now().UTC().Truncate(time.Second),
	}
	for _, f := range fams {
		rec.Subnet.Set(f.fam, f.cand)
	}
	prev := st.prev
	if prev != nil && prev.Subnet == rec.Subnet && !prev.Acquired.IsZero() {
		rec.Acquired = prev.Acquired
	}
	return rec
}

// family is Acquire's per-address-family state.
type family struct {
	fam      ipfam.Family
	pool     *Pool
	prefs    []netip.Prefix
	taken    map[netip.Prefix]bool   // held by other nodes, as far as we know
	reserved map[netip.Prefix]string // reserved for other nodes
	listed   bool                    // taken holds every lock of the family
	probes   int                     // probe rounds done
	free     []netip.Prefix          // random candidates found free by the last probe

	reservation netip.Prefix // the node's reservation in this family, if any
	keep        netip.Prefix // the subnet the running host serves, if any
	own         ownSet       // the etcd leases whose keys of the node are this host's
	// excluded are the host's routes no candidate may overlap;
	// loggedSkip the preferred candidates already logged as skipped.
	excluded   []Excluded
	loggedSkip map[netip.Prefix]bool

	cand      netip.Prefix // the candidate of this attempt
	modRev    int64        // mod revision of cand's lock when it is already ours
	lockLease int64        // the etcd lease of cand's lock when it is already ours
	ownLock   bool
}

// stored is a key as read from etcd: its mod revision (0: it does not
// exist), value and etcd lease.
type stored struct {
	Rev   int64
	Value []byte
	Lease int64
}

// subnet is r's subnet of family f; zero when r is nil.
func (r *Record) subnet(f ipfam.Family) netip.Prefix {
	if r == nil {
		return netip.Prefix{}
	}
	return r.Subnet.Get(f)
}

// usable reports whether s may be tried: in the pool, not known to be held
// by another node, and not reserved for another node unless it is the
// subnet this host serves (a reservation never moves a running host).
func (f *family) usable(s netip.Prefix) bool {
	_, res := f.reserved[s]
	if !s.IsValid() || !f.pool.Contains(s) || f.taken[s] || (res && s != f.keep) {
		return false
	}
	_, excl := f.excludedBy(s)
	return !excl
}

// pick sets f.cand for the next attempt, keeping the current candidate if it
// is still usable (e.g. the lock turned out to be ours already).
func (r *Registry) pick(ctx context.Context, f *family, node string) error {
	if f.usable(f.cand) {
		return nil
	}
	f.ownLock, f.modRev, f.lockLease = false, 0, 0
	for _, s := range f.prefs {
		if f.usable(s) {
			f.cand = s
			return nil
		}
		if _, excl := f.excludedBy(s); excl && s.IsValid() {
			f.logSkipped(s, node)
		}
	}
	for !f.listed {
		for len(f.free) > 0 {
			s := f.free[0]
			f.free = f.free[1:]
			if f.usable(s) {
				f.cand = s
				return nil
			}
		}
		if f.probes == probeRounds {
			break
		}
		if err := r.probe(ctx, f, node); err != nil {
			return err
		}
	}
	if !f.listed {
		if err := r.listTaken(ctx, f, node); err != nil {
			return err
		}
	}
	all := make(map[netip.Prefix]bool, len(f.taken)+len(f.reserved))
	for s := range f.taken {
		all[s] = true
	}
	for s := range f.reserved {
		all[s] = true
	}
	s, ok := f.pool.freeSubnet(all, f.excluded)
	if !ok {
		inUse := 0
		for s := range all {
			if f.pool.Contains(s) {
				inUse++
			}
		}
		return &ExhaustedError{Pool: f.pool, InUse: inUse, Excluded: f.excluded}
	}
	f.cand = s
	return nil
}

// probe reads the locks of up to probeSize random candidates in one
// transaction and keeps the free ones in f.free, the taken ones in f.taken.
func (r *Registry) probe(ctx context.Context, f *family, node string) error {
	f.probes++
	seen := map[netip.Prefix]bool{}
	var cands []netip.Prefix
	var ops []clientv3.Op
	for range probeSize * 2 {
		s := f.pool.randomSubnet()
		if seen[s] || !f.usable(s) {
			continue
		}
		seen[s] = true
		cands = append(cands, s)
		ops = append(ops, clientv3.OpGet(r.keys.SubnetLock(s)))
		if len(cands) == probeSize {
			break
		}
	}
	if len(ops) == 0 {
		return nil
	}
	resp, err := r.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return fmt.Errorf("probing free subnets in %s: %w", f.pool, err)
	}
	for i, s := range cands {
		kvs := resp.Responses[i].GetResponseRange().Kvs
		switch {
		case len(kvs) == 0 || string(kvs[0].Value) == node && f.own[kvs[0].Lease]:
			f.free = append(f.free, s)
		case string(kvs[0].Value) == node:
			return r.conflict(ctx, node, string(kvs[0].Key), kvs[0])
		default:
			f.taken[s] = true
		}
	}
	return nil
}

// listTaken reads every lock of f's family (keys only) into f.taken.
func (r *Registry) listTaken(ctx context.Context, f *family, node string) error {
	v6 := f.pool.Network.Addr().Is6()
	pfx := r.keys.SubnetLocks(v6)
	resp, err := r.cli.Get(ctx, pfx, clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("listing subnets in use under %s: %w", pfx, err)
	}
	for _, kv := range resp.Kvs {
		s, err := ParseSubnetKey(strings.TrimPrefix(string(kv.Key), pfx))
		if err != nil {
			continue
		}
		if string(kv.Value) == node {
			if !f.own[kv.Lease] {
				return r.conflict(ctx, node, string(kv.Key), kv)
			}
			continue
		}
		f.taken[s] = true
	}
	f.listed = true
	return nil
}

// commit runs the claim transaction. It reports false when another node
// holds a candidate (recorded in the family's taken set) or the candidate's
// lock or the node's record changed under us; *cur is the node's record
// as last read (Rev 0: none). It returns a
// *ConflictError when another host with the same node name holds the
// record or a candidate's lock. oldAff is the node's affinity record as
// read before the claim (nil: none).
func (r *Registry) commit(ctx context.Context, leaseID clientv3.LeaseID, rec, prev *Record, cur *stored, oldAff []byte, fams []*family) (bool, error) {
	k := r.keys
	lease := clientv3.WithLease(leaseID)
	val, err := json.Marshal(rec)
	if err != nil {
		return false, fmt.Errorf("encoding lease record: %w", err)
	}
	aff, _ := json.Marshal(affinity{Subnet: rec.Subnet.V4, IPv6Subnet: rec.Subnet.V6})
	var cmps []clientv3.Cmp
	var thens, elses []clientv3.Op
	for _, f := range fams {
		key := k.SubnetLock(f.cand)
		if f.ownLock {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", f.modRev))
		} else {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
		}
		// A lock that is already this host's under this very etcd lease
		// (a restart that resumed its lease, see ResumeSession) is left
		// as it is: a put of the same value would still send every
		// watcher of the key an event.
		if !f.ownLock || f.lockLease != int64(leaseID) {
			thens = append(thens, clientv3.OpPut(key, rec.Node, lease))
		}
		elses = append(elses, clientv3.OpGet(key))
	}
	// The record is this host's to write only while it is the one read
	// (this host's own) or there is none: never another host's.
	recKey := k.Lease(rec.Node)
	if cur.Rev != 0 {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(recKey), "=", cur.Rev))
	} else {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(recKey), "=", 0))
	}
	elses = append(elses, clientv3.OpGet(recKey))
	// Likewise the record, when it already says exactly this under this
	// etcd lease: then the claim writes nothing at all.
	if cur.Rev == 0 || cur.Lease != int64(leaseID) || !bytes.Equal(cur.Value, val) {
		thens = append(thens, clientv3.OpPut(recKey, string(val), lease))
	}
	// The affinity record has no lease, so a claim that keeps the subnets
	// (an agent restart) need not write it again: an unchanged write
	// would only send every watcher of the prefix one more event. Only
	// agents with this node name write it, so the value read before the
	// claim is current unless another host has the same name (a conflict
	// the compares on the record and the locks catch).
	if !bytes.Equal(aff, oldAff) {
		thens = append(thens, clientv3.OpPut(k.Node(rec.Node), string(aff)))
	}
	// Release locks of subnets this node held before and no longer wants,
	// but only while they are still ours: under the lease of the record
	// that named them (a claim writes both under one lease).
	if prev != nil {
		for _, old := range prev.Subnets() {
			if old == rec.Subnet.V4 || old == rec.Subnet.V6 {
				continue
			}
			key := k.SubnetLock(old)
			thens = append(thens, clientv3.OpTxn(
				[]clientv3.Cmp{clientv3.Compare(clientv3.Value(key), "=", rec.Node),
					clientv3.Compare(clientv3.LeaseValue(key), "=", clientv3.LeaseID(prev.Lease))},
				[]clientv3.Op{clientv3.OpDelete(key)}, nil))
		}
	}
	resp, err := r.cli.Txn(ctx).If(cmps...).Then(thens...).Else(elses...).Commit()
	if err != nil {
		return false, fmt.Errorf("claiming %v for %s: %w", rec.Subnets(), rec.Node, err)
	}
	if resp.Succeeded {
		rec.ModRev = resp.Header.Revision
		return true, nil
	}
	if kvs := resp.Responses[len(fams)].GetResponseRange().Kvs; len(kvs) > 0 {
		if kv := kvs[0]; kv.ModRevision != cur.Rev {
			if !fams[0].own[kv.Lease] {
				return false, r.conflict(ctx, rec.Node, recKey, kv)
			}
			// rewritten by this host (an earlier run)
			*cur = stored{Rev: kv.ModRevision, Value: kv.Value, Lease: kv.Lease}
		}
	} else {
		*cur = stored{} // gone (expired, or deleted by hand)
	}
	for i, f := range fams {
		kvs := resp.Responses[i].GetResponseRange().Kvs
		switch {
		case len(kvs) == 0:
			// Free now (it was ours with another revision, or was released).
			f.ownLock, f.modRev, f.lockLease = false, 0, 0
		case string(kvs[0].Value) == rec.Node && f.own[kvs[0].Lease]:
			// Already ours (a previous run of this host): take it over.
			f.ownLock, f.modRev, f.lockLease = true, kvs[0].ModRevision, kvs[0].Lease
		case string(kvs[0].Value) == rec.Node:
			return false, r.conflict(ctx, rec.Node, string(kvs[0].Key), kvs[0])
		default:
			if f.cand == f.reservation {
				klog.Warningf("subnet %s is reserved for %s but held by %s; taking another subnet (remove the reservation, or free the subnet and restart leased on %s)", f.cand, rec.Node, kvs[0].Value, rec.Node)
			}
			klog.V(2).InfoS("subnet is held by another node", "subnet", f.cand, "holder", string(kvs[0].Value))
			f.taken[f.cand] = true
		}
	}
	return false, nil
}

// Publish rewrites the node's lease record (e.g. new backend data) under
// the same lease, as long as the record and its subnet locks are still
// this lease's: it never overwrites keys another host took.
func (r *Registry) Publish(ctx context.Context, leaseID clientv3.LeaseID, rec *Record) error {
	val, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encoding lease record: %w", err)
	}
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.LeaseValue(r.keys.Lease(rec.Node)), "=", leaseID)}
	for _, s := range rec.Subnets() {
		key := r.keys.SubnetLock(s)
		cmps = append(cmps, clientv3.Compare(clientv3.Value(key), "=", rec.Node),
			clientv3.Compare(clientv3.LeaseValue(key), "=", leaseID))
	}
	resp, err := r.cli.Txn(ctx).If(cmps...).Then(
		clientv3.OpPut(r.keys.Lease(rec.Node), string(val), clientv3.WithLease(leaseID)),
	).Commit()
	if err != nil {
		return fmt.Errorf("updating lease record of %s: %w", rec.Node, err)
	}
	if resp.Succeeded {
		rec.ModRev, rec.Lease = resp.Header.Revision, int64(leaseID)
	} else {
		return fmt.Errorf("updating lease record of %s: its record or the locks of %v are no longer under this host's etcd lease: %w", rec.Node, rec.Subnets(), ErrNotHeld)
	}
	return nil
}
