package lease

import (
	"context"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// listLeases reads the config and every lease record at one revision, in
// one transaction, and decodes the records on every CPU: Events holds the
// config (if any), then the events of the malformed records in key order;
// the well-formed ones are in base (see Batch.base). Rev is the revision
// of the reads.
func (r *Registry) listLeases(ctx context.Context) (Batch, error) {
	k := r.keys
	resp, err := r.cli.Txn(ctx).Then(
		clientv3.OpGet(k.Config()),
		clientv3.OpGet(k.Leases(), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return Batch{}, err
	}
	b := Batch{Rev: resp.Header.Revision, Reset: true, ClusterID: resp.Header.ClusterId}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		b.Events = append(b.Events, Event{Kind: ConfigPut, Value: kv.Value, ModRev: kv.ModRevision})
	}
	kvs := resp.Responses[1].GetResponseRange().Kvs
	recs := make([]Record, len(kvs)) // one allocation, not one per lease
	evs := make([]Event, len(kvs))
	parallel(len(kvs), func(i int) {
		kv := kvs[i]
		evs[i] = leaseEventInto(string(kv.Key[len(k.Leases()):]), kv.Value, kv.CreateRevision, kv.Lease, &recs[i])
	})
	b.base = make(map[string]*Record, len(kvs))
	for i := range evs {
		if evs[i].Err != nil {
			b.Events = append(b.Events, evs[i])
		} else {
			b.base[evs[i].Node] = evs[i].Record
		}
	}
	return b, nil
}
