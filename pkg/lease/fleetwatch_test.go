package lease

import (
	"context"
	"errors"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
)

// countingWatcher counts the events etcd delivers to the watches of one
// client, whether or not the registry makes use of them, and the keys.
type countingWatcher struct {
	clientv3.Watcher
	mu   sync.Mutex
	keys []string
}

func (w *countingWatcher) Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan {
	in := w.Watcher.Watch(ctx, key, opts...)
	out := make(chan clientv3.WatchResponse)
	go func() {
		defer close(out)
		for r := range in {
			w.mu.Lock()
			for _, ev := range r.Events {
				w.keys = append(w.keys, string(ev.Kv.Key))
			}
			w.mu.Unlock()
			select {
			case out <- r:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

func (w *countingWatcher) take() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	k := w.keys
	w.keys = nil
	return k
}

// counted returns a client of srv whose watches count what etcd sends them.
func counted(t *testing.T, url string) (*clientv3.Client, *countingWatcher) {
	t.Helper()
	cli := etcdtest.Client(t, url)
	w := &countingWatcher{Watcher: cli.Watcher}
	cli.Watcher = w
	return cli, w
}

// quiet waits until w got nothing for a second and returns what it got.
func quiet(w *countingWatcher) []string {
	var all []string
	for {
		time.Sleep(time.Second)
		k := w.take()
		if len(k) == 0 {
			return all
		}
		all = append(all, k...)
	}
}

// A join costs each host that watches the prefix one watch event (the
// new record), an expiry one (its deletion), not one per key the joining
// host writes (before: 4 for a dual-stack join, the record, two locks and
// the affinity; 3 for its expiry).
func TestJoinCostsAWatcherOneEvent(t *testing.T) {
	srv, admin := etcdtest.Start(t)
	etcdtest.Put(t, admin, NewKeys("").Config(), `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/32","IPv6SubnetLen":64}`)
	cfg := mustConfig(t, `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/32","IPv6SubnetLen":64}`)
	cliB, counter := counted(t, srv.ClientURL)
	w := startWatch(t, NewRegistry(cliB, ""))
	testutil.Eventually(t, 20*time.Second, "b's first listing", func() bool { w.mu.Lock(); defer w.mu.Unlock(); return w.view.Synced })
	counter.take()

	reg := NewRegistry(admin, "")
	sess := newSession(t, admin, 30)
	if _, err := reg.Acquire(ctxT(t), sess.Lease(), cfg, Claim{Node: "a", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "a in b's view", func() bool { w.mu.Lock(); defer w.mu.Unlock(); return w.view.Records["a"] != nil })
	if got := quiet(counter); len(got) != 1 || got[0] != reg.Keys().Lease("a") {
		t.Errorf("a's join sent b's watch %d events %v; want one, a's record", len(got), got)
	}
	if _, err := admin.Revoke(ctxT(t), sess.Lease()); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "a gone from b's view", func() bool { w.mu.Lock(); defer w.mu.Unlock(); return w.view.Records["a"] == nil })
	if got := quiet(counter); len(got) != 1 {
		t.Errorf("a's expiry sent b's watch %d events %v; want one", len(got), got)
	}
}

// Every kind of key under the prefix is followed one way: the peer watch's
// range holds exactly the kinds the view is built from, and every key a
// claim, an operator's reservation and the config put in etcd is of a
// kind listed in keyKinds. A key kind added to the layout without saying
// how hosts follow it fails here.
func TestWatchCoversEveryKeyKind(t *testing.T) {
	k := NewKeys("")
	start, end := k.PeerRange()
	reg := &Registry{keys: k}
	for _, kind := range keyKinds {
		key := kind.key(k)
		in := key >= start && key < end
		if in != (kind.follow == followPeerRange) {
			t.Errorf("%s key %s: in the peer watch's range [%s, %s) = %v, but it is followed as %d", kind.name, key, start, end, in, kind.follow)
		}
		if !strings.HasPrefix(key, k.Prefix()) {
			t.Errorf("%s key %s is not under %s", kind.name, key, k.Prefix())
		}
	}
	for _, kind := range keyKinds {
		if kind.follow != followPeerRange {
			continue
		}
		ev := &clientv3.Event{Kv: &mvccpb.KeyValue{Key: []byte(kind.key(k)), Value: []byte(`{}`), ModRevision: 1}}
		if _, ok := reg.event(ev); !ok {
			t.Errorf("the peer watch drops events of %s keys", kind.name)
		}
	}

	_, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, k.Config(), `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/32","IPv6SubnetLen":64}`)
	etcdtest.Put(t, cli, k.Reservation("b"), `{"Subnet":"10.7.7.0/24"}`)
	cfg := mustConfig(t, `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/32","IPv6SubnetLen":64}`)
	real := NewRegistry(cli, "")
	for _, node := range []string{"a", "b"} {
		if _, err := real.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), cfg, Claim{Node: node, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := cli.Get(ctxT(t), k.Prefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, kv := range resp.Kvs {
		key := string(kv.Key)
		var kinds []string
		for _, kind := range keyKinds {
			ex := kind.key(k)
			if key == ex || ex != k.Config() && strings.HasPrefix(key, ex[:strings.LastIndexByte(ex, '/')+1]) {
				kinds = append(kinds, kind.name)
			}
		}
		if len(kinds) != 1 {
			t.Errorf("key %s is of kinds %v; want one of keyKinds", key, kinds)
			continue
		}
		seen[kinds[0]] = true
	}
	for _, kind := range keyKinds {
		if !seen[kind.name] {
			t.Errorf("no %s key in etcd after two claims, a reservation and the config", kind.name)
		}
	}
}

// A restart within the TTL that resumes its etcd lease writes nothing:
// the host keeps its subnets and record, and the hosts watching the prefix
// get no event at all (before: the record and the locks moved to a new
// etcd lease, 3 events dual-stack). A lease that expired, was revoked or
// has another TTL is not resumed (ErrLeaseGone): the caller grants anew.
func TestRestartResumingLeaseWritesNothing(t *testing.T) {
	_, cli := etcdtest.Start(t)
	cfg := mustConfig(t, `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/32","IPv6SubnetLen":64}`)
	reg := NewRegistry(cli, "")
	first := newSession(t, cli, 30)
	claim := Claim{Node: "a", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}, BackendType: "vxlan", BackendData: []byte(`{"VtepMAC":"02:00:00:00:00:01"}`)}
	rec, err := reg.Acquire(ctxT(t), first.Lease(), cfg, claim)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	wch := cli.Watch(ctx, reg.Keys().Prefix(), clientv3.WithPrefix(), clientv3.WithRev(rec.ModRev+1))
	first.Orphan() // the agent stops

	again, err := ResumeSession(ctxT(t), cli, first.Lease(), 30*time.Second, 10*time.Second)
	if err != nil {
		t.Fatalf("resuming a live lease: %v", err)
	}
	t.Cleanup(again.Orphan)
	claim.Own = []clientv3.LeaseID{first.Lease()}
	rec2, err := reg.Acquire(ctxT(t), again.Lease(), cfg, claim)
	if err != nil {
		t.Fatal(err)
	}
	if rec2.Subnet != rec.Subnet || rec2.Subnet.V6 != rec.Subnet.V6 || rec2.Lease != int64(first.Lease()) {
		t.Fatalf("the restart moved the host from %v (lease %x) to %v (lease %x)", rec.Subnets(), first.Lease(), rec2.Subnets(), rec2.Lease)
	}
	select {
	case resp := <-wch:
		var keys []string
		for _, ev := range resp.Events {
			keys = append(keys, string(ev.Kv.Key))
		}
		t.Errorf("the restart sent watchers events %v; want none", keys)
	case <-time.After(2 * time.Second):
	}

	// Another TTL (--lease-ttl changed): not resumed.
	if _, err := ResumeSession(ctxT(t), cli, first.Lease(), time.Minute, 10*time.Second); !errors.Is(err, ErrLeaseGone) {
		t.Errorf("resuming with another TTL: %v, want ErrLeaseGone", err)
	}
	// A dead lease: not resumed; a new grant claims the same subnets.
	again.Orphan()
	if _, err := cli.Revoke(ctxT(t), first.Lease()); err != nil {
		t.Fatal(err)
	}
	if s, err := ResumeSession(ctxT(t), cli, first.Lease(), 30*time.Second, 10*time.Second); !errors.Is(err, ErrLeaseGone) {
		if s != nil {
			s.Orphan()
		}
		t.Fatalf("resuming a revoked lease: %v, want ErrLeaseGone", err)
	}
	fresh := newSession(t, cli, 30)
	rec3, err := reg.Acquire(ctxT(t), fresh.Lease(), cfg, claim)
	if err != nil {
		t.Fatal(err)
	}
	if rec3.Subnet != rec.Subnet || rec3.Subnet.V6 != rec.Subnet.V6 || rec3.Lease != int64(fresh.Lease()) {
		t.Errorf("after the lease expired the host got %v under %x; want %v under the new lease %x", rec3.Subnets(), rec3.Lease, rec.Subnets(), fresh.Lease())
	}
}

// WatchLocks reports a deletion and a rewrite of a host's own lock, and
// after a compaction the lock's current state.
func TestWatchLocks(t *testing.T) {
	_, cli := etcdtest.Start(t)
	cfg := mustConfig(t, `{"Network":"10.0.0.0/8"}`)
	reg := NewRegistry(cli, "")
	sess := newSession(t, cli, 30)
	rec, err := reg.Acquire(ctxT(t), sess.Lease(), cfg, Claim{Node: "a", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}})
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan Batch)
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	go reg.WatchLocks(ctx, rec.Subnets(), rec.ModRev+1, ch)
	next := func() Event {
		t.Helper()
		select {
		case b := <-ch:
			if len(b.Events) != 1 {
				t.Fatalf("batch %+v, want one event", b)
			}
			return b.Events[0]
		case <-time.After(20 * time.Second):
			t.Fatal("no event")
		}
		return Event{}
	}
	lock := reg.Keys().SubnetLock(rec.Subnet.V4)
	if _, err := cli.Delete(ctxT(t), lock); err != nil {
		t.Fatal(err)
	}
	if e := next(); e.Kind != LockDelete || e.Subnet != rec.Subnet.V4 || e.ModRev <= rec.ModRev {
		t.Errorf("after the delete: %+v", e)
	}
	if _, err := cli.Put(ctxT(t), reg.Keys().Lease("unrelated"), "x"); err != nil {
		t.Fatal(err)
	}
	put, err := cli.Put(ctxT(t), lock, "intruder")
	if err != nil {
		t.Fatal(err)
	}
	if e := next(); e.Kind != LockPut || e.Node != "intruder" || e.ModRev != put.Header.Revision {
		t.Errorf("after the rewrite: %+v", e)
	}

	// From a compacted revision: the state now.
	if _, err := cli.Compact(ctxT(t), put.Header.Revision); err != nil {
		t.Fatal(err)
	}
	ch2 := make(chan Batch)
	go reg.WatchLocks(ctx, rec.Subnets(), rec.ModRev+1, ch2)
	select {
	case b := <-ch2:
		if e := b.Events[0]; len(b.Events) != 1 || e.Kind != LockPut || e.Node != "intruder" || e.ModRev != put.Header.Revision {
			t.Errorf("after a compaction: %+v", b)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("nothing after a compaction")
	}
}

// A lease whose first renewal is answered late (etcd unreachable for
// longer than the client's dial timeout + 1 s, as in a join storm that
// loads the cluster, but not for the TTL) is not lost: before, the etcd
// client gave up on it after dial timeout + 1 s and the host claimed
// again, adding to the storm.
func TestSessionSurvivesLateFirstRenewal(t *testing.T) {
	srv, admin := etcdtest.Start(t)
	p := etcdtest.Proxy(t, strings.TrimPrefix(srv.ClientURL, "http://"))
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{p.Addr().String()}, DialTimeout: time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	if _, err := cli.Get(ctxT(t), "x"); err != nil { // connected
		t.Fatal(err)
	}
	g, err := admin.Grant(ctxT(t), 30)
	if err != nil {
		t.Fatal(err)
	}
	granted := time.Now()
	p.SetDown(true) // the first renewal goes unanswered
	s, err := keepAlive(context.Background(), cli, g.ID, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Orphan)
	time.Sleep(4 * time.Second) // past the client's first-renewal deadline (2 s)
	p.SetDown(false)
	select {
	case <-s.Done():
		t.Fatal("the session ended though its lease has 25 s left")
	case <-time.After(8 * time.Second):
	}
	ttl, err := admin.TimeToLive(ctxT(t), g.ID)
	if left := 30 - int64(time.Since(granted).Seconds()); err != nil || ttl.TTL <= left+1 {
		t.Errorf("the lease was not renewed after etcd answered again: %d s left, %d s without renewals (%v)", ttl.TTL, left, err)
	}
}
