package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/subnetenv"
)

// restoredLine is the warning leased logs when its resync had to put
// firewall rules or sysctls back.
const restoredLine = "iptables rules restored"

// ping pings dst once from c, waiting at most a second for the answer.
func (c *container) ping(ctx context.Context, dst netip.Addr) error {
	_, err := c.d.run(ctx, "exec", c.name, "ping", "-c", "1", "-W", "1", dst.String())
	return err
}

// stillBlocked fails the test if c reaches dst at any time during d (at
// least three of up's 2 s resync intervals): an operator's DROP rule in
// DOCKER-USER must keep winning over leased's accept rules.
func stillBlocked(t *testing.T, stage string, c *container, dst netip.Addr, h *lab.Host, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	tries := 0
	for time.Now().Before(deadline) {
		tries++
		if err := c.ping(ctx(t), dst); err == nil {
			t.Fatalf("%s: %s's container reached %s through DOCKER-USER's DROP rule (try %d); %s iptables -S FORWARD:\n%s",
				stage, c.d.h.Name, dst, tries, h.Name, nsRun(t, h, "iptables", "-S", "FORWARD"))
		}
	}
	t.Logf("%s: %d pings %s → %s all dropped by DOCKER-USER over %s", stage, tries, c.d.h.Name, dst, d)
}

// forwardOrder checks that h's FORWARD chain jumps to DOCKER-USER before
// it jumps to LEASED-FWD, each once.
func forwardOrder(t *testing.T, stage string, h *lab.Host) {
	t.Helper()
	out := nsRun(t, h, "iptables", "-S", "FORWARD")
	var rules []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "-A ") {
			rules = append(rules, l)
		}
	}
	user := slices.Index(rules, "-A FORWARD -j DOCKER-USER")
	ours := slices.IndexFunc(rules, func(l string) bool { return strings.HasSuffix(l, "-j LEASED-FWD") })
	if user < 0 || ours < 0 || ours < user || strings.Count(out, "-j LEASED-FWD") != 1 {
		t.Errorf("%s: %s's FORWARD must jump to DOCKER-USER first and to LEASED-FWD once, later:\n%s", stage, h.Name, out)
	}
}

// An operator's DROP rule in DOCKER-USER wins over leased's accept rules,
// with real dockerds (FORWARD policy DROP): when dockerd starts after
// leased, after dockerd restarts and when leased starts after dockerd. The
// agents resync every 2 s (up's --resync-interval) and never log that they
// restored rules: leased and dockerd do not fight over FORWARD. Removing
// the DROP rule lets the traffic through again, by leased's LEASED-FWD.
// dockerd's --icc=false still separates containers on one docker0.
func TestDockerUserPrecedence(t *testing.T) {
	dockerd, docker, busybox := dockerTools(t)
	// --ip-masq: containers keep their addresses inside the cluster, so a
	// DOCKER-USER rule can name the peer's subnet.
	l := up(t, lab.Config{Backend: "host-gw", Hosts: 2, NoContainers: true, AgentArgs: []string{"--ip-masq"}})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	ds := map[*lab.Host]*dockerHost{}
	for _, h := range l.Hosts {
		nsRun(t, h, "iptables", "-P", "FORWARD", "DROP")
		d := startDockerd(t, h, dockerd, docker)
		d.importImage(t, busybox)
		ds[h] = d
	}
	env1, _ := h1.Env()
	env2, _ := h2.Env()
	c1 := ds[h1].runContainer(t, "c1")
	c2 := ds[h2].runContainer(t, "c2")
	testutil.Eventually(t, 20*time.Second, "c1 → c2 before any DOCKER-USER rule", func() error { return c1.ping(ctx(t), c2.addr4) })

	drop := []string{"DOCKER-USER", "-s", env1.Subnet.V4.String(), "-d", env2.Subnet.V4.String(), "-j", "DROP"}
	nsRun(t, h2, append([]string{"iptables", "-I"}, drop...)...)
	stillBlocked(t, "dockerd started after leased", c1, c2.addr4, h2, 8*time.Second)
	forwardOrder(t, "dockerd started after leased", h2)

	// dockerd restarts: it puts its chains back at the top of FORWARD.
	ds[h2].stop(t)
	ds[h2].start(t)
	c2 = ds[h2].runContainer(t, "c2b")
	stillBlocked(t, "after dockerd restarted", c1, c2.addr4, h2, 8*time.Second)
	forwardOrder(t, "after dockerd restarted", h2)

	// leased starts on a host where dockerd already runs (its rules gone,
	// as after a reboot that started docker.service first).
	if err := l.StopAgent(h2, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		nsRun(t, h2, bin, "-D", "FORWARD", "-m", "comment", "--comment", "leased: jump to LEASED-FWD", "-j", "LEASED-FWD")
		nsRun(t, h2, bin, "-F", "LEASED-FWD")
		nsRun(t, h2, bin, "-X", "LEASED-FWD")
	}
	if err := l.StartAgent(h2); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "leased's jump back in host2's FORWARD", func() error {
		if out := nsRun(t, h2, "iptables", "-S", "FORWARD"); !strings.Contains(out, "-j LEASED-FWD") {
			return fmt.Errorf("no jump yet")
		}
		return nil
	})
	stillBlocked(t, "leased started after dockerd", c1, c2.addr4, h2, 8*time.Second)
	forwardOrder(t, "leased started after dockerd", h2)

	// Without the DROP rule the cluster traffic passes, through LEASED-FWD
	// (the FORWARD policy is DROP and dockerd accepts nothing new towards
	// docker0 from outside).
	nsRun(t, h2, append([]string{"iptables", "-D"}, drop...)...)
	testutil.Eventually(t, 20*time.Second, "c1 → c2 after the DROP rule is gone", func() error { return c1.ping(ctx(t), c2.addr4) })
	if n := countLeasedFwd(t, h2); n == 0 {
		t.Errorf("LEASED-FWD on host2 counted no packets: the traffic was not accepted by leased's rules")
	}

	// dockerd with --icc=false appends its DROP for docker0 → docker0 after
	// leased's jump: LEASED-FWD must leave that traffic to it, while
	// cluster traffic to the same containers still passes.
	ds[h2].stop(t)
	ds[h2].argv = append(ds[h2].argv, "--icc=false")
	ds[h2].start(t)
	c3, c4 := ds[h2].runContainer(t, "c3"), ds[h2].runContainer(t, "c4")
	testutil.Eventually(t, 20*time.Second, "c1 → c4 with --icc=false on host2", func() error { return c1.ping(ctx(t), c4.addr4) })
	for i := range 3 {
		if err := c3.ping(ctx(t), c4.addr4); err == nil {
			t.Fatalf("--icc=false: c3 reached c4 on the same docker0 (try %d); host2 iptables -S FORWARD:\n%s", i+1, nsRun(t, h2, "iptables", "-S", "FORWARD"))
		}
	}

	for _, h := range l.Hosts {
		if log, _ := os.ReadFile(h.LogFile()); strings.Contains(string(log), restoredLine) {
			t.Errorf("%s's agent restored iptables rules while dockerd ran (a fight over FORWARD):\n%s", h.Name, l.LogTail(h, 30))
		}
	}
}

// countLeasedFwd returns the packets LEASED-FWD's IPv4 accept rules counted
// in h.
func countLeasedFwd(t *testing.T, h *lab.Host) int {
	t.Helper()
	out := nsRun(t, h, "iptables", "-L", "LEASED-FWD", "-v", "-n", "-x")
	n := 0
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) > 2 && f[2] == "ACCEPT" {
			var p int
			fmt.Sscan(f[0], &p)
			n += p
		}
	}
	return n
}

// internet is a namespace on a link to one host that knows only the
// host's addresses on that link (203.0.113.1, 2001:db8:ff::1) and has no
// route to anything else: a reply reaches a container only if its traffic
// was masqueraded to the host's address.
type internet struct {
	ns           string
	addr4, addr6 netip.Addr
}

func newInternet(t *testing.T, h *lab.Host) *internet {
	t.Helper()
	b := make([]byte, 4)
	rand.Read(b)
	in := &internet{
		ns:    "leased-inet-" + hex.EncodeToString(b),
		addr4: netip.MustParseAddr("203.0.113.2"),
		addr6: netip.MustParseAddr("2001:db8:ff::2"),
	}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "netns", "add", in.ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", in.ns).Run() })
	run("ip", "-n", in.ns, "link", "set", "lo", "up")
	run("ip", "-n", h.NS, "link", "add", "inet0", "type", "veth", "peer", "name", "eth0", "netns", in.ns)
	t.Cleanup(func() { exec.Command("ip", "-n", h.NS, "link", "del", "inet0").Run() })
	run("ip", "-n", h.NS, "addr", "add", "203.0.113.1/24", "dev", "inet0")
	run("ip", "-n", h.NS, "addr", "add", "2001:db8:ff::1/64", "dev", "inet0", "nodad")
	run("ip", "-n", h.NS, "link", "set", "inet0", "up")
	run("ip", "-n", in.ns, "addr", "add", "203.0.113.2/24", "dev", "eth0")
	run("ip", "-n", in.ns, "addr", "add", "2001:db8:ff::2/64", "dev", "eth0", "nodad")
	run("ip", "-n", in.ns, "link", "set", "eth0", "up")
	return in
}

// With --ip-masq, each family's container traffic leaving the cluster
// network is masqueraded by exactly one of leased and dockerd, and
// subnet.env says which: on an IPv6-only network of unique-local addresses
// leased masquerades IPv6 (ip6tables) and dockerd keeps masquerading
// docker0's own IPv4 subnet; on a dual-stack network leased masquerades
// both. A container reaches an "internet" namespace that knows only the
// host's address, over both families.
func TestIPMasqPerFamily(t *testing.T) {
	dockerd, docker, busybox := dockerTools(t)
	for _, tc := range []struct {
		name         string
		cfg          lab.Config
		masq4, masq6 string
	}{
		{"ipv6-only/ula/80", lab.Config{IPv6: true, IPv6Network: "fd10:cd11::/48", IPv6SubnetLen: 80}, subnetenv.MasqDockerd, subnetenv.MasqLeased},
		{"dual/ula/80", lab.Config{IPv4: true, IPv6: true, IPv6Network: "fd10:cd11::/48", IPv6SubnetLen: 80}, subnetenv.MasqLeased, subnetenv.MasqLeased},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.Backend, cfg.Hosts, cfg.NoContainers = "host-gw", 1, true
			cfg.AgentArgs = []string{"--ip-masq"}
			l := up(t, cfg)
			h := l.Hosts[0]
			raw, err := os.ReadFile(h.SubnetFile())
			if err != nil {
				t.Fatal(err)
			}
			for _, want := range []string{"LEASED_IPMASQ=true\n", "LEASED_IPMASQ4=" + tc.masq4 + "\n", "LEASED_IPMASQ6=" + tc.masq6 + "\n"} {
				if !strings.Contains(string(raw), want) {
					t.Errorf("subnet.env lacks %q:\n%s", want, raw)
				}
			}
			env, _ := h.Env()
			if got := slices.Contains(env.DockerOpts(), "--ip-masq=false"); got != (tc.masq4 == subnetenv.MasqLeased) {
				t.Errorf("LEASED_DOCKER_OPTS %q: --ip-masq=false must be there exactly when leased masquerades IPv4", env.DockerOpts())
			}
			in := newInternet(t, h)
			d := startDockerd(t, h, dockerd, docker)
			d.importImage(t, busybox)
			c := d.runContainer(t, "cm")
			if !env.Subnet.V6.Contains(c.addr6) || !c.addr4.IsValid() {
				t.Fatalf("the container has %s and %s; want an IPv4 address and one in %s", c.addr4, c.addr6, env.Subnet.V6)
			}
			for _, dst := range []netip.Addr{in.addr4, in.addr6} {
				testutil.Eventually(t, 15*time.Second, fmt.Sprintf("container (%s, %s) → internet %s", c.addr4, c.addr6, dst), func() error { return c.ping(ctx(t), dst) })
			}
			nat6 := nsRun(t, h, "ip6tables", "-t", "nat", "-S", "LEASED-POSTRTG")
			if !strings.Contains(nat6, "-s "+env.Subnet.V6.String()+" -m comment --comment \"leased: NAT leaving the cluster network\" -j MASQUERADE") {
				t.Errorf("ip6tables LEASED-POSTRTG:\n%s", nat6)
			}
			nat4 := nsRun(t, h, "iptables", "-t", "nat", "-S")
			if leased := strings.Contains(nat4, "LEASED-POSTRTG"); leased != (tc.masq4 == subnetenv.MasqLeased) {
				t.Errorf("iptables nat (leased's chain present: %v, want %v):\n%s", leased, tc.masq4 == subnetenv.MasqLeased, nat4)
			}
		})
	}
}
