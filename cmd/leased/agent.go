package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
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
	// checkPrivileges is backend.CheckPrivileges (nil: no check, for
	// tests whose backend programs no kernel).
	checkPrivileges func(typ string, ext backend.ExtIface, v4, v6 bool, o backend.Options) error
	// fatal, once set, stops run: the agent lacks a privilege (see
	// ensureBackend) and must not claim a subnet.
	fatal error

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
	programmed map[string]*lease.Record
	graceUntil time.Time
	cfg        *lease.Config
	rejected   map[string]string // node → reason last logged
	exhausted  string            // last "out of subnets" message logged
	cfgRefused string            // why the config in etcd is not applied ("": it is)
	exclLogged string            // the host's own routes last logged (exclude.go)

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
	health   health      // what /readyz reports
	own      ownKeys     // which keys carrying the node name are this host's
	ipam     *dockerIPAM // the Docker IPAM driver (dockeripam.go); nil in tests

	// etcd says why etcd cannot be used (nil in tests of the agent alone).
	etcd *etcdMonitor

	// refused is the valid config in etcd this host refused (it leaves out
	// subnets that this host or a live peer holds, or changes the backend
	// type); it is judged again whenever leases change (nil: none).
	refused *lease.Config
}

func newAgent(o *options, cli *clientv3.Client, ext backend.ExtIface, node string) *agent {
	a := &agent{o: o, cli: cli, reg: lease.NewRegistry(cli, o.etcdPrefix), ext: ext, node: node, newBackend: backend.New,
		checkPrivileges: backend.CheckPrivileges, rejected: map[string]string{}, dirty: map[string]bool{}}
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
	a.setStatus(a.waitingForEtcd())
	a.claimEarly(ctx)
	if a.fatal != nil {
		return a.fatal
	}
	retry := time.NewTimer(time.Hour)
	defer retry.Stop()
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
		case <-a.etcd.Changed():
			if a.self == nil && a.etcd.Why() != "" {
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
		case <-sessDone:
			klog.Warningf("lease of %s lost (no keep-alive answer within --lease-ttl %s); claiming it again, the datapath stays as it is", a.node, a.o.leaseTTL)
			a.sess = nil
			a.self = nil
			a.startGrace()
			a.withdraw()
			a.setStatus("lease lost; claiming it again")
		case <-retry.C:
		}
		if err := a.step(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if a.fatal != nil {
				return a.fatal
			}
			d := lease.Jitter(bo)  // a fleet that failed together retries apart
			if a.etcd.quiet(err) { // the monitor has said why
				klog.V(2).InfoS("retrying", "err", err, "in", d)
			} else {
				klog.ErrorS(err, "retrying", "in", d)
			}
			retry.Reset(d)
			if bo *= 2; bo > 30*time.Second {
				bo = 30 * time.Second
			}
		} else {
			bo = time.Second
			if !a.graceUntil.IsZero() {
				retry.Reset(time.Until(a.graceUntil) + 10*time.Millisecond)
			}
			if a.own.conflict != "" && a.self == nil {
				retry.Reset(10 * time.Second) // besides the watch's events
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
	a.checkOwnKeys(b)
	a.view.Apply(b)
	a.checkOwnRecord(b)
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
			a.reportConflict(cf)
			return nil // the other host's keys going away, or run's timer, triggers the next try
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
	slices.Sort(delta) // deterministic, as toPeers
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
		klog.InfoS("ready", "node", a.node, "subnets", a.self.Subnets(), "peers", npeers)
	}
	status := fmt.Sprintf("lease %v held; %d peers", a.self.Subnets(), npeers)
	if a.cfgRefused != "" {
		status = a.cfgRefused + "; running on the last good config; " + status
	}
	a.setStatus(status)
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
	own := a.held.Subnets()
	if a.self != nil {
		own = append(own, a.self.Subnets()...)
	}
	for _, s := range own {
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
	if a.refused == nil || len(a.dirty) == 0 || a.ownConflict(a.refused) != "" || a.peerConflict(a.refused) != "" {
		return
	}
	cfg := a.refused
	a.refused, a.cfgRefused = nil, ""
	klog.InfoS("network config no longer strands a held subnet; applying", "ipv4", poolString(cfg.IPv4), "ipv6", poolString(cfg.IPv6), "backend", cfg.Backend.Type)
	a.cfg = cfg
}

// ensureBackend creates the backend for the config's Backend object, and
// recreates it when the object changed (same type; options such as the VNI).
func (a *agent) ensureBackend() error {
	if a.be != nil && backend.SameConfig(a.cfg.Backend.Raw, a.beRaw) {
		return nil
	}
	opts := backend.Options{IPMasq: a.o.ipMasq, NoForwardRules: !a.o.iptablesForward, Resync: a.o.resync}
	if a.be == nil && a.checkPrivileges != nil {
		// Before the first claim: a host that cannot program its
		// datapath must not advertise a subnet peers would route to it.
		if err := a.checkPrivileges(a.cfg.Backend.Type, a.ext, a.cfg.IPv4 != nil, a.cfg.IPv6 != nil, opts); err != nil {
			if pe := (*backend.PrivilegeError)(nil); errors.As(err, &pe) {
				a.fatal = err
			}
			return err
		}
	}
	be, err := a.newBackend(a.cfg.Backend.Raw, a.ext, a.node, opts)
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
		// Once bctx ends the agent has replaced the backend or is ending:
		// nothing uses it any more, so its handles are released.
		<-bctx.Done()
		if c, ok := be.(backend.Closer); ok {
			c.Close() //nolint:errcheck // nothing to do about it
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
			a.setStatus(a.waitingForEtcd())
			return fmt.Errorf("creating an etcd lease at %s (is etcd up and reachable? check --etcd-endpoints and the TLS flags): %w", a.o.etcdEndpoints, err)
		}
		a.sess = sess
		a.own.load(a.o, a.node)
		a.own.granted(sess.Lease())
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
			if errors.Is(err, lease.ErrNotHeld) {
				a.self = nil // claim again: restores deleted keys, reports a conflict
			}
			return err
		}
		a.self = &rec
		return nil
	}
	exclude, err := a.exclusions()
	if err != nil {
		return err
	}
	c := lease.Claim{
		Node: a.node, PublicIP: a.ext.Public4, PublicIPv6: a.ext.Public6, Exclude: exclude,
		BackendType: a.be.Type(), BackendData: a.be.LeaseData(),
		Hint4: a.hint.Subnet4, Hint6: a.hint.Subnet6,
		Keep4: a.held.Subnet, Keep6: a.held.IPv6Subnet,
		Own: a.own.ids, NoHistory: a.own.noHistory,
	}
	if a.cfg.IPv4 != nil {
		klog.InfoS("Picking subnet in range", "range", a.cfg.IPv4.String())
	}
	if a.cfg.IPv6 != nil {
		klog.InfoS("Picking subnet in range", "range", a.cfg.IPv6.String())
	}
	rec, err := a.reg.Acquire(ctx, a.sess.Lease(), a.cfg, c)
	if err != nil {
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			// The etcd lease was revoked or expired; the session notices
			// only at its next keep-alive (TTL/3). Grant a new one now.
			a.sess.Orphan()
			a.sess = nil
		}
		return err
	}
	a.own.claimed(a.sess.Lease())
	if a.own.conflict != "" {
		klog.InfoS("node name conflict over: this host holds its node name again", "node", a.node)
		a.own.conflict = ""
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
	if !a.graceUntil.IsZero() {
		// Peers cut off from etcd with this host re-claim once they
		// reach it again, which may be a little later than this host
		// did: keep their routes for one more TTL from now.
		if until := time.Now().Add(a.o.leaseTTL); until.After(a.graceUntil) {
			a.graceUntil = until
			klog.V(2).InfoS("lease held again; peers that have not re-claimed theirs stay programmed for one more lease TTL", "until", a.graceUntil.Format(time.RFC3339))
		}
	}
	a.held = *rec
	return nil
}

func (a *agent) writeSubnetEnv() error {
	env := subnetenv.Env{Subnet4: a.self.Subnet, Subnet6: a.self.IPv6Subnet, MTU: a.be.MTU(), IPMasq: a.o.ipMasq, Backend: a.be.Type()}
	env.Docker0Bits = a.ipam.lease(env.Subnet4, env.Subnet6) // docker0's share; the rest is the driver's
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
	serving := a.ready && a.self != nil && a.exhausted == "" && a.cfgRefused == ""
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

// startGrace keeps vanishing peers for one lease TTL, and ensureLease for
// one more TTL from when this host holds its lease again; see programmed.
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

// toPeers returns the backend's peers for recs, oldest lease (lowest create
// revision, then node name) first. The backend resolves a conflict between
// two peers (both wanting one kernel object) in favour of the first, so the
// order must not change from one call to the next, and the older holder
// wins as in the peer filter.
func toPeers(recs map[string]*lease.Record) []backend.Peer {
	sorted := slices.SortedFunc(maps.Values(recs), func(a, b *lease.Record) int {
		if c := cmp.Compare(a.Rev, b.Rev); c != 0 {
			return c
		}
		return strings.Compare(a.Node, b.Node)
	})
	out := make([]backend.Peer, 0, len(sorted))
	for _, r := range sorted {
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
