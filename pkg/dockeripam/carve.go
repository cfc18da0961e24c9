// Package dockeripam is leased's Docker IPAM driver: it hands user-defined
// Docker networks pools carved out of this host's leased subnets, so that
// containers on them are reachable from every other host exactly like
// docker0's. It serves Docker's remote IPAM plugin protocol (the
// IpamDriver.* JSON calls) on a unix socket that dockerd finds under
// /run/docker/plugins, under the driver name "leased".
//
// Each leased subnet is split (see Split): docker0 keeps the first
// 1/2^Docker0Bits of it (what subnet.env hands dockerd as --bip and
// --fixed-cidr-v6), and networks get slices of a fixed size from the rest,
// or the --subnet they ask for when it lies inside the lease and is free.
// Pools and addresses are kept in a state file, so they survive restarts
// of the agent and of dockerd, which does not ask its remote IPAM drivers
// again on restart.
package dockeripam

import (
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
)

// Split says how a leased subnet is shared between docker0 and
// user-defined networks.
type Split struct {
	// Docker0Bits: docker0 keeps the first 1/2^Docker0Bits of each leased
	// subnet (1 = half, 2 = a quarter). It must be at least 1.
	Docker0Bits int
	// PoolBits4 and PoolBits6: a network's pool, when it asks for no
	// subnet, is 1/2^PoolBits of the leased subnet (IPv4 /24 with 3: a
	// /27; IPv6 /64 with 16: an /80). They must be at least Docker0Bits.
	PoolBits4, PoolBits6 int
}

// DefaultSplit is what an operator gets without flags: docker0 keeps a
// quarter (a /26 of a /24, a /66 of a /64); networks get /27s of a /24 (6
// of them, 30 containers each) and /80s of a /64.
var DefaultSplit = Split{Docker0Bits: 2, PoolBits4: 3, PoolBits6: 16}

// The longest prefixes a pool may have: IPv4 /30 (the gateway and one
// container), IPv6 /126.
const (
	maxBits4 = 30
	maxBits6 = 126
)

// Validate checks s against the leased subnets (either may be zero).
func (s Split) Validate(subnets ipfam.Pair[netip.Prefix]) error {
	if s.Docker0Bits < 1 {
		return fmt.Errorf("--docker-ipam-docker0-bits %d: use at least 1 (docker0 keeps half of the subnet), or turn the driver off with --docker-ipam=false", s.Docker0Bits)
	}
	for _, f := range []struct {
		name   string
		bits   int
		subnet netip.Prefix
		max    int
	}{{"--docker-ipam-pool-bits4", s.PoolBits4, subnets.V4, maxBits4}, {"--docker-ipam-pool-bits6", s.PoolBits6, subnets.V6, maxBits6}} {
		if f.bits < s.Docker0Bits {
			return fmt.Errorf("%s %d is less than --docker-ipam-docker0-bits %d: a pool would be larger than docker0's share; use at least %d", f.name, f.bits, s.Docker0Bits, s.Docker0Bits)
		}
		if f.subnet.IsValid() && f.subnet.Bits()+f.bits > f.max {
			return fmt.Errorf("%s %d makes pools of /%d from the leased %s: too small for containers; use at most %d", f.name, f.bits, f.subnet.Bits()+f.bits, f.subnet, f.max-f.subnet.Bits())
		}
	}
	return nil
}

// Docker0 is docker0's share of subnet: its first 1/2^Docker0Bits.
func (s Split) Docker0(subnet netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(subnet.Addr(), subnet.Bits()+s.Docker0Bits)
}

// PoolLen is the prefix length of an automatic pool in subnet.
func (s Split) PoolLen(subnet netip.Prefix) int {
	if subnet.Addr().Is4() {
		return subnet.Bits() + s.PoolBits4
	}
	return subnet.Bits() + s.PoolBits6
}

// Carve returns the first slice of subnet of the automatic pool size that
// overlaps neither docker0's share nor any prefix in used. The error says
// the subnet is full.
func (s Split) Carve(subnet netip.Prefix, used []netip.Prefix) (netip.Prefix, error) {
	d0 := s.Docker0(subnet)
	l := s.PoolLen(subnet)
	p := netip.PrefixFrom(subnet.Addr(), l)
	for subnet.Contains(p.Addr()) {
		if !p.Overlaps(d0) && !overlapsAny(p, used) {
			return p, nil
		}
		next := last(p).Next()
		if !next.IsValid() {
			break
		}
		p = netip.PrefixFrom(next, l)
	}
	n := 0
	for _, u := range used {
		if subnet.Overlaps(u) {
			n++
		}
	}
	return netip.Prefix{}, fmt.Errorf("no free /%d left in this host's leased subnet %s (docker0 keeps %s, %d networks hold the rest): remove an unused network (docker network prune), or ask for a smaller one with --subnet", l, subnet, d0, n)
}

// Check says why want cannot be a pool in subnet, or nil: it must be a
// masked prefix inside subnet with room for containers, overlapping
// neither docker0's share nor a prefix in used.
func (s Split) Check(want, subnet netip.Prefix, used []netip.Prefix) error {
	if want.Masked() != want {
		return fmt.Errorf("--subnet %s is not a network address: use %s", want, want.Masked())
	}
	if !subnet.IsValid() || want.Addr().Is4() != subnet.Addr().Is4() {
		return fmt.Errorf("--subnet %s is not of this host's leased family", want)
	}
	if want.Bits() < subnet.Bits() || !subnet.Contains(want.Addr()) {
		return fmt.Errorf("--subnet %s is outside this host's leased subnet %s: use a subnet inside %s (other hosts route only that to this host), or leave --subnet out", want, subnet, subnet)
	}
	max := maxBits6
	if want.Addr().Is4() {
		max = maxBits4
	}
	if want.Bits() > max {
		return fmt.Errorf("--subnet %s is too small for containers: use a /%d or larger", want, max)
	}
	if d0 := s.Docker0(subnet); want.Overlaps(d0) {
		return fmt.Errorf("--subnet %s overlaps docker0's share %s of this host's leased subnet %s: use a subnet in the rest of %s, or leave --subnet out", want, d0, subnet, subnet)
	}
	for _, u := range used {
		if want.Overlaps(u) {
			return fmt.Errorf("--subnet %s overlaps %s, the pool of another network on this host: use another subnet, or leave --subnet out", want, u)
		}
	}
	return nil
}

func overlapsAny(p netip.Prefix, used []netip.Prefix) bool {
	for _, u := range used {
		if p.Overlaps(u) {
			return true
		}
	}
	return false
}

// last is the last address of p.
func last(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
