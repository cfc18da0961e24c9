package agent

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/lease"
)

// etcdRanges returns how many range requests the etcd servers of this
// process have served (etcd_mvcc_range_total).
func etcdRanges(t *testing.T) float64 {
	t.Helper()
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "etcd_mvcc_range_total" {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatal("etcd_mvcc_range_total not found")
	return 0
}

// A host whose subnet was taken by another node, in a range with no free
// subnet, waits for one to free up without asking etcd again and again once
// the grace period for its peers is over. Before, the agent re-armed its
// retry timer for the end of the grace period even when that was past, so
// it stepped, and tried to claim, in a tight loop until a subnet freed up.
func TestOutOfSubnetsAfterGraceWaitsQuietly(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","SubnetMin":"10.100.5.0","SubnetMax":"10.100.5.0"}`)
	rec := &recorder{}
	ia := newIdleAgent(t, srv.ClientURL, "a", "192.168.1.1", rec)
	ia.o.LeaseTTL = 2 * time.Second // the grace period
	ctx, cancel := context.WithCancel(context.Background())
	ia.run(ctx)
	t.Cleanup(func() { cancel(); <-ia.done })
	testutil.Eventually(t, 20*time.Second, "a holds 10.100.5.0/24", func() bool {
		env, err := subnetEnvOf(ia)
		return err == nil && env.Subnet.V4.String() == "10.100.5.0/24"
	})

	// b takes the only subnet: a's record goes, b's lock and record come.
	keys := lease.NewKeys("")
	tctx, tcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer tcancel()
	if _, err := cli.Txn(tctx).Then(
		clientv3.OpDelete(keys.Lease("a")),
		clientv3.OpPut(keys.SubnetLock(netip.MustParsePrefix("10.100.5.0/24")), "b"),
		clientv3.OpPut(keys.Lease("b"), `{"Node":"b","Subnet":"10.100.5.0/24","PublicIP":"192.168.1.2","BackendType":"host-gw"}`),
	).Commit(); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "a out of subnets", func() bool { return strings.Contains(ia.health.statusText(), "out of subnets") })
	time.Sleep(ia.o.LeaseTTL + time.Second) // the grace period is over

	before := etcdRanges(t)
	time.Sleep(2 * time.Second)
	if n := etcdRanges(t) - before; n > 20 {
		t.Errorf("etcd served %.0f range requests in 2 s while a waited for a free subnet, want a few at most", n)
	}
	if !strings.Contains(ia.health.statusText(), "out of subnets") {
		t.Errorf("status %q, want out of subnets", ia.health.statusText())
	}
}
