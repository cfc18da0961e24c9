package main

import (
	"fmt"
	"net/netip"
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

// ownLeasesFile is where the agent keeps the etcd leases it granted.
func (o *options) ownLeasesFile() string {
	return filepath.Join(filepath.Dir(o.subnetFile), "own-leases")
}

// load reads the file once.
func (k *ownKeys) load(o *options, node string) {
	if k.loaded {
		return
	}
	k.loaded = true
	k.file = lease.OwnLeases{Path: o.ownLeasesFile(), Node: node}
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

// reportConflict logs a node name conflict once per holder and says so in
// STATUS= and /readyz.
func (a *agent) reportConflict(cf *lease.ConflictError) {
	if msg := fmt.Sprintf("%s@%x", cf.Key, cf.Lease); msg != a.own.conflict {
		klog.ErrorS(cf, "node name conflict: another host holds this host's node name; claiming no subnet until it is gone",
			"node", a.node, "holder", cf.Holder(), "key", cf.Key,
			"remedy", "give one of the hosts another --node-name (LEASED_NODE_NAME), or regenerate /etc/machine-id and the hostname on a cloned machine")
		a.own.conflict = msg
	} else {
		klog.V(2).InfoS("node name still held by another host; retrying", "node", a.node, "holder", cf.Holder(), "key", cf.Key)
	}
	a.setStatus(fmt.Sprintf("node name conflict: %q is held by another host (%s); set --node-name or regenerate /etc/machine-id; retrying", a.node, cf.Holder()))
}

// checkOwnKeys looks at a watch batch for changes to this host's own keys
// made by someone else after its claim. A deleted key is claimed again
// (restored: the host still holds the rest); a key rewritten under
// another lease or by another node means the host no longer owns it: it
// stops using its lease (as when the lease is lost) and claims again,
// which reports the conflict if another host holds its node name. It
// runs before the batch is applied to the view.
func (a *agent) checkOwnKeys(b lease.Batch) {
	if a.self == nil || a.sess == nil {
		return
	}
	ours := int64(a.sess.Lease())
	for _, e := range b.Events {
		if e.ModRev <= a.self.ModRev {
			continue // from before this host's last write: not a change to it
		}
		own := e.Node == a.node
		mySubnet := slices.Contains(a.self.Subnets(), e.Subnet)
		switch {
		case e.Kind == lease.LeaseDelete && own, e.Kind == lease.LockDelete && mySubnet:
			klog.Warningf("this host's lease keys were deleted in etcd (expired, or by hand); claiming its subnets %v again", a.self.Subnets())
			a.self = nil // ensureLease claims again, preferring the held subnets
			a.startGrace()
			a.withdraw()
			a.setStatus("lease keys deleted; claiming them again")
			return
		case e.Kind == lease.LeasePut && own && (e.Record == nil || e.Record.Lease != ours):
			a.lostOwnKeys(a.reg.Keys().Lease(a.node), a.node, e.Record)
			return
		case e.Kind == lease.LockPut && mySubnet && (e.Node != a.node || e.Lease != ours):
			a.lostOwnKeys(a.reg.Keys().SubnetLock(e.Subnet), e.Node, nil)
			return
		}
	}
}

// checkOwnRecord is checkOwnKeys for a full listing (a Reset batch, after
// a compaction): the view, just applied, must hold this host's record under
// its lease.
func (a *agent) checkOwnRecord(b lease.Batch) {
	if !b.Reset || a.self == nil || a.sess == nil || b.Rev <= a.self.ModRev {
		return
	}
	r := a.view.Records[a.node]
	switch {
	case r == nil && a.view.Malformed[a.node] == nil:
		klog.Warningf("this host's lease record was deleted in etcd (expired, or by hand); claiming its subnets %v again", a.self.Subnets())
		a.self = nil
		a.startGrace()
	case r == nil || r.Lease != int64(a.sess.Lease()):
		a.lostOwnKeys(a.reg.Keys().Lease(a.node), a.node, r)
	}
}

// lostOwnKeys stops using the lease after key was rewritten by someone
// else: for node (this host's own name: another host with the same name,
// as far as the record holder tells), or another node that took a lock.
func (a *agent) lostOwnKeys(key, node string, holder *lease.Record) {
	kv := []any{"key", key, "subnets", a.self.Subnets()}
	if holder != nil {
		for _, ip := range []netip.Addr{holder.PublicIP, holder.PublicIPv6} {
			if ip.IsValid() {
				kv = append(kv, "writerPublicIP", ip.String())
			}
		}
	}
	if node == a.node {
		klog.ErrorS(nil, "this host's lease keys were overwritten in etcd under another etcd lease; it stops serving its subnets and claims again (another host with the same node name? give each host its own --node-name)", kv...)
	} else {
		klog.ErrorS(nil, "this host's subnet lock was taken in etcd by another node; it stops serving that subnet and claims again", append(kv, "takenBy", node)...)
	}
	a.self = nil
	a.startGrace()
	a.withdraw() // proxy-ndp must not answer for a slice it may no longer hold
	a.setStatus("this host's lease keys were overwritten in etcd; claiming again")
}
