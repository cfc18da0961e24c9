package lease

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/hoptrace"
	"github.com/leased/leased/pkg/metrics"
)

// EventKind says what an Event is about.
type EventKind int

const (
	// LeasePut: a lease record was created or changed. Record is set, or
	// Err when the value is malformed.
	LeasePut EventKind = iota
	// LeaseDelete: a lease record was deleted or expired.
	LeaseDelete
	// ConfigPut: the config key was written; Value is its raw content.
	ConfigPut
	// ConfigDelete: the config key was deleted.
	ConfigDelete
	// ReservationChange: a reservation was written or deleted; the watcher
	// does not interpret it (Acquire reads reservations itself).
	ReservationChange
	// LockDelete: the owner lock of Subnet was deleted or expired.
	LockDelete
	// LockPut: the owner lock of Subnet was written; Node is its value
	// (the holder) and Lease its etcd lease.
	LockPut
)

// Event is one change under the registry's prefix.
type Event struct {
	Kind   EventKind
	Node   string
	Subnet netip.Prefix // LockDelete, LockPut
	Record *Record
	Err    error
	Value  []byte
	// Lease is the etcd lease of a LockPut's key.
	Lease int64
	// ModRev is the etcd revision of the change. In listings it is the
	// config key's mod revision for a ConfigPut, and 0 for leases.
	ModRev int64
}

// Batch is the changes of one etcd watch response, or a full listing.
type Batch struct {
	// Rev is the etcd revision the batch brings the consumer to: a
	// listing's revision, or the mod revision of the last change in the
	// batch (the consumer has seen every change up to it, none after).
	Rev int64
	// Reset means the batch is a full listing: the consumer must forget
	// every lease and the config it knew and start from this batch (a
	// missing ConfigPut means the config key does not exist). Most of a
	// Reset batch's leases are not in Events (see base): apply it with
	// View.Apply.
	Reset bool
	// FromCache is set on a Reset batch that a lease cache, brought up
	// to date with etcd, stands for (WatchFromSnapshot).
	FromCache bool
	Events    []Event
	// ClusterID is the etcd cluster the batch came from (0: unknown).
	ClusterID uint64
	// base, in a Reset batch, holds the well-formed lease records of the
	// listing (or of the snapshot it resumed from), keyed by node and
	// built by the producer; Events then hold the config, the malformed
	// records and, after a snapshot, the changes since, applied after
	// base. View.Apply adopts the map instead of copying it, so such a
	// batch is applied once.
	base map[string]*Record
}

// Watch lists the config and every lease record in one round trip, sends
// that as a Reset batch, then watches the same keys (Keys.PeerRange: the
// config and the lease records, no lock, affinity or reservation key) from
// the listing's revision onwards and sends each change. After a disconnect it resumes from
// the last revision it delivered; when that revision has been compacted it
// lists again (another Reset batch). Sends block until the consumer
// receives. Watch returns ctx's error when ctx is done; it never closes out.
func (r *Registry) Watch(ctx context.Context, out chan<- Batch) error {
	backoff := newBackoff()
	for {
		rev, err := r.list(ctx, out)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			klog.ErrorS(err, "listing leases failed; retrying (check --etcd-endpoints and that etcd is up)", "retry", backoff.peek())
			if !backoff.wait(ctx) {
				return ctx.Err()
			}
			continue
		}
		backoff.reset()
		if err := r.watchFrom(ctx, rev+1, out); !errors.Is(err, rpctypes.ErrCompacted) {
			return err
		}
		klog.InfoS("lease watch fell behind a compaction; listing again", "rev", rev)
		metrics.WatchRestarts.WithLabelValues("compaction").Inc()
	}
}

// List reads the config and every lease record under the registry's
// prefix at one etcd revision and returns them decoded, as the view that
// Watch's first batch gives. It is the one reader of lease keys: Watch
// starts with it, and `leased leases`, `leased status`, `leased config
// put` and the lab call it directly. Malformed records are in the view's
// Malformed, with the reason. Its errors are etcd's, unwrapped, for the
// caller to explain.
func (r *Registry) List(ctx context.Context) (*View, error) {
	b, err := r.listLeases(ctx)
	if err != nil {
		return nil, err
	}
	v := new(View)
	v.Apply(b)
	return v, nil
}

// list reads the config and every lease record at one revision (see
// listLeases) and sends them as a Reset batch.
func (r *Registry) list(ctx context.Context, out chan<- Batch) (int64, error) {
	t0 := time.Now()
	b, err := r.listLeases(ctx)
	if err != nil {
		return 0, fmt.Errorf("listing %s: %w", r.keys.Prefix(), err)
	}
	klog.V(2).InfoS("listed the leases", "leases", len(b.base), "configAndMalformed", len(b.Events), "rev", b.Rev, "took", time.Since(t0))
	select {
	case out <- b:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	return b.Rev, nil
}

// parallel calls fn(i) for i in [0, n), split over every CPU.
func parallel(n int, fn func(i int)) {
	workers := runtime.GOMAXPROCS(0)
	chunk := (n + workers - 1) / workers
	var wg sync.WaitGroup
	for lo := 0; lo < n; lo += chunk {
		hi := min(lo+chunk, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := lo; i < hi; i++ {
				fn(i)
			}
		}()
	}
	wg.Wait()
}

// watchFrom watches from rev until ctx is done (returning ctx's error) or
// the revision is compacted (returning rpctypes.ErrCompacted).
func (r *Registry) watchFrom(ctx context.Context, rev int64, out chan<- Batch) error {
	backoff := newBackoff()
	for {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		start, end := r.keys.PeerRange()
		wch := r.cli.Watch(wctx, start, clientv3.WithRange(end), clientv3.WithRev(rev))
		for resp := range wch {
			if resp.CompactRevision != 0 || errors.Is(resp.Err(), rpctypes.ErrCompacted) {
				cancel()
				return rpctypes.ErrCompacted
			}
			if err := resp.Err(); err != nil {
				klog.InfoS("lease watch interrupted; resuming", "rev", rev, "err", err)
				break
			}
			backoff.reset()
			if len(resp.Events) == 0 {
				continue
			}
			// The batch stands for the revision of its last event, not
			// for resp.Header.Revision: a watch that is behind gets the
			// changes since in responses of at most 1,000 revisions each,
			// every one stamped with etcd's current revision. A view
			// saved after applying the first would claim changes it
			// has not seen, and a watch resumed from it skip them.
			last := resp.Events[len(resp.Events)-1].Kv.ModRevision
			rev = last + 1
			b := Batch{Rev: last, ClusterID: resp.Header.ClusterId}
			for _, ev := range resp.Events {
				if e, ok := r.event(ev); ok {
					b.Events = append(b.Events, e)
				}
			}
			if len(b.Events) == 0 {
				continue
			}
			if hoptrace.On {
				for _, e := range b.Events {
					hoptrace.Arrived(e.Node, len(b.Events))
				}
			}
			select {
			case out <- b:
			case <-ctx.Done():
				cancel()
				return ctx.Err()
			}
		}
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		klog.V(2).InfoS("lease watch closed; resuming", "rev", rev, "retry", backoff.peek())
		metrics.WatchRestarts.WithLabelValues("resume").Inc()
		if !backoff.wait(ctx) {
			return ctx.Err()
		}
	}
}

func (r *Registry) event(ev *clientv3.Event) (Event, bool) {
	k := r.keys
	key := string(ev.Kv.Key)
	del := ev.Type == mvccpb.DELETE
	switch {
	case key == k.Config():
		if del {
			return Event{Kind: ConfigDelete, ModRev: ev.Kv.ModRevision}, true
		}
		return Event{Kind: ConfigPut, Value: ev.Kv.Value, ModRev: ev.Kv.ModRevision}, true
	case strings.HasPrefix(key, k.Leases()):
		e := r.leaseEvent(ev.Kv, del)
		e.ModRev = ev.Kv.ModRevision
		return e, true
	case strings.HasPrefix(key, k.Reservations()):
		return Event{Kind: ReservationChange, Node: strings.TrimPrefix(key, k.Reservations())}, true
	case strings.HasPrefix(key, k.SubnetLocks(false)) || strings.HasPrefix(key, k.SubnetLocks(true)):
		s, err := ParseSubnetKey(key[strings.LastIndexByte(key, '/')+1:])
		if err != nil {
			return Event{}, false
		}
		if del {
			return Event{Kind: LockDelete, Subnet: s, ModRev: ev.Kv.ModRevision}, true
		}
		return Event{Kind: LockPut, Subnet: s, Node: string(ev.Kv.Value), Lease: ev.Kv.Lease, ModRev: ev.Kv.ModRevision}, true
	}
	return Event{}, false
}

func (r *Registry) leaseEvent(kv *mvccpb.KeyValue, del bool) Event {
	node := strings.TrimPrefix(string(kv.Key), r.keys.Leases())
	if del {
		return Event{Kind: LeaseDelete, Node: node}
	}
	return leaseEventInto(node, kv.Value, kv.CreateRevision, kv.Lease, new(Record))
}

// leaseEventInto is leaseEvent for a put of value under node's lease key
// (created at revision create, attached to lease), decoding the record
// into rec. It keeps no reference to value.
func leaseEventInto(node string, value []byte, create, lease int64, rec *Record) Event {
	if err := ValidNodeName(node); err != nil {
		return Event{Kind: LeasePut, Node: node, Err: err}
	}
	if err := decodeRecordInto(node, value, rec); err != nil {
		return Event{Kind: LeasePut, Node: node, Err: err}
	}
	rec.Rev, rec.Lease = create, lease
	return Event{Kind: LeasePut, Node: node, Record: rec}
}

// Jitter returns a random duration in [d/2, d]. Retry loops wait that long
// instead of d so that the hosts of a fleet that failed together (an etcd
// member restarted, a leader election) do not retry together: their
// retries spread over half the delay instead of arriving in one burst.
func Jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}

// backoff is a capped exponential delay for retry loops.
type backoff struct {
	d    time.Duration // the current delay, before jitter
	next time.Duration // the jittered wait drawn by peek (0: none yet)
}

func newBackoff() *backoff { return &backoff{d: 100 * time.Millisecond} }

// peek returns the wait the next call of wait sleeps (drawing it now, so
// that a log line says the real delay, not its upper bound).
func (b *backoff) peek() time.Duration {
	if b.next == 0 {
		b.next = Jitter(b.d)
	}
	return b.next
}

func (b *backoff) reset() { b.d, b.next = 100*time.Millisecond, 0 }

// wait sleeps for the current delay, jittered (see Jitter; the one peek
// returned, if it was called), doubles it (up to 5s) and reports false
// when ctx ended first.
func (b *backoff) wait(ctx context.Context) bool {
	t := time.NewTimer(b.peek())
	b.next = 0
	defer t.Stop()
	if b.d *= 2; b.d > 5*time.Second {
		b.d = 5 * time.Second
	}
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// View is a consumer's picture of the prefix, built by applying Watch's
// batches in order. The zero value is ready to use; it is not safe for
// concurrent use.
type View struct {
	// Synced is true once the first listing has been applied.
	Synced bool
	// Config is the raw config value; nil when the key does not exist.
	Config []byte
	// ConfigRev is the mod revision of the config key (0: it does not
	// exist), for a compare-and-swap on it (leased config put).
	ConfigRev int64
	// Records holds the well-formed lease records by node.
	Records map[string]*Record
	// Malformed holds why each malformed lease record was refused, by node.
	Malformed map[string]error
	// Rev is the revision the view reflects.
	Rev int64
	// ClusterID is the etcd cluster the view comes from (0: unknown).
	ClusterID uint64
}

// Apply folds one batch into the view.
func (v *View) Apply(b Batch) {
	if b.Reset || v.Records == nil {
		v.Records, v.Malformed, v.Config, v.ConfigRev = map[string]*Record{}, map[string]error{}, nil, 0
		if b.Reset && b.base != nil {
			v.Records = b.base
		}
	}
	v.Synced = v.Synced || b.Reset
	v.Rev = b.Rev
	if b.ClusterID != 0 {
		v.ClusterID = b.ClusterID
	}
	for _, e := range b.Events {
		switch e.Kind {
		case ConfigPut:
			v.Config, v.ConfigRev = e.Value, e.ModRev
		case ConfigDelete:
			v.Config, v.ConfigRev = nil, 0
		case LeasePut:
			if e.Err != nil {
				delete(v.Records, e.Node)
				v.Malformed[e.Node] = e.Err
				continue
			}
			delete(v.Malformed, e.Node)
			v.Records[e.Node] = e.Record
		case LeaseDelete:
			delete(v.Records, e.Node)
			delete(v.Malformed, e.Node)
		}
	}
}
