package backend

import (
	"encoding/binary"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/testutil"
)

// Bounds of the present mode's probes that Documentation/backends.md
// states (probeRate and probeBurst in package ndp).
const (
	docProbeRate  = 4
	docProbeBurst = 20
)

// A flood of solicitations for 100,000 distinct addresses of the slice,
// sent on the wire to a proxy-ndp backend in present mode, leaves at most
// probeBurst + probeRate per second probes (each a neighbour entry on the
// bridge); a real neighbour behind the host that appears afterwards is
// answered. A real kernel in a namespace: eth0, the uplink, is a veth whose
// peer e0 the test sends from; the bridge is a veth whose peer answers
// nothing. (TestNDPPresentFloodBounded in package ndp checks the
// responder's bookkeeping under the same flood.)
func TestNDPPresentFloodOnTheWire(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.NewNS(t, "flood")
	testutil.Run(t, "ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "e0")
	testutil.Run(t, "ip", "-n", ns, "link", "add", "cbr0", "type", "veth", "peer", "name", "c0")
	for _, l := range []string{"eth0", "e0", "cbr0", "c0"} {
		testutil.Run(t, "ip", "-n", ns, "link", "set", l, "up")
	}
	testutil.Run(t, "ip", "-n", ns, "addr", "add", "2001:db8:ab11::11/64", "dev", "eth0", "nodad")
	testutil.Run(t, "ip", "-n", ns, "addr", "add", netip.PrefixFrom(testutil.NDPSlice.Addr().Next(), testutil.NDPSlice.Bits()).String(), "dev", "cbr0", "nodad")
	h := testutil.NSHandle(t, ns)
	br, err := h.LinkByName("cbr0")
	if err != nil {
		t.Fatal(err)
	}
	e0, err := h.LinkByName("e0")
	if err != nil {
		t.Fatal(err)
	}
	b := mustNDP(t, `{"Type":"proxy-ndp","Mode":"present"}`, extOf(t, h, "eth0", "", "2001:db8:ab11::11"), ns)
	if err := b.Answer(Local{Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V6: testutil.NDPSlice}, Network: ipfam.Pair[netip.Prefix]{V6: testutil.NDPNetwork}}); err != nil {
		t.Fatal(err)
	}

	// The router's side: a packet socket on e0.
	var fd int
	if err := (nsExec{path: testutil.NSPath(ns)}).do(func() (err error) {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_IPV6)))
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IPV6), Ifindex: e0.Attrs().Index})
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	send := func(target netip.Addr) {
		if err := unix.Sendto(fd, testutil.NSFrame(t, testutil.NDPRouterMAC, testutil.NDPRouter, target, true), 0, &unix.SockaddrLinklayer{Ifindex: e0.Attrs().Index, Halen: 6}); err != nil && err != unix.ENOBUFS {
			t.Fatal(err)
		}
	}

	neighs := func() int {
		ns, err := h.NeighList(br.Attrs().Index, unix.AF_INET6)
		if err != nil {
			t.Fatal(err)
		}
		// A dump that races with changes may repeat entries: count addresses.
		seen := map[netip.Addr]bool{}
		for _, e := range ns {
			if a := netip.AddrFrom16([16]byte(e.IP.To16())); e.LinkIndex == br.Attrs().Index && testutil.NDPSlice.Contains(a) {
				seen[a] = true
			}
		}
		return len(seen)
	}
	const targets = 100_000
	start := time.Now()
	maxNeigh := 0
	for i := range targets {
		a := testutil.NDPSlice.Addr().As16()
		binary.BigEndian.PutUint32(a[12:], uint32(0x1000+i))
		send(netip.AddrFrom16(a))
		if i%50 == 49 {
			time.Sleep(time.Millisecond) // about 2 s in all: the probe budget refills
		}
		if i%1000 == 999 {
			maxNeigh = max(maxNeigh, neighs())
		}
	}
	maxNeigh = max(maxNeigh, neighs())
	elapsed := time.Since(start) // probes are budgeted by time, up to the last count
	t.Logf("%d solicitations in %v: at most %d neighbour entries on the bridge", targets, elapsed.Round(time.Millisecond), maxNeigh)
	// Every probe may add one entry; the kernel keeps them for seconds.
	if limit := docProbeBurst + int(docProbeRate*elapsed.Seconds()) + 2; maxNeigh > limit {
		t.Errorf("%d neighbour entries on the bridge after %v of flood, want at most %d (%d at once, %d/s)", maxNeigh, elapsed, limit, docProbeBurst, docProbeRate)
	}
	if maxNeigh == 0 {
		t.Error("no probe reached the bridge: the flood never got to the responder")
	}

	// A real neighbour behind the host is answered: the router's
	// solicitation gets an advertisement on e0.
	real := netip.MustParseAddr("2001:db8:ab11:0:8000::42")
	if err := h.NeighAdd(&netlink.Neigh{LinkIndex: br.Attrs().Index, Family: unix.AF_INET6, IP: real.AsSlice(),
		HardwareAddr: []byte{2, 0, 0, 0, 0, 0x42}, State: netlink.NUD_REACHABLE}); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200_000}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if time.Now().After(deadline) {
			t.Fatalf("no advertisement for %s, a neighbour on the bridge, after the flood", real)
		}
		send(real)
		for {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				break // timeout: solicit again
			}
			f := buf[:n]
			if n >= 14+40+24 && f[14+6] == 58 && f[14+40] == 136 && netip.AddrFrom16([16]byte(f[14+40+8:14+40+24])) == real {
				return
			}
		}
	}
}
