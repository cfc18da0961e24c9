package backend

import (
	"encoding/json"
	"fmt"
)

// hostGW routes each peer subnet via the peer's public address on the
// external interface. It needs every peer on-link: a peer behind a router is
// skipped with a log line (use vxlan for such clusters).
type hostGW struct{}

func (hostGW) ensure(kernel, Local) ([]int, error) { return nil, nil }

func (hostGW) mtu(Local) int { return 0 } // the engine substitutes ext.MTU

func (hostGW) leaseData() json.RawMessage { return nil }

func (hostGW) desired(in input) (state, []skip) {
	st := newStateFor(len(in.peers))
	var skips []skip
	for _, p := range in.peers {
		for _, f := range families(in.local, p) {
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
	if r := f.check(); r != "" {
		sk.reason = r
		return sk, false
	}
	if !f.public.IsValid() || f.public.Is4() == f.v6 {
		sk.reason = "peer has no public address of the subnet's family: skipped"
		return sk, false
	}
	if !onLink(f.public, in.connected) {
		sk.reason = fmt.Sprintf("peer not on-link via %s: use vxlan", in.ext.Name)
		return sk, false
	}
	r := route{Dst: f.subnet, Priority: defaultPriority(f.subnet), Gw: f.public, Link: in.ext.Index}
	if old, dup := st.routes[r.key()]; dup {
		sk.reason, sk.dup = fmt.Sprintf("peer subnet is already routed via %s: skipped", old.Gw), true
		return sk, false
	}
	st.routes[r.key()] = r
	return sk, true
}
