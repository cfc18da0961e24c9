package lease

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/testutil/etcdtest"
)

// watcher runs Registry.Watch into a View that the test can inspect.
type watcher struct {
	mu     sync.Mutex
	view   View
	n      int // batches applied
	resets int
	cached int // Reset batches a lease cache stood for
}

func startWatch(t *testing.T, reg *Registry) *watcher {
	return startFollowing(t, func(ctx context.Context, ch chan<- Batch) { reg.Watch(ctx, ch) })
}

// startFollowing runs follow (Watch or one of its variants) until the test
// ends and applies what it sends to the watcher's view.
func startFollowing(t *testing.T, follow func(context.Context, chan<- Batch)) *watcher {
	w := &watcher{}
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan Batch)
	done := make(chan struct{})
	go func() { defer close(done); follow(ctx, ch) }()
	go func() {
		for {
			select {
			case b := <-ch:
				w.mu.Lock()
				w.view.Apply(b)
				w.n++
				if b.Reset {
					w.resets++
				}
				if b.FromCache {
					w.cached++
				}
				w.mu.Unlock()
			case <-ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return w
}

// waitFor polls cond on the view for up to 15s.
func (w *watcher) waitFor(t *testing.T, what string, cond func(v *View) bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		w.mu.Lock()
		ok := cond(&w.view)
		w.mu.Unlock()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			w.mu.Lock()
			defer w.mu.Unlock()
			var recs []string
			for n, r := range w.view.Records {
				recs = append(recs, n+"="+r.Subnet.V4.String())
			}
			t.Fatalf("timed out waiting for %s; view has %d records %v, config %q", what, len(w.view.Records), recs, w.view.Config)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func putRecord(t *testing.T, cli *clientv3.Client, reg *Registry, node, subnet string) {
	t.Helper()
	v := fmt.Sprintf(`{"Node":%q,"Subnet":%q,"PublicIP":"192.0.2.%d","BackendType":"host-gw"}`, node, subnet, len(node))
	etcdtest.Put(t, cli, reg.Keys().Lease(node), v)
}

func TestWatchListsThenFollowsAndSurvivesRestart(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	reg := NewRegistry(cli, "")
	putRecord(t, cli, reg, "a", "10.100.1.0/24")
	w := startWatch(t, reg)
	w.waitFor(t, "initial listing", func(v *View) bool { return v.Synced && v.Config == nil && v.Records["a"] != nil })

	// Missing config, then put: the watch delivers it.
	cli.Put(ctxT(t), reg.Keys().Config(), `{"Network":"10.100.0.0/16"}`)
	w.waitFor(t, "config", func(v *View) bool { return string(v.Config) == `{"Network":"10.100.0.0/16"}` })

	// Malformed leases are reported, not used.
	cli.Put(ctxT(t), reg.Keys().Lease("bad"), `{not json`)
	cli.Put(ctxT(t), reg.Keys().Lease("liar"), `{"Node":"someone-else","Subnet":"10.100.9.0/24"}`)
	w.waitFor(t, "malformed leases", func(v *View) bool {
		return v.Malformed["bad"] != nil && v.Malformed["liar"] != nil && v.Records["bad"] == nil && v.Records["liar"] == nil
	})

	// etcd restarts; changes after the restart still arrive.
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	putRecord(t, cli, reg, "b", "10.100.2.0/24")
	cli.Delete(ctxT(t), reg.Keys().Lease("a"))
	w.waitFor(t, "changes after an etcd restart", func(v *View) bool { return v.Records["b"] != nil && v.Records["a"] == nil })
}

// While the watcher is cut off, leases change and etcd compacts past its
// revision: on reconnect it lists again and ends with exactly etcd's state.
func TestWatchRelistsAfterCompaction(t *testing.T) {
	srv, direct := etcdtest.Start(t)
	p := etcdtest.Proxy(t, srv.ClientURL[len("http://"):])
	cut := etcdtest.Client(t, "http://"+p.Addr().String())
	reg := NewRegistry(direct, "")
	for i := range 5 {
		putRecord(t, direct, reg, fmt.Sprintf("n%d", i), fmt.Sprintf("10.100.%d.0/24", i))
	}
	w := startWatch(t, NewRegistry(cut, ""))
	w.waitFor(t, "initial listing", func(v *View) bool { return len(v.Records) == 5 })

	p.SetDown(true)
	direct.Delete(ctxT(t), reg.Keys().Lease("n0"))
	direct.Delete(ctxT(t), reg.Keys().Lease("n1"))
	putRecord(t, direct, reg, "n2", "10.100.42.0/24") // changed
	putRecord(t, direct, reg, "n9", "10.100.9.0/24")  // added
	resp, err := direct.Put(ctxT(t), "/unrelated", "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := direct.Compact(ctxT(t), resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	p.SetDown(false)

	w.waitFor(t, "relist after compaction", func(v *View) bool {
		r2 := v.Records["n2"]
		return len(v.Records) == 4 && v.Records["n0"] == nil && v.Records["n1"] == nil &&
			r2 != nil && r2.Subnet.V4 == netip.MustParsePrefix("10.100.42.0/24") && v.Records["n9"] != nil
	})
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.resets < 2 {
		t.Errorf("%d listings, want a second one after the compaction", w.resets)
	}
}

// A large initial listing arrives whole: every record once.
func TestWatchListsManyPages(t *testing.T) {
	_, cli := etcdtest.Start(t)
	reg := NewRegistry(cli, "")
	n := 9000
	fillLeases(t, cli, reg, n)
	w := startWatch(t, reg)
	w.waitFor(t, "all records", func(v *View) bool { return v.Synced && len(v.Records) == n })
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.view.Records["filler-00000"] == nil || w.view.Records[fmt.Sprintf("filler-%05d", n-1)] == nil {
		t.Error("first or last record missing")
	}
}

// List decodes every record at one revision: the well-formed ones exactly
// as DecodeRecord does with their create revision and etcd lease, the
// malformed ones with the reason, and the config with its mod revision.
func TestListDecodesEveryRecord(t *testing.T) {
	_, cli := etcdtest.Start(t)
	reg := NewRegistry(cli, "")
	fillLeases(t, cli, reg, 9000)
	ctx := ctxT(t)
	for key, val := range map[string]string{
		reg.Keys().Config():          benchConfig,
		reg.Keys().Lease("bad"):      `{`,
		reg.Keys().Lease("liar"):     `{"Node":"other","Subnet":"10.9.0.0/24"}`,
		reg.Keys().Lease("-invalid"): `{"Node":"-invalid","Subnet":"10.9.1.0/24"}`,
		reg.Keys().Lease("zz-last"):  `{"Node":"zz-last","Subnet":"10.9.2.0/24","PublicIP":"192.0.2.9","BackendData":{"a":[1]}}`,
	} {
		if _, err := cli.Put(ctx, key, val); err != nil {
			t.Fatal(err)
		}
	}
	v, err := reg.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, reg.Keys().Prefix(), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if !v.Synced || v.Rev == 0 || string(v.Config) != benchConfig || len(v.Records) != 9001 || len(v.Malformed) != 3 {
		t.Fatalf("view: synced %v rev %d, config %q, %d records, malformed %v", v.Synced, v.Rev, v.Config, len(v.Records), v.Malformed)
	}
	for _, kv := range resp.Kvs {
		key := string(kv.Key)
		if key == reg.Keys().Config() {
			if v.ConfigRev != kv.ModRevision {
				t.Errorf("ConfigRev %d, want the config key's mod revision %d", v.ConfigRev, kv.ModRevision)
			}
			continue
		}
		node, ok := strings.CutPrefix(key, reg.Keys().Leases())
		if !ok {
			continue
		}
		want, werr := DecodeRecord(node, kv.Value)
		if node == "-invalid" {
			werr = ValidNodeName(node)
		}
		switch got := v.Records[node]; {
		case werr != nil:
			if got != nil || v.Malformed[node] == nil || !strings.Contains(v.Malformed[node].Error(), werr.Error()) {
				t.Errorf("%s: listed %+v, malformed %v; want refused: %v", node, got, v.Malformed[node], werr)
			}
		case got == nil:
			t.Errorf("%s: not listed (malformed: %v)", node, v.Malformed[node])
		default:
			want.Rev, want.Lease = kv.CreateRevision, kv.Lease
			if recordString(got) != recordString(want) {
				t.Errorf("%s: listed %+v, want %+v", node, got, want)
			}
		}
	}
}

// Listing works against an etcd with authentication on, with the
// client's credentials, and not without.
func TestListWithAuthentication(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	reg := NewRegistry(cli, "")
	fillLeases(t, cli, reg, 9000)
	ctx := ctxT(t)
	for _, step := range []func() error{
		func() error { _, err := cli.RoleAdd(ctx, "root"); return err },
		func() error { _, err := cli.UserAdd(ctx, "root", "rootpw"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := cli.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	anon := etcdtest.Client(t, srv.ClientURL)
	authed, err := clientv3.New(clientv3.Config{Endpoints: []string{srv.ClientURL}, Username: "root", Password: "rootpw", Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer authed.Close()
	if v, err := NewRegistry(anon, "").List(ctx); err == nil {
		t.Fatalf("a client without credentials listed %d leases of an etcd with authentication on", len(v.Records))
	}
	v, err := NewRegistry(authed, "").List(ctx)
	if err != nil || len(v.Records) != 9000 {
		t.Fatalf("listing with credentials: %v", err)
	}
}

// recordString formats r.
func recordString(r *Record) string { return fmt.Sprint(*r) }
