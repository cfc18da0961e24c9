package lease

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/pkg/metrics"
)

// Session is one etcd lease kept alive for this host: every key the host
// writes hangs off it, so that all of them expire as one when the host
// stops renewing. It counts renewals in leased_lease_renewals_total.
type Session struct {
	id     clientv3.LeaseID
	done   chan struct{}
	cancel context.CancelFunc
}

// NewSession grants a lease of ttl (rounded to seconds; etcd's unit) and
// keeps it alive until Orphan is called or the lease is lost. The grant
// waits at most grantTimeout for etcd.
func NewSession(ctx context.Context, cli *clientv3.Client, ttl, grantTimeout time.Duration) (*Session, error) {
	gctx, cancel := context.WithTimeout(ctx, grantTimeout)
	g, err := cli.Grant(gctx, int64(ttl.Round(time.Second)/time.Second))
	cancel()
	if err != nil {
		metrics.LeaseFailures.WithLabelValues("grant").Inc()
		return nil, fmt.Errorf("granting an etcd lease: %w", err)
	}
	return keepAlive(ctx, cli, g.ID, time.Duration(g.TTL)*time.Second)
}

// ErrLeaseGone says that ResumeSession found the etcd lease expired or
// revoked, or granted with another TTL: the caller grants a new one.
var ErrLeaseGone = errors.New("lease: the earlier etcd lease is gone or has another TTL")

// ResumeSession keeps alive the etcd lease id that an earlier run of this
// host granted, instead of granting a new one, when it is still alive and
// was granted with ttl (rounded to seconds): a restarted agent's claim
// then finds every key under its own lease with the value it would write
// and writes nothing, so a restart costs the hosts watching the prefix
// no event. It renews the lease once (waiting at most timeout) before it
// returns, so that the lease does not expire while the claim runs. It
// returns an error wrapping ErrLeaseGone when the lease expired, was
// revoked or has another TTL (--lease-ttl changed), and etcd's error when
// etcd cannot be reached; either way the caller grants a new lease.
func ResumeSession(ctx context.Context, cli *clientv3.Client, id clientv3.LeaseID, ttl, timeout time.Duration) (*Session, error) {
	want := int64(ttl.Round(time.Second) / time.Second)
	rctx, cancel := context.WithTimeout(ctx, timeout)
	ttlResp, err := cli.TimeToLive(rctx, id)
	if err == nil && ttlResp.TTL > 0 && ttlResp.GrantedTTL == want {
		var ka *clientv3.LeaseKeepAliveResponse
		ka, err = cli.KeepAliveOnce(rctx, id)
		if err == nil && ka.TTL <= 0 {
			err = ErrLeaseGone
		}
	} else if err == nil {
		err = fmt.Errorf("%w (%x: %ds left of %ds, want %ds)", ErrLeaseGone, id, ttlResp.TTL, ttlResp.GrantedTTL, want)
	}
	cancel()
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		err = fmt.Errorf("%w (%x: %v)", ErrLeaseGone, id, err)
	}
	if err != nil {
		return nil, err
	}
	return keepAlive(ctx, cli, id, time.Duration(want)*time.Second)
}

// keepAlive starts renewing lease id, just granted or renewed with ttl.
func keepAlive(ctx context.Context, cli *clientv3.Client, id clientv3.LeaseID, ttl time.Duration) (*Session, error) {
	kctx, kcancel := context.WithCancel(context.WithoutCancel(ctx))
	ka, err := cli.KeepAlive(kctx, id)
	if err != nil {
		kcancel()
		metrics.LeaseFailures.WithLabelValues("grant").Inc()
		return nil, fmt.Errorf("keeping lease %x alive: %w", id, err)
	}
	s := &Session{id: id, done: make(chan struct{}), cancel: kcancel}
	go func() {
		defer close(s.done)
		renewed := time.Now() // the lease lives at least until renewed+ttl
		for {
			for resp := range ka {
				metrics.LeaseRenewals.Inc()
				renewed, ttl = time.Now(), time.Duration(resp.TTL)*time.Second
			}
			if kctx.Err() != nil {
				return
			}
			// The etcd client also gives up on a lease whose first
			// renewal is not answered within its dial timeout + 1 s,
			// however long the TTL: a loaded cluster (a join storm)
			// answers later than that. Ask etcd before calling the
			// lease lost, for as long as the lease can live, and keep
			// renewing it while it lives.
			if !stillAlive(kctx, cli, id, renewed.Add(ttl)) {
				metrics.LeaseFailures.WithLabelValues("lost").Inc()
				return
			}
			if ka, err = cli.KeepAlive(kctx, id); err != nil {
				if kctx.Err() == nil {
					metrics.LeaseFailures.WithLabelValues("lost").Inc()
				}
				return
			}
		}
	}()
	return s, nil
}

// stillAlive reports whether etcd says lease id has time left. It asks
// until deadline (when the lease expires unless renewed), again after an
// error such as a leader election ("leader changed"), and reports false
// when etcd gave no answer by then.
func stillAlive(ctx context.Context, cli *clientv3.Client, id clientv3.LeaseID, deadline time.Time) bool {
	c, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	for {
		resp, err := cli.TimeToLive(c, id)
		switch {
		case err == nil:
			return resp.TTL > 0
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			return false
		}
		select {
		case <-c.Done():
			return false
		case <-time.After(Jitter(time.Second)):
		}
	}
}

// Lease returns the etcd lease ID.
func (s *Session) Lease() clientv3.LeaseID { return s.id }

// Done is closed when the lease is no longer kept alive: it expired, no
// keep-alive was answered within the TTL, or Orphan was called.
func (s *Session) Done() <-chan struct{} { return s.done }

// Orphan stops renewing without revoking: the lease and its keys live until
// the TTL runs out, so that a restarted agent can take them over without a
// gap.
func (s *Session) Orphan() { s.cancel() }
