package ndp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv6"

	"github.com/leased/leased/internal/testutil"
)

func TestNDPParseAndAnswer(t *testing.T) {
	target := netip.MustParseAddr("2001:db8:ab11:0:8000::42")
	lladdr := netip.MustParseAddr("fe80::11")
	for _, sll := range []bool{true, false} {
		var s solicitation
		if err := parseNS(testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, target, sll), &s); err != nil {
			t.Fatalf("parseNS(sll=%v): %v", sll, err)
		}
		if s.src != testutil.NDPRouter || s.target != target || s.hasSLL != sll || s.ethSrc != testutil.NDPRouterMAC || s.dad() {
			t.Fatalf("parsed %+v", s)
		}
		na := appendNA(nil, &s, testutil.NDPHostMAC, lladdr)
		if len(na) != naLen {
			t.Fatalf("NA is %d bytes, want %d", len(na), naLen)
		}
		if !bytes.Equal(na[0:6], testutil.NDPRouterMAC[:]) || !bytes.Equal(na[6:12], testutil.NDPHostMAC[:]) || binary.BigEndian.Uint16(na[12:]) != 0x86dd {
			t.Errorf("Ethernet header % x", na[:14])
		}
		h, err := ipv6.ParseHeader(na[14:])
		if err != nil {
			t.Fatal(err)
		}
		if h.Version != 6 || h.NextHeader != 58 || h.HopLimit != 255 || h.PayloadLen != 32 ||
			!h.Src.Equal(net.IP(lladdr.AsSlice())) || !h.Dst.Equal(net.IP(testutil.NDPRouter.AsSlice())) {
			t.Errorf("IPv6 header %+v", h)
		}
		msg := na[54:]
		m, err := icmp.ParseMessage(58, msg)
		if err != nil || m.Type != ipv6.ICMPTypeNeighborAdvertisement || m.Code != 0 {
			t.Fatalf("ICMPv6 %+v %v", m, err)
		}
		// x/net/icmp computes the checksum of the same message: it must match.
		body := m.Body.(*icmp.RawBody).Data
		again, _ := (&icmp.Message{Type: ipv6.ICMPTypeNeighborAdvertisement, Body: &icmp.RawBody{Data: body}}).
			Marshal(icmp.IPv6PseudoHeader(h.Src, h.Dst))
		if !bytes.Equal(again, msg) {
			t.Errorf("checksum differs from x/net/icmp's:\n got % x\nwant % x", msg, again)
		}
		if flags := body[0]; flags != naFlagSolicit|naFlagOverrd {
			t.Errorf("flags %#x, want solicited+override", flags)
		}
		if got := netip.AddrFrom16([16]byte(body[4:20])); got != target {
			t.Errorf("target %s", got)
		}
		if !bytes.Equal(body[20:22], []byte{optTargetLL, 1}) || !bytes.Equal(body[22:28], testutil.NDPHostMAC[:]) {
			t.Errorf("target link-layer option % x", body[20:])
		}
	}
}

func TestNDPParseDAD(t *testing.T) {
	target := netip.MustParseAddr("2001:db8:ab11:0:8000::42")
	var s solicitation
	if err := parseNS(testutil.NSFrame(t, testutil.NDPRouterMAC, netip.IPv6Unspecified(), target, false), &s); err != nil {
		t.Fatal(err)
	}
	if !s.dad() {
		t.Fatal("not recognised as DAD")
	}
	na := appendNA(nil, &s, testutil.NDPHostMAC, netip.MustParseAddr("fe80::11"))
	if !bytes.Equal(na[0:6], []byte{0x33, 0x33, 0, 0, 0, 1}) || netip.AddrFrom16([16]byte(na[38:54])) != allNodes {
		t.Errorf("DAD answer not sent to all nodes: % x", na[:54])
	}
	if na[58] != naFlagOverrd {
		t.Errorf("DAD answer flags %#x, want override only", na[58])
	}
	if icmpChecksum(netip.MustParseAddr("fe80::11"), allNodes, na[54:]) != 0 {
		t.Error("bad checksum")
	}
}

func TestNDPParseRejects(t *testing.T) {
	target := netip.MustParseAddr("2001:db8:ab11:0:8000::42")
	good := func() []byte { return testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, target, true) }
	cases := map[string]func() []byte{
		"hop limit 254":    func() []byte { f := good(); f[21] = 254; return f },
		"bad checksum":     func() []byte { f := good(); f[56] ^= 1; return f },
		"code 1":           func() []byte { f := good(); f[55] = 1; return f }, // checksum also off, but code first
		"not ICMPv6":       func() []byte { f := good(); f[20] = 17; return f },
		"extension header": func() []byte { f := good(); f[20] = 0; return f },
		"not IPv6":         func() []byte { f := good(); f[12] = 0x08; f[13] = 0; return f },
		"truncated":        func() []byte { return good()[:70] },
		"payload too long": func() []byte { f := good(); f[19] += 8; return f },
		"advertisement":    func() []byte { f := good(); f[54] = icmpTypeNA; return f },
		"multicast target": func() []byte {
			return testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, netip.MustParseAddr("ff02::1"), false)
		},
		"DAD with SLL": func() []byte {
			return testutil.NSFrame(t, testutil.NDPRouterMAC, netip.IPv6Unspecified(), target, true)
		},
		"zero-length option": func() []byte {
			f := testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, target, true)
			f[79] = 0
			fixSum(f)
			return f
		},
		"DAD not solicited-node": func() []byte {
			f := testutil.NSFrame(t, testutil.NDPRouterMAC, netip.IPv6Unspecified(), target, false)
			f[53] ^= 1
			fixSum(f)
			return f
		},
	}
	for name, mk := range cases {
		var s solicitation
		if err := parseNS(mk(), &s); !errors.Is(err, errNotNS) {
			t.Errorf("%s: parseNS = %v, want errNotNS", name, err)
		}
	}
}

// fixSum recomputes the ICMPv6 checksum of a test frame.
func fixSum(f []byte) {
	src, dst := netip.AddrFrom16([16]byte(f[22:38])), netip.AddrFrom16([16]byte(f[38:54]))
	f[56], f[57] = 0, 0
	binary.BigEndian.PutUint16(f[56:], icmpChecksum(src, dst, f[54:]))
}

func TestNDPFilter(t *testing.T) {
	cases := []struct {
		slice string
		in    []string
		out   []string
	}{
		{"2001:db8:ab11:0:8000::/80", []string{"2001:db8:ab11:0:8000::", "2001:db8:ab11:0:8000:ffff:ffff:ffff"},
			[]string{"2001:db8:ab11:0:8001::", "2001:db8:ab11::11", "2001:db8:ab11:0:7fff:ffff:ffff:ffff", "2001:db8:ab12:0:8000::1"}},
		{"2001:db8:ab11:0:8000::/65", []string{"2001:db8:ab11:0:8000::1", "2001:db8:ab11:0:ffff::1"}, []string{"2001:db8:ab11::1", "2001:db8:ab11:0:7fff::1"}},
		{"2001:db8:ab11:0:8000::40/122", []string{"2001:db8:ab11:0:8000::40", "2001:db8:ab11:0:8000::7f"}, []string{"2001:db8:ab11:0:8000::80", "2001:db8:ab11:0:8000::3f"}},
		{"2001:db8:ab11:0:8000::5/128", []string{"2001:db8:ab11:0:8000::5"}, []string{"2001:db8:ab11:0:8000::4", "2001:db8:ab11:0:8000::6"}},
		{"2001:db8:ab00::/40", []string{"2001:db8:abff::1"}, []string{"2001:db8:ac00::1"}},
	}
	for _, tc := range cases {
		vm, err := bpf.NewVM(nsFilter(netip.MustParsePrefix(tc.slice)))
		if err != nil {
			t.Fatalf("%s: %v", tc.slice, err)
		}
		for _, a := range tc.in {
			if n, err := vm.Run(testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, netip.MustParseAddr(a), true)); err != nil || n == 0 {
				t.Errorf("%s: solicitation for %s dropped (%d, %v)", tc.slice, a, n, err)
			}
		}
		for _, a := range tc.out {
			if n, _ := vm.Run(testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, netip.MustParseAddr(a), true)); n != 0 {
				t.Errorf("%s: solicitation for %s passed", tc.slice, a)
			}
		}
		f := testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, netip.MustParseAddr(tc.in[0]), true)
		f[54] = icmpTypeNA
		if n, _ := vm.Run(f); n != 0 {
			t.Errorf("%s: an advertisement passed", tc.slice)
		}
		f = testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, netip.MustParseAddr(tc.in[0]), true)
		f[21] = 64
		if n, _ := vm.Run(f); n != 0 {
			t.Errorf("%s: hop limit 64 passed", tc.slice)
		}
	}
	vm, _ := bpf.NewVM(nsFilter(netip.Prefix{}))
	if n, _ := vm.Run(testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, netip.MustParseAddr("2001:db8::1"), true)); n != 0 {
		t.Error("the withdrawn filter passed a solicitation")
	}
	if _, err := bpf.Assemble(nsFilter(netip.MustParsePrefix("::/0"))); err != nil {
		t.Error(err)
	}
}

// The filter assembles for a slice of every length, so NewResponder
// succeeds; a filter that does not assemble is an error that says what to
// do, not a panic.
func TestNDPFilterAssembles(t *testing.T) {
	if err := checkFilters(nsFilter); err != nil {
		t.Fatalf("checkFilters(nsFilter) = %v", err)
	}
	if _, err := NewResponder(nil, "eth0", 2, ModeSubnet); err != nil {
		t.Fatalf("NewResponder = %v", err)
	}
	broken := func(slice netip.Prefix) []bpf.Instruction {
		prog := nsFilter(slice)
		if slice.Bits() == 77 {
			prog[0] = bpf.LoadAbsolute{Off: 12, Size: 3} // no such load size
		}
		return prog
	}
	err := checkFilters(broken)
	if err == nil {
		t.Fatal("checkFilters accepted a filter that does not assemble")
	}
	for _, want := range []string{"length 77", "defective", "install another version"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestNDPDecide(t *testing.T) {
	r, err := NewResponder(nil, "eth0", 2, ModeSubnet)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &Answer{Slice: testutil.NDPSlice, MAC: testutil.NDPHostMAC}
	s := func(target string, from [6]byte) *solicitation {
		return &solicitation{ethSrc: from, src: testutil.NDPRouter, target: netip.MustParseAddr(target)}
	}
	for _, tc := range []struct {
		cfg  *Answer
		s    *solicitation
		want verdict
	}{
		{cfg, s("2001:db8:ab11:0:8000::2", testutil.NDPRouterMAC), verdictAnswer},
		{cfg, s("2001:db8:ab11:0:8000:ffff:ffff:ffff", testutil.NDPRouterMAC), verdictAnswer},
		{cfg, s("2001:db8:ab11:0:8001::2", testutil.NDPRouterMAC), verdictDrop},                               // a peer's slice
		{cfg, s("2001:db8:ab11::12", testutil.NDPRouterMAC), verdictDrop},                                     // a host
		{cfg, s("2001:db8:ab11:0:8000::2", testutil.NDPHostMAC), verdictDrop},                                 // ourselves
		{&Answer{MAC: testutil.NDPHostMAC}, s("2001:db8:ab11:0:8000::2", testutil.NDPRouterMAC), verdictDrop}, // withdrawn
	} {
		if got := r.decide(tc.cfg, tc.s); got != tc.want {
			t.Errorf("subnet mode, %s in %s: %v, want %v", tc.s.target, tc.cfg.Slice, got, tc.want)
		}
	}
	r.mode = ModePresent
	r.present = &presence{addrs: map[netip.Addr]bool{netip.MustParseAddr("2001:db8:ab11:0:8000::2"): true}}
	if got := r.decide(cfg, s("2001:db8:ab11:0:8000::2", testutil.NDPRouterMAC)); got != verdictAnswer {
		t.Errorf("present address: %v", got)
	}
	if got := r.decide(cfg, s("2001:db8:ab11:0:8000::3", testutil.NDPRouterMAC)); got != verdictPending {
		t.Errorf("absent address in the slice: %v", got)
	}
	if got := r.decide(cfg, s("2001:db8:ab11:0:8001::2", testutil.NDPRouterMAC)); got != verdictDrop {
		t.Errorf("address outside the slice: %v", got)
	}
}

func BenchmarkNDPAnswer(b *testing.B) {
	f := testutil.NSFrame(b, testutil.NDPRouterMAC, testutil.NDPRouter, netip.MustParseAddr("2001:db8:ab11:0:8000::42"), true)
	out := make([]byte, 0, naLen)
	var s solicitation
	src := netip.MustParseAddr("fe80::11")
	b.ReportAllocs()
	for b.Loop() {
		if err := parseNS(f, &s); err != nil {
			b.Fatal(err)
		}
		out = appendNA(out[:0], &s, testutil.NDPHostMAC, src)
	}
}
