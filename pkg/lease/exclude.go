package lease

import (
	"math/big"
	"net/netip"
	"slices"
	"strings"

	"k8s.io/klog/v2"
)

// Excluded is a part of the address space this host must not take a subnet
// from because the host already routes it itself: a connected LAN, a VPN's
// or a static route's link, an address of its own. A subnet there would
// make the host route its containers' traffic onto that link (and the
// peers send theirs to this host), so Acquire skips every candidate that
// overlaps one, preferred ones (reservation, Keep, lease record, affinity,
// Hint) included.
type Excluded struct {
	Prefix netip.Prefix
	// Route is how the host routes Prefix, for the log line, e.g.
	// "10.10.10.0/24 dev eth1 proto kernel".
	Route string
	// Own marks a route that may be this host's own subnet from an
	// earlier run: one on a bridge (dockerd's, carrying --bip) or on one
	// of leased's devices. It does not exclude a subnet this host held
	// before (its reservation, Keep, lease record, affinity record or
	// Hint) that contains it; elsewhere it excludes like any other.
	Own bool
}

func (x Excluded) String() string {
	if x.Route != "" {
		return x.Route
	}
	return x.Prefix.String()
}

// setExcluded keeps the exclusions that matter to f's pool: those of its
// family that overlap its range, minus Own ones inside a subnet the node
// held before (f.prefs).
func (f *family) setExcluded(all []Excluded) {
	v6 := f.pool.Network.Addr().Is6()
	for _, x := range all {
		p := x.Prefix.Masked()
		if !p.IsValid() || p.Addr().Is6() != v6 || !p.Overlaps(f.pool.Network) {
			continue
		}
		if x.Own && slices.ContainsFunc(f.prefs, func(s netip.Prefix) bool {
			return s.IsValid() && s.Bits() <= p.Bits() && s.Contains(p.Addr())
		}) {
			continue
		}
		x.Prefix = p
		f.excluded = append(f.excluded, x)
	}
}

// excludedBy returns the exclusion s overlaps.
func (f *family) excludedBy(s netip.Prefix) (Excluded, bool) {
	for _, x := range f.excluded {
		if x.Prefix.Overlaps(s) {
			return x, true
		}
	}
	return Excluded{}, false
}

// logSkipped logs, once per Acquire, that a preferred subnet is skipped
// because the host routes part of it.
func (f *family) logSkipped(s netip.Prefix, node string) {
	if f.loggedSkip == nil {
		f.loggedSkip = map[netip.Prefix]bool{}
	}
	if f.loggedSkip[s] {
		return
	}
	f.loggedSkip[s] = true
	if x, ok := f.excludedBy(s); ok {
		klog.Warningf("not claiming %s for %s: it overlaps %s, a route of this host (a subnet there would take over that link's traffic); leased picks another subnet", s, node, x)
	}
}

// indexRanges returns, for each exclusion, the indices [lo, hi] of the
// pool's subnets that overlap it (none when it misses the range).
func (p *Pool) indexRanges(excl []Excluded) [][2]*big.Int {
	n := p.count()
	last := new(big.Int).Sub(n, big.NewInt(1))
	minI := addrInt(p.Min.Addr())
	var out [][2]*big.Int
	for _, x := range excl {
		e := x.Prefix.Masked()
		lo := addrInt(e.Addr())
		hi := new(big.Int).Lsh(big.NewInt(1), uint(e.Addr().BitLen()-e.Bits()))
		hi.Add(hi, lo).Sub(hi, big.NewInt(1)) // e's last address
		lo.Sub(lo, minI)
		hi.Sub(hi, minI)
		if hi.Sign() < 0 {
			continue
		}
		if lo.Sign() < 0 {
			lo.SetInt64(0)
		}
		lo.Rsh(lo, hostBits(p))
		hi.Rsh(hi, hostBits(p))
		if lo.Cmp(last) > 0 {
			continue
		}
		if hi.Cmp(last) > 0 {
			hi.Set(last)
		}
		out = append(out, [2]*big.Int{lo, hi})
	}
	return out
}

// excludedSummary lists the routes, for ExhaustedError.
func excludedSummary(excl []Excluded) string {
	parts := make([]string, len(excl))
	for i, x := range excl {
		parts[i] = x.String()
	}
	return strings.Join(parts, ", ")
}

// Routes returns the host's routes that left out the rest of the range,
// as text (nil when none did).
func (e *ExhaustedError) Routes() []string {
	var out []string
	for _, x := range e.Excluded {
		out = append(out, x.String())
	}
	return out
}
