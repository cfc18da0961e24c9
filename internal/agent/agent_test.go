package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
)

// recorder stands in for the kernel-facing backend in tests of the agent's
// own logic (config handling, leasing, peer filtering). The datapath itself
// is tested against a real kernel in pkg/backend and in the lab tests.
type recorder struct {
	mu      sync.Mutex
	peers   []backend.Peer
	starts  []backend.Local
	applied int
}

func (r *recorder) Type() string                  { return backend.TypeHostGW }
func (r *recorder) LeaseData() json.RawMessage    { return nil }
func (r *recorder) MTU() int                      { return 1500 }
func (r *recorder) Run(ctx context.Context) error { <-ctx.Done(); return nil }
func (r *recorder) Start(_ context.Context, l backend.Local) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.starts = append(r.starts, l)
	return nil
}
func (r *recorder) SetPeers(_ context.Context, p []backend.Peer) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.peers = p
	r.applied++
	return nil
}

// UpdatePeers applies the change as the real backends do: a changed peer
// keeps its place in the set, a new one goes last.
func (r *recorder) UpdatePeers(_ context.Context, ups []backend.Peer, rm []string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.peers = patchPeers(r.peers, ups, rm)
	r.applied++
	return nil
}

// patchPeers returns peers with a change applied as the real backends
// apply it (see recorder.UpdatePeers).
func patchPeers(peers, ups []backend.Peer, rm []string) []backend.Peer {
	out := slices.DeleteFunc(slices.Clone(peers), func(p backend.Peer) bool { return slices.Contains(rm, p.Node) })
	for _, u := range ups {
		if i := slices.IndexFunc(out, func(p backend.Peer) bool { return p.Node == u.Node }); i >= 0 {
			out[i] = u
		} else {
			out = append(out, u)
		}
	}
	return out
}

func (r *recorder) peerNodes() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var n []string
	for _, p := range r.peers {
		n = append(n, p.Node)
	}
	return strings.Join(n, ",")
}

type testAgent struct {
	*agent
	rec    *recorder
	cancel context.CancelFunc
	done   chan struct{}
}

func startTestAgent(t *testing.T, endpoint, node, ip string) *testAgent {
	t.Helper()
	rec := &recorder{}
	ia := newIdleAgent(t, endpoint, node, ip, rec)
	ctx, cancel := context.WithCancel(context.Background())
	ia.run(ctx)
	ta := &testAgent{agent: ia.agent, rec: rec, cancel: cancel, done: ia.done}
	t.Cleanup(ta.stop) // before newIdleAgent's cleanup closes the client
	return ta
}

func (ta *testAgent) stop() {
	ta.cancel()
	<-ta.done
}

func (ta *testAgent) env(t *testing.T) (subnetenv.Env, error) {
	return subnetenv.Read(ta.o.SubnetFile)
}

var cfgKey = lease.NewKeys("").Config()

// The agent waits for a missing config and proceeds as soon as it appears;
// it writes subnet.env and hands the backend exactly the valid peers.
func TestAgentMissingConfigThenPeers(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	a := startTestAgent(t, srv.ClientURL, "a", "192.168.1.1")
	time.Sleep(500 * time.Millisecond)
	if _, err := a.env(t); err == nil {
		t.Fatal("subnet.env written without a config")
	}
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","IPv6SubnetLen":80}`)
	testutil.Eventually(t, 20*time.Second, "subnet.env", func() bool { _, err := a.env(t); return err == nil })
	env, _ := a.env(t)
	if env.Subnet.V4.Bits() != 24 || env.Subnet.V6.Bits() != 80 || env.Network.V4.String() != "10.100.0.0/16" || env.MTU != 1500 {
		t.Errorf("subnet.env %+v", env)
	}
	b := startTestAgent(t, srv.ClientURL, "b", "192.168.1.2")
	testutil.Eventually(t, 20*time.Second, "a sees b", func() bool { return a.rec.peerNodes() == "b" })
	testutil.Eventually(t, 20*time.Second, "b sees a", func() bool { return b.rec.peerNodes() == "a" })
	// A hostile lease claiming a's subnet, and garbage, are never programmed.
	etcdtest.Put(t, cli, lease.NewKeys("").Lease("evil"), fmt.Sprintf(`{"Node":"evil","Subnet":%q,"PublicIP":"192.168.1.66"}`, env.Subnet.V4))
	etcdtest.Put(t, cli, lease.NewKeys("").Lease("junk"), `{"Node":`)
	// c's subnet is one neither a nor b holds (they pick theirs at random).
	envB, _ := b.env(t)
	cSubnet := "10.100.250.0/24"
	for _, s := range []string{"10.100.250.0/24", "10.100.251.0/24", "10.100.252.0/24"} {
		if s != env.Subnet.V4.String() && s != envB.Subnet.V4.String() {
			cSubnet = s
			break
		}
	}
	etcdtest.Put(t, cli, lease.NewKeys("").Lease("c"), fmt.Sprintf(`{"Node":"c","Subnet":%q,"PublicIP":"192.168.1.3"}`, cSubnet))
	testutil.Eventually(t, 20*time.Second, "a sees c but not evil or junk", func() bool { return a.rec.peerNodes() == "b,c" || a.rec.peerNodes() == "c,b" })
}

// With the range full the agent says "out of subnets", keeps running, and
// takes a subnet as soon as SubnetMax is raised — no restart.
func TestAgentExhaustedThenSubnetMaxRaised(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.0.0","SubnetMax":"10.100.1.0"}`)
	var agents []*testAgent
	for i := range 3 {
		ag := startTestAgent(t, srv.ClientURL, fmt.Sprintf("h%d", i), fmt.Sprintf("192.168.1.%d", i+1))
		testutil.Eventually(t, 20*time.Second, "lease", func() bool { _, err := ag.env(t); return err == nil })
		agents = append(agents, ag)
	}
	fourth := startTestAgent(t, srv.ClientURL, "h3", "192.168.1.4")
	time.Sleep(time.Second)
	if _, err := fourth.env(t); err == nil {
		t.Fatal("fourth host got a subnet in a range of three")
	}
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.0.0","SubnetMax":"10.100.1.128"}`)
	testutil.Eventually(t, 20*time.Second, "fourth host's lease after SubnetMax raise", func() bool {
		env, err := fourth.env(t)
		return err == nil && env.Subnet.V4 == netip.MustParsePrefix("10.100.1.128/25")
	})
	testutil.Eventually(t, 20*time.Second, "the others see the fourth", func() bool { return strings.Contains(agents[0].rec.peerNodes(), "h3") })
}

// Bad configs never take effect: invalid JSON, a change that would
// invalidate the lease, a different backend type. The next valid config does.
func TestAgentKeepsLastGoodConfig(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16"}`)
	a := startTestAgent(t, srv.ClientURL, "a", "192.168.1.1")
	testutil.Eventually(t, 20*time.Second, "lease", func() bool { _, err := a.env(t); return err == nil })
	before, _ := os.ReadFile(a.o.SubnetFile)
	for _, bad := range []string{`{"Network":`, `{"Network":"10.200.0.0/16"}`, `{"Network":"10.100.0.0/16","Backend":{"Type":"vxlan"}}`} {
		etcdtest.Put(t, cli, cfgKey, bad)
		time.Sleep(300 * time.Millisecond)
		after, _ := os.ReadFile(a.o.SubnetFile)
		if string(after) != string(before) {
			t.Fatalf("config %s changed subnet.env:\n%s\nto\n%s", bad, before, after)
		}
		if a.conf.cfg.IPv4.Network.String() != "10.100.0.0/16" || a.conf.cfg.Backend.Type != "host-gw" {
			t.Fatalf("config %s was adopted", bad)
		}
	}
	// Enabling IPv6 is compatible: the host adds an IPv6 subnet, keeps IPv4.
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`)
	env0, _ := subnetenv.Read(a.o.SubnetFile)
	testutil.Eventually(t, 20*time.Second, "IPv6 subnet added", func() bool {
		env, err := a.env(t)
		return err == nil && env.Subnet.V6.IsValid() && env.Subnet.V4 == env0.Subnet.V4
	})
}

// When the lease is lost (revoked, as after a long partition) the agent
// claims again and gets the same subnets back.
func TestAgentReclaimsLostLease(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`)
	a := startTestAgent(t, srv.ClientURL, "a", "192.168.1.1")
	testutil.Eventually(t, 20*time.Second, "lease", func() bool { _, err := a.env(t); return err == nil })
	env0, _ := a.env(t)
	ctx := context.Background()
	resp, err := cli.Get(ctx, lease.NewKeys("").Lease("a"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatal("no lease record", err)
	}
	id := resp.Kvs[0].Lease
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(id)); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "the record is back under a new lease", func() bool {
		r, err := cli.Get(ctx, lease.NewKeys("").Lease("a"))
		return err == nil && len(r.Kvs) == 1 && r.Kvs[0].Lease != id
	})
	env1, _ := a.env(t)
	if env1 != env0 {
		t.Errorf("subnet.env changed from %+v to %+v", env0, env1)
	}
}

// Keys of a live host deleted by hand (its record, or a subnet lock) are
// put back: the subnet must stay locked while the host uses it.
func TestAgentRepairsDeletedKeys(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`)
	a := startTestAgent(t, srv.ClientURL, "a", "192.168.1.1")
	testutil.Eventually(t, 20*time.Second, "lease", func() bool { _, err := a.env(t); return err == nil })
	env, _ := a.env(t)
	ctx := context.Background()
	k := lease.NewKeys("")
	for _, key := range []string{k.Lease("a"), k.SubnetLock(env.Subnet.V6)} {
		if _, err := cli.Delete(ctx, key); err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, 20*time.Second, key+" put back", func() bool {
			r1, _ := cli.Get(ctx, k.Lease("a"))
			r2, _ := cli.Get(ctx, k.SubnetLock(env.Subnet.V4))
			r3, _ := cli.Get(ctx, k.SubnetLock(env.Subnet.V6))
			return len(r1.Kvs) == 1 && len(r2.Kvs) == 1 && len(r3.Kvs) == 1 && string(r3.Kvs[0].Value) == "a"
		})
		if now, _ := a.env(t); now != env {
			t.Fatalf("subnet.env changed from %+v to %+v", env, now)
		}
	}
}
