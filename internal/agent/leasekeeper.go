package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
)

// leaseKeeper is the agent's stage that holds this host's lease: the etcd
// session, the claim, republishing the record when the backend's data
// changes, the subnet file, and the keys carrying the node name that are
// this host's own (ownkeys.go). Not safe for concurrent use.
type leaseKeeper struct {
	o    *Options
	cli  *clientv3.Client
	reg  *lease.Registry
	node string
	ext  backend.ExtIface // the public addresses the record names

	sess *lease.Session
	self *lease.Record // the lease record, nil while not (re)claimed
	// held is the lease the datapath is programmed for: it stays while
	// the lease is re-claimed, and the claim prefers its subnets.
	held       lease.Record
	hint       subnetenv.Env // the subnet file of an earlier run
	own        ownKeys       // which keys carrying the node name are this host's
	exclLogged string        // the host's own routes last logged (exclude.go)
	ipam       *dockerIPAM   // the Docker IPAM driver (dockeripam.go); nil in tests
	locks      lockWatch     // this host's own subnet locks (ownlocks.go)
	// resumeTried: the first session of the run tried to resume the
	// previous run's etcd lease (ownlocks.go).
	resumeTried bool
}

func newLeaseKeeper(o *Options, cli *clientv3.Client, reg *lease.Registry, ext backend.ExtIface, node string) *leaseKeeper {
	k := &leaseKeeper{o: o, cli: cli, reg: reg, node: node, ext: ext}
	if env, err := subnetenv.Read(o.SubnetFile); err == nil {
		k.hint = env
	}
	return k
}

// claimed says what ensure did: whether this host's subnets are new (the
// datapath has to Start for them).
type claimed struct {
	new   bool // a claim ran: the grace period, if any, runs on from now
	moved bool // the subnets differ from those the datapath serves
}

// ensure makes sure the host holds a lease covering every family cfg
// enables, with its record naming be's current data.
func (k *leaseKeeper) ensure(ctx context.Context, cfg *lease.Config, be backend.Backend) (claimed, error) {
	if k.sess == nil {
		k.own.load(k.o, k.node)
		sess, resumed, err := k.session(ctx) // ownlocks.go
		if err != nil {
			return claimed{}, fmt.Errorf("creating an etcd lease at %s (is etcd up and reachable? check --etcd-endpoints and the TLS flags): %w", k.o.EtcdEndpoints, err)
		}
		k.sess = sess
		if !resumed {
			k.own.granted(sess.Lease())
		}
	}
	want := k.self == nil
	for f, pool := range cfg.Pools().All() {
		want = want || (pool != nil && !k.self.Subnet.Get(f).IsValid())
	}
	if !want {
		return claimed{}, k.republish(ctx, be)
	}
	rec, err := k.claim(ctx, cfg, be)
	if err != nil {
		return claimed{}, err
	}
	moved := func(old ipfam.Pair[netip.Prefix]) bool {
		for f, s := range ipfam.Valid(old) {
			if s != rec.Subnet.Get(f) {
				return true
			}
		}
		return false
	}
	switch {
	case k.held.Node == "" && moved(k.hint.Subnet):
		klog.Warningf("this host's subnets changed since the last run (%s held %v, now %v): restart docker.service so that dockerd takes the new subnet.env", k.o.SubnetFile, []netip.Prefix{k.hint.Subnet.V4, k.hint.Subnet.V6}, rec.Subnets())
	case k.held.Node == "":
	case moved(k.held.Subnet):
		klog.Warningf("this host's subnets changed from %v to %v: containers on the old subnet lose connectivity; restart docker.service so that dockerd takes the new subnet.env", k.held.Subnets(), rec.Subnets())
	case k.held.Subnet != rec.Subnet:
		klog.InfoS("this host gained a subnet; restart docker.service to use it (the existing subnets are unchanged)", "subnets", rec.Subnets())
	}
	c := claimed{new: true, moved: k.held.Node == "" || k.held.Subnet != rec.Subnet}
	klog.InfoS("Lease acquired", "node", k.node, "subnets", rec.Subnets(), "ttl", k.o.LeaseTTL)
	k.self = rec
	k.held = *rec
	k.watchLocks(ctx)
	return c, nil
}

// republish rewrites the record when the backend's data changed.
func (k *leaseKeeper) republish(ctx context.Context, be backend.Backend) error {
	if k.self.BackendType == be.Type() && bytes.Equal(k.self.BackendData, be.LeaseData()) {
		return nil
	}
	rec := *k.self
	rec.BackendType, rec.BackendData = be.Type(), be.LeaseData()
	if err := k.reg.Publish(ctx, k.sess.Lease(), &rec); err != nil {
		if errors.Is(err, lease.ErrNotHeld) {
			k.self = nil // claim again: restores deleted keys, reports a conflict
		}
		return err
	}
	k.self = &rec
	return nil
}

// claim acquires a lease for cfg, preferring the subnets held or named by
// the subnet file of an earlier run.
func (k *leaseKeeper) claim(ctx context.Context, cfg *lease.Config, be backend.Backend) (*lease.Record, error) {
	exclude, err := k.exclusions(cfg)
	if err != nil {
		return nil, err
	}
	c := lease.Claim{
		Node: k.node, PublicIP: k.ext.Public(), Exclude: exclude,
		BackendType: be.Type(), BackendData: be.LeaseData(),
		Hint: k.hint.Subnet, Keep: k.held.Subnet,
		Own: k.own.ids, NoHistory: k.own.noHistory,
	}
	if cfg.IPv4 != nil {
		klog.InfoS("Picking subnet in range", "range", cfg.IPv4.String())
	}
	if cfg.IPv6 != nil {
		klog.InfoS("Picking subnet in range", "range", cfg.IPv6.String())
	}
	rec, err := k.reg.Acquire(ctx, k.sess.Lease(), cfg, c)
	if err != nil {
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			// The etcd lease was revoked or expired; the session notices
			// only at its next keep-alive (TTL/3). Grant a new one now.
			k.sess.Orphan()
			k.sess = nil
		}
		return nil, err
	}
	k.own.claimed(k.sess.Lease())
	if k.own.conflict != "" {
		klog.InfoS("node name conflict over: this host holds its node name again", "node", k.node)
		k.own.conflict = ""
	}
	return rec, nil
}

// done returns the session's end (nil without a session).
func (k *leaseKeeper) done() <-chan struct{} {
	if k.sess == nil {
		return nil
	}
	return k.sess.Done()
}

// sessionLost forgets the session that ended and the lease under it; the
// next ensure claims again, preferring the held subnets.
func (k *leaseKeeper) sessionLost() {
	k.sess, k.self = nil, nil
}

// conflicted reports whether another host holds this host's node name.
func (k *leaseKeeper) conflicted() bool { return k.own.conflict != "" && k.self == nil }

// subnets are the subnets this host holds or still serves in the datapath
// (also while it re-claims a lost lease).
func (k *leaseKeeper) subnets() []netip.Prefix {
	own := k.held.Subnets()
	if k.self != nil {
		own = append(own, k.self.Subnets()...)
	}
	return own
}

// local is the backend's view of the lease for cfg.
func (k *leaseKeeper) local(cfg *lease.Config) backend.Local {
	return backendLocal(k.node, k.self, cfg)
}

// backendLocal is the backend's view of node's lease self for cfg.
func backendLocal(node string, self *lease.Record, cfg *lease.Config) backend.Local {
	local := backend.Local{Node: node, Subnet: self.Subnet}
	for f, pool := range cfg.Pools().All() {
		if pool != nil {
			local.Network.Set(f, pool.Network)
		}
	}
	return local
}

// writeSubnetEnv writes the subnet file for the lease, cfg and be.
func (k *leaseKeeper) writeSubnetEnv(cfg *lease.Config, be backend.Backend) error {
	env := subnetenv.Env{Subnet: k.self.Subnet, MTU: be.MTU(), IPMasq: k.o.IPMasq, Backend: be.Type()}
	env.Docker0Bits = k.ipam.lease(env.Subnet) // docker0's share; the rest is the driver's
	for f := range ipfam.Valid(k.self.Subnet) {
		env.Network.Set(f, cfg.Pools().Get(f).Network)
	}
	changed, err := subnetenv.Write(k.o.SubnetFile, env)
	if err != nil {
		return fmt.Errorf("subnet file (--subnet-file): %w", err)
	}
	if changed {
		kv := []any{"path", k.o.SubnetFile}
		if env.Subnet.V4.IsValid() {
			kv = append(kv, "subnet", env.Subnet.V4)
		}
		if env.Subnet.V6.IsValid() {
			kv = append(kv, "ipv6Subnet", env.Subnet.V6)
		}
		klog.InfoS("wrote subnet file", append(kv, "mtu", env.MTU)...)
	}
	return nil
}

// orphan leaves the lease to expire on its own (the agent ends; a restarted
// agent claims it again).
func (k *leaseKeeper) orphan() {
	if k.sess != nil {
		k.sess.Orphan()
	}
}
