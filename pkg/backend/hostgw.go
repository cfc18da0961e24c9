package backend

import (
	"encoding/json"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// hostGW routes each peer subnet via the peer's public address on the
// external interface of the subnet's family (ExtIface.Link). It needs every
// peer on-link there: a peer behind a router is skipped with a log line (use
// vxlan for such clusters).
type hostGW struct{}

func (hostGW) ensure(kernel, Local) ([]int, error) { return nil, nil }

func (hostGW) mtu(Local) int { return 0 } // the engine substitutes the links' MTU (ExtIface.minMTU)

func (hostGW) leaseData() json.RawMessage { return nil }

func (hostGW) desired(in input) (state, []skip) {
	st := newStateFor(len(in.peers))
	var skips []skip
	for _, p := range in.peers {
		fams, nf := families(in.local, p)
		for _, f := range fams[:nf] {
			if s, ok := directRoute(in, p, f, &st); !ok {
				skips = append(skips, s)
			}
		}
	}
	return st, skips
}

// directRoute adds the host-gw route for one peer family to st, or returns
// why it cannot.
func directRoute(in input, p Peer, f peerFamily, st *state) (skip, bool) {
	sk := skip{node: p.Node, subnet: f.subnet, gateway: f.public}
	if p.Node == in.local.Node {
		sk.reason = "peer has this host's node name: skipped"
		return sk, false
	}
	if r := in.refusal(f); r != "" {
		sk.reason = r
		return sk, false
	}
	if !f.public.IsValid() || ipfam.Of(f.public) != f.fam {
		sk.reason = "peer has no public address of the subnet's family: skipped"
		return sk, false
	}
	link := in.ext.Link(f.fam)
	if !onLink(f.public, in.connected) {
		sk.reason = fmt.Sprintf("peer not on-link via %s: use vxlan", link.Name)
		return sk, false
	}
	r := route{Dst: f.subnet, Priority: defaultPriority(f.subnet), Gw: f.public, Link: link.Index}
	if old, dup := st.routes[r.key()]; dup {
		sk.reason, sk.dup = fmt.Sprintf("peer subnet is already routed via %s: skipped", old.Gw), true
		return sk, false
	}
	st.routes[r.key()] = r
	return sk, true
}

// extPrefixes returns the prefixes configured on ext that make a gateway
// on-link: IPv4 ones of the IPv4 link and IPv6 ones of the IPv6 link (one
// dump when both families share the link).
func extPrefixes(k kernel, ext ExtIface) ([]netip.Prefix, error) {
	type dump struct {
		link   ExtLink
		family int
	}
	dumps := []dump{{ext.Link(ipfam.IPv4), netlink.FAMILY_ALL}}
	if ext.Split() {
		dumps = []dump{{ext.Link(ipfam.IPv4), netlink.FAMILY_V4}, {ext.Link(ipfam.IPv6), netlink.FAMILY_V6}}
	}
	var out []netip.Prefix
	for _, d := range dumps {
		addrs, err := k.AddrList(d.link.Index, d.family)
		if err != nil {
			return nil, fmt.Errorf("listing addresses of %s: %w", d.link.Name, err)
		}
		for _, a := range addrs {
			p, ok := prefixFromIPNet(a.IPNet)
			if !ok || (d.family == netlink.FAMILY_V4 && !p.Addr().Is4()) || (d.family == netlink.FAMILY_V6 && !p.Addr().Is6()) {
				continue
			}
			out = append(out, p.Masked())
		}
	}
	return out, nil
}
