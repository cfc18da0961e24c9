package lease

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/atomicfile"
	"github.com/leased/leased/pkg/metrics"
)

// A snapshot is a View saved to disk so that a restarted agent can start
// from it instead of reading every lease value from etcd again; the
// catch-up with etcd (WatchFromSnapshot) reads only what changed since, so
// the result is exactly the current state. It is only used for the same
// etcd cluster and prefix.
//
// Format: a first line of JSON (SnapshotHeader), then one frame per lease:
// its length (uvarint) and the lease (see appendSnapshotRecord). Binary,
// because decoding 50,000 leases as JSON took 36 ms of the restart; the
// header stays readable to tell what a file is.

// snapshotFormat is the format SaveSnapshot writes; other formats are not
// read (the agent lists instead, once).
const snapshotFormat = 2

// SnapshotHeader identifies what a snapshot belongs to.
type SnapshotHeader struct {
	Format    int             `json:"format"`
	ClusterID uint64          `json:"clusterID"`
	Prefix    string          `json:"prefix"`
	Rev       int64           `json:"revision"`
	Config    json.RawMessage `json:"config,omitempty"`
	// Leases is the number of leases in the file (counted when read, not saved).
	Leases int `json:"-"`
}

// SaveSnapshot writes v atomically to path, mode 0600 (see
// atomicfile.Write).
func SaveSnapshot(path, prefix string, v *View) error {
	data, err := EncodeSnapshot(prefix, v)
	if err != nil {
		return err
	}
	return atomicfile.Write(path, data, 0o600)
}

// EncodeSnapshot returns v in the snapshot format (see above), as
// SaveSnapshot writes it to a file.
func EncodeSnapshot(prefix string, v *View) ([]byte, error) {
	if !v.Synced || v.ClusterID == 0 || v.Rev <= 0 {
		return nil, errors.New("lease: nothing to snapshot yet")
	}
	h := SnapshotHeader{Format: snapshotFormat, ClusterID: v.ClusterID, Prefix: prefix, Rev: v.Rev}
	if v.Config != nil && json.Valid(v.Config) {
		h.Config = v.Config
	}
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(&h); err != nil {
		return nil, err
	}
	var rec []byte
	for _, r := range v.Records {
		rec = appendSnapshotRecord(rec[:0], r)
		buf.Write(binary.AppendUvarint(nil, uint64(len(rec))))
		buf.Write(rec)
	}
	return buf.Bytes(), nil
}

// OpenSnapshot reads a snapshot's header and returns it with a function
// that decodes its leases into the Reset batch the snapshot stands for
// (two steps, so that the catch-up with etcd can start before the
// decoding). Leases that do not decode are left out: the catch-up reads
// them from etcd, and a damaged file only costs reads.
func OpenSnapshot(path string) (SnapshotHeader, func() Batch, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return SnapshotHeader{}, nil, err
	}
	return parseSnapshot(data, "snapshot "+path)
}

// parseSnapshot is OpenSnapshot for the snapshot in data; what names it in
// errors.
func parseSnapshot(data []byte, what string) (SnapshotHeader, func() Batch, error) {
	var h SnapshotHeader
	head, rest, _ := bytes.Cut(data, []byte{'\n'})
	if json.Unmarshal(head, &h) != nil {
		return h, nil, fmt.Errorf("lease: %s has no valid header", what)
	}
	if h.Format != snapshotFormat {
		return h, nil, fmt.Errorf("lease: %s is in format %d, this leased reads format %d", what, h.Format, snapshotFormat)
	}
	if h.Rev <= 0 {
		return h, nil, fmt.Errorf("lease: %s has no valid header", what)
	}
	frames := splitFrames(rest)
	h.Leases = len(frames)
	return h, func() Batch { return decodeSnapshot(h, frames) }, nil
}

// splitFrames cuts data into length-prefixed frames; it stops at the first
// damaged one.
func splitFrames(data []byte) [][]byte {
	n := 0
	for rest := data; ; n++ { // count first: one allocation for the frames
		if _, rest = nextFrame(rest); rest == nil {
			break
		}
	}
	frames := make([][]byte, 0, n)
	for range n {
		var f []byte
		f, data = nextFrame(data)
		frames = append(frames, f)
	}
	return frames
}

// nextFrame returns the frame at the start of data and what follows it
// (non-nil), or a nil rest when data holds no complete frame.
func nextFrame(data []byte) (frame, rest []byte) {
	n, k := binary.Uvarint(data)
	if k <= 0 || n > uint64(len(data)-k) {
		return nil, nil
	}
	end := k + int(n)
	return data[k:end], data[end:len(data):len(data)]
}

// decodeSnapshot decodes the frames into a Reset batch whose base holds
// the records (see Batch.base) and whose events are the config only.
func decodeSnapshot(h SnapshotHeader, frames [][]byte) Batch {
	b := Batch{Rev: h.Rev, Reset: true, ClusterID: h.ClusterID}
	if h.Config != nil {
		b.Events = append(b.Events, Event{Kind: ConfigPut, Value: []byte(h.Config)})
	}
	recs := make([]Record, len(frames)) // one allocation, not one per lease
	ok := make([]bool, len(frames))
	parallel(len(frames), func(i int) { ok[i] = decodeSnapshotRecord(frames[i], &recs[i]) })
	b.base = make(map[string]*Record, len(frames))
	for i := range recs {
		if ok[i] {
			b.base[recs[i].Node] = &recs[i]
		}
	}
	return b
}

// Flags of a snapshot record: which optional fields follow.
const (
	snapSubnet4 = 1 << iota
	snapSubnet6
	snapPublic4
	snapPublic6
	snapAcquired
)

// appendSnapshotRecord appends r's snapshot encoding to b: create revision
// and etcd lease (varints), node (uvarint length, bytes), a flags byte, the
// flagged fields (IPv4 subnet: 4 address bytes and the length; IPv6
// subnet: 16 and the length; public addresses: 4 and 16 bytes; Acquired:
// uvarint length and time.Time's binary form), then backend type and data
// (uvarint length, bytes each). Zones are never stored: checkShape refuses
// them in public addresses and prefixes have none.
func appendSnapshotRecord(b []byte, r *Record) []byte {
	b = binary.AppendVarint(b, r.Rev)
	b = binary.AppendVarint(b, r.Lease)
	b = appendBytes(b, []byte(r.Node))
	var flags byte
	var acq []byte
	if r.Subnet.V4.IsValid() {
		flags |= snapSubnet4
	}
	if r.Subnet.V6.IsValid() {
		flags |= snapSubnet6
	}
	if r.PublicIP.V4.IsValid() {
		flags |= snapPublic4
	}
	if r.PublicIP.V6.IsValid() {
		flags |= snapPublic6
	}
	if !r.Acquired.IsZero() {
		if t, err := r.Acquired.MarshalBinary(); err == nil {
			flags |= snapAcquired
			acq = t
		}
	}
	b = append(b, flags)
	if flags&snapSubnet4 != 0 {
		a := r.Subnet.V4.Addr().As4()
		b = append(append(b, a[:]...), byte(r.Subnet.V4.Bits()))
	}
	if flags&snapSubnet6 != 0 {
		a := r.Subnet.V6.Addr().As16()
		b = append(append(b, a[:]...), byte(r.Subnet.V6.Bits()))
	}
	if flags&snapPublic4 != 0 {
		a := r.PublicIP.V4.As4()
		b = append(b, a[:]...)
	}
	if flags&snapPublic6 != 0 {
		a := r.PublicIP.V6.As16()
		b = append(b, a[:]...)
	}
	if flags&snapAcquired != 0 {
		b = appendBytes(b, acq)
	}
	b = appendBytes(b, []byte(r.BackendType))
	return appendBytes(b, r.BackendData)
}

func appendBytes(b, v []byte) []byte {
	return append(binary.AppendUvarint(b, uint64(len(v))), v...)
}

// decodeSnapshotRecord decodes appendSnapshotRecord's encoding into *r and
// checks it like a record from etcd. It reports false (and leaves *r
// unspecified) for anything else; it never panics.
func decodeSnapshotRecord(data []byte, r *Record) bool {
	d := snapReader{b: data}
	r.Rev = d.varint()
	r.Lease = d.varint()
	r.Node = string(d.bytes())
	flags := d.next(1)
	if d.bad || flags[0]&^(snapSubnet4|snapSubnet6|snapPublic4|snapPublic6|snapAcquired) != 0 {
		return false
	}
	f := flags[0]
	if f&snapSubnet4 != 0 {
		if v := d.next(5); v != nil {
			r.Subnet.V4 = netip.PrefixFrom(netip.AddrFrom4([4]byte(v[:4])), int(v[4]))
		}
	}
	if f&snapSubnet6 != 0 {
		if v := d.next(17); v != nil {
			r.Subnet.V6 = netip.PrefixFrom(netip.AddrFrom16([16]byte(v[:16])), int(v[16]))
		}
	}
	if f&snapPublic4 != 0 {
		if v := d.next(4); v != nil {
			r.PublicIP.V4 = netip.AddrFrom4([4]byte(v))
		}
	}
	if f&snapPublic6 != 0 {
		if v := d.next(16); v != nil {
			r.PublicIP.V6 = netip.AddrFrom16([16]byte(v))
		}
	}
	if f&snapAcquired != 0 {
		if r.Acquired.UnmarshalBinary(d.bytes()) != nil {
			return false
		}
	}
	r.BackendType = internBackendType(d.bytes())
	if data := d.bytes(); len(data) > 0 {
		r.BackendData = json.RawMessage(bytes.Clone(data))
	}
	if d.bad || len(d.b) != 0 || ValidNodeName(r.Node) != nil {
		return false
	}
	for _, s := range r.Subnet.All() {
		if (s != netip.Prefix{}) && !s.IsValid() {
			return false // a length beyond the address
		}
	}
	if r.BackendData != nil && !json.Valid(r.BackendData) {
		return false
	}
	return r.checkShape(r.Node) == nil
}

// snapReader reads a snapshot record; after the first short read every
// read returns nothing and bad is set.
type snapReader struct {
	b   []byte
	bad bool
}

func (d *snapReader) next(n int) []byte {
	if d.bad || n < 0 || n > len(d.b) {
		d.bad = true
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *snapReader) varint() int64 {
	v, k := binary.Varint(d.b)
	if k <= 0 {
		d.bad = true
		return 0
	}
	d.b = d.b[k:]
	return v
}

func (d *snapReader) bytes() []byte {
	n, k := binary.Uvarint(d.b)
	if k <= 0 || n > uint64(len(d.b)-k) {
		d.bad = true
		return nil
	}
	d.b = d.b[k:]
	return d.next(int(n))
}

// Usable reports whether a snapshot can stand in for a listing: it is from
// this registry's prefix and from the etcd cluster that answers now, and
// not from that cluster's future (a restored backup rewinds revisions).
// It costs one read.
func (r *Registry) Usable(ctx context.Context, h SnapshotHeader) bool {
	if h.Prefix != r.keys.Prefix() {
		return false
	}
	resp, err := r.cli.Get(ctx, r.keys.Config(), clientv3.WithCountOnly())
	if err != nil {
		return false
	}
	return resp.Header.ClusterId == h.ClusterID && h.Rev <= resp.Header.Revision
}

// WatchFromSnapshot is Watch that starts from a snapshot opened with
// OpenSnapshot instead of a full listing: it brings the snapshot's batch up
// to date with etcd, delivers it as one Reset batch, and goes on like
// Watch. While decode runs, it lists the config and the lease keys without their
// values in one read (etcd 3.7 and later answer that from their in-memory
// index, without touching a value; older ones read the values and drop
// them, which is slower but just as exact). A cached record whose key etcd still holds,
// with the same create revision and not modified since the snapshot's
// revision, is exactly what etcd holds; every other listed key is read
// (at the listing's revision), and cached records whose key is gone are
// dropped. The consumer gets the result as one Reset batch at the
// listing's revision, so it never acts on the snapshot's stale state, and
// the watch continues from there. The snapshot stays usable after etcd
// compacted past its revision. When more than maxCatchUpReads keys
// changed, or a read fails, it lists afresh (Watch).
//
// It does not watch from the snapshot's revision and wait for etcd's
// progress notification instead: etcd before 3.4.24 and 3.5.8 answers a
// progress request before the watcher has caught up (etcd issue 15220),
// and the consumer would act on stale leases (TestListAndResumeOnOlderEtcd).
func (r *Registry) WatchFromSnapshot(ctx context.Context, h SnapshotHeader, decode func() Batch, out chan<- Batch) error {
	decoded := make(chan Batch, 1)
	go func() { decoded <- decode() }()
	b, err := r.catchUp(ctx, h, decoded)
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case err != nil:
		klog.InfoS("lease cache not usable; listing instead", "reason", err)
		return r.Watch(ctx, out)
	}
	select {
	case out <- b:
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := r.watchFrom(ctx, b.Rev+1, out); !errors.Is(err, rpctypes.ErrCompacted) {
		return err
	}
	metrics.WatchRestarts.WithLabelValues("compaction").Inc()
	return r.Watch(ctx, out)
}

// maxCatchUpReads bounds the keys a catch-up reads one by one; beyond it a
// full listing is cheaper.
const maxCatchUpReads = 4096

// maxTxnOps is etcd's default --max-txn-ops.
const maxTxnOps = 128

// catchUp returns the batch of the snapshot h (decoded) brought up to
// etcd's current state (see WatchFromSnapshot).
func (r *Registry) catchUp(ctx context.Context, h SnapshotHeader, decoded <-chan Batch) (Batch, error) {
	k := r.keys
	resp, err := r.cli.Txn(ctx).Then(
		clientv3.OpGet(k.Config()),
		clientv3.OpGet(k.Leases(), clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		return Batch{}, fmt.Errorf("listing the lease keys: %w", err)
	}
	var b Batch
	select {
	case b = <-decoded:
	case <-ctx.Done():
		return Batch{}, ctx.Err()
	}
	if id := resp.Header.ClusterId; id != h.ClusterID {
		return Batch{}, fmt.Errorf("etcd cluster %x is not the cache's %x", id, h.ClusterID)
	}
	rev := resp.Header.Revision
	if rev < h.Rev {
		return Batch{}, fmt.Errorf("etcd's revision %d is older than the cache's %d (etcd restored from a backup, or the cache was rewritten meanwhile)", rev, h.Rev)
	}
	b.FromCache = true
	b.Rev, b.Reset, b.ClusterID = rev, true, resp.Header.ClusterId
	b.Events = nil // the snapshot's config is replaced by etcd's
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		b.Events = append(b.Events, Event{Kind: ConfigPut, Value: kv.Value, ModRev: kv.ModRevision})
	}
	kvs := resp.Responses[1].GetResponseRange().Kvs
	base := b.base
	pfx := len(k.Leases())
	var stale []string // listed keys whose cached record is missing or outdated
	kept, cached := 0, 0
	for _, kv := range kvs {
		rec := base[string(kv.Key[pfx:])]
		if rec != nil {
			cached++
			if rec.Rev == kv.CreateRevision && kv.ModRevision <= h.Rev {
				kept++
				continue
			}
		}
		stale = append(stale, string(kv.Key))
	}
	if len(stale) > maxCatchUpReads {
		return Batch{}, fmt.Errorf("%d of %d leases changed since the cache was saved", len(stale), len(kvs))
	}
	dropped := len(base) - cached
	if dropped > 0 {
		// Cached records whose key is gone from etcd.
		live := make(map[string]struct{}, len(kvs))
		for _, kv := range kvs {
			live[string(kv.Key[pfx:])] = struct{}{}
		}
		for node := range base {
			if _, ok := live[node]; !ok {
				delete(base, node)
			}
		}
	}
	for lo := 0; lo < len(stale); lo += maxTxnOps {
		ops := make([]clientv3.Op, 0, maxTxnOps)
		for _, key := range stale[lo:min(lo+maxTxnOps, len(stale))] {
			ops = append(ops, clientv3.OpGet(key, clientv3.WithRev(rev)))
		}
		fr, err := r.cli.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return Batch{}, fmt.Errorf("reading %d changed leases: %w", len(ops), err)
		}
		for _, op := range fr.Responses {
			for _, kv := range op.GetResponseRange().Kvs {
				b.Events = append(b.Events, r.leaseEvent(kv, false))
			}
		}
	}
	klog.V(2).InfoS("brought the lease cache up to date", "leases", len(kvs), "unchanged", kept, "read", len(stale), "dropped", dropped, "rev", rev)
	return b, nil
}

// internBackendType returns the known backend type names without an
// allocation each, anything else as a new string.
func internBackendType(val []byte) string {
	for _, t := range backendTypes {
		if string(val) == t {
			return t
		}
	}
	return string(val)
}
