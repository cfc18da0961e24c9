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
//
// The events each watching host receives are the model of
// Documentation/scale.md: a join costs it one (the new record; the agent
// before: 3, the record, the lock and the affinity), a restart that
// resumes its etcd lease none (before: 2, the record and the lock under a
// new lease). The bounds leave room for a host of the loaded machine
// that lost its lease and claimed again.
func TestFleetInvariants(t *testing.T) {
	for _, previous := range []bool{false, true} {
		t.Run(map[bool]string{false: "current", true: "previous"}[previous], func(t *testing.T) {
			c, err := etcdserver.StartCluster(t.TempDir(), 3, etcdserver.ClusterOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(c.Stop)
			res := runFleet(t, Options{Endpoints: c.Endpoints(), Previous: previous})
			join, restart := res.EventsPerJoinPerWatcher, res.RestartEventsPerRestartPerWatcher
			switch {
			case !previous && (join >= 1.5 || restart >= 1):
				t.Errorf("a join cost each watcher %.2f events, a restart %.2f; want 1 and 0", join, restart)
			case previous && (join < 2.5 || restart < 1.5):
				t.Errorf("the previous agent's join cost each watcher %.2f events, a restart %.2f; want 3 and 2 (is Options.Previous still simulated?)", join, restart)
			}
		})
	}
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
