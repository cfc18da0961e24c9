package lease

import (
	"context"
	"errors"
	"net/netip"
	"sync"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"
)

// WatchLocks watches the owner locks of subnets (a host's own: the peer
// watch does not carry lock keys, see Keys.PeerRange) from revision from
// onwards and sends each change as a batch of LockPut and LockDelete
// events. It is for the ownership checks of a running host: a lock
// deleted or rewritten by someone else. Each key has its own etcd watch;
// after a disconnect it resumes from the last revision it sent. When that
// revision has been compacted, it reads the key and sends its current
// state instead (a LockPut with the key's mod revision, or a LockDelete
// stamped with the read's revision when the key is gone), then goes on
// watching. The batches are not for View.Apply: their revisions are not
// the peer watch's. Sends block until the consumer receives. WatchLocks
// returns when ctx is done; it never closes out.
func (r *Registry) WatchLocks(ctx context.Context, subnets []netip.Prefix, from int64, out chan<- Batch) {
	var wg sync.WaitGroup
	for _, s := range subnets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.watchLock(ctx, s, from, out)
		}()
	}
	wg.Wait()
}

func (r *Registry) watchLock(ctx context.Context, s netip.Prefix, rev int64, out chan<- Batch) {
	key := r.keys.SubnetLock(s)
	send := func(b Batch) bool {
		select {
		case out <- b:
			return true
		case <-ctx.Done():
			return false
		}
	}
	backoff := newBackoff()
	for ctx.Err() == nil {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		compacted := false
		for resp := range r.cli.Watch(wctx, key, clientv3.WithRev(rev)) {
			if resp.CompactRevision != 0 || errors.Is(resp.Err(), rpctypes.ErrCompacted) {
				compacted = true
				break
			}
			if err := resp.Err(); err != nil {
				klog.V(2).InfoS("watch of this host's subnet lock interrupted; resuming", "key", key, "rev", rev, "err", err)
				break
			}
			backoff.reset()
			if len(resp.Events) == 0 {
				continue
			}
			b := Batch{Rev: resp.Events[len(resp.Events)-1].Kv.ModRevision, ClusterID: resp.Header.ClusterId}
			for _, ev := range resp.Events {
				e := Event{Kind: LockPut, Subnet: s, Node: string(ev.Kv.Value), Lease: ev.Kv.Lease, ModRev: ev.Kv.ModRevision}
				if ev.Type == mvccpb.DELETE {
					e = Event{Kind: LockDelete, Subnet: s, ModRev: ev.Kv.ModRevision}
				}
				b.Events = append(b.Events, e)
			}
			rev = b.Rev + 1
			if !send(b) {
				cancel()
				return
			}
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		if compacted {
			// The changes since rev are gone; what counts is the key now.
			resp, err := r.cli.Get(ctx, key)
			if err == nil {
				e := Event{Kind: LockDelete, Subnet: s, ModRev: resp.Header.Revision}
				if len(resp.Kvs) > 0 {
					kv := resp.Kvs[0]
					e = Event{Kind: LockPut, Subnet: s, Node: string(kv.Value), Lease: kv.Lease, ModRev: kv.ModRevision}
				}
				rev = resp.Header.Revision + 1
				if !send(Batch{Rev: resp.Header.Revision, ClusterID: resp.Header.ClusterId, Events: []Event{e}}) {
					return
				}
				continue
			}
			klog.V(2).InfoS("reading this host's subnet lock after a compaction failed; retrying", "key", key, "err", err)
		}
		if !backoff.wait(ctx) {
			return
		}
	}
}
