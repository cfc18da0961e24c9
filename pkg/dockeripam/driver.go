package dockeripam

import (
	"encoding/json"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/leased/leased/internal/atomicfile"
)

// Name is the driver name users give Docker: --ipam-driver=leased.
const Name = "leased"

// Address spaces the driver reports. Only the local one is served: a
// pool belongs to one host's lease, so swarm-scoped networks cannot use it.
const (
	LocalSpace  = "leased-local"
	GlobalSpace = "leased-global"
)

// Option keys Docker passes to RequestAddress.
const (
	optAddressType = "RequestAddressType"
	gatewayType    = "com.docker.network.gateway"
)

// Pool is one network's pool as the state file keeps it.
type Pool struct {
	// Prefix is the pool; its string is the PoolID Docker holds.
	Prefix netip.Prefix `json:"prefix"`
	// Range is the --ip-range containers' addresses come from (zero: the
	// whole pool).
	Range netip.Prefix `json:"range,omitzero"`
	// Addrs are the addresses handed out (gateway, containers, --aux-address).
	Addrs []netip.Addr `json:"addresses"`
	// Created is when Docker asked for the pool.
	Created time.Time `json:"created"`
}

// ID is the PoolID Docker holds for p.
func (p *Pool) ID() string { return p.Prefix.String() }

type state struct {
	Pools []*Pool `json:"pools"`
}

// Driver hands out pools and addresses. Its methods are safe for
// concurrent use.
type Driver struct {
	path  string
	split Split

	mu      sync.Mutex
	known   bool                     // SetSubnets ran: the lease is held
	subnets ipfam.Pair[netip.Prefix] // the leased subnets
	broken  error                    // the split does not fit the lease (SetSubnets)
	refuse  error                    // why every pool request is refused (nil: none)
	keepAll bool                     // docker0 keeps the whole lease (Docker0KeepsAll)
	pools   map[string]*Pool
	// OnChange, when set, runs (under the lock) after the pools changed,
	// with the number of pools per family (for the metric).
	onChange func(n4, n6 int)
}

// New returns a driver that keeps its state in the file at path, loading
// the pools a previous run saved. A state file that cannot be read is an
// error: the pools in it are still Docker's, and handing them out again
// would give two networks one subnet.
func New(path string, split Split, onChange func(n4, n6 int)) (*Driver, error) {
	d := &Driver{path: path, split: split, pools: map[string]*Pool{}, onChange: onChange}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("reading the Docker IPAM state: %w", err)
	default:
		var st state
		if err := json.Unmarshal(data, &st); err != nil {
			return nil, fmt.Errorf("the Docker IPAM state %s is corrupt (%v): it lists the pools of this host's Docker networks; repair it, or move it away after removing every network with --ipam-driver=%s", path, err, Name)
		}
		for _, p := range st.Pools {
			if p == nil || !p.Prefix.IsValid() {
				return nil, fmt.Errorf("the Docker IPAM state %s holds a pool without a prefix: repair it, or move it away after removing every network with --ipam-driver=%s", path, Name)
			}
			d.pools[p.ID()] = p
		}
	}
	d.changed()
	return d, nil
}

// ReadPools returns the pools in the state file at path, for `leased
// status` (nil when the file does not exist).
func ReadPools(path string) ([]Pool, error) {
	d, err := New(path, DefaultSplit, nil)
	if err != nil {
		return nil, err
	}
	return d.Pools(), nil
}

// Pools returns a copy of the pools, sorted by prefix (IPv4 first).
func (d *Driver) Pools() []Pool {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []Pool
	for _, p := range d.pools {
		c := *p
		c.Addrs = slices.Clone(p.Addrs)
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i].Prefix, out[j].Prefix
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c < 0
		}
		return a.Bits() < b.Bits()
	})
	return out
}

// SetSubnets tells the driver this host's leased subnets (a zero prefix:
// the family is not enabled). The agent calls it whenever it holds its
// lease. Pools that lie outside a new lease are kept (Docker still uses
// them) but logged: their containers are no longer reachable from other
// hosts until the network is recreated. The error says the split does not
// fit these subnets; the driver then refuses every pool with it, and
// docker0 should keep the whole lease.
func (d *Driver) SetSubnets(subnets ipfam.Pair[netip.Prefix]) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.known && !d.keepAll && d.subnets == subnets {
		return d.broken
	}
	d.known, d.subnets = true, subnets
	d.keepAll, d.refuse = false, nil
	if d.broken = d.split.Validate(subnets); d.broken != nil {
		d.refuse = fmt.Errorf("the agent's pool sizes do not fit this host's lease: %w", d.broken)
		return d.broken
	}
	for _, p := range d.sorted() {
		subnet := subnets.Get(ipfam.Of(p.Prefix.Addr()))
		switch {
		case !subnet.IsValid() || !subnet.Contains(p.Prefix.Addr()) || p.Prefix.Bits() < subnet.Bits():
			klog.Warningf("Docker network pool %s is outside this host's leased subnets %v: its containers are not reachable from other hosts; recreate the network (docker network rm, then create it again, or docker compose down and up) to move it into the lease", p.Prefix, validOnly(subnets))
		case p.Prefix.Overlaps(d.split.Docker0(subnet)):
			klog.Warningf("Docker network pool %s overlaps docker0's share %s of this host's subnet: --docker-ipam-docker0-bits changed since it was made; recreate the network to move it", p.Prefix, d.split.Docker0(subnet))
		}
	}
	return nil
}

// Docker0KeepsAll tells the driver this host's leased subnets while
// docker0 keeps all of them (the agent does so when docker0 already had the
// whole lease, so as not to renumber it under running containers): every
// pool request is refused with why, and existing pools stay.
func (d *Driver) Docker0KeepsAll(subnets ipfam.Pair[netip.Prefix], why error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.known, d.subnets = true, subnets
	d.keepAll, d.broken, d.refuse = true, nil, why
}

// validOnly returns the valid prefixes of ps, IPv4 first.
func validOnly(ps ipfam.Pair[netip.Prefix]) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ipfam.Valid(ps) {
		out = append(out, p)
	}
	return out
}

func (d *Driver) sorted() []*Pool {
	var ps []*Pool
	for _, p := range d.pools {
		ps = append(ps, p)
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].Prefix.Addr().Less(ps[j].Prefix.Addr()) })
	return ps
}

// PoolRequest is what Docker asks RequestPool for.
type PoolRequest struct {
	AddressSpace string
	Pool         string // --subnet, "" for any
	SubPool      string // --ip-range
	Options      map[string]string
	V6           bool
}

// RequestPool reserves a pool: the one asked for (Pool) when it lies in
// this host's lease and is free, else the first free slice.
func (d *Driver) RequestPool(r PoolRequest) (*Pool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if r.AddressSpace == GlobalSpace {
		return nil, fmt.Errorf("the %s IPAM driver serves only local networks (e.g. bridge): its pools belong to one host's lease; use another driver for swarm-scoped networks", Name)
	}
	for k := range r.Options {
		return nil, fmt.Errorf("unknown IPAM option %q: the %s IPAM driver takes no --ipam-opt; remove it (pool sizes are set on the agent: --docker-ipam-pool-bits4/6)", k, Name)
	}
	subnet := d.subnets.V4
	if r.V6 {
		subnet = d.subnets.V6
	}
	if !d.known {
		return nil, fmt.Errorf("this host holds no leased subnet yet (the leased agent is still acquiring its lease; see journalctl -u leased or leased status): retry once the agent is ready")
	}
	if d.refuse != nil {
		return nil, d.refuse
	}
	switch {
	case subnet.IsValid():
	case r.V6:
		return nil, fmt.Errorf("IPv6 is not enabled in the leased network config, so this host has no IPv6 subnet to carve: create the network without --ipv6 and IPv6 --subnet, or enable IPv6 in the cluster's config (leased config put)")
	default:
		return nil, fmt.Errorf("IPv4 is not enabled in the leased network config, so this host has no IPv4 subnet to carve, and Docker asks for an IPv4 pool for every network: use Docker's default IPAM driver for this network (leave --ipam-driver out), or enable IPv4 in the cluster's config (leased config put)")
	}
	var used []netip.Prefix
	for _, p := range d.pools {
		used = append(used, p.Prefix)
	}
	var pool netip.Prefix
	if r.Pool != "" {
		p, err := netip.ParsePrefix(r.Pool)
		if err != nil {
			return nil, fmt.Errorf("--subnet %q is not a CIDR prefix such as %s", r.Pool, d.split.Docker0(subnet))
		}
		if err := d.split.Check(p, subnet, used); err != nil {
			return nil, err
		}
		pool = p
	} else {
		p, err := d.split.Carve(subnet, used)
		if err != nil {
			return nil, err
		}
		pool = p
	}
	np := &Pool{Prefix: pool, Created: time.Now().UTC().Truncate(time.Second)}
	if r.SubPool != "" {
		rg, err := netip.ParsePrefix(r.SubPool)
		if err != nil || rg.Masked() != rg || rg.Bits() < pool.Bits() || !pool.Contains(rg.Addr()) {
			return nil, fmt.Errorf("--ip-range %q is not a network prefix inside the pool %s: use one inside it", r.SubPool, pool)
		}
		np.Range = rg
	}
	d.pools[np.ID()] = np
	if err := d.save(); err != nil {
		delete(d.pools, np.ID())
		return nil, err
	}
	klog.InfoS("Docker network pool reserved", "pool", pool, "lease", subnet)
	c := *np
	return &c, nil
}

// ReleasePool frees a pool (docker network rm). An unknown pool is not an
// error: Docker may retry a release that was done.
func (d *Driver) ReleasePool(id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.pools[id]
	if !ok {
		klog.V(2).InfoS("Docker asked to release an unknown pool", "pool", id)
		return nil
	}
	delete(d.pools, id)
	if err := d.save(); err != nil {
		d.pools[id] = p
		return err
	}
	klog.InfoS("Docker network pool released", "pool", id)
	return nil
}

// RequestAddress hands out an address of a pool: want when given and
// free, else the lowest free one (the first host address for a gateway,
// else in the pool's range). The result has the pool's prefix length.
func (d *Driver) RequestAddress(id, want string, opts map[string]string) (netip.Prefix, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.pools[id]
	if !ok {
		return netip.Prefix{}, fmt.Errorf("unknown pool %q: the leased agent's state (--docker-ipam-state) has no such pool; recreate the network", id)
	}
	var a netip.Addr
	if want != "" {
		w, err := netip.ParseAddr(want)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("address %q is not an IP address", want)
		}
		if !p.Prefix.Contains(w) {
			return netip.Prefix{}, fmt.Errorf("address %s is outside the network's subnet %s", w, p.Prefix)
		}
		if slices.Contains(p.Addrs, w) {
			return netip.Prefix{}, fmt.Errorf("address %s is already in use on the network %s", w, p.Prefix)
		}
		a = w
	} else {
		rg := p.Range
		if opts[optAddressType] == gatewayType || !rg.IsValid() {
			rg = p.Prefix
		}
		var err error
		if a, err = lowestFree(rg, p.Prefix, p.Addrs); err != nil {
			return netip.Prefix{}, err
		}
	}
	p.Addrs = append(p.Addrs, a)
	slices.SortFunc(p.Addrs, netip.Addr.Compare)
	if err := d.save(); err != nil {
		p.Addrs = slices.DeleteFunc(p.Addrs, func(x netip.Addr) bool { return x == a })
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, p.Prefix.Bits()), nil
}

// lowestFree is the lowest address in rg that is neither used, nor pool's
// network address, nor (IPv4) its broadcast address.
func lowestFree(rg, pool netip.Prefix, used []netip.Addr) (netip.Addr, error) {
	net, bcast := pool.Masked().Addr(), last(pool)
	end := last(rg)
	for a := rg.Masked().Addr(); ; a = a.Next() {
		if a != net && !(a.Is4() && a == bcast) && !slices.Contains(used, a) {
			return a, nil
		}
		if a == end {
			break
		}
	}
	return netip.Addr{}, fmt.Errorf("no free address left in %s (%d in use): remove unused containers, or create a larger network (leave --subnet out, or raise --docker-ipam-pool-bits on the agent)", rg, len(used))
}

// ReleaseAddress frees an address of a pool.
func (d *Driver) ReleaseAddress(id, addr string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.pools[id]
	if !ok {
		return nil
	}
	a, err := netip.ParseAddr(addr)
	if err != nil {
		return fmt.Errorf("address %q is not an IP address", addr)
	}
	i := slices.Index(p.Addrs, a)
	if i < 0 {
		return nil
	}
	p.Addrs = slices.Delete(p.Addrs, i, i+1)
	if err := d.save(); err != nil {
		p.Addrs = slices.Insert(p.Addrs, i, a)
		return err
	}
	return nil
}

// save writes the state file atomically (temporary file, sync, rename).
// The caller holds d.mu.
func (d *Driver) save() error {
	st := state{Pools: d.sorted()}
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	data = append(data, '\n')
	if err := writeAtomic(d.path, data); err != nil {
		return fmt.Errorf("saving the leased Docker IPAM state (--docker-ipam-state): %w", err)
	}
	d.changed()
	return nil
}

func (d *Driver) changed() {
	if d.onChange == nil {
		return
	}
	n4, n6 := 0, 0
	for _, p := range d.pools {
		if p.Prefix.Addr().Is4() {
			n4++
		} else {
			n6++
		}
	}
	d.onChange(n4, n6)
}

// writeAtomic replaces the file at path with data (mode 0644), creating
// its directory (0755) if missing; see atomicfile.Write. A failed sync of
// the directory after the rename is logged, not returned: the new content
// is in place and the caller's state must match it.
func writeAtomic(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("creating the directory of %s: %w", path, err)
	}
	err := atomicfile.Write(path, data, 0o644)
	if errors.Is(err, atomicfile.ErrDirSync) {
		klog.ErrorS(err, "saved the Docker IPAM state, but a crash may bring back its previous content; check the file system's health")
		return nil
	}
	return err
}
