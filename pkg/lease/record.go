package lease

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"time"
)

// Record is the value of a lease key <prefix>/leases/<node>: who holds which
// subnets and how to reach them. A zero Subnet/IPv6Subnet means the host
// holds no subnet of that family.
type Record struct {
	Node        string          `json:"Node"`
	Subnet      netip.Prefix    `json:"Subnet,omitzero"`
	IPv6Subnet  netip.Prefix    `json:"IPv6Subnet,omitzero"`
	PublicIP    netip.Addr      `json:"PublicIP,omitzero"`
	PublicIPv6  netip.Addr      `json:"PublicIPv6,omitzero"`
	BackendType string          `json:"BackendType"`
	BackendData json.RawMessage `json:"BackendData,omitempty"`
	// Acquired is when the host first took these subnets (kept across
	// renewals and restarts that keep them).
	Acquired time.Time `json:"Acquired,omitzero"`

	// Rev is the etcd create revision of the record key; not stored. Lower
	// is older; it breaks ties between overlapping records.
	Rev int64 `json:"-"`
	// Lease is the etcd lease the record is attached to (0: none); not stored.
	Lease int64 `json:"-"`
	// ModRev is the etcd revision at which this host wrote its own record
	// (set by Acquire and Publish only); not stored. Changes to its keys
	// after it are someone else's.
	ModRev int64 `json:"-"`
}

// Subnets returns the record's subnets, IPv4 first, zero prefixes omitted.
func (r *Record) Subnets() []netip.Prefix {
	var out []netip.Prefix
	for _, s := range []netip.Prefix{r.Subnet, r.IPv6Subnet} {
		if s.IsValid() {
			out = append(out, s)
		}
	}
	return out
}

// DecodeRecord parses a lease value stored under key node. It checks only the
// shape (the node matches the key, subnets are masked prefixes of the right
// family, addresses of the right family); whether the record fits the
// network is the peer filter's job. It never panics.
func DecodeRecord(node string, data []byte) (*Record, error) {
	r := new(Record)
	if err := decodeRecordInto(node, data, r); err != nil {
		return nil, err
	}
	return r, nil
}

// decodeRecordInto is DecodeRecord into *r, for decoding many records into
// one slice (a listing allocates them together).
func decodeRecordInto(node string, data []byte, rp *Record) error {
	if err := json.Unmarshal(data, rp); err != nil {
		return fmt.Errorf("lease: decoding lease of %q: %w", node, err)
	}
	return rp.checkShape(node)
}

// checkShape is DecodeRecord's check of a decoded record stored under node.
func (rp *Record) checkShape(node string) error {
	r := *rp
	if r.Node != node {
		return fmt.Errorf("lease: lease under key %q names node %q", node, r.Node)
	}
	if r.Subnet.IsValid() && (!r.Subnet.Addr().Is4() || r.Subnet.Masked() != r.Subnet) {
		return fmt.Errorf("lease: lease of %q: Subnet %s is not an IPv4 network address", node, r.Subnet)
	}
	if r.IPv6Subnet.IsValid() && (!r.IPv6Subnet.Addr().Is6() || r.IPv6Subnet.Addr().Is4In6() || r.IPv6Subnet.Masked() != r.IPv6Subnet) {
		return fmt.Errorf("lease: lease of %q: IPv6Subnet %s is not an IPv6 network address", node, r.IPv6Subnet)
	}
	if !r.Subnet.IsValid() && !r.IPv6Subnet.IsValid() {
		return fmt.Errorf("lease: lease of %q holds no subnet", node)
	}
	if r.PublicIP.IsValid() && !r.PublicIP.Is4() {
		return fmt.Errorf("lease: lease of %q: PublicIP %s is not an IPv4 address", node, r.PublicIP)
	}
	if r.PublicIPv6.IsValid() && (!r.PublicIPv6.Is6() || r.PublicIPv6.Is4In6()) {
		return fmt.Errorf("lease: lease of %q: PublicIPv6 %s is not an IPv6 address", node, r.PublicIPv6)
	}
	if r.PublicIP.Zone() != "" || r.PublicIPv6.Zone() != "" {
		return fmt.Errorf("lease: lease of %q: public addresses must not carry a zone", node)
	}
	return nil
}

// affinity is the value of <prefix>/nodes/<node> and
// <prefix>/reservations/<node>.
type affinity struct {
	Subnet     netip.Prefix `json:"Subnet,omitzero"`
	IPv6Subnet netip.Prefix `json:"IPv6Subnet,omitzero"`
}

func decodeAffinity(data []byte) (affinity, error) {
	var a affinity
	err := json.Unmarshal(data, &a)
	return a, err
}
