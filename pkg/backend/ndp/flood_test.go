package ndp

import (
	"context"
	"encoding/binary"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/testutil"
)

// fakeKernel is the present mode's kernel for tests of its bookkeeping:
// every address routes to link 5 (not the uplink), probes are counted,
// neighbour events come from the test.
type fakeKernel struct {
	mu     sync.Mutex
	probes int
	events chan<- netlink.NeighUpdate
	subbed chan struct{}
}

func (k *fakeKernel) ListenPacket(string, int, []bpf.RawInstruction) (PacketConn, error) {
	return nil, unix.EOPNOTSUPP
}
func (k *fakeKernel) NeighList(int) ([]netlink.Neigh, error)    { return nil, nil }
func (k *fakeKernel) AddrList(int, int) ([]netlink.Addr, error) { return nil, nil }
func (k *fakeKernel) SubscribeNeighs(ch chan<- netlink.NeighUpdate, done <-chan struct{}, _ func(error)) error {
	k.mu.Lock()
	k.events = ch
	k.mu.Unlock()
	close(k.subbed)
	go func() { <-done; close(ch) }()
	return nil
}
func (k *fakeKernel) RouteGet(netip.Addr) ([]netlink.Route, error) {
	return []netlink.Route{{LinkIndex: 5}}, nil
}
func (k *fakeKernel) Probe(netip.Addr) error {
	k.mu.Lock()
	k.probes++
	k.mu.Unlock()
	return nil
}
func (k *fakeKernel) Close() error { return nil }

// writeConn keeps what is written.
type writeConn struct {
	mu  sync.Mutex
	out [][]byte
}

func (c *writeConn) Read([]byte) (int, error) { return 0, os.ErrClosed }
func (c *writeConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.out = append(c.out, append([]byte(nil), b...))
	return len(b), nil
}
func (c *writeConn) SetFilter([]bpf.RawInstruction) error { return nil }
func (c *writeConn) Close() error                         { return nil }

// A flood of solicitations for 100,000 distinct addresses of the slice, in
// present mode, keeps the remembered solicitations and probe times within
// their bounds and the probes within probeBurst + probeRate per second; a
// neighbour that appears afterwards is found, and the solicitation waiting
// for it is answered. (TestNDPPresentFloodOnTheWire in pkg/backend floods
// a real kernel and counts the neighbour entries the probes leave.)
func TestNDPPresentFloodBounded(t *testing.T) {
	k := &fakeKernel{subbed: make(chan struct{})}
	r, err := NewResponder(k, "eth0", 2, ModePresent)
	if err != nil {
		t.Fatal(err)
	}
	r.cfg.Store(&Answer{Slice: testutil.NDPSlice, MAC: testutil.NDPHostMAC})
	conn := &writeConn{}
	r.f = conn
	p := newPresence(k, 2, r)
	r.present = p
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	<-k.subbed

	const targets = 100_000
	start := time.Now()
	maxPending, maxProbed := 0, 0
	for i := range targets {
		a := testutil.NDPSlice.Addr().As16()
		binary.BigEndian.PutUint32(a[12:], uint32(0x1000+i))
		p.solicited(solicitation{ethSrc: testutil.NDPRouterMAC, src: testutil.NDPRouter, dst: testutil.NDPRouter, target: netip.AddrFrom16(a)})
		if i%50 == 49 {
			time.Sleep(time.Millisecond) // about 2 s in all: the probe budget refills
		}
		if i%1000 == 999 {
			p.mu.Lock()
			maxPending, maxProbed = max(maxPending, len(p.pending)), max(maxProbed, len(p.probed))
			p.mu.Unlock()
		}
	}
	elapsed := time.Since(start)
	k.mu.Lock()
	probes := k.probes
	k.mu.Unlock()
	t.Logf("%d solicitations in %v: at most %d remembered targets, %d probe times, %d probes",
		targets, elapsed.Round(time.Millisecond), maxPending, maxProbed, probes)
	if maxPending > maxPendingTargets {
		t.Errorf("%d targets remembered, want at most %d", maxPending, maxPendingTargets)
	}
	// Probe times are forgotten every presentExpire once probeInterval old
	// (with room for an expiry delayed on a loaded machine).
	if limit := probeBurst + int(probeRate*(probeInterval+5*presentExpire).Seconds()); maxProbed > limit {
		t.Errorf("%d probe times remembered, want at most %d", maxProbed, limit)
	}
	if limit := probeBurst + int(probeRate*elapsed.Seconds()) + 2; probes > limit {
		t.Errorf("%d probes in %v of flood, want at most %d (%d at once, %d/s)", probes, elapsed, limit, probeBurst, probeRate)
	}

	// A neighbour that shows up is found, and a solicitation remembered
	// for it (once the flood's have expired) is answered at once.
	real := netip.MustParseAddr("2001:db8:ab11:0:8000::42")
	for wait := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		p.mu.Lock()
		n := len(p.pending)
		p.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(wait) {
			t.Fatalf("%d remembered solicitations not expired after the flood", n)
		}
	}
	p.solicited(solicitation{ethSrc: testutil.NDPRouterMAC, src: testutil.NDPRouter, dst: testutil.NDPRouter, target: real})
	k.mu.Lock()
	events := k.events
	k.mu.Unlock()
	events <- netlink.NeighUpdate{Type: unix.RTM_NEWNEIGH, Neigh: netlink.Neigh{LinkIndex: 7, Family: unix.AF_INET6, IP: real.AsSlice(), State: netlink.NUD_REACHABLE}}
	deadline := time.Now().Add(15 * time.Second)
	for {
		conn.mu.Lock()
		n := len(conn.out)
		conn.mu.Unlock()
		if p.has(real) && n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not present (%v) or not answered (%d frames) after its neighbour event", real, p.has(real), n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn.mu.Lock()
	na := conn.out[len(conn.out)-1]
	conn.mu.Unlock()
	if got := netip.AddrFrom16([16]byte(na[ndpTargetOff : ndpTargetOff+16])); na[icmpOff] != icmpTypeNA || got != real {
		t.Errorf("answer is ICMPv6 type %d for %s, want an advertisement (136) for %s", na[icmpOff], got, real)
	}
}
