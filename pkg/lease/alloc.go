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

// freeSubnet returns a random subnet of the pool that is not in taken, and
// ok=false when every subnet is taken. It starts at a random index and takes
// the first free index from there on (wrapping around), so its cost depends
// on len(taken), never on the size of the pool.
func (p *Pool) freeSubnet(taken map[netip.Prefix]bool) (netip.Prefix, bool) {
	idx := make([]*big.Int, 0, len(taken))
	for s := range taken {
		if i := p.indexOf(s); i != nil {
			idx = append(idx, i)
		}
	}
	n := p.count()
	if big.NewInt(int64(len(idx))).Cmp(n) >= 0 {
		return netip.Prefix{}, false
	}
	slices.SortFunc(idx, func(a, b *big.Int) int { return a.Cmp(b) })
	start, err := rand.Int(rand.Reader, n)
	if err != nil {
		start = big.NewInt(0)
	}
	// First free index >= start, else first free index >= 0.
	if i, ok := firstGap(idx, start, n); ok {
		return p.subnetAt(i), true
	}
	i, ok := firstGap(idx, big.NewInt(0), n)
	if !ok {
		return netip.Prefix{}, false
	}
	return p.subnetAt(i), true
}

// firstGap returns the smallest index >= from and < n that is not in the
// sorted list idx.
func firstGap(idx []*big.Int, from, n *big.Int) (*big.Int, bool) {
	cur := new(big.Int).Set(from)
	j, _ := slices.BinarySearchFunc(idx, cur, func(a, b *big.Int) int { return a.Cmp(b) })
	for ; j < len(idx) && idx[j].Cmp(cur) == 0; j++ {
		cur.Add(cur, big.NewInt(1))
	}
	return cur, cur.Cmp(n) < 0
}
