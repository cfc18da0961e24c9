package lease

import (
	"crypto/rand"
	"math/big"
	"net/netip"
	"slices"
)

// The allocator works on subnet indices: index i of a pool is the i-th subnet
// counting from Min. A pool may hold up to 2^125 subnets (an IPv6 /0 split
// into /126s), so indices are big.Ints; every operation is O(1) in the size
// of the range and O(k log k) in the number k of subnets known to be taken.

func addrInt(a netip.Addr) *big.Int { return new(big.Int).SetBytes(a.AsSlice()) }

func hostBits(p *Pool) uint { return uint(p.Network.Addr().BitLen() - p.SubnetLen) }

// count returns the number of subnets from Min to Max inclusive.
func (p *Pool) count() *big.Int {
	n := new(big.Int).Sub(addrInt(p.Max.Addr()), addrInt(p.Min.Addr()))
	n.Rsh(n, hostBits(p))
	return n.Add(n, big.NewInt(1))
}

// subnetAt returns the i-th subnet of the pool; i must be in [0, count).
func (p *Pool) subnetAt(i *big.Int) netip.Prefix {
	v := new(big.Int).Lsh(i, hostBits(p))
	v.Add(v, addrInt(p.Min.Addr()))
	b := make([]byte, p.Network.Addr().BitLen()/8)
	v.FillBytes(b)
	a, _ := netip.AddrFromSlice(b)
	return netip.PrefixFrom(a, p.SubnetLen)
}

// indexOf returns the index of s, or nil when s is not a subnet of the pool.
func (p *Pool) indexOf(s netip.Prefix) *big.Int {
	if !p.Contains(s) {
		return nil
	}
	v := new(big.Int).Sub(addrInt(s.Addr()), addrInt(p.Min.Addr()))
	return v.Rsh(v, hostBits(p))
}

// randomSubnet returns a uniformly random subnet of the pool.
func (p *Pool) randomSubnet() netip.Prefix {
	i, err := rand.Int(rand.Reader, p.count())
	if err != nil { // crypto/rand does not fail on Linux; fall back to Min
		return p.Min
	}
	return p.subnetAt(i)
}

// freeSubnet returns a random subnet of the pool that is not in taken and
// overlaps no exclusion, and ok=false when there is none. It starts at a
// random index and takes the first free index from there on (wrapping
// around), so its cost depends on len(taken) and len(excl), never on the
// size of the pool.
func (p *Pool) freeSubnet(taken map[netip.Prefix]bool, excl []Excluded) (netip.Prefix, bool) {
	spans := p.indexRanges(excl)
	for s := range taken {
		if i := p.indexOf(s); i != nil {
			spans = append(spans, [2]*big.Int{i, i})
		}
	}
	spans = mergeSpans(spans)
	n := p.count()
	covered := new(big.Int)
	for _, sp := range spans {
		covered.Add(covered, new(big.Int).Sub(sp[1], sp[0]))
		covered.Add(covered, big.NewInt(1))
	}
	if covered.Cmp(n) >= 0 {
		return netip.Prefix{}, false
	}
	start, err := rand.Int(rand.Reader, n)
	if err != nil {
		start = big.NewInt(0)
	}
	// First free index >= start, else first free index >= 0.
	if i, ok := firstGap(spans, start, n); ok {
		return p.subnetAt(i), true
	}
	i, ok := firstGap(spans, big.NewInt(0), n)
	if !ok {
		return netip.Prefix{}, false
	}
	return p.subnetAt(i), true
}

// mergeSpans sorts index spans [lo, hi] and merges those that overlap or
// touch.
func mergeSpans(spans [][2]*big.Int) [][2]*big.Int {
	slices.SortFunc(spans, func(a, b [2]*big.Int) int { return a[0].Cmp(b[0]) })
	out := spans[:0]
	for _, sp := range spans {
		if k := len(out) - 1; k >= 0 && new(big.Int).Add(out[k][1], big.NewInt(1)).Cmp(sp[0]) >= 0 {
			if sp[1].Cmp(out[k][1]) > 0 {
				out[k][1] = sp[1]
			}
			continue
		}
		out = append(out, [2]*big.Int{sp[0], sp[1]})
	}
	return out
}

// firstGap returns the smallest index >= from and < n that is in none of
// the sorted, merged spans.
func firstGap(spans [][2]*big.Int, from, n *big.Int) (*big.Int, bool) {
	cur := new(big.Int).Set(from)
	j, _ := slices.BinarySearchFunc(spans, cur, func(sp [2]*big.Int, c *big.Int) int {
		if sp[1].Cmp(c) < 0 {
			return -1
		}
		return 1
	})
	if j < len(spans) && spans[j][0].Cmp(cur) <= 0 {
		cur.Add(spans[j][1], big.NewInt(1))
	}
	return cur, cur.Cmp(n) < 0
}
