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
	c, ok := b.(checker)
	if !ok {
		return Drift{}, errors.New("backend: Check needs a backend made by New")
	}
	return c.check(ctx, local, peers)
}

// checker is Check's part in the backends New returns.
type checker interface {
	check(ctx context.Context, local Local, peers []Peer) (Drift, error)
}

// deviceChecker is implemented by datapaths that own devices (vxlan).
type deviceChecker interface {
	// checkDevices reports, without changing anything, how the devices
	// differ from what local needs, and returns the ifindexes of those
	// that serve (whose neighbour and FDB entries Check compares).
	checkDevices(k kernel, local Local) (owned []int, missing, extra []string)
}

func (e *engine) check(ctx context.Context, local Local, peers []Peer) (Drift, error) {
	return e.checkWith(ctx, local, peers, nil)
}

func (b *proxyNDP) check(ctx context.Context, local Local, peers []Peer) (Drift, error) {
	return b.engine.checkWith(ctx, local, peers, b.checkAnswers)
}

// checkWith is Check for the engine; extra, when set, adds the backend's
// own findings (run with the engine's mutex held).
func (e *engine) checkWith(ctx context.Context, local Local, peers []Peer, extra func(Local) (missing, extra []string, err error)) (Drift, error) {
	if err := ctx.Err(); err != nil {
		return Drift{}, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	var d Drift
	var owned []int
	if dc, ok := e.dp.(deviceChecker); ok {
		var m, x []string
		owned, m, x = dc.checkDevices(e.k, local)
		d.Missing = append(d.Missing, m...)
		d.Extra = append(d.Extra, x...)
	}
	if extra != nil {
		m, x, err := extra(local)
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
