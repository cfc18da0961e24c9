package fleetsim

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/etcdserver"
)

// A small fleet against a real 3-member etcd cluster goes through every
// scenario and keeps what a user relies on: no subnet held twice, no
// lease lost, no peer flapping in a rolling restart, every peer set
// complete. Timings are reported, never asserted.
func TestFleetInvariants(t *testing.T) {
	c, err := etcdserver.StartCluster(t.TempDir(), 3, etcdserver.ClusterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	runFleet(t, Options{Endpoints: c.Endpoints()})
}

func runFleet(t *testing.T, o Options) *Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	o.Hosts, o.Joins, o.Steady, o.LeaseTTL = 20, 3, time.Second, 5*time.Second
	o.RestartStep, o.Timeout = 0.1, 2*time.Minute
	// 32 subnets for 23 hosts, and the storm's hosts all start at once:
	// their claims race for the same subnets, so that a claim that does
	// not exclude other holders shows as a duplicate.
	o.StormSpread = -1
	o.Config = `{"Network":"10.0.0.0/19","SubnetLen":24,"Backend":{"Type":"host-gw"}}`
	o.Log = t.Logf
	res, err := Run(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if v := res.Violations(); len(v) > 0 {
		t.Errorf("invariants broken: %v", v)
	}
	if res.Join.N != 3 || res.Expired != 2 || res.RestartStep != 2 {
		t.Errorf("scenarios ran %d joins, expired %d hosts, restarted %d at a time; want 3, 2, 2", res.Join.N, res.Expired, res.RestartStep)
	}
	if res.EventsPerJoinPerWatcher < 1 {
		t.Errorf("a join reached each watcher with %.2f events; want at least its record", res.EventsPerJoinPerWatcher)
	}
	var b strings.Builder
	Print(&b, []*Result{res})
	t.Logf("\n%s", b.String())
	return res
}
