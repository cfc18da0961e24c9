package testutil

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv6"
)

// The addresses of the proxy-NDP tests: the router that solicits, the
// host that answers, the host's slice and the network it belongs to (an
// on-link /65 that holds the slice).
var (
	NDPRouterMAC = [6]byte{0x02, 0, 0, 0, 0, 0x01}
	NDPHostMAC   = [6]byte{0x02, 0, 0, 0, 0, 0x11}
	NDPRouter    = netip.MustParseAddr("2001:db8:ab11::1")
	NDPSlice     = netip.MustParsePrefix("2001:db8:ab11:0:8000::/80")
	NDPNetwork   = netip.MustParsePrefix("2001:db8:ab11:0:8000::/65")
)

// NSFrame builds an Ethernet frame from ethSrc carrying an IPv6 Neighbor
// Solicitation for target from src (the unspecified address for duplicate
// address detection) to target's solicited-node group, with a source
// link-layer address option (ethSrc) if sll. It is encoded independently
// of the code under test: the ICMPv6 message and its checksum by
// golang.org/x/net/icmp, the group by RFC 4291 2.7.1.
func NSFrame(t testing.TB, ethSrc [6]byte, src, target netip.Addr, sll bool) []byte {
	t.Helper()
	tb := target.As16()
	dst := netip.AddrFrom16([16]byte{0: 0xff, 1: 0x02, 11: 0x01, 12: 0xff, 13: tb[13], 14: tb[14], 15: tb[15]})
	body := make([]byte, 20) // reserved + target
	copy(body[4:], target.AsSlice())
	if sll {
		body = append(body, 1, 1) // source link-layer address option, 8 bytes
		body = append(body, ethSrc[:]...)
	}
	m := icmp.Message{Type: ipv6.ICMPTypeNeighborSolicitation, Body: &icmp.RawBody{Data: body}}
	msg, err := m.Marshal(icmp.IPv6PseudoHeader(net.IP(src.AsSlice()), net.IP(dst.AsSlice())))
	if err != nil {
		t.Fatal(err)
	}
	d := dst.As16()
	f := []byte{0x33, 0x33, d[12], d[13], d[14], d[15]}
	f = append(f, ethSrc[:]...)
	f = append(f, 0x86, 0xdd)
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(msg)))
	ip[6], ip[7] = 58, 255 // next header ICMPv6, hop limit 255
	copy(ip[8:], src.AsSlice())
	copy(ip[24:], dst.AsSlice())
	return append(append(f, ip...), msg...)
}
