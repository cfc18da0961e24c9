// Package ipfam names the two address families and holds one value per
// family, so that code that does the same for IPv4 and IPv6 is one loop
// over the families instead of two copied branches.
//
// It is the bottom of the package graph: pkg/lease, pkg/backend and the
// agent use it, and it imports only the standard library.
package ipfam

import (
	"iter"
	"net/netip"
)

// Family is an address family.
type Family uint8

// The address families, in the order All yields them.
const (
	IPv4 Family = iota
	IPv6
)

// String returns "IPv4" or "IPv6".
func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// Other returns the other family.
func (f Family) Other() Family { return 1 - f }

// Of returns the family of a (an IPv4-mapped IPv6 address is IPv6).
func Of(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// Has reports whether a is a valid address of family f: IPv4, or IPv6 but
// not IPv4-mapped.
func (f Family) Has(a netip.Addr) bool {
	if f == IPv6 {
		return a.Is6() && !a.Is4In6()
	}
	return a.Is4()
}

// Pair holds one T per address family. The zero Pair holds T's zero value
// for both. A Pair of comparable T is comparable.
type Pair[T any] struct {
	V4, V6 T
}

// Get returns f's value.
func (p Pair[T]) Get(f Family) T {
	if f == IPv6 {
		return p.V6
	}
	return p.V4
}

// Ptr returns a pointer to f's value in *p.
func (p *Pair[T]) Ptr(f Family) *T {
	if f == IPv6 {
		return &p.V6
	}
	return &p.V4
}

// Set sets f's value.
func (p *Pair[T]) Set(f Family, v T) { *p.Ptr(f) = v }

// All yields each family and its value, IPv4 first.
func (p Pair[T]) All() iter.Seq2[Family, T] {
	return func(yield func(Family, T) bool) {
		_ = yield(IPv4, p.V4) && yield(IPv6, p.V6)
	}
}

// Families yields IPv4, then IPv6.
func Families() iter.Seq[Family] {
	return func(yield func(Family) bool) {
		_ = yield(IPv4) && yield(IPv6)
	}
}

// Valider is a value that may be unset: netip.Addr, netip.Prefix.
type Valider interface{ IsValid() bool }

// Valid yields each family whose value in p is valid and that value, IPv4
// first: the families a pair of prefixes or addresses has.
func Valid[T Valider](p Pair[T]) iter.Seq2[Family, T] {
	return func(yield func(Family, T) bool) {
		if p.V4.IsValid() && !yield(IPv4, p.V4) {
			return
		}
		if p.V6.IsValid() {
			yield(IPv6, p.V6)
		}
	}
}

// Any reports whether p holds a valid value for at least one family.
func Any[T Valider](p Pair[T]) bool { return p.V4.IsValid() || p.V6.IsValid() }
