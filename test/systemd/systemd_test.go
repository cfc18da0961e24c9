// Package systemd_test runs leased as operators do: installed from its
// Debian package on Debian machines booted with systemd as PID 1, with the
// docker.service drop-in, against a real etcd, and checks what systemd,
// dockerd and the containers show.
package systemd_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/testutil"
)

// imagePath is where test/systemd/image.sh caches the machine image
// (LEASED_SYSTEMD_IMAGE overrides it).
func imagePath() string {
	if p := os.Getenv("LEASED_SYSTEMD_IMAGE"); p != "" {
		return p
	}
	return "/var/cache/leased-systemd-test/bookworm.tar.zst"
}

func repoRoot(t *testing.T) string {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(wd, "..", "..")
}

// buildDeb builds the leased package as make deb does, into dir, and
// returns its path and version.
func buildDeb(t *testing.T, dir, version string) string {
	t.Helper()
	ctx := context.Background()
	top := repoRoot(t)
	bin := filepath.Join(dir, "leased")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version="+version, "-o", bin, "./cmd/leased")
	cmd.Dir, cmd.Env = top, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building leased: %v\n%s", err, out)
	}
	out := mustRun(t, ctx, filepath.Join(top, "dist/deb/build.sh"), bin, version, dir)
	return strings.TrimSpace(out)
}

// unpackImage unpacks the cached machine image into a new directory,
// building the image first when it is not cached.
func unpackImage(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	img := imagePath()
	if _, err := os.Stat(img); err != nil {
		t.Logf("building the machine image %s (once; about a minute)", img)
		mustRun(t, ctx, filepath.Join(repoRoot(t), "test/systemd/image.sh"), img)
	}
	dir, err := os.MkdirTemp("/var/tmp", "leased-machine-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	mustRun(t, ctx, "sh", "-c", "zstd -q -d -c "+img+" | tar -C "+dir+" --numeric-owner -xf -")
	return dir
}

// etcdProc is Debian's etcd in the lan namespace at 10.77.0.1:2379; stop
// and start keep its data.
type etcdProc struct {
	t   *testing.T
	l   *lan
	dir string
	cmd *exec.Cmd
	log *strings.Builder
}

// startEtcd starts etcd; it is stopped when the test ends.
func startEtcd(t *testing.T, l *lan) *etcdProc {
	t.Helper()
	e := &etcdProc{t: t, l: l, dir: t.TempDir()}
	t.Cleanup(e.stop)
	e.start()
	return e
}

func (e *etcdProc) start() {
	t := e.t
	t.Helper()
	e.cmd = exec.Command("ip", "netns", "exec", e.l.ns, "etcd", "--name=lab", "--data-dir="+e.dir,
		"--listen-client-urls=http://10.77.0.1:2379", "--advertise-client-urls=http://10.77.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=lab=http://127.0.0.1:2380", "--log-level=error")
	e.log = &strings.Builder{}
	e.cmd.Stdout, e.cmd.Stderr = e.log, e.log
	if err := e.cmd.Start(); err != nil {
		t.Fatalf("starting etcd (apt-get install etcd-server): %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := run(context.Background(), "ip", "netns", "exec", e.l.ns, "bash", "-c", "exec 3<>/dev/tcp/10.77.0.1/2379 2>/dev/null && echo up || true")
		if err == nil && strings.Contains(out, "up") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd did not listen within 30s:\n%s", e.log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop kills etcd (its data stays for start).
func (e *etcdProc) stop() {
	if e.cmd == nil {
		return
	}
	e.cmd.Process.Kill()
	e.cmd.Wait()
	e.cmd = nil
}

// putConfig writes the network config with the leased CLI, from the lan
// namespace.
func putConfig(t *testing.T, l *lan, leasedBin, cfg string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(f, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	mustRun(t, context.Background(), "ip", "netns", "exec", l.ns, leasedBin, "config", "put", "--etcd-endpoints=http://10.77.0.1:2379", f)
}

// TestPackageUnderSystemd boots two machines with systemd as PID 1, installs
// leased from its package on each, and checks, per backend, with what
// systemd, dockerd and the containers report:
//   - leased.service (Type=notify) is active only once subnet.env is
//     written, and docker.service's main process starts after that;
//   - dockerd runs with --bip, --mtu and --ipv6 --fixed-cidr-v6 from
//     subnet.env;
//   - containers on the two machines reach each other over IPv4 and IPv6
//     (vxlan, host-gw), or over IPv6 with proxy-ndp, where the upstream
//     router, which knows only the on-link /64, reaches them too;
//   - `systemctl restart leased`, and an upgrade to a newer package,
//     restart neither dockerd nor a container, and 10 ms pings between
//     containers lose nothing across them;
//   - every hardening setting of the unit is in force and nothing leased
//     does is denied;
//   - a config change that changes subnet.env restarts docker.service
//     exactly once (leased-docker-restart.path);
//   - `leased --version` matches the package's version;
//   - purging the package leaves no file behind.
func TestPackageUnderSystemd(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tool := range []string{"systemd-nspawn", "zstd", "mmdebstrap", "dpkg-deb", "etcd"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: test/deps.sh installs it (%v)", tool, err)
		}
	}
	root := unpackImage(t)
	dir := t.TempDir()
	version := "1.0.0+test" + strconv.FormatInt(time.Now().Unix(), 10)
	deb := buildDeb(t, dir, version)
	newVersion := version + ".1" // sorts after version, as a newer build does
	newDeb := buildDeb(t, t.TempDir(), newVersion)
	leasedBin := filepath.Join(dir, "leased")

	for _, sc := range []struct {
		backend string
		v4      bool   // the config enables IPv4
		cfg     string // the network config
		wider   string // a config that changes subnet.env and keeps every held subnet
		network string // the IPv6 network of wider
	}{
		{"vxlan", true, `{"Network":"10.100.0.0/16","IPv6Network":"fd10:100::/48","IPv6SubnetLen":80,"Backend":{"Type":"vxlan"}}`,
			`{"Network":"10.100.0.0/16","IPv6Network":"fd10:100::/40","IPv6SubnetLen":80,"Backend":{"Type":"vxlan"}}`, "fd10:100::/40"},
		{"host-gw", true, `{"Network":"10.100.0.0/16","IPv6Network":"fd10:100::/48","IPv6SubnetLen":80,"Backend":{"Type":"host-gw"}}`,
			`{"Network":"10.100.0.0/16","IPv6Network":"fd10:100::/40","IPv6SubnetLen":80,"Backend":{"Type":"host-gw"}}`, "fd10:100::/40"},
		// The machines' LAN is fd77::/64, on-link at the "router" (the
		// lan namespace, fd77::1), which knows no route to any slice:
		// proxy-ndp answers for the upper half of the /64.
		{"proxy-ndp", false, `{"IPv6Network":"fd77:0:0:0:8000::/65","IPv6SubnetLen":80,"Backend":{"Type":"proxy-ndp"}}`,
			`{"IPv6Network":"fd77::/64","IPv6SubnetLen":80,"Backend":{"Type":"proxy-ndp"}}`, "fd77::/64"},
	} {
		t.Run(sc.backend, func(t *testing.T) {
			tag := randomTag()
			l := newLAN(t, tag)
			startEtcd(t, l)
			putConfig(t, l, leasedBin, sc.cfg)
			var ms []*machine
			for i := 1; i <= 2; i++ {
				ms = append(ms, boot(t, l, tag, i, root, map[string]string{deb: "/root/leased.deb", newDeb: "/root/leased-new.deb"}))
			}
			before := fileList(t, ms[1])
			for _, m := range ms {
				install(t, m)
			}
			checkStartOrder(t, ms, sc.v4)
			c := startContainers(t, ms, sc.v4)
			checkReach(t, ms, c)
			if sc.backend == "proxy-ndp" {
				for i, m := range ms {
					if out, err := run(context.Background(), "ip", "netns", "exec", l.ns, "ping", "-6", "-c", "3", "-W", "5", c.v6[i]); err != nil {
						t.Errorf("the upstream router cannot reach the container on %s (%s): %v\n%s", m.name, c.v6[i], err, out)
					}
				}
			}
			checkRestartHitless(t, ms, c)
			checkUpgradeHitless(t, ms, c)
			checkNothingDenied(t, ms, sc.v4)
			checkConfigChangeRestartsDockerOnce(t, l, leasedBin, ms, sc.wider, sc.network)
			for i, m := range ms {
				want := version
				if i == 0 {
					want = newVersion // upgraded by checkUpgradeHitless
				}
				if got := m.must("leased --version"); !strings.HasPrefix(got, "leased "+want+" ") {
					t.Errorf("%s: leased --version says %q, the package is %s", m.name, got, want)
				}
				if got := m.must("dpkg-query -W -f '${Version}' leased"); got != want {
					t.Errorf("%s: dpkg has leased %q, want %s", m.name, got, want)
				}
				if got := m.must("journalctl --no-pager -o cat -u leased.service | grep 'leased starting' | tail -1"); !strings.Contains(got, `version="`+want+`"`) {
					t.Errorf("%s: the running agent logged %q, want version %s", m.name, got, want)
				}
			}
			checkPurgeLeavesNothing(t, ms[1], before)
		})
	}
}

// install installs the package, the docker drop-in and /etc/default/leased
// in m, then starts docker.service (which pulls in leased.service).
func install(t *testing.T, m *machine) {
	t.Helper()
	m.must("dpkg -i /root/leased.deb")
	m.must(`cat > /etc/default/leased <<'EOF'
LEASED_ETCD_ENDPOINTS=http://10.77.0.1:2379
LEASED_IFACE=eth0
LEASED_IP_MASQ=true
LEASED_OPTS=-v=2
EOF`)
	m.must("mkdir -p /etc/systemd/system/docker.service.d && cp /usr/share/doc/leased/examples/10-leased.conf /etc/systemd/system/docker.service.d/ && systemctl daemon-reload")
	m.must("systemctl enable --now leased-docker-restart.path")
	// leased must be enabled by the package, so it starts at boot.
	if st := m.must("systemctl is-enabled leased.service"); st != "enabled" {
		t.Errorf("%s: leased.service is %q after dpkg -i, want enabled", m.name, st)
	}
	m.must("timeout 120 systemctl start docker.service")
}

// checkStartOrder: leased became active after it wrote subnet.env, and
// dockerd's main process started after leased was active.
func checkStartOrder(t *testing.T, ms []*machine, v4 bool) {
	t.Helper()
	for _, m := range ms {
		if st := m.show("leased.service", "ActiveState"); st != "active" {
			t.Fatalf("%s: leased.service is %s", m.name, st)
		}
		leasedActive := usec(t, m.show("leased.service", "ActiveEnterTimestampMonotonic"))
		dockerStart := usec(t, m.show("docker.service", "ExecMainStartTimestampMonotonic"))
		if dockerStart < leasedActive {
			t.Errorf("%s: dockerd started at %dµs, before leased was ready at %dµs", m.name, dockerStart, leasedActive)
		}
		// subnet.env was written (its mtime) before systemd saw READY=1
		// (ActiveEnterTimestamp), both in realtime µs.
		written := parseTime(t, m.must("stat -c %y /run/leased/subnet.env"), "2006-01-02 15:04:05.999999999 -0700")
		ready := parseTime(t, m.must("systemctl show --timestamp=us+utc -P ActiveEnterTimestamp leased.service"), "Mon 2006-01-02 15:04:05.999999 MST")
		if written.After(ready) {
			t.Errorf("%s: leased wrote subnet.env at %s, after systemd saw it ready at %s", m.name, written, ready)
		}
		if !strings.Contains(m.must("journalctl --no-pager -o cat -u leased.service"), `"ready"`) {
			t.Errorf("%s: leased never logged that it was ready", m.name)
		}
		args := m.must("ps -o args= -C dockerd")
		env := m.must("cat /run/leased/subnet.env")
		keys := []string{"LEASED_MTU", "LEASED_SUBNET6"}
		if v4 {
			keys = append(keys, "LEASED_SUBNET")
		}
		for _, k := range keys {
			if v := envValue(env, k); v == "" {
				t.Fatalf("%s: subnet.env has no %s:\n%s", m.name, k, env)
			}
		}
		want := []string{"--mtu=" + envValue(env, "LEASED_MTU"), "--ipv6", "--fixed-cidr-v6=" + docker0Value(env, "LEASED_SUBNET6")}
		if v4 {
			sub4 := docker0Value(env, "LEASED_SUBNET")
			want = append(want, "--bip="+sub4[:strings.LastIndexByte(sub4, '.')+1]+"1/"+sub4[strings.IndexByte(sub4, '/')+1:])
		}
		for _, w := range want {
			if !containsArg(args, w) {
				t.Errorf("%s: dockerd runs as %q, without %s (subnet.env:\n%s)", m.name, args, w, env)
			}
		}
		if st := m.show("leased.service", "StatusText"); !strings.Contains(st, "held") {
			t.Errorf("%s: leased's STATUS= is %q", m.name, st)
		}
	}
}

func containsArg(args, w string) bool {
	for _, a := range strings.Fields(args) {
		if a == w {
			return true
		}
	}
	return false
}

// docker0Value is docker0's share of LEASED_SUBNET or LEASED_SUBNET6: the
// LEASED_DOCKER0_ line when leased's Docker IPAM driver has the rest.
func docker0Value(env, key string) string {
	if v := envValue(env, strings.Replace(key, "LEASED_", "LEASED_DOCKER0_", 1)); v != "" {
		return v
	}
	return envValue(env, key)
}

func envValue(env, key string) string {
	for _, line := range strings.Split(env, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && k == key {
			return strings.Trim(v, `"'`)
		}
	}
	return ""
}

// parseTime parses s in layout, failing the test when it does not parse.
func parseTime(t *testing.T, s, layout string) time.Time {
	t.Helper()
	tm, err := time.Parse(layout, strings.TrimSpace(s))
	if err != nil {
		t.Fatalf("parsing time %q: %v", s, err)
	}
	return tm
}

func usec(t *testing.T, s string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil || n == 0 {
		t.Fatalf("not a timestamp: %q", s)
	}
	return n
}

// containers: on each machine, one container's name and addresses.
type containers struct {
	v4, v6 []string
}

// addrs are the addresses of machine i's container that other hosts reach.
func (c containers) addrs(i int) []string {
	if len(c.v4) == 0 {
		return []string{c.v6[i]}
	}
	return []string{c.v4[i], c.v6[i]}
}

// startContainers starts a container on each machine; without v4 (an
// IPv6-only network) c.v4 is left empty: docker0's IPv4 addresses are
// Docker's own and no other host routes them.
func startContainers(t *testing.T, ms []*machine, v4 bool) containers {
	t.Helper()
	var c containers
	for _, m := range ms {
		m.must("tar -C /opt/busybox -c . | docker import - bb >/dev/null")
		m.must("docker run -d --name ctr --network bridge bb sleep 3600")
		var info []struct {
			NetworkSettings struct {
				IPAddress         string
				GlobalIPv6Address string
			}
		}
		if err := json.Unmarshal([]byte(m.must("docker inspect ctr")), &info); err != nil || len(info) != 1 {
			t.Fatalf("%s: docker inspect: %v", m.name, err)
		}
		if v4 {
			c.v4 = append(c.v4, info[0].NetworkSettings.IPAddress)
		}
		c.v6 = append(c.v6, info[0].NetworkSettings.GlobalIPv6Address)
	}
	return c
}

// checkReach: each machine's container pings the other's, both families.
func checkReach(t *testing.T, ms []*machine, c containers) {
	t.Helper()
	for i, m := range ms {
		j := 1 - i
		for _, dst := range c.addrs(j) {
			if dst == "" {
				t.Errorf("container on %s has no address of one family: %+v", ms[j].name, c)
				continue
			}
			if out, err := m.sh(30*time.Second, "docker exec ctr ping -c 3 -W 5 "+dst); err != nil {
				t.Errorf("%s: container cannot reach %s on %s: %v\n%s", m.name, dst, ms[j].name, err, out)
			}
		}
	}
}

var lossRE = regexp.MustCompile(`(\d+) packets transmitted, (\d+) (packets )?received`)

// checkRestartHitless restarts leased on machine 1 while 10 ms pings run
// from its container to machine 2's, both families.
func checkRestartHitless(t *testing.T, ms []*machine, c containers) {
	t.Helper()
	checkHitless(t, ms, c, "`systemctl restart leased`", "timeout 60 systemctl restart leased.service")
}

// checkUpgradeHitless installs a newer build of the package on machine 1
// while 10 ms pings run, as running.md's "Upgrading leased" says: the
// package restarts leased, and nothing is lost.
func checkUpgradeHitless(t *testing.T, ms []*machine, c containers) {
	t.Helper()
	checkHitless(t, ms, c, "a package upgrade", "dpkg -i /root/leased-new.deb")
}

// checkHitless runs script on machine 1 while 10 ms pings run from its
// container to machine 2's, both families, and checks that it restarted
// leased and nothing else, and that no ping was lost.
func checkHitless(t *testing.T, ms []*machine, c containers, what, script string) {
	t.Helper()
	m := ms[0]
	dockerPID := m.show("docker.service", "MainPID")
	ctrStarted := m.must("docker inspect -f '{{.State.StartedAt}}' ctr")
	leasedPID := m.show("leased.service", "MainPID")
	type result struct {
		out string
		err error
	}
	var chans []chan result
	for _, dst := range c.addrs(1) {
		ch := make(chan result, 1)
		chans = append(chans, ch)
		go func() {
			out, err := m.sh(time.Minute, "docker exec ctr ping -q -i 0.01 -w 6 "+dst)
			ch <- result{out, err}
		}()
	}
	time.Sleep(1500 * time.Millisecond)
	m.must(script)
	for i, ch := range chans {
		r := <-ch
		mm := lossRE.FindStringSubmatch(r.out)
		if mm == nil {
			t.Errorf("ping %d across %s: %v\n%s", i, what, r.err, r.out)
			continue
		}
		sent, got := mm[1], mm[2]
		if n, _ := strconv.Atoi(sent); n < 100 {
			t.Errorf("only %s pings sent across %s: %s", sent, what, r.out)
		}
		if sent != got {
			t.Errorf("%s lost pings across %s: %s sent, %s received", m.name, what, sent, got)
		}
	}
	if p := m.show("leased.service", "MainPID"); p == leasedPID {
		t.Errorf("leased's MainPID is still %s after %s: it did not restart", p, what)
	}
	if p := m.show("docker.service", "MainPID"); p != dockerPID {
		t.Errorf("dockerd restarted across %s: MainPID %s → %s", what, dockerPID, p)
	}
	if s := m.must("docker inspect -f '{{.State.StartedAt}}' ctr"); s != ctrStarted {
		t.Errorf("the container restarted across %s: started %s → %s", what, ctrStarted, s)
	}
}

// fileList lists the files of m's root file system, leaving out what
// changes by itself (logs, caches, dpkg's and systemd's state, what dockerd and
// containerd create).
func fileList(t *testing.T, m *machine) map[string]bool {
	t.Helper()
	out := m.must(`find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp -o -path /var/tmp \
		-o -path /var/log -o -path /var/cache -o -path /var/lib/dpkg -o -path /var/lib/docker -o -path /var/lib/containerd \
		-o -path /etc/docker -o -path /etc/cni -o -path /var/lib/systemd/timers -o -path /var/lib/systemd/random-seed -o -path /root/leased.deb -o -path /root/leased-new.deb \) -prune -o -print`)
	files := map[string]bool{}
	for _, f := range strings.Split(out, "\n") {
		files[f] = true
	}
	return files
}

// checkPurgeLeavesNothing removes the drop-in as running.md says, purges
// the package, and checks that the machine's files are those from before
// the package was installed, and that nothing of leased runs or remains in
// /run.
func checkPurgeLeavesNothing(t *testing.T, m *machine, before map[string]bool) {
	t.Helper()
	m.must("rm /etc/systemd/system/docker.service.d/10-leased.conf && rmdir /etc/systemd/system/docker.service.d && systemctl daemon-reload")
	m.must("docker rm -f ctr >/dev/null; timeout 60 systemctl stop docker.service docker.socket")
	m.must("dpkg -P leased")
	after := fileList(t, m)
	for f := range after {
		if !before[f] {
			t.Errorf("%s: %s is left after dpkg -P leased", m.name, f)
		}
	}
	for f := range before {
		if !after[f] {
			t.Errorf("%s: %s is gone after installing and purging leased", m.name, f)
		}
	}
	if out, _ := m.sh(10*time.Second, "ls -d /run/leased 2>&1; pgrep -x leased; systemctl is-enabled leased.service 2>&1"); !strings.Contains(out, "No such file") || strings.Contains(out, "enabled") {
		t.Errorf("%s: after dpkg -P leased: %s", m.name, out)
	}
}

// checkNothingDenied: under the unit's hardening (every setting of
// dist/leased.service in force), leased logged no denied operation, and
// its sysctls and the jumps to its chains (of each enabled family) are in
// place.
func checkNothingDenied(t *testing.T, ms []*machine, v4 bool) {
	t.Helper()
	for _, m := range ms {
		for prop, want := range map[string]string{
			"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
			"NoNewPrivileges": "yes", "RestrictNamespaces": "yes", "MemoryDenyWriteExecute": "yes",
			"CapabilityBoundingSet":   "cap_net_admin cap_net_raw",
			"RestrictAddressFamilies": "AF_INET AF_INET6 AF_NETLINK AF_PACKET AF_UNIX", // systemd sorts them
		} {
			if got := m.show("leased.service", prop); got != want {
				t.Errorf("%s: leased.service %s=%q, want %q", m.name, prop, got, want)
			}
		}
		log := m.must("journalctl --no-pager -o cat -u leased.service")
		for _, bad := range []string{"permission denied", "operation not permitted", "read-only file system", "Permission denied"} {
			if strings.Contains(log, bad) {
				t.Errorf("%s: leased's log says %q under the unit's hardening:\n%s", m.name, bad, log)
			}
		}
		if v := m.must("sysctl -n net.ipv4.ip_forward net.ipv6.conf.all.forwarding"); v != "1\n1" {
			t.Errorf("%s: forwarding sysctls are %q", m.name, v)
		}
		cmds := []string{"ip6tables"}
		if v4 {
			cmds = append(cmds, "iptables")
		}
		for _, ipt := range cmds {
			if out := m.must(ipt + " -S FORWARD"); !strings.Contains(out, "-j LEASED-FWD") {
				t.Errorf("%s: no jump to LEASED-FWD in %s FORWARD:\n%s", m.name, ipt, out)
			}
		}
	}
}

// checkConfigChangeRestartsDockerOnce: a config change that changes
// subnet.env (a wider IPv6 network: every held subnet stays valid)
// makes leased-docker-restart.path restart docker.service exactly once on
// each machine.
func checkConfigChangeRestartsDockerOnce(t *testing.T, l *lan, leasedBin string, ms []*machine, wider, network string) {
	t.Helper()
	starts := func(m *machine) int {
		out, _ := m.sh(30*time.Second, "journalctl --no-pager -o cat -u docker.service | grep -c '^Started docker.service'")
		n, _ := strconv.Atoi(strings.TrimSpace(out))
		return n
	}
	var before []int
	var env []string
	for _, m := range ms {
		before = append(before, starts(m))
		env = append(env, m.must("cat /run/leased/subnet.env"))
	}
	putConfig(t, l, leasedBin, wider)
	for i, m := range ms {
		deadline := time.Now().Add(60 * time.Second)
		for m.must("cat /run/leased/subnet.env") == env[i] {
			if time.Now().After(deadline) {
				t.Fatalf("%s: subnet.env unchanged 60s after the config change:\n%s", m.name, env[i])
			}
			time.Sleep(200 * time.Millisecond)
		}
		for starts(m) < before[i]+1 && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
		}
	}
	time.Sleep(5 * time.Second) // room for a second, unwanted restart
	for i, m := range ms {
		if n := starts(m) - before[i]; n != 1 {
			out, _ := m.sh(10*time.Second, "journalctl --no-pager -o cat -u leased-docker-restart.service")
			t.Errorf("%s: docker.service started %d times after a config change that changed subnet.env, want 1; leased-docker-restart.service:\n%s", m.name, n, out)
		}
		if args := m.must("ps -o args= -C dockerd"); !strings.Contains(m.must("cat /run/leased/subnet.env"), network) {
			t.Errorf("%s: subnet.env does not name the new network; dockerd runs as %q", m.name, args)
		}
	}
}
