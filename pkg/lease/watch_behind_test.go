package lease

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/testutil/etcdtest"
)

// recv takes the next batch from ch, failing the test after a generous wait.
func recv(t *testing.T, ch <-chan Batch, what string) Batch {
	t.Helper()
	select {
	case b := <-ch:
		return b
	case <-time.After(60 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		return Batch{}
	}
}

// A watch that fell behind gets the changes since in responses of at most
// 1,000 revisions, each stamped with etcd's current revision. A lease cache
// saved after the first of them must stand for what was applied only: the
// next run, resuming from it, ends with etcd's state (here, a peer's moved
// PublicIP), not with the state of 1,000 changes ago.
func TestLeaseCacheSavedBehindResumesEveryChange(t *testing.T) {
	srv, direct := etcdtest.Start(t)
	p := etcdtest.Proxy(t, strings.TrimPrefix(srv.ClientURL, "http://"))
	reg := NewRegistry(etcdtest.Client(t, "http://"+p.Addr().String()), "")
	rec := func(ip string) string {
		return fmt.Sprintf(`{"Node":"h1","Subnet":"10.100.1.0/24","PublicIP":%q,"BackendType":"host-gw"}`, ip)
	}
	if _, err := direct.Put(ctxT(t), reg.Keys().Config(), `{"Network":"10.100.0.0/16"}`); err != nil {
		t.Fatal(err)
	}
	if _, err := direct.Put(ctxT(t), reg.Keys().Lease("h1"), rec("192.0.2.1")); err != nil {
		t.Fatal(err)
	}

	// The first run: the listing, then cut off from etcd while the peer's
	// record changes 1,500 times; the last change moves it to 198.51.100.7.
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan Batch)
	done := make(chan struct{})
	go func() { defer close(done); reg.Watch(ctx, ch) }()
	t.Cleanup(func() { cancel(); <-done })
	var v View
	v.Apply(recv(t, ch, "the listing"))
	p.SetDown(true)
	const changes = 1500
	for i := range changes {
		ip := fmt.Sprintf("192.0.2.%d", 2+i%200)
		if i == changes-1 {
			ip = "198.51.100.7"
		}
		if _, err := direct.Put(ctxT(t), reg.Keys().Lease("h1"), rec(ip)); err != nil {
			t.Fatal(err)
		}
	}
	p.SetDown(false)
	// It applies the first batch after the reconnect and stops (as an
	// agent stopped then would), saving its lease cache.
	b := recv(t, ch, "the first batch after the reconnect")
	if len(b.Events) >= changes {
		t.Fatalf("etcd sent all %d changes in one response; the test needs a watch that gets them in parts", len(b.Events))
	}
	v.Apply(b)
	cancel()
	<-done
	path := filepath.Join(t.TempDir(), "leases.cache")
	if err := SaveSnapshot(path, reg.Keys().Prefix(), &v); err != nil {
		t.Fatal(err)
	}

	// The next run starts from that cache.
	h, decode, err := OpenSnapshot(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx2, cancel2 := context.WithCancel(context.Background())
	ch2 := make(chan Batch)
	done2 := make(chan struct{})
	go func() { defer close(done2); NewRegistry(direct, "").WatchFromSnapshot(ctx2, h, decode, ch2) }()
	t.Cleanup(func() { cancel2(); <-done2 })
	var v2 View
	first := recv(t, ch2, "the batch the cache stands for")
	if !first.FromCache {
		t.Fatalf("the next run listed instead of resuming from the cache; the test needs the resumed path")
	}
	v2.Apply(first)
	want := netip.MustParseAddr("198.51.100.7")
	if r := v2.Records["h1"]; r == nil || r.PublicIP.V4 != want {
		t.Errorf("resumed from a cache saved %d changes behind: h1 = %+v, want PublicIP %s (etcd's)", changes-len(b.Events), r, want)
	}
}
