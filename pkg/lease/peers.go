package lease

import (
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"math/bits"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/leased/leased/pkg/backend/vtep"
)

// Peers is the acceptance stage: it turns decoded lease records, the config
// and this host's own record (self, nil when it holds none) into the peers
// the host may program. Decoding (List, Watch, DecodeRecord) checks only a
// record's shape; every decision that depends on the config or on this
// host is made here (and by PeerSet, which keeps the result up to date
// record by record).
//
// Peers filters lease records down to the peers a host may program. A record
// is used only when every subnet it names lies inside the config's network
// of that family with the configured length, does not overlap the host's own
// subnets or a peer's that is older (lower create revision), and it names at
// least one public address that is a plain unicast address other than the
// host's own; a vxlan record must also carry the VTEP MACs derived from its
// node name (package vtep). Everything else is returned in rejected with the
// reason, to be logged and never programmed.
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
// two records name the same subnet of a pool: then no record's fate depends
// on its age (only accepted records hold subnets, and only subnets of a
// pool can be accepted). It reports ok=false when two records share such a
// subnet, or a record names two subnets of one family.
//
// It checks the records on every CPU and finds repeats by sorting each
// family's subnets as integers (their index in the pool).
func peersUnordered(cfg *Config, self *Record, records map[string]*Record) (peers []*Record, rejected map[string]error, ok bool) {
	held := newHeldSet(2, self) // only this host's subnets: peers' repeats end this path
	recs := make([]*Record, 0, len(records))
	for _, r := range records {
		recs = append(recs, r)
	}
	errs := make([]error, len(recs))
	// keys[f][i] is 1 + the pool index of recs[i]'s subnet of family f (0: none).
	keys := [2][]uint64{make([]uint64, len(recs)), make([]uint64, len(recs))}
	var unkeyed atomic.Bool
	parallel(len(recs), func(i int) {
		r := recs[i]
		if self != nil && r.Node == self.Node {
			errs[i] = errSelf
			return
		}
		for _, s := range r.Subnet.All() {
			f, idx, ok := poolIndex(cfg, s)
			if !ok {
				continue
			}
			if keys[f][i] != 0 {
				unkeyed.Store(true)
			}
			keys[f][i] = idx + 1
		}
		errs[i] = checkPeer(cfg, self, r, held)
	})
	var dup [2]bool
	parallel(2, func(f int) { dup[f] = hasRepeats(keys[f]) })
	if unkeyed.Load() || dup[0] || dup[1] {
		return nil, nil, false
	}
	rejected = map[string]error{}
	peers = make([]*Record, 0, len(recs))
	for i, err := range errs {
		switch {
		case err == nil:
			peers = append(peers, recs[i])
		case err != errSelf:
			rejected[recs[i].Node] = err
		}
	}
	return peers, rejected, true
}

// errSelf marks this host's own record in peersUnordered.
var errSelf = errors.New("this host")

// poolIndex returns the family (0: IPv4, 1: IPv6) of s and its index among
// the subnets of that family's pool network, when s is one of them (of the
// pool's length, inside its network). An index wider than 63 bits (say /126
// subnets of a /32) is cut to its low 63 bits: two subnets may then share
// an index, which only sends Peers to the by-age path.
func poolIndex(cfg *Config, s netip.Prefix) (family int, idx uint64, ok bool) {
	if !s.IsValid() {
		return 0, 0, false
	}
	pool := cfg.IPv4
	if s.Addr().Is6() {
		family, pool = 1, cfg.IPv6
	}
	if pool == nil || s.Bits() != pool.SubnetLen || !pool.Network.Contains(s.Addr()) {
		return 0, 0, false
	}
	width := min(pool.SubnetLen-pool.Network.Bits(), 63)
	// The index is the address bits [network bits, subnet length).
	a := s.Addr().As16()
	hi, lo := binary.BigEndian.Uint64(a[:8]), binary.BigEndian.Uint64(a[8:])
	if s.Addr().Is4() {
		hi, lo = uint64(binary.BigEndian.Uint32(a[12:]))<<32, 0
	}
	if n := uint(pool.SubnetLen); n <= 64 {
		idx = hi >> (64 - n)
	} else {
		idx = hi<<(n-64) | lo>>(128-n)
	}
	return family, idx & (1<<width - 1), true
}

// hasRepeats reports whether a non-zero value occurs twice in keys. It
// inserts them into an open-addressing hash table of at least twice their
// number (a map of this size is several times slower: Peers50k).
func hasRepeats(keys []uint64) bool {
	shift := 64 - bits.Len(uint(2*len(keys)))
	table := make([]uint64, 1<<(64-shift))
	mask := uint64(len(table) - 1)
	for _, k := range keys {
		if k == 0 {
			continue
		}
		for h := (k * 0x9e3779b97f4a7c15) >> shift; ; h = (h + 1) & mask { // Fibonacci hashing
			if table[h] == k {
				return true
			}
			if table[h] == 0 {
				table[h] = k
				break
			}
		}
	}
	return false
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
	held := newHeldSet(len(ordered)+1, self)
	peers = make([]*Record, 0, len(ordered))
	for _, e := range ordered {
		r := e.r
		if err := checkPeer(cfg, self, r, held); err != nil {
			rejected[r.Node] = err
			continue
		}
		for _, s := range ipfam.Valid(r.Subnet) {
			held.add(s, r)
		}
		peers = append(peers, r)
	}
	return peers, rejected
}

// heldSet maps the subnets held so far to their holders' records (self:
// this host's). A record pointer instead of the holder's name keeps the
// index at 16 and 32 bytes an entry: the peer filter keeps one entry per
// subnet of the fleet (PeerSet).
type heldSet struct {
	v4   map[uint64]*Record // address<<8 | bits
	v6   map[prefix6]*Record
	self *Record
}

type prefix6 struct {
	addr [16]byte
	bits int
}

func newHeldSet(n int, self *Record) heldSet {
	h := heldSet{v4: make(map[uint64]*Record, n), v6: make(map[prefix6]*Record, n), self: self}
	if self != nil {
		for _, s := range self.Subnets() {
			h.add(s, self)
		}
	}
	return h
}

func (h heldSet) add(s netip.Prefix, holder *Record) {
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

// get returns the name of s's holder, "<node> (this host)" for this host.
func (h heldSet) get(s netip.Prefix) (string, bool) {
	var holder *Record
	var ok bool
	if s.Addr().Is4() {
		holder, ok = h.v4[prefix4Key(s)]
	} else {
		holder, ok = h.v6[prefix6{s.Addr().As16(), s.Bits()}]
	}
	if !ok {
		return "", false
	}
	if holder == h.self {
		return holder.Node + " (this host)", true
	}
	return holder.Node, true
}

func prefix4Key(s netip.Prefix) uint64 {
	a := s.Addr().As4()
	return uint64(a[0])<<32 | uint64(a[1])<<24 | uint64(a[2])<<16 | uint64(a[3])<<8 | uint64(s.Bits())
}

func checkPeer(cfg *Config, self *Record, r *Record, held heldSet) error {
	n := 0
	for _, s := range ipfam.Valid(r.Subnet) {
		pool := cfg.Pool(s)
		if pool == nil {
			continue // family not enabled here: ignore that subnet
		}
		n++
		if s.Bits() != pool.SubnetLen || !pool.Network.Contains(s.Addr()) {
			return fmt.Errorf("subnet %s is not a /%d inside the network %s", s, pool.SubnetLen, pool.Network)
		}
		if other, ok := held.get(s); ok {
			return errOverlap(s, other)
		}
	}
	if n == 0 {
		return fmt.Errorf("holds no subnet of a family enabled in the config")
	}
	pubs := 0
	for _, a := range ipfam.Valid(r.PublicIP) {
		if !a.IsGlobalUnicast() && !a.IsPrivate() {
			return fmt.Errorf("public address %s is not a unicast address (loopback, link-local, multicast and unspecified are refused)", a)
		}
		if self != nil && (a == self.PublicIP.V4 || a == self.PublicIP.V6) {
			return errOwnAddress(a)
		}
		pubs++
	}
	if pubs == 0 {
		return fmt.Errorf("names no public address")
	}
	if r.BackendType == vtep.Type {
		// Its VTEP MACs must be its own: a copy of another host's would
		// take over that host's FDB entry.
		return vtep.Check(r.Node, r.BackendData)
	}
	return nil
}

func errOverlap(s netip.Prefix, holder string) error {
	return fmt.Errorf("subnet %s overlaps the lease of %s", s, holder)
}

func errOwnAddress(a netip.Addr) error {
	return fmt.Errorf("public address %s is this host's own", a)
}
