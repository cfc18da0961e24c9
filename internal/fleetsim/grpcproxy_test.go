package fleetsim

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/pkg/lease"
)

// startProxied starts a 3-member cluster of the etcd binary and n gRPC
// proxies in front of it; both are stopped when the test ends.
func startProxied(t *testing.T, n int) (*etcdserver.BinaryCluster, []*etcdserver.Proc) {
	t.Helper()
	dir := t.TempDir()
	c, err := etcdserver.StartBinaryCluster(dir, 3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	var ps []*etcdserver.Proc
	for i := range n {
		name := fmt.Sprintf("proxy%d", i)
		p, err := etcdserver.StartGRPCProxy(name, filepath.Join(dir, name), c.Endpoints(), etcdserver.ProxyTLS{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("--- %s ---\n%s", name, lastLines(p.Log(), 20))
			}
			p.Stop()
		})
		ps = append(ps, p)
	}
	return c, ps
}

func lastLines(s string, n int) string {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '\n' {
			if n--; n < 0 {
				return s[i+1:]
			}
		}
	}
	return s
}

// The same fleet, its hosts spread over two etcd gRPC proxies: claims
// (transactions), keep-alives and the prefix watch all go through the
// proxies, and the invariants hold as they do without them.
func TestFleetThroughGRPCProxies(t *testing.T) {
	c, ps := startProxied(t, 2)
	o := Options{AdminEndpoints: c.Endpoints()}
	for _, p := range ps {
		o.Endpoints = append(o.Endpoints, p.ClientURL)
	}
	runFleet(t, o)
}

// A watch through a proxy that was away while etcd compacted the
// revisions it had not seen yet lists again and ends with the current
// leases: the one deleted meanwhile is gone, the one added is there.
func TestWatchThroughGRPCProxyAfterCompaction(t *testing.T) {
	c, ps := startProxied(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	admin, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ps[0].ClientURL}, DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	keys := lease.NewKeys("")
	rec := func(node string, third int) string {
		return fmt.Sprintf(`{"Node":%q,"Subnet":"10.0.%d.0/24","PublicIP":"172.16.0.%d","BackendType":"host-gw"}`, node, third, third)
	}
	mustPut := func(k, v string) {
		t.Helper()
		if _, err := admin.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	mustPut(keys.Config(), `{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"host-gw"}}`)
	mustPut(keys.Lease("a"), rec("a", 1))

	batches := make(chan lease.Batch)
	go lease.NewRegistry(cli, "").Watch(ctx, batches) //nolint:errcheck // returns ctx.Err()
	var view lease.View
	next := func() {
		t.Helper()
		select {
		case b := <-batches:
			view.Apply(b)
		case <-ctx.Done():
			t.Fatalf("no batch from the watch through the proxy; the view holds %v", view.Records)
		}
	}
	next()
	if view.Records["a"] == nil {
		t.Fatalf("the first listing through the proxy lacks a: %v", view.Records)
	}

	ps[0].Stop()
	if _, err := admin.Delete(ctx, keys.Lease("a")); err != nil {
		t.Fatal(err)
	}
	mustPut(keys.Lease("b"), rec("b", 2))
	for i := range 20 {
		mustPut(keys.Node("filler"), fmt.Sprint(i))
	}
	resp, err := admin.Get(ctx, keys.Config())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	if err := ps[0].Restart(); err != nil {
		t.Fatal(err)
	}
	for view.Records["a"] != nil || view.Records["b"] == nil {
		next()
	}
	if len(view.Records) != 1 {
		t.Errorf("after the compaction the view holds %d records, want only b: %v", len(view.Records), view.Records)
	}
}
