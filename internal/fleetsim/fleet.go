package fleetsim

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/pkg/lease"
)

// Options shape a simulation.
type Options struct {
	// Hosts is K, the size of the fleet.
	Hosts int
	// Endpoints are where hosts connect (etcd members or gRPC proxies):
	// host i uses Endpoints[i % len(Endpoints)].
	Endpoints []string
	// AdminEndpoints are the cluster's members, for the simulator's own
	// reads and writes (the config, the final check).
	AdminEndpoints []string
	// TLS, when set, is used by every host's client.
	TLS *tls.Config
	// Prefix is the etcd prefix ("" means lease.DefaultPrefix).
	Prefix string
	// LeaseTTL is the hosts' --lease-ttl.
	LeaseTTL time.Duration
	// Dual enables IPv6 too (one more lock key per host).
	Dual bool
	// StormSpread is how long the join storm takes to start every host
	// (default 1 s); a negative value starts them all at once.
	StormSpread time.Duration
	// Config, when set, is the network config (JSON) instead of a /8 of
	// /24s (or its dual-stack form); e.g. a small pool to make claims race.
	Config string
	// Joins is the number of single new hosts timed one after the other.
	Joins int
	// Steady is how long the steady state is measured.
	Steady time.Duration
	// RestartStep is the fraction of the fleet restarted at a time (0.01).
	RestartStep float64
	// ExpireFraction is the fraction killed at once in the mass expiry.
	ExpireFraction float64
	// Previous simulates the agent as it was before the changes of
	// Documentation/scale.md "What was wasted" 1 and 2, for before/after
	// figures in one run: its peer watch covers the whole prefix (every
	// lock and affinity key too), it does not watch its own locks apart,
	// and a restarted host grants a new etcd lease instead of resuming
	// its previous one.
	Previous bool
	// Timeout bounds each wait (default 10 minutes).
	Timeout time.Duration
	// Procs are the etcd processes whose CPU and memory are reported
	// (members, then proxies), with their /metrics URLs.
	Procs []Proc
	// Log reports progress; nil is silent.
	Log func(format string, args ...any)
}

// Proc is an etcd process watched by the simulation.
type Proc struct {
	Name       string
	Pid        int
	MetricsURL string
	Member     bool // a cluster member (else a proxy)
}

// Fleet is a running simulation.
type Fleet struct {
	opts  Options
	cfg   *lease.Config
	ctr   counters
	tr    *tracker
	admin *clientv3.Client

	mu    sync.Mutex
	hosts []*Host // by index; nil while not running
}

func (f *Fleet) logf(format string, args ...any) {
	if f.opts.Log != nil {
		f.opts.Log(format, args...)
	}
}

func (f *Fleet) newHost(i int) *Host {
	h := &Host{Name: fmt.Sprintf("sim-%05d", i), idx: i, f: f,
		publicIP: netip.AddrFrom4([4]byte{172, 16 + byte(i>>16), byte(i >> 8), byte(i)})}
	h.stopped.Store(true) // until it started
	return h
}

func (f *Fleet) endpoint(i int) string { return f.opts.Endpoints[i%len(f.opts.Endpoints)] }

func (f *Fleet) live() []*Host {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*Host
	for _, h := range f.hosts {
		if h != nil && !h.stopped.Load() {
			out = append(out, h)
		}
	}
	return out
}

// wait polls cond every 20ms until it holds or the timeout passes.
func (f *Fleet) wait(ctx context.Context, what string, cond func() bool) error {
	deadline := time.Now().Add(f.opts.Timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not done after %s", what, f.opts.Timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// Run runs every scenario once on a fresh prefix and returns the figures.
// It checks the invariants as it goes (Result.Violations).
func Run(ctx context.Context, o Options) (res *Result, err error) {
	if o.Hosts < 2 {
		return nil, errors.New("fleetsim: need at least 2 hosts")
	}
	if len(o.Endpoints) == 0 {
		return nil, errors.New("fleetsim: no etcd endpoints")
	}
	if len(o.AdminEndpoints) == 0 {
		o.AdminEndpoints = o.Endpoints
	}
	if o.Prefix == "" {
		o.Prefix = lease.DefaultPrefix
	}
	if o.LeaseTTL == 0 {
		o.LeaseTTL = 20 * time.Second
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Minute
	}
	if o.RestartStep == 0 {
		o.RestartStep = 0.01
	}
	if o.ExpireFraction == 0 {
		o.ExpireFraction = 0.1
	}
	f := &Fleet{opts: o, tr: newTracker(o.Hosts + o.Joins)}
	f.hosts = make([]*Host, o.Hosts+o.Joins)
	res = &Result{Hosts: o.Hosts, Endpoints: len(o.Endpoints), LeaseTTL: o.LeaseTTL}
	f.admin, err = clientv3.New(clientv3.Config{Endpoints: o.AdminEndpoints, DialTimeout: 10 * time.Second, Logger: zap.NewNop(), TLS: o.TLS})
	if err != nil {
		return nil, err
	}
	defer f.admin.Close()
	defer f.stopAll()
	// A /8 of /24s: 65,536 subnets, enough for any K this runs.
	cfgJSON := `{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"host-gw"}}`
	if o.Dual {
		cfgJSON = `{"Network":"10.0.0.0/8","SubnetLen":24,"IPv6Network":"fd00:5::/48","IPv6SubnetLen":64,"Backend":{"Type":"host-gw"}}`
	}
	if o.Config != "" {
		cfgJSON = o.Config
	}
	if f.cfg, _, err = lease.ParseConfig([]byte(cfgJSON)); err != nil {
		return nil, err
	}
	if _, err := f.admin.Delete(ctx, lease.NewKeys(o.Prefix).Prefix(), clientv3.WithPrefix()); err != nil {
		return nil, fmt.Errorf("clearing %s: %w", o.Prefix, err)
	}
	if _, err := f.admin.Put(ctx, lease.NewKeys(o.Prefix).Config(), cfgJSON); err != nil {
		return nil, fmt.Errorf("writing the config: %w", err)
	}
	steps := []struct {
		name string
		fn   func(context.Context, *Result) error
	}{
		{"join storm", f.joinStorm},
		{"steady state", f.steadyState},
		{"one new host", f.newHosts},
		{"rolling restart", f.rollingRestart},
		{"mass expiry", f.massExpiry},
		{"final check", f.finalCheck},
	}
	for _, s := range steps {
		f.logf("K=%d: %s", o.Hosts, s.name)
		if err := s.fn(ctx, res); err != nil {
			return res, fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return res, nil
}

func (f *Fleet) stopAll() {
	var wg sync.WaitGroup
	for _, h := range f.live() {
		wg.Add(1)
		go func() { defer wg.Done(); h.stop() }()
	}
	wg.Wait()
}

// startHosts starts hosts idx within spread and waits until each holds its
// lease.
func (f *Fleet) startHosts(ctx context.Context, idx []int, spread time.Duration, fresh bool) ([]*Host, error) {
	hosts := make([]*Host, len(idx))
	errs := make([]error, len(idx))
	var wg sync.WaitGroup
	t0 := time.Now()
	for j, i := range idx {
		f.mu.Lock()
		h := f.hosts[i]
		if h == nil || fresh {
			h = f.newHost(i)
		}
		f.mu.Unlock()
		hosts[j] = h
		wg.Add(1)
		go func() {
			defer wg.Done()
			if spread > 0 {
				time.Sleep(time.Until(t0.Add(spread * time.Duration(j) / time.Duration(len(idx)))))
			}
			errs[j] = h.start(ctx, f.endpoint(i))
			if errs[j] == nil {
				f.mu.Lock()
				f.hosts[i] = h
				f.mu.Unlock()
			}
		}()
	}
	wg.Wait()
	var failed []error
	for _, err := range errs {
		if err != nil {
			failed = append(failed, err)
		}
	}
	if len(failed) > 0 {
		f.logf("%d of %d hosts did not start; the first: %v", len(failed), len(idx), failed[0])
		return hosts, fmt.Errorf("%d of %d hosts did not start; the first: %w", len(failed), len(idx), failed[0])
	}
	return hosts, nil
}

func (f *Fleet) joinStorm(ctx context.Context, res *Result) error {
	k := f.opts.Hosts
	idx := make([]int, k)
	for i := range idx {
		idx[i] = i
	}
	f.mu.Lock()
	for i := range idx {
		h := f.newHost(i)
		h.target.Store(int64(k - 1))
		f.hosts[i] = h
	}
	f.mu.Unlock()
	before := f.ctr.snap()
	t0 := time.Now()
	spread := f.opts.StormSpread
	if spread == 0 {
		spread = time.Second
	}
	hosts, err := f.startHosts(ctx, idx, max(spread, 0), false)
	if err != nil {
		return err
	}
	var last time.Time
	for _, h := range hosts {
		if h.AcquiredAt.After(last) {
			last = h.AcquiredAt
		}
	}
	res.StormLeases = last.Sub(t0)
	if err := f.wait(ctx, "every peer set complete", func() bool {
		for _, h := range hosts {
			if h.complete.Load() == 0 {
				return false
			}
		}
		return true
	}); err != nil {
		return err
	}
	var done int64
	for _, h := range hosts {
		done = max(done, h.complete.Load())
		h.target.Store(0)
	}
	res.StormPeers = time.Unix(0, done).Sub(t0)
	d := f.ctr.snap().sub(before)
	res.StormRetries = d.claimLost
	res.StormErrors = d.claimErrors
	res.StormLostLeases = d.lostLeases
	res.StormEventsPerHost = float64(d.watchEvents) / float64(k)
	dups, err := f.duplicates(ctx)
	if err != nil {
		return err
	}
	res.Duplicates += dups
	return nil
}

func (f *Fleet) steadyState(ctx context.Context, res *Result) error {
	// Let the storm's traffic drain, then measure.
	select {
	case <-time.After(2 * time.Second):
	case <-ctx.Done():
		return ctx.Err()
	}
	k := float64(len(f.live()))
	p0 := readProcs(f.opts.Procs)
	c0 := f.ctr.snap()
	t0 := time.Now()
	select {
	case <-time.After(f.opts.Steady):
	case <-ctx.Done():
		return ctx.Err()
	}
	p1 := readProcs(f.opts.Procs)
	d := f.ctr.snap().sub(c0)
	secs := time.Since(t0).Seconds()
	res.SteadySeconds = secs
	res.SteadyReqPerHost = float64(d.unary+d.keepAlives+d.watchReqs) / secs / k
	res.SteadyKeepAlivesPerHost = float64(d.keepAlives) / secs / k
	res.SteadyEventsPerHost = float64(d.watchEvents) / secs / k
	res.Procs = procDeltas(f.opts.Procs, p0, p1, secs)
	return nil
}

// newHosts times Joins single new hosts, one after the other: from the
// moment the new host starts its claim (Acquire: a read, a probe and the
// committing transaction) until every running host has it in its peer set.
func (f *Fleet) newHosts(ctx context.Context, res *Result) error {
	var lat []time.Duration
	var watchers int64
	before := f.ctr.snap()
	for j := range f.opts.Joins {
		i := f.opts.Hosts + j
		others := len(f.live())
		watchers += int64(others)
		hs, err := f.startHosts(ctx, []int{i}, 0, true)
		if err != nil {
			return err
		}
		h := hs[0]
		var at time.Time
		if err := f.wait(ctx, h.Name+" in every peer set", func() bool {
			n, last := f.tr.count(h.Name, h.record().Lease)
			at = last
			return n >= others
		}); err != nil {
			return err
		}
		lat = append(lat, at.Sub(h.ClaimStart))
	}
	// Let the last join's events arrive before counting them.
	time.Sleep(500 * time.Millisecond)
	d := f.ctr.snap().sub(before)
	res.Join = summarize(lat)
	if watchers > 0 {
		res.EventsPerJoinPerWatcher = float64(d.watchEvents) / float64(watchers)
	}
	return nil
}

// rollingRestart restarts every running host, RestartStep of the fleet at a
// time, the way an upgrade does: stop (the etcd lease is not revoked),
// start again with the earlier lease known as its own.
func (f *Fleet) rollingRestart(ctx context.Context, res *Result) error {
	hosts := f.live()
	step := max(1, int(float64(len(hosts))*f.opts.RestartStep+0.5))
	removals0 := f.tr.removals.Load()
	lost0 := f.ctr.lostLeases.Load()
	c0 := f.ctr.snap()
	var lat []time.Duration
	t0 := time.Now()
	for lo := 0; lo < len(hosts); lo += step {
		batch := hosts[lo:min(lo+step, len(hosts))]
		var idx []int
		old := map[int]netip.Prefix{}
		for _, h := range batch {
			h.stop()
			idx = append(idx, h.idx)
			old[h.idx] = h.record().Subnet.V4
		}
		restarted, err := f.startHosts(ctx, idx, 0, false)
		if err != nil {
			return err
		}
		others := len(f.live()) - 1
		for _, h := range restarted {
			if h.record().Subnet.V4 != old[h.idx] {
				res.RestartSubnetMoved++
			}
			var at time.Time
			if err := f.wait(ctx, h.Name+"'s new record everywhere", func() bool {
				n, last := f.tr.count(h.Name, h.record().Lease)
				at = last
				return n >= others
			}); err != nil {
				return err
			}
			// A host that resumed its etcd lease wrote nothing: every
			// host had its record before the restart began (0).
			lat = append(lat, max(0, at.Sub(h.ClaimStart)))
		}
	}
	res.RestartTotal = time.Since(t0)
	res.RestartStep = step
	res.Restart = summarize(lat)
	res.RestartFlaps = f.tr.removals.Load() - removals0
	res.RestartLostLeases = f.ctr.lostLeases.Load() - lost0
	d := f.ctr.snap().sub(c0)
	res.RestartEventsPerRestartPerWatcher = float64(d.watchEvents) / float64(len(hosts)) / float64(len(hosts))
	return nil
}

func (f *Fleet) massExpiry(ctx context.Context, res *Result) error {
	hosts := f.live()
	n := max(1, int(float64(len(hosts))*f.opts.ExpireFraction+0.5))
	var killed []*Host
	for i := 0; i < len(hosts) && len(killed) < n; i += max(1, len(hosts)/n) {
		killed = append(killed, hosts[i])
	}
	t0 := time.Now()
	var wg sync.WaitGroup
	for _, h := range killed {
		f.tr.resetGone(h.Name)
		wg.Add(1)
		go func() { defer wg.Done(); h.stop() }()
	}
	wg.Wait()
	survivors := len(hosts) - len(killed)
	var last time.Time
	for _, h := range killed {
		if err := f.wait(ctx, h.Name+" dropped by every survivor", func() bool {
			c, at := f.tr.goneCount(h.Name)
			if at.After(last) {
				last = at
			}
			return c >= survivors
		}); err != nil {
			return err
		}
	}
	res.Expired = len(killed)
	res.ExpiryDropped = last.Sub(t0)
	return nil
}

// finalCheck compares what is in etcd and what every host's peer set
// holds with the running hosts.
func (f *Fleet) finalCheck(ctx context.Context, res *Result) error {
	dups, err := f.duplicates(ctx)
	if err != nil {
		return err
	}
	res.Duplicates += dups
	live := f.live()
	for _, h := range live {
		if got := h.peers.Load(); got != int64(len(live)-1) {
			res.IncompletePeerSets++
			if res.IncompletePeerSets <= 3 {
				f.logf("%s holds %d peers, want %d", h.Name, got, len(live)-1)
			}
		}
	}
	res.Rejected = f.tr.rejected.Load()
	res.LostLeases = f.ctr.lostLeases.Load() - res.StormLostLeases
	for _, p := range f.opts.Procs {
		if p.Member {
			res.LeaderChanges = max(res.LeaderChanges, int64(scrape(p.MetricsURL, "etcd_server_leader_changes_seen_total")[0]))
		}
	}
	return nil
}

// duplicates reads every lease record and counts subnets named twice.
func (f *Fleet) duplicates(ctx context.Context) (int, error) {
	keys := lease.NewKeys(f.opts.Prefix)
	resp, err := f.admin.Get(ctx, keys.Leases(), clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	by := map[netip.Prefix][]string{}
	for _, kv := range resp.Kvs {
		node := strings.TrimPrefix(string(kv.Key), keys.Leases())
		r, err := lease.DecodeRecord(node, kv.Value)
		if err != nil {
			return 0, fmt.Errorf("record of %s: %w", node, err)
		}
		for _, s := range r.Subnets() {
			by[s] = append(by[s], node)
		}
	}
	n := 0
	for s, nodes := range by {
		if len(nodes) > 1 {
			n++
			f.logf("DUPLICATE: %s is held by %v", s, nodes)
		}
	}
	return n, nil
}

// Dist is a latency distribution.
type Dist struct {
	N             int
	P50, P99, Max time.Duration
}

func summarize(d []time.Duration) Dist {
	if len(d) == 0 {
		return Dist{}
	}
	s := slices.Clone(d)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	return Dist{N: len(s), P50: at(0.5), P99: at(0.99), Max: s[len(s)-1]}
}
