package lease

import (
	"context"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// listLeases reads the config and every lease record at one revision and
// decodes them: Events holds the config (if any), then one LeasePut per
// lease record in key order; Rev is the revision of the reads.
//
// It reads the config first, then streams the leases at the config's
// revision (etcd's RangeStream: the server sends the range in chunks and
// pins the revision), decoding each chunk while etcd reads the next. With
// an etcd that has no RangeStream, or when the stream fails (it goes
// around clientv3's retries and auth-token refresh), it reads both in one
// transaction and decodes on every CPU.
//
// Paging with limited Range requests instead would not pay: etcd (3.7
// included) still counts the whole rest of the range for every Range or
// Txn request with a limit, while RangeStream's chunks skip the count.
func (r *Registry) listLeases(ctx context.Context) (Batch, error) {
	if r.noRangeStream.Load() {
		return r.listTxn(ctx)
	}
	k := r.keys
	cresp, err := r.cli.Get(ctx, k.Config())
	if err != nil {
		return Batch{}, err
	}
	b := Batch{Rev: cresp.Header.Revision, Reset: true, ClusterID: cresp.Header.ClusterId}
	var cfg []Event
	for _, kv := range cresp.Kvs {
		cfg = append(cfg, Event{Kind: ConfigPut, Value: kv.Value, ModRev: kv.ModRevision})
	}
	// Each part of a chunk (decoded on its own, so that the last and
	// largest chunk is not decoded on one CPU after the stream ended)
	// joins the map as soon as it and those before it are decoded, so the
	// map is built while etcd streams the rest.
	base := make(map[string]*Record, r.listed.Load())
	evs := cfg
	prev := make(chan struct{})
	close(prev)
	var wg sync.WaitGroup
	err = rangeStream(ctx, r.cli.ActiveConnection(), k.Leases(), clientv3.GetPrefixRangeEnd(k.Leases()), b.Rev, func(rc *rangeChunk) {
		kvs := rc.kvs // the last part to finish frees rc
		if len(kvs) == 0 {
			rc.free()
			return
		}
		var left atomic.Int32
		left.Store(int32((len(kvs) + decodePart - 1) / decodePart))
		for lo := 0; lo < len(kvs); lo += decodePart {
			part := kvs[lo:min(lo+decodePart, len(kvs))]
			wait, done := prev, make(chan struct{})
			prev = done
			wg.Go(func() {
				var c leaseChunk
				r.decodeChunk(&c, part)
				if left.Add(-1) == 0 {
					rc.free()
				}
				<-wait // parts join in key order, and so do the malformed records' events
				evs = c.join(base, evs)
				close(done)
			})
		}
	})
	wg.Wait()
	if err != nil {
		if ctx.Err() != nil {
			return Batch{}, err
		}
		if status.Code(err) == codes.Unimplemented {
			r.noRangeStream.Store(true)
		} else {
			klog.V(2).InfoS("streaming the lease listing failed; reading it in one transaction", "err", err)
		}
		return r.listTxn(ctx)
	}
	r.listed.Store(int64(len(base)))
	b.Events, b.base = evs, base
	return b, nil
}

// decodePart is the most key-values a listing decodes in one goroutine.
const decodePart = 2048

// listTxn is listLeases in one transaction: one round trip, one revision.
func (r *Registry) listTxn(ctx context.Context) (Batch, error) {
	k := r.keys
	resp, err := r.cli.Txn(ctx).Then(
		clientv3.OpGet(k.Config()),
		clientv3.OpGet(k.Leases(), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return Batch{}, err
	}
	b := Batch{Rev: resp.Header.Revision, Reset: true, ClusterID: resp.Header.ClusterId}
	var evs []Event
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		evs = append(evs, Event{Kind: ConfigPut, Value: kv.Value, ModRev: kv.ModRevision})
	}
	kvs := resp.Responses[1].GetResponseRange().Kvs
	chunks := make([]leaseChunk, runtime.GOMAXPROCS(0))
	per := (len(kvs) + len(chunks) - 1) / len(chunks)
	var wg sync.WaitGroup
	for i := range chunks {
		part := kvs[min(i*per, len(kvs)):min((i+1)*per, len(kvs))]
		wg.Go(func() {
			raw := make([]rawKV, len(part))
			for j, kv := range part {
				raw[j] = rawKV{kv.Key, kv.Value, kv.CreateRevision, kv.Lease}
			}
			r.decodeChunk(&chunks[i], raw)
		})
	}
	wg.Wait()
	base := make(map[string]*Record, len(kvs))
	for _, c := range chunks {
		evs = c.join(base, evs)
	}
	b.Events, b.base = evs, base
	return b, nil
}

// leaseChunk is part of a listing, decoded: a record per key-value (one
// allocation for the chunk) and the events of the malformed ones.
type leaseChunk struct {
	recs []Record
	bad  []badLease
}

// badLease is the event of a malformed lease record, the i-th of its chunk.
type badLease struct {
	i int
	e Event
}

// decodeChunk decodes kvs into c; it keeps no reference to kvs.
func (r *Registry) decodeChunk(c *leaseChunk, kvs []rawKV) {
	c.recs = make([]Record, len(kvs))
	// The node names (from the keys), in one string: one allocation for
	// the chunk instead of one per record.
	var sb strings.Builder
	for _, kv := range kvs {
		sb.Write(r.keys.trimLeases(kv.key))
	}
	names := sb.String()
	for i, kv := range kvs {
		rec := &c.recs[i]
		l := len(r.keys.trimLeases(kv.key))
		node := names[:l]
		names = names[l:]
		if e := leaseEventInto(node, kv.value, kv.create, kv.lease, rec); e.Err != nil {
			c.bad = append(c.bad, badLease{i, e})
		}
	}
}

// join adds c's well-formed records to base (see Batch.base: a listing of
// tens of thousands of leases needs no event per lease) and appends the
// events of its malformed ones to evs, in key order.
func (c *leaseChunk) join(base map[string]*Record, evs []Event) []Event {
	j := 0 // next of c.bad
	for i := range c.recs {
		if j < len(c.bad) && c.bad[j].i == i {
			evs = append(evs, c.bad[j].e)
			j++
			continue
		}
		base[c.recs[i].Node] = &c.recs[i]
	}
	return evs
}

// trimLeases is bytes.TrimPrefix(key, k.Leases()) without building the
// prefix.
func (k Keys) trimLeases(key []byte) []byte {
	const leases = "/leases/"
	if n := len(k.prefix); len(key) >= n+len(leases) && string(key[:n]) == k.prefix && string(key[n:n+len(leases)]) == leases {
		return key[n+len(leases):]
	}
	return key
}
