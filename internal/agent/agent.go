package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/hoptrace"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/metrics"
)

// agent runs the data flow config → lease → peers → backend → kernel for
// one host, as stages that each own their state: the config keeper (the
// config applied), the lease keeper (session, claim, subnet file), the
// peer tracker (accepted peers and what changed) and the datapath (the
// backend). Values flow one way: the watch's batches into the view, the
// view into the config keeper, the view and the config into the peer
// tracker, its changes into the datapath. Its state is owned by the
// goroutine running run; nothing else touches it.
type agent struct {
	o    *Options
	reg  *lease.Registry
	node string

	view lease.View // etcd as the watch has shown it

	lease *leaseKeeper
	peers *peerTracker
	dp    *datapath
	conf  *configKeeper

	// fatal, once set, stops run: the agent lacks a privilege (see
	// datapath.ensure) and must not claim a subnet.
	fatal     error
	exhausted string // last "out of subnets" message logged
	ready     bool
	status    string
	health    health // what /readyz reports
	// etcd says why etcd cannot be used (nil in tests of the agent alone).
	etcd *etcdMonitor
}

func newAgent(o *Options, cli *clientv3.Client, ext backend.ExtIface, node string) *agent {
	reg := lease.NewRegistry(cli, o.EtcdPrefix)
	opts := backend.Options{IPMasq: o.IPMasq, NoForwardRules: !o.IPTablesForward, Resync: o.Resync}
	return &agent{o: o, reg: reg, node: node,
		conf:  &configKeeper{key: reg.Keys().Config(), endpoints: o.EtcdEndpoints},
		lease: newLeaseKeeper(o, cli, reg, ext, node),
		peers: newPeerTracker(),
		dp:    newDatapath(ext, node, opts)}
}

// run drives the agent until ctx is done. It returns nil on cancellation:
// the lease is left to expire on its own and the kernel state stays, so a
// restarted agent picks up where this one stopped without disturbing traffic.
func (a *agent) run(ctx context.Context) error {
	batches := make(chan lease.Batch, 16)
	a.startWatch(ctx, batches)
	a.setStatus(a.waitingForEtcd())
	retry := time.NewTimer(time.Hour)
	defer retry.Stop()
	bo := time.Second
	defer a.stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.etcd.Changed():
			if a.lease.self == nil && a.etcd.Why() != "" {
				a.setStatus(a.waitingForEtcd()) // systemctl status leased says why
			}
			continue
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
		case b := <-a.lease.lockEvents():
			if l := a.lease.checkOwnKeys(b); l != nil {
				a.lost(l)
			}
		case <-a.lease.done():
			klog.Warningf("lease of %s lost (no keep-alive answer within --lease-ttl %s); claiming it again, the datapath stays as it is", a.node, a.o.LeaseTTL)
			a.lease.sessionLost()
			a.lost(&lost{why: "lease lost; claiming it again", withdraw: true})
		case <-retry.C:
		}
		err := a.step(ctx)
		hoptrace.Flush()
		if err != nil && ctx.Err() != nil {
			return nil
		}
		if a.fatal != nil {
			return a.fatal
		}
		if d := a.retryIn(err, &bo); d > 0 {
			retry.Reset(d)
		}
	}
}

// retryIn returns when to step again besides the watch's events (0: not),
// after a step that returned err; bo is the backoff of failed steps.
func (a *agent) retryIn(err error, bo *time.Duration) time.Duration {
	if err != nil {
		d := lease.Jitter(*bo) // a fleet that failed together retries apart
		if a.etcd.quiet(err) { // the monitor has said why
			klog.V(2).InfoS("retrying", "err", err, "in", d)
		} else {
			klog.ErrorS(err, "retrying", "in", d)
		}
		*bo = min(2**bo, 30*time.Second)
		return d
	}
	*bo = time.Second
	if a.lease.conflicted() {
		return 10 * time.Second
	}
	if g := a.peers.graceEnds(); !g.IsZero() {
		if d := time.Until(g); d > 0 {
			return d + 10*time.Millisecond
		}
		// Over, but the step did not get to the peers (no lease): the
		// step that gets there ends it. No timer: that would step again
		// at once, and again (an Acquire each time, while out of subnets).
	}
	return 0
}

// stop leaves the lease to expire on its own and the datapath as it is,
// for the next run.
func (a *agent) stop() {
	a.saveCache()
	handoff := a.lease.sess != nil && a.lease.self != nil
	a.lease.orphan()
	a.dp.stop(handoff)
}

// lost reacts to this host no longer using its lease (see lost): peers
// whose leases vanish meanwhile stay programmed for a grace period.
func (a *agent) lost(l *lost) {
	a.peers.startGrace(a.o.LeaseTTL)
	if l.withdraw {
		a.dp.withdraw()
	}
	if l.why != "" {
		a.setStatus(l.why)
	}
}

// startWatch follows etcd from the lease cache a previous run saved, when
// it is usable, else from a full listing.
func (a *agent) startWatch(ctx context.Context, batches chan lease.Batch) {
	path := a.o.LeaseCachePath()
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
				go a.reg.WatchFromSnapshot(ctx, h, decode, batches) //nolint:errcheck // returns ctx.Err()
				return
			}
			klog.InfoS("lease cache is from another etcd cluster, prefix or time; listing instead", "path", path)
		}
	}
	go a.reg.Watch(ctx, batches) //nolint:errcheck // returns ctx.Err()
}

// cacheMinLeases is the smallest lease cache worth resuming from: below
// it, listing takes a few milliseconds, no more than checking the cache.
const cacheMinLeases = 1000

// saveCache saves the lease set for the next run (see startWatch).
func (a *agent) saveCache() {
	path := a.o.LeaseCachePath()
	if path == "" || !a.view.Synced {
		return
	}
	if err := lease.SaveSnapshot(path, a.reg.Keys().Prefix(), &a.view); err != nil {
		klog.InfoS("could not save the lease cache; the next start lists every lease", "path", path, "err", err)
	}
}

// apply folds one watch batch into the agent's view of etcd, checking it
// for changes to this host's own keys.
func (a *agent) apply(b lease.Batch) {
	if hoptrace.On {
		for _, e := range b.Events {
			hoptrace.Taken(e.Node)
		}
	}
	l := a.lease.checkOwnKeys(b)
	a.view.Apply(b)
	if l == nil {
		l = a.lease.checkOwnRecord(b, &a.view)
	}
	a.peers.saw(b, &a.view)
	if l != nil {
		a.lost(l)
	}
}

// step brings everything downstream of the view in line: config, backend,
// lease, peers, subnet.env. It returns an error when something transient
// failed and the step should be retried.
func (a *agent) step(ctx context.Context) error {
	if !a.view.Synced {
		return nil
	}
	if status := a.conf.update(&a.view, a.lease.subnets(), a.peers.changed()); status != "" {
		a.setStatus(status)
	}
	cfg := a.conf.cfg
	if cfg == nil {
		return nil
	}
	if err := a.dp.ensure(cfg); err != nil {
		if pe := (*backend.PrivilegeError)(nil); errors.As(err, &pe) {
			a.fatal = err
		}
		return err
	}
	c, err := a.lease.ensure(ctx, cfg, a.dp.be)
	if err != nil {
		return a.leaseFailed(err)
	}
	a.exhausted = ""
	if c.moved {
		a.dp.leaseChanged()
	}
	if c.new {
		a.dp.answer(a.lease.local(cfg))
		a.peers.extendGrace(a.o.LeaseTTL)
	}
	changes := a.peers.update(&a.view, cfg, a.lease.self)
	hoptrace.Stage(hoptrace.Peers)
	a.dp.apply(ctx, changes, a.peers.all)
	if err := a.dp.start(ctx, a.lease.local(cfg)); err != nil {
		return err
	}
	if err := a.lease.writeSubnetEnv(cfg, a.dp.be); err != nil {
		return err
	}
	a.report()
	a.peers.prepare() // after the hand-over, before the next change
	return nil
}

// leaseFailed reports why the lease could not be held; it returns the
// error when the step is to be retried, nil when an event triggers the
// next try.
func (a *agent) leaseFailed(err error) error {
	var ex *lease.ExhaustedError
	if errors.As(err, &ex) {
		if msg := err.Error(); msg != a.exhausted {
			kv := []any{"range", ex.Pool.String(), "inUse", ex.InUse}
			if routes := ex.Routes(); len(routes) > 0 {
				kv = append(kv, "overlappingHostRoutes", routes) // the rest of the range (exclude.go)
			}
			klog.ErrorS(nil, "out of subnets", append(kv,
				"remedy", "raise SubnetMax/IPv6SubnetMax in the config or remove stale leases; leased acquires a subnet as soon as one frees up")...)
			a.exhausted = msg
		}
		a.setStatus("out of subnets in " + ex.Pool.String() + "; waiting for one to free up")
		return nil // a lease deletion or config change triggers the next try
	}
	var cf *lease.ConflictError
	if errors.As(err, &cf) {
		a.setStatus(a.lease.reportConflict(cf))
		return nil // the other host's keys going away, or run's timer, triggers the next try
	}
	if a.lease.sess == nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		a.setStatus(a.waitingForEtcd()) // no session could be granted
	}
	return err
}

// report publishes the agent's state: metrics, the first "ready", STATUS=.
func (a *agent) report() {
	npeers, nrejected := a.peers.counts(&a.view)
	metrics.PeersKnown.Set(float64(len(a.view.Records) + len(a.view.Malformed) - btoi(a.view.Records[a.node] != nil)))
	metrics.PeersRejected.Set(float64(nrejected))
	metrics.PeersProgrammed.Set(float64(npeers))
	self := a.lease.self
	if !a.ready {
		a.ready = true
		klog.InfoS("ready", "node", a.node, "subnets", self.Subnets(), "peers", npeers)
	}
	status := fmt.Sprintf("lease %v held; %d peers", self.Subnets(), npeers)
	if a.conf.refusedWhy != "" {
		status = a.conf.refusedWhy + "; running on the last good config; " + status
	}
	a.setStatus(status)
}

// waitingForEtcd is the status while etcd cannot be used, with the reason
// once the etcd monitor knows it.
func (a *agent) waitingForEtcd() string {
	if why := a.etcd.Why(); why != "" {
		return "waiting for etcd: " + why
	}
	return "waiting for etcd at " + a.o.EtcdEndpoints
}

// setStatus reports what the agent is doing to systemd (STATUS=, and
// READY=1 once the host is ready; without systemd that is a no-op), and
// whether it serves (/readyz, leased_ready): it does while it holds its
// lease, has a subnet and applies the config in etcd.
func (a *agent) setStatus(s string) {
	serving := a.ready && a.lease.self != nil && a.exhausted == "" && a.conf.refusedWhy == ""
	a.health.set(serving, s)
	metrics.Ready.Set(float64(btoi(serving)))
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

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
