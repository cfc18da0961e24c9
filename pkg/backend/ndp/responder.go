package ndp

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/metrics"
)

// Proxy-NDP modes (Backend.Mode).
const (
	// ModeSubnet answers for every address of the host's IPv6 slice.
	ModeSubnet = "subnet"
	// ModePresent answers only for addresses present behind the host: a
	// neighbour entry or an address on a link other than the uplink.
	ModePresent = "present"
)

// Timings of the present mode.
const (
	// pendingTTL is how long a solicitation for an address not (yet) known
	// present is remembered; if the address shows up within it, the
	// solicitor gets an advertisement at once instead of at its next retry.
	pendingTTL = 3 * time.Second
	// probeInterval limits local probes to one per address per interval.
	probeInterval = time.Second
	// presentRefresh is the period of the full neighbour and address dump
	// that backs up the netlink subscription.
	presentRefresh = 10 * time.Second
	// presentExpire is the period at which old solicitations and probe
	// times are forgotten.
	presentExpire = time.Second
)

// Bounds of the present mode under a flood of solicitations for distinct
// addresses (a scan of the slice, or a hostile neighbour). They bound the
// agent's memory and the entries its probes add to the bridge's
// neighbour table, whatever the rate of solicitations; Documentation/
// backends.md states them.
const (
	// maxPendingTargets is the most addresses with remembered
	// solicitations; a solicitation for another address while it is full
	// is not remembered (its target may still be probed, and the
	// solicitor's retry is answered once the target is present).
	maxPendingTargets = 1024
	// maxPendingPerTarget is the most solicitations remembered per
	// address (a router sends three per resolution); the newest are kept.
	maxPendingPerTarget = 4
	// probeRate and probeBurst limit the probes (and the route lookups
	// before them) to probeRate per second on average and probeBurst at
	// once. Each probe may add two entries to the neighbour table of the
	// link the address is routed to: the address (INCOMPLETE for about
	// 3 s, then FAILED until the kernel's next garbage collection, about
	// 15 s) and its solicited-node multicast group (NOARP, collected once
	// unused for gc_stale_time, 60 s). At 4 per second that is at most
	// about 20+4·18 plus 20+4·75 entries, well below the kernel's
	// gc_thresh2 (512), above which it starts evicting real neighbours.
	probeRate  = 4
	probeBurst = 20
)

// resubscribeDelay is the wait before subscribing again after the
// neighbour subscription failed (e.g. ENOBUFS after an event burst).
const resubscribeDelay = time.Second

// Answer is what the responder answers for; replaced as a whole.
type Answer struct {
	Slice netip.Prefix // invalid: answer nothing
	MAC   [6]byte      // the uplink's MAC: the target link-layer address
	Src   netip.Addr   // source of advertisements: the uplink's link-local address
}

// Responder answers Neighbor Solicitations arriving on the uplink for
// addresses of the host's slice with Neighbor Advertisements carrying the
// uplink's MAC. It reads from one packet socket bound to the uplink
// (Kernel.ListenPacket), filtered in the kernel by nsFilter, with the
// uplink in all-multicast mode for as long as the socket is open (a
// membership of the socket, so the kernel drops it when the socket closes,
// however the agent ends).
//
// Start may be called any number of times; it opens the socket once and
// replaces what is answered. Withdraw stops answering until the next
// Start. Close stops for good: the socket and the Kernel are closed and
// every goroutine has ended when it returns. All of them may be called
// from any goroutine.
type Responder struct {
	k       Kernel
	ifname  string
	ifindex int
	mode    string

	cfg atomic.Pointer[Answer]

	mu      sync.Mutex // guards the fields below
	f       PacketConn // the packet socket; nil before Start and after Close
	closed  bool
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	present *presence // nil in subnet mode
}

// Counters of leased_ndp_solicitations_total: solicitations answered, and
// solicitations ignored because their target is not this host's to answer
// (outside the slice, not present in present mode after its wait, or sent
// by this host). Malformed frames are not counted.
var (
	ndpAnswered = metrics.NDPSolicitations.WithLabelValues("answered")
	ndpIgnored  = metrics.NDPSolicitations.WithLabelValues("ignored")
)

// NewResponder returns a responder for the uplink ifname (index ifindex)
// in mode (ModeSubnet or ModePresent) that reaches the kernel through k,
// which it owns from now on. It opens nothing until Start. It fails, and
// does not take k, only when the kernel filter for solicitations does not
// assemble (filtersAssemble): a defect of this build of leased.
func NewResponder(k Kernel, ifname string, ifindex int, mode string) (*Responder, error) {
	if err := filtersAssemble(); err != nil {
		return nil, err
	}
	r := &Responder{k: k, ifname: ifname, ifindex: ifindex, mode: mode}
	r.cfg.Store(&Answer{})
	return r, nil
}

// filtersAssemble checks, once per process, that nsFilter assembles for
// every slice, so that the filters Start and Withdraw set cannot fail to.
var filtersAssemble = sync.OnceValue(func() error { return checkFilters(nsFilter) })

// checkFilters assembles the filter that build makes for no slice and for
// an IPv6 slice of every length (the program's shape depends only on the
// length; the address only fills in constants).
func checkFilters(build func(netip.Prefix) []bpf.Instruction) error {
	slices := []netip.Prefix{{}}
	for bits := 0; bits <= 128; bits++ {
		slices = append(slices, netip.PrefixFrom(netip.IPv6Unspecified(), bits))
	}
	for _, s := range slices {
		if _, err := assemble(build(s)); err != nil {
			return fmt.Errorf("proxy-ndp: this build of leased is defective: %w (for a slice of length %d); report it to the leased project and install another version of leased", err, s.Bits())
		}
	}
	return nil
}

// ErrClosed is returned by Start after Close.
var ErrClosed = errors.New("backend: proxy-ndp responder is stopped (its Run ended)")

// Mode is the mode the responder was made with.
func (r *Responder) Mode() string { return r.mode }

// Answering is what the responder answers for now (zero before Start and
// after Close; Slice invalid after Withdraw).
func (r *Responder) Answering() Answer { return *r.cfg.Load() }

// Start answers for cfg.Slice from now on, opening the socket on first use.
func (r *Responder) Start(cfg Answer) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrClosed
	}
	if r.f == nil {
		if err := r.openLocked(); err != nil {
			return err
		}
	}
	old := r.cfg.Load()
	r.cfg.Store(&cfg)
	if old.Slice != cfg.Slice {
		if err := r.setFilterLocked(cfg.Slice); err != nil {
			return err
		}
	}
	if r.present != nil {
		r.present.refresh()
	}
	return nil
}

// Withdraw stops answering (the kernel filter passes nothing) until the
// next Start. The socket stays open.
func (r *Responder) Withdraw() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := *r.cfg.Load()
	c.Slice = netip.Prefix{}
	r.cfg.Store(&c)
	if r.f == nil {
		return nil
	}
	return r.setFilterLocked(netip.Prefix{})
}

// Close stops answering for good, waits for the goroutines to end and
// closes the Kernel. It is idempotent.
func (r *Responder) Close() {
	r.mu.Lock()
	was := r.closed
	r.closed = true
	r.cfg.Store(&Answer{})
	f, cancel := r.f, r.cancel
	r.f, r.cancel = nil, nil
	r.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	if f != nil {
		f.Close() // wakes the reader with os.ErrClosed
	}
	r.wg.Wait()
	if !was {
		r.k.Close()
	}
}

// openLocked opens the socket, passing nothing until the first filter is
// set, and starts the goroutines.
func (r *Responder) openLocked() error {
	filter, err := assemble(nsFilter(netip.Prefix{}))
	if err != nil {
		return err
	}
	f, err := r.k.ListenPacket(r.ifname, r.ifindex, filter)
	if err != nil {
		return err
	}
	r.f = f
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	if r.mode == ModePresent {
		p := newPresence(r.k, r.ifindex, r)
		r.present = p
		r.wg.Add(1)
		go func() { defer r.wg.Done(); p.run(ctx) }()
	}
	r.wg.Add(1)
	go func(f PacketConn) { defer r.wg.Done(); r.serve(f) }(r.f)
	klog.InfoS("proxy-ndp responder listening", "iface", r.ifname, "mode", r.mode)
	return nil
}

func (r *Responder) setFilterLocked(slice netip.Prefix) error {
	filter, err := assemble(nsFilter(slice))
	if err != nil {
		return err
	}
	if err := r.f.SetFilter(filter); err != nil {
		return fmt.Errorf("setting the solicitation filter: %w", err)
	}
	return nil
}

// assemble assembles a filter that nsFilter built. NewResponder has
// checked that every shape assembles (filtersAssemble).
func assemble(prog []bpf.Instruction) ([]bpf.RawInstruction, error) {
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return nil, fmt.Errorf("assembling the kernel filter for solicitations: %w", err)
	}
	return raw, nil
}

// serve reads solicitations until f is closed and answers them in place:
// one read, one check, one write per solicitation, no allocation.
func (r *Responder) serve(f PacketConn) {
	buf := make([]byte, 1<<16)
	out := make([]byte, 0, naLen)
	var s solicitation
	var lastErr time.Time
	for {
		n, err := f.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return
			}
			// ENETDOWN while the uplink is down, and the like: keep
			// reading, but neither spin nor flood the log.
			if time.Since(lastErr) > time.Minute {
				klog.Warningf("proxy-ndp: reading solicitations on %s: %v (retrying)", r.ifname, err)
				lastErr = time.Now()
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if parseNS(buf[:n], &s) != nil {
			continue
		}
		cfg := r.cfg.Load()
		switch r.decide(cfg, &s) {
		case verdictAnswer:
			r.answer(f, cfg, &s, out)
		case verdictPending:
			r.present.solicited(s)
		default:
			ndpIgnored.Inc()
		}
	}
}

type verdict int

const (
	verdictDrop verdict = iota
	verdictAnswer
	// verdictPending: in the slice, not known present (present mode).
	verdictPending
)

// decide is the target filter: a solicitation is answered only when its
// target lies in the slice the host holds now and, in present mode, is
// known to be behind the host. Solicitations from the host itself (an
// Ethernet source equal to the uplink's MAC) are never answered.
func (r *Responder) decide(cfg *Answer, s *solicitation) verdict {
	if !cfg.Slice.IsValid() || !cfg.Slice.Contains(s.target) || s.ethSrc == cfg.MAC {
		return verdictDrop
	}
	if r.present == nil || r.present.has(s.target) {
		return verdictAnswer
	}
	return verdictPending
}

func (r *Responder) answer(f PacketConn, cfg *Answer, s *solicitation, buf []byte) {
	src := cfg.Src
	if !src.IsValid() {
		src = s.target
	}
	if _, err := f.Write(appendNA(buf[:0], s, cfg.MAC, src)); err != nil {
		if !errors.Is(err, os.ErrClosed) {
			klog.V(2).InfoS("proxy-ndp: sending an advertisement failed", "target", s.target, "to", s.src, "err", err)
		}
		return
	}
	ndpAnswered.Inc()
	if klog.V(5).Enabled() {
		klog.V(5).InfoS("proxy-ndp: answered", "target", s.target, "to", s.src)
	}
}

// sendNA answers a remembered solicitation (present mode), if the
// responder still answers for its target.
func (r *Responder) sendNA(s solicitation) {
	r.mu.Lock()
	f := r.f
	r.mu.Unlock()
	cfg := r.cfg.Load()
	if f == nil || r.decide(cfg, &s) != verdictAnswer {
		return
	}
	r.answer(f, cfg, &s, make([]byte, 0, naLen))
}

// presence tracks, for the present mode, which addresses are behind the
// host: neighbour entries in a usable state and addresses on links other
// than the uplink. A netlink neighbour subscription keeps it current and a
// periodic dump repairs what the subscription missed. A solicitation for
// an address of the slice that is not known triggers one probe towards it
// (an empty UDP datagram to its discard port, which makes the kernel
// resolve it on the link it is routed to) and is remembered for
// pendingTTL: when the address appears, the solicitor is answered at once.
type presence struct {
	k      Kernel
	uplink int
	r      *Responder

	mu      sync.Mutex
	addrs   map[netip.Addr]bool
	pending map[netip.Addr][]pendingNS // at most maxPendingTargets keys
	probed  map[netip.Addr]time.Time   // at most probeBurst + probeRate*(probeInterval+presentExpire) keys
	tokens  float64                    // probes allowed now (≤ probeBurst)
	refill  time.Time                  // when tokens was last brought up to date
	kick    chan struct{}
}

type pendingNS struct {
	s       solicitation
	expires time.Time
}

func newPresence(k Kernel, uplink int, r *Responder) *presence {
	p := &presence{k: k, uplink: uplink, r: r,
		addrs: map[netip.Addr]bool{}, pending: map[netip.Addr][]pendingNS{}, probed: map[netip.Addr]time.Time{},
		tokens: probeBurst, refill: time.Now(), kick: make(chan struct{}, 1)}
	p.refresh()
	return p
}

func (p *presence) has(a netip.Addr) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.addrs[a]
}

// refresh asks run for a full dump soon.
func (p *presence) refresh() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// usable are the neighbour states in which an address counts as present.
const usable = netlink.NUD_REACHABLE | netlink.NUD_STALE | netlink.NUD_DELAY | netlink.NUD_PROBE | netlink.NUD_PERMANENT | netlink.NUD_NOARP

func (p *presence) run(ctx context.Context) {
	t := time.NewTicker(presentRefresh)
	defer t.Stop()
	exp := time.NewTicker(presentExpire)
	defer exp.Stop()
	for ctx.Err() == nil {
		ch, done := make(chan netlink.NeighUpdate, 1024), make(chan struct{})
		events := ch
		if err := p.k.SubscribeNeighs(ch, done, nil); err != nil {
			klog.ErrorS(err, "proxy-ndp: subscribing to neighbour events; relying on the periodic dump")
			events = nil // only the dump from here on
		}
		p.dump()
	loop:
		for {
			select {
			case <-ctx.Done():
				break loop
			case <-t.C:
				p.dump()
			case now := <-exp.C:
				p.expire(now)
			case <-p.kick:
				p.dump()
			case u, ok := <-events:
				if !ok {
					break loop // the subscription failed: subscribe again
				}
				p.event(u)
			}
		}
		close(done)
		if events != nil {
			go func() { // let the library's reader finish and close ch
				for range ch {
				}
			}()
		}
		select {
		case <-ctx.Done():
		case <-time.After(resubscribeDelay):
		}
	}
}

func (p *presence) event(u netlink.NeighUpdate) {
	a, ok := netip.AddrFromSlice(u.IP)
	if !ok || u.LinkIndex == p.uplink || u.Family != unix.AF_INET6 {
		return
	}
	if !p.r.cfg.Load().Slice.Contains(a) {
		return
	}
	p.set(a, u.Type == unix.RTM_NEWNEIGH && u.State&usable != 0)
}

// set records whether a is present and answers the solicitors waiting for it.
func (p *presence) set(a netip.Addr, present bool) {
	p.mu.Lock()
	was := p.addrs[a]
	if present {
		p.addrs[a] = true
	} else {
		delete(p.addrs, a)
	}
	waiting := p.pending[a]
	if present {
		delete(p.pending, a)
	}
	p.mu.Unlock()
	if present != was {
		klog.V(4).InfoS("proxy-ndp: presence changed", "addr", a, "present", present)
	}
	if !present {
		return
	}
	now := time.Now()
	for _, w := range waiting {
		if now.Before(w.expires) {
			p.r.sendNA(w.s)
		}
	}
}

// dump rebuilds the present set from the kernel's neighbour and address tables.
func (p *presence) dump() {
	cfg := p.r.cfg.Load()
	found := map[netip.Addr]bool{}
	ns, err := p.k.NeighList(unix.AF_INET6)
	if err != nil {
		klog.V(2).InfoS("proxy-ndp: listing neighbours failed", "err", err)
		return
	}
	for _, n := range ns {
		if a, ok := netip.AddrFromSlice(n.IP); ok && n.LinkIndex != p.uplink && n.State&usable != 0 {
			found[a] = true
		}
	}
	as, err := p.k.AddrList(0, unix.AF_INET6)
	if err != nil {
		klog.V(2).InfoS("proxy-ndp: listing addresses failed", "err", err)
		return
	}
	for _, ad := range as {
		if a, ok := netip.AddrFromSlice(ad.IP); ok && ad.LinkIndex != p.uplink {
			found[a] = true
		}
	}
	p.mu.Lock()
	old := p.addrs
	p.addrs = map[netip.Addr]bool{}
	for a := range found {
		if cfg.Slice.Contains(a) {
			p.addrs[a] = true
		}
	}
	var appeared []netip.Addr
	for a := range p.addrs {
		if !old[a] && len(p.pending[a]) > 0 {
			appeared = append(appeared, a)
		}
	}
	p.mu.Unlock()
	for _, a := range appeared {
		p.set(a, true)
	}
}

// solicited remembers s (unless maxPendingTargets other addresses are
// remembered already) and probes its target, unless it was probed within
// probeInterval or the probe budget (probeRate, probeBurst) is spent.
func (p *presence) solicited(s solicitation) {
	now := time.Now()
	p.mu.Lock()
	if ws, ok := p.pending[s.target]; ok || len(p.pending) < maxPendingTargets {
		if len(ws) >= maxPendingPerTarget { // a chatty solicitor: keep the newest
			ws = append(ws[:0], ws[1:]...)
		}
		p.pending[s.target] = append(ws, pendingNS{s: s, expires: now.Add(pendingTTL)})
	} else {
		ndpIgnored.Inc() // not remembered: the solicitor's retry gets its chance
	}
	last, seen := p.probed[s.target]
	probe := (!seen || now.Sub(last) >= probeInterval) && p.takeToken(now)
	if probe {
		p.probed[s.target] = now
	}
	p.mu.Unlock()
	if probe {
		p.probeAddr(s.target)
	}
}

// takeToken reports whether a probe may be sent now, and counts it if so.
// p.mu is held.
func (p *presence) takeToken(now time.Time) bool {
	if d := now.Sub(p.refill); d > 0 {
		p.tokens = min(probeBurst, p.tokens+d.Seconds()*probeRate)
		p.refill = now
	}
	if p.tokens < 1 {
		return false
	}
	p.tokens--
	return true
}

// probeAddr makes the kernel resolve a on the link it is routed to, unless
// that link is the uplink (then a cannot be behind this host).
func (p *presence) probeAddr(a netip.Addr) {
	rs, err := p.k.RouteGet(a)
	if err != nil || len(rs) == 0 || rs[0].LinkIndex == p.uplink {
		return
	}
	if err := p.k.Probe(a); err != nil && !errors.Is(err, unix.EAGAIN) {
		klog.V(4).InfoS("proxy-ndp: probing failed", "addr", a, "err", err)
	}
}

// expire forgets old solicitations and probe times.
func (p *presence) expire(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for a, ws := range p.pending {
		keep := ws[:0]
		for _, w := range ws {
			if now.Before(w.expires) {
				keep = append(keep, w)
			} else {
				ndpIgnored.Inc() // its target never showed up
			}
		}
		if len(keep) == 0 {
			delete(p.pending, a)
		} else {
			p.pending[a] = keep
		}
	}
	for a, t := range p.probed {
		if now.Sub(t) > probeInterval {
			delete(p.probed, a)
		}
	}
}
