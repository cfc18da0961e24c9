package lease

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/pkg/metrics"
)

// A snapshot is a View saved to disk so that a restarted agent can resume
// the watch from the saved revision instead of reading every lease from
// etcd again: the watch replays every change since, so the result is
// exactly the current state. It is only used for the same etcd cluster and
// prefix; when etcd has compacted past its revision, the watch lists
// afresh as it always does.
//
// Format: a first line of JSON (SnapshotHeader), then one line per lease:
// "<create rev> <etcd lease> <node> <record JSON>".

// SnapshotHeader identifies what a snapshot belongs to.
type SnapshotHeader struct {
	ClusterID uint64          `json:"clusterID"`
	Prefix    string          `json:"prefix"`
	Rev       int64           `json:"rev"`
	Config    json.RawMessage `json:"config,omitempty"`
	// Leases is the number of lease lines (counted when read, not saved).
	Leases int `json:"-"`
}

// SaveSnapshot writes v atomically (temp file, rename) to path.
func SaveSnapshot(path, prefix string, v *View) error {
	if !v.Synced || v.ClusterID == 0 || v.Rev <= 0 {
		return errors.New("lease: nothing to snapshot yet")
	}
	h := SnapshotHeader{ClusterID: v.ClusterID, Prefix: prefix, Rev: v.Rev}
	if v.Config != nil && json.Valid(v.Config) {
		h.Config = v.Config
	}
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(&h); err != nil {
		return err
	}
	for _, r := range v.Records {
		val, err := json.Marshal(r)
		if err != nil {
			return err
		}
		fmt.Fprintf(&buf, "%d %d %s %s\n", r.Rev, r.Lease, r.Node, val)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".leases-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(buf.Bytes()); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// LoadSnapshot reads a snapshot and returns its header and the Reset batch
// it stands for. Lines that do not parse are left out: the watch that
// follows corrects anything stale, and a damaged file only costs records.
func LoadSnapshot(path string) (SnapshotHeader, Batch, error) {
	h, decode, err := OpenSnapshot(path)
	if err != nil {
		return h, Batch{}, err
	}
	return h, decode(), nil
}

// OpenSnapshot reads a snapshot's header and returns it with a function
// that decodes its leases into the Reset batch the snapshot stands for
// (LoadSnapshot in two steps, so that the catch-up with etcd can start
// before the decoding, which is most of the time at 50,000 leases).
func OpenSnapshot(path string) (SnapshotHeader, func() Batch, error) {
	var h SnapshotHeader
	data, err := os.ReadFile(path)
	if err != nil {
		return h, nil, err
	}
	head, rest, _ := bytes.Cut(data, []byte{'\n'})
	if json.Unmarshal(head, &h) != nil || h.Rev <= 0 {
		return h, nil, fmt.Errorf("lease: snapshot %s has no valid header", path)
	}
	rest = bytes.TrimSuffix(rest, []byte{'\n'})
	if len(rest) > 0 {
		h.Leases = bytes.Count(rest, []byte{'\n'}) + 1
	}
	return h, func() Batch { return decodeSnapshot(h, rest) }, nil
}

func decodeSnapshot(h SnapshotHeader, rest []byte) Batch {
	b := Batch{Rev: h.Rev, Reset: true, ClusterID: h.ClusterID}
	if h.Config != nil {
		b.Events = append(b.Events, Event{Kind: ConfigPut, Value: []byte(h.Config)})
	}
	if len(rest) == 0 {
		return b
	}
	lines := bytes.Split(rest, []byte{'\n'})
	evs := make([]Event, len(lines))
	recs := make([]Record, len(lines)) // one allocation, not one per lease
	parallel(len(lines), func(i int) {
		// "<create rev> <etcd lease> <node> <record JSON>"
		line := lines[i]
		f0, line, ok0 := bytes.Cut(line, []byte{' '})
		f1, line, ok1 := bytes.Cut(line, []byte{' '})
		f2, f3, ok2 := bytes.Cut(line, []byte{' '})
		rev, ok3 := parseInt(f0)
		lid, ok4 := parseInt(f1)
		if !ok0 || !ok1 || !ok2 || !ok3 || !ok4 {
			return
		}
		node := string(f2)
		if ValidNodeName(node) != nil || decodeRecordInto(node, f3, &recs[i]) != nil {
			return
		}
		rec := &recs[i]
		rec.Rev, rec.Lease = rev, lid
		evs[i] = Event{Kind: LeasePut, Node: node, Record: rec}
	})
	out := evs[:0] // in place: the decoded leases, in file order
	if b.Events != nil {
		out = append(make([]Event, 0, len(evs)+1), b.Events...)
	}
	for _, e := range evs {
		if e.Record != nil {
			out = append(out, e)
		}
	}
	b.Events = out
	return b
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

// WatchFrom is Watch that starts from a snapshot's batch instead of a
// listing: it watches from the batch's revision on, and once etcd confirms
// (by a progress notification) that every change since has arrived, it
// delivers the batch with those changes applied as one Reset batch, so
// that the consumer never acts on the snapshot's stale state. Then it
// goes on like Watch. When etcd has compacted past the batch's revision it
// lists afresh (Watch).
func (r *Registry) WatchFrom(ctx context.Context, start Batch, out chan<- Batch) error {
	return r.WatchFromSnapshot(ctx, SnapshotHeader{Rev: start.Rev, ClusterID: start.ClusterID}, func() Batch { return start }, out)
}

// WatchFromSnapshot is WatchFrom for a snapshot opened with OpenSnapshot:
// the catch-up watch starts at once and decode runs meanwhile, so the
// decoding costs no time when etcd takes longer to catch the watch up
// (it syncs watchers of old revisions every 100ms).
func (r *Registry) WatchFromSnapshot(ctx context.Context, h SnapshotHeader, decode func() Batch, out chan<- Batch) error {
	decoded := make(chan Batch, 1)
	go func() { decoded <- withBase(decode()) }()
	b, ok := r.catchUp(ctx, h.Rev, decoded)
	if !ok {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		metrics.WatchRestarts.WithLabelValues("compaction").Inc()
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

const catchUpTimeout = 5 * time.Second

// catchUp collects every change after rev until etcd confirms it has sent
// them all, then returns the snapshot batch (from decoded) followed by
// those changes as one Reset batch at the revision etcd confirmed. A
// Reset batch is applied in order, so later events override the
// snapshot's.
func (r *Registry) catchUp(ctx context.Context, rev int64, decoded <-chan Batch) (Batch, bool) {
	ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), catchUpTimeout)
	defer cancel()
	var delta []Event
	wch := r.cli.Watch(ctx, r.keys.Prefix(), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	// etcd answers progress requests only once the watcher has caught up,
	// so ask until it answers.
	r.cli.RequestProgress(ctx) //nolint:errcheck // may come before the watch exists; the ticker repeats it
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return Batch{}, false
		case <-tick.C:
			r.cli.RequestProgress(ctx) //nolint:errcheck // retried on the next tick
		case resp, ok := <-wch:
			if !ok || resp.Err() != nil || resp.CompactRevision != 0 {
				return Batch{}, false
			}
			if resp.IsProgressNotify() {
				var b Batch
				select {
				case b = <-decoded:
				case <-ctx.Done():
					return Batch{}, false
				}
				b.Rev, b.Reset, b.ClusterID = resp.Header.Revision, true, resp.Header.ClusterId
				b.Events = append(b.Events, delta...)
				return b, true
			}
			for _, ev := range resp.Events {
				if e, ok := r.event(ev); ok {
					delta = append(delta, e)
				}
			}
		}
	}
}

// withBase moves a snapshot batch's lease records into its base map, so
// that the map is built while etcd catches the watch up rather than by the
// consumer afterwards (see Batch.base).
func withBase(b Batch) Batch {
	base := make(map[string]*Record, len(b.Events))
	var rest []Event // a new slice: b's array may be the caller's (WatchFrom)
	for _, e := range b.Events {
		if e.Kind == LeasePut && e.Err == nil && e.Record != nil {
			base[e.Node] = e.Record
		} else {
			rest = append(rest, e)
		}
	}
	b.Events, b.base = rest, base
	return b
}

// parseInt parses a decimal int64 (optionally negative) like
// strconv.ParseInt(string(b), 10, 64) (without a "+" sign, which
// SaveSnapshot never writes), without the string's allocation.
func parseInt(b []byte) (int64, bool) {
	neg := len(b) > 0 && b[0] == '-'
	if neg {
		b = b[1:]
	}
	if len(b) == 0 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if n > (math.MaxInt64-d)/10 {
			return 0, false // out of range (also refuses math.MinInt64, never a revision or lease ID)
		}
		n = n*10 + d
	}
	if neg {
		return -int64(n), true
	}
	return int64(n), true
}
