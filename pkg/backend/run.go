package backend

import (
	"context"
	"errors"
	"github.com/leased/leased/pkg/ipfam"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/hoptrace"
)

// resubscribeDelay is the wait before re-subscribing after a netlink
// subscription failed (e.g. ENOBUFS after an event burst).
const resubscribeDelay = time.Second

// Run reconciles until ctx is done: a pass within e.coalesce of the first
// route, nexthop, link or neighbour event that concerns us; every
// e.resync a check of the forwarding sysctls and firewall rules
// (ensureHost), which send no events; and every FullPassEvery resyncs a
// full pass regardless, or at the next resync after a subscription
// overflowed during the agent's own burst of changes (see inBurst). It returns nil once ctx is cancelled and leaves the
// kernel state in place. Pass errors are logged, not returned: the next pass
// retries. Run must be called at most once per backend.
func (e *engine) Run(ctx context.Context) error {
	e.mu.Lock()
	k := e.k
	e.mu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); e.watch(ctx, k) }()
	defer func() { cancel(); <-done }()

	ticker := time.NewTicker(e.resync)
	defer ticker.Stop()
	ticks := 0
	for {
		resync := false
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
			ticks++
			due := e.passDue.Swap(false)
			if ticks%FullPassEvery != 0 && e.fullPasses.Load() > 0 && !e.untrusted() && !due {
				e.ensureHost()
				continue
			}
			if due {
				// Free the burst's garbage first: without a collection
				// since the burst, the pass's dump would be allocated on
				// top of it (the agent's peak RSS at 50,000 peers).
				t := time.Now()
				runtime.GC()
				hoptrace.Span("forced GC", t)
			}
			resync = true
		case <-e.kick:
			t := time.NewTimer(e.coalesce)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			select { // events during the wait are covered by this pass
			case <-e.kick:
			default:
			}
			if e.fullPasses.Load() > e.kickedAt.Load() {
				// A full pass (e.g. the first SetPeers) started after
				// the last event and listed the kernel after it.
				continue
			}
		}
		if err := e.pass(ctx); err != nil && ctx.Err() == nil {
			klog.ErrorS(err, "reconcile pass failed; retrying on the next pass", "type", e.typ)
		}
		if resync {
			e.ensureHost()
		}
	}
}

// burstMin is the number of routes a put or delete must change for the
// agent's own events to be a burst that may overflow a subscription, and
// burstGrace how long after it an overflow is still put down to it (the
// subscriptions' readers lag behind the kernel).
const (
	burstMin   = 1024
	burstGrace = 5 * time.Second
)

// burst marks the engine's change of n routes (see inBurst) until the
// returned function is called, when its change is done.
func (e *engine) burst(n int) (done func()) {
	if n < burstMin {
		return func() {}
	}
	e.bursts.Add(1)
	return func() {
		e.burstUntil.Store(time.Now().Add(burstGrace).UnixNano())
		e.bursts.Add(-1)
	}
}

// inBurst reports whether the engine is changing many routes or did so
// within burstGrace: a subscription overflow (ENOBUFS) then comes from the
// kernel's announcements of the agent's own changes, and the full pass
// that makes up for the lost events waits for the next resync (passDue)
// instead of running at once, on top of the burst's memory. Events of
// others lost in the overflow are seen by that pass, within one
// --resync-interval.
func (e *engine) inBurst() bool {
	return e.bursts.Load() > 0 || time.Now().UnixNano() < e.burstUntil.Load()
}

// isOverflow reports whether err is a subscription's ENOBUFS: the kernel
// dropped events because the socket's buffer was full. (The netlink
// library reports it as text.)
func isOverflow(err error) bool {
	return errors.Is(err, unix.ENOBUFS) || strings.Contains(err.Error(), unix.ENOBUFS.Error())
}

// untrusted reports whether the last pass or peer change failed, so that
// the next resync runs a full pass (the retry) instead of waiting for the
// periodic one.
func (e *engine) untrusted() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.started && e.peersSet && !e.trusted
}

// watch runs the netlink subscriptions of k until ctx is done.
func (e *engine) watch(ctx context.Context, k kernel) {
	ours := func(idx int) bool {
		return idx == e.ext.V4.Index || idx == e.ext.Link(ipfam.IPv6).Index || slices.Contains(*e.owned.Load(), idx)
	}
	routes, links, neighs := k.SubscribeRoutes, k.SubscribeLinks, k.SubscribeNeighs
	finished := make(chan struct{}, 4)
	go func() {
		if nk := k.Nexthops(); nk != nil {
			e.watchNexthops(ctx, nk)
		}
		finished <- struct{}{}
	}()
	go func() {
		subscribe(ctx, e, "route", routes, e.routeEventMatters)
		finished <- struct{}{}
	}()
	go func() {
		subscribe(ctx, e, "link", links, func(u netlink.LinkUpdate) bool {
			a := u.Attrs()
			return a.Name == VXLANDev4 || a.Name == VXLANDev6 || ours(a.Index)
		})
		finished <- struct{}{}
	}()
	go func() {
		subscribe(ctx, e, "neighbour", neighs, func(u netlink.NeighUpdate) bool {
			return slices.Contains(*e.owned.Load(), u.LinkIndex) && e.neighEventMatters(u)
		})
		finished <- struct{}{}
	}()
	for range 4 {
		<-finished
	}
}

// subscribe keeps one netlink subscription alive until ctx is done, turning
// relevant events into pass requests. When the subscription fails it
// subscribes again and requests a pass, since events may have been lost.
func subscribe[T any](ctx context.Context, e *engine, kind string,
	sub func(chan<- T, <-chan struct{}, func(error)) error, relevant func(T) bool) {
	var ownBurst atomic.Bool // the last failure was an overflow during our own burst
	for ctx.Err() == nil {
		ch := make(chan T, 128) // the socket's 4 MiB buffer absorbs bursts
		done := make(chan struct{})
		err := sub(ch, done, func(err error) {
			if ctx.Err() != nil {
				return
			}
			if isOverflow(err) && e.inBurst() {
				ownBurst.Store(true)
				klog.InfoS("netlink events overflowed while leased programmed many kernel objects; subscribing again, the kernel is compared in full at the next resync", "kind", kind, "err", err)
				return
			}
			klog.ErrorS(err, "netlink subscription failed; subscribing again", "kind", kind)
		})
		if err != nil {
			klog.ErrorS(err, "subscribing to netlink events", "kind", kind)
			close(done)
		} else {
			if ownBurst.Swap(false) {
				// The lost events were mostly the agent's own: compare
				// the kernel in full at the next resync, once the
				// burst's memory is free, not at once at its peak.
				e.passDue.Store(true)
			} else {
				e.kickPass()
			}
			consume(ctx, ch, relevant, e.kickPass)
			close(done)
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

// consume reads events until ch closes or ctx is done.
func consume[T any](ctx context.Context, ch chan T, relevant func(T) bool, kick func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-ch:
			if !ok {
				return
			}
			if relevant(u) {
				klog.V(4).InfoS("netlink event", "event", u)
				kick()
			}
		}
	}
}

// routeEventMatters reports whether a route event shows the kernel
// departing from the wanted state: one of our routes deleted while wanted,
// or added/changed to something other than wanted, or a foreign route
// appearing or disappearing over the cluster network (foreign.go). The agent's own puts
// and deletes match the wanted state and trigger nothing.
func (e *engine) routeEventMatters(u netlink.RouteUpdate) bool {
	if u.Protocol != RouteProtocol {
		// A foreign route that appeared over a peer subnet (or went
		// away from one) changes which peers may be routed.
		return foreignEventMatters(&e.foreign, u)
	}
	r, ok := routeFromNetlink(u.Route)
	return e.wanted.read(func(w *state) bool {
		if w == nil || !ok {
			return true
		}
		want, in := w.routes[r.key()]
		if u.Type == unix.RTM_DELROUTE {
			return in
		}
		return !in || want != r
	})
}

// neighEventMatters is routeEventMatters for neighbour and FDB entries on
// our devices.
func (e *engine) neighEventMatters(u netlink.NeighUpdate) bool {
	return e.wanted.read(func(w *state) bool { return neighEventMatters(w, u) })
}

func neighEventMatters(w *state, u netlink.NeighUpdate) bool {
	if w == nil {
		return true
	}
	del := u.Type == unix.RTM_DELNEIGH
	if u.Family == unix.AF_BRIDGE {
		f, ok := fdbFromNetlink(u.Neigh)
		if !ok {
			return true
		}
		want, in := w.fdbs[f.key()]
		if del {
			return in
		}
		return !in || want != f
	}
	if u.State&netlink.NUD_PERMANENT == 0 && !del {
		return false // the kernel's own dynamic entries
	}
	n, ok := neighFromNetlink(u.Neigh)
	if !ok {
		return true
	}
	want, in := w.neighs[n.key()]
	if del {
		return in
	}
	return !in || want != n
}
