package backend

import (
	"context"
	"errors"
	"fmt"
	"sort"
)

// Drift is how the kernel differs from what the leases ask for: entries
// missing (or different) and entries of ours that should not be there.
type Drift struct {
	Missing []string
	Extra   []string
}

// Empty reports whether the kernel matches the leases.
func (d Drift) Empty() bool { return len(d.Missing) == 0 && len(d.Extra) == 0 }

// Check compares, without changing anything, the kernel with the datapath b
// would program for local and peers: routes, FDB and neighbour entries and
// the VXLAN devices (vxlan), and for proxy-ndp whether a leased process
// listens for neighbour solicitations on the uplink and whether kernel proxy
// entries answer for the cluster network besides it (check_ndp.go). It is
// what `leased status` reports. b must come from New and must not have
// been started in this process.
func Check(ctx context.Context, b Backend, local Local, peers []Peer) (Drift, error) {
	var ndp *proxyNDP
	e, ok := b.(*engine)
	if p, isNDP := b.(*proxyNDP); isNDP {
		e, ndp, ok = p.engine, p, true
	}
	if !ok {
		return Drift{}, errors.New("backend: Check needs a backend made by New")
	}
	if err := ctx.Err(); err != nil {
		return Drift{}, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	var d Drift
	var owned []int
	if v, ok := e.dp.(*vxlan); ok {
		// The desired state names the devices by ifindex; take the
		// indexes of the devices as they are (ensure, which would set
		// them, changes the kernel).
		for i, dev := range v.devs {
			v.idx[i] = 0
			l, err := e.k.LinkByName(dev.name)
			if !enabled(local, i == 1) {
				if err == nil {
					d.Extra = append(d.Extra, "device "+dev.name+" (its family holds no subnet)")
				}
				continue
			}
			if err != nil {
				d.Missing = append(d.Missing, "device "+dev.name)
				continue
			}
			if why := dev.mismatch(l); why != "" {
				d.Extra = append(d.Extra, fmt.Sprintf("device %s (%s)", dev.name, why))
			}
			v.idx[i] = l.Attrs().Index
			owned = append(owned, v.idx[i])
		}
	}
	if ndp != nil {
		m, x, err := ndp.checkAnswers(local)
		if err != nil {
			return d, err
		}
		d.Missing = append(d.Missing, m...)
		d.Extra = append(d.Extra, x...)
	}
	connected, err := e.connected()
	if err != nil {
		return d, err
	}
	routes, foreign, err := e.listAllRoutesFor(local)
	if err != nil {
		return d, fmt.Errorf("listing routes: %w", err)
	}
	want, _ := e.dp.desired(input{local: local, peers: peers, ext: e.ext, connected: connected, foreign: foreign})
	add := func(puts, dels []string) {
		d.Missing = append(d.Missing, puts...)
		d.Extra = append(d.Extra, dels...)
	}
	add(strs(diff(want.routes, routes)))
	if len(owned) > 0 {
		neighs, fdbs, err := e.listNeighs(owned)
		if err != nil {
			return d, fmt.Errorf("listing neighbours: %w", err)
		}
		add(strs(diff(want.neighs, neighs)))
		add(strs(diff(want.fdbs, fdbs)))
	}
	sort.Strings(d.Missing)
	sort.Strings(d.Extra)
	return d, nil
}

func strs[V interface{ String() string }](puts, dels []V) ([]string, []string) {
	conv := func(vs []V) []string {
		out := make([]string, 0, len(vs))
		for _, v := range vs {
			out = append(out, kindOf(v)+" "+v.String())
		}
		return out
	}
	return conv(puts), conv(dels)
}

func kindOf(v any) string {
	switch v.(type) {
	case route:
		return "route"
	case neigh:
		return "neighbour"
	case fdb:
		return "fdb"
	}
	return "entry"
}
