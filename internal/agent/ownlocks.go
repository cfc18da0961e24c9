package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/lease"
)

// lockWatch follows this host's own subnet locks for the ownership checks
// (checkOwnKeys): the peer watch carries only the config and the lease
// records (lease.Keys.PeerRange), so that another host's join costs this
// one a single event.
type lockWatch struct {
	ch     chan lease.Batch
	cancel context.CancelFunc
}

// watchLocks (re)starts the watch of the locks of k.self's subnets from
// just after the claim that wrote them.
func (k *leaseKeeper) watchLocks(ctx context.Context) {
	if k.locks.cancel != nil {
		k.locks.cancel()
	}
	if k.locks.ch == nil {
		k.locks.ch = make(chan lease.Batch, 4)
	}
	wctx, cancel := context.WithCancel(ctx)
	k.locks.cancel = cancel
	go k.reg.WatchLocks(wctx, k.self.Subnets(), k.self.ModRev+1, k.locks.ch)
}

// lockEvents delivers the changes to this host's own locks (nil before
// the first claim). Events of an earlier claim's locks may still arrive;
// checkOwnKeys ignores them.
func (k *leaseKeeper) lockEvents() <-chan lease.Batch { return k.locks.ch }

// session returns a new etcd session: the first one of this run resumes
// the etcd lease of the previous run when it is still alive (a restart
// within --lease-ttl), so that the claim finds every key as it would
// write it and writes nothing; otherwise, and for every later session,
// it grants a new lease. It reports whether the lease was resumed.
func (k *leaseKeeper) session(ctx context.Context) (*lease.Session, bool, error) {
	if !k.resumeTried && !k.own.noHistory && len(k.own.ids) > 0 {
		k.resumeTried = true
		id := k.own.ids[len(k.own.ids)-1]
		sess, err := lease.ResumeSession(ctx, k.cli, id, k.o.LeaseTTL, 10*time.Second)
		if err == nil {
			klog.InfoS("resuming the etcd lease of this host's previous run", "lease", fmt.Sprintf("%x", int64(id)), "ttl", k.o.LeaseTTL)
			return sess, true, nil
		}
		if errors.Is(err, lease.ErrLeaseGone) {
			klog.InfoS("the etcd lease of this host's previous run is gone; granting a new one", "reason", err)
		} else {
			klog.InfoS("could not resume the etcd lease of this host's previous run; granting a new one", "err", err)
		}
	}
	k.resumeTried = true
	// The grant waits at most 10s so that an unreachable etcd is
	// reported and retried.
	sess, err := lease.NewSession(ctx, k.cli, k.o.LeaseTTL, 10*time.Second)
	return sess, false, err
}
