package e2e

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leased/leased/dist"
	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The Docker tests run a real dockerd (Debian's docker.io) in each lab
// host's network namespace, started with exactly the flags the
// docker.service drop-in in dist/ produces from that host's subnet.env, and
// containers made from a busybox image built with docker import. They need
// the Debian packages docker.io and busybox-static; outside CI they skip
// when those are missing, in CI they fail.

const dockerImage = "leased-e2e-busybox"

// dockerTools returns the dockerd and docker binaries of the docker.io
// package (a docker CLI elsewhere on PATH may be a different version) and a
// static busybox.
func dockerTools(t *testing.T) (dockerd, docker, busybox string) {
	t.Helper()
	find := func(name, pkg string, dirs ...string) string {
		for _, d := range dirs {
			p := filepath.Join(d, name)
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
		if os.Getenv("CI") != "" {
			t.Fatalf("%s not found in %v: CI must install the Debian package %s", name, dirs, pkg)
		}
		t.Skipf("%s not found in %v (Debian package %s)", name, dirs, pkg)
		return ""
	}
	// systemd's search path for a bare "dockerd" in ExecStart=.
	dockerd = find("dockerd", "docker.io", "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin")
	docker = find("docker", "docker.io", "/usr/bin")
	busybox = find("busybox", "busybox-static", "/bin", "/usr/bin")
	f, err := elf.Open(busybox)
	if err != nil {
		t.Fatalf("%s: %v", busybox, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatalf("%s is dynamically linked and cannot run in a scratch image: install busybox-static", busybox)
		}
	}
	// Every dockerd creates /run/docker/plugins whatever its --exec-root.
	// Remove it after the test if it was not there before (os.Remove only
	// removes empty directories, so a real dockerd's are safe).
	if _, err := os.Stat("/run/docker"); errors.Is(err, os.ErrNotExist) {
		t.Cleanup(func() {
			os.Remove("/run/docker/plugins")
			os.Remove("/run/docker")
		})
	}
	return dockerd, docker, busybox
}

// dockerHost is one lab host's dockerd.
type dockerHost struct {
	h      *lab.Host
	dir    string
	docker string
	argv   []string // dockerd's command line
	cmd    *exec.Cmd
	exited chan struct{}
	log    string
	// plugins, when set, is the directory this dockerd sees as
	// /run/docker/plugins: it runs in a private mount namespace with it
	// bound there, so that it finds its own host's IPAM driver.
	plugins string
}

func (d *dockerHost) sock() string { return filepath.Join(d.dir, "docker.sock") }

// run runs the docker CLI against this host's dockerd.
func (d *dockerHost) run(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, d.docker, append([]string{"-H", "unix://" + d.sock()}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("docker %s on %s: %v: %s", strings.Join(args, " "), d.h.Name, err, bytes.TrimSpace(out.Bytes()))
	}
	return out.String(), nil
}

// productionArgs turns the drop-in's dockerd command line into the one the
// test runs: the same leased flags, but this host's own socket, state
// directories and pid file instead of docker.socket and the system
// containerd (each test dockerd starts its own containerd).
func productionArgs(t *testing.T, env []byte, dockerd, dir string) []string {
	t.Helper()
	argv, err := dist.DockerdArgs(env, nil)
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := subnetenv.Parse(env)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]string{"dockerd", "-H", "fd://", "--containerd=/run/containerd/containerd.sock"}, parsed.DockerOpts()...)
	if !slices.Equal(argv, want) {
		t.Fatalf("the drop-in produces %q from subnet.env, want %q", argv, want)
	}
	out := []string{dockerd,
		"-H", "unix://" + filepath.Join(dir, "docker.sock"),
		"--data-root=" + filepath.Join(dir, "data"),
		"--exec-root=" + filepath.Join(dir, "exec"),
		"--pidfile=" + filepath.Join(dir, "docker.pid"),
		// Not the machine's /etc/docker/daemon.json: a bip or mtu there
		// would make dockerd refuse the drop-in's flags.
		"--config-file=" + filepath.Join(dir, "daemon.json"),
		// As in production: dockerd manages iptables (its FORWARD chains and
		// IPv4 masquerade).
		"--iptables=true",
	}
	return append(out, argv[4:]...)
}

// startDockerd starts h's dockerd in h's network namespace and registers
// its cleanup: containers removed, dockerd stopped (killed if it hangs),
// mounts under its directories released.
func startDockerd(t *testing.T, h *lab.Host, dockerd, docker string) *dockerHost {
	t.Helper()
	d := newDockerd(t, h, dockerd, docker)
	d.start(t)
	return d
}

// newDockerd prepares h's dockerd (its directory, command line and
// cleanup) without starting it.
func newDockerd(t *testing.T, h *lab.Host, dockerd, docker string) *dockerHost {
	t.Helper()
	dir, err := os.MkdirTemp("", "leased-dockerd-"+h.Name+"-")
	if err != nil {
		t.Fatal(err)
	}
	env, err := os.ReadFile(h.SubnetFile())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "daemon.json"), []byte("{}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &dockerHost{h: h, dir: dir, docker: docker, log: filepath.Join(dir, "dockerd.log")}
	d.argv = productionArgs(t, env, dockerd, dir)
	t.Cleanup(func() { d.cleanup(t) })
	return d
}

func (d *dockerHost) start(t *testing.T) {
	t.Helper()
	logf, err := os.OpenFile(d.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	// nsenter, not ip netns exec: the latter remounts /sys and dockerd then
	// fails with "Devices cgroup isn't mounted".
	argv := d.argv
	if d.plugins != "" {
		argv = append([]string{"unshare", "--mount", "--propagation", "private", "sh", "-c", `mount --bind "$0" /run/docker/plugins && exec "$@"`, d.plugins}, argv...)
	}
	cmd := exec.Command("nsenter", append([]string{"--net=/var/run/netns/" + d.h.NS}, argv...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	t.Logf("%s: %s", d.h.Name, strings.Join(d.argv, " "))
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("starting dockerd of %s: %v", d.h.Name, err)
	}
	d.cmd, d.exited = cmd, make(chan struct{})
	go func(done chan struct{}) { cmd.Wait(); logf.Close(); close(done) }(d.exited)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := d.run(context.Background(), "version", "--format", "{{.Server.Version}}"); err == nil {
			return
		}
		select {
		case <-d.exited:
			t.Fatalf("dockerd of %s exited:\n%s", d.h.Name, tail(d.log, 30))
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("dockerd of %s not answering after 60s:\n%s", d.h.Name, tail(d.log, 30))
		}
	}
}

// stop removes the containers and stops dockerd (SIGTERM, then SIGKILL
// after 20s).
func (d *dockerHost) stop(t *testing.T) {
	if d.cmd == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if ids, err := d.run(ctx, "ps", "-aq"); err == nil && strings.TrimSpace(ids) != "" {
		if _, err := d.run(ctx, append([]string{"rm", "-f"}, strings.Fields(ids)...)...); err != nil {
			t.Logf("cleanup: %v", err)
		}
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(20 * time.Second):
		t.Logf("cleanup: dockerd of %s ignored SIGTERM for 20s; killing it", d.h.Name)
		d.cmd.Process.Kill()
		<-d.exited
	}
	d.cmd = nil
}

func (d *dockerHost) cleanup(t *testing.T) {
	if t.Failed() {
		t.Logf("--- dockerd log of %s ---\n%s", d.h.Name, tail(d.log, 40))
	}
	d.stop(t)
	// A dockerd that was killed leaves its mounts (overlays, netns files).
	if mounts, err := os.ReadFile("/proc/self/mounts"); err == nil {
		var under []string
		for _, line := range strings.Split(string(mounts), "\n") {
			if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], d.dir+"/") {
				under = append(under, f[1])
			}
		}
		for i := len(under) - 1; i >= 0; i-- {
			exec.Command("umount", "-l", under[i]).Run()
		}
	}
	os.RemoveAll(d.dir)
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// importImage builds the busybox image in d: /bin/busybox with the links
// the tests use, and a CGI script that prints the client's address, so
// that a container can tell whether a peer's address was NATed.
func (d *dockerHost) importImage(t *testing.T, busybox string) {
	t.Helper()
	root := t.TempDir()
	for _, dir := range []string{"bin", "www/cgi-bin", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin/busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{"sh", "ip", "ping", "ping6", "wget", "httpd", "nc", "sleep", "cat", "timeout"} {
		if err := os.Symlink("busybox", filepath.Join(root, "bin", l)); err != nil {
			t.Fatal(err)
		}
	}
	cgi := "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"$REMOTE_ADDR\"\n"
	if err := os.WriteFile(filepath.Join(root, "www/cgi-bin/addr"), []byte(cgi), 0o755); err != nil {
		t.Fatal(err)
	}
	tarCmd := exec.Command("tar", "-C", root, "-c", ".")
	imp := exec.Command(d.docker, "-H", "unix://"+d.sock(), "import", "-", dockerImage)
	pipe, err := tarCmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	imp.Stdin = pipe
	if err := tarCmd.Start(); err != nil {
		t.Fatal(err)
	}
	out, err := imp.CombinedOutput()
	if werr := tarCmd.Wait(); err != nil || werr != nil {
		t.Fatalf("docker import on %s: %v %v: %s", d.h.Name, err, werr, out)
	}
}

// container is a running container and the addresses dockerd gave it.
type container struct {
	d            *dockerHost
	name         string
	addr4, addr6 netip.Addr
}

func (d *dockerHost) runContainer(t *testing.T, name string) *container {
	t.Helper()
	c := ctx(t)
	if _, err := d.run(c, "run", "-d", "--name", name, dockerImage, "httpd", "-f", "-p", "80", "-h", "/www"); err != nil {
		t.Fatal(err)
	}
	out, err := d.run(c, "inspect", "-f", `{{.NetworkSettings.IPAddress}} {{.NetworkSettings.GlobalIPv6Address}}`, name)
	if err != nil {
		t.Fatal(err)
	}
	ct := &container{d: d, name: name}
	for _, f := range strings.Fields(out) {
		a, err := netip.ParseAddr(f)
		if err != nil {
			t.Fatalf("docker inspect %s: %q", name, out)
		}
		if a.Is4() {
			ct.addr4 = a
		} else {
			ct.addr6 = a
		}
	}
	return ct
}

// fetch asks the container at dst, from c, which address it sees c's
// request come from.
func (c *container) fetch(ctx context.Context, dst netip.Addr) (netip.Addr, error) {
	host := dst.String()
	if dst.Is6() {
		host = "[" + host + "]"
	}
	// busybox 1.35's wget -T crashes (SIGSEGV); timeout bounds it instead.
	out, err := c.d.run(ctx, "exec", c.name, "timeout", "5", "wget", "-q", "-O", "-", "http://"+host+"/cgi-bin/addr")
	if err != nil {
		return netip.Addr{}, err
	}
	s := strings.Trim(strings.TrimSpace(out), "[]")
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("the server answered %q", out)
	}
	return a.Unmap(), nil
}

// hostAddrs returns every address configured in h's namespace.
func hostAddrs(t *testing.T, h *lab.Host) map[netip.Addr]bool {
	t.Helper()
	out := mustIP(t, h, "-o", "addr", "show")
	m := map[netip.Addr]bool{}
	for _, f := range regexp.MustCompile(`inet6? ([0-9a-f.:]+)/`).FindAllStringSubmatch(out, -1) {
		m[netip.MustParseAddr(f[1])] = true
	}
	return m
}

// nsRun runs a command in h's namespace.
func nsRun(t *testing.T, h *lab.Host, args ...string) string {
	t.Helper()
	out, err := exec.Command("nsenter", append([]string{"--net=/var/run/netns/" + h.NS}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s in %s: %v: %s", strings.Join(args, " "), h.Name, err, out)
	}
	return string(out)
}

// Containers started by real dockerds on different hosts reach each other
// by address over IPv4 and IPv6, for host-gw, vxlan and proxy-ndp (where
// an upstream router and the containers also reach each other), with dockerd
// managing iptables and the FORWARD policy at DROP (as dockerd sets it when
// it enables forwarding itself): leased's LEASED-FWD chain lets the
// cluster's traffic through. IPv6 is never NATed inside the cluster (leased's
// --ip-masq exempts the cluster network); IPv4 keeps the container's source
// address when leased masquerades (--ip-masq, which puts --ip-masq=false in
// dockerd's flags) and is masqueraded by dockerd otherwise.
func TestDocker(t *testing.T) {
	dockerd, docker, busybox := dockerTools(t)
	for _, tc := range []struct {
		name   string
		cfg    lab.Config
		ipMasq bool
	}{
		{"host-gw/dual/ip-masq", lab.Config{Backend: "host-gw", Hosts: 2}, true},
		{"host-gw/dual/docker-masq", lab.Config{Backend: "host-gw", Hosts: 2, IPv6SubnetLen: 80}, false},
		{"vxlan/dual/80/routed", lab.Config{Backend: "vxlan", Hosts: 3, IPv6SubnetLen: 80, Routed: true}, true},
		// Scenario B: an upstream router that knows only the hosts' /64
		// (the lab adds it for proxy-ndp); dockerd's /80s are answered for.
		{"proxy-ndp/dual/80", lab.Config{Backend: "proxy-ndp", Hosts: 2}, true},
		{"proxy-ndp/dual/80/present", lab.Config{Backend: "proxy-ndp", Hosts: 2, BackendExtra: map[string]any{"Mode": "present"}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.NoContainers = true
			if tc.ipMasq {
				cfg.AgentArgs = append(cfg.AgentArgs, "--ip-masq")
			}
			l := up(t, cfg)
			var conts []*container
			for _, h := range l.Hosts {
				for _, ipt := range []string{"iptables", "ip6tables"} {
					nsRun(t, h, ipt, "-P", "FORWARD", "DROP")
				}
				env, err := h.Env()
				if err != nil {
					t.Fatal(err)
				}
				if env.IPMasq != tc.ipMasq {
					t.Fatalf("%s: LEASED_IPMASQ=%v, want %v", h.Name, env.IPMasq, tc.ipMasq)
				}
				d := startDockerd(t, h, dockerd, docker)
				d.importImage(t, busybox)
				c := d.runContainer(t, "c-"+h.Name)
				if !env.Subnet.V4.Contains(c.addr4) || !env.Subnet.V6.Contains(c.addr6) {
					t.Fatalf("%s's container has %s and %s, outside the leased %s and %s", h.Name, c.addr4, c.addr6, env.Subnet.V4, env.Subnet.V6)
				}
				if out, _ := d.run(ctx(t), "exec", c.name, "cat", "/sys/class/net/eth0/mtu"); strings.TrimSpace(out) != fmt.Sprint(env.MTU) {
					t.Errorf("%s's container has MTU %q, want LEASED_MTU=%d", h.Name, strings.TrimSpace(out), env.MTU)
				}
				t.Logf("%s: container %s, %s in %s, %s (MTU %d)", h.Name, c.addr4, c.addr6, env.Subnet.V4, env.Subnet.V6, env.MTU)
				conts = append(conts, c)
			}
			for _, a := range conts {
				for _, b := range conts {
					if a == b {
						continue
					}
					for _, dst := range []netip.Addr{b.addr4, b.addr6} {
						var seen netip.Addr
						testutil.Eventually(t, 15*time.Second, fmt.Sprintf("%s → %s (%s)", a.d.h.Name, b.d.h.Name, dst), func() error {
							c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
							defer cancel()
							var err error
							seen, err = a.fetch(c, dst)
							return err
						})
						src := a.addr6
						if dst.Is4() {
							src = a.addr4
						}
						switch {
						case dst.Is6() || tc.ipMasq:
							if seen != src {
								t.Errorf("%s → %s (%s): the server saw %s, want the container's own %s (no NAT inside the cluster)", a.d.h.Name, b.d.h.Name, dst, seen, src)
							}
						default:
							if !hostAddrs(t, a.d.h)[seen] {
								t.Errorf("%s → %s (%s): the server saw %s, want an address of %s (dockerd masquerades)", a.d.h.Name, b.d.h.Name, dst, seen, a.d.h.Name)
							}
						}
					}
				}
			}
			if l.Upstream != nil {
				// The router reaches every container and every container
				// the router, with no step per container.
				for _, c := range conts {
					if err := lab.PingUntil(ctx(t), l.Upstream.NS, c.addr6, 0, 10*time.Second); err != nil {
						t.Errorf("upstream router → %s's container: %v", c.d.h.Name, err)
					}
					testutil.Eventually(t, 10*time.Second, c.d.h.Name+"'s container → upstream router", func() error {
						_, err := c.d.run(ctx(t), "exec", c.name, "ping", "-c", "1", "-W", "2", l.Upstream.Addr.String())
						return err
					})
					if n, _ := l.Upstream.Neigh(c.addr6); n == "" || strings.Contains(n, "FAILED") {
						t.Errorf("the router's neighbour entry for %s: %q", c.addr6, n)
					}
				}
			}
			// The cluster traffic above crossed FORWARD chains whose policy
			// is DROP: leased's jump must still be there next to dockerd's.
			for _, h := range l.Hosts {
				for _, ipt := range []string{"iptables", "ip6tables"} {
					out := nsRun(t, h, ipt, "-S", "FORWARD")
					if !strings.Contains(out, "-P FORWARD DROP") || !strings.Contains(out, "-j LEASED-FWD") {
						t.Errorf("%s %s -S FORWARD:\n%s", h.Name, ipt, out)
					}
				}
			}
			t.Logf("%s iptables -S FORWARD:\n%s", l.Hosts[0].Name, nsRun(t, l.Hosts[0], "iptables", "-S", "FORWARD"))
		})
	}
}

// When a host's lease is lost and another host took its subnets, the agent
// logs the loud line, rewrites subnet.env, and the restart logic the
// systemd units ship (leased-docker-restart.service) restarts dockerd,
// whose containers then take the new subnet and reach the other host.
func TestDockerSubnetChange(t *testing.T) {
	dockerd, docker, busybox := dockerTools(t)
	l := up(t, lab.Config{Backend: "host-gw", Hosts: 2, NoContainers: true})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	ds := map[*lab.Host]*dockerHost{}
	for _, h := range l.Hosts {
		d := startDockerd(t, h, dockerd, docker)
		d.importImage(t, busybox)
		ds[h] = d
	}
	old, _ := h1.Env()
	started, _ := os.ReadFile(h1.SubnetFile()) // what the drop-in's ExecStartPre snapshots
	c2 := ds[h2].runContainer(t, "c2")

	// Reserve other subnets for host1, then, in one transaction, do what
	// an expiry followed by another host's claim does: host1's keys go and
	// another host holds its subnets. host1 claims again; its old subnets
	// are taken, so the reservation wins. (A reservation alone never moves
	// a running host: TestReservationDoesNotMoveServingHost.)
	next4, next6 := netip.MustParsePrefix("10.100.200.0/24"), netip.MustParsePrefix("2001:db8:cd11:fa::/64") // inside SubnetMax (the lab reserves the top)
	for _, h := range []*lab.Host{h1, h2} {                                                                  // not a subnet a host drew
		if e, _ := h.Env(); e.Subnet.V4 == next4 || e.Subnet.V6 == next6 {
			next4, next6 = netip.MustParsePrefix("10.100.201.0/24"), netip.MustParsePrefix("2001:db8:cd11:fb::/64")
		}
	}
	k := lease.NewKeys("")
	res := fmt.Sprintf(`{"Subnet":%q,"IPv6Subnet":%q}`, next4, next6)
	if _, err := l.Client.Put(ctx(t), k.Reservation(h1.Name), res); err != nil {
		t.Fatal(err)
	}
	rec := mustJSON(synthPeer(l, "taker", old.Subnet.V4, old.Subnet.V6, 0x97))
	if _, err := l.Client.Txn(ctx(t)).Then(
		clientv3.OpDelete(k.Lease(h1.Name)),
		clientv3.OpPut(k.Lease("taker"), rec),
		clientv3.OpPut(k.SubnetLock(old.Subnet.V4), "taker"),
		clientv3.OpPut(k.SubnetLock(old.Subnet.V6), "taker"),
	).Commit(); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "host1's subnet.env rewritten", func() error {
		env, err := h1.Env()
		if err != nil {
			return err
		}
		if env.Subnet.V4 != next4 || env.Subnet.V6 != next6 {
			return fmt.Errorf("subnet.env has %s %s", env.Subnet.V4, env.Subnet.V6)
		}
		return nil
	})
	logText, _ := os.ReadFile(h1.LogFile())
	loud := fmt.Sprintf("this host's subnets changed from %v to %v", []netip.Prefix{old.Subnet.V4, old.Subnet.V6}, []netip.Prefix{next4, next6})
	if !bytes.Contains(logText, []byte(loud)) || !bytes.Contains(logText, []byte("restart docker.service")) {
		t.Errorf("agent log lacks %q ... restart docker.service:\n%s", loud, l.LogTail(h1, 20))
	}

	// leased-docker-restart.service, with its paths moved to this host.
	restartNeeded := restartScript(t, h1, started)
	if !restartNeeded {
		t.Fatal("the restart unit's script did not ask to restart docker.service after the subnet changed")
	}
	d1 := ds[h1]
	d1.stop(t)
	env, _ := os.ReadFile(h1.SubnetFile())
	d1.argv = productionArgs(t, env, dockerd, d1.dir)
	d1.start(t)
	c1 := d1.runContainer(t, "c1")
	if !next4.Contains(c1.addr4) || !next6.Contains(c1.addr6) {
		t.Fatalf("after the restart the container has %s, %s; want addresses in %s, %s", c1.addr4, c1.addr6, next4, next6)
	}
	for _, dst := range []netip.Addr{c2.addr4, c2.addr6} {
		testutil.Eventually(t, 15*time.Second, "host1 (new subnet) → host2 "+dst.String(), func() error {
			c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := c1.fetch(c, dst)
			return err
		})
	}
	for _, dst := range []netip.Addr{c1.addr4, c1.addr6} {
		testutil.Eventually(t, 15*time.Second, "host2 → host1 (new subnet) "+dst.String(), func() error {
			c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := c2.fetch(c, dst)
			return err
		})
	}
}

// restartScript runs leased-docker-restart.service's command for h, with
// started as the subnet.env dockerd was started with and a stand-in
// systemctl, and reports whether it asked to restart docker.service.
func restartScript(t *testing.T, h *lab.Host, started []byte) bool {
	t.Helper()
	data, _ := dist.Files.ReadFile(dist.RestartUnit)
	settings, err := dist.ParseUnit(data)
	if err != nil {
		t.Fatal(err)
	}
	cmds := dist.Values(settings, "Service", "ExecStart")
	if len(cmds) != 1 {
		t.Fatalf("%s has %d ExecStart=", dist.RestartUnit, len(cmds))
	}
	argv, err := dist.ExpandCommand(cmds[0], nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "docker.env"), started, 0o644); err != nil {
		t.Fatal(err)
	}
	script := argv[len(argv)-1]
	script = strings.ReplaceAll(script, "/run/leased/subnet.env", h.SubnetFile())
	script = strings.ReplaceAll(script, "/run/leased/docker.env", filepath.Join(dir, "docker.env"))
	argv[len(argv)-1] = script
	calls := filepath.Join(dir, "calls")
	if err := os.WriteFile(filepath.Join(dir, "systemctl"), []byte("#!/bin/sh\necho \"$@\" >> "+calls+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = []string{"PATH=" + dir + ":/usr/bin:/bin"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("restart script: %v: %s", err, out)
	}
	t.Logf("leased-docker-restart.service says:\n%s", out)
	b, err := os.ReadFile(calls)
	if errors.Is(err, os.ErrNotExist) {
		return false
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if strings.Contains(sc.Text(), "try-restart docker.service") {
			return true
		}
	}
	return false
}
