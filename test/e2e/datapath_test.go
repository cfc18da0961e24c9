package e2e

import (
	"fmt"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
)

// Containers on different hosts reach each other by address, for every
// backend, family mix and subnet length the issue names.
func TestConnectivity(t *testing.T) {
	tests := []struct {
		name string
		cfg  lab.Config
	}{
		{"host-gw/dual/64", lab.Config{Backend: "host-gw", IPv4: true, IPv6: true}},
		{"host-gw/ipv4", lab.Config{Backend: "host-gw", IPv4: true}},
		{"host-gw/ipv6/80", lab.Config{Backend: "host-gw", IPv6: true, IPv6SubnetLen: 80, Underlay: "v6"}},
		{"vxlan/dual/80", lab.Config{Backend: "vxlan", IPv4: true, IPv6: true, IPv6SubnetLen: 80}},
		{"vxlan/ipv4/v4-underlay", lab.Config{Backend: "vxlan", IPv4: true, Underlay: "v4"}},
		{"vxlan/ipv6/64/v6-underlay/routed", lab.Config{Backend: "vxlan", IPv6: true, Underlay: "v6", Routed: true, Hosts: 3}},
		{"vxlan/dual/v6-underlay/routed", lab.Config{Backend: "vxlan", IPv4: true, IPv6: true, IPv6SubnetLen: 80, Underlay: "v6", Routed: true, Hosts: 3}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := up(t, tc.cfg)
			cells := l.Matrix(ctx(t), 10*time.Second)
			want := 0
			for _, h := range l.Hosts {
				if tc.cfg.IPv4 && !h.Container.Addr4.IsValid() || tc.cfg.IPv6 && !h.Container.Addr6.IsValid() {
					t.Fatalf("%s's container lacks an address of an enabled family: %+v", h.Name, h.Container)
				}
				if !tc.cfg.IPv4 && h.Container.Addr4.IsValid() || !tc.cfg.IPv6 && h.Container.Addr6.IsValid() {
					t.Fatalf("%s's container has an address of a disabled family: %+v", h.Name, h.Container)
				}
			}
			fams := 0
			if tc.cfg.IPv4 {
				fams++
			}
			if tc.cfg.IPv6 {
				fams++
			}
			want = fams * len(l.Hosts) * (len(l.Hosts) - 1)
			if len(cells) != want {
				t.Fatalf("%d pairs tested, want %d", len(cells), want)
			}
			for _, c := range cells {
				if c.Err != nil {
					t.Errorf("%s → %s (%s): %v", c.From.Name, c.To.Name, c.Dst, c.Err)
				}
			}
			if tc.cfg.IPv6SubnetLen != 0 {
				env, _ := l.Hosts[0].Env()
				if env.Subnet.V6.Bits() != tc.cfg.IPv6SubnetLen {
					t.Errorf("leased IPv6 subnet %s, want a /%d", env.Subnet.V6, tc.cfg.IPv6SubnetLen)
				}
			}
		})
	}
}

// A full-MTU packet with DF set crosses vxlan over an IPv4 and over an IPv6
// underlay: the MTU in subnet.env accounts for the encapsulation.
func TestVXLANFullMTU(t *testing.T) {
	for _, tc := range []struct {
		underlay string
		overhead int
	}{{"v4", 50}, {"v6", 70}} {
		t.Run(tc.underlay+"-underlay", func(t *testing.T) {
			l := up(t, lab.Config{Backend: "vxlan", IPv4: true, IPv6: true, Underlay: tc.underlay})
			env, err := l.Hosts[0].Env()
			if err != nil {
				t.Fatal(err)
			}
			if env.MTU != 1500-tc.overhead {
				t.Errorf("LEASED_MTU=%d, want %d (1500 - %d)", env.MTU, 1500-tc.overhead, tc.overhead)
			}
			a, b := l.Hosts[0], l.Hosts[1]
			if err := lab.PingUntil(ctx(t), a.CNS, b.Container.Addr4, env.MTU-28, 10*time.Second); err != nil {
				t.Errorf("IPv4 full-MTU DF ping: %v", err)
			}
			if err := lab.PingUntil(ctx(t), a.CNS, b.Container.Addr6, env.MTU-48, 10*time.Second); err != nil {
				t.Errorf("IPv6 full-MTU ping: %v", err)
			}
			// One byte more does not fit: the MTU is exact, not merely small.
			if err := lab.Ping(ctx(t), a.CNS, b.Container.Addr4, env.MTU-27); err == nil {
				t.Errorf("a DF ping of MTU+1 bytes crossed: LEASED_MTU is lower than it needs to be")
			}
		})
	}
}

// A host that is gone (its lease deleted, as when its TTL runs out) loses
// its routes on every peer.
func TestRemovedPeerRoutesDisappear(t *testing.T) {
	for _, backend := range []string{"host-gw", "vxlan"} {
		t.Run(backend, func(t *testing.T) {
			l := up(t, lab.Config{Backend: backend, Hosts: 3})
			h1, h3 := l.Hosts[0], l.Hosts[2]
			env3, _ := h3.Env()
			testutil.Eventually(t, 10*time.Second, "route to host3", func() error {
				if routeTo(t, h1, env3.Subnet.V4.String()) == "" || routeTo(t, h1, env3.Subnet.V6.String()) == "" {
					return fmt.Errorf("no route to %s/%s", env3.Subnet.V4, env3.Subnet.V6)
				}
				return nil
			})
			if err := l.StopAgent(h3, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			revokeLease(t, l, h3.Name)
			testutil.Eventually(t, 5*time.Second, "host3's routes removed from host1", func() error {
				if r := routeTo(t, h1, env3.Subnet.V4.String()) + routeTo(t, h1, env3.Subnet.V6.String()); r != "" {
					return fmt.Errorf("still there: %s", r)
				}
				return nil
			})
			if backend == "vxlan" {
				if out := mustIP(t, h1, "neigh", "show", "dev", "leased.4"); strings.Contains(out, env3.Subnet.V4.Addr().String()+" ") {
					t.Errorf("neighbour entry of host3 left behind:\n%s", out)
				}
			}
			// host2 is untouched.
			if err := lab.Ping(ctx(t), h1.CNS, l.Hosts[1].Container.Addr6, 0); err != nil {
				t.Errorf("host1 → host2 broke: %v", err)
			}
		})
	}
}

func revokeLease(t *testing.T, l *lab.Lab, node string) {
	t.Helper()
	resp, err := l.Client.Get(ctx(t), "/leased/network/leases/"+node)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("lease of %s: %v %v", node, resp, err)
	}
	if _, err := l.Client.Revoke(ctx(t), clientv3LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
}

// A route deleted by hand comes back; a vxlan device deleted by hand comes
// back with every peer.
func TestDriftIsRepaired(t *testing.T) {
	t.Run("host-gw route", func(t *testing.T) {
		l := up(t, lab.Config{Backend: "host-gw"})
		h1, h2 := l.Hosts[0], l.Hosts[1]
		env2, _ := h2.Env()
		for _, s := range []string{env2.Subnet.V4.String(), env2.Subnet.V6.String()} {
			testutil.Eventually(t, 10*time.Second, "route", func() error { return nonEmpty(routeTo(t, h1, s)) })
			mustIP(t, h1, "route", "del", s)
			testutil.Eventually(t, 15*time.Second, "route "+s+" restored", func() error {
				r := routeTo(t, h1, s)
				if !strings.Contains(r, "proto 76") {
					return fmt.Errorf("route is %q", r)
				}
				return nil
			})
		}
		if err := lab.PingUntil(ctx(t), h1.CNS, h2.Container.Addr4, 0, 5*time.Second); err != nil {
			t.Error(err)
		}
	})
	t.Run("vxlan device", func(t *testing.T) {
		l := up(t, lab.Config{Backend: "vxlan", Hosts: 3})
		h1 := l.Hosts[0]
		for _, dev := range []string{"leased.4", "leased.6"} {
			mustIP(t, h1, "link", "del", dev)
		}
		testutil.Eventually(t, 15*time.Second, "devices back with all peers", func() error {
			for _, dev := range []string{"leased.4", "leased.6"} {
				out, err := h1.IP("neigh", "show", "dev", dev)
				if err != nil {
					return fmt.Errorf("%s: %v", dev, err)
				}
				if n := strings.Count(out, "PERMANENT"); n != 2 {
					return fmt.Errorf("%s has %d permanent neighbours, want 2", dev, n)
				}
			}
			return nil
		})
		for _, h := range l.Hosts[1:] {
			for _, dst := range []netip.Addr{h.Container.Addr4, h.Container.Addr6} {
				if err := lab.PingUntil(ctx(t), h1.CNS, dst, 0, 10*time.Second); err != nil {
					t.Error(err)
				}
			}
		}
	})
}

func nonEmpty(s string) error {
	if s == "" {
		return fmt.Errorf("empty")
	}
	return nil
}

// At start the agent removes routes a previous run left for peers that are
// gone and keeps the ones still right; routes of other owners stay.
func TestStaleRoutesRemovedAtStart(t *testing.T) {
	l := up(t, lab.Config{Backend: "host-gw"})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	env2, _ := h2.Env()
	testutil.Eventually(t, 10*time.Second, "route to host2", func() error { return nonEmpty(routeTo(t, h1, env2.Subnet.V4.String())) })
	if err := l.StopAgent(h1, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Left over from a "previous run": a peer that no longer exists.
	mustIP(t, h1, "route", "add", "10.100.254.0/24", "via", h2.Addr4.String(), "proto", "76")
	mustIP(t, h1, "-6", "route", "add", "2001:db8:cd11:ffff::/64", "via", h2.Addr6.String(), "proto", "76")
	// Someone else's route in the cluster range.
	mustIP(t, h1, "route", "add", "10.100.253.0/24", "via", h2.Addr4.String(), "proto", "static")
	valid := routeTo(t, h1, env2.Subnet.V4.String())
	if err := l.StartAgent(h1); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "stale routes removed", func() error {
		if r := routeTo(t, h1, "10.100.254.0/24") + routeTo(t, h1, "2001:db8:cd11:ffff::/64"); r != "" {
			return fmt.Errorf("still there: %s", r)
		}
		return nil
	})
	if r := routeTo(t, h1, "10.100.253.0/24"); !strings.Contains(r, "proto static") {
		t.Errorf("a route leased did not create was touched: %q", r)
	}
	if r := routeTo(t, h1, env2.Subnet.V4.String()); r != valid {
		t.Errorf("valid route changed from %q to %q", valid, r)
	}
}

// routerSolicits returns how many Neighbor Solicitations namespace ns has
// sent (Icmp6OutNeighborSolicits).
func routerSolicits(t *testing.T, ns string) int {
	t.Helper()
	out := testutil.RunIn(t, ns, "cat", "/proc/net/snmp6")
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "Icmp6OutNeighborSolicits" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatalf("no Icmp6OutNeighborSolicits in %s's /proc/net/snmp6", ns)
	return 0
}

var lossRE = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// Restarting an agent — SIGTERM then start, or SIGKILL then start — drops
// no packet of a 10 ms ping between containers on different hosts, nor,
// with proxy-ndp, from the upstream router to each container.
func TestAgentRestartLosesNoPacket(t *testing.T) {
	for _, backend := range []string{"host-gw", "vxlan", "proxy-ndp"} {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			t.Run(backend+"/"+sig.String(), func(t *testing.T) {
				l := up(t, lab.Config{Backend: backend})
				h1, h2 := l.Hosts[0], l.Hosts[1]
				type flow struct {
					from string
					dst  netip.Addr
				}
				flows := []flow{{h1.CNS, h2.Container.Addr4}, {h1.CNS, h2.Container.Addr6}}
				if l.Upstream != nil {
					// proxy-ndp: the upstream router reaches each container
					// only through the answers of its host's agent. Its
					// neighbour entries go stale after about a second and
					// are probed (unicast, 1 s apart, 3 tries) one second
					// later, so the router keeps asking throughout the
					// restarts.
					for _, kv := range []string{"base_reachable_time_ms=1000", "delay_first_probe_time=1"} {
						testutil.RunIn(t, l.Upstream.NS, "sysctl", "-qw", "net.ipv6.neigh.eth0."+kv)
					}
					flows = append(flows, flow{l.Upstream.NS, h1.Container.Addr6}, flow{l.Upstream.NS, h2.Container.Addr6})
				}
				for _, f := range flows {
					if err := lab.PingUntil(ctx(t), f.from, f.dst, 0, 10*time.Second); err != nil {
						t.Fatal(err)
					}
				}
				var solicits0 int
				if l.Upstream != nil {
					solicits0 = routerSolicits(t, l.Upstream.NS)
				}
				pings := map[string]*exec.Cmd{}
				outs := map[string]*strings.Builder{}
				for _, f := range flows {
					cmd := exec.Command("ip", "netns", "exec", f.from, "ping", "-n", "-q", "-i", "0.01", "-c", "300", "-W", "1", f.dst.String())
					var b strings.Builder
					cmd.Stdout, cmd.Stderr = &b, &b
					if err := cmd.Start(); err != nil {
						t.Fatal(err)
					}
					name := f.from + " → " + f.dst.String()
					pings[name], outs[name] = cmd, &b
				}
				time.Sleep(300 * time.Millisecond)
				for _, h := range []*lab.Host{h1, h2} {
					if err := l.StopAgent(h, sig); err != nil {
						t.Fatal(err)
					}
					if err := l.StartAgent(h); err != nil {
						t.Fatal(err)
					}
				}
				for dst, cmd := range pings {
					cmd.Wait()
					m := lossRE.FindStringSubmatch(outs[dst].String())
					if m == nil {
						t.Fatalf("ping %s: %s", dst, outs[dst])
					}
					sent, _ := strconv.Atoi(m[1])
					got, _ := strconv.Atoi(m[2])
					if sent != 300 || got != sent {
						t.Errorf("ping %s across the restart: %d sent, %d received", dst, sent, got)
					}
				}
				if l.Upstream != nil {
					// The router did ask while the agents restarted: the
					// answers, not a cache that never expired, kept the
					// pings going.
					n := routerSolicits(t, l.Upstream.NS) - solicits0
					t.Logf("the router sent %d Neighbor Solicitations during the pings", n)
					if n < 1 {
						t.Errorf("the router sent no Neighbor Solicitation during the pings, want its entries probed")
					}
				}
			})
		}
	}
}
