// Package fleetsim simulates a fleet of leased hosts in one process to
// measure what the fleet costs etcd (Documentation/scale.md). Each
// simulated host has its own etcd client, its own etcd lease (lease.Session),
// its own claim (Registry.Acquire) and its own prefix watch
// (Registry.Watch, View, PeerSet): the real leasing code of the agent. Only
// the kernel side is replaced by a recorder that notes when each peer
// appears in, changes in or leaves the host's peer set.
package fleetsim

import (
	"context"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/leased/leased/pkg/lease"
)

// counters are the fleet's client-side totals, summed over every host.
type counters struct {
	unary       atomic.Int64 // unary requests (Range, Txn, Put, LeaseGrant, ...)
	keepAlives  atomic.Int64 // LeaseKeepAlive stream messages sent
	watchReqs   atomic.Int64 // Watch stream messages sent (create/cancel/progress)
	watchEvents atomic.Int64 // events delivered to the hosts' watches (every key)
	claimLost   atomic.Int64 // claim transactions whose compare failed (lost races)
	claimErrors atomic.Int64 // grants or claims that failed (etcd errors) and were retried
	lostLeases  atomic.Int64 // sessions that ended while their host ran
}

type snapshot struct {
	unary, keepAlives, watchReqs, watchEvents, claimLost, claimErrors, lostLeases int64
}

func (c *counters) snap() snapshot {
	return snapshot{c.unary.Load(), c.keepAlives.Load(), c.watchReqs.Load(), c.watchEvents.Load(), c.claimLost.Load(), c.claimErrors.Load(), c.lostLeases.Load()}
}

func (s snapshot) sub(o snapshot) snapshot {
	return snapshot{s.unary - o.unary, s.keepAlives - o.keepAlives, s.watchReqs - o.watchReqs,
		s.watchEvents - o.watchEvents, s.claimLost - o.claimLost, s.claimErrors - o.claimErrors, s.lostLeases - o.lostLeases}
}

// dialOptions count each request a client sends.
func (c *counters) dialOptions() []grpc.DialOption {
	unary := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		c.unary.Add(1)
		err := invoker(ctx, method, req, reply, cc, opts...)
		if tr, ok := req.(*pb.TxnRequest); ok && err == nil && len(tr.Compare) > 0 {
			if resp, ok := reply.(*pb.TxnResponse); ok && !resp.Succeeded {
				c.claimLost.Add(1)
			}
		}
		return err
	}
	stream := func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		s, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return s, err
		}
		switch method {
		case "/etcdserverpb.Lease/LeaseKeepAlive":
			return countingStream{s, &c.keepAlives}, nil
		case "/etcdserverpb.Watch/Watch":
			return countingStream{s, &c.watchReqs}, nil
		}
		return s, nil
	}
	return []grpc.DialOption{grpc.WithChainUnaryInterceptor(unary), grpc.WithChainStreamInterceptor(stream)}
}

type countingStream struct {
	grpc.ClientStream
	n *atomic.Int64
}

func (s countingStream) SendMsg(m any) error {
	s.n.Add(1)
	return s.ClientStream.SendMsg(m)
}

// countingWatcher counts the events etcd delivers to a watch, whether or
// not the registry makes use of them. With wholePrefix set (Options.Previous)
// it turns the peer watch (lease.Keys.PeerRange) into a watch of the whole
// prefix, as the agent had before, counts every event etcd sends it and
// hands the registry only those in the range it asked for.
type countingWatcher struct {
	clientv3.Watcher
	n           *atomic.Int64
	wholePrefix string
}

func (w countingWatcher) Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan {
	op := clientv3.OpGet(key, opts...)
	end := string(op.RangeBytes())
	widened := w.wholePrefix != "" && end != "" && strings.HasPrefix(key, w.wholePrefix)
	if widened {
		opts = append(slices.Clone(opts), clientv3.WithRange(clientv3.GetPrefixRangeEnd(w.wholePrefix)))
		key = w.wholePrefix
	}
	lo := string(op.KeyBytes())
	in := w.Watcher.Watch(ctx, key, opts...)
	out := make(chan clientv3.WatchResponse)
	go func() {
		defer close(out)
		for r := range in {
			w.n.Add(int64(len(r.Events)))
			if widened {
				evs := r.Events[:0:0]
				for _, ev := range r.Events {
					if k := string(ev.Kv.Key); k >= lo && k < end {
						evs = append(evs, ev)
					}
				}
				if len(evs) == 0 && len(r.Events) > 0 {
					continue // nothing the registry asked for
				}
				r.Events = evs
			}
			select {
			case out <- r:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

// Host is one simulated agent.
type Host struct {
	Name     string
	idx      int
	publicIP netip.Addr
	f        *Fleet

	cli    *clientv3.Client
	cancel context.CancelFunc
	mu     sync.Mutex // guards sess, rec and AcquiredAt
	sess   *lease.Session
	rec    *lease.Record
	// lockCancel ends the watch of the host's own locks (watchLocks).
	lockCancel context.CancelFunc
	// own are the etcd leases earlier runs of this host granted (the
	// agent's own-leases file).
	own []clientv3.LeaseID

	// ClaimStart is when the claim started (Acquire was called),
	// AcquiredAt when it returned. Watchers may see the new record before
	// AcquiredAt: etcd sends the watch events of a transaction and its
	// response independently.
	ClaimStart, AcquiredAt time.Time
	// complete is when the host's peer set first held target peers
	// (UnixNano; 0: not yet).
	complete atomic.Int64
	target   atomic.Int64
	peers    atomic.Int64
	synced   atomic.Bool
	stopped  atomic.Bool
	exited   chan struct{}
}

// start connects to endpoint, grants the host's etcd lease, claims its
// subnet and starts its watch. It returns once the claim is committed.
// Like the agent, it retries a failed grant or claim (after 1 s, doubling
// up to 30 s, jittered) until f.opts.Timeout, and claims again when its
// etcd lease is lost.
func (h *Host) start(ctx context.Context, endpoint string) error {
	f := h.f
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: []string{endpoint}, DialTimeout: 10 * time.Second, Logger: zap.NewNop(),
		DialOptions: f.ctr.dialOptions(), TLS: f.opts.TLS,
	})
	if err != nil {
		return fmt.Errorf("%s: etcd client: %w", h.Name, err)
	}
	cw := countingWatcher{Watcher: cli.Watcher, n: &f.ctr.watchEvents}
	if f.opts.Previous {
		cw.wholePrefix = lease.NewKeys(f.opts.Prefix).Prefix()
	}
	cli.Watcher = cw
	hctx, cancel := context.WithCancel(ctx)
	h.cli, h.cancel, h.exited = cli, cancel, make(chan struct{})
	h.synced.Store(false)
	h.complete.Store(0)
	// Until the watch runs, the host counts as stopped: a host whose
	// start failed is not waited for.
	h.stopped.Store(true)
	reg := lease.NewRegistry(cli, f.opts.Prefix)
	if err := h.claim(hctx, reg, !f.opts.Previous); err != nil {
		cancel()
		cli.Close()
		return err
	}
	h.stopped.Store(false)
	go h.keep(hctx, reg)
	go h.watch(hctx, reg)
	return nil
}

// claim grants a session and claims, retrying like the agent does. With
// resume, the first try resumes the etcd lease of the host's previous run
// when it is still alive (the agent's restart, lease.ResumeSession).
func (h *Host) claim(ctx context.Context, reg *lease.Registry, resume bool) error {
	f := h.f
	deadline := time.Now().Add(f.opts.Timeout)
	bo := time.Second
	for {
		err := h.claimOnce(ctx, reg, resume)
		resume = false
		if err == nil {
			if !f.opts.Previous {
				h.watchLocks(ctx, reg)
			}
			return nil
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			return err
		}
		f.ctr.claimErrors.Add(1)
		select {
		case <-time.After(lease.Jitter(bo)):
		case <-ctx.Done():
			return err
		}
		if bo *= 2; bo > 30*time.Second {
			bo = 30 * time.Second
		}
	}
}

func (h *Host) claimOnce(ctx context.Context, reg *lease.Registry, resume bool) error {
	f := h.f
	var sess *lease.Session
	var err error
	resumed := false
	if resume && len(h.own) > 0 {
		sess, err = lease.ResumeSession(ctx, h.cli, h.own[len(h.own)-1], f.opts.LeaseTTL, 10*time.Second)
		resumed = err == nil
	}
	if !resumed {
		sess, err = lease.NewSession(ctx, h.cli, f.opts.LeaseTTL, 10*time.Second)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", h.Name, err)
	}
	var hint netip.Prefix
	if r := h.record(); r != nil {
		hint = r.Subnet.V4
	}
	h.ClaimStart = time.Now()
	rec, err := reg.Acquire(ctx, sess.Lease(), f.cfg, lease.Claim{
		Node: h.Name, PublicIP: ipfam.Pair[netip.Addr]{V4: h.publicIP}, BackendType: "host-gw", Own: h.own, Hint: ipfam.Pair[netip.Prefix]{V4: hint},
	})
	if err != nil {
		sess.Orphan()
		return fmt.Errorf("%s: claim: %w", h.Name, err)
	}
	h.mu.Lock()
	h.rec, h.sess, h.AcquiredAt = rec, sess, time.Now()
	if !resumed {
		h.own = append(h.own, sess.Lease())
	}
	h.mu.Unlock()
	return nil
}

// keep claims again when the etcd lease is lost while the host runs (the
// agent does the same); stop cancels ctx before it orphans the session.
func (h *Host) keep(ctx context.Context, reg *lease.Registry) {
	for {
		sess := h.session()
		select {
		case <-sess.Done():
		case <-ctx.Done():
			return
		}
		if ctx.Err() != nil {
			return
		}
		h.f.ctr.lostLeases.Add(1)
		h.f.logf("%s lost its etcd lease %x; claiming again", h.Name, sess.Lease())
		if err := h.claim(ctx, reg, false); err != nil {
			h.f.logf("%v", err) // names the host
			return
		}
	}
}

// watchLocks follows the host's own locks as the agent does for its
// ownership checks (the changes are counted, not acted on: nobody else
// writes them here). It ends with ctx or the host's next claim.
func (h *Host) watchLocks(ctx context.Context, reg *lease.Registry) {
	rec := h.record()
	h.mu.Lock()
	if h.lockCancel != nil {
		h.lockCancel()
	}
	lctx, cancel := context.WithCancel(ctx)
	h.lockCancel = cancel
	h.mu.Unlock()
	ch := make(chan lease.Batch)
	go reg.WatchLocks(lctx, rec.Subnets(), rec.ModRev+1, ch)
	go func() {
		for {
			select {
			case <-ch:
			case <-lctx.Done():
				return
			}
		}
	}()
}

func (h *Host) record() *lease.Record {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.rec
}

func (h *Host) session() *lease.Session {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sess
}

// stop ends the host the way a stopped agent ends: it stops renewing its
// etcd lease without revoking it (the keys live until the TTL runs out)
// and closes its watch and connection.
func (h *Host) stop() {
	if h.stopped.Swap(true) {
		return
	}
	h.cancel()
	h.session().Orphan()
	<-h.exited
	h.cli.Close()
}

// watch is the agent's peer tracker with a recorder instead of a
// datapath.
func (h *Host) watch(ctx context.Context, reg *lease.Registry) {
	defer close(h.exited)
	batches := make(chan lease.Batch, 16)
	go reg.Watch(ctx, batches) //nolint:errcheck // returns ctx.Err()
	var view lease.View
	var ps *lease.PeerSet
	present := map[string]int64{} // node → etcd lease of the record seen
	diff := func(node string, now time.Time) {
		acc := ps.Accepted()[node]
		was, ok := present[node]
		switch {
		case acc != nil && (!ok || was != acc.Lease):
			present[node] = acc.Lease
			h.f.tr.seen(h.idx, node, acc.Lease, now)
		case acc == nil && ok:
			delete(present, node)
			h.f.tr.gone(h.idx, node, now)
		}
	}
	for {
		var b lease.Batch
		select {
		case b = <-batches:
		case <-ctx.Done():
			return
		}
		now := time.Now()
		view.Apply(b)
		if b.Reset || ps == nil {
			ps = lease.NewPeerSet(h.f.cfg, h.record(), view.Records)
			for node := range present {
				diff(node, now)
			}
			for node := range ps.Accepted() {
				diff(node, now)
			}
		} else {
			for _, e := range b.Events {
				if e.Kind != lease.LeasePut && e.Kind != lease.LeaseDelete {
					continue
				}
				if _, recomputed := ps.Update(e.Node); recomputed {
					for node := range present {
						diff(node, now)
					}
					for node := range ps.Accepted() {
						diff(node, now)
					}
				} else {
					diff(e.Node, now)
				}
			}
		}
		n := int64(len(ps.Accepted()))
		h.peers.Store(n)
		h.synced.Store(true)
		if t := h.target.Load(); t > 0 && n >= t && h.complete.Load() == 0 {
			h.complete.Store(now.UnixNano())
		}
		if len(ps.Rejected()) > 0 {
			h.f.tr.rejected.Add(int64(len(ps.Rejected())))
		}
	}
}

// tracker records, for every (node, etcd lease) pair, which hosts have it
// in their peer set and when the last of them got it; and for every node
// which hosts dropped it.
type tracker struct {
	mu       sync.Mutex
	size     int
	seenBy   map[seenKey]*mark
	goneBy   map[string]*mark
	removals atomic.Int64 // peer-set removals anywhere
	rejected atomic.Int64 // rejected records seen (must stay 0)
}

type seenKey struct {
	node  string
	lease int64
}

type mark struct {
	bits []uint64
	n    int
	last time.Time
}

func newTracker(size int) *tracker {
	return &tracker{size: size, seenBy: map[seenKey]*mark{}, goneBy: map[string]*mark{}}
}

func (m *mark) set(host int, t time.Time, size int) {
	if m.bits == nil {
		m.bits = make([]uint64, (size+63)/64)
	}
	w, b := host/64, uint64(1)<<(host%64)
	if m.bits[w]&b != 0 {
		return
	}
	m.bits[w] |= b
	m.n++
	if t.After(m.last) {
		m.last = t
	}
}

func (tr *tracker) seen(host int, node string, lease int64, t time.Time) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	k := seenKey{node, lease}
	m := tr.seenBy[k]
	if m == nil {
		m = &mark{}
		tr.seenBy[k] = m
	}
	m.set(host, t, tr.size)
}

func (tr *tracker) gone(host int, node string, t time.Time) {
	tr.removals.Add(1)
	tr.mu.Lock()
	defer tr.mu.Unlock()
	m := tr.goneBy[node]
	if m == nil {
		m = &mark{}
		tr.goneBy[node] = m
	}
	m.set(host, t, tr.size)
}

// count returns how many hosts have (node, lease) and when the last got it.
func (tr *tracker) count(node string, lease int64) (int, time.Time) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if m := tr.seenBy[seenKey{node, lease}]; m != nil {
		return m.n, m.last
	}
	return 0, time.Time{}
}

func (tr *tracker) goneCount(node string) (int, time.Time) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if m := tr.goneBy[node]; m != nil {
		return m.n, m.last
	}
	return 0, time.Time{}
}

func (tr *tracker) resetGone(node string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	delete(tr.goneBy, node)
}
