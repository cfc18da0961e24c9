package agent

import (
	"github.com/leased/leased/pkg/ipfam"

	"fmt"
	"path/filepath"
	"slices"

	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/lease"
)

// ownKeys is what the agent knows about which etcd keys carrying its node
// name are its own: the etcd leases its runs on this machine granted,
// kept in a file next to the subnet file (see lease.OwnLeases).
type ownKeys struct {
	file      lease.OwnLeases
	loaded    bool
	ids       []clientv3.LeaseID // granted by this machine, newest last
	noHistory bool               // there was no file: first start since boot or an upgrade
	saveErr   bool               // a failed save was logged
	conflict  string             // the conflict last logged ("" when none)
}

// OwnLeasesFile is where the agent keeps the etcd leases it granted.
func (o *Options) OwnLeasesFile() string {
	return filepath.Join(filepath.Dir(o.SubnetFile), "own-leases")
}

// load reads the file once.
func (k *ownKeys) load(o *Options, node string) {
	if k.loaded {
		return
	}
	k.loaded = true
	k.file = lease.OwnLeases{Path: o.OwnLeasesFile(), Node: node}
	ids, ok, err := k.file.Load()
	if err != nil {
		klog.InfoS("could not read the etcd leases of this host's earlier runs; treating this as a first start", "path", k.file.Path, "err", err)
	}
	k.ids, k.noHistory = ids, !ok
}

// granted records a new etcd lease of this run. With a history it is saved
// before anything is claimed under it, so that a run killed right after
// its claim is recognised by the next one; without one, the file is
// written after the first claim (see claimed).
func (k *ownKeys) granted(id clientv3.LeaseID) {
	k.ids = append(k.ids, id)
	if len(k.ids) > 8 {
		k.ids = slices.Clone(k.ids[len(k.ids)-8:])
	}
	if !k.noHistory {
		k.save(k.ids)
	}
}

// claimed records that every key of the node is now under lease id.
func (k *ownKeys) claimed(id clientv3.LeaseID) {
	k.ids, k.noHistory = []clientv3.LeaseID{id}, false
	k.save(k.ids)
}

func (k *ownKeys) save(ids []clientv3.LeaseID) {
	if err := k.file.Save(ids); err != nil {
		if !k.saveErr {
			klog.ErrorS(err, "could not save this host's etcd lease IDs; after a restart leased cannot prove its keys are its own and waits for its old lease to expire (check that the directory of --subnet-file is writable)", "path", k.file.Path)
			k.saveErr = true
		}
		return
	}
	k.saveErr = false
}

// reportConflict logs a node name conflict once per holder and returns
// the status that says so in STATUS= and /readyz.
func (k *leaseKeeper) reportConflict(cf *lease.ConflictError) string {
	if msg := fmt.Sprintf("%s@%x", cf.Key, cf.Lease); msg != k.own.conflict {
		klog.ErrorS(cf, "node name conflict: another host holds this host's node name; claiming no subnet until it is gone",
			"node", k.node, "holder", cf.Holder(), "key", cf.Key,
			"remedy", "give one of the hosts another --node-name (LEASED_NODE_NAME), or regenerate /etc/machine-id and the hostname on a cloned machine")
		k.own.conflict = msg
	} else {
		klog.V(2).InfoS("node name still held by another host; retrying", "node", k.node, "holder", cf.Holder(), "key", cf.Key)
	}
	return fmt.Sprintf("node name conflict: %q is held by another host (%s); set --node-name or regenerate /etc/machine-id; retrying", k.node, cf.Holder())
}

// lost says that this host stopped using its lease because its keys in
// etcd changed under it: why (for STATUS=), and whether a backend that
// answers for the lease on the link must stop answering (withdraw).
type lost struct {
	why      string // "": STATUS= stays as it is
	withdraw bool
}

// checkOwnKeys looks at a watch batch for changes to this host's own keys
// made by someone else after its claim. A deleted key is claimed again
// (restored: the host still holds the rest); a key rewritten under
// another lease or by another node means the host no longer owns it: it
// stops using its lease (as when the lease is lost) and claims again,
// which reports the conflict if another host holds its node name. It
// runs before the batch is applied to the view, and returns nil when the
// host keeps its lease.
func (k *leaseKeeper) checkOwnKeys(b lease.Batch) *lost {
	if k.self == nil || k.sess == nil {
		return nil
	}
	ours := int64(k.sess.Lease())
	for _, e := range b.Events {
		if e.ModRev <= k.self.ModRev {
			continue // from before this host's last write: not a change to it
		}
		own := e.Node == k.node
		mySubnet := slices.Contains(k.self.Subnets(), e.Subnet)
		switch {
		case e.Kind == lease.LeaseDelete && own, e.Kind == lease.LockDelete && mySubnet:
			klog.Warningf("this host's lease keys were deleted in etcd (expired, or by hand); claiming its subnets %v again", k.self.Subnets())
			k.self = nil // ensure claims again, preferring the held subnets
			return &lost{why: "lease keys deleted; claiming them again", withdraw: true}
		case e.Kind == lease.LeasePut && own && (e.Record == nil || e.Record.Lease != ours):
			return k.lostOwnKeys(k.reg.Keys().Lease(k.node), k.node, e.Record)
		case e.Kind == lease.LockPut && mySubnet && (e.Node != k.node || e.Lease != ours):
			return k.lostOwnKeys(k.reg.Keys().SubnetLock(e.Subnet), e.Node, nil)
		}
	}
	return nil
}

// checkOwnRecord is checkOwnKeys for a full listing (a Reset batch, after
// a compaction): the view v, just applied, must hold this host's record
// under its lease.
func (k *leaseKeeper) checkOwnRecord(b lease.Batch, v *lease.View) *lost {
	if !b.Reset || k.self == nil || k.sess == nil || b.Rev <= k.self.ModRev {
		return nil
	}
	r := v.Records[k.node]
	switch {
	case r == nil && v.Malformed[k.node] == nil:
		klog.Warningf("this host's lease record was deleted in etcd (expired, or by hand); claiming its subnets %v again", k.self.Subnets())
		k.self = nil
		return &lost{}
	case r == nil || r.Lease != int64(k.sess.Lease()):
		return k.lostOwnKeys(k.reg.Keys().Lease(k.node), k.node, r)
	}
	return nil
}

// lostOwnKeys stops using the lease after key was rewritten by someone
// else: for node (this host's own name: another host with the same name,
// as far as the record holder tells), or another node that took a lock.
func (k *leaseKeeper) lostOwnKeys(key, node string, holder *lease.Record) *lost {
	kv := []any{"key", key, "subnets", k.self.Subnets()}
	if holder != nil {
		for _, ip := range ipfam.Valid(holder.PublicIP) {
			kv = append(kv, "writerPublicIP", ip.String())
		}
	}
	if node == k.node {
		klog.ErrorS(nil, "this host's lease keys were overwritten in etcd under another etcd lease; it stops serving its subnets and claims again (another host with the same node name? give each host its own --node-name)", kv...)
	} else {
		klog.ErrorS(nil, "this host's subnet lock was taken in etcd by another node; it stops serving that subnet and claims again", append(kv, "takenBy", node)...)
	}
	k.self = nil
	// proxy-ndp must not answer for a slice it may no longer hold
	return &lost{why: "this host's lease keys were overwritten in etcd; claiming again", withdraw: true}
}
