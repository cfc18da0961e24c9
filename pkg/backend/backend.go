// Package backend turns the lease set into kernel state: routes, VXLAN
// devices with FDB and neighbour entries, forwarding rules. It never talks to
// etcd; callers hand it the host's own lease and the peer set.
//
// Every backend is a desired-state reconciler: SetPeers describes the whole
// world, UpdatePeers a change to it, and either may be called any number of
// times with the same input; Run keeps the kernel in line with the last
// description until its context ends.
package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/leased/leased/pkg/ipfam"
)

// Backend type names as they appear in the network config's Backend.Type.
const (
	TypeHostGW   = "host-gw"
	TypeVXLAN    = "vxlan"
	TypeProxyNDP = "proxy-ndp"
)

// ErrUnknownType is returned by New for a Backend.Type this build does not know.
var ErrUnknownType = errors.New("backend: unknown backend type")

// Peer is another host's lease as the datapath needs it. A zero subnet of a
// family means the peer holds no subnet of that family.
type Peer struct {
	Node string
	// Subnet and PublicIP are the peer's subnet and public address per
	// family (lease.Record's fields of the same names).
	Subnet   ipfam.Pair[netip.Prefix]
	PublicIP ipfam.Pair[netip.Addr]
	// BackendType and BackendData are what the peer's own backend published
	// in its lease (LeaseData); each backend decodes its own format and
	// ignores peers whose data it cannot use, with a log line.
	BackendType string
	BackendData json.RawMessage
}

// Local is this host's own lease and the cluster networks it belongs to. A
// zero Subnet and Network of a family means the family is disabled.
type Local struct {
	Node    string
	Subnet  ipfam.Pair[netip.Prefix]
	Network ipfam.Pair[netip.Prefix]
}

// ExtIface is the interface that carries traffic between hosts: one ExtLink
// per address family.
//
// V4 describes the link IPv4 uses. IPv6 uses the same link unless V6.Index
// is set to another link's index: then V6's Name, Index, MTU and
// HardwareAddr describe the link IPv6 uses (the agent, without --iface,
// takes each family's default route's link, and the two may differ). With
// V6.Index set, V6.Name is required, V6.MTU 0 means V4.MTU, and a nil
// V6.HardwareAddr is read from the link when needed (proxy-ndp); with
// V6.Index 0 (or V4.Index) they are ignored, so a caller with one link sets
// only V4's. Addr and Public are each family's own in either case. Backends
// read a family's link with Link.
type ExtIface ipfam.Pair[ExtLink]

// ExtLink is the link one address family's inter-host traffic uses.
type ExtLink struct {
	Name         string
	Index        int
	MTU          int
	HardwareAddr net.HardwareAddr
	// Addr is an address of the family configured on the link (zero if
	// there is none): the VXLAN underlay source address.
	Addr netip.Addr
	// Public is the address of the family peers use to reach this host
	// (--public-ip/--public-ipv6, else Addr).
	Public netip.Addr
}

// Split reports whether IPv6 uses another link than IPv4.
func (e ExtIface) Split() bool { return e.V6.Index > 0 && e.V6.Index != e.V4.Index }

// Link returns the link family f's traffic uses, with f's addresses.
func (e ExtIface) Link(f ipfam.Family) ExtLink {
	if f == ipfam.IPv4 {
		return e.V4
	}
	l := e.V6
	if !e.Split() {
		l.Name, l.Index, l.MTU, l.HardwareAddr = e.V4.Name, e.V4.Index, e.V4.MTU, e.V4.HardwareAddr
	} else if l.MTU <= 0 {
		l.MTU = e.V4.MTU
	}
	return l
}

// Public returns each family's public address (ExtLink.Public).
func (e ExtIface) Public() ipfam.Pair[netip.Addr] {
	return ipfam.Pair[netip.Addr]{V4: e.V4.Public, V6: e.V6.Public}
}

// validate reports an ExtIface New cannot use.
func (e ExtIface) validate() error {
	if e.V4.Index <= 0 || e.V4.MTU <= 0 {
		return fmt.Errorf("backend: external interface %q needs an index and an MTU", e.V4.Name)
	}
	if e.V6.Index < 0 || e.V6.MTU < 0 || (e.Split() && e.V6.Name == "") {
		return fmt.Errorf("backend: external IPv6 link #%d (%q) needs a name, a positive index and an MTU (or index 0 to use %s for IPv6 too)", e.V6.Index, e.V6.Name, e.V4.Name)
	}
	return nil
}

// minMTU is the smallest MTU of the links local's enabled families use
// (zero Local, before Start: of both links).
func (e ExtIface) minMTU(local Local) int {
	m := 0
	for f, s := range local.Subnet.All() {
		if s.IsValid() || !ipfam.Any(local.Subnet) {
			if mtu := e.Link(f).MTU; m == 0 || mtu < m {
				m = mtu
			}
		}
	}
	return m
}

// Options are the settings every backend shares, from flags.
type Options struct {
	// IPMasq masquerades traffic from the local subnets that leaves the
	// cluster network, for each enabled family (--ip-masq): iptables for
	// IPv4, ip6tables for IPv6.
	IPMasq bool
	// NoForwardRules leaves the filter table's FORWARD chain to the
	// operator (--iptables-forward-rules=false): leased installs no
	// LEASED-FWD chain and removes one an earlier run left.
	NoForwardRules bool
	// Resync is the period of the full kernel comparison in Run (0: 10s).
	Resync time.Duration
	// NetNS is the path of the network namespace to program (e.g.
	// /var/run/netns/NAME); empty means the agent's own. Tests use it to
	// run several hosts in one process.
	NetNS string
}

// Backend programs the datapath for one host.
//
// Call order: New, then SetPeers with the whole peer set and Start once the
// host holds a lease (Start again whenever the lease changes), then
// UpdatePeers with each change, any number of times, with Run running in its
// own goroutine for the backend's lifetime. The caller computes what changed;
// the backend applies it to its desired state and, on its resync timer,
// compares the whole desired state with the kernel. SetPeers, UpdatePeers
// and Start may be called from any goroutine; the backend serialises them.
type Backend interface {
	// Type returns the backend type name (TypeHostGW, ...).
	Type() string
	// LeaseData returns what this host publishes in its lease for peers'
	// backends (e.g. the VTEP MAC); nil when there is nothing.
	LeaseData() json.RawMessage
	// MTU returns the MTU containers on this host must use.
	MTU() int
	// Start programs host-local state for the lease: devices, addresses,
	// sysctls, forwarding rules. Idempotent. It leaves peer state (routes,
	// FDB, neighbours) alone until the first SetPeers, so that a restarted
	// agent never prunes against a peer set it has not yet received.
	Start(ctx context.Context, local Local) error
	// SetPeers replaces the desired peer set and runs one reconcile pass
	// over all of it before returning. Peers that are invalid for this
	// backend are skipped with a log line. The error joins every failure of
	// the pass; what failed is retried by the next pass. The agent calls it
	// once per backend, with the whole set; changes go through UpdatePeers.
	//
	// The backend keeps the peers' Node, BackendType and BackendData
	// without copying them (one copy of a fleet's lease data, not two):
	// the caller must not modify the bytes of a BackendData it handed
	// over, here or in UpdatePeers. The agent hands over its decoded
	// lease records' values, which are never modified (a changed lease is
	// a new record). The peers slice itself is not kept.
	SetPeers(ctx context.Context, peers []Peer) error
	// UpdatePeers applies a change to the desired peer set: upserts are
	// added or replace the peers of their nodes, the nodes in removed are
	// dropped (a node must not be in both). It has the effect of SetPeers
	// with the changed set, at a cost that follows the change, not the
	// size of the set. Before the first SetPeers it changes the set from
	// empty, and the first pass prunes against it.
	UpdatePeers(ctx context.Context, upserts []Peer, removed []string) error
	// Run keeps the kernel in line with the desired state — reacting to
	// netlink events and resyncing periodically — until ctx is done. It
	// returns nil when ctx is cancelled. Kernel state is left in place so
	// that a restarted agent disturbs no traffic.
	Run(ctx context.Context) error
}
