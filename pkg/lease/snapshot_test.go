package lease

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// startWatchFrom is startWatch for a snapshot batch.
func startWatchFrom(t *testing.T, reg *Registry, start Batch) *watcher {
	w := &watcher{}
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan Batch)
	done := make(chan struct{})
	go func() { defer close(done); reg.WatchFrom(ctx, start, ch) }()
	go func() {
		for {
			select {
			case b := <-ch:
				w.mu.Lock()
				w.view.Apply(b)
				if b.Reset {
					w.resets++
				}
				if w.view.Records["n0"] != nil { // deleted before the resume
					w.n++
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

// A restarted agent resumes from its saved lease set and ends with exactly
// etcd's state, including changes made while it was down; after a
// compaction past the snapshot it lists afresh.
func TestSnapshotResume(t *testing.T) {
	_, cli := startEtcd(t)
	reg := NewRegistry(cli, "")
	for i := range 5 {
		putRecord(t, cli, reg, fmt.Sprintf("n%d", i), fmt.Sprintf("10.100.%d.0/24", i))
	}
	cli.Put(ctxT(t), reg.Keys().Config(), `{"Network":"10.100.0.0/16"}`)
	w := startWatch(t, reg)
	w.waitFor(t, "listing", func(v *View) bool { return len(v.Records) == 5 && v.Config != nil })
	path := filepath.Join(t.TempDir(), "leases.cache")
	w.mu.Lock()
	err := SaveSnapshot(path, reg.Keys().Prefix(), &w.view)
	w.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}

	// While "down": one lease goes, one changes, one arrives, the config changes.
	cli.Delete(ctxT(t), reg.Keys().Lease("n0"))
	putRecord(t, cli, reg, "n1", "10.100.41.0/24")
	putRecord(t, cli, reg, "n9", "10.100.9.0/24")
	cli.Put(ctxT(t), reg.Keys().Config(), `{"Network":"10.100.0.0/16","SubnetLen":25}`)

	h, start, err := LoadSnapshot(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reg.Usable(ctxT(t), h) {
		t.Fatal("snapshot of this cluster and prefix not usable")
	}
	if NewRegistry(cli, "/other").Usable(ctxT(t), h) {
		t.Error("snapshot usable under another prefix")
	}
	w2 := startWatchFrom(t, reg, start)
	w2.waitFor(t, "resumed state equals etcd", func(v *View) bool {
		r1, r9 := v.Records["n1"], v.Records["n9"]
		return len(v.Records) == 5 && v.Records["n0"] == nil && r1 != nil && r1.Subnet == netip.MustParsePrefix("10.100.41.0/24") &&
			r9 != nil && string(v.Config) == `{"Network":"10.100.0.0/16","SubnetLen":25}`
	})
	w2.mu.Lock()
	if w2.resets != 1 || w2.n != 0 {
		t.Errorf("%d resets, %d batches showing a lease deleted before the resume; want one caught-up batch", w2.resets, w2.n)
	}
	w2.mu.Unlock()

	// Compaction past the snapshot: the watch lists again.
	resp, _ := cli.Put(ctxT(t), "/unrelated", "x")
	if _, err := cli.Compact(ctxT(t), resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	cli.Delete(ctxT(t), reg.Keys().Lease("n2"))
	w3 := startWatchFrom(t, reg, start)
	w3.waitFor(t, "relisted state equals etcd", func(v *View) bool {
		return len(v.Records) == 4 && v.Records["n2"] == nil && v.Records["n9"] != nil
	})
	time.Sleep(100 * time.Millisecond)
	w3.mu.Lock()
	defer w3.mu.Unlock()
	if w3.resets != 1 {
		t.Errorf("%d resets, want one listing (the snapshot cannot catch up)", w3.resets)
	}
}
