package agent

import (
	"context"
	"encoding/json"
	"fmt"

	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
)

// datapath is the agent's last stage: it owns the backend's lifecycle
// (created for the config's Backend object, recreated when that changes,
// Run in its own goroutine, Closed when replaced or at exit), hands it the
// peer changes the peer tracker computed, and starts it for the host's
// lease. Not safe for concurrent use.
type datapath struct {
	ext  backend.ExtIface
	node string
	opts backend.Options
	// newBackend is backend.New; tests of the agent's own logic replace it.
	newBackend func(raw json.RawMessage, ext backend.ExtIface, node string, o backend.Options) (backend.Backend, error)
	// checkPrivileges is backend.CheckPrivileges (nil: no check, for
	// tests whose backend programs no kernel).
	checkPrivileges func(typ string, ext backend.ExtIface, v4, v6 bool, o backend.Options) error

	be      backend.Backend
	raw     []byte // the Backend object be was created for
	cancel  context.CancelFunc
	handed  bool // be holds the peer set: changes go as changes
	started bool // be.Start ran for the current lease
}

func newDatapath(ext backend.ExtIface, node string, opts backend.Options) *datapath {
	return &datapath{ext: ext, node: node, opts: opts, newBackend: backend.New, checkPrivileges: backend.CheckPrivileges}
}

// ensure creates the backend for cfg's Backend object, and recreates it
// when the object changed (same type; options such as the VNI). Before the
// first backend it checks the privileges the datapath needs: an error
// wrapping *backend.PrivilegeError means the host must not claim a subnet.
func (d *datapath) ensure(cfg *lease.Config) error {
	if d.be != nil && backend.SameConfig(cfg.Backend.Raw, d.raw) {
		return nil
	}
	if d.be == nil && d.checkPrivileges != nil {
		// Before the first claim: a host that cannot program its
		// datapath must not advertise a subnet peers would route to it.
		if err := d.checkPrivileges(cfg.Backend.Type, d.ext, cfg.IPv4 != nil, cfg.IPv6 != nil, d.opts); err != nil {
			return err
		}
	}
	be, err := d.newBackend(cfg.Backend.Raw, d.ext, d.node, d.opts)
	if err != nil {
		if d.be != nil {
			klog.ErrorS(err, "new backend options rejected; keeping the running backend")
			d.raw = cfg.Backend.Raw
			return nil
		}
		return fmt.Errorf("creating the %s backend: %w", cfg.Backend.Type, err)
	}
	if d.cancel != nil {
		d.cancel()
	}
	var bctx context.Context
	bctx, d.cancel = context.WithCancel(context.Background())
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
	d.be, d.raw, d.handed, d.started = be, cfg.Backend.Raw, false, false
	kv := []any{"type", be.Type(), "mtu", be.MTU(), "iface", d.ext.V4.Name}
	if d.ext.Split() { // IPv6 uses another link (its own default route's)
		kv = append(kv, "iface6", d.ext.V6.Name)
	}
	klog.InfoS("backend", kv...)
	return nil
}

// apply hands the backend the peer changes ch, or, to a backend that does
// not hold the set yet, the whole set all returns. A failure is logged: the
// backend keeps the set and retries on its own resync.
func (d *datapath) apply(ctx context.Context, ch peerChanges, all func() []backend.Peer) {
	var err error
	switch {
	case !d.handed:
		err = d.be.SetPeers(ctx, all())
		d.handed = true
	case !ch.empty():
		err = d.be.UpdatePeers(ctx, ch.upserts(), ch.removed)
	}
	if err != nil {
		klog.ErrorS(err, "programming peers; the backend retries on its next pass")
	}
}

// start starts the backend for local unless it runs for this lease
// already. The peer set goes over first (apply; a backend not started
// only records it), so Start applies it in its first pass, concurrently
// with the firewall setup.
func (d *datapath) start(ctx context.Context, local backend.Local) error {
	if d.started {
		return nil
	}
	if err := d.be.Start(ctx, local); err != nil {
		return fmt.Errorf("starting the %s backend: %w", d.be.Type(), err)
	}
	d.started = true
	return nil
}

// answer makes a backend that answers for the host's lease on the link
// (proxy-ndp) answer for local now, right after the claim, before the peer
// set is computed and the backend started (Start answers again).
func (d *datapath) answer(local backend.Local) {
	ans, ok := d.be.(backend.Answerer)
	if !ok || !local.Subnet.V6.IsValid() {
		return
	}
	if err := ans.Answer(local); err != nil {
		klog.V(2).InfoS("answering right after the claim failed; the backend's start retries", "err", err)
	}
}

// leaseChanged makes the next start run Start again, for a new lease.
func (d *datapath) leaseChanged() { d.started = false }

// withdraw stops a backend that answers for the host's lease on the link
// (proxy-ndp) from answering, when the lease is no longer held: it must
// not answer for a slice another host may claim. Start runs again once the
// lease is held again.
func (d *datapath) withdraw() {
	if w, ok := d.be.(backend.Withdrawer); ok {
		w.Withdraw()
		d.started = false
	}
}

// stop ends the backend when the agent ends. With handoff (the lease stays
// for the next run) a backend that answers on the link keeps answering
// until the process exits (see backend.Handoff).
func (d *datapath) stop(handoff bool) {
	if h, ok := d.be.(backend.Handoff); ok && handoff && d.started {
		h.Handoff()
	}
	if d.cancel != nil {
		d.cancel()
	}
}
