package dist_test

import (
	"bytes"
	"encoding/json"
	"github.com/leased/leased/pkg/ipfam"
	"io/fs"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/leased/leased/dist"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
)

// Every example config is valid, without warnings, for both the lease
// layer and its backend, and says what its name promises.
func TestExamples(t *testing.T) {
	names, err := fs.Glob(dist.Files, dist.ExamplesGlob)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]func(t *testing.T, c *lease.Config){
		"host-gw-dual-stack.json": func(t *testing.T, c *lease.Config) {
			family(t, c, true, true, backend.TypeHostGW)
		},
		"vxlan-dual-stack.json": func(t *testing.T, c *lease.Config) {
			family(t, c, true, true, backend.TypeVXLAN)
		},
		"ipv6-only.json": func(t *testing.T, c *lease.Config) {
			family(t, c, false, true, backend.TypeHostGW)
		},
		"proxy-ndp.json": func(t *testing.T, c *lease.Config) {
			family(t, c, false, true, backend.TypeProxyNDP)
			// The network is the upper half of the hosts' on-link /64: the
			// hosts' own addresses (::1, ::2, ...) are outside it, as the
			// backend requires.
			onLink := netip.MustParsePrefix("2001:db8:ab11::/64")
			if n := c.IPv6.Network; !onLink.Contains(n.Addr()) || n.Bits() <= onLink.Bits() || n.Contains(netip.MustParseAddr("2001:db8:ab11::2")) {
				t.Errorf("IPv6Network %s is not a part of %s above the hosts' addresses", n, onLink)
			}
		},
		"ipv4-three-subnets.json": func(t *testing.T, c *lease.Config) {
			family(t, c, true, false, backend.TypeVXLAN)
			if n := poolSize(c.IPv4); n != 3 {
				t.Errorf("pool %s has %d subnets, want 3 (the fourth host is out of subnets)", c.IPv4, n)
			}
		},
	}
	if len(names) != len(want) {
		t.Errorf("examples %v, want one per %v", names, slices.Sorted(mapsKeys(want)))
	}
	for _, name := range names {
		t.Run(filepath.Base(name), func(t *testing.T) {
			data, err := dist.Files.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			cfg, warnings, err := lease.ParseConfig(data)
			if err != nil {
				t.Fatalf("lease.ParseConfig: %v", err)
			}
			if len(warnings) > 0 {
				t.Errorf("warnings: %q", warnings)
			}
			if err := backend.ValidateConfig(cfg.Backend.Raw); err != nil {
				t.Errorf("backend.ValidateConfig: %v", err)
			}
			check, ok := want[filepath.Base(name)]
			if !ok {
				t.Fatalf("no expectations for %s: add it to the table", name)
			}
			check(t, cfg)
		})
	}
}

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func family(t *testing.T, c *lease.Config, v4, v6 bool, typ string) {
	t.Helper()
	if (c.IPv4 != nil) != v4 || (c.IPv6 != nil) != v6 {
		t.Errorf("IPv4 %v, IPv6 %v; want enabled %v, %v", c.IPv4, c.IPv6, v4, v6)
	}
	if c.Backend.Type != typ {
		t.Errorf("backend %s, want %s", c.Backend.Type, typ)
	}
}

func poolSize(p *lease.Pool) int64 {
	lo := new(big.Int).SetBytes(p.Min.Addr().AsSlice())
	hi := new(big.Int).SetBytes(p.Max.Addr().AsSlice())
	d := new(big.Int).Sub(hi, lo)
	d.Rsh(d, uint(p.Network.Addr().BitLen()-p.SubnetLen))
	return d.Int64() + 1
}

// The drop-in turns subnet.env into exactly the dockerd flags subnetenv
// renders, after the packaged units' own arguments, and leaves one
// ExecStart= in force.
func TestDropInDockerdArgs(t *testing.T) {
	env := subnetenv.Env{
		Network: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.0.0/16"), V6: netip.MustParsePrefix("2001:db8:cd11::/48")}, Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.15.0/24"), V6: netip.MustParsePrefix("2001:db8:cd11:0:8000::/80")},

		MTU: 1450, IPMasq: true, Backend: "vxlan",
	}
	for _, tc := range []struct {
		name  string
		extra map[string]string
		want  []string
	}{
		{"docker-ce (no DOCKER_OPTS)", nil, nil},
		{"debian with DOCKER_OPTS", map[string]string{"DOCKER_OPTS": "--log-level=warn  --debug"}, []string{"--log-level=warn", "--debug"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			argv, err := dist.DockerdArgs(env.Render(), tc.extra)
			if err != nil {
				t.Fatal(err)
			}
			want := []string{"dockerd", "-H", "fd://", "--containerd=/run/containerd/containerd.sock"}
			want = append(want, tc.want...)
			want = append(want, "--bip=10.100.15.1/24", "--mtu=1450", "--ipv6", "--fixed-cidr-v6=2001:db8:cd11:0:8000::/80", "--ip-masq=false")
			if !slices.Equal(argv, want) {
				t.Errorf("dockerd argv\n got %q\nwant %q", argv, want)
			}
			if tail := argv[len(argv)-len(env.DockerOpts()):]; !slices.Equal(tail, env.DockerOpts()) {
				t.Errorf("argv ends %q, want subnetenv's %q", tail, env.DockerOpts())
			}
		})
	}
}

func TestExpandCommand(t *testing.T) {
	env := map[string]string{"A": "x  y", "B": "", "C": "z"}
	for _, tc := range []struct {
		cmd  string
		want []string
	}{
		{"cmd $A $B $UNSET tail", []string{"cmd", "x", "y", "tail"}},
		{"cmd ${A} --c=${C} pre${B}post", []string{"cmd", "x  y", "--c=z", "prepost"}},
		{`-/bin/sh -c 'echo "$A"; exit 0'`, []string{"/bin/sh", "-c", `echo "$A"; exit 0`}},
	} {
		got, err := dist.ExpandCommand(tc.cmd, env)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("ExpandCommand(%q) = %q, %v; want %q", tc.cmd, got, err, tc.want)
		}
	}
}

// dist's EnvironmentFile reader agrees with subnetenv on what it writes,
// including values that need quoting.
func TestEnvironmentFileReadsSubnetEnv(t *testing.T) {
	env := subnetenv.Env{Network: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8::/48")}, Subnet: ipfam.Pair[netip.Prefix]{V6: netip.MustParsePrefix("2001:db8:0:1::/64")}, MTU: 1500, Backend: "host-gw"}
	got, err := dist.ParseEnvironmentFile(env.Render())
	if err != nil {
		t.Fatal(err)
	}
	if got[subnetenv.KeyDockerOpts] != strings.Join(env.DockerOpts(), " ") || got[subnetenv.KeySubnet6] != "2001:db8:0:1::/64" {
		t.Errorf("parsed %q", got)
	}
	if _, ok := got[subnetenv.KeySubnet]; ok {
		t.Errorf("IPv6-only file has %s", subnetenv.KeySubnet)
	}
}

// Every LEASED_* variable in the example /etc/default/leased, set or
// commented out, is a flag of the agent (or LEASED_OPTS).
func TestDefaultFileNamesRealFlags(t *testing.T) {
	bin := buildLeased(t)
	out, _ := exec.Command(bin, "help").CombinedOutput()
	flags := map[string]bool{"LEASED_OPTS": true}
	for _, m := range regexp.MustCompile(`(?m)^\s+-([a-z0-9-]+)`).FindAllStringSubmatch(string(out), -1) {
		flags["LEASED_"+strings.ToUpper(strings.ReplaceAll(m[1], "-", "_"))] = true
	}
	if !flags["LEASED_ETCD_ENDPOINTS"] {
		t.Fatalf("could not read the flags from `leased help`:\n%s", out)
	}
	data, _ := dist.Files.ReadFile(dist.DefaultEnv)
	vars := regexp.MustCompile(`(?m)^#?(LEASED_[A-Z0-9_]+)=`).FindAllStringSubmatch(string(data), -1)
	if len(vars) < 5 {
		t.Fatalf("found only %d variables in %s", len(vars), dist.DefaultEnv)
	}
	for _, v := range vars {
		if !flags[v[1]] {
			t.Errorf("%s sets %s, which is no flag of leased", dist.DefaultEnv, v[1])
		}
	}
	if _, err := dist.ParseEnvironmentFile(data); err != nil {
		t.Errorf("%s: %v", dist.DefaultEnv, err)
	}
}

func buildLeased(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "leased")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/leased").CombinedOutput(); err != nil {
		t.Fatalf("building leased: %v\n%s", err, out)
	}
	return bin
}

// need skips the test when a tool is missing, except in CI, where it fails.
func need(t *testing.T, tool, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		for _, dir := range []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"} {
			if _, err := os.Stat(filepath.Join(dir, tool)); err == nil {
				return filepath.Join(dir, tool)
			}
		}
		if os.Getenv("CI") != "" {
			t.Fatalf("%s not found: CI must install the Debian package %s", tool, pkg)
		}
		t.Skipf("%s not found (Debian package %s)", tool, pkg)
	}
	return p
}

// `systemd-analyze verify` accepts every unit, and the docker drop-in on
// top of Debian's packaged docker.service and of a docker-ce style one.
// The units are verified as shipped except for leased's ExecStart= path,
// which points at a freshly built binary (verify checks it exists).
func TestSystemdAnalyzeVerify(t *testing.T) {
	analyze := need(t, "systemd-analyze", "systemd")
	bin := buildLeased(t)
	dir := t.TempDir()
	write := func(name string, data []byte) {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, u := range dist.Units {
		data, _ := dist.Files.ReadFile(u)
		if u == dist.LeasedUnit {
			if !bytes.Contains(data, []byte("ExecStart=/usr/local/bin/leased ")) {
				t.Fatalf("%s no longer runs /usr/local/bin/leased; update this test", u)
			}
			data = bytes.ReplaceAll(data, []byte("/usr/local/bin/leased"), []byte(bin))
		}
		write(u, data)
	}
	dropIn, _ := dist.Files.ReadFile(dist.DockerDropIn)
	write(dist.DockerDropIn, dropIn)

	verify := func(t *testing.T, unitPath string, units ...string) {
		t.Helper()
		cmd := exec.Command(analyze, append([]string{"verify", "--man=no"}, units...)...)
		// verify reads its arguments as paths relative to the working
		// directory; a name not found there is looked up in the search
		// path, where a trailing ':' keeps the default after ours.
		cmd.Dir = unitPath
		cmd.Env = append(os.Environ(), "SYSTEMD_UNIT_PATH="+unitPath+":")
		out, err := cmd.CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", strings.Join(units, " "), err, out)
		}
	}
	t.Run("leased units", func(t *testing.T) {
		verify(t, dir, dist.Units...)
	})

	need(t, "dockerd", "docker.io")
	t.Run("drop-in on the packaged docker.service", func(t *testing.T) {
		if _, err := os.Stat("/lib/systemd/system/docker.service"); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("no packaged docker.service: CI must install docker.io")
			}
			t.Skip("no packaged docker.service (Debian package docker.io)")
		}
		verify(t, dir, "docker.service")
	})
	t.Run("drop-in on a docker-ce style docker.service", func(t *testing.T) {
		ce := t.TempDir()
		if err := os.CopyFS(ce, os.DirFS(dir)); err != nil {
			t.Fatal(err)
		}
		// The ExecStart of Docker's own packages (dockerd in /usr/bin, no
		// DOCKER_OPTS, no /etc/default/docker), and docker.socket.
		unit := "[Unit]\nDescription=Docker Application Container Engine\nAfter=network-online.target docker.socket containerd.service\nWants=network-online.target containerd.service\nRequires=docker.socket\n\n" +
			"[Service]\nType=notify\nExecStart=/usr/bin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock\nExecReload=/bin/kill -s HUP $MAINPID\nTimeoutStartSec=0\nRestart=always\nDelegate=yes\nKillMode=process\n\n[Install]\nWantedBy=multi-user.target\n"
		sock := "[Unit]\nDescription=Docker Socket for the API\n\n[Socket]\nListenStream=/run/docker.sock\nSocketMode=0660\nSocketUser=root\nSocketGroup=root\n\n[Install]\nWantedBy=sockets.target\n"
		for name, data := range map[string]string{"docker.service": unit, "docker.socket": sock} {
			if err := os.WriteFile(filepath.Join(ce, name), []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		verify(t, ce, "docker.service")
	})
}

// leased-docker-restart.service restarts docker.service exactly when the
// subnet.env dockerd started with differs from the current one. The
// script runs with its paths moved to a temporary directory and a stand-in
// systemctl that records its arguments.
func TestRestartOnSubnetChange(t *testing.T) {
	data, _ := dist.Files.ReadFile(dist.RestartUnit)
	settings, err := dist.ParseUnit(data)
	if err != nil {
		t.Fatal(err)
	}
	exec1 := dist.Values(settings, "Service", "ExecStart")
	if len(exec1) != 1 {
		t.Fatalf("ExecStart= %q, want one", exec1)
	}
	path, _ := dist.Files.ReadFile(dist.RestartPath)
	ps, _ := dist.ParseUnit(path)
	if got := dist.Values(ps, "Path", "PathChanged"); !slices.Equal(got, []string{dist.SubnetEnvPath}) {
		t.Errorf("the path unit watches %q, want %s", got, dist.SubnetEnvPath)
	}
	dropIn, _ := dist.Files.ReadFile(dist.DockerDropIn)
	ds, _ := dist.ParseUnit(dropIn)
	pre := dist.Values(ds, "Service", "ExecStartPre")
	if !slices.Equal(pre, []string{"/bin/cp /run/leased/subnet.env /run/leased/docker.env"}) {
		t.Fatalf("the drop-in's ExecStartPre= is %q; this test expects it to snapshot subnet.env to /run/leased/docker.env", pre)
	}

	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	os.Mkdir(bin, 0o755)
	calls := filepath.Join(dir, "calls")
	os.WriteFile(filepath.Join(bin, "systemctl"), []byte("#!/bin/sh\necho \"$@\" >> "+calls+"\n"), 0o755)
	argv, err := dist.ExpandCommand(exec1[0], nil)
	if err != nil {
		t.Fatal(err)
	}
	argv[len(argv)-1] = strings.ReplaceAll(argv[len(argv)-1], "/run/leased/", dir+"/")
	run := func() string {
		t.Helper()
		os.Remove(calls)
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Env = []string{"PATH=" + bin + ":/usr/bin:/bin"}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		b, _ := os.ReadFile(calls)
		return strings.TrimSpace(string(b))
	}
	cur, started := filepath.Join(dir, "subnet.env"), filepath.Join(dir, "docker.env")
	os.WriteFile(cur, []byte("LEASED_SUBNET=10.100.15.1/24\n"), 0o644)
	if got := run(); got != "" {
		t.Errorf("dockerd never started, yet: systemctl %s", got)
	}
	os.WriteFile(started, []byte("LEASED_SUBNET=10.100.15.1/24\n"), 0o644)
	if got := run(); got != "" {
		t.Errorf("subnets unchanged, yet: systemctl %s", got)
	}
	os.WriteFile(cur, []byte("LEASED_SUBNET=10.100.16.1/24\n"), 0o644)
	if got := run(); got != "--no-block try-restart docker.service" {
		t.Errorf("subnets changed: systemctl %q, want try-restart of docker.service", got)
	}
}

// The example configs are what Documentation/running.md tells operators to
// store; keep them compact one-liners that etcdctl put takes as they are.
func TestExamplesAreOneLineJSON(t *testing.T) {
	names, _ := fs.Glob(dist.Files, dist.ExamplesGlob)
	for _, n := range names {
		data, _ := dist.Files.ReadFile(n)
		var v map[string]any
		if err := json.Unmarshal(data, &v); err != nil {
			t.Errorf("%s: %v", n, err)
		}
		if bytes.Count(bytes.TrimSpace(data), []byte("\n")) != 0 {
			t.Errorf("%s spans several lines", n)
		}
	}
}

// The unit restarts leased after a transient failure (exit status 1) but
// not after one restarting cannot fix: a usage error (2) or missing
// privileges (backend.PrivilegeExitStatus), which would otherwise restart
// every RestartSec= forever.
func TestUnitDoesNotRestartUnfixableExits(t *testing.T) {
	data, _ := dist.Files.ReadFile(dist.LeasedUnit)
	settings, err := dist.ParseUnit(data)
	if err != nil {
		t.Fatal(err)
	}
	var restart string
	prevent := map[string]bool{}
	for _, s := range settings {
		if s.Section != "Service" {
			continue
		}
		switch s.Key {
		case "Restart":
			restart = s.Value
		case "RestartPreventExitStatus":
			if s.Value == "" {
				clear(prevent)
			}
			for _, f := range strings.Fields(s.Value) {
				prevent[f] = true
			}
		}
	}
	if restart != "always" && restart != "on-failure" {
		t.Errorf("Restart=%s: leased must be restarted after a failure", restart)
	}
	for _, code := range []int{2, backend.PrivilegeExitStatus} {
		if !prevent[strconv.Itoa(code)] {
			t.Errorf("RestartPreventExitStatus= does not list %d", code)
		}
	}
	if prevent["1"] {
		t.Errorf("RestartPreventExitStatus= lists 1, the status of transient failures")
	}
}
