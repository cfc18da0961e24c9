package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/hoptrace"
	"github.com/leased/leased/pkg/metrics"
)

// Default timings of Run.
const (
	DefaultResync   = 10 * time.Second
	defaultCoalesce = 75 * time.Millisecond
	// FullPassEvery is how many resync periods lie between two periodic
	// full passes (5 minutes at the default 10s). Drift shows in netlink
	// events, which start a pass at once; the periodic full pass is the
	// backstop for an event the kernel never sent.
	FullPassEvery = 30
)

// datapath is what differs between backend types: the host-local devices
// and the desired kernel objects for a peer set. Methods are called with the
// engine's mutex held.
type datapath interface {
	// ensure creates or repairs host-local devices for local and returns the
	// ifindexes whose neighbour and FDB entries the reconciler owns.
	ensure(k kernel, local Local) ([]int, error)
	// desired computes the wanted kernel objects; peers it cannot serve are
	// reported as skips.
	desired(in input) (state, []skip)
	// mtu is the container MTU for local (zero Local: before Start).
	mtu(local Local) int
	leaseData() json.RawMessage
}

// input is everything a desired state is computed from.
type input struct {
	local Local
	peers []Peer
	ext   ExtIface
	// connected are the prefixes configured on ext: a gateway inside one of
	// them is on-link.
	connected []netip.Prefix
	// foreign are the routes leased did not install that overlap the
	// cluster networks; a peer subnet overlapping one is refused.
	foreign *foreignSet
}

// skip is a peer (family) left out of the desired state, and why.
type skip struct {
	node    string
	subnet  netip.Prefix
	gateway netip.Addr
	reason  string
	// dup: skipped because another peer already wants the object.
	dup bool
}

// engine is the Backend implementation shared by every type: it owns the
// kernel (its only way to it), the desired state and the reconcile loop.
type engine struct {
	typ  string
	ext  ExtIface
	opts Options
	k    kernel
	dp   datapath

	// resync is the period of full passes in Run and coalesce the delay
	// between the first event and the pass it triggers. Set before Run.
	resync   time.Duration
	coalesce time.Duration

	kick  chan struct{}         // capacity 1: a pass is wanted
	owned atomic.Pointer[[]int] // device ifindexes, read by event goroutines

	// fullPasses counts the full passes started (each lists the kernel
	// after it starts); kickedAt is the count when the latest kick came.
	// Run skips a kicked pass when a full pass started after the kick.
	fullPasses, kickedAt atomic.Uint64
	// bursts, burstUntil (unix ns) and passDue: see inBurst.
	bursts     atomic.Int32
	burstUntil atomic.Int64
	passDue    atomic.Bool
	// wanted is the desired state of the current or last pass, updated
	// before its kernel calls: event goroutines compare events with it so
	// that the agent's own changes do not trigger passes, while anything
	// else does (see wantedSet for its locking).
	wanted wantedSet

	// foreign is the foreign route set of the last full pass; event
	// goroutines read it to tell which foreign route changes need a pass.
	foreign atomic.Pointer[foreignSet]

	mu      sync.Mutex // guards everything below and every kernel call
	local   Local
	started bool
	// hostMu serialises setupHost (Start's and the resync's) and guards
	// natGone (fwOptions).
	hostMu  sync.Mutex
	natGone [2]bool
	// peersSet is true once SetPeers has given the full peer set; no pass
	// runs before, so a restart never prunes against an empty set.
	peersSet bool
	peers    []Peer
	idx      peerIndex // peers by node, for UpdatePeers
	applied  state     // what the last pass left in the kernel
	// trusted means applied mirrors the kernel: the last full pass
	// succeeded and every later change went through us. SetPeers then
	// diffs against applied instead of dumping the kernel; netlink events
	// and the periodic resync run full passes that catch any drift.
	trusted        bool
	connectedCache []netip.Prefix  // ext's prefixes as of the last full pass
	skipped        map[string]bool // skips already logged
	passes         int
	// lastChanges counts the puts and deletes of the last pass.
	lastChanges int
	// nh is how routes use nexthop objects (nexthop.go); nhOn mirrors
	// nh.use for the event goroutines.
	nh   nhTable
	nhOn atomic.Bool
	// dumpTouched, while a full pass dumps or compares without mu,
	// collects the keys of the objects changed meanwhile.
	dumpTouched *touchedSet
	// dumpHook, if set (tests), runs in pass before its unlocked dump;
	// compareHook each time verifyLocked releases mu.
	dumpHook, compareHook func()
	// wantFrom are the inputs the wanted state was last computed from as
	// a whole (see wantInputs).
	wantFrom wantInputs
	// routeHave tells putRoutes, during a pass's route puts, which keys
	// hold a route of ours in the kernel (replaced; others are created).
	routeHave func(routeKey) bool
}

// New returns the backend that raw (the network config's Backend object)
// selects, for the host node whose external interface is ext. It opens one
// netlink handle in opts.NetNS (default: the agent's namespace) and changes
// nothing in the kernel; Start does. An unknown or unimplemented type wraps
// ErrUnknownType.
func New(raw json.RawMessage, ext ExtIface, node string, opts Options) (Backend, error) {
	cfg, err := parseConfig(raw)
	if err != nil {
		return nil, err
	}
	if node == "" {
		return nil, errors.New("backend: node name is empty")
	}
	if err := ext.validate(); err != nil {
		return nil, err
	}
	dp, err := datapathFor(cfg, ext, node)
	if err != nil {
		return nil, err
	}
	k, err := openKernel(nsExec{path: opts.NetNS})
	if err != nil {
		return nil, err
	}
	b, err := assemble(cfg, ext, opts, k, dp)
	if err != nil {
		k.Close()
		return nil, err
	}
	return b, nil
}

// datapathFor returns the datapath of cfg's type, for a config and an
// interface New checked.
func datapathFor(cfg Config, ext ExtIface, node string) (datapath, error) {
	switch cfg.Type {
	case TypeHostGW:
		return &hostGW{}, nil
	case TypeVXLAN:
		if !ext.V4.Addr.IsValid() && !ext.V6.Addr.IsValid() {
			if ext.Split() {
				return nil, fmt.Errorf("backend: vxlan needs an underlay address: %s has no IPv4 address and %s no IPv6 address; add one, or pick the interface with --iface", ext.V4.Name, ext.Link(ipfam.IPv6).Name)
			}
			return nil, fmt.Errorf("backend: vxlan needs an address on %s for the underlay; it has none: add one, or pick another interface with --iface", ext.V4.Name)
		}
		return newVXLAN(cfg, ext, node), nil
	case TypeProxyNDP:
		return hostGW{}, nil // peers are routed as host-gw does; ndp.go answers on the link
	}
	return nil, fmt.Errorf("%w: %q is not implemented yet", ErrUnknownType, cfg.Type)
}

// assemble returns the backend of cfg's type over the kernel k. It fails
// only when the proxy-NDP responder cannot be made (ndp.NewResponder); the
// caller then still owns k.
func assemble(cfg Config, ext ExtIface, opts Options, k kernel, dp datapath) (Backend, error) {
	e := newEngine(cfg.Type, ext, opts, k, dp)
	if cfg.Type == TypeProxyNDP {
		b, err := newProxyNDP(e, cfg)
		if err != nil {
			return nil, err
		}
		return b, nil
	}
	return e, nil
}

func newEngine(typ string, ext ExtIface, opts Options, k kernel, dp datapath) *engine {
	e := &engine{
		typ:      typ,
		ext:      ext,
		opts:     opts,
		k:        k,
		dp:       dp,
		resync:   DefaultResync,
		coalesce: defaultCoalesce,
		kick:     make(chan struct{}, 1),
		applied:  newState(),
		idx:      newPeerIndex(),
		skipped:  map[string]bool{},
	}
	if opts.Resync > 0 {
		e.resync = opts.Resync
	}
	e.owned.Store(&[]int{})
	e.nh.init()
	return e
}

func (e *engine) Type() string { return e.typ }

func (e *engine) LeaseData() json.RawMessage { return e.dp.leaseData() }

func (e *engine) MTU() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	if m := e.dp.mtu(e.local); m > 0 {
		return m
	}
	return e.ext.minMTU(e.local)
}

// Start records the lease, enables forwarding, installs the forward and
// masquerade rules and creates devices. Once SetPeers has been called it
// also runs a pass; the first pass after SetPeers removes what an earlier
// run left for peers that are gone, and nothing before it does. Calling it
// again with a new lease moves the host-local state to it. It is
// idempotent.
//
// The firewall and sysctl work (tens of milliseconds of iptables runs)
// goes on concurrently with the devices and the pass, so a caller that
// hands over the peer set before Start gets its routes without waiting for
// iptables; Start returns when both are done.
func (e *engine) Start(ctx context.Context, local Local) error {
	if !ipfam.Any(local.Subnet) {
		return errors.New("backend: the local lease holds no subnet")
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closedLocked() {
		return ErrClosed
	}
	e.local = local
	e.started = true
	e.probeNexthopsLocked()
	klog.InfoS("backend starting", "type", e.typ, "node", local.Node, "subnet4", local.Subnet.V4, "subnet6", local.Subnet.V6, "iface", e.ext.V4.Name)
	fwd := make(chan error, 1)
	k := e.k
	go func() { fwd <- e.setupHost(k, local, nil) }()
	var err error
	if !e.peersSet {
		// Until the agent has handed over the full peer set, peer state
		// from an earlier run is left alone: pruning against an empty set
		// would drop traffic across a restart. Devices are set up now.
		owned, derr := e.dp.ensure(e.k, e.local)
		e.owned.Store(&owned)
		err = derr
	} else {
		err = e.passLocked(ctx)
	}
	return errors.Join(<-fwd, err)
}

// setupHost sets the forwarding sysctls and the firewall rules for local
// through k, one caller at a time. It sets *changed (when not nil) if
// anything had to change.
func (e *engine) setupHost(k kernel, local Local, changed *bool) error {
	e.hostMu.Lock()
	defer e.hostMu.Unlock()
	return errors.Join(
		enableForwarding(k, e.ext.Link(ipfam.IPv6).Name, local.Network.V4.IsValid(), local.Network.V6.IsValid(), changed),
		setupForwarding(k, local, fwOptions{masq: e.opts.IPMasq, noFwd: e.opts.NoForwardRules, natGone: &e.natGone}, changed),
	)
}

// ensureHost re-applies setupHost for the current lease, for the periodic
// resync: a flushed FORWARD chain, a rule inserted above leased's jump or
// ip_forward turned off comes back within one --resync-interval, with a
// warning, as routes do.
func (e *engine) ensureHost() {
	e.mu.Lock()
	local, started, k := e.local, e.started, e.k
	e.mu.Unlock()
	if !started {
		return
	}
	var changed bool
	defer hoptrace.Span("host check", time.Now())
	err := e.setupHost(k, local, &changed)
	if changed {
		klog.Warning("forwarding sysctls or iptables rules restored (they were changed or removed outside leased)")
		metrics.DriftRepairs.WithLabelValues("forwarding").Inc()
	}
	if err != nil {
		klog.ErrorS(err, "checking the forwarding sysctls and iptables rules; retrying on the next resync")
	}
}

// SetPeers replaces the peer set and runs one pass over all of it, against
// what the last pass applied (incremental.go). Before Start it only records
// the set.
func (e *engine) SetPeers(ctx context.Context, peers []Peer) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closedLocked() {
		return ErrClosed
	}
	defer observe("peers", time.Now())
	return e.setPeersLocked(ctx, peers)
}

// observe records a pass's duration in leased_reconcile_duration_seconds.
func observe(pass string, start time.Time) {
	metrics.ReconcileDuration.WithLabelValues(pass).Observe(time.Since(start).Seconds())
}

// pass runs one full reconcile pass. On the netlink kernel the route,
// nexthop, neighbour and FDB dumps, the bulk of a full pass in a large
// cluster, run without e.mu, so that a peer change applied meanwhile
// (SetPeers, UpdatePeers) does not wait for them; what it changes is taken
// from the applied state instead of the dump (adoptDump, adoptKind). On a
// trusted engine the comparison with the wanted state lets peer changes in
// too (verifyLocked).
func (e *engine) pass(ctx context.Context) error {
	e.mu.Lock()
	if e.closedLocked() {
		e.mu.Unlock()
		return ErrClosed
	}
	start := time.Now()
	defer observe("full", start)
	defer hoptrace.Span("full pass", start)
	nk := e.nhk()
	if nk == nil || !e.started || !e.peersSet || e.dumpTouched != nil {
		defer e.mu.Unlock()
		return e.passLocked(ctx)
	}
	e.dumpTouched = newTouchedSet()
	e.fullPasses.Add(1) // before the dump: this pass sees every earlier event
	hook := e.dumpHook
	var owned []int
	if o := e.owned.Load(); o != nil {
		owned = *o
	}
	listN := len(owned) > 0 || len(e.applied.neighs) > 0 || len(e.applied.fdbs) > 0
	hints := [3]int{len(e.nh.byID), len(e.applied.neighs) + 64, len(e.applied.fdbs) + 64}
	e.mu.Unlock()
	if hook != nil {
		hook()
	}
	d, err := dumpAll(nk, hints, listN, owned)
	e.mu.Lock()
	defer e.mu.Unlock()
	defer func() { e.dumpTouched = nil }()
	if e.closedLocked() {
		return ErrClosed
	}
	if errors.Is(err, errDumpInterrupted) {
		// Peer changes applied meanwhile kept interrupting the dump (at
		// 50,000 peers one takes a few hundred milliseconds): list once
		// more with e.mu held, which holds them back.
		klog.V(2).InfoS("dump interrupted by changes at every try; listing again with peer changes held back", "err", err)
		e.dumpTouched.clear()
		d, err = dumpAll(nk, hints, listN, owned)
	}
	if err != nil {
		return err
	}
	touched := e.dumpTouched
	if !e.trusted {
		e.dumpTouched = nil // nothing compares without e.mu
	}
	return e.passLockedWith(ctx, d, touched)
}

// dumpAll is dumpRoutesNH and, with neighs, dumpNeighs for the devices
// owned; it needs no e.mu. hints are about how many nexthop objects,
// neighbours and FDB entries of ours to expect. It sorts what it lists
// (sortObjects), for a comparison that releases e.mu between chunks
// (verifyLocked).
func dumpAll(nk nexthopKernel, hints [3]int, neighs bool, owned []int) (*routeDump, error) {
	d, err := dumpRoutesNH(nk, hints[0])
	if err != nil {
		return d, err
	}
	sortObjects(d.routes) // (the kernel dumps IPv4 routes in this order)
	if !neighs {
		return d, nil
	}
	d.neighs, d.fdbs, err = dumpNeighs(nk, owned, hints[1], hints[2])
	d.neighsListed, d.neighOwned = true, owned
	sortObjects(d.neighs)
	sortObjects(d.fdbs)
	return d, err
}

func (e *engine) kickPass() {
	seen := e.fullPasses.Load()
	for {
		old := e.kickedAt.Load()
		if seen <= old || e.kickedAt.CompareAndSwap(old, seen) {
			break
		}
	}
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// logSkips logs each skipped peer once, until it stops being skipped.
func (e *engine) logSkips(skips []skip) {
	now := make(map[string]bool, len(skips))
	for _, s := range skips {
		k := s.node + "|" + s.subnet.String() + "|" + s.reason
		now[k] = true
		if !e.skipped[k] {
			klog.InfoS(s.reason, "node", s.node, "subnet", s.subnet, "gateway", s.gateway)
		}
	}
	e.skipped = now
}
