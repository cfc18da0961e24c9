package agent

// Reliability scenarios of issue 6 that need only etcd and the agent's own
// logic (the datapath side is in test/e2e/reliability_test.go):
//   1. 50 agents start at the same moment.
//   6. watch compaction while an agent is cut off from etcd.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
)

// histBackend is a recording backend that keeps every peer set it was
// given, to check what the datapath would have seen in between.
type histBackend struct {
	mu   sync.Mutex
	sets [][]backend.Peer
}

func (h *histBackend) Type() string                               { return backend.TypeHostGW }
func (h *histBackend) LeaseData() json.RawMessage                 { return nil }
func (h *histBackend) MTU() int                                   { return 1500 }
func (h *histBackend) Run(ctx context.Context) error              { <-ctx.Done(); return nil }
func (h *histBackend) Start(context.Context, backend.Local) error { return nil }
func (h *histBackend) SetPeers(_ context.Context, p []backend.Peer) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.sets = append(h.sets, slices.Clone(p))
	return nil
}

// UpdatePeers keeps the set the change leads to.
func (h *histBackend) UpdatePeers(_ context.Context, ups []backend.Peer, rm []string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var last []backend.Peer
	if len(h.sets) > 0 {
		last = h.sets[len(h.sets)-1]
	}
	h.sets = append(h.sets, patchPeers(last, ups, rm))
	return nil
}

// last returns the latest peer set as node → IPv4 subnet, and how many sets
// the backend received.
func (h *histBackend) last() (map[string]netip.Prefix, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.sets) == 0 {
		return nil, 0
	}
	m := map[string]netip.Prefix{}
	for _, p := range h.sets[len(h.sets)-1] {
		m[p.Node] = p.Subnet.V4
	}
	return m, len(h.sets)
}

// idleAgent is an agent built but not yet running, so that many can be
// started at the same instant.
type idleAgent struct {
	*agent
	be   backend.Backend
	done chan struct{}
	err  error
}

func newIdleAgent(t *testing.T, endpoint, node, ip string, be backend.Backend) *idleAgent {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	o := &Options{EtcdEndpoints: endpoint, EtcdPrefix: lease.DefaultPrefix, LeaseTTL: 10 * time.Second,
		SubnetFile: filepath.Join(t.TempDir(), "subnet.env")}
	ext := backend.ExtIface{V4: backend.ExtLink{Name: "eth0", MTU: 1500, Public: netip.MustParseAddr(ip), Addr: netip.MustParseAddr(ip)}}
	a := newAgent(o, cli, ext, node)
	a.dp.newBackend = func(json.RawMessage, backend.ExtIface, string, backend.Options) (backend.Backend, error) {
		return be, nil
	}
	a.dp.checkPrivileges = nil // be programs no kernel
	ia := &idleAgent{agent: a, be: be, done: make(chan struct{})}
	t.Cleanup(func() { cli.Close() })
	return ia
}

// run starts the agent loop; it stops when ctx ends.
func (ia *idleAgent) run(ctx context.Context) {
	go func() { defer close(ia.done); ia.err = ia.agent.run(ctx) }()
}

func (ia *idleAgent) exited() bool {
	select {
	case <-ia.done:
		return true
	default:
		return false
	}
}

// Scenario 1: 50 agents, each with its own etcd client, start at the same
// instant in a range of 64 subnets per family (so their random first picks
// collide often). Every one ends with a distinct subnet of each family, its
// record in etcd says so, every one sees the 49 others as peers, and none
// exits.
func TestFiftyAgentsStartTogether(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","SubnetLen":22,"IPv6Network":"2001:db8::/58","IPv6SubnetLen":64}`)
	const n = 50
	agents := make([]*idleAgent, n)
	recs := make([]*recorder, n)
	for i := range n {
		recs[i] = &recorder{}
		agents[i] = newIdleAgent(t, srv.ClientURL, fmt.Sprintf("host%02d", i), fmt.Sprintf("192.168.1.%d", i+1), recs[i])
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		for _, a := range agents {
			<-a.done
		}
	})
	start := make(chan struct{})
	var wg sync.WaitGroup
	for _, a := range agents {
		wg.Add(1)
		go func() { defer wg.Done(); <-start; a.run(ctx) }()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()

	deadline := time.Now().Add(90 * time.Second)
	for {
		ready := 0
		for _, a := range agents {
			if _, err := subnetEnvOf(a); err == nil {
				ready++
			}
		}
		if ready == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d agents wrote subnet.env within 90s", ready, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("50 agents held leases %s after the simultaneous start", time.Since(t0).Round(time.Millisecond))

	seen4, seen6 := map[netip.Prefix]string{}, map[netip.Prefix]string{}
	for i, a := range agents {
		env, _ := subnetEnvOf(a)
		node := fmt.Sprintf("host%02d", i)
		if !env.Subnet.V4.IsValid() || !env.Subnet.V6.IsValid() {
			t.Errorf("%s: subnet.env lacks a family: %+v", node, env)
		}
		if o, dup := seen4[env.Subnet.V4]; dup {
			t.Errorf("%s and %s both hold %s", o, node, env.Subnet.V4)
		}
		if o, dup := seen6[env.Subnet.V6]; dup {
			t.Errorf("%s and %s both hold %s", o, node, env.Subnet.V6)
		}
		seen4[env.Subnet.V4], seen6[env.Subnet.V6] = node, node
	}
	// etcd agrees: 50 records, each naming the subnets of its subnet.env.
	resp, err := cli.Get(context.Background(), lease.NewKeys("").Leases(), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != n {
		t.Errorf("%d lease records in etcd, want %d", len(resp.Kvs), n)
	}
	for _, kv := range resp.Kvs {
		node := strings.TrimPrefix(string(kv.Key), lease.NewKeys("").Leases())
		r, err := lease.DecodeRecord(node, kv.Value)
		if err != nil {
			t.Errorf("record of %s: %v", node, err)
			continue
		}
		if seen4[r.Subnet.V4] != node || seen6[r.Subnet.V6] != node {
			t.Errorf("etcd says %s holds %v, its subnet.env says otherwise", node, r.Subnets())
		}
	}
	// Everyone programs the 49 others.
	deadline = time.Now().Add(60 * time.Second)
	for i := 0; i < n; {
		if got := strings.Count(recs[i].peerNodes(), ",") + 1; got == n-1 {
			i++
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("host%02d programs peers %q, want the 49 others", i, recs[i].peerNodes())
		}
		time.Sleep(50 * time.Millisecond)
	}
	for i, a := range agents {
		if a.exited() {
			t.Errorf("agent host%02d exited: %v", i, a.err)
		}
	}
}

func subnetEnvOf(a *idleAgent) (subnetenv.Env, error) { return subnetenv.Read(a.o.SubnetFile) }

// Scenario 6: while an agent is cut off from etcd, peers leave, move and
// arrive, and etcd compacts past the agent's watch revision. On reconnect
// the agent lists again and the backend gets exactly etcd's peer set; in
// between it is never handed a set that drops a peer that did not change
// (which on a real host would withdraw a working route).
func TestAgentRelistsAfterCompaction(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16"}`)
	keys := lease.NewKeys("")
	// putPeer writes a peer as an agent would: its record and the lock on
	// its subnet, so that a's claim (which runs while the listing streams
	// and consults only the locks) never takes the same subnet.
	putPeer := func(node, subnet string) *clientv3.TxnResponse {
		t.Helper()
		v := fmt.Sprintf(`{"Node":%q,"Subnet":%q,"PublicIP":"192.168.7.%d","BackendType":"host-gw"}`, node, subnet, len(node)+10)
		r, err := cli.Txn(context.Background()).Then(
			clientv3.OpPut(keys.SubnetLock(pfx(subnet)), node),
			clientv3.OpPut(keys.Lease(node), v)).Commit()
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	for i, n := range []string{"b", "c", "d", "e"} {
		putPeer(n, fmt.Sprintf("10.100.%d.0/24", 200+i))
	}
	p := etcdtest.Proxy(t, strings.TrimPrefix(srv.ClientURL, "http://"))
	hb := &histBackend{}
	a := newIdleAgent(t, "http://"+p.Addr().String(), "a", "192.168.1.1", hb)
	ctx, cancel := context.WithCancel(context.Background())
	a.run(ctx)
	defer func() { cancel(); <-a.done }()
	want := map[string]netip.Prefix{"b": pfx("10.100.200.0/24"), "c": pfx("10.100.201.0/24"), "d": pfx("10.100.202.0/24"), "e": pfx("10.100.203.0/24")}
	waitPeers(t, hb, want)
	own, err := cli.Get(context.Background(), keys.Lease("a"))
	if err != nil || len(own.Kvs) != 1 {
		t.Fatalf("a's lease record: %v %v", own, err)
	}
	_, setsBefore := hb.last()

	p.SetDown(true)
	cli.Delete(context.Background(), keys.Lease("b")) // left
	putPeer("c", "10.100.42.0/24")                    // moved
	putPeer("f", "10.100.43.0/24")                    // arrived
	for i := range 20 {                               // unrelated churn
		cli.Put(context.Background(), "/unrelated", fmt.Sprint(i))
	}
	last := putPeer("g", "10.100.44.0/24")
	cli.Delete(context.Background(), keys.Lease("g")) // came and went while a was away
	if _, err := cli.Compact(context.Background(), last.Header.Revision+1, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // shorter than a's 10s lease TTL: a keeps its lease
	p.SetDown(false)

	want = map[string]netip.Prefix{"c": pfx("10.100.42.0/24"), "d": pfx("10.100.202.0/24"), "e": pfx("10.100.203.0/24"), "f": pfx("10.100.43.0/24")}
	waitPeers(t, hb, want)
	// Nothing more arrives afterwards: no stale event replays over the relist.
	time.Sleep(500 * time.Millisecond)
	if got, _ := hb.last(); !mapsEqual(got, want) {
		t.Errorf("after settling the backend has %v, want %v", got, want)
	}
	hb.mu.Lock()
	for i, set := range hb.sets[setsBefore:] {
		has := map[string]bool{}
		for _, p := range set {
			has[p.Node] = true
			if p.Node == "g" {
				t.Errorf("peer set %d after reconnect programs g, which came and went while a was away", setsBefore+i)
			}
		}
		if !has["d"] || !has["e"] {
			t.Errorf("peer set %d after reconnect drops unchanged peers d or e: %v", setsBefore+i, set)
		}
	}
	hb.mu.Unlock()
	now, err := cli.Get(context.Background(), keys.Lease("a"))
	if err != nil || len(now.Kvs) != 1 || now.Kvs[0].Lease != own.Kvs[0].Lease {
		t.Errorf("a's lease changed across a 1s disconnect: before %v, after %v (%v)", own.Kvs, now.Kvs, err)
	}
	if a.exited() {
		t.Errorf("agent exited: %v", a.err)
	}
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func mapsEqual(a, b map[string]netip.Prefix) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func waitPeers(t *testing.T, hb *histBackend, want map[string]netip.Prefix) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, _ := hb.last()
		if mapsEqual(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("backend peers differ from the wanted %d: %s", len(want), peerDiff(got, want))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// putPeers writes a config and n peer records peer-0000… (records only,
// no subnet locks: a host's claim stays above them, from 10.100.0.0). It
// returns the key layout, how record i is written, and the peers by node.
func putPeers(t *testing.T, cli *clientv3.Client, n int) (lease.Keys, func(node string, i int) string, map[string]netip.Prefix) {
	t.Helper()
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.0.0.0/8","SubnetMin":"10.100.0.0"}`)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	keys := lease.NewKeys("")
	record := func(node string, i int) string {
		return fmt.Sprintf(`{"Node":%q,"Subnet":"10.%d.%d.0/24","PublicIP":"192.168.%d.%d"}`, node, 1+i/256, i%256, 1+i/256, 1+i%250)
	}
	want := map[string]netip.Prefix{}
	var ops []clientv3.Op
	for i := range n {
		node := fmt.Sprintf("peer-%04d", i)
		ops = append(ops, clientv3.OpPut(keys.Lease(node), record(node, i)))
		want[node] = pfx(fmt.Sprintf("10.%d.%d.0/24", 1+i/256, i%256))
		if len(ops) == 100 || i == n-1 {
			if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
				t.Fatal(err)
			}
			ops = ops[:0]
		}
	}
	return keys, record, want
}

// changePeers deletes peer-0000, moves peer-0001 and adds peer-new (see
// putPeers), in etcd and in want.
func changePeers(t *testing.T, cli *clientv3.Client, keys lease.Keys, record func(string, int) string, want map[string]netip.Prefix) {
	t.Helper()
	etcdtest.Put(t, cli, keys.Lease("peer-0001"), record("peer-0001", 5000))
	want["peer-0001"] = pfx("10.20.136.0/24")
	etcdtest.Put(t, cli, keys.Lease("peer-new"), record("peer-new", 6000))
	want["peer-new"] = pfx("10.24.112.0/24")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cli.Delete(ctx, keys.Lease("peer-0000")); err != nil {
		t.Fatal(err)
	}
	delete(want, "peer-0000")
}

// checkNeverHeld fails if any peer set hb received holds node.
func checkNeverHeld(t *testing.T, hb *histBackend, node string) {
	t.Helper()
	hb.mu.Lock()
	defer hb.mu.Unlock()
	for i, set := range hb.sets {
		for _, p := range set {
			if p.Node == node {
				t.Errorf("set %d of %d holds %s", i+1, len(hb.sets), node)
			}
		}
	}
}

// firstSet is the first peer set hb received.
func firstSet(hb *histBackend) map[string]netip.Prefix {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	first := map[string]netip.Prefix{}
	for _, p := range hb.sets[0] {
		first[p.Node] = p.Subnet.V4
	}
	return first
}

// A restarted agent resumes from the lease cache its previous run saved
// (1,200 leases, above cacheMinLeases) and hands the backend exactly etcd's
// current peers: a lease deleted, one changed and one added while it was
// down are right in the very first set, and the deleted one is never in
// any set.
func TestAgentResumesFromLeaseCache(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	keys, record, want := putPeers(t, cli, 1200)
	hb1 := &histBackend{}
	a1 := newIdleAgent(t, srv.ClientURL, "host", "192.168.200.1", hb1)
	ctx1, stop1 := context.WithCancel(context.Background())
	a1.run(ctx1)
	waitPeers(t, hb1, want)
	stop1()
	<-a1.done
	cache := a1.o.LeaseCachePath()
	if _, err := os.Stat(cache); err != nil {
		t.Fatalf("no lease cache saved at exit: %v", err)
	}

	// While the agent is down.
	changePeers(t, cli, keys, record, want)

	hb2 := &histBackend{}
	a2 := newIdleAgent(t, srv.ClientURL, "host", "192.168.200.1", hb2)
	a2.o.SubnetFile = a1.o.SubnetFile // same directory: same cache
	log := testutil.CaptureKlog(t)
	ctx2, stop2 := context.WithCancel(context.Background())
	defer func() { stop2(); <-a2.done }()
	a2.run(ctx2)
	waitPeers(t, hb2, want)
	klog.Flush()
	if l := log.String(); !strings.Contains(l, "starting from the lease cache of the previous run") || strings.Contains(l, "lease cache not usable") {
		t.Errorf("the restarted agent listed every lease instead of resuming from the cache; its log:\n%s", l)
	}
	checkNeverHeld(t, hb2, "peer-0000")
	if got := firstSet(hb2); !mapsEqual(got, want) {
		t.Errorf("first peer set after the restart has %d peers, not etcd's current %d", len(got), len(want))
	}
}

// peerDiff lists the differences between two peer maps, briefly.
func peerDiff(got, want map[string]netip.Prefix) string {
	var d []string
	for n, w := range want {
		if g, ok := got[n]; !ok {
			d = append(d, fmt.Sprintf("missing %s %s", n, w))
		} else if g != w {
			d = append(d, fmt.Sprintf("%s is %s, want %s", n, g, w))
		}
	}
	for n, g := range got {
		if _, ok := want[n]; !ok {
			d = append(d, fmt.Sprintf("extra %s %s", n, g))
		}
	}
	slices.Sort(d)
	if len(d) > 20 {
		d = append(d[:20], fmt.Sprintf("and %d more", len(d)-20))
	}
	return strings.Join(d, "; ")
}
