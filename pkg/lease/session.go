package lease

import (
	"context"
	"fmt"
	"time"

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
	kctx, kcancel := context.WithCancel(context.WithoutCancel(ctx))
	ka, err := cli.KeepAlive(kctx, g.ID)
	if err != nil {
		kcancel()
		metrics.LeaseFailures.WithLabelValues("grant").Inc()
		return nil, fmt.Errorf("keeping lease %x alive: %w", g.ID, err)
	}
	s := &Session{id: g.ID, done: make(chan struct{}), cancel: kcancel}
	go func() {
		defer close(s.done)
		for range ka {
			metrics.LeaseRenewals.Inc()
		}
		if kctx.Err() == nil {
			metrics.LeaseFailures.WithLabelValues("lost").Inc()
		}
	}()
	return s, nil
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
