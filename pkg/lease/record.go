package lease

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/leased/leased/pkg/ipfam"
)

// Record is the value of a lease key <prefix>/leases/<node>: who holds which
// subnets and how to reach them. A zero subnet of a family means the host
// holds no subnet of that family.
//
// Its JSON form (MarshalJSON, UnmarshalJSON) is recordJSON: the stored
// format of Documentation/etcd-data-model.md, with one key per family
// (Subnet, IPv6Subnet, PublicIP, PublicIPv6).
type Record struct {
	Node string
	// Subnet is the subnet the host holds per family.
	Subnet ipfam.Pair[netip.Prefix]
	// PublicIP is the address per family that peers reach the host at.
	PublicIP    ipfam.Pair[netip.Addr]
	BackendType string
	BackendData json.RawMessage
	// Acquired is when the host first took these subnets (kept across
	// renewals and restarts that keep them).
	Acquired time.Time

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

// recordJSON is a Record as stored in etcd: the keys, their order and
// omitzero are the format; changing them changes what every host reads.
type recordJSON struct {
	Node        string          `json:"Node"`
	Subnet      netip.Prefix    `json:"Subnet,omitzero"`
	IPv6Subnet  netip.Prefix    `json:"IPv6Subnet,omitzero"`
	PublicIP    netip.Addr      `json:"PublicIP,omitzero"`
	PublicIPv6  netip.Addr      `json:"PublicIPv6,omitzero"`
	BackendType string          `json:"BackendType"`
	BackendData json.RawMessage `json:"BackendData,omitempty"`
	Acquired    time.Time       `json:"Acquired,omitzero"`
}

func (r *Record) toJSON() recordJSON {
	return recordJSON{
		Node: r.Node, Subnet: r.Subnet.V4, IPv6Subnet: r.Subnet.V6, PublicIP: r.PublicIP.V4, PublicIPv6: r.PublicIP.V6,
		BackendType: r.BackendType, BackendData: r.BackendData, Acquired: r.Acquired,
	}
}

func (r *Record) fromJSON(j *recordJSON) {
	r.Node, r.Subnet, r.PublicIP = j.Node, ipfam.Pair[netip.Prefix]{V4: j.Subnet, V6: j.IPv6Subnet}, ipfam.Pair[netip.Addr]{V4: j.PublicIP, V6: j.PublicIPv6}
	r.BackendType, r.BackendData, r.Acquired = j.BackendType, j.BackendData, j.Acquired
}

// MarshalJSON encodes r in the stored format (recordJSON).
func (r Record) MarshalJSON() ([]byte, error) { return json.Marshal(r.toJSON()) }

// UnmarshalJSON decodes the stored format (recordJSON) into *r. As for a
// plain struct, keys absent from data leave their fields as they were.
//
// A BackendData in data gets a slice of its own: the bytes of r's old
// BackendData, which a backend may still hold (see DecodeRecord), are
// never written to.
func (r *Record) UnmarshalJSON(data []byte) error {
	j := r.toJSON()
	j.BackendData = nil // json.RawMessage would decode into its old bytes
	if err := json.Unmarshal(data, &j); err != nil {
		return err
	}
	if j.BackendData == nil {
		j.BackendData = r.BackendData // absent: left as it was
	}
	r.fromJSON(&j)
	return nil
}

// Subnets returns the record's subnets, IPv4 first, zero prefixes omitted.
func (r *Record) Subnets() []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ipfam.Valid(r.Subnet) {
		out = append(out, s)
	}
	return out
}

// DecodeRecord parses a lease value stored under key node. It checks only the
// shape (the node matches the key, subnets are masked prefixes of the right
// family, addresses of the right family); whether the record fits the
// network is the peer filter's job. It never panics.
//
// What the record points to is shared, never written to afterwards: Node
// is node itself (the caller's key string), BackendType is one string per
// known backend type, and the agent hands Node and BackendData to the
// backend without copying them (backend.Backend.SetPeers). A changed
// lease is a new Record.
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
	// Into the stored format directly, not through UnmarshalJSON, which
	// would have encoding/json scan data twice; through a pooled one, which
	// would otherwise escape to the heap for every record of a listing.
	j := recordJSONPool.Get().(*recordJSON)
	*j = rp.toJSON()
	j.BackendData = nil // json.RawMessage would decode into its old bytes
	err := json.Unmarshal(data, j)
	if j.BackendData == nil {
		j.BackendData = rp.BackendData
	}
	rp.fromJSON(j)
	*j = recordJSON{}
	recordJSONPool.Put(j)
	if err != nil {
		return fmt.Errorf("lease: decoding lease of %q: %w", node, err)
	}
	if err := rp.checkShape(node); err != nil {
		return err
	}
	// One copy of each string: the node name is the key's (checkShape
	// found them equal), the backend type a constant. At 50,000 peers
	// that is 1.2 MB less, held as long as the leases.
	rp.Node = node
	if i := slices.Index(backendTypes, rp.BackendType); i >= 0 {
		rp.BackendType = backendTypes[i]
	}
	return nil
}

var recordJSONPool = sync.Pool{New: func() any { return new(recordJSON) }}

// checkShape is DecodeRecord's check of a decoded record stored under node.
func (rp *Record) checkShape(node string) error {
	r := *rp
	if r.Node != node {
		return fmt.Errorf("lease: lease under key %q names node %q", node, r.Node)
	}
	for f, s := range ipfam.Valid(r.Subnet) {
		if !f.Has(s.Addr()) || s.Masked() != s {
			return fmt.Errorf("lease: lease of %q: %s %s is not an %s network address", node, subnetKey.Get(f), s, f)
		}
	}
	if !ipfam.Any(r.Subnet) {
		return fmt.Errorf("lease: lease of %q holds no subnet", node)
	}
	for f, a := range ipfam.Valid(r.PublicIP) {
		if !f.Has(a) {
			return fmt.Errorf("lease: lease of %q: %s %s is not an %s address", node, publicKey.Get(f), a, f)
		}
	}
	if r.PublicIP.V4.Zone() != "" || r.PublicIP.V6.Zone() != "" {
		return fmt.Errorf("lease: lease of %q: public addresses must not carry a zone", node)
	}
	return nil
}

// subnetKey and publicKey are the JSON keys of a family's subnet and
// public address, for error messages.
var (
	subnetKey = ipfam.Pair[string]{V4: "Subnet", V6: "IPv6Subnet"}
	publicKey = ipfam.Pair[string]{V4: "PublicIP", V6: "PublicIPv6"}
)

// affinity is the value of <prefix>/nodes/<node> and
// <prefix>/reservations/<node>.
type affinity struct {
	Subnet     netip.Prefix `json:"Subnet,omitzero"`
	IPv6Subnet netip.Prefix `json:"IPv6Subnet,omitzero"`
}

// subnets returns a's subnet per family.
func (a affinity) subnets() ipfam.Pair[netip.Prefix] {
	return ipfam.Pair[netip.Prefix]{V4: a.Subnet, V6: a.IPv6Subnet}
}

func decodeAffinity(data []byte) (affinity, error) {
	var a affinity
	err := json.Unmarshal(data, &a)
	return a, err
}
