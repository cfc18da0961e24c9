package lease

import (
	"bytes"
	"encoding/json"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"reflect"
	"slices"
	"strings"
)

// reservedRanges are address ranges no container network can overlap: the
// kernel treats their addresses specially, so routes to them do not carry
// container traffic between hosts.
var reservedRanges = []struct {
	p    netip.Prefix
	what string
}{
	{netip.MustParsePrefix("0.0.0.0/8"), `"this network" addresses (0.0.0.0/8)`},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback addresses (127.0.0.0/8)"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local addresses (169.254.0.0/16)"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast addresses (224.0.0.0/4)"},
	{netip.MustParsePrefix("255.255.255.255/32"), "the broadcast address 255.255.255.255"},
	{netip.MustParsePrefix("::/128"), "the unspecified address ::"},
	{netip.MustParsePrefix("::1/128"), "the loopback address ::1"},
	{netip.MustParsePrefix("fe80::/10"), "link-local addresses (fe80::/10)"},
	{netip.MustParsePrefix("ff00::/8"), "multicast addresses (ff00::/8)"},
}

// reservedNetwork says why network cannot be a container network (the whole
// address space, or it overlaps a reserved range), or "".
func reservedNetwork(network netip.Prefix) string {
	if network.Bits() == 0 {
		return "is the whole address space (it would take over every route of the host)"
	}
	for _, r := range reservedRanges {
		if network.Overlaps(r.p) {
			if network.Bits() >= r.p.Bits() {
				return "is inside " + r.what
			}
			return "contains " + r.what
		}
	}
	return ""
}

// Equal reports whether c and o configure the same thing: the same pools
// and backend type, and Backend objects that are the same JSON value
// (whatever the formatting, key order or white space). Two configs that
// differ only in formatting are Equal.
func (c *Config) Equal(o *Config) bool {
	if c == nil || o == nil {
		return c == o
	}
	samePool := func(a, b *Pool) bool { return (a == nil) == (b == nil) && (a == nil || *a == *b) }
	return samePool(c.IPv4, o.IPv4) && samePool(c.IPv6, o.IPv6) &&
		c.Backend.Type == o.Backend.Type && sameJSON(c.Backend.Raw, o.Backend.Raw)
}

// sameJSON reports whether a and b hold the same JSON value.
func sameJSON(a, b json.RawMessage) bool {
	if bytes.Equal(a, b) {
		return true
	}
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}

// Pool returns the config's pool of s's address family (nil when the
// family is disabled).
func (c *Config) Pool(s netip.Prefix) *Pool {
	if s.Addr().Is4() {
		return c.IPv4
	}
	return c.IPv6
}

// Pools returns the config's pools per family (nil: the family is
// disabled).
func (c *Config) Pools() ipfam.Pair[*Pool] {
	return ipfam.Pair[*Pool]{V4: c.IPv4, V6: c.IPv6}
}

// Outside says why subnet is not one of the config's subnets, or "" when it
// is (Pool.Contains).
func (c *Config) Outside(subnet netip.Prefix) string {
	p, fam := c.Pool(subnet), "IPv4"
	if subnet.Addr().Is6() {
		fam = "IPv6"
	}
	switch {
	case p == nil:
		return fam + " is disabled"
	case p.Contains(subnet):
		return ""
	case subnet.Bits() != p.SubnetLen:
		return fmt.Sprintf("it is a /%d, the %s subnets are /%d", subnet.Bits(), fam, p.SubnetLen)
	case !p.Network.Contains(subnet.Addr()):
		return fmt.Sprintf("it is outside %s", p.Network)
	default:
		return fmt.Sprintf("it is outside %s..%s", p.Min, p.Max)
	}
}

// Conflict is a live lease that a config change would strand.
type Conflict struct {
	Node string
	// Subnets are the host's subnets the new config leaves out (all of
	// them when the backend type is the reason).
	Subnets []netip.Prefix
	// Reason says why, for each subnet or for the host.
	Reason string
}

func (c Conflict) String() string {
	return fmt.Sprintf("%s %v: %s", c.Node, c.Subnets, c.Reason)
}

// ConfigConflicts returns the leases in records that moving from old (nil:
// no valid config before) to new would strand, sorted by node: a subnet
// that the old config contains (any subnet when old is nil) and new does
// not, or, when the change switches the backend type (or there is no old
// config), a host whose lease names another backend type than new. Hosts
// keep such a lease and serve it, so a config that strands one would split
// the network: hosts that adopt it drop their routes to the stranded host.
func ConfigConflicts(old, new *Config, records map[string]*Record) []Conflict {
	var out []Conflict
	for node, r := range records {
		if r == nil {
			continue
		}
		if (old == nil || old.Backend.Type != new.Backend.Type) && r.BackendType != "" && r.BackendType != new.Backend.Type {
			out = append(out, Conflict{Node: node, Subnets: r.Subnets(),
				Reason: fmt.Sprintf("the host runs the %s backend and the new config says %s; a backend change needs every host stopped, then restarted", r.BackendType, new.Backend.Type)})
			continue
		}
		var subs []netip.Prefix
		var why []string
		for _, s := range r.Subnets() {
			if old != nil && !old.Pool(s).Contains(s) {
				continue // outside already: peers refuse it today
			}
			if w := new.Outside(s); w != "" {
				subs = append(subs, s)
				why = append(why, fmt.Sprintf("%s: %s", s, w))
			}
		}
		if len(subs) > 0 {
			out = append(out, Conflict{Node: node, Subnets: subs, Reason: strings.Join(why, "; ")})
		}
	}
	slices.SortFunc(out, func(a, b Conflict) int { return strings.Compare(a.Node, b.Node) })
	return out
}
