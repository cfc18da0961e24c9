package systemd_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/testutil"
)

// preinstalled returns a machine tree with leased installed from deb,
// configured for the lab's etcd, the docker drop-in in place and
// docker.service enabled, as on a host that reboots: an overlay on root,
// prepared with systemd-nspawn (not booted), unmounted when the test ends.
func preinstalled(t *testing.T, root, deb string) string {
	t.Helper()
	ctx := context.Background()
	d := t.TempDir()
	upper, work, merged := filepath.Join(d, "upper"), filepath.Join(d, "work"), filepath.Join(d, "merged")
	for _, p := range []string{upper, work, merged} {
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mustRun(t, ctx, "mount", "-t", "overlay", "overlay", "-o", "lowerdir="+root+",upperdir="+upper+",workdir="+work, merged)
	t.Cleanup(func() { exec.Command("umount", "-l", merged).Run() })
	setup := strings.Join([]string{
		"set -e",
		"dpkg -i /root/leased.deb >/dev/null",
		"printf 'LEASED_ETCD_ENDPOINTS=http://10.77.0.1:2379\\nLEASED_IFACE=eth0\\n' > /etc/default/leased",
		"mkdir -p /etc/systemd/system/docker.service.d",
		"cp /usr/share/doc/leased/examples/10-leased.conf /etc/systemd/system/docker.service.d/",
		"systemctl enable docker.service leased.service >/dev/null 2>&1",
	}, "\n")
	cmd := exec.Command("systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--directory="+merged,
		"--bind-ro="+deb+":/root/leased.deb", "/bin/sh", "-c", setup)
	cmd.Env = append(os.Environ(), "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("installing leased into the machine tree: %v\n%s", err, out)
	}
	return merged
}

// TestBootWithEtcdDown boots a machine that has leased and docker enabled
// while etcd is down, and checks what Documentation/running.md says about
// it ("Booting while etcd is unreachable"):
//   - leased waits, and `systemctl status leased` shows why in STATUS=;
//   - docker.service waits for leased (it never starts on its default
//     subnets), and so does multi-user.target, which waits for
//     docker.service: `systemctl is-system-running` says starting, while
//     the machine itself runs and answers;
//   - once etcd is back, leased becomes ready, then dockerd starts with
//     leased's subnets, and the boot completes.
func TestBootWithEtcdDown(t *testing.T) {
	testutil.RequireRoot(t)
	root := unpackImage(t)
	dir := t.TempDir()
	deb := buildDeb(t, dir, "1.0.0+boot")
	tag := randomTag()
	l := newLAN(t, tag)
	e := startEtcd(t, l)
	putConfig(t, l, filepath.Join(dir, "leased"), `{"Network":"10.100.0.0/16","IPv6Network":"fd10:100::/48","IPv6SubnetLen":80,"Backend":{"Type":"host-gw"}}`)
	e.stop()
	tree := preinstalled(t, root, deb)

	m := bootUntil(t, l, tag, 1, tree, nil, func(state string) bool { return state == "starting" })
	// leased says why it waits, in STATUS= (systemctl status leased).
	deadline := time.Now().Add(40 * time.Second)
	for {
		st := m.show("leased.service", "StatusText")
		if strings.HasPrefix(st, "waiting for etcd: ") && strings.Contains(st, "not reachable") {
			t.Logf("leased's STATUS= while etcd is down: %q", st)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("leased's STATUS= does not say why it waits for etcd within 40s of boot: %q", st)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if st := m.show("leased.service", "ActiveState"); st != "activating" {
		t.Errorf("leased.service is %s while etcd is down, want activating", st)
	}
	if st := m.show("docker.service", "ActiveState"); st == "active" {
		t.Errorf("docker.service is active while leased waits for etcd: dockerd started without leased's subnets")
	}
	if st, _ := m.sh(10*time.Second, "systemctl is-system-running"); strings.TrimSpace(st) != "starting" {
		t.Errorf("systemctl is-system-running says %q while leased waits, want starting", strings.TrimSpace(st))
	}
	if jobs := m.must("systemctl list-jobs --no-legend"); !strings.Contains(jobs, "docker.service") || !strings.Contains(jobs, "multi-user.target") {
		t.Errorf("want queued start jobs of docker.service and multi-user.target while leased waits:\n%s", jobs)
	}

	e.start()
	deadline = time.Now().Add(90 * time.Second)
	for m.show("docker.service", "ActiveState") != "active" {
		if time.Now().After(deadline) {
			t.Fatalf("docker.service not active within 90s of etcd's return; leased is %s (%s)", m.show("leased.service", "ActiveState"), m.show("leased.service", "StatusText"))
		}
		time.Sleep(500 * time.Millisecond)
	}
	leasedActive := usec(t, m.show("leased.service", "ActiveEnterTimestampMonotonic"))
	dockerStart := usec(t, m.show("docker.service", "ExecMainStartTimestampMonotonic"))
	if dockerStart < leasedActive {
		t.Errorf("dockerd started at %dµs, before leased was ready at %dµs", dockerStart, leasedActive)
	}
	env := m.must("cat /run/leased/subnet.env")
	if args := m.must("ps -o args= -C dockerd"); !containsArg(args, "--fixed-cidr-v6="+docker0Value(env, "LEASED_SUBNET6")) {
		t.Errorf("dockerd runs as %q, not with leased's IPv6 subnet (subnet.env:\n%s)", args, env)
	}
	for {
		st, _ := m.sh(10*time.Second, "systemctl is-system-running")
		if s := strings.TrimSpace(st); s == "running" || s == "degraded" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the boot did not complete after etcd came back: %q", strings.TrimSpace(st))
		}
		time.Sleep(500 * time.Millisecond)
	}
}
