package e2e

import (
	be "encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
)

// Scenario B: hosts on an on-link /64 whose upstream router knows nothing
// but that /64. With the proxy-ndp backend the router reaches every
// container and every container reaches the router and each other, with no
// step per container; the router learns each container address at the
// MAC of the host that holds it, and nothing outside the hosts' leases is
// ever answered.
func TestNDPUpstream(t *testing.T) {
	l := up(t, lab.Config{Backend: "proxy-ndp", Hosts: 2})
	if l.Upstream == nil {
		t.Fatal("a proxy-ndp lab has no upstream router")
	}
	rtr := l.Upstream
	h1, h2 := l.Hosts[0], l.Hosts[1]
	for _, h := range l.Hosts {
		if !lab.UpstreamPrefix.Contains(h.Addr6) || !lab.UpstreamPrefix.Contains(h.Container.Addr6) {
			t.Fatalf("%s (%s) or its container (%s) is not in %s", h.Name, h.Addr6, h.Container.Addr6, lab.UpstreamPrefix)
		}
	}
	if r := strings.TrimSpace(testutil.RunIn(t, rtr.NS, "ip", "-6", "route", "show", "proto", "76")); r != "" {
		t.Fatalf("the router has leased routes: %s", r)
	}

	t.Run("router and containers reach each other", func(t *testing.T) {
		for _, c := range l.UpstreamMatrix(ctx(t), 10*time.Second) {
			if c.Err != nil {
				dir := "router → " + c.Host.Name
				if c.ToRouter {
					dir = c.Host.Name + " → router"
				}
				t.Errorf("%s: %v", dir, c.Err)
			}
		}
	})

	t.Run("containers reach each other across hosts", func(t *testing.T) {
		for _, c := range l.Matrix(ctx(t), 10*time.Second) {
			if c.Err != nil {
				t.Errorf("%s → %s (%s): %v", c.From.Name, c.To.Name, c.Dst, c.Err)
			}
		}
		// Host to host, container traffic is routed, not resolved: host1
		// routes host2's slice via host2's address on the link.
		env2, _ := h2.Env()
		if r := routeTo(t, h1, env2.Subnet.V6.String()); !strings.Contains(r, "via "+h2.Addr6.String()) {
			t.Errorf("host1's route to host2's slice: %q", r)
		}
	})

	t.Run("router's entry carries the owning host's MAC", func(t *testing.T) {
		for _, h := range l.Hosts {
			if err := lab.PingUntil(ctx(t), rtr.NS, h.Container.Addr6, 0, 10*time.Second); err != nil {
				t.Fatal(err)
			}
			wantMAC(t, l, h.Container.Addr6, h)
		}
	})

	t.Run("address added after start is reachable", func(t *testing.T) {
		env2, _ := h2.Env()
		late := addrIn(env2.Subnet.V6, 0x99)
		testutil.RunIn(t, h2.CNS, "ip", "-6", "addr", "add", netip.PrefixFrom(late, env2.Subnet.V6.Bits()).String(), "dev", "eth0", "nodad")
		start := time.Now()
		if err := lab.PingUntil(ctx(t), rtr.NS, late, 0, 5*time.Second); err != nil {
			t.Fatalf("router → new container address %s: %v", late, err)
		}
		t.Logf("new address %s reachable from the router after %v", late, time.Since(start).Round(time.Millisecond))
		wantMAC(t, l, late, h2)
		if err := lab.Ping(ctx(t), h1.CNS, late, 0); err != nil {
			t.Errorf("host1's container → %s: %v", late, err)
		}
	})

	t.Run("nothing outside the leases is answered", func(t *testing.T) {
		recs, err := l.Leases(ctx(t))
		if err != nil {
			t.Fatal(err)
		}
		network := netip.MustParsePrefix(lab.UpstreamNetwork)
		var free netip.Prefix
		for p := netip.PrefixFrom(network.Addr(), 80); network.Contains(p.Addr()); p = nextPrefix(p) {
			used := false
			for _, r := range recs {
				used = used || r.Subnet.V6.Overlaps(p)
			}
			if !used {
				free = p
				break
			}
		}
		outside := []netip.Addr{
			addrIn(free, 7), // unleased part of IPv6Network
			netip.MustParseAddr("2001:db8:ab11::4242"),        // the /64 outside IPv6Network
			netip.MustParseAddr("2001:db8:ab11:0:7fff::4242"), // just below IPv6Network
		}
		for _, a := range outside {
			_ = lab.Ping(ctx(t), rtr.NS, a, 0)
		}
		// The router gives up after 3 solicitations, 1 s apart.
		testutil.Eventually(t, 6*time.Second, "unanswered entries failed", func() error {
			for _, a := range outside {
				n, err := rtr.Neigh(a)
				if err != nil {
					return err
				}
				if strings.Contains(n, "lladdr") {
					t.Fatalf("%s was answered: %s", a, n)
				}
				if !strings.Contains(n, "FAILED") && n != "" {
					return fmt.Errorf("%s", n)
				}
			}
			return nil
		})
	})

	t.Run("answering stops with the agent and resumes with it", func(t *testing.T) {
		if err := l.StopAgent(h1, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := rtr.FlushNeigh(); err != nil {
			t.Fatal(err)
		}
		if err := lab.Ping(ctx(t), rtr.NS, h1.Container.Addr6, 0); err == nil {
			t.Error("router → host1's container worked with host1's agent stopped")
		}
		if n, _ := rtr.Neigh(h1.Container.Addr6); strings.Contains(n, "lladdr") {
			t.Errorf("answered with the agent stopped: %s", n)
		}
		if err := l.StartAgent(h1); err != nil {
			t.Fatal(err)
		}
		if err := lab.PingUntil(ctx(t), rtr.NS, h1.Container.Addr6, 0, 15*time.Second); err != nil {
			t.Errorf("router → host1's container after the restart: %v", err)
		}
	})
}

// In present mode only addresses behind a host are answered: a container
// is reachable on the router's first try, an unused address of a host's
// slice is not answered.
func TestNDPPresentMode(t *testing.T) {
	l := up(t, lab.Config{Backend: "proxy-ndp", Hosts: 2, IPv6: true, BackendExtra: map[string]any{"Mode": "present"}})
	for _, h := range l.Hosts {
		if err := lab.Ping(ctx(t), l.Upstream.NS, h.Container.Addr6, 0); err != nil {
			// Allow the agent a moment to be up, but no resolution retry.
			if err := lab.PingUntil(ctx(t), l.Upstream.NS, h.Container.Addr6, 0, 10*time.Second); err != nil {
				t.Fatalf("router → %s's container: %v", h.Name, err)
			}
		}
		wantMAC(t, l, h.Container.Addr6, h)
	}
	env, _ := l.Hosts[0].Env()
	unused := addrIn(env.Subnet.V6, 0x77)
	_ = lab.Ping(ctx(t), l.Upstream.NS, unused, 0)
	testutil.Eventually(t, 6*time.Second, "unused address failed", func() error {
		n, err := l.Upstream.Neigh(unused)
		if err != nil {
			return err
		}
		if strings.Contains(n, "lladdr") {
			t.Fatalf("unused address %s of host1's slice answered in present mode: %s", unused, n)
		}
		if !strings.Contains(n, "FAILED") && n != "" {
			return fmt.Errorf("%s", n)
		}
		return nil
	})
}

// wantMAC checks that the router's neighbour entry for a names h's MAC.
func wantMAC(t *testing.T, l *lab.Lab, a netip.Addr, h *lab.Host) {
	t.Helper()
	mac, err := h.MAC()
	if err != nil {
		t.Fatal(err)
	}
	n, err := l.Upstream.Neigh(a)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(n, "lladdr "+mac) {
		t.Errorf("router's entry for %s is %q, want %s's MAC %s", a, n, h.Name, mac)
	}
}

// addrIn returns the address of p whose last byte is b.
func addrIn(p netip.Prefix, b byte) netip.Addr {
	a := p.Masked().Addr().As16()
	a[15] = b
	return netip.AddrFrom16(a)
}

// nextPrefix returns the prefix of the same length right after p.
func nextPrefix(p netip.Prefix) netip.Prefix {
	a := p.Masked().Addr().As16()
	hi, lo := be.BigEndian.Uint64(a[:8]), be.BigEndian.Uint64(a[8:])
	if n := 128 - p.Bits(); n >= 64 {
		hi += 1 << (n - 64)
	} else {
		lo += 1 << n
		if lo == 0 {
			hi++
		}
	}
	be.BigEndian.PutUint64(a[:8], hi)
	be.BigEndian.PutUint64(a[8:], lo)
	return netip.PrefixFrom(netip.AddrFrom16(a), p.Bits())
}
