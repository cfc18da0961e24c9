package lease

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/testutil/etcdtest"
)

// startWatchFrom is startWatch from the snapshot saved at path
// (OpenSnapshot, WatchFromSnapshot, as the agent starts).
func startWatchFrom(t *testing.T, reg *Registry, path string) *watcher {
	t.Helper()
	h, decode, err := OpenSnapshot(path)
	if err != nil {
		t.Fatal(err)
	}
	w := &watcher{}
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan Batch)
	done := make(chan struct{})
	go func() { defer close(done); reg.WatchFromSnapshot(ctx, h, decode, ch) }()
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

// listAndSave writes n leases n0... and a config, lists them with a watch
// and saves the view as a snapshot, whose path it returns.
func listAndSave(t *testing.T, cli *clientv3.Client, reg *Registry, n int) string {
	t.Helper()
	for i := range n {
		putRecord(t, cli, reg, fmt.Sprintf("n%d", i), fmt.Sprintf("10.100.%d.0/24", i))
	}
	cli.Put(ctxT(t), reg.Keys().Config(), `{"Network":"10.100.0.0/16"}`)
	w := startWatch(t, reg)
	w.waitFor(t, "listing", func(v *View) bool { return len(v.Records) == n && v.Config != nil })
	path := filepath.Join(t.TempDir(), "leases.cache")
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := SaveSnapshot(path, reg.Keys().Prefix(), &w.view); err != nil {
		t.Fatal(err)
	}
	return path
}

// A restarted agent resumes from its saved lease set and ends with exactly
// etcd's state, including changes made while it was down, also after etcd
// compacted past the snapshot's revision.
func TestSnapshotResume(t *testing.T) {
	_, cli := etcdtest.Start(t)
	reg := NewRegistry(cli, "")
	path := listAndSave(t, cli, reg, 5)

	// While "down": one lease goes, one changes, one arrives, one turns
	// malformed, the config changes.
	cli.Delete(ctxT(t), reg.Keys().Lease("n0"))
	putRecord(t, cli, reg, "n1", "10.100.41.0/24")
	putRecord(t, cli, reg, "n9", "10.100.9.0/24")
	cli.Put(ctxT(t), reg.Keys().Lease("n4"), `{"Node":"n4","Subnet":"not a subnet"}`)
	cli.Put(ctxT(t), reg.Keys().Config(), `{"Network":"10.100.0.0/16","SubnetLen":25}`)

	h, _, err := OpenSnapshot(path)
	if err != nil {
		t.Fatal(err)
	}
	// A cache in another format, or with none, is refused with a message
	// that says so.
	for _, head := range []string{`{"format":1,"clusterID":1,"prefix":"/leased/network/","revision":5}`, `{"clusterID":1,"prefix":"/leased/network/","revision":5}`} {
		oldPath := filepath.Join(t.TempDir(), "old.cache")
		os.WriteFile(oldPath, []byte(head+"\n5 0 n1 {}\n"), 0o644)
		if _, _, err := OpenSnapshot(oldPath); err == nil || !strings.Contains(err.Error(), ", this leased reads format 2") {
			t.Errorf("cache with header %s: %v", head, err)
		}
	}
	if !reg.Usable(ctxT(t), h) {
		t.Fatal("snapshot of this cluster and prefix not usable")
	}
	if NewRegistry(cli, "/other").Usable(ctxT(t), h) {
		t.Error("snapshot usable under another prefix")
	}
	w2 := startWatchFrom(t, reg, path)
	w2.waitFor(t, "resumed state equals etcd", func(v *View) bool {
		r1, r9 := v.Records["n1"], v.Records["n9"]
		return len(v.Records) == 4 && v.Records["n0"] == nil && r1 != nil && r1.Subnet.V4 == netip.MustParsePrefix("10.100.41.0/24") &&
			r9 != nil && v.Records["n4"] == nil && v.Malformed["n4"] != nil && string(v.Config) == `{"Network":"10.100.0.0/16","SubnetLen":25}`
	})
	w2.mu.Lock()
	if w2.resets != 1 || w2.n != 0 {
		t.Errorf("%d resets, %d batches showing a lease deleted before the resume; want one caught-up batch", w2.resets, w2.n)
	}
	w2.mu.Unlock()

	// Compaction past the snapshot: the cache still applies.
	resp, _ := cli.Put(ctxT(t), "/unrelated", "x")
	if _, err := cli.Compact(ctxT(t), resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	cli.Delete(ctxT(t), reg.Keys().Lease("n2"))
	w3 := startWatchFrom(t, reg, path)
	w3.waitFor(t, "resumed state equals etcd after a compaction", func(v *View) bool {
		return len(v.Records) == 3 && v.Records["n2"] == nil && v.Records["n9"] != nil && v.Malformed["n4"] != nil
	})
	time.Sleep(100 * time.Millisecond)
	w3.mu.Lock()
	defer w3.mu.Unlock()
	if w3.resets != 1 {
		t.Errorf("%d resets, want one caught-up batch", w3.resets)
	}
}

// Every record shape survives the binary cache encoding unchanged, and a
// record that checkShape refuses is never decoded.
func TestSnapshotRecordRoundTrip(t *testing.T) {
	acq := time.Date(2026, 11, 30, 22, 31, 4, 123456789, time.UTC)
	for _, r := range []Record{
		{Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.1.2.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}, BackendType: "host-gw", Rev: 7, Lease: 0x1234567890},
		{Node: "b-6only", Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8:cd11:0:8000::/80")}, PublicIP: ipfam.Pair[netip.Addr]{V6: netip.MustParseAddr("2001:db8::1")}, BackendType: "proxy-ndp", Acquired: acq},
		{Node: "c.dual", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.1.3.0/24"), V6: netip.MustParsePrefix("2001:db8:1::/64")},
			PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.3"), V6: netip.MustParseAddr("2001:db8::3")}, BackendType: "vxlan",
			BackendData: json.RawMessage(`{"VtepMAC":"02:00:00:00:00:03"}`), Acquired: acq.In(time.FixedZone("", 3600)), Rev: 1 << 40, Lease: -1},
		{Node: "d", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.1.4.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.4")}, BackendType: "some-future-type"},
	} {
		var got Record
		if !decodeSnapshotRecord(appendSnapshotRecord(nil, &r), &got) {
			t.Errorf("%s: not decoded", r.Node)
			continue
		}
		if !got.Acquired.Equal(r.Acquired) {
			t.Errorf("%s: Acquired %v, want %v", r.Node, got.Acquired, r.Acquired)
		}
		got.Acquired, r.Acquired = time.Time{}, time.Time{}
		if fmt.Sprint(got) != fmt.Sprint(r) {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, r)
		}
	}
	bad := Record{Node: "e", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.1.5.7/24")}, BackendType: "host-gw"} // not a network address
	if decodeSnapshotRecord(appendSnapshotRecord(nil, &bad), new(Record)) {
		t.Error("a record with an unmasked subnet was decoded")
	}
}

// A damaged cache never panics the decoder, and whatever it decodes passes
// the same checks as a record from etcd.
func FuzzDecodeSnapshotRecord(f *testing.F) {
	r := Record{Node: "c", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.1.3.0/24"), V6: netip.MustParsePrefix("2001:db8:1::/64")},
		PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.3")}, BackendType: "vxlan", BackendData: json.RawMessage(`{"VtepMAC":"02:00:00:00:00:03"}`),
		Acquired: time.Unix(1e9, 5)}
	f.Add(appendSnapshotRecord(nil, &r))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		var got Record
		if !decodeSnapshotRecord(data, &got) {
			return
		}
		if err := got.checkShape(got.Node); err != nil {
			t.Fatalf("decoded a record that fails checkShape: %v", err)
		}
		var again Record
		if !decodeSnapshotRecord(appendSnapshotRecord(nil, &got), &again) || fmt.Sprint(again) != fmt.Sprint(got) {
			t.Fatalf("re-encoding changed the record:\n%+v\n%+v", got, again)
		}
	})
}

// Against an etcd before 3.7 (Debian's 3.4, as its own process), which has
// no RangeStream and reads values for keys-only ranges: the listing falls
// back to one transaction, and the resume from a snapshot still ends with
// exactly etcd's state. (A catch-up that watched from the snapshot's
// revision and trusted etcd's progress notification failed here: etcd
// 3.4.23 answers a progress request at once, before the watcher has caught
// up — etcd issue 15220, fixed in 3.4.24 and 3.5.8.)
func TestListAndResumeOnOlderEtcd(t *testing.T) {
	ext, err := etcdserver.StartBinary(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ext.Stop)
	if strings.HasPrefix(ext.Version, "3.7") || strings.HasPrefix(ext.Version, "3.8") {
		t.Fatalf("etcd binary is %s; this test needs one before 3.7 (Debian's etcd-server)", ext.Version)
	}
	cli := etcdtest.Client(t, ext.ClientURL)
	reg := NewRegistry(cli, "")
	path := listAndSave(t, cli, reg, 3)
	cli.Delete(ctxT(t), reg.Keys().Lease("n0"))
	putRecord(t, cli, reg, "n1", "10.100.41.0/24")
	putRecord(t, cli, reg, "n9", "10.100.9.0/24")

	resumed := NewRegistry(etcdtest.Client(t, ext.ClientURL), "")
	w2 := startWatchFrom(t, resumed, path)
	w2.waitFor(t, "resumed state equals etcd", func(v *View) bool {
		r1 := v.Records["n1"]
		return len(v.Records) == 3 && v.Records["n0"] == nil && r1 != nil && r1.Subnet.V4 == netip.MustParsePrefix("10.100.41.0/24") && v.Records["n9"] != nil
	})
	w2.mu.Lock()
	defer w2.mu.Unlock()
	if w2.resets != 1 || w2.n != 0 {
		t.Errorf("%d resets, %d batches showing a deleted lease; want one caught-up batch", w2.resets, w2.n)
	}
}

// A lease cache file can be damaged (a full disk, a crash mid-write, an
// operator's edit): whatever bytes it holds, the parser never panics, and
// every lease it yields passes the same checks as a record from etcd.
func FuzzParseSnapshot(f *testing.F) {
	v := &View{Synced: true, ClusterID: 7, Rev: 42, Config: []byte(`{"Network":"10.0.0.0/8"}`), Records: map[string]*Record{
		"a": {Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.1.0.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}, BackendType: "host-gw", Rev: 5},
		"b": {Node: "b", Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8:1::/64")}, BackendType: "vxlan", BackendData: []byte(`{"VtepMAC":"02:00:00:00:00:03"}`), Rev: 9},
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
