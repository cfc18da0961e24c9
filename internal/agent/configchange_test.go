package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
)

// startHinted starts a test agent whose subnet.env of an earlier run named
// hint, so that it claims hint (when free) as a restarted host does.
func startHinted(t *testing.T, endpoint, node, ip, hint string) *testAgent {
	t.Helper()
	rec := &recorder{}
	return startHintedWith(t, endpoint, node, ip, hint, rec, rec)
}

func startHintedWith(t *testing.T, endpoint, node, ip, hint string, rec *recorder, be backend.Backend) *testAgent {
	t.Helper()
	ia := newIdleAgent(t, endpoint, node, ip, be)
	ia.lease.hint = subnetenv.Env{Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix(hint)}}
	ctx, cancel := context.WithCancel(context.Background())
	ia.run(ctx)
	ta := &testAgent{agent: ia.agent, rec: rec, cancel: cancel, done: ia.done}
	t.Cleanup(ta.stop)
	testutil.Eventually(t, 20*time.Second, node+" holds "+hint, func() bool {
		env, err := ta.env(t)
		return err == nil && env.Subnet.V4.String() == hint
	})
	return ta
}

// Narrowing Network from /16 to /17 while a host holds a subnet in the
// upper half is refused by every host: the host in the lower half keeps its
// route to the upper one (before, it adopted the /17 and dropped the upper
// half's routes while the upper host refused). Once the upper host is
// drained, its lease gone, the lower host adopts the /17 on its own.
func TestAgentsRefuseConfigThatStrandsAPeer(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16"}`)
	low := startHinted(t, srv.ClientURL, "low", "192.168.1.1", "10.100.1.0/24")
	high := startHinted(t, srv.ClientURL, "high", "192.168.1.2", "10.100.200.0/24")
	testutil.Eventually(t, 20*time.Second, "low routes to high", func() bool { return low.rec.peerNodes() == "high" })
	testutil.Eventually(t, 20*time.Second, "high routes to low", func() bool { return high.rec.peerNodes() == "low" })

	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/17"}`)
	time.Sleep(2 * time.Second)
	for _, a := range []*testAgent{low, high} {
		env, err := a.env(t)
		if err != nil || env.Network.V4.String() != "10.100.0.0/16" {
			t.Errorf("%s: subnet.env %+v (%v), want the network to stay 10.100.0.0/16", a.node, env, err)
		}
	}
	if got := low.rec.peerNodes(); got != "high" {
		t.Fatalf("low programs peers %q after the refused narrowing, want high", got)
	}

	// Drain high: stop it and let its lease go.
	high.stop()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, lease.NewKeys("").Lease("high"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("high's lease record: %v %v", resp, err)
	}
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "low adopts the /17 once high is gone", func() bool {
		env, err := low.env(t)
		return err == nil && env.Network.V4.String() == "10.100.0.0/17" && env.Subnet.V4.String() == "10.100.1.0/24"
	})
}

// A host whose lease keys vanish (it re-claims) while a config that leaves
// out its subnet arrives refuses that config and keeps its subnet: the
// datapath still serves it. Before, the check was skipped while re-claiming
// and the host moved to another subnet.
func TestAgentRefusesConfigWhileReclaiming(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16"}`)
	a := startHinted(t, srv.ClientURL, "a", "192.168.1.1", "10.100.200.0/24")
	env0, _ := a.env(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	k := lease.NewKeys("")
	// One transaction, so that the agent sees the loss and the config together.
	if _, err := cli.Txn(ctx).Then(
		clientv3.OpDelete(k.Lease("a")),
		clientv3.OpDelete(k.SubnetLock(env0.Subnet.V4)),
		clientv3.OpPut(cfgKey, `{"Network":"10.100.0.0/17"}`),
	).Commit(); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "a's record back", func() bool {
		r, err := cli.Get(ctx, k.Lease("a"))
		return err == nil && len(r.Kvs) == 1
	})
	time.Sleep(time.Second)
	r, _ := cli.Get(ctx, k.Lease("a"))
	var rec lease.Record
	if err := json.Unmarshal(r.Kvs[0].Value, &rec); err != nil || rec.Subnet.V4 != env0.Subnet.V4 {
		t.Errorf("a re-claimed %s (%v), want its subnet %s", rec.Subnet.V4, err, env0.Subnet.V4)
	}
	if env, _ := a.env(t); env != env0 {
		t.Errorf("subnet.env changed from %+v to %+v", env0, env)
	}
}

// A config rewritten with other formatting (`leased config get | leased
// config put -`, or etcdctl with the keys in another order) changes
// nothing on the host: no peer pass, no backend rebuild or restart (the
// backend takes deltas, so a step without a change hands it nothing).
func TestAgentIgnoresReformattedConfig(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","Backend":{"Type":"host-gw"}}`)
	rec := &recorder{}
	a := startHintedWith(t, srv.ClientURL, "a", "192.168.1.1", "10.100.1.0/24", rec, rec)
	etcdtest.Put(t, cli, lease.NewKeys("").Lease("b"), `{"Node":"b","Subnet":"10.100.2.0/24","PublicIP":"192.168.1.2","BackendType":"host-gw"}`)
	testutil.Eventually(t, 20*time.Second, "a routes to b", func() bool { return a.rec.peerNodes() == "b" })
	time.Sleep(500 * time.Millisecond)
	a.rec.mu.Lock()
	applied, starts := a.rec.applied, len(a.rec.starts)
	a.rec.mu.Unlock()

	etcdtest.Put(t, cli, cfgKey, "{\n  \"Backend\": { \"Type\": \"host-gw\" },\n  \"Network\": \"10.100.0.0/16\",\n  \"SubnetLen\": 24\n}\n")
	time.Sleep(2 * time.Second)
	a.rec.mu.Lock()
	defer a.rec.mu.Unlock()
	if a.rec.applied != applied || len(a.rec.starts) != starts {
		t.Errorf("a reformatted config made the agent hand over peers %d more times and restart the backend %d times",
			a.rec.applied-applied, len(a.rec.starts)-starts)
	}
}

// openFDs counts the process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	des, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(des)
}

// A backend rebuilt for new options (here the vxlan VNI, ten times) is
// closed: the agent's open file descriptors do not grow with the rebuilds
// (before, each rebuild left its netlink handle and route socket open
// until the garbage collector found them).
// The backend is the real one, in a network namespace of its own.
func TestAgentRebuildsBackendWithoutLeaking(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.UplinkNS(t, "fd", "192.0.2.1/24")
	nsPath := testutil.NSPath(ns)
	h := testutil.NSHandle(t, ns)
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	vni := func() int {
		l, err := h.LinkByName(backend.VXLANDev4)
		if vx, ok := l.(*netlink.Vxlan); err == nil && ok {
			return vx.VxlanId
		}
		return 0
	}

	srv, cli := etcdtest.Start(t)
	cfg := func(n int) string {
		return fmt.Sprintf(`{"Network":"10.100.0.0/16","Backend":{"Type":"vxlan","VNI":%d}}`, n)
	}
	etcdtest.Put(t, cli, cfgKey, cfg(1))
	o := &Options{EtcdEndpoints: srv.ClientURL, EtcdPrefix: lease.DefaultPrefix, LeaseTTL: 10 * time.Second,
		SubnetFile: filepath.Join(t.TempDir(), "subnet.env")}
	addr := netip.MustParseAddr("192.0.2.1")
	ext := backend.ExtIface{V4: backend.ExtLink{Name: "eth0", Index: eth0.Attrs().Index, MTU: 1500, Addr: addr, Public: addr, HardwareAddr: eth0.Attrs().HardwareAddr}}
	a := newAgent(o, cli, ext, "fd")
	a.dp.newBackend = func(raw json.RawMessage, ext backend.ExtIface, node string, bo backend.Options) (backend.Backend, error) {
		bo.NetNS = nsPath
		return backend.New(raw, ext, node, bo)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); a.run(ctx) }() //nolint:errcheck // returns nil
	t.Cleanup(func() { cancel(); <-done })

	testutil.Eventually(t, 20*time.Second, "the vxlan device with VNI 1", func() bool { return vni() == 1 })
	testutil.Eventually(t, 20*time.Second, "subnet.env", func() bool { _, err := subnetenv.Read(o.SubnetFile); return err == nil })
	time.Sleep(500 * time.Millisecond) // let the first backend's subscriptions open
	// The netlink sockets are *os.File: the garbage collector would close
	// a leaked one some time later. Handles must be released when the
	// backend is replaced, so the collector stays off while counting.
	runtime.GC()
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	base := openFDs(t)
	for n := 2; n <= 11; n++ {
		etcdtest.Put(t, cli, cfgKey, cfg(n))
		testutil.Eventually(t, 20*time.Second, fmt.Sprintf("the vxlan device with VNI %d", n), func() bool { return vni() == n })
	}
	// The old backends close once their loops have ended; a few
	// descriptors of slack for the etcd client and the runtime.
	const slack = 3
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := openFDs(t)
		if got <= base+slack {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("open file descriptors grew from %d to %d across ten backend rebuilds", base, got)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
