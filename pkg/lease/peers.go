package lease

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"
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
// length, overlap is equality, and Peers runs in O(n log n). It is called
// on every watch event with every record, so it sorts compact entries and
// keys its overlap index by integers instead of netip.Prefix values.
func Peers(cfg *Config, self *Record, records map[string]*Record) (peers []*Record, rejected map[string]error) {
	if peers, rejected, ok := peersUnordered(cfg, self, records); ok {
		return peers, rejected
	}
	return peersByAge(cfg, self, records)
}

// peersUnordered is Peers without sorting, for the common case in which no
// two records name the same subnet: then no record's fate depends on its
// age. It reports ok=false as soon as two records share a subnet.
func peersUnordered(cfg *Config, self *Record, records map[string]*Record) (peers []*Record, rejected map[string]error, ok bool) {
	rejected = map[string]error{}
	held := newHeldSet(2) // only this host's subnets: peers' repeats end this path
	if self != nil {
		for _, s := range self.Subnets() {
			held.add(s, self.Node+" (this host)")
		}
	}
	seen := newSubnetSet(len(records), cfg) // every peer subnet, accepted or not
	peers = make([]*Record, 0, len(records))
	for _, r := range records {
		if self != nil && r.Node == self.Node {
			continue
		}
		for _, s := range [2]netip.Prefix{r.Subnet, r.IPv6Subnet} {
			if !s.IsValid() {
				continue
			}
			if !seen.add(s) {
				return nil, nil, false
			}
		}
		if err := checkPeer(cfg, self, r, held); err != nil {
			rejected[r.Node] = err
			continue
		}
		peers = append(peers, r)
	}
	return peers, rejected, true
}

// peersByAge is Peers for record sets in which subnets repeat: the older
// record (lower create revision) wins.
func peersByAge(cfg *Config, self *Record, records map[string]*Record) (peers []*Record, rejected map[string]error) {
	rejected = map[string]error{}
	type entry struct {
		rev  int64
		node string
		r    *Record
	}
	ordered := make([]entry, 0, len(records))
	for _, r := range records {
		if self != nil && r.Node == self.Node {
			continue
		}
		ordered = append(ordered, entry{r.Rev, r.Node, r})
	}
	slices.SortFunc(ordered, func(a, b entry) int {
		if a.rev != b.rev {
			if a.rev < b.rev {
				return -1
			}
			return 1
		}
		return strings.Compare(a.node, b.node)
	})
	held := newHeldSet(len(ordered) + 1)
	peers = make([]*Record, 0, len(ordered))
	if self != nil {
		for _, s := range self.Subnets() {
			held.add(s, self.Node+" (this host)")
		}
	}
	for _, e := range ordered {
		r := e.r
		if err := checkPeer(cfg, self, r, held); err != nil {
			rejected[r.Node] = err
			continue
		}
		for _, s := range [2]netip.Prefix{r.Subnet, r.IPv6Subnet} {
			if s.IsValid() {
				held.add(s, r.Node)
			}
		}
		peers = append(peers, r)
	}
	return peers, rejected
}

// subnetSet is a set of subnets for finding repeats among tens of
// thousands of records: integer keys and no values keep its maps small,
// which is most of its speed (Peers50k).
type subnetSet struct {
	v4    map[uint64]struct{}
	v6hi  map[uint64]struct{} // IPv6 subnets of length v6len (at most /64): the first 64 bits
	v6    map[prefix6]struct{}
	v6len int
}

func newSubnetSet(n int, cfg *Config) subnetSet {
	s := subnetSet{v4: make(map[uint64]struct{}, n), v6: map[prefix6]struct{}{}, v6len: -1}
	if cfg.IPv6 != nil && cfg.IPv6.SubnetLen <= 64 {
		s.v6len = cfg.IPv6.SubnetLen
		s.v6hi = make(map[uint64]struct{}, n)
	}
	return s
}

// add adds p and reports whether it was new.
func (s subnetSet) add(p netip.Prefix) bool {
	var had bool
	switch {
	case p.Addr().Is4():
		k := prefix4Key(p)
		_, had = s.v4[k]
		s.v4[k] = struct{}{}
	case p.Bits() == s.v6len:
		a := p.Masked().Addr().As16()
		k := binary.BigEndian.Uint64(a[:8])
		_, had = s.v6hi[k]
		s.v6hi[k] = struct{}{}
	default:
		k := prefix6{p.Addr().As16(), p.Bits()}
		_, had = s.v6[k]
		s.v6[k] = struct{}{}
	}
	return !had
}

// heldSet maps the subnets held so far to their holders.
type heldSet struct {
	v4 map[uint64]string // address<<8 | bits
	v6 map[prefix6]string
}

type prefix6 struct {
	addr [16]byte
	bits int
}

func newHeldSet(n int) heldSet {
	return heldSet{v4: make(map[uint64]string, n), v6: make(map[prefix6]string, n)}
}

func (h heldSet) add(s netip.Prefix, holder string) {
	if s.Addr().Is4() {
		h.v4[prefix4Key(s)] = holder
	} else {
		h.v6[prefix6{s.Addr().As16(), s.Bits()}] = holder
	}
}

func (h heldSet) del(s netip.Prefix) {
	if s.Addr().Is4() {
		delete(h.v4, prefix4Key(s))
	} else {
		delete(h.v6, prefix6{s.Addr().As16(), s.Bits()})
	}
}

func (h heldSet) get(s netip.Prefix) (string, bool) {
	var holder string
	var ok bool
	if s.Addr().Is4() {
		holder, ok = h.v4[prefix4Key(s)]
	} else {
		holder, ok = h.v6[prefix6{s.Addr().As16(), s.Bits()}]
	}
	return holder, ok
}

func prefix4Key(s netip.Prefix) uint64 {
	a := s.Addr().As4()
	return uint64(a[0])<<32 | uint64(a[1])<<24 | uint64(a[2])<<16 | uint64(a[3])<<8 | uint64(s.Bits())
}

func checkPeer(cfg *Config, self *Record, r *Record, held heldSet) error {
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
		if other, ok := held.get(s); ok {
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
