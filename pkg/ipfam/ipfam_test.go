package ipfam

import (
	"net/netip"
	"testing"
)

func TestPair(t *testing.T) {
	p4, p6 := netip.MustParsePrefix("10.0.0.0/24"), netip.MustParsePrefix("2001:db8::/64")
	var p Pair[netip.Prefix]
	if Any(p) {
		t.Fatal("the zero pair has a valid value")
	}
	p.Set(IPv6, p6)
	if p.Get(IPv6) != p6 || p.V6 != p6 || p.Get(IPv4).IsValid() {
		t.Fatalf("after Set(IPv6): %+v", p)
	}
	var got []string
	for f, s := range Valid(p) {
		got = append(got, f.String()+" "+s.String())
	}
	if len(got) != 1 || got[0] != "IPv6 2001:db8::/64" {
		t.Fatalf("Valid yields %q", got)
	}
	p.Set(IPv4, p4)
	got = got[:0]
	for f, s := range p.All() {
		got = append(got, f.String()+" "+s.String())
	}
	if len(got) != 2 || got[0] != "IPv4 10.0.0.0/24" || got[1] != "IPv6 2001:db8::/64" {
		t.Fatalf("All yields %q", got)
	}
	for f, s := range Valid(p) { // break after the first
		if f != IPv4 || s != p4 {
			t.Fatalf("Valid yields %s %s first", f, s)
		}
		break
	}
	if p != (Pair[netip.Prefix]{V4: p4, V6: p6}) {
		t.Fatal("pairs of equal values differ")
	}
}

func TestFamilyOf(t *testing.T) {
	for _, c := range []struct {
		a    string
		f    Family
		has4 bool
		has6 bool
	}{
		{"192.0.2.1", IPv4, true, false},
		{"2001:db8::1", IPv6, false, true},
		{"::ffff:192.0.2.1", IPv6, false, false},
	} {
		a := netip.MustParseAddr(c.a)
		if Of(a) != c.f || IPv4.Has(a) != c.has4 || IPv6.Has(a) != c.has6 {
			t.Errorf("%s: Of %s, IPv4.Has %v, IPv6.Has %v", c.a, Of(a), IPv4.Has(a), IPv6.Has(a))
		}
	}
	var fs []Family
	for f := range Families() {
		fs = append(fs, f)
	}
	if len(fs) != 2 || fs[0] != IPv4 || fs[1] != IPv6 {
		t.Fatalf("Families yields %v", fs)
	}
}
