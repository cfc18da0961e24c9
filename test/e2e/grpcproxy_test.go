package e2e

import (
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil/etcdtest"
)

// Real agents whose only way to etcd is an etcd gRPC proxy in front of a
// 3-member cluster (the deployment of Documentation/scale.md): they claim
// subnets, see each other through the proxy's watch, and containers on
// different hosts reach each other; an agent restarted through the proxy
// takes its subnet back and traffic flows again.
func TestConnectivityThroughGRPCProxy(t *testing.T) {
	dir := t.TempDir()
	c, err := etcdserver.StartBinaryCluster(dir, 3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	p := etcdtest.GRPCProxy(t, "proxy", filepath.Join(dir, "proxy"), c.Endpoints(), etcdserver.ProxyTLS{})
	l := up(t, lab.Config{Hosts: 3, Backend: "host-gw", EtcdEndpoints: []string{p.ClientURL}})
	check := func(when string) {
		t.Helper()
		for _, cell := range l.Matrix(ctx(t), 10*time.Second) {
			if cell.Err != nil {
				t.Errorf("%s: %s → %s (%s): %v", when, cell.From.Name, cell.To.Name, cell.Dst, cell.Err)
			}
		}
	}
	check("through the proxy")
	// The records are in the cluster itself, not only in the proxy.
	member, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer member.Close()
	rows, err := member.Get(ctx(t), "/leased/network/leases/", clientv3WithPrefix())
	if err != nil || len(rows.Kvs) != 3 {
		t.Fatalf("lease records in the cluster behind the proxy: %v, %v; want 3", rows, err)
	}
	h := l.Hosts[0]
	key := "/leased/network/leases/" + h.Name
	old, err := member.Get(ctx(t), key)
	if err != nil || len(old.Kvs) != 1 {
		t.Fatalf("%s: %v, %v", key, old, err)
	}
	if err := l.StopAgent(h, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgent(h); err != nil {
		t.Fatal(err)
	}
	// The restarted agent resumes its etcd lease through the proxy
	// (TimeToLive, keep-alive) and keeps its subnet; its claim writes
	// nothing: the record is the very one it left.
	deadline := time.Now().Add(60 * time.Second)
	resumedAndReady := func() bool {
		log := l.LogTail(h, 200)
		i := strings.LastIndex(log, "resuming the etcd lease of this host's previous run")
		return i >= 0 && strings.Contains(log[i:], `"ready"`)
	}
	for !resumedAndReady() {
		if time.Now().After(deadline) {
			t.Fatalf("the restarted agent did not resume its etcd lease and get ready within 60s; its log:\n%s", l.LogTail(h, 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
	cur, err := member.Get(ctx(t), key)
	if err != nil || len(cur.Kvs) != 1 || cur.Kvs[0].Lease != old.Kvs[0].Lease || cur.Kvs[0].ModRevision != old.Kvs[0].ModRevision {
		t.Errorf("after a restart through the proxy the record is %v (%v), want the one before, unchanged: %v", cur.Kvs, err, old.Kvs)
	}
	check("after an agent restart through the proxy")
}
