package lease

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// DefaultPrefix is the etcd key prefix under which leased keeps its data.
const DefaultPrefix = "/leased/network"

// Keys is the etcd key layout under one prefix. See
// Documentation/etcd-data-model.md.
//
//	<prefix>/config                 network config (JSON, written by the operator)
//	<prefix>/leases/<node>          a host's lease record (JSON, under the host's etcd lease)
//	<prefix>/subnets/<a.b.c.d-len>  owner lock of one IPv4 subnet (value: node; under the lease)
//	<prefix>/subnets6/<addr-len>    owner lock of one IPv6 subnet (value: node; under the lease)
//	<prefix>/nodes/<node>           the subnets a node last held (JSON, no TTL; affinity)
//	<prefix>/reservations/<node>    subnets pinned to a node (JSON, no TTL; written by operators)
type Keys struct{ prefix string }

// NewKeys returns the layout under prefix (trailing slashes are dropped).
func NewKeys(prefix string) Keys {
	p := strings.TrimRight(prefix, "/")
	if p == "" {
		p = DefaultPrefix
	}
	return Keys{prefix: p}
}

// Prefix returns the root prefix with a trailing slash, for prefix watches.
func (k Keys) Prefix() string { return k.prefix + "/" }

// Config returns the config key.
func (k Keys) Config() string { return k.prefix + "/config" }

// Leases returns the prefix of all lease records.
func (k Keys) Leases() string { return k.prefix + "/leases/" }

// Lease returns the lease record key of node.
func (k Keys) Lease(node string) string { return k.Leases() + node }

// Nodes returns the prefix of the affinity records.
func (k Keys) Nodes() string { return k.prefix + "/nodes/" }

// Node returns the affinity record key of node.
func (k Keys) Node(node string) string { return k.Nodes() + node }

// Reservations returns the prefix of reservations.
func (k Keys) Reservations() string { return k.prefix + "/reservations/" }

// Reservation returns the reservation key of node.
func (k Keys) Reservation(node string) string { return k.Reservations() + node }

// SubnetLocks returns the prefix of the owner locks of the family of p.
func (k Keys) SubnetLocks(v6 bool) string {
	if v6 {
		return k.prefix + "/subnets6/"
	}
	return k.prefix + "/subnets/"
}

// SubnetLock returns the owner-lock key of subnet s.
func (k Keys) SubnetLock(s netip.Prefix) string {
	return k.SubnetLocks(s.Addr().Is6()) + SubnetKey(s)
}

// SubnetKey renders s as it appears in keys: "10.100.15.0-24".
func SubnetKey(s netip.Prefix) string {
	return s.Addr().String() + "-" + strconv.Itoa(s.Bits())
}

// ParseSubnetKey parses the last element of a subnet lock key.
func ParseSubnetKey(s string) (netip.Prefix, error) {
	i := strings.LastIndexByte(s, '-')
	if i < 0 {
		return netip.Prefix{}, fmt.Errorf("lease: subnet key %q: want <address>-<length>", s)
	}
	p, err := netip.ParsePrefix(s[:i] + "/" + s[i+1:])
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("lease: subnet key %q: %w", s, err)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("lease: subnet key %q is not a network address", s)
	}
	return p, nil
}

// ValidNodeName reports whether name can be used as a node name: 1-253
// characters of letters, digits, '.', '_' and '-', starting with a letter or
// digit (so that it is one etcd key element and safe in logs).
func ValidNodeName(name string) error {
	ok := len(name) > 0 && len(name) <= 253
	for i := 0; ok && i < len(name); i++ {
		c := name[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		ok = alnum || i > 0 && (c == '.' || c == '_' || c == '-')
	}
	if !ok {
		return fmt.Errorf("lease: node name %q is invalid: use 1-253 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return nil
}

// What a host follows of the prefix, in one place. The keys sort as
//
//	config < leases/ < nodes/ < reservations/ < subnets/ < subnets6/
//
// so one range, from Config up to (not including) "<prefix>/leases0"
// ('0' is the byte after '/'), holds exactly the config and the lease
// records: the peer watch (Registry.Watch) watches that range and is sent
// nothing else. A join, a restart or an expiry of another host then costs
// each watching host one event (its record), not one per key the host
// writes. The host's own subnet locks are watched one by one
// (Registry.WatchLocks), for the ownership checks; affinity and
// reservations are read when the host claims. A key kind added to the
// layout must be added to keyKinds (TestWatchCoversEveryKeyKind fails
// otherwise), saying which of these follows it.

// PeerRange returns the key range [start, end) the peer watch follows:
// the config key and every lease record, nothing else.
func (k Keys) PeerRange() (start, end string) {
	return k.Config(), k.prefix + "/leases0"
}

// follow says how a running host learns of changes to one kind of key.
type follow int

const (
	followPeerRange follow = iota // in PeerRange: Registry.Watch
	followOwnLocks                // the host's own locks only: Registry.WatchLocks
	followOnClaim                 // read when the host claims (Acquire), not watched
)

// keyKind is one kind of key of the layout, with an example key.
type keyKind struct {
	name   string
	key    func(Keys) string
	follow follow
}

// keyKinds lists every kind of key leased writes or reads under the
// prefix and how a running host follows it.
var keyKinds = []keyKind{
	{"config", func(k Keys) string { return k.Config() }, followPeerRange},
	{"lease record", func(k Keys) string { return k.Lease("host-1") }, followPeerRange},
	{"affinity", func(k Keys) string { return k.Node("host-1") }, followOnClaim},
	{"reservation", func(k Keys) string { return k.Reservation("host-1") }, followOnClaim},
	{"IPv4 lock", func(k Keys) string { return k.SubnetLock(netip.MustParsePrefix("10.1.2.0/24")) }, followOwnLocks},
	{"IPv6 lock", func(k Keys) string { return k.SubnetLock(netip.MustParsePrefix("2001:db8:1::/64")) }, followOwnLocks},
}
