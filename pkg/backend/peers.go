package backend

import (
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"slices"

	"k8s.io/klog/v2"
)

// peerFamily is one address family of a peer's lease.
type peerFamily struct {
	fam     ipfam.Family
	subnet  netip.Prefix // the peer's subnet of this family
	public  netip.Addr   // the peer's public address of this family
	network netip.Prefix // our cluster network of this family
	own     netip.Prefix // our own subnet of this family
}

// families returns the families both the peer and this host have, so that
// v4 and v6 go through the same code.
func families(local Local, p Peer) (out [2]peerFamily, n int) {
	for f, network := range local.Network.All() {
		if s := p.Subnet.Get(f); network.IsValid() && s.IsValid() {
			out[n] = peerFamily{f, s.Masked(), p.PublicIP.Get(f), network, local.Subnet.Get(f)}
			n++
		}
	}
	return out, n
}

// check returns why the peer's subnet must not be routed, or "".
func (f peerFamily) check() string {
	switch {
	case ipfam.Of(f.subnet.Addr()) != f.fam || f.subnet.Bits() < f.network.Bits() || !f.network.Contains(f.subnet.Addr()):
		return fmt.Sprintf("peer subnet is outside the cluster network %s: skipped", f.network)
	case f.own.IsValid() && f.own.Overlaps(f.subnet):
		return fmt.Sprintf("peer subnet overlaps this host's subnet %s: skipped", f.own)
	}
	return ""
}

// refusal returns why the peer family's subnet must not be routed on this
// host — outside the network, overlapping this host's subnet, or
// overlapping a route leased did not install — or "".
func (in input) refusal(f peerFamily) string {
	if r := f.check(); r != "" {
		return r
	}
	return foreignRefusal(in.foreign, f)
}

// onLink reports whether a is inside one of the connected prefixes.
func onLink(a netip.Addr, connected []netip.Prefix) bool {
	return slices.ContainsFunc(connected, func(p netip.Prefix) bool { return p.Contains(a) })
}

// peerRoute is how a peer is reached: its subnets and public addresses.
type peerRoute struct{ node, subnet, via string }

func peerRoutes(peers []Peer) map[peerRoute]bool {
	out := map[peerRoute]bool{}
	for _, p := range peers {
		for f, s := range ipfam.Valid(p.Subnet) {
			out[peerRoute{p.Node, s.String(), p.PublicIP.Get(f).String()}] = true
		}
	}
	return out
}

// logPeerChanges logs each subnet that appeared or disappeared between two
// peer sets (a summary for large changes, see logEach).
func logPeerChanges(before, after []Peer) {
	b, a := peerRoutes(before), peerRoutes(after)
	var added, removed []peerRoute
	for r := range a {
		if !b[r] {
			added = append(added, r)
		}
	}
	for r := range b {
		if !a[r] {
			removed = append(removed, r)
		}
	}
	if !logEach("Subnets changed", len(added)+len(removed), len(added), 0, len(removed)) {
		return
	}
	for _, r := range added {
		klog.InfoS("Subnet added", "node", r.node, "subnet", r.subnet, "via", r.via)
	}
	for _, r := range removed {
		klog.InfoS("Subnet removed", "node", r.node, "subnet", r.subnet, "via", r.via)
	}
}
