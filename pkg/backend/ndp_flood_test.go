package backend

import (
	"context"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/testutil"
)

// A flood of solicitations for 100,000 distinct addresses of the slice, in
// present mode, keeps the remembered solicitations and probe times within
// their bounds, and the probes the host sends (each one a neighbour entry
// on the bridge) within probeBurst + probeRate per second: a real kernel
// in a namespace, the bridge a veth whose peer answers nothing.
func TestNDPPresentFloodBounded(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.NewNS(t, "flood")
	testutil.Run(t, "ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "e0")
	testutil.Run(t, "ip", "-n", ns, "link", "add", "cbr0", "type", "veth", "peer", "name", "c0")
	for _, l := range []string{"eth0", "e0", "cbr0", "c0"} {
		testutil.Run(t, "ip", "-n", ns, "link", "set", l, "up")
	}
	testutil.Run(t, "ip", "-n", ns, "addr", "add", netip.PrefixFrom(ndpSlice.Addr().Next(), ndpSlice.Bits()).String(), "dev", "cbr0", "nodad")
	h := testutil.NSHandle(t, ns)
	up, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	br, err := h.LinkByName("cbr0")
	if err != nil {
		t.Fatal(err)
	}
	nse := nsExec{path: testutil.NSPath(ns)}
	r := newNDPResponder(nse, "eth0", up.Attrs().Index, ModePresent)
	r.cfg.Store(&answerCfg{slice: ndpSlice, mac: ndpHostMAC})
	p, err := newPresence(nse, up.Attrs().Index, r)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	neighs := func() int {
		ns, err := h.NeighList(br.Attrs().Index, unix.AF_INET6)
		if err != nil {
			t.Fatal(err)
		}
		// A dump that races with changes may repeat entries: count addresses.
		seen := map[netip.Addr]bool{}
		for _, e := range ns {
			if a := netip.AddrFrom16([16]byte(e.IP.To16())); e.LinkIndex == br.Attrs().Index && ndpSlice.Contains(a) {
				seen[a] = true
			}
		}
		return len(seen)
	}
	const targets = 100_000
	start := time.Now()
	maxNeigh, maxPending, maxProbed := 0, 0, 0
	for i := range targets {
		a := ndpSlice.Addr().As16()
		binary.BigEndian.PutUint32(a[12:], uint32(0x1000+i))
		p.solicited(solicitation{ethSrc: ndpRouterMAC, src: ndpRouter, dst: ndpRouter, target: netip.AddrFrom16(a)})
		if i%50 == 49 {
			time.Sleep(time.Millisecond) // about 2 s in all: the probe budget refills
		}
		if i%1000 == 999 {
			p.mu.Lock()
			maxPending, maxProbed = max(maxPending, len(p.pending)), max(maxProbed, len(p.probed))
			p.mu.Unlock()
			maxNeigh = max(maxNeigh, neighs())
		}
	}
	elapsed := time.Since(start)
	maxNeigh = max(maxNeigh, neighs())
	t.Logf("%d solicitations in %v: at most %d remembered targets, %d probe times, %d neighbour entries on the bridge",
		targets, elapsed.Round(time.Millisecond), maxPending, maxProbed, maxNeigh)
	if maxPending > maxPendingTargets {
		t.Errorf("%d targets remembered, want at most %d", maxPending, maxPendingTargets)
	}
	// Probe times are forgotten every presentExpire once probeInterval old
	// (with room for an expiry delayed on a loaded machine).
	if limit := probeBurst + int(probeRate*(probeInterval+5*presentExpire).Seconds()); maxProbed > limit {
		t.Errorf("%d probe times remembered, want at most %d", maxProbed, limit)
	}
	// Every probe may add one entry; the kernel keeps them for seconds.
	if limit := probeBurst + int(probeRate*elapsed.Seconds()) + 2; maxNeigh > limit {
		t.Errorf("%d neighbour entries on the bridge after %v of flood, want at most %d (%d at once, %d/s)", maxNeigh, elapsed, limit, probeBurst, probeRate)
	}

	// A real neighbour is still found, and a remembered solicitation for
	// it is answered once it shows up (sendNA runs; no socket here, so
	// only presence is checked).
	real := netip.MustParseAddr("2001:db8:ab11:0:8000::42")
	if err := h.NeighAdd(&netlink.Neigh{LinkIndex: br.Attrs().Index, Family: unix.AF_INET6, IP: real.AsSlice(),
		HardwareAddr: []byte{2, 0, 0, 0, 0, 0x42}, State: netlink.NUD_REACHABLE}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for !p.has(real) {
		if time.Now().After(deadline) {
			t.Fatalf("%s, a neighbour on the bridge, not present after the flood", real)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
