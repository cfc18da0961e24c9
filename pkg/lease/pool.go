package lease

import "net/netip"

// Pool is one address family's allocation range: subnets of SubnetLen bits
// inside Network, from Min to Max inclusive (both are subnets of SubnetLen).
type Pool struct {
	Network   netip.Prefix
	SubnetLen int
	Min       netip.Prefix
	Max       netip.Prefix
}
