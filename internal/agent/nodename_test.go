package agent

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/lease"
)

// recordOf returns node's lease record in etcd and the etcd lease it is
// under (nil, 0 when there is none).
func recordOf(t *testing.T, cli *clientv3.Client, node string) (*lease.Record, int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, lease.NewKeys("").Lease(node))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0
	}
	rec, err := lease.DecodeRecord(node, resp.Kvs[0].Value)
	if err != nil {
		t.Fatal(err)
	}
	return rec, resp.Kvs[0].Lease
}

// startTestAgentIn is startTestAgent with the subnet file (and so the lease
// file next to it) at SubnetFile: another run on the same machine.
func startTestAgentIn(t *testing.T, endpoint, node, ip, subnetFile string) *testAgent {
	t.Helper()
	rec := &recorder{}
	ia := newIdleAgent(t, endpoint, node, ip, rec)
	ia.o.SubnetFile = subnetFile
	ctx, cancel := context.WithCancel(context.Background())
	ia.run(ctx)
	ta := &testAgent{agent: ia.agent, rec: rec, cancel: cancel, done: ia.done}
	t.Cleanup(ta.stop)
	return ta
}

func (r *recorder) started() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.starts)
}

// Two live hosts given one node name (cloned machines): the second never
// takes the first one's subnet. It says why in STATUS=//readyz (503),
// naming the first host's public address, starts no datapath and writes no
// subnet.env; the first keeps its keys. When the first host is gone for
// good (its lease ended), the second one claims.
func TestAgentsWithOneNodeNameNeverShareSubnet(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`)
	a1 := startTestAgent(t, srv.ClientURL, "twin", "192.168.1.1")
	testutil.Eventually(t, 20*time.Second, "first host's subnet.env", func() bool { _, err := a1.env(t); return err == nil })
	env1, _ := a1.env(t)
	_, lease1 := recordOf(t, cli, "twin")

	a2 := startTestAgent(t, srv.ClientURL, "twin", "192.168.1.2")
	testutil.Eventually(t, 20*time.Second, "the second host reports the conflict", func() bool {
		s := a2.health.statusText()
		return strings.Contains(s, "node name conflict") && strings.Contains(s, "192.168.1.1") && strings.Contains(s, "--node-name")
	})
	// Give it time to do anything wrong.
	time.Sleep(2 * time.Second)
	if a2.health.ready.Load() {
		t.Error("/readyz of the second host says ready")
	}
	if _, err := a2.env(t); err == nil {
		t.Error("the second host wrote a subnet.env")
	}
	if n := a2.rec.started(); n != 0 {
		t.Errorf("the second host started its datapath %d times", n)
	}
	if rec, l := recordOf(t, cli, "twin"); rec == nil || l != lease1 || rec.PublicIP.V4.String() != "192.168.1.1" || rec.Subnet.V4 != env1.Subnet.V4 {
		t.Fatalf("the first host's record changed: %+v under %x", rec, l)
	}
	if !a1.health.ready.Load() {
		t.Error("the first host is no longer ready")
	}

	// The first host goes away for good: its lease ends.
	a1.stop()
	if _, err := cli.Revoke(context.Background(), clientv3.LeaseID(lease1)); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "the second host claims", func() bool {
		rec, _ := recordOf(t, cli, "twin")
		_, err := a2.env(t)
		return err == nil && rec != nil && rec.PublicIP.V4.String() == "192.168.1.2" && a2.health.ready.Load()
	})
}

// Two hosts with one node name that start at the same moment: one holds
// the name, the other reports the conflict; they never both run a datapath.
func TestAgentsWithOneNodeNameStartTogether(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","SubnetLen":22}`)
	recs := []*recorder{{}, {}}
	agents := []*idleAgent{
		newIdleAgent(t, srv.ClientURL, "twin", "192.168.1.1", recs[0]),
		newIdleAgent(t, srv.ClientURL, "twin", "192.168.1.2", recs[1]),
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		for _, a := range agents {
			<-a.done
		}
	})
	for _, a := range agents {
		a.run(ctx)
	}
	testutil.Eventually(t, 20*time.Second, "one host ready, the other reporting the conflict", func() bool {
		for i := range 2 {
			if agents[i].health.ready.Load() && strings.Contains(agents[1-i].health.statusText(), "node name conflict") {
				return true
			}
		}
		return false
	})
	time.Sleep(2 * time.Second)
	if recs[0].started() > 0 && recs[1].started() > 0 {
		t.Fatal("both hosts started a datapath")
	}
	ready := 0
	for _, a := range agents {
		if _, err := subnetEnvOf(a); err == nil {
			ready++
		}
	}
	if ready != 1 {
		t.Fatalf("%d hosts wrote a subnet.env, want 1", ready)
	}
}

// A restarted agent on the same machine keeps its subnets at once, with
// its lease file (an ordinary restart) and without it (the first start
// after a reboot or an upgrade), as long as the record names this host's
// address. An ordinary restart within the TTL resumes the previous run's
// etcd lease and writes nothing: another host watching the prefix gets no
// event (before: the record and the locks moved to a new lease, 3
// events). When the previous lease is gone, the restart grants a new one
// and keeps its subnets all the same.
func TestAgentRestartKeepsSubnet(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`)
	a := startTestAgent(t, srv.ClientURL, "h", "192.168.1.1")
	testutil.Eventually(t, 20*time.Second, "subnet.env", func() bool { _, err := a.env(t); return err == nil })
	env0, _ := a.env(t)
	dir := a.o.SubnetFile
	for _, tc := range []struct {
		name      string
		keepFile  bool
		killLease bool // the previous run's lease expired meanwhile
	}{{"restart", true, false}, {"first start since boot", false, false}, {"previous lease expired", true, true}} {
		_, before := recordOf(t, cli, "h")
		a.stop()
		if !tc.keepFile {
			if err := os.Remove(a.o.OwnLeasesFile()); err != nil {
				t.Fatal(err)
			}
		}
		if tc.killLease {
			if _, err := cli.Revoke(context.Background(), clientv3.LeaseID(before)); err != nil {
				t.Fatal(err)
			}
		}
		// What another host watching the prefix gets from the restart.
		cur, err := cli.Get(context.Background(), cfgKey)
		if err != nil {
			t.Fatal(err)
		}
		wctx, wcancel := context.WithCancel(context.Background())
		wch := cli.Watch(wctx, lease.NewKeys("").Prefix(), clientv3.WithPrefix(), clientv3.WithRev(cur.Header.Revision+1))
		a = startTestAgentIn(t, srv.ClientURL, "h", "192.168.1.1", dir) // same machine
		resumes := tc.keepFile && !tc.killLease
		testutil.Eventually(t, 20*time.Second, tc.name+": ready with the record under the expected lease", func() bool {
			rec, l := recordOf(t, cli, "h")
			return rec != nil && (l == before) == resumes && a.health.ready.Load()
		})
		if env, err := a.env(t); err != nil || env != env0 {
			t.Fatalf("%s: subnet.env %+v (%v), want %+v", tc.name, env, err, env0)
		}
		if s := a.health.statusText(); strings.Contains(s, "conflict") {
			t.Fatalf("%s: %s", tc.name, s)
		}
		if resumes {
			select {
			case resp := <-wch:
				var keys []string
				for _, ev := range resp.Events {
					keys = append(keys, string(ev.Kv.Key))
				}
				t.Errorf("%s: a watcher of the prefix got events %v; want none", tc.name, keys)
			case <-time.After(2 * time.Second):
			}
		}
		wcancel()
	}
}

// A host whose own record is rewritten under another etcd lease (another
// host with its node name) stops serving and reports the conflict; it never
// writes over the other record. A host whose subnet lock is taken by
// another node stops advertising that subnet: it moves to another one.
func TestAgentNoticesOverwrittenKeys(t *testing.T) {
	t.Run("record", func(t *testing.T) {
		srv, cli := etcdtest.Start(t)
		etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16"}`)
		a := startTestAgent(t, srv.ClientURL, "a", "192.168.1.1")
		testutil.Eventually(t, 20*time.Second, "subnet.env", func() bool { _, err := a.env(t); return err == nil })
		env, _ := a.env(t)
		g, err := cli.Grant(context.Background(), 60)
		if err != nil {
			t.Fatal(err)
		}
		foreign := `{"Node":"a","Subnet":"` + env.Subnet.V4.String() + `","PublicIP":"192.168.1.9","BackendType":"host-gw"}`
		if _, err := cli.Put(context.Background(), lease.NewKeys("").Lease("a"), foreign, clientv3.WithLease(g.ID)); err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, 20*time.Second, "the conflict reported", func() bool {
			s := a.health.statusText()
			return strings.Contains(s, "node name conflict") && strings.Contains(s, "192.168.1.9") && !a.health.ready.Load()
		})
		time.Sleep(time.Second)
		if rec, l := recordOf(t, cli, "a"); rec == nil || l != int64(g.ID) || rec.PublicIP.V4.String() != "192.168.1.9" {
			t.Fatalf("the other host's record was replaced: %+v under %x", rec, l)
		}
	})
	t.Run("lock", func(t *testing.T) {
		srv, cli := etcdtest.Start(t)
		etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16"}`)
		a := startTestAgent(t, srv.ClientURL, "a", "192.168.1.1")
		testutil.Eventually(t, 20*time.Second, "subnet.env", func() bool { _, err := a.env(t); return err == nil })
		env, _ := a.env(t)
		g, err := cli.Grant(context.Background(), 60)
		if err != nil {
			t.Fatal(err)
		}
		lock := lease.NewKeys("").SubnetLock(env.Subnet.V4)
		if _, err := cli.Put(context.Background(), lock, "intruder", clientv3.WithLease(g.ID)); err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, 20*time.Second, "the record no longer names the lost subnet", func() bool {
			rec, _ := recordOf(t, cli, "a")
			return rec != nil && rec.Subnet.V4.IsValid() && rec.Subnet.V4 != env.Subnet.V4
		})
		resp, err := cli.Get(context.Background(), lock)
		if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "intruder" {
			t.Fatalf("the intruder's lock was replaced: %v %v", resp, err)
		}
	})
}
