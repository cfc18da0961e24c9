package backend

import (
	"context"
	"errors"
	"github.com/leased/leased/pkg/ipfam"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/backend/ndp"
)

func TestNDPCheckOnLink(t *testing.T) {
	pfx := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	for _, tc := range []struct {
		network string
		addrs   []netip.Prefix
		errHas  []string
	}{
		{"2001:db8:ab11:0:8000::/65", pfx("2001:db8:ab11::11/64", "fe80::1/64"), nil},
		{"2001:db8:ab11:0:8000::/80", pfx("10.0.0.1/24", "2001:db8:ab11::11/64"), nil},
		{"2001:db8:ab11::/64", pfx("2001:db8:ab11::11/64"), []string{"contains 2001:db8:ab11::11", "2001:db8:ab11:0:8000::/65"}},
		{"2001:db8:ab12:0:8000::/65", pfx("2001:db8:ab11::11/64", "fe80::1/64"), []string{"not inside a prefix on-link on eth0", "2001:db8:ab11::11/64", "e.g. 2001:db8:ab11:0:8000::/65"}},
		{"2001:db8:ab11::/48", pfx("2001:db8:ab11:1::11/64"), []string{"contains"}},
		{"2001:db8:ab11:0:8000::/65", pfx("fe80::1/64", "10.0.0.1/24"), []string{"no global IPv6 address"}},
	} {
		err := checkOnLink("eth0", netip.MustParsePrefix(tc.network), tc.addrs)
		if tc.errHas == nil {
			if err != nil {
				t.Errorf("%s on %v: %v", tc.network, tc.addrs, err)
			}
			continue
		}
		if !errors.Is(err, ErrNotOnLink) {
			t.Errorf("%s on %v: %v, want ErrNotOnLink", tc.network, tc.addrs, err)
			continue
		}
		for _, s := range tc.errHas {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("%s on %v: %q does not mention %q", tc.network, tc.addrs, err, s)
			}
		}
	}
}

// ndpLab is a router namespace and a host namespace on one veth link, the
// host at 2001:db8:ab11::11/64 and the router at ::1/64.
func ndpLab(t *testing.T) (router, host string, ext ExtIface) {
	testutil.RequireRoot(t)
	router, host = testutil.NewNS(t, "rtr"), testutil.NewNS(t, "ndp")
	testutil.Run(t, "ip", "-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", router)
	testutil.Run(t, "ip", "-n", host, "link", "set", "eth0", "address", net.HardwareAddr(testutil.NDPHostMAC[:]).String(), "up")
	testutil.Run(t, "ip", "-n", router, "link", "set", "eth0", "up")
	testutil.Run(t, "ip", "-n", host, "addr", "add", "2001:db8:ab11::11/64", "dev", "eth0", "nodad")
	testutil.Run(t, "ip", "-n", router, "addr", "add", "2001:db8:ab11::1/64", "dev", "eth0", "nodad")
	// Fail unanswered resolutions fast.
	testutil.RunIn(t, router, "sysctl", "-qw", "net.ipv6.neigh.eth0.retrans_time_ms=200", "net.ipv6.neigh.eth0.mcast_solicit=2")
	return router, host, extOf(t, testutil.NSHandle(t, host), "eth0", "", "2001:db8:ab11::11")
}

// routerNeigh pings a from the router (ignoring the result) and returns the
// router's neighbour entry for a once it is no longer being resolved.
func routerNeigh(t *testing.T, router string, a netip.Addr) string {
	t.Helper()
	_ = exec.Command("ip", "netns", "exec", router, "ping", "-n", "-c", "1", "-W", "1", a.String()).Run()
	var out string
	testutil.Eventually(t, 3*time.Second, "neighbour entry of "+a.String()+" settled", func() bool {
		out = strings.TrimSpace(testutil.Run(t, "ip", "-n", router, "-6", "neigh", "show", a.String()))
		return out != "" && !strings.Contains(out, "INCOMPLETE")
	})
	return out
}

func answered(entry string) bool {
	return strings.Contains(entry, "lladdr "+net.HardwareAddr(testutil.NDPHostMAC[:]).String()) && !strings.Contains(entry, "FAILED")
}

// The responder answers for its slice only, follows a lease change, stops
// when withdrawn, resumes with Start, and stops for good when Run ends.
func TestNDPResponderNamespace(t *testing.T) {
	router, host, ext := ndpLab(t)
	b := mustNDP(t, `{"Type":"proxy-ndp"}`, ext, host)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	defer func() { cancel(); <-done }()

	local := Local{Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V6: testutil.NDPSlice}, Network: ipfam.Pair[netip.Prefix]{V6: testutil.NDPNetwork}}
	if err := b.Start(context.Background(), local); err != nil {
		t.Fatal(err)
	}
	if err := b.SetPeers(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if v := strings.TrimSpace(testutil.RunIn(t, host, "sysctl", "-n", "net.ipv6.conf.all.forwarding")); v != "1" {
		t.Errorf("forwarding = %s", v)
	}
	in, out := netip.MustParseAddr("2001:db8:ab11:0:8000::5"), netip.MustParseAddr("2001:db8:ab11:0:8001::5")
	if e := routerNeigh(t, router, in); !answered(e) {
		t.Errorf("address in the slice not answered: %s", e)
	}
	if e := routerNeigh(t, router, out); answered(e) {
		t.Errorf("address outside the slice answered: %s", e)
	}
	flush := func() { testutil.Run(t, "ip", "-n", router, "-6", "neigh", "flush", "dev", "eth0") }

	// The lease moves: the new slice is answered, the old one no longer.
	moved := local
	moved.Subnet.V6 = netip.MustParsePrefix("2001:db8:ab11:0:8001::/80")
	if err := b.Start(context.Background(), moved); err != nil {
		t.Fatal(err)
	}
	flush()
	if e := routerNeigh(t, router, out); !answered(e) {
		t.Errorf("new slice not answered: %s", e)
	}
	if e := routerNeigh(t, router, in); answered(e) {
		t.Errorf("old slice still answered: %s", e)
	}

	b.Withdraw()
	flush()
	if e := routerNeigh(t, router, out); answered(e) {
		t.Errorf("answered after Withdraw: %s", e)
	}
	if err := b.Start(context.Background(), moved); err != nil {
		t.Fatal(err)
	}
	flush()
	if e := routerNeigh(t, router, out); !answered(e) {
		t.Errorf("not answered after Start following Withdraw: %s", e)
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	done <- nil
	flush()
	if e := routerNeigh(t, router, out); answered(e) {
		t.Errorf("answered after Run ended: %s", e)
	}
	if err := b.Start(context.Background(), moved); !errors.Is(err, ndp.ErrClosed) {
		t.Errorf("Start after Run ended = %v, want ndp.ErrClosed", err)
	}
	if strings.Contains(testutil.Run(t, "ip", "-n", host, "link", "show", "eth0"), "ALLMULTI") {
		t.Error("eth0 still in all-multicast after Run ended")
	}
}

// In present mode only addresses behind the host are answered, the first
// time within the solicitor's first try.
func TestNDPPresentModeNamespace(t *testing.T) {
	router, host, ext := ndpLab(t)
	c := testutil.NewNS(t, "ctr")
	testutil.Run(t, "ip", "-n", host, "link", "add", "cbr0", "type", "bridge")
	testutil.Run(t, "ip", "-n", host, "link", "set", "cbr0", "up")
	testutil.Run(t, "ip", "-n", host, "addr", "add", "2001:db8:ab11:0:8000::1/80", "dev", "cbr0", "nodad")
	testutil.Run(t, "ip", "-n", c, "link", "add", "eth0", "type", "veth", "peer", "name", "veth0", "netns", host)
	testutil.Run(t, "ip", "-n", host, "link", "set", "veth0", "master", "cbr0", "up")
	testutil.Run(t, "ip", "-n", c, "link", "set", "eth0", "up")
	testutil.Run(t, "ip", "-n", c, "addr", "add", "2001:db8:ab11:0:8000::2/80", "dev", "eth0", "nodad")
	testutil.Run(t, "ip", "-n", c, "-6", "route", "add", "default", "via", "2001:db8:ab11:0:8000::1")

	b := mustNDP(t, `{"Type":"proxy-ndp","Mode":"present"}`, ext, host)
	runBackend(t, b)
	if err := b.Start(context.Background(), Local{Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V6: testutil.NDPSlice}, Network: ipfam.Pair[netip.Prefix]{V6: testutil.NDPNetwork}}); err != nil {
		t.Fatal(err)
	}
	if err := b.SetPeers(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	ctr := netip.MustParseAddr("2001:db8:ab11:0:8000::2")
	// The container has never spoken: the first ping still gets through.
	start := time.Now()
	if out, err := exec.Command("ip", "netns", "exec", router, "ping", "-n", "-c", "1", "-W", "2", ctr.String()).CombinedOutput(); err != nil {
		t.Fatalf("router → container: %v\n%s", err, out)
	}
	t.Logf("first ping to a silent container answered in %v", time.Since(start).Round(time.Millisecond))
	if e := routerNeigh(t, router, ctr); !answered(e) {
		t.Errorf("container not answered: %s", e)
	}
	if e := routerNeigh(t, router, netip.MustParseAddr("2001:db8:ab11:0:8000::1")); !answered(e) {
		t.Errorf("the bridge's own address not answered: %s", e)
	}
	if e := routerNeigh(t, router, netip.MustParseAddr("2001:db8:ab11:0:8000::7")); answered(e) {
		t.Errorf("an absent address in the slice was answered: %s", e)
	}
}

func mustNDP(t *testing.T, raw string, ext ExtIface, ns string) *proxyNDP {
	t.Helper()
	b, err := New([]byte(raw), ext, "a", Options{NetNS: testutil.NSPath(ns)})
	if err != nil {
		t.Fatal(err)
	}
	p := b.(*proxyNDP)
	t.Cleanup(func() { p.Close() })
	return p
}
