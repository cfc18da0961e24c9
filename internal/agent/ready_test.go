package agent

import (
	"context"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/metrics"
	"github.com/leased/leased/pkg/subnetenv"
)

// readyMetric is the value /metrics shows for leased_ready.
func readyMetric(t *testing.T) float64 {
	t.Helper()
	var m dto.Metric
	if err := metrics.Ready.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetGauge().GetValue()
}

// leased_ready (which metrics.md's alert watches) and /readyz say 0 / 503
// while the host has lost its lease or refuses the config in etcd, and
// return to 1 / 200 when that is over.
func TestReadyMetricFollowsLeaseAndConfig(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	good := `{"Network":"10.100.0.0/16"}`
	etcdtest.Put(t, cli, cfgKey, good)
	p := etcdtest.Proxy(t, strings.TrimPrefix(srv.ClientURL, "http://"))
	a := newIdleAgent(t, "http://"+p.Addr().String(), "a", "192.168.1.1", &recorder{})
	a.o.LeaseTTL = 3 * time.Second
	// A subnet below the SubnetMax of the config accepted below (a random
	// one above it made that config refused, legitimately, 5 times in 256).
	a.lease.hint = subnetenv.Env{Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24")}}
	ctx, cancel := context.WithCancel(context.Background())
	a.run(ctx)
	t.Cleanup(func() { cancel(); <-a.done })
	ready := func(want bool) func() bool {
		return func() bool { return (readyMetric(t) == 1) == want && a.health.ready.Load() == want }
	}
	testutil.Eventually(t, 20*time.Second, "leased_ready 1 once the lease is held", ready(true))

	// A config this host refuses (its subnet is outside the new network).
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.200.0.0/16"}`)
	testutil.Eventually(t, 20*time.Second, "leased_ready 0 while the config in etcd is refused", ready(false))
	if s := a.health.statusText(); !strings.Contains(s, "refused") {
		t.Errorf("/readyz says %q; want it to say the config is refused", s)
	}
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","SubnetMax":"10.100.250.0"}`)
	testutil.Eventually(t, 20*time.Second, "leased_ready 1 once a config this host accepts is back", ready(true))

	// An invalid config is refused too.
	etcdtest.Put(t, cli, cfgKey, `{"Network":`)
	testutil.Eventually(t, 20*time.Second, "leased_ready 0 while the config in etcd is invalid", ready(false))
	etcdtest.Put(t, cli, cfgKey, good)
	testutil.Eventually(t, 20*time.Second, "leased_ready 1 once the config is valid again", ready(true))

	// etcd out of reach for longer than the lease TTL: the lease is lost.
	p.SetDown(true)
	testutil.Eventually(t, 20*time.Second, "leased_ready 0 after the lease is lost", ready(false))
	p.SetDown(false)
	testutil.Eventually(t, 20*time.Second, "leased_ready 1 once the lease is claimed again", ready(true))
}
