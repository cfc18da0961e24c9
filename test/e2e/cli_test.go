package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/nsutil"
	"github.com/leased/leased/internal/testutil"
)

// cli runs the leased binary with args (in namespace ns when not empty)
// and returns its combined output and exit code.
func cli(t *testing.T, ns string, args ...string) (string, int) {
	t.Helper()
	var cmd *exec.Cmd
	if ns == "" {
		cmd = exec.Command(binary, args...)
	} else {
		cmd = exec.Command("ip", append([]string{"netns", "exec", ns, binary}, args...)...)
	}
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("running leased %v: %v", args, err)
	}
	return string(out), code
}

func etcdFlag(l *lab.Lab) string {
	return "--etcd-endpoints=unix://" + filepath.Join(l.Cfg.Dir, "etcd.sock")
}

func TestCLILeasesAndConfig(t *testing.T) {
	l := up(t, lab.Config{Hosts: 3, Dir: t.TempDir()})
	out, code := cli(t, "", "leases", etcdFlag(l))
	if code != 0 {
		t.Fatalf("leased leases: exit %d: %s", code, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "NODE") {
		t.Fatalf("table:\n%s", out)
	}
	for i, h := range l.Hosts {
		env, _ := h.Env()
		f := strings.Fields(lines[i+1])
		if f[0] != h.Name || f[1] != env.Subnet.V4.String() || f[2] != env.Subnet.V6.String() || f[3] != h.Addr4.String() || f[5] != "host-gw" {
			t.Errorf("row %q does not show %s with %s %s %s", lines[i+1], h.Name, env.Subnet.V4, env.Subnet.V6, h.Addr4)
		}
	}
	out, code = cli(t, "", "leases", "-o", "json", etcdFlag(l))
	var rows []struct {
		Node, Subnet, IPv6Subnet, PublicIP string
		ExpiresIn                          int64 `json:"expiresInSeconds"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &rows) != nil || len(rows) != 3 {
		t.Fatalf("leases -o json: exit %d:\n%s", code, out)
	}
	for i, r := range rows {
		env, _ := l.Hosts[i].Env()
		if r.Node != l.Hosts[i].Name || r.Subnet != env.Subnet.V4.String() || r.IPv6Subnet != env.Subnet.V6.String() || r.ExpiresIn <= 0 || r.ExpiresIn > 30 {
			t.Errorf("json row %+v, want %s %s %s expiring within the 30s TTL", r, l.Hosts[i].Name, env.Subnet.V4, env.Subnet.V6)
		}
	}

	// validate and put: a bad file never reaches etcd.
	dir := t.TempDir()
	good := filepath.Join(dir, "good.json")
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(good, []byte(`{"Network":"10.100.0.0/16","IPv6Network":"2001:db8:cd11::/48","Backend":{"Type":"host-gw"}}`), 0o644)
	os.WriteFile(bad, []byte(`{"Network":"10.100.1.0/16"}`), 0o644)
	if out, code := cli(t, "", "config", "validate", good); code != 0 {
		t.Errorf("validate good: exit %d: %s", code, out)
	}
	out, code = cli(t, "", "config", "validate", bad)
	if code != 1 || !strings.Contains(out, "Network") || !strings.Contains(out, "10.100.0.0/16") {
		t.Errorf("validate bad: exit %d, output should name the field and the fix: %s", code, out)
	}
	before, _ := cli(t, "", "config", "get", etcdFlag(l))
	if out, code := cli(t, "", "config", "put", etcdFlag(l), bad); code != 1 {
		t.Errorf("put bad: exit %d: %s", code, out)
	}
	if after, _ := cli(t, "", "config", "get", etcdFlag(l)); after != before {
		t.Errorf("a bad put changed etcd:\n%s\nto\n%s", before, after)
	}
	if out, code := cli(t, "", "config", "put", etcdFlag(l), good); code != 0 {
		t.Errorf("put good: exit %d: %s", code, out)
	}
	if after, _ := cli(t, "", "config", "get", etcdFlag(l)); !strings.Contains(after, `"2001:db8:cd11::/48"`) || strings.Contains(after, "IPv6SubnetLen") {
		t.Errorf("config get after put:\n%s", after)
	}
	// Friendly error when etcd is unreachable.
	out, code = cli(t, "", "leases", "--etcd-endpoints=http://127.0.0.1:1")
	if code != 1 || !strings.Contains(out, "check that it runs") {
		t.Errorf("unreachable etcd: exit %d: %s", code, out)
	}
}

// On a converged host-gw host `leased status` says the kernel matches;
// with the agent stopped, a route deleted and one of leased's protocol
// added by hand are each named.
func TestCLIStatusSeesDrift(t *testing.T) {
	l := up(t, lab.Config{Hosts: 2})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	statusClean(t, l, h1)
	// Stop the agent so that it cannot repair, then change routes by hand.
	if err := l.StopAgent(h1, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	env2, _ := h2.Env()
	mustIP(t, h1, "route", "del", env2.Subnet.V4.String())
	mustIP(t, h1, "route", "add", "10.100.251.0/24", "via", h2.Addr4.String(), "proto", "76")
	statusNames(t, l, h1,
		"missing  route "+env2.Subnet.V4.String()+" via "+h2.Addr4.String(),
		"extra    route 10.100.251.0/24 via "+h2.Addr4.String())
}

// httpGetIn fetches url from inside network namespace ns.
func httpGetIn(ns, url string) (int, string, error) {
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := nsutil.Do("/var/run/netns/"+ns, func() (err error) {
			c, err = (&net.Dialer{Timeout: 2 * time.Second}).DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

func TestHealthAndMetricsEndpoints(t *testing.T) {
	l := up(t, lab.Config{Hosts: 2, AgentArgs: []string{"--metrics-addr=127.0.0.1:9464"}})
	h1 := l.Hosts[0]
	base := "http://127.0.0.1:9464"
	testutil.Eventually(t, 10*time.Second, "ready", func() error {
		code, body, err := httpGetIn(h1.NS, base+"/readyz")
		if err != nil || code != 200 {
			return fmt.Errorf("readyz %d %q %v", code, body, err)
		}
		return nil
	})
	code, body, err := httpGetIn(h1.NS, base+"/metrics")
	if err != nil || code != 200 {
		t.Fatalf("metrics: %d %v", code, err)
	}
	for _, want := range []string{"leased_peers_known 1", "leased_peers_programmed 1", "leased_ready 1",
		"leased_reconcile_duration_seconds_count", "go_goroutines", "process_resident_memory_bytes"} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	// Not ready while the config is missing; ready once it is back.
	if err := l.StopAgent(h1, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	cfg := l.NetworkConfig()
	if _, err := l.Client.Delete(ctx(t), "/leased/network/config"); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgent(h1); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "not ready without config", func() error {
		code, body, err := httpGetIn(h1.NS, base+"/readyz")
		if err != nil || code != 503 || !strings.Contains(body, "config") {
			return fmt.Errorf("readyz %d %q %v", code, body, err)
		}
		if code, _, _ := httpGetIn(h1.NS, base+"/healthz"); code != 200 {
			return fmt.Errorf("healthz %d", code)
		}
		return nil
	})
	if _, err := l.Client.Put(ctx(t), "/leased/network/config", string(cfg)); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "ready after config", func() error {
		if code, body, err := httpGetIn(h1.NS, base+"/readyz"); err != nil || code != 200 {
			return fmt.Errorf("readyz %d %q %v", code, body, err)
		}
		return nil
	})
}

// The README's first command end to end: `leased lab` (which runs the
// leased-lab binary next to leased) brings up two hosts with a real etcd,
// prints the leases and both connectivity matrices, finds every container
// reachable, and tears everything down.
func TestLabCommand(t *testing.T) {
	labBin := filepath.Join(filepath.Dir(binary), "leased-lab")
	if out, err := exec.Command("go", "build", "-o", labBin, "../../cmd/leased-lab").CombinedOutput(); err != nil {
		t.Fatalf("building leased-lab: %v\n%s", err, out)
	}
	before := netnsList(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, binary, "lab", "--hosts", "2").CombinedOutput()
	if err != nil {
		t.Fatalf("leased lab: %v\n%s", err, out)
	}
	for _, want := range []string{"leases in etcd", "IPv4 connectivity", "IPv6 connectivity",
		"lab: every container reaches every other container", "lab: torn down"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("leased lab output lacks %q:\n%s", want, out)
		}
	}
	if after := netnsList(t); after != before {
		t.Errorf("namespaces left behind: before %q, after %q", before, after)
	}
}

func netnsList(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	return string(out)
}
