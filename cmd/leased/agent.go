package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/metrics"
)

// agent runs the data flow config → lease → peers → backend → kernel for
// one host, as three stages that each own their state: the lease keeper
// (session, claim, subnet file), the peer tracker (accepted peers and
// what changed) and the datapath (the backend). Values flow one way: the
// watch's batches into the view, the view and the config into the peer
// tracker, its changes into the datapath. Its state is owned by the
// goroutine running run; nothing else touches it.
type agent struct {
	o    *options
	reg  *lease.Registry
	node string

	view    lease.View // etcd as the watch has shown it
	resumed bool       // the watch resumed from the lease cache

	lease *leaseKeeper
	peers *peerTracker
	dp    *datapath

	// The config: cfg is the one applied. seenRaw is the value last
	// parsed; refused is the valid config in etcd this host refused (it
	// leaves out subnets that this host or a live peer holds, or changes
	// the backend type), judged again whenever leases change (nil: none),
	// and cfgRefused says why ("": the config in etcd is applied).
	cfg        *lease.Config
	seenRaw    []byte
	refused    *lease.Config
	cfgRefused string

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

func newAgent(o *options, cli *clientv3.Client, ext backend.ExtIface, node string) *agent {
	reg := lease.NewRegistry(cli, o.etcdPrefix)
	opts := backend.Options{IPMasq: o.ipMasq, NoForwardRules: !o.iptablesForward, Resync: o.resync}
	return &agent{o: o, reg: reg, node: node,
		lease: newLeaseKeeper(o, cli, reg, ext, node),
		peers: newPeerTracker(o.leaseTTL),
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
		case <-a.lease.done():
			klog.Warningf("lease of %s lost (no keep-alive answer within --lease-ttl %s); claiming it again, the datapath stays as it is", a.node, a.o.leaseTTL)
			a.lease.sessionLost()
			a.lost(&lost{why: "lease lost; claiming it again", withdraw: true})
		case <-retry.C:
		}
		err := a.step(ctx)
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
		if a.etcd.quiet(err) { // the monitor has said why
			klog.V(2).InfoS("retrying", "err", err, "in", *bo)
		} else {
			klog.ErrorS(err, "retrying", "in", *bo)
		}
		d := *bo
		*bo = min(2**bo, 30*time.Second)
		return d
	}
	*bo = time.Second
	if a.lease.conflicted() {
		return 10 * time.Second
	}
	if g := a.peers.graceEnds(); !g.IsZero() {
		return time.Until(g) + 10*time.Millisecond
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
	a.peers.startGrace()
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
				a.resumed = true
				klog.InfoS("starting from the lease cache of the previous run; reading only the leases changed since", "path", path, "rev", h.Rev, "leases", h.Leases)
				go a.reg.WatchFromSnapshot(ctx, h, decode, batches) //nolint:errcheck // returns ctx.Err()
				return
			}
			klog.InfoS("lease cache is from another etcd cluster, prefix or time; listing instead", "path", path)
		}
	}
	go a.reg.Watch(ctx, batches) //nolint:errcheck // returns ctx.Err()
}

// onReady, when set, runs once the agent is first ready (for profiling).
var onReady func()

// cacheMinLeases is the smallest lease cache worth resuming from: below
// it, listing takes a few milliseconds, no more than checking the cache.
const cacheMinLeases = 1000

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

// apply folds one watch batch into the agent's view of etcd, checking it
// for changes to this host's own keys.
func (a *agent) apply(b lease.Batch) {
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
	a.updateConfig()
	if a.cfg == nil {
		return nil
	}
	if err := a.dp.ensure(a.cfg); err != nil {
		if pe := (*backend.PrivilegeError)(nil); errors.As(err, &pe) {
			a.fatal = err
		}
		return err
	}
	c, err := a.lease.ensure(ctx, a.cfg, a.dp.be)
	if err != nil {
		return a.leaseFailed(err)
	}
	a.exhausted = ""
	if c.new {
		a.peers.extendGrace()
	}
	if c.moved {
		a.dp.leaseChanged()
	}
	changes := a.peers.update(&a.view, a.cfg, a.lease.self)
	a.dp.apply(ctx, changes, a.peers.all)
	if err := a.dp.start(ctx, a.lease.local(a.cfg)); err != nil {
		return err
	}
	if err := a.lease.writeSubnetEnv(a.cfg, a.dp.be); err != nil {
		return err
	}
	a.report()
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
		if onReady != nil {
			onReady()
		}
	}
	status := fmt.Sprintf("lease %v held; %d peers", self.Subnets(), npeers)
	if a.cfgRefused != "" {
		status = a.cfgRefused + "; running on the last good config; " + status
	}
	a.setStatus(status)
}

// updateConfig adopts the config in etcd when it is valid and compatible
// with the lease this host holds; otherwise it says why and keeps the last
// good config (and with it the datapath).
func (a *agent) updateConfig() {
	if a.view.Config == nil {
		a.refused, a.seenRaw, a.cfgRefused = nil, nil, "" // nothing left to apply; a config put back is judged afresh
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
	a.recheckRefused()
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
		a.refused = nil // what etcd holds now is this invalid config
		a.cfgRefused = "invalid network config: " + err.Error()
		a.setStatus(a.cfgRefused)
		return
	}
	if a.cfg != nil {
		if a.cfg.Equal(cfg) {
			// Only the formatting changed: nothing to do on this host.
			a.refused, a.cfgRefused = nil, ""
			klog.V(2).InfoS("network config rewritten with the same content; nothing changes", "key", a.reg.Keys().Config())
			return
		}
		if why := a.ownConflict(cfg); why != "" {
			klog.ErrorS(nil, "network config change would invalidate this host's lease; keeping the last good config and the datapath",
				"why", why, "remedy", "revert the change, or drain this host and restart leased to take a subnet under the new config")
			a.refused = cfg
			a.cfgRefused = "network config refused: " + why
			a.setStatus(a.cfgRefused)
			return
		}
		if why := a.peerConflict(cfg); why != "" {
			klog.ErrorS(nil, "network config refused: it leaves out subnets that live hosts hold; keeping the last good config and the datapath",
				"why", why, "remedy", "put back a config that keeps every held subnet (leased config put --dry-run checks this), or drain the hosts named; every host refuses the config while they hold those subnets, and applies it once they are gone")
			a.refused = cfg
			a.cfgRefused = "network config refused: " + why
			a.setStatus(a.cfgRefused)
			return
		}
		a.refused = nil
		klog.InfoS("network config changed; applying", "ipv4", poolString(cfg.IPv4), "ipv6", poolString(cfg.IPv6), "backend", cfg.Backend.Type)
	} else {
		klog.InfoS("network config", "ipv4", poolString(cfg.IPv4), "ipv6", poolString(cfg.IPv6), "backend", cfg.Backend.Type)
	}
	a.cfg = cfg
	a.cfgRefused = ""
}

func poolString(p *lease.Pool) string {
	if p == nil {
		return "disabled"
	}
	return p.String()
}

// ownConflict says why this host cannot move from a.cfg to new, or "": the
// backend type changes, or new leaves out a subnet this host holds or still
// serves in the datapath (also while it re-claims a lost lease).
func (a *agent) ownConflict(new *lease.Config) string {
	old := a.cfg
	if old.Backend.Type != new.Backend.Type {
		return fmt.Sprintf("Backend.Type changed from %s to %s: switching backends needs every host restarted", old.Backend.Type, new.Backend.Type)
	}
	for _, s := range a.lease.subnets() {
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

// peerConflict says which live hosts' subnets new leaves out
// (lease.ConfigConflicts), or "". Every host sees the same leases, so every
// host refuses such a config, and none drops its routes to the stranded
// hosts while the others keep theirs.
func (a *agent) peerConflict(new *lease.Config) string {
	c := lease.ConfigConflicts(a.cfg, new, a.view.Records)
	if len(c) == 0 {
		return ""
	}
	const show = 3
	names := make([]string, 0, show)
	for _, x := range c[:min(show, len(c))] {
		names = append(names, x.String())
	}
	more := ""
	if len(c) > show {
		more = fmt.Sprintf(" and %d more (leased config put --dry-run lists them)", len(c)-show)
	}
	return fmt.Sprintf("%d live host(s) hold subnets outside it: %s%s", len(c), strings.Join(names, "; "), more)
}

// recheckRefused adopts the refused config once the leases that made it
// refused are gone (for instance the hosts were drained).
func (a *agent) recheckRefused() {
	if a.refused == nil || !a.peers.changed() || a.ownConflict(a.refused) != "" || a.peerConflict(a.refused) != "" {
		return
	}
	cfg := a.refused
	a.refused, a.cfgRefused = nil, ""
	klog.InfoS("network config no longer strands a held subnet; applying", "ipv4", poolString(cfg.IPv4), "ipv6", poolString(cfg.IPv6), "backend", cfg.Backend.Type)
	a.cfg = cfg
}

// waitingForEtcd is the status while etcd cannot be used, with the reason
// once the etcd monitor knows it.
func (a *agent) waitingForEtcd() string {
	if why := a.etcd.Why(); why != "" {
		return "waiting for etcd: " + why
	}
	return "waiting for etcd at " + a.o.etcdEndpoints
}

// setStatus reports what the agent is doing to systemd (STATUS=, and
// READY=1 once the host is ready; without systemd that is a no-op), and
// whether it serves (/readyz, leased_ready): it does while it holds its
// lease, has a subnet and applies the config in etcd.
func (a *agent) setStatus(s string) {
	serving := a.ready && a.lease.self != nil && a.exhausted == "" && a.cfgRefused == ""
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
