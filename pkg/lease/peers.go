package lease

import (
	"fmt"
	"net/netip"
	"slices"
)

// Peers filters lease records down to the peers a host may program. A record
// is used only when every subnet it names lies inside the config's network
// of that family with the configured length, does not overlap the host's own
// subnets or a peer's that is older (lower create revision), and it names at
// least one public address that is a plain unicast address other than the
// host's own. Everything else is returned in rejected with the reason, to be
// logged and never programmed.
//
// Because every accepted subnet is an aligned prefix of the pool's fixed
// length, overlap is equality, and Peers runs in O(n log n).
func Peers(cfg *Config, self *Record, records map[string]*Record) (peers []*Record, rejected map[string]error) {
	rejected = map[string]error{}
	ordered := make([]*Record, 0, len(records))
	for _, r := range records {
		if self != nil && r.Node == self.Node {
			continue
		}
		ordered = append(ordered, r)
	}
	slices.SortFunc(ordered, func(a, b *Record) int {
		if a.Rev != b.Rev {
			if a.Rev < b.Rev {
				return -1
			}
			return 1
		}
		if a.Node < b.Node {
			return -1
		}
		if a.Node > b.Node {
			return 1
		}
		return 0
	})
	held := make(map[netip.Prefix]string, 2*len(ordered)+2)
	peers = make([]*Record, 0, len(ordered))
	if self != nil {
		for _, s := range self.Subnets() {
			held[s] = self.Node + " (this host)"
		}
	}
	for _, r := range ordered {
		if err := checkPeer(cfg, self, r, held); err != nil {
			rejected[r.Node] = err
			continue
		}
		for _, s := range [2]netip.Prefix{r.Subnet, r.IPv6Subnet} {
			if s.IsValid() {
				held[s] = r.Node
			}
		}
		peers = append(peers, r)
	}
	return peers, rejected
}

func checkPeer(cfg *Config, self *Record, r *Record, held map[netip.Prefix]string) error {
	n := 0
	for _, s := range [2]netip.Prefix{r.Subnet, r.IPv6Subnet} {
		if !s.IsValid() {
			continue
		}
		pool := cfg.IPv4
		if s.Addr().Is6() {
			pool = cfg.IPv6
		}
		if pool == nil {
			continue // family not enabled here: ignore that subnet
		}
		n++
		if s.Bits() != pool.SubnetLen || !pool.Network.Contains(s.Addr()) {
			return fmt.Errorf("subnet %s is not a /%d inside the network %s", s, pool.SubnetLen, pool.Network)
		}
		if other, ok := held[s]; ok {
			return fmt.Errorf("subnet %s overlaps the lease of %s", s, other)
		}
	}
	if n == 0 {
		return fmt.Errorf("holds no subnet of a family enabled in the config")
	}
	pubs := 0
	for _, a := range [2]netip.Addr{r.PublicIP, r.PublicIPv6} {
		if !a.IsValid() {
			continue
		}
		if !a.IsGlobalUnicast() && !a.IsPrivate() {
			return fmt.Errorf("public address %s is not a unicast address (loopback, link-local, multicast and unspecified are refused)", a)
		}
		if self != nil && (a == self.PublicIP || a == self.PublicIPv6) {
			return fmt.Errorf("public address %s is this host's own", a)
		}
		pubs++
	}
	if pubs == 0 {
		return fmt.Errorf("names no public address")
	}
	return nil
}
