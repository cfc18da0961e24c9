package agent

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/lease"
)

// The agent hands the backend its peers in one order, oldest lease first,
// whatever the map the view keeps them in: the backend gives a kernel
// object two peers want to the first, and that must not flip on every
// lease change.
func TestAgentHandsPeersOldestFirst(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16"}`)
	// Created in this order: create revisions ascending, names not sorted.
	nodes := []string{"p5", "p3", "p9", "p1", "p7", "p2", "p8", "p4"}
	rec := func(i int, node string, ip int) string {
		return fmt.Sprintf(`{"Node":%q,"Subnet":"10.100.%d.0/24","PublicIP":"192.168.7.%d","BackendType":"host-gw"}`, node, 200+i, ip)
	}
	for i, n := range nodes {
		etcdtest.Put(t, cli, "/leased/network/leases/"+n, rec(i, n, 10+i))
		// The subnet lock too, as agents write it: without it the agent
		// under test could claim one of these subnets itself.
		etcdtest.Put(t, cli, lease.NewKeys("").SubnetLock(netip.MustParsePrefix(fmt.Sprintf("10.100.%d.0/24", 200+i))), n)
	}
	want := strings.Join(nodes, ",")
	a := startTestAgent(t, srv.ClientURL, "a", "192.168.1.1")
	testutil.Eventually(t, 20*time.Second, "a programs every peer", func() bool { return len(strings.Split(a.rec.peerNodes(), ",")) == len(nodes) })
	for round := range 10 {
		if got := a.rec.peerNodes(); got != want {
			t.Fatalf("round %d: peers handed over as %s, want %s (oldest lease first)", round, got, want)
		}
		// A change that keeps every create revision: the order stays.
		a.rec.mu.Lock()
		applied := a.rec.applied
		a.rec.mu.Unlock()
		i := round % len(nodes)
		etcdtest.Put(t, cli, "/leased/network/leases/"+nodes[i], rec(i, nodes[i], 100+round))
		testutil.Eventually(t, 20*time.Second, "the change handed over", func() bool {
			a.rec.mu.Lock()
			defer a.rec.mu.Unlock()
			return a.rec.applied > applied
		})
		time.Sleep(50 * time.Millisecond)
	}
}
