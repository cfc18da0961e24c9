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
)

// Backend type names as they appear in the network config's Backend.Type.
const (
	TypeHostGW   = "host-gw"
	TypeVXLAN    = "vxlan"
	TypeProxyNDP = "proxy-ndp"
)

// ErrUnknownType is returned by New for a Backend.Type this build does not know.
var ErrUnknownType = errors.New("backend: unknown backend type")

// Peer is another host's lease as the datapath needs it. A zero Subnet4 or
// Subnet6 means the peer holds no subnet of that family.
type Peer struct {
	Node      string
	Subnet4   netip.Prefix
	Subnet6   netip.Prefix
	PublicIP4 netip.Addr
	PublicIP6 netip.Addr
	// BackendType and BackendData are what the peer's own backend published
	// in its lease (LeaseData); each backend decodes its own format and
	// ignores peers whose data it cannot use, with a log line.
	BackendType string
	BackendData json.RawMessage
}

// Local is this host's own lease and the cluster networks it belongs to. A
// zero Subnet4/Network4 (Subnet6/Network6) means the family is disabled.
type Local struct {
	Node     string
	Subnet4  netip.Prefix
	Subnet6  netip.Prefix
	Network4 netip.Prefix
	Network6 netip.Prefix
}

// ExtIface is the interface that carries traffic between hosts, per
// address family.
//
// Name, Index, MTU and HardwareAddr describe the link IPv4 uses. IPv6 uses
// the same link unless Index6 is set to another link's index: then Name6,
// Index6, MTU6 and HardwareAddr6 describe the link IPv6 uses (the agent,
// without --iface, takes each family's default route's link, and the two
// may differ). Zero IPv6 fields mean "the IPv4 link", so a caller with one
// link sets only the IPv4 ones. Backends read a family's link with Link.
type ExtIface struct {
	Name  string
	Index int
	MTU   int
	// Name6, Index6, MTU6 and HardwareAddr6 are the IPv6 link when it is
	// not the IPv4 one (Index6 > 0 and != Index); otherwise they are
	// ignored. With Index6 set, Name6 is required, MTU6 0 means MTU, and a
	// nil HardwareAddr6 is read from the link when needed (proxy-ndp).
	Name6  string
	Index6 int
	MTU6   int
	// Addr4/Addr6 are addresses configured on the interface (zero if the
	// family has none): Addr4 on the IPv4 link, Addr6 on the IPv6 link.
	// They are the VXLAN underlay source addresses.
	Addr4 netip.Addr
	Addr6 netip.Addr
	// Public4/Public6 are the addresses peers use to reach this host
	// (--public-ip/--public-ipv6, else Addr4/Addr6).
	Public4 netip.Addr
	Public6 netip.Addr
	// HardwareAddr is the IPv4 link's MAC, HardwareAddr6 the IPv6 link's
	// (used by proxy-ndp).
	HardwareAddr  net.HardwareAddr
	HardwareAddr6 net.HardwareAddr
}

// ExtLink is the link one address family's inter-host traffic uses.
type ExtLink struct {
	Name         string
	Index        int
	MTU          int
	HardwareAddr net.HardwareAddr
}

// Split reports whether IPv6 uses another link than IPv4.
func (e ExtIface) Split() bool { return e.Index6 > 0 && e.Index6 != e.Index }

// Link returns the link of IPv6 (v6) or IPv4 (!v6) traffic.
func (e ExtIface) Link(v6 bool) ExtLink {
	if !v6 || !e.Split() {
		return ExtLink{Name: e.Name, Index: e.Index, MTU: e.MTU, HardwareAddr: e.HardwareAddr}
	}
	l := ExtLink{Name: e.Name6, Index: e.Index6, MTU: e.MTU6, HardwareAddr: e.HardwareAddr6}
	if l.MTU <= 0 {
		l.MTU = e.MTU
	}
	return l
}

// validate reports an ExtIface New cannot use.
func (e ExtIface) validate() error {
	if e.Index <= 0 || e.MTU <= 0 {
		return fmt.Errorf("backend: external interface %q needs an index and an MTU", e.Name)
	}
	if e.Index6 < 0 || e.MTU6 < 0 || (e.Split() && e.Name6 == "") {
		return fmt.Errorf("backend: external IPv6 link #%d (%q) needs a name, a positive index and an MTU (or Index6 0 to use %s for IPv6 too)", e.Index6, e.Name6, e.Name)
	}
	return nil
}

// minMTU is the smallest MTU of the links local's enabled families use
// (zero Local, before Start: of both links).
func (e ExtIface) minMTU(local Local) int {
	v4, v6 := local.Subnet4.IsValid(), local.Subnet6.IsValid()
	switch {
	case v4 && !v6:
		return e.Link(false).MTU
	case v6 && !v4:
		return e.Link(true).MTU
	}
	return min(e.Link(false).MTU, e.Link(true).MTU)
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
