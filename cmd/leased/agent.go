package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net/netip"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/metrics"
	"github.com/leased/leased/pkg/subnetenv"
)

// agent runs the data flow config → lease → peers → backend → kernel for
// one host. Its state is owned by the goroutine running run; nothing else
// touches it.
type agent struct {
	o    *options
	cli  *clientv3.Client
	reg  *lease.Registry
	ext  backend.ExtIface
	node string
	// newBackend is backend.New; tests of the agent's own logic replace it.
	newBackend func(raw json.RawMessage, ext backend.ExtIface, node string, o backend.Options) (backend.Backend, error)

	view      lease.View      // etcd as the watch has shown it
	dirty     map[string]bool // nodes whose lease changed since the last step
	peers     *lease.PeerSet  // the peer filter, kept up to date with dirty
	peersCfg  *lease.Config   // the config and
	peersSelf *lease.Record   // own lease peers was computed for
	bePeers   []backend.Peer  // the whole set last handed to the backend (nil: stale)
	peersSent bool            // the backend holds programmed; changes may go as deltas
	// programmed is the peer set last handed to the backend. After this
	// host lost its own lease (it was cut off from etcd, and so, most
	// likely, were its peers), peers that vanish from etcd are kept until
	// graceUntil unless another node claims their subnet: their leases
	// may have expired for the same reason, and they are re-claiming.
	programmed    map[string]*lease.Record
	graceUntil    time.Time
	cfg           *lease.Config
	rejected      map[string]string // node → reason last logged
	resumed       bool              // the watch resumed from the lease cache
	publishing    atomic.Bool       // a shared lease cache is being written
	publishFailed atomic.Bool       // the last write of it failed, and that was logged
	fromShared    bool              // the watch started from the shared lease cache
	exhausted     string            // last "out of subnets" message logged

	seenRaw  []byte // the config value last parsed
	sess     *lease.Session
	self     *lease.Record // the lease record, nil while not (re)claimed
	held     lease.Record  // the subnets the datapath is programmed for
	hint     subnetenv.Env
	be       backend.Backend
	beRaw    []byte
	beCancel context.CancelFunc
	started  bool // be.Start ran for self
	ready    bool
	status   string
	health   health // what /readyz reports
}

func newAgent(o *options, cli *clientv3.Client, ext backend.ExtIface, node string) *agent {
	a := &agent{o: o, cli: cli, reg: lease.NewRegistry(cli, o.etcdPrefix), ext: ext, node: node, newBackend: backend.New,
		rejected: map[string]string{}, dirty: map[string]bool{}}
	if env, err := subnetenv.Read(o.subnetFile); err == nil {
		a.hint = env
	}
	return a
}

// run drives the agent until ctx is done. It returns nil on cancellation:
// the lease is left to expire on its own and the kernel state stays, so a
// restarted agent picks up where this one stopped without disturbing traffic.
func (a *agent) run(ctx context.Context) error {
	batches := make(chan lease.Batch, 16)
	a.startWatch(ctx, batches)
	a.setStatus("waiting for etcd at " + a.o.etcdEndpoints)
	a.claimEarly(ctx)
	retry := time.NewTimer(time.Hour)
	defer retry.Stop()
	cacheTick := time.NewTicker(sharedCacheInterval)
	defer cacheTick.Stop()
	bo := time.Second
	defer func() {
		a.saveCache()
		if h, ok := a.be.(backend.Handoff); ok && a.sess != nil && a.self != nil && a.started {
			// The lease stays for the next run: keep answering for it
			// until the process exits (see backend.Handoff).
			h.Handoff()
		}
		if a.sess != nil {
			a.sess.Orphan()
		}
		if a.beCancel != nil {
			a.beCancel()
		}
	}()
	for {
		var sessDone <-chan struct{}
		if a.sess != nil {
			sessDone = a.sess.Done()
		}
		select {
		case <-ctx.Done():
			return nil
		case b := <-batches:
			a.apply(b)
			// Take whatever else is queued before acting: one step per burst.
			for drained := false; !drained; {
				select {
				case b := <-batches:
					a.apply(b)
				default:
					drained = true
				}
			}
		case <-sessDone:
			klog.Warningf("lease of %s lost (no keep-alive answer within --lease-ttl %s); claiming it again, the datapath stays as it is", a.node, a.o.leaseTTL)
			a.sess = nil
			a.self = nil
			a.startGrace()
			a.withdraw()
			a.setStatus("lease lost; claiming it again")
		case <-retry.C:
		case <-cacheTick.C:
			a.maybePublishCache(ctx)
			continue
		}
		if err := a.step(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			klog.ErrorS(err, "retrying", "in", bo)
			retry.Reset(bo)
			if bo *= 2; bo > 30*time.Second {
				bo = 30 * time.Second
			}
		} else {
			bo = time.Second
			if !a.graceUntil.IsZero() {
				retry.Reset(time.Until(a.graceUntil) + 10*time.Millisecond)
			}
		}
	}
}

// withdraw stops a backend that answers for the host's lease on the link
// (proxy-ndp) from answering, when the lease is no longer held: it must
// not answer for a slice another host may claim. Start runs again once the
// lease is held again.
func (a *agent) withdraw() {
	if w, ok := a.be.(backend.Withdrawer); ok {
		w.Withdraw()
		a.started = false
	}
}

// startWatch follows etcd from the lease cache a previous run saved, when
// it is usable, else from the shared lease cache in etcd (unless
// --shared-lease-cache=false), else from a full listing.
func (a *agent) startWatch(ctx context.Context, batches chan lease.Batch) {
	path := a.o.leaseCachePath()
	if path != "" {
		h, decode, err := lease.OpenSnapshot(path)
		os.Remove(path) // one use: a crash must not leave an old cache behind
		switch {
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			klog.InfoS("lease cache not usable; listing instead", "path", path, "err", err)
		case err == nil && h.Leases < cacheMinLeases:
			// A listing this small takes a few milliseconds, no more
			// than checking the cache against etcd.
			klog.V(2).InfoS("lease cache too small to be worth resuming from; listing", "path", path, "leases", h.Leases)
		case err == nil:
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			ok := a.reg.Usable(cctx, h)
			cancel()
			if ok {
				klog.InfoS("starting from the lease cache of the previous run; reading only the leases changed since", "path", path, "rev", h.Rev, "leases", h.Leases)
				a.resumed = true
				go a.reg.WatchFromSnapshot(ctx, h, decode, batches) //nolint:errcheck // returns ctx.Err()
				return
			}
			klog.InfoS("lease cache is from another etcd cluster, prefix or time; listing instead", "path", path)
		}
	}
	if !a.o.sharedCache {
		go a.reg.Watch(ctx, batches) //nolint:errcheck // returns ctx.Err()
		return
	}
	go a.reg.WatchFromShared(ctx, batches) //nolint:errcheck // returns ctx.Err()
}

// sharedCacheInterval is how often the agent checks whether it should
// write the shared lease cache (a variable for tests).
var sharedCacheInterval = time.Minute

// maybePublishCache writes the shared lease cache when this host is the
// one to keep it and it is due (lease.SharedCacheDue). It encodes the
// view here, on the agent's goroutine, and writes in the background.
func (a *agent) maybePublishCache(ctx context.Context) {
	if !a.o.sharedCache || !a.ready || a.sess == nil || a.publishing.Load() {
		return
	}
	if !lease.SharedCacheWriter(a.node, &a.view) {
		return
	}
	hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	h, err := a.reg.ReadSharedCacheHeader(hctx)
	cancel()
	if err != nil {
		klog.V(2).InfoS("could not read the shared lease cache header; trying again later", "err", err)
		return
	}
	due, why := lease.SharedCacheDue(&a.view, h, time.Now())
	if !due {
		return
	}
	data, err := lease.EncodeSnapshot(a.reg.Keys().Prefix(), &a.view)
	if err != nil {
		return
	}
	id, leases := a.sess.Lease(), len(a.view.Records)
	a.publishing.Store(true)
	go func() {
		defer a.publishing.Store(false)
		pctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		ok, err := a.reg.PublishSharedCache(pctx, id, a.node, data, h.ModRev)
		switch {
		case err != nil && !a.publishFailed.Swap(true):
			klog.InfoS("could not write the shared lease cache; hosts that start without a cache of their own list every lease until it is written (check that this host may write under --etcd-prefix; retried every minute, logged at -v=2)", "err", err)
		case err != nil:
			klog.V(2).InfoS("could not write the shared lease cache", "err", err)
		case ok:
			a.publishFailed.Store(false)
			klog.InfoS("wrote the shared lease cache for hosts that start without one", "leases", leases, "bytes", len(data), "reason", why)
		default:
			klog.V(2).InfoS("another host wrote the shared lease cache first")
		}
	}()
}

// onReady, when set, runs once the agent is first ready (for profiling).
var onReady func()

// cacheMinLeases is the smallest lease cache worth resuming from.
const cacheMinLeases = lease.SharedCacheMinLeases

// saveCache saves the lease set for the next run (see startWatch).
func (a *agent) saveCache() {
	path := a.o.leaseCachePath()
	if path == "" || !a.view.Synced {
		return
	}
	if err := lease.SaveSnapshot(path, a.reg.Keys().Prefix(), &a.view); err != nil {
		klog.InfoS("could not save the lease cache; the next start lists every lease", "path", path, "err", err)
	}
}

// apply folds one watch batch into the agent's view of etcd and logs
// malformed lease records once each.
func (a *agent) apply(b lease.Batch) {
	for _, e := range b.Events {
		if a.self == nil {
			break
		}
		ownLock := e.Kind == lease.LockDelete && slices.Contains(a.self.Subnets(), e.Subnet)
		if (e.Kind == lease.LeaseDelete && e.Node == a.node) || ownLock {
			klog.Warningf("this host's lease keys were deleted in etcd (expired, or by hand); claiming its subnets %v again", a.self.Subnets())
			a.self = nil // ensureLease claims again, preferring the held subnets
			a.startGrace()
			a.withdraw()
		}
	}
	if b.Reset && b.FromCache && !a.resumed && !a.view.Synced {
		a.fromShared = true
	}
	a.view.Apply(b)
	if b.Reset {
		a.peers = nil // the view has a new records map
	}
	for _, e := range b.Events {
		if e.Kind == lease.LeasePut || e.Kind == lease.LeaseDelete {
			a.dirty[e.Node] = true
		}
	}
	for node, err := range a.view.Malformed {
		if a.rejected[node] != err.Error() {
			klog.Warningf("ignoring malformed lease of %q: %v", node, err)
			a.rejected[node] = err.Error()
		}
	}
}

// step brings everything downstream of the view in line: config, backend,
// lease, subnet.env, peers. It returns an error when something transient
// failed and the step should be retried.
func (a *agent) step(ctx context.Context) error {
	if !a.view.Synced {
		return nil
	}
	a.updateConfig()
	if a.cfg == nil {
		return nil
	}
	if err := a.ensureBackend(); err != nil {
		return err
	}
	if err := a.ensureLease(ctx); err != nil {
		var ex *lease.ExhaustedError
		if errors.As(err, &ex) {
			if msg := err.Error(); msg != a.exhausted {
				klog.ErrorS(nil, "out of subnets", "range", ex.Pool.String(), "inUse", ex.InUse,
					"remedy", "raise SubnetMax/IPv6SubnetMax in the config or remove stale leases; leased acquires a subnet as soon as one frees up")
				a.exhausted = msg
			}
			a.setStatus("out of subnets in " + ex.Pool.String() + "; waiting for one to free up")
			return nil // a lease deletion or config change triggers the next try
		}
		return err
	}
	a.exhausted = ""
	local := backend.Local{Node: a.node, Subnet4: a.self.Subnet, Subnet6: a.self.IPv6Subnet}
	if a.cfg.IPv4 != nil {
		local.Network4 = a.cfg.IPv4.Network
	}
	if a.cfg.IPv6 != nil {
		local.Network6 = a.cfg.IPv6.Network
	}
	if !a.started {
		a.peersSent = false // a (re)started backend gets the whole set
	}
	// The backend gets the whole peer set after a rebuild, a (re)start, a
	// recompute of the filter or during a grace period; otherwise only the
	// peers that changed, at a cost that does not grow with the cluster.
	full := !a.peersSent || !a.graceUntil.IsZero()
	changed := false
	var delta []string // nodes whose accepted entry changed
	if a.peers == nil || a.peersCfg != a.cfg || a.peersSelf != a.self {
		a.peers, a.peersCfg, a.peersSelf = lease.NewPeerSet(a.cfg, a.self, a.view.Records), a.cfg, a.self
		full, changed = true, true
	} else {
		for node := range a.dirty {
			c, recomputed := a.peers.Update(node)
			changed = changed || c
			full = full || recomputed
			if c {
				delta = append(delta, node)
			}
		}
	}
	clear(a.dirty)
	rejected := a.peers.Rejected()
	if changed {
		for node, err := range rejected {
			if a.rejected[node] != err.Error() {
				klog.Warningf("ignoring lease of %q: %v", node, err)
				a.rejected[node] = err.Error()
			}
		}
		for node := range a.rejected { // forget reasons that no longer apply
			_, bad := rejected[node]
			_, malformed := a.view.Malformed[node]
			if !bad && !malformed {
				delete(a.rejected, node)
			}
		}
	}
	accepted := a.peers.Accepted()
	var err error
	upd, canDelta := a.be.(backend.PeerUpdater)
	switch {
	case full || !canDelta:
		if full || changed || a.bePeers == nil {
			a.bePeers = toPeers(a.withGrace(accepted))
		}
		err = a.be.SetPeers(ctx, a.bePeers)
		if canDelta {
			// The backend keeps its own copy; deltas follow from here.
			a.bePeers = nil
		}
		// The backend holds the set even when some kernel calls failed
		// (it retries them), so later changes may go as deltas.
		a.peersSent = canDelta
	case len(delta) > 0:
		var ups []backend.Peer
		var rm []string
		for _, n := range delta {
			if r := accepted[n]; r != nil {
				ups = append(ups, toPeer(r))
				a.programmed[n] = r
			} else {
				rm = append(rm, n)
				delete(a.programmed, n)
			}
		}
		a.bePeers = nil // stale now; rebuilt when a whole set is needed
		err = upd.UpdatePeers(ctx, ups, rm)
	}
	if err != nil {
		// The backend retries on its own resync; keep the agent moving.
		klog.ErrorS(err, "programming peers; the backend retries on its next pass")
	}
	if !a.started {
		// The peer set went over first (a backend not started only records
		// it), so Start applies it in its first pass, concurrently with
		// the firewall setup.
		if err := a.be.Start(ctx, local); err != nil {
			return fmt.Errorf("starting the %s backend: %w", a.be.Type(), err)
		}
		a.started = true
	}
	if err := a.writeSubnetEnv(); err != nil {
		return err
	}
	npeers := len(a.programmed)
	metrics.PeersKnown.Set(float64(len(a.view.Records) + len(a.view.Malformed) - btoi(a.view.Records[a.node] != nil)))
	metrics.PeersRejected.Set(float64(len(rejected) + len(a.view.Malformed)))
	metrics.PeersProgrammed.Set(float64(npeers))
	if !a.ready {
		a.ready = true
		metrics.Ready.Set(1)
		klog.InfoS("ready", "node", a.node, "subnets", a.self.Subnets(), "peers", npeers)
		if onReady != nil {
			onReady()
		}
	}
	a.setStatus(fmt.Sprintf("lease %v held; %d peers", a.self.Subnets(), npeers))
	return nil
}

// claimEarly claims the lease while the first listing is still streaming
// (in a network of tens of thousands of leases it takes most of the time
// to READY): it reads the config key on its own and, when the config is
// valid, creates the backend and claims. The claim does not depend on the
// other leases. Whatever fails here is left to step, which runs once the
// listing is in and reports it.
func (a *agent) claimEarly(ctx context.Context) {
	gctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	resp, err := a.cli.Get(gctx, a.reg.Keys().Config())
	cancel()
	if err != nil || len(resp.Kvs) == 0 {
		return // etcd not answering yet or no config: step says so
	}
	if a.adoptConfig(resp.Kvs[0].Value); a.cfg == nil {
		return
	}
	if err := a.ensureBackend(); err != nil {
		klog.V(2).InfoS("claiming before the listing is in: no backend yet; step retries", "err", err)
		return
	}
	if err := a.ensureLease(ctx); err != nil {
		klog.V(2).InfoS("claiming before the listing is in failed; step retries", "err", err)
		return
	}
	// proxy-ndp: answer the upstream router now, not after the listing
	// (a restarted agent resumes after the few etcd round trips of its claim).
	if ans, ok := a.be.(backend.Answerer); ok && a.cfg.IPv6 != nil && a.self.IPv6Subnet.IsValid() {
		local := backend.Local{Node: a.node, Subnet4: a.self.Subnet, Subnet6: a.self.IPv6Subnet, Network6: a.cfg.IPv6.Network}
		if err := ans.Answer(local); err != nil {
			klog.V(2).InfoS("answering before the listing is in failed; the backend's start retries", "err", err)
		}
	}
}

// updateConfig adopts the config in etcd when it is valid and compatible
// with the lease this host holds; otherwise it says why and keeps the last
// good config (and with it the datapath).
func (a *agent) updateConfig() {
	if a.view.Config == nil {
		if a.cfg == nil && a.status != "waiting for config" {
			key := a.reg.Keys().Config()
			klog.ErrorS(nil, "Key not found: no network config in etcd; waiting for it",
				"key", key,
				"create", fmt.Sprintf(`ETCDCTL_API=3 etcdctl --endpoints=%s put %s '{"Network":"10.100.0.0/16","IPv6Network":"2001:db8:1::/48","Backend":{"Type":"host-gw"}}'`, a.o.etcdEndpoints, key),
				"note", "the v2-era 'etcdctl set' writes the v2 keyspace, which leased (an etcd v3 client) never sees")
			a.setStatus("waiting for config")
		} else if a.cfg != nil && a.status != "config deleted" {
			klog.Warningf("network config %s was deleted; keeping the last good config and the datapath", a.reg.Keys().Config())
			a.status = "config deleted"
		}
		return
	}
	a.adoptConfig(a.view.Config)
}

// adoptConfig is updateConfig for the config value raw.
func (a *agent) adoptConfig(raw []byte) {
	if bytes.Equal(raw, a.seenRaw) {
		return // nothing new since the last look
	}
	a.seenRaw = raw
	cfg, warnings, err := lease.ParseConfig(raw)
	if err == nil {
		err = backend.ValidateConfig(cfg.Backend.Raw)
	}
	for _, w := range warnings {
		klog.Warningf("network config %s: %s", a.reg.Keys().Config(), w)
	}
	if err != nil {
		klog.ErrorS(err, "invalid network config; keeping the last good one", "key", a.reg.Keys().Config(),
			"remedy", "fix the JSON and put it again (leased config validate FILE checks a file offline)")
		a.setStatus("invalid network config: " + err.Error())
		return
	}
	if a.cfg != nil {
		if why := incompatible(a.cfg, cfg, a.self); why != "" {
			klog.ErrorS(nil, "network config change would invalidate this host's lease; keeping the last good config and the datapath",
				"why", why, "remedy", "revert the change, or drain this host and restart leased to take a subnet under the new config")
			return
		}
		klog.InfoS("network config changed; applying", "ipv4", poolString(cfg.IPv4), "ipv6", poolString(cfg.IPv6), "backend", cfg.Backend.Type)
	} else {
		klog.InfoS("network config", "ipv4", poolString(cfg.IPv4), "ipv6", poolString(cfg.IPv6), "backend", cfg.Backend.Type)
	}
	a.cfg = cfg
}

func poolString(p *lease.Pool) string {
	if p == nil {
		return "disabled"
	}
	return p.String()
}

// incompatible says why moving from old to new config would invalidate the
// lease self holds, or "" when the change can be applied in place.
func incompatible(old, new *lease.Config, self *lease.Record) string {
	if old.Backend.Type != new.Backend.Type {
		return fmt.Sprintf("Backend.Type changed from %s to %s: switching backends needs every host restarted", old.Backend.Type, new.Backend.Type)
	}
	if self == nil {
		return ""
	}
	for _, s := range self.Subnets() {
		pool, fam := new.IPv4, "IPv4"
		if s.Addr().Is6() {
			pool, fam = new.IPv6, "IPv6"
		}
		if pool == nil {
			return fmt.Sprintf("%s is disabled in the new config but this host holds %s", fam, s)
		}
		if !pool.Contains(s) {
			return fmt.Sprintf("this host's subnet %s is not in the new range %s", s, pool)
		}
	}
	return ""
}

// ensureBackend creates the backend for the config's Backend object, and
// recreates it when the object changed (same type; options such as the VNI).
func (a *agent) ensureBackend() error {
	if a.be != nil && bytes.Equal(a.cfg.Backend.Raw, a.beRaw) {
		return nil
	}
	be, err := a.newBackend(a.cfg.Backend.Raw, a.ext, a.node, backend.Options{IPMasq: a.o.ipMasq, Resync: a.o.resync})
	if err != nil {
		if a.be != nil {
			klog.ErrorS(err, "new backend options rejected; keeping the running backend")
			a.beRaw = a.cfg.Backend.Raw
			return nil
		}
		return fmt.Errorf("creating the %s backend: %w", a.cfg.Backend.Type, err)
	}
	if a.beCancel != nil {
		a.beCancel()
	}
	var bctx context.Context
	bctx, a.beCancel = context.WithCancel(context.Background())
	go func() {
		if err := be.Run(bctx); err != nil {
			klog.ErrorS(err, "backend stopped", "backend", be.Type())
		}
	}()
	a.be, a.beRaw, a.started = be, a.cfg.Backend.Raw, false
	kv := []any{"type", be.Type(), "mtu", be.MTU(), "iface", a.ext.Name}
	if a.ext.Split() { // IPv6 uses another link (its own default route's)
		kv = append(kv, "iface6", a.ext.Name6)
	}
	klog.InfoS("backend", kv...)
	return nil
}

// ensureLease makes sure the host holds a lease covering every family the
// config enables, with its record naming the current backend data.
func (a *agent) ensureLease(ctx context.Context) error {
	if a.sess == nil {
		// The grant waits at most 10s so that an unreachable etcd is
		// reported and retried.
		sess, err := lease.NewSession(ctx, a.cli, a.o.leaseTTL, 10*time.Second)
		if err != nil {
			a.setStatus("waiting for etcd at " + a.o.etcdEndpoints)
			return fmt.Errorf("creating an etcd lease at %s (is etcd up and reachable? check --etcd-endpoints and the TLS flags): %w", a.o.etcdEndpoints, err)
		}
		a.sess = sess
	}
	want := a.self == nil ||
		(a.cfg.IPv4 != nil && !a.self.Subnet.IsValid()) ||
		(a.cfg.IPv6 != nil && !a.self.IPv6Subnet.IsValid())
	if !want {
		if a.self.BackendType == a.be.Type() && bytes.Equal(a.self.BackendData, a.be.LeaseData()) {
			return nil
		}
		rec := *a.self
		rec.BackendType, rec.BackendData = a.be.Type(), a.be.LeaseData()
		if err := a.reg.Publish(ctx, a.sess.Lease(), &rec); err != nil {
			return err
		}
		a.self = &rec
		return nil
	}
	c := lease.Claim{
		Node: a.node, PublicIP: a.ext.Public4, PublicIPv6: a.ext.Public6,
		BackendType: a.be.Type(), BackendData: a.be.LeaseData(),
		Hint4: a.hint.Subnet4, Hint6: a.hint.Subnet6,
		Keep4: a.held.Subnet, Keep6: a.held.IPv6Subnet,
	}
	if a.cfg.IPv4 != nil {
		klog.InfoS("Picking subnet in range", "range", a.cfg.IPv4.String())
	}
	if a.cfg.IPv6 != nil {
		klog.InfoS("Picking subnet in range", "range", a.cfg.IPv6.String())
	}
	rec, err := a.reg.Acquire(ctx, a.sess.Lease(), a.cfg, c)
	if err != nil {
		return err
	}
	moved := func(old, new netip.Prefix) bool { return old.IsValid() && old != new }
	switch {
	case a.held.Node == "" && (moved(a.hint.Subnet4, rec.Subnet) || moved(a.hint.Subnet6, rec.IPv6Subnet)):
		klog.Warningf("this host's subnets changed since the last run (%s held %v, now %v): restart docker.service so that dockerd takes the new subnet.env", a.o.subnetFile, []netip.Prefix{a.hint.Subnet4, a.hint.Subnet6}, rec.Subnets())
		a.started = false
	case a.held.Node == "":
		a.started = false
	case moved(a.held.Subnet, rec.Subnet) || moved(a.held.IPv6Subnet, rec.IPv6Subnet):
		klog.Warningf("this host's subnets changed from %v to %v: containers on the old subnet lose connectivity; restart docker.service so that dockerd takes the new subnet.env", a.held.Subnets(), rec.Subnets())
		a.started = false
	case a.held.Subnet != rec.Subnet || a.held.IPv6Subnet != rec.IPv6Subnet:
		klog.InfoS("this host gained a subnet; restart docker.service to use it (the existing subnets are unchanged)", "subnets", rec.Subnets())
		a.started = false
	}
	klog.InfoS("Lease acquired", "node", a.node, "subnets", rec.Subnets(), "ttl", a.o.leaseTTL)
	a.self = rec
	a.held = *rec
	return nil
}

func (a *agent) writeSubnetEnv() error {
	env := subnetenv.Env{Subnet4: a.self.Subnet, Subnet6: a.self.IPv6Subnet, MTU: a.be.MTU(), IPMasq: a.o.ipMasq, Backend: a.be.Type()}
	if a.self.Subnet.IsValid() {
		env.Network4 = a.cfg.IPv4.Network
	}
	if a.self.IPv6Subnet.IsValid() {
		env.Network6 = a.cfg.IPv6.Network
	}
	changed, err := subnetenv.Write(a.o.subnetFile, env)
	if err != nil {
		return fmt.Errorf("writing %s (check the directory exists and is writable): %w", a.o.subnetFile, err)
	}
	if changed {
		kv := []any{"path", a.o.subnetFile}
		if env.Subnet4.IsValid() {
			kv = append(kv, "subnet", env.Subnet4)
		}
		if env.Subnet6.IsValid() {
			kv = append(kv, "ipv6Subnet", env.Subnet6)
		}
		klog.InfoS("wrote subnet file", append(kv, "mtu", env.MTU)...)
	}
	return nil
}

// setStatus reports what the agent is doing to systemd (STATUS=, and
// READY=1 once the host is ready). Without systemd it is a no-op.
func (a *agent) setStatus(s string) {
	a.health.set(a.ready && a.self != nil && a.exhausted == "", s)
	if s == a.status {
		return
	}
	a.status = s
	msg := "STATUS=" + s
	if a.ready {
		msg = "READY=1\n" + msg
	}
	daemon.SdNotify(false, msg) //nolint:errcheck // best effort
}

// startGrace keeps vanishing peers for one lease TTL; see programmed.
func (a *agent) startGrace() {
	a.graceUntil = time.Now().Add(a.o.leaseTTL)
	klog.InfoS("this host lost its lease; peers whose leases vanish meanwhile stay programmed until they re-claim or the grace period ends", "until", a.graceUntil.Format(time.RFC3339))
}

// withGrace returns accepted plus, during a grace period, the peers last
// programmed that are gone from etcd and whose subnets nobody else holds.
// It records the result as programmed.
func (a *agent) withGrace(accepted map[string]*lease.Record) map[string]*lease.Record {
	if !a.graceUntil.IsZero() && time.Now().After(a.graceUntil) {
		a.graceUntil = time.Time{}
		klog.InfoS("grace period over; peers without a lease are dropped")
	}
	// A copy: the PeerSet updates accepted in place.
	out := maps.Clone(accepted)
	if !a.graceUntil.IsZero() {
		held := map[netip.Prefix]bool{}
		for _, r := range accepted {
			for _, s := range r.Subnets() {
				held[s] = true
			}
		}
		if a.self != nil {
			for _, s := range a.self.Subnets() {
				held[s] = true
			}
		}
		for node, r := range a.programmed {
			if _, ok := accepted[node]; ok {
				continue
			}
			if taken := slices.ContainsFunc(r.Subnets(), func(s netip.Prefix) bool { return held[s] }); !taken {
				out[node] = r
			}
		}
	}
	a.programmed = out
	return out
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func toPeers(recs map[string]*lease.Record) []backend.Peer {
	out := make([]backend.Peer, 0, len(recs))
	for _, r := range recs {
		out = append(out, toPeer(r))
	}
	return out
}

func toPeer(r *lease.Record) backend.Peer {
	return backend.Peer{
		Node: r.Node, Subnet4: r.Subnet, Subnet6: r.IPv6Subnet,
		PublicIP4: r.PublicIP, PublicIP6: r.PublicIPv6,
		BackendType: r.BackendType, BackendData: r.BackendData,
	}
}
