package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/dockeripam"
)

// startDockerdIPAM starts h's dockerd so that it finds h's own leased IPAM
// driver: dockerd looks for plugins only in fixed directories
// (/run/docker/plugins, /etc/docker/plugins, /usr/lib/docker/plugins), so
// each test dockerd runs in a private mount namespace where h's plugin
// directory is bound over /run/docker/plugins.
func startDockerdIPAM(t *testing.T, h *lab.Host, dockerd, docker, busybox string) *dockerHost {
	t.Helper()
	if err := os.MkdirAll("/run/docker/plugins", 0o755); err != nil {
		t.Fatal(err)
	}
	d := newDockerd(t, h, dockerd, docker)
	d.plugins = filepath.Dir(h.IPAMSocket())
	if err := os.MkdirAll(d.plugins, 0o755); err != nil {
		t.Fatal(err)
	}
	d.start(t)
	d.importImage(t, busybox)
	return d
}

// subnets returns the subnets of a Docker network.
func (d *dockerHost) subnets(t *testing.T, network string) []netip.Prefix {
	t.Helper()
	out, err := d.run(ctx(t), "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", network)
	if err != nil {
		t.Fatal(err)
	}
	var ps []netip.Prefix
	for _, f := range strings.Fields(out) {
		ps = append(ps, netip.MustParsePrefix(f))
	}
	return ps
}

// runOn starts a container on network (restarted with dockerd) and reads
// its addresses on it.
func (d *dockerHost) runOn(t *testing.T, name, network string, extra ...string) *container {
	t.Helper()
	args := append([]string{"run", "-d", "--restart=always", "--name", name, "--net=" + network}, extra...)
	if _, err := d.run(ctx(t), append(args, dockerImage, "httpd", "-f", "-p", "80", "-h", "/www")...); err != nil {
		t.Fatal(err)
	}
	c := &container{d: d, name: name}
	c.addr4, c.addr6 = d.addrs(t, name)
	if !c.addr4.IsValid() || !c.addr6.IsValid() {
		t.Fatalf("container %s on %s has addresses %v %v, want IPv4 and IPv6", name, network, c.addr4, c.addr6)
	}
	return c
}

func (d *dockerHost) addrs(t *testing.T, name string) (a4, a6 netip.Addr) {
	t.Helper()
	out, err := d.run(ctx(t), "inspect", "-f", `{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.GlobalIPv6Address}} {{end}}`, name)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range strings.Fields(out) {
		a, err := netip.ParseAddr(f)
		if err != nil {
			t.Fatalf("docker inspect %s: %q", name, out)
		}
		if a.Is4() {
			a4 = a
		} else {
			a6 = a
		}
	}
	return a4, a6
}

// reachAll checks that every container reaches every container of another
// host over IPv4 and IPv6, with its own source address (IPv6 is never
// NATed) except for IPv4 from the containers in masqueraded, whose
// network dockerd masquerades (its default for user-defined networks).
func reachAll(t *testing.T, conts []*container, masqueraded map[*container]bool) {
	t.Helper()
	for _, a := range conts {
		// One docker exec per source container: it asks every container of
		// the other hosts, over both families, which address it sees.
		var dsts []netip.Addr
		names := map[netip.Addr]string{}
		for _, b := range conts {
			if b.d != a.d {
				dsts = append(dsts, b.addr4, b.addr6)
				names[b.addr4], names[b.addr6] = b.name, b.name
			}
		}
		var script strings.Builder
		for _, dst := range dsts {
			host := dst.String()
			if dst.Is6() {
				host = "[" + host + "]"
			}
			// busybox 1.35's wget -T crashes (SIGSEGV); timeout bounds it.
			fmt.Fprintf(&script, "echo %s $(timeout 5 wget -q -O - http://%s/cgi-bin/addr 2>/dev/null || echo none)\n", dst, host)
		}
		seen := map[netip.Addr]netip.Addr{}
		testutil.Eventually(t, 30*time.Second, fmt.Sprintf("%s on %s → every container of the other hosts", a.name, a.d.h.Name), func() error {
			c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			out, err := a.d.run(c, "exec", a.name, "sh", "-c", script.String())
			if err != nil {
				return err
			}
			var missing []string
			for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
				f := strings.Fields(line)
				if len(f) != 2 {
					continue
				}
				dst, err1 := netip.ParseAddr(f[0])
				src, err2 := netip.ParseAddr(strings.Trim(f[1], "[]"))
				if err1 != nil || err2 != nil {
					missing = append(missing, line)
					continue
				}
				seen[dst] = src.Unmap()
			}
			for _, dst := range dsts {
				if !seen[dst].IsValid() {
					missing = append(missing, fmt.Sprintf("%s (%s)", names[dst], dst))
				}
			}
			if len(missing) > 0 {
				return fmt.Errorf("no answer from %v", missing)
			}
			return nil
		})
		for _, dst := range dsts {
			got := seen[dst]
			switch {
			case dst.Is6() && got != a.addr6:
				t.Errorf("%s → %s (%s): the server saw %s, want the container's own %s", a.name, names[dst], dst, got, a.addr6)
			case dst.Is6():
			case masqueraded[a] && !hostAddrs(t, a.d.h)[got]:
				t.Errorf("%s → %s (%s): the server saw %s, want an address of %s (dockerd masquerades the network)", a.name, names[dst], dst, got, a.d.h.Name)
			case !masqueraded[a] && got != a.addr4:
				t.Errorf("%s → %s (%s): the server saw %s, want the container's own %s", a.name, names[dst], dst, got, a.addr4)
			}
		}
	}
}

func statePools(t *testing.T, h *lab.Host) []netip.Prefix {
	t.Helper()
	ps, err := dockeripam.ReadPools(filepath.Join(h.Dir, "docker-ipam.json"))
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.Prefix
	for _, p := range ps {
		out = append(out, p.Prefix)
	}
	return out
}

// User-defined Docker networks created with --ipam-driver=leased get
// pools inside their host's lease, apart from docker0's share and from each
// other, and their containers reach containers on other hosts (on leased
// networks and on docker0) over IPv4 and IPv6, with real dockerds, on
// host-gw, vxlan and proxy-ndp. docker network rm frees a pool; dockerd and agent
// restarts keep every container's address and the connectivity; requests
// the lease cannot satisfy fail with the driver's text in docker's output.
func TestDockerIPAM(t *testing.T) {
	dockerd, docker, busybox := dockerTools(t)
	// proxy-ndp: /80 leases (pools are /96s), and an upstream router that
	// knows only the hosts' /64 reaches the networks' containers too.
	for i, backend := range []string{"host-gw", "vxlan", "proxy-ndp"} {
		t.Run(backend, func(t *testing.T) {
			l := up(t, lab.Config{Backend: backend, Hosts: 2, NoContainers: true, AgentArgs: []string{"--ip-masq"}})
			ds := map[*lab.Host]*dockerHost{}
			var conts []*container
			masqueraded := map[*container]bool{}
			for _, h := range l.Hosts {
				for _, ipt := range []string{"iptables", "ip6tables"} {
					nsRun(t, h, ipt, "-P", "FORWARD", "DROP")
				}
				env, err := h.Env()
				if err != nil {
					t.Fatal(err)
				}
				if env.Docker0Bits != dockeripam.DefaultSplit.Docker0Bits {
					t.Fatalf("%s: subnet.env hands docker0 1/2^%d of the lease, want 1/2^%d", h.Name, env.Docker0Bits, dockeripam.DefaultSplit.Docker0Bits)
				}
				d := startDockerdIPAM(t, h, dockerd, docker, busybox)
				ds[h] = d
				d0 := []netip.Prefix{env.Docker0Subnet4(), env.Docker0Subnet6()}
				if got := d.subnets(t, "bridge"); !slices.Equal(got, d0) {
					t.Fatalf("%s: docker0 has %v, want its share %v", h.Name, got, d0)
				}
				pools := slices.Clone(d0)
				// web as users write it: dockerd masquerades its IPv4 traffic
				// to other hosts; db without: leased's --ip-masq covers it
				// (see Documentation/docker-networks.md).
				for _, n := range []string{"web", "db"} {
					args := []string{"network", "create", "--ipam-driver=leased", "--ipv6", n}
					if n == "db" {
						args = append(args, "-o", "com.docker.network.bridge.enable_ip_masquerade=false")
					}
					if _, err := d.run(ctx(t), args...); err != nil {
						t.Fatal(err)
					}
					subs := d.subnets(t, n)
					if len(subs) != 2 {
						t.Fatalf("%s: network %s has subnets %v, want one per family", h.Name, n, subs)
					}
					for _, s := range subs {
						lease := env.Subnet.V4
						if s.Addr().Is6() {
							lease = env.Subnet.V6
						}
						if !lease.Contains(s.Addr()) || s.Bits() <= lease.Bits() {
							t.Errorf("%s: network %s's pool %s is not inside the lease %s", h.Name, n, s, lease)
						}
						for _, p := range pools {
							if s.Overlaps(p) {
								t.Errorf("%s: network %s's pool %s overlaps %s (docker0's share or another network's pool)", h.Name, n, s, p)
							}
						}
						pools = append(pools, s)
					}
					c := d.runOn(t, n+"-"+h.Name, n)
					if !subs[0].Contains(c.addr4) && !subs[1].Contains(c.addr4) {
						t.Errorf("%s: container on %s has %s, outside %v", h.Name, n, c.addr4, subs)
					}
					t.Logf("%s: network %s %v, container %s %s", h.Name, n, subs, c.addr4, c.addr6)
					conts = append(conts, c)
					masqueraded[c] = n == "web"
				}
				if got, want := statePools(t, h), pools[2:]; len(got) != len(want) {
					t.Errorf("%s: the driver's state lists %v, docker has %v", h.Name, got, want)
				}
				conts = append(conts, d.runOn(t, "docker0-"+h.Name, "bridge"))
			}
			reachAll(t, conts, masqueraded)
			if l.Upstream != nil {
				for _, c := range conts {
					if err := lab.PingUntil(ctx(t), l.Upstream.NS, c.addr6, 0, 15*time.Second); err != nil {
						t.Errorf("upstream router → %s on %s (%s): %v", c.name, c.d.h.Name, c.addr6, err)
					}
				}
			}

			h1, d1 := l.Hosts[0], ds[l.Hosts[0]]
			checkPoolsShown(t, l, h1, d1)
			// docker network rm frees the pool: the next network gets it.
			if _, err := d1.run(ctx(t), "network", "create", "--ipam-driver=leased", "--ipv6", "tmp"); err != nil {
				t.Fatal(err)
			}
			tmp := d1.subnets(t, "tmp")
			if _, err := d1.run(ctx(t), "network", "rm", "tmp"); err != nil {
				t.Fatal(err)
			}
			for _, p := range statePools(t, h1) {
				if slices.Contains(tmp, p) {
					t.Errorf("after docker network rm tmp the driver still holds its pool %s", p)
				}
			}
			if _, err := d1.run(ctx(t), "network", "create", "--ipam-driver=leased", "--ipv6", "tmp2"); err != nil {
				t.Fatal(err)
			}
			if got := d1.subnets(t, "tmp2"); !slices.Equal(got, tmp) {
				t.Errorf("the network after docker network rm got %v, want the freed %v", got, tmp)
			}
			if _, err := d1.run(ctx(t), "network", "rm", "tmp2"); err != nil {
				t.Fatal(err)
			}

			if i == 0 {
				badRequests(t, h1, d1)
			}

			// dockerd restarts: the networks and every container's
			// addresses stay (the driver's state is the agent's, and
			// --restart=always brings the containers back).
			for _, h := range l.Hosts {
				d := ds[h]
				d.cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-d.exited:
				case <-time.After(60 * time.Second):
					t.Fatalf("dockerd of %s did not stop within 60s", h.Name)
				}
				d.cmd = nil
				d.start(t)
			}
			for _, c := range conts {
				testutil.Eventually(t, 60*time.Second, c.name+" back after the dockerd restart with its addresses", func() error {
					a4, a6 := c.d.addrs(t, c.name)
					if a4 != c.addr4 || a6 != c.addr6 {
						return fmt.Errorf("it has %v %v, had %v %v", a4, a6, c.addr4, c.addr6)
					}
					return nil
				})
			}
			reachAll(t, conts, masqueraded)

			// Agent restarts: the pools and addresses stay; the next
			// container gets a fresh address.
			for _, h := range l.Hosts {
				if err := l.StopAgent(h, syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
				if err := l.StartAgent(h); err != nil {
					t.Fatal(err)
				}
			}
			c := d1.runOn(t, "web-late-"+h1.Name, "web")
			masqueraded[c] = true
			for _, o := range conts {
				if o.addr4 == c.addr4 || o.addr6 == c.addr6 {
					t.Errorf("after the agent restart a new container got %s %s, which %s has", c.addr4, c.addr6, o.name)
				}
			}
			reachAll(t, append(conts, c), masqueraded)
		})
	}
}

// badRequests creates networks the lease cannot satisfy through dockerd
// and checks the text the user sees.
func badRequests(t *testing.T, h *lab.Host, d *dockerHost) {
	t.Helper()
	env, _ := h.Env()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--subnet=172.30.0.0/24"}, "--subnet 172.30.0.0/24 is outside this host's leased subnet " + env.Subnet.V4.String()},
		{[]string{"--subnet=" + env.Docker0Subnet4().String()}, "overlaps docker0's share " + env.Docker0Subnet4().String()},
		{[]string{"--ipam-opt=size=28"}, `unknown IPAM option "size"`},
	} {
		out, err := d.run(ctx(t), append(append([]string{"network", "create", "--ipam-driver=leased"}, tc.args...), "bad")...)
		if err == nil || !strings.Contains(out, tc.want) {
			t.Errorf("docker network create %v: %v\n%s\nwant %q", tc.args, err, out, tc.want)
		}
		t.Logf("docker network create --ipam-driver=leased %s bad:\n%s", strings.Join(tc.args, " "), strings.TrimSpace(out))
	}
	// web and db hold two of the six /27s: four more fit, the fifth does not.
	for i := 0; i < 4; i++ {
		if _, err := d.run(ctx(t), "network", "create", "--ipam-driver=leased", fmt.Sprintf("fill%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	out, err := d.run(ctx(t), "network", "create", "--ipam-driver=leased", "full")
	if err == nil || !strings.Contains(out, "no free /27 left in this host's leased subnet "+env.Subnet.V4.String()) {
		t.Errorf("docker network create when the lease is full: %v\n%s", err, out)
	}
	t.Logf("docker network create --ipam-driver=leased full:\n%s", strings.TrimSpace(out))
	for i := 0; i < 4; i++ {
		if _, err := d.run(ctx(t), "network", "rm", fmt.Sprintf("fill%d", i)); err != nil {
			t.Fatal(err)
		}
	}
}

// checkPoolsShown: `leased status` lists h's pools, `leased leases -o json`
// puts them on h's row.
func checkPoolsShown(t *testing.T, l *lab.Lab, h *lab.Host, d *dockerHost) {
	t.Helper()
	state := "--docker-ipam-state=" + filepath.Join(h.Dir, "docker-ipam.json")
	want := append(d.subnets(t, "web"), d.subnets(t, "db")...)
	out, _ := cli(t, h.NS, append(statusArgs(l, h), state)...)
	for _, p := range want {
		if !strings.Contains(out, "  "+p.String()+"  ") {
			t.Errorf("leased status does not list the pool %s:\n%s", p, out)
		}
	}
	t.Logf("leased status:\n%s", out)
	out, code := cli(t, h.NS, "leases", "--etcd-endpoints="+l.EtcdEndpoint, "-o", "json", "--node-name="+h.Name, state)
	if code != 0 {
		t.Fatalf("leased leases -o json: exit %d: %s", code, out)
	}
	var rows []struct {
		Node        string
		DockerPools []string
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("leased leases -o json: %v\n%s", err, out)
	}
	for _, r := range rows {
		if r.Node != h.Name {
			if len(r.DockerPools) != 0 {
				t.Errorf("leased leases -o json shows pools %v on %s's row", r.DockerPools, r.Node)
			}
			continue
		}
		for _, p := range want {
			if !slices.Contains(r.DockerPools, p.String()) {
				t.Errorf("leased leases -o json: %s's dockerPools %v lack %s", h.Name, r.DockerPools, p)
			}
		}
	}
}

// composeFile is the compose project of TestDockerIPAMCompose: the issue's
// example, the default network on the leased driver with IPv6.
const composeFile = `version: "2.4"
services:
  web:
    image: ` + dockerImage + `
    command: ["httpd", "-f", "-p", "80", "-h", "/www"]
networks:
  default:
    enable_ipv6: true
    ipam:
      driver: leased
    driver_opts:
      com.docker.network.bridge.enable_ip_masquerade: "false"
`

// A docker compose project whose default network uses the leased driver,
// on two hosts: its pools lie in each host's lease, the services reach
// each other across hosts over IPv4 and IPv6 with their own addresses, and
// docker-compose down frees the pools.
func TestDockerIPAMCompose(t *testing.T) {
	dockerd, docker, busybox := dockerTools(t)
	compose, err := exec.LookPath("docker-compose")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("docker-compose not found: CI must install the Debian package docker-compose")
		}
		t.Skip("docker-compose not found (Debian package docker-compose)")
	}
	l := up(t, lab.Config{Backend: "host-gw", Hosts: 2, NoContainers: true, AgentArgs: []string{"--ip-masq"}})
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "docker-compose.yml"), []byte(composeFile), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(d *dockerHost, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx(t), compose, append([]string{"-p", "demo", "-f", filepath.Join(dir, "docker-compose.yml")}, args...)...)
		cmd.Env = append(os.Environ(), "DOCKER_HOST=unix://"+d.sock())
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("docker-compose %s on %s: %v\n%s", strings.Join(args, " "), d.h.Name, err, out)
		}
		return string(out)
	}
	var conts []*container
	ds := map[*lab.Host]*dockerHost{}
	for _, h := range l.Hosts {
		d := startDockerdIPAM(t, h, dockerd, docker, busybox)
		ds[h] = d
		run(d, "up", "-d")
		env, _ := h.Env()
		subs := d.subnets(t, "demo_default")
		if len(subs) != 2 {
			t.Fatalf("%s: demo_default has %v, want a pool per family", h.Name, subs)
		}
		for _, s := range subs {
			lease, d0 := env.Subnet.V4, env.Docker0Subnet4()
			if s.Addr().Is6() {
				lease, d0 = env.Subnet.V6, env.Docker0Subnet6()
			}
			if !lease.Contains(s.Addr()) || s.Bits() <= lease.Bits() || s.Overlaps(d0) {
				t.Errorf("%s: compose's pool %s is not in the lease %s outside docker0's %s", h.Name, s, lease, d0)
			}
		}
		c := &container{d: d, name: "demo_web_1"}
		c.addr4, c.addr6 = d.addrs(t, c.name)
		t.Logf("%s: demo_default %v, demo_web_1 %s %s", h.Name, subs, c.addr4, c.addr6)
		conts = append(conts, c)
	}
	reachAll(t, conts, nil)
	for _, h := range l.Hosts {
		run(ds[h], "down")
		if ps := statePools(t, h); len(ps) != 0 {
			t.Errorf("%s: after docker-compose down the driver still holds %v", h.Name, ps)
		}
	}
}
