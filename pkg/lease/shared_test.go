package lease

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/etcdserver"
)

// publishView lists etcd's leases with a watch and publishes the view as
// the shared cache under a new session's lease, replacing the cache with
// header mod revision prev.
func publishView(t *testing.T, reg *Registry, sess *Session, prev int64) (*View, bool) {
	t.Helper()
	w := startWatch(t, reg)
	w.waitFor(t, "listing", func(v *View) bool { return v.Synced })
	w.mu.Lock()
	defer w.mu.Unlock()
	data, err := EncodeSnapshot(reg.Keys().Prefix(), &w.view)
	if err != nil {
		t.Fatal(err)
	}
	ok, err := reg.PublishSharedCache(ctxT(t), sess.Lease(), "n0", data, prev)
	if err != nil {
		t.Fatal(err)
	}
	return &w.view, ok
}

// followShared starts a watcher as a host without a cache of its own does
// (WatchFromShared).
func followShared(t *testing.T, reg *Registry) *watcher {
	t.Helper()
	return startFollowing(t, func(ctx context.Context, ch chan<- Batch) { reg.WatchFromShared(ctx, ch) })
}

// putRecords writes records n<lo>… n<hi-1>, each with its own /24 of
// 10.0.0.0/8, 100 per transaction.
func putRecords(t *testing.T, cli *clientv3.Client, reg *Registry, lo, hi int) {
	t.Helper()
	var ops []clientv3.Op
	for i := lo; i < hi; i++ {
		node := fmt.Sprintf("n%d", i)
		ops = append(ops, clientv3.OpPut(reg.Keys().Lease(node),
			fmt.Sprintf(`{"Node":%q,"Subnet":"10.%d.%d.0/24","PublicIP":"192.0.2.1","BackendType":"host-gw"}`, node, i/256, i%256)))
		if len(ops) == 100 || i == hi-1 {
			if _, err := cli.Txn(ctxT(t)).Then(ops...).Commit(); err != nil {
				t.Fatal(err)
			}
			ops = ops[:0]
		}
	}
}

// A host without a cache of its own starts from the shared cache and ends
// with exactly etcd's state: leases deleted, changed, added and turned
// malformed since the cache was written are as etcd has them, in the
// first batch. The cache is outside the agents' watch, it goes away with
// its writer's etcd lease, and without it (or below 1,000 leases) the host
// lists.
func TestSharedCacheResume(t *testing.T) {
	_, cli := startEtcd(t)
	reg := NewRegistry(cli, "")
	k := reg.Keys()
	key, end := k.watchRange()
	watched := func(s string) bool { return key <= s && s < end }
	for _, s := range []string{k.Config(), k.Lease("n0"), k.Reservation("n0"), k.SubnetLock(netip.MustParsePrefix("10.100.0.0/24")),
		k.SubnetLock(netip.MustParsePrefix("2001:db8::/64"))} {
		if !watched(s) {
			t.Errorf("the agents' watch [%s, %s) misses %s", key, end, s)
		}
	}
	for _, s := range []string{k.SharedCacheHeader(), k.SharedCacheParts("0000000000000000") + "0", k.SharedCacheParts("ffffffffffffffff") + "99"} {
		if watched(s) {
			t.Errorf("the agents' watch [%s, %s) carries the shared cache's %s", key, end, s)
		}
	}
	if _, _, err := reg.FetchSharedCache(ctxT(t)); !IsNoSharedCache(err) {
		t.Fatalf("empty etcd: %v, want no shared cache", err)
	}
	const n = SharedCacheMinLeases
	putRecords(t, cli, reg, 0, n-1)
	cli.Put(ctxT(t), k.Config(), `{"Network":"10.0.0.0/8"}`)
	sess := newSession(t, cli, 60)
	// Below SharedCacheMinLeases, a host lists.
	if _, ok := publishView(t, reg, sess, 0); !ok {
		t.Fatal("shared cache not written")
	}
	w0 := followShared(t, reg)
	w0.waitFor(t, "listing", func(v *View) bool { return len(v.Records) == n-1 })
	putRecords(t, cli, reg, n-1, n)
	h, _ := reg.ReadSharedCacheHeader(ctxT(t))
	if _, ok := publishView(t, reg, sess, h.ModRev); !ok {
		t.Fatal("shared cache not replaced")
	}

	cli.Delete(ctxT(t), k.Lease("n0"))
	putRecord(t, cli, reg, "n1", "10.100.41.0/24")
	putRecord(t, cli, reg, "x9", "10.100.9.0/24")
	cli.Put(ctxT(t), k.Lease("n4"), `{"Node":"n4","Subnet":"not a subnet"}`)
	cli.Put(ctxT(t), k.Config(), `{"Network":"10.0.0.0/8","SubnetLen":25}`)

	w := followShared(t, reg)
	w.waitFor(t, "state from the shared cache equals etcd", func(v *View) bool {
		r1 := v.Records["n1"]
		return len(v.Records) == n-1 && v.Records["n0"] == nil && r1 != nil && r1.Subnet == netip.MustParsePrefix("10.100.41.0/24") &&
			v.Records["x9"] != nil && v.Records["n4"] == nil && v.Malformed["n4"] != nil && string(v.Config) == `{"Network":"10.0.0.0/8","SubnetLen":25}`
	})
	w.mu.Lock()
	if w.resets != 1 || w.n != 1 || w.cached != 1 {
		t.Errorf("%d batches (%d resets, %d from the cache); want the cache, caught up, as one batch", w.n, w.resets, w.cached)
	}
	w.mu.Unlock()
	w0.mu.Lock()
	if w0.cached != 0 {
		t.Errorf("a host started from a shared cache of %d leases", n-1)
	}
	w0.mu.Unlock()
	// The running watch follows etcd as before.
	w0.waitFor(t, "the changes", func(v *View) bool { return v.Records["x9"] != nil && v.Records["n0"] == nil })

	// The cache belongs to its writer's lease.
	if _, err := cli.Revoke(ctxT(t), sess.Lease()); err != nil {
		t.Fatal(err)
	}
	if _, _, err := reg.FetchSharedCache(ctxT(t)); !IsNoSharedCache(err) {
		t.Errorf("after the writer's lease was revoked: %v, want no shared cache", err)
	}
	if gens, _ := reg.sharedCacheGens(ctxT(t)); len(gens) != 0 {
		t.Errorf("parts left after the writer's lease was revoked: %v", gens)
	}
	w2 := followShared(t, reg)
	w2.waitFor(t, "listing without a shared cache", func(v *View) bool { return len(v.Records) == n-1 && v.Malformed["n4"] != nil })
	w2.mu.Lock()
	if w2.cached != 0 {
		t.Error("started from a shared cache that is gone")
	}
	w2.mu.Unlock()
}

// Writers replace the cache with a compare-and-swap on its header: of two
// writers racing, one wins and the other's parts are removed; a writer
// with a stale header loses; a winner removes every other generation,
// also the parts a crashed writer left.
func TestSharedCacheWriters(t *testing.T) {
	_, cli := startEtcd(t)
	reg := NewRegistry(cli, "")
	k := reg.Keys()
	for i := range 3 {
		putRecord(t, cli, reg, fmt.Sprintf("n%d", i), fmt.Sprintf("10.100.%d.0/24", i))
	}
	s1, s2 := newSession(t, cli, 60), newSession(t, cli, 60)
	w := startWatch(t, reg)
	w.waitFor(t, "listing", func(v *View) bool { return len(v.Records) == 3 })
	w.mu.Lock()
	data, err := EncodeSnapshot(k.Prefix(), &w.view)
	w.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	var wins [2]bool
	var wg sync.WaitGroup
	for i, s := range []*Session{s1, s2} {
		wg.Go(func() {
			ok, err := reg.PublishSharedCache(ctxT(t), s.Lease(), fmt.Sprintf("w%d", i), data, 0)
			if err != nil {
				t.Error(err)
			}
			wins[i] = ok
		})
	}
	wg.Wait()
	if wins[0] == wins[1] {
		t.Fatalf("racing writers: wins %v, want exactly one", wins)
	}
	checkGens := func(what string) SharedCacheHeader {
		t.Helper()
		h, err := reg.ReadSharedCacheHeader(ctxT(t))
		if err != nil || h.ModRev == 0 {
			t.Fatalf("%s: header %+v, %v", what, h, err)
		}
		if gens, _ := reg.sharedCacheGens(ctxT(t)); !slices.Equal(gens, []string{h.Gen}) {
			t.Errorf("%s: generations %v in etcd, want only the header's %s", what, gens, h.Gen)
		}
		if _, _, err := reg.FetchSharedCache(ctxT(t)); err != nil {
			t.Errorf("%s: %v", what, err)
		}
		return h
	}
	h := checkGens("after the race")

	// A writer that read no header (or an old one) loses.
	if ok, err := reg.PublishSharedCache(ctxT(t), s1.Lease(), "late", data, 0); ok || err != nil {
		t.Errorf("writer with a stale header: won %v, %v", ok, err)
	}
	checkGens("after a stale writer")

	// Parts a crashed writer left, before and after the current
	// generation, go with the next cache.
	for _, gen := range []string{"0000000000000000", "ffffffffffffffff"} {
		cli.Put(ctxT(t), k.SharedCacheParts(gen)+"0", "orphan")
	}
	if ok, err := reg.PublishSharedCache(ctxT(t), s2.Lease(), "w1", data, h.ModRev); !ok || err != nil {
		t.Fatalf("writer with the current header: won %v, %v", ok, err)
	}
	if h2 := checkGens("after a replacement"); h2.Gen == h.Gen || h2.Node != "w1" || h2.Leases != 3 {
		t.Errorf("replacement header %+v (previous gen %s)", h2, h.Gen)
	}
}

// A cache that is damaged, incomplete, or from another etcd cluster,
// prefix or etcd's future is refused with a message that says which.
func TestSharedCacheRefused(t *testing.T) {
	_, cli := startEtcd(t)
	reg := NewRegistry(cli, "")
	k := reg.Keys()
	putRecord(t, cli, reg, "n0", "10.100.0.0/24")
	sess := newSession(t, cli, 60)
	v, _ := publishView(t, reg, sess, 0)
	h, _ := reg.ReadSharedCacheHeader(ctxT(t))
	part := k.SharedCacheParts(h.Gen) + "0"
	resp, _ := cli.Get(ctxT(t), part)
	good := resp.Kvs[0].Value

	refused := func(what, want string) {
		t.Helper()
		_, _, err := reg.FetchSharedCache(ctxT(t))
		if err == nil || !strings.Contains(err.Error(), want) || IsNoSharedCache(err) {
			t.Errorf("%s: %v, want an error saying %q", what, err, want)
		}
	}
	damaged := append([]byte(nil), good...)
	damaged[len(damaged)-1] ^= 1
	cli.Put(ctxT(t), part, string(damaged))
	refused("a flipped bit", "damaged")
	cli.Put(ctxT(t), part, string(good[:len(good)-1]))
	refused("a short part", "bytes, its header says")
	cli.Delete(ctxT(t), part)
	refused("a missing part", "has 0 of its 1 parts")
	cli.Put(ctxT(t), k.SharedCacheHeader(), "{")
	refused("a broken header", "not valid JSON")

	for _, c := range []struct {
		what, want string
		prefix     string
		edit       func(*View)
	}{
		{"another prefix", `is for prefix "/other/"`, "/other/", func(*View) {}},
		{"another cluster", "from etcd cluster", k.Prefix(), func(v *View) { v.ClusterID++ }},
		{"etcd's future", "after etcd's", k.Prefix(), func(v *View) { v.Rev += 1000 }},
	} {
		v2 := *v
		c.edit(&v2)
		data, err := EncodeSnapshot(c.prefix, &v2)
		if err != nil {
			t.Fatal(err)
		}
		h, _ := reg.ReadSharedCacheHeader(ctxT(t))
		if ok, err := reg.PublishSharedCache(ctxT(t), sess.Lease(), "n0", data, h.ModRev); !ok || err != nil {
			t.Fatalf("%s: publish %v %v", c.what, ok, err)
		}
		refused(c.what, c.want)
	}
}

// The first host by name keeps the cache, in networks large enough; it
// rewrites it when it is missing, when many leases came or went, or when
// it is a day old and anything changed, and never more often than every
// ten minutes.
func TestSharedCachePolicy(t *testing.T) {
	v := &View{Synced: true, Rev: 5000, Records: map[string]*Record{}}
	for i := range SharedCacheMinLeases {
		v.Records[fmt.Sprintf("host-%04d", i)] = &Record{Rev: int64(1000 + i)}
	}
	if !SharedCacheWriter("host-0000", v) || SharedCacheWriter("host-0001", v) || SharedCacheWriter("absent", v) {
		t.Error("the writer is the first host by name that holds a lease")
	}
	delete(v.Records, "host-0999")
	if SharedCacheWriter("host-0000", v) {
		t.Error("a network of fewer than SharedCacheMinLeases leases has no writer")
	}
	v.Records["host-0999"] = &Record{Rev: 1999}

	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	cur := SharedCacheHeader{ModRev: 10, Rev: 2999, Leases: SharedCacheMinLeases} // holds every lease
	for _, c := range []struct {
		what string
		h    SharedCacheHeader
		want bool
	}{
		{"none", SharedCacheHeader{}, true},
		{"current, as old as can be", with(cur, func(h *SharedCacheHeader) { h.Rev, h.Written = 5000, now.Add(-48*time.Hour) }), false},
		{"nothing changed, a day old", with(cur, func(h *SharedCacheHeader) { h.Written = now.Add(-48 * time.Hour) }), false},
		{"600 leases newer, 20 minutes old", with(cur, func(h *SharedCacheHeader) { h.Rev, h.Leases, h.Written = 1399, 400, now.Add(-20*time.Minute) }), true},
		{"600 leases newer, 5 minutes old", with(cur, func(h *SharedCacheHeader) { h.Rev, h.Leases, h.Written = 1399, 400, now.Add(-5*time.Minute) }), false},
		{"600 leases gone, 20 minutes old", with(cur, func(h *SharedCacheHeader) { h.Leases, h.Written = 1600, now.Add(-20*time.Minute) }), true},
		{"one lease newer, an hour old", with(cur, func(h *SharedCacheHeader) { h.Rev, h.Leases, h.Written = 1998, 999, now.Add(-time.Hour) }), false},
		{"one lease newer, a day old", with(cur, func(h *SharedCacheHeader) { h.Rev, h.Leases, h.Written = 1998, 999, now.Add(-25*time.Hour) }), true},
	} {
		if got, why := SharedCacheDue(v, c.h, now); got != c.want {
			t.Errorf("%s: due %v (%s), want %v", c.what, got, why, c.want)
		}
	}
}

func with(h SharedCacheHeader, edit func(*SharedCacheHeader)) SharedCacheHeader {
	edit(&h)
	return h
}

// The shared cache works the same against Debian's etcd 3.4, which has
// no RangeStream and reads every value for a keys-only listing.
func TestSharedCacheOnOlderEtcd(t *testing.T) {
	ext, err := etcdserver.StartBinary(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ext.Stop)
	cli := newClientAt(t, ext.ClientURL)
	reg := NewRegistry(cli, "")
	putRecords(t, cli, reg, 0, SharedCacheMinLeases)
	if _, ok := publishView(t, reg, newSession(t, cli, 60), 0); !ok {
		t.Fatal("shared cache not written")
	}
	cli.Delete(ctxT(t), reg.Keys().Lease("n0"))
	putRecord(t, cli, reg, "x9", "10.100.9.0/24")
	w := followShared(t, NewRegistry(newClientAt(t, ext.ClientURL), ""))
	w.waitFor(t, "state from the shared cache equals etcd", func(v *View) bool {
		return len(v.Records) == SharedCacheMinLeases && v.Records["n0"] == nil && v.Records["x9"] != nil
	})
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n != 1 || w.cached != 1 {
		t.Errorf("%d batches, %d from the cache; want the cache, caught up, as one batch", w.n, w.cached)
	}
}

// A shared cache is written by another host: whatever bytes it holds, the
// parser never panics, and every lease it yields passes the same checks as
// a record from etcd.
func FuzzParseSnapshot(f *testing.F) {
	v := &View{Synced: true, ClusterID: 7, Rev: 42, Config: []byte(`{"Network":"10.0.0.0/8"}`), Records: map[string]*Record{
		"a": {Node: "a", Subnet: netip.MustParsePrefix("10.1.0.0/24"), PublicIP: netip.MustParseAddr("192.0.2.1"), BackendType: "host-gw", Rev: 5},
		"b": {Node: "b", IPv6Subnet: netip.MustParsePrefix("2001:db8:1::/64"), BackendType: "vxlan", BackendData: []byte(`{"VtepMAC":"02:00:00:00:00:03"}`), Rev: 9},
	}}
	data, err := EncodeSnapshot("/leased/network/", v)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(data)
	f.Add([]byte("{}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, decode, err := parseSnapshot(data, "fuzz")
		if err != nil {
			return
		}
		b := decode()
		if b.Rev != h.Rev || !b.Reset || len(b.base) > h.Leases {
			t.Fatalf("batch rev %d reset %v with %d leases from a header of rev %d and %d leases", b.Rev, b.Reset, len(b.base), h.Rev, h.Leases)
		}
		for node, r := range b.base {
			if r.Node != node || r.checkShape(node) != nil {
				t.Fatalf("lease %q decoded as %+v", node, r)
			}
		}
	})
}
