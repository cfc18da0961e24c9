// Package ndp is the proxy-ndp backend's responder: it answers Neighbor
// Solicitations arriving on the uplink for addresses of the host's IPv6
// slice with Neighbor Advertisements carrying the uplink's MAC. It parses
// and writes the NDP wire format (this file), filters solicitations in the
// kernel with a BPF program, and in present mode tracks which addresses are
// behind the host. It reaches the kernel only through Kernel, which
// pkg/backend's kernel provides.
package ndp

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"golang.org/x/net/bpf"
)

// NDP wire format (RFC 4861) as the proxy-ndp responder reads and writes
// it: an Ethernet II frame carrying an IPv6 header without extension headers
// and an ICMPv6 message. Neighbor Solicitations never carry extension
// headers in practice; a solicitation that does is not answered.

const (
	ethHdrLen    = 14
	ipv6HdrLen   = 40
	icmpOff      = ethHdrLen + ipv6HdrLen // first byte of the ICMPv6 message
	ndpTargetOff = icmpOff + 8            // target address of an NS or NA
	nsMinLen     = icmpOff + 24           // NS without options
	naLen        = icmpOff + 24 + 8       // NA with one target link-layer option

	ethTypeIPv6   = 0x86dd
	protoICMPv6   = 58
	ndpHopLimit   = 255
	icmpTypeNS    = 135
	icmpTypeNA    = 136
	optSourceLL   = 1
	optTargetLL   = 2
	naFlagRouter  = 0x80
	naFlagSolicit = 0x40
	naFlagOverrd  = 0x20
)

// errNotNS is returned by parseNS for frames that are not a valid Neighbor
// Solicitation; the responder drops them silently.
var errNotNS = errors.New("ndp: not a valid neighbor solicitation")

// solicitation is a Neighbor Solicitation that passed the checks of RFC
// 4861 section 7.1.1.
type solicitation struct {
	ethSrc [6]byte // Ethernet source of the frame
	src    netip.Addr
	dst    netip.Addr
	target netip.Addr
	// sll is the source link-layer address option, when present.
	sll    [6]byte
	hasSLL bool
}

// dad reports whether s is a duplicate address detection probe (source ::).
func (s *solicitation) dad() bool { return s.src.IsUnspecified() }

// parseNS decodes frame into s. It checks everything RFC 4861 7.1.1 asks
// of a receiver (hop limit 255, ICMPv6 checksum, code 0, length, a unicast
// target, non-empty options, and for a DAD probe a solicited-node
// destination and no source link-layer option). It does not allocate.
func parseNS(frame []byte, s *solicitation) error {
	if len(frame) < nsMinLen || binary.BigEndian.Uint16(frame[12:14]) != ethTypeIPv6 {
		return errNotNS
	}
	ip := frame[ethHdrLen:]
	if ip[0]>>4 != 6 || ip[6] != protoICMPv6 || ip[7] != ndpHopLimit {
		return errNotNS
	}
	plen := int(binary.BigEndian.Uint16(ip[4:6]))
	if plen < 24 || ipv6HdrLen+plen > len(ip) {
		return errNotNS
	}
	msg := ip[ipv6HdrLen : ipv6HdrLen+plen]
	if msg[0] != icmpTypeNS || msg[1] != 0 {
		return errNotNS
	}
	src := netip.AddrFrom16([16]byte(ip[8:24]))
	dst := netip.AddrFrom16([16]byte(ip[24:40]))
	if icmpChecksum(src, dst, msg) != 0 {
		return errNotNS
	}
	target := netip.AddrFrom16([16]byte(msg[8:24]))
	if target.IsMulticast() {
		return errNotNS
	}
	*s = solicitation{src: src, dst: dst, target: target}
	copy(s.ethSrc[:], frame[6:12])
	for opts := msg[24:]; len(opts) > 0; {
		if len(opts) < 8 || opts[1] == 0 || int(opts[1])*8 > len(opts) {
			return errNotNS
		}
		n := int(opts[1]) * 8
		if opts[0] == optSourceLL && n == 8 {
			copy(s.sll[:], opts[2:8])
			s.hasSLL = true
		}
		opts = opts[n:]
	}
	if s.dad() && (s.hasSLL || dst != solicitedNode(target)) {
		return errNotNS
	}
	return nil
}

// appendNA appends to b the frame answering s: a Neighbor Advertisement for
// s.target sent from src (the uplink's link-local address) and mac, with the
// override flag and a target link-layer option carrying mac. It is
// solicited and unicast back to the solicitor, except for a DAD probe,
// which is answered to all nodes (ff02::1) unsolicited, as RFC 4861 7.2.4
// says. It allocates only if b lacks room for naLen bytes.
func appendNA(b []byte, s *solicitation, mac [6]byte, src netip.Addr) []byte {
	dst, ethDst, flags := s.src, s.ethSrc, byte(naFlagSolicit|naFlagOverrd)
	if s.hasSLL {
		ethDst = s.sll
	}
	if s.dad() {
		dst, ethDst, flags = allNodes, [6]byte{0x33, 0x33, 0, 0, 0, 1}, naFlagOverrd
	}
	start := len(b)
	b = append(b, make([]byte, naLen)...)
	f := b[start:]
	copy(f[0:6], ethDst[:])
	copy(f[6:12], mac[:])
	binary.BigEndian.PutUint16(f[12:14], ethTypeIPv6)
	ip := f[ethHdrLen:]
	ip[0] = 6 << 4
	binary.BigEndian.PutUint16(ip[4:6], naLen-icmpOff)
	ip[6], ip[7] = protoICMPv6, ndpHopLimit
	s16, d16 := src.As16(), dst.As16()
	copy(ip[8:24], s16[:])
	copy(ip[24:40], d16[:])
	msg := ip[ipv6HdrLen:]
	msg[0] = icmpTypeNA
	msg[4] = flags
	t16 := s.target.As16()
	copy(msg[8:24], t16[:])
	msg[24], msg[25] = optTargetLL, 1
	copy(msg[26:32], mac[:])
	binary.BigEndian.PutUint16(msg[2:4], icmpChecksum(src, dst, msg))
	return b
}

var allNodes = netip.MustParseAddr("ff02::1")

// solicitedNode returns the solicited-node multicast address of a
// (ff02::1:ffXX:XXXX, RFC 4291 2.7.1).
func solicitedNode(a netip.Addr) netip.Addr {
	b := a.As16()
	m := [16]byte{0: 0xff, 1: 0x02, 11: 0x01, 12: 0xff, 13: b[13], 14: b[14], 15: b[15]}
	return netip.AddrFrom16(m)
}

// icmpChecksum returns the ICMPv6 checksum of msg between src and dst (RFC
// 4443 2.3): computed over a message whose checksum field is zero it is
// the value to store; over a received message it is 0 when that is valid.
func icmpChecksum(src, dst netip.Addr, msg []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for len(b) >= 2 {
			sum += uint32(b[0])<<8 | uint32(b[1])
			b = b[2:]
		}
		if len(b) == 1 {
			sum += uint32(b[0]) << 8
		}
	}
	s, d := src.As16(), dst.As16()
	add(s[:])
	add(d[:])
	sum += uint32(len(msg)) + protoICMPv6
	add(msg)
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// nsFilter is the classic BPF program the responder's packet socket runs in
// the kernel: it passes only IPv6 frames carrying, with no extension header
// and hop limit 255, an ICMPv6 Neighbor Solicitation whose target lies in
// slice. Everything else (other traffic, solicitations for the hosts' own
// addresses or other slices) never wakes the agent. With an invalid slice
// it passes nothing. The responder checks the same in Go (parseNS and the
// target test), so the filter only saves work, it does not decide.
func nsFilter(slice netip.Prefix) []bpf.Instruction {
	const reject = 0xff // placeholder for "jump to the reject instruction"
	if !slice.IsValid() || !slice.Addr().Is6() {
		return []bpf.Instruction{bpf.RetConstant{Val: 0}}
	}
	prog := []bpf.Instruction{
		bpf.LoadAbsolute{Off: 12, Size: 2},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: ethTypeIPv6, SkipTrue: reject},
		bpf.LoadAbsolute{Off: ethHdrLen + 6, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: protoICMPv6, SkipTrue: reject},
		bpf.LoadAbsolute{Off: ethHdrLen + 7, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: ndpHopLimit, SkipTrue: reject},
		bpf.LoadAbsolute{Off: icmpOff, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: icmpTypeNS, SkipTrue: reject},
	}
	addr := slice.Masked().Addr().As16()
	for w, bits := 0, slice.Bits(); bits > 0; w, bits = w+1, bits-32 {
		val := binary.BigEndian.Uint32(addr[4*w:])
		prog = append(prog, bpf.LoadAbsolute{Off: uint32(ndpTargetOff + 4*w), Size: 4})
		if bits < 32 {
			prog = append(prog, bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: ^uint32(0) << (32 - bits)})
		}
		prog = append(prog, bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: val, SkipTrue: reject})
	}
	prog = append(prog, bpf.RetConstant{Val: 1 << 16}, bpf.RetConstant{Val: 0})
	rej := len(prog) - 1
	for i, in := range prog {
		if j, ok := in.(bpf.JumpIf); ok && j.SkipTrue == reject {
			j.SkipTrue = uint8(rej - i - 1)
			prog[i] = j
		}
	}
	return prog
}
