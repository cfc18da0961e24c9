package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
)

// leased_ready, as an agent's /metrics shows it, and the /readyz answer.
func readiness(h *lab.Host) (metric string, code int, status string, err error) {
	const base = "http://127.0.0.1:9464"
	code, body, err := httpGetIn(h.NS, base+"/metrics")
	if err != nil || code != 200 {
		return "", 0, "", fmt.Errorf("/metrics: %d %v", code, err)
	}
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, "leased_ready "); ok {
			metric = v
		}
	}
	code, status, err = httpGetIn(h.NS, base+"/readyz")
	return metric, code, strings.TrimSpace(status), err
}

// waitReadiness waits until /metrics says leased_ready want and /readyz
// agrees (200 or 503 with a status containing say).
func waitReadiness(t *testing.T, h *lab.Host, what, want, say string) {
	t.Helper()
	testutil.Eventually(t, 30*time.Second, what, func() error {
		m, code, status, err := readiness(h)
		if err != nil {
			return err
		}
		wantCode := 200
		if want == "0" {
			wantCode = 503
		}
		if m != want || code != wantCode || !strings.Contains(status, say) {
			return fmt.Errorf("leased_ready %q, /readyz %d %q; want %s, %d, %q", m, code, status, want, wantCode, say)
		}
		return nil
	})
}

// metrics.md's alert (leased_ready == 0) fires while a running host has
// lost its lease or refuses the config in etcd, and clears when that is
// over: the gauge is not "ready once", it is "serving now".
func TestReadyMetricFollowsLeaseAndConfig(t *testing.T) {
	l := up(t, lab.Config{Backend: "host-gw", Hosts: 2, LeaseTTL: 5 * time.Second, AgentArgs: []string{"--metrics-addr=127.0.0.1:9464"}})
	h1 := l.Hosts[0]
	waitReadiness(t, h1, "ready", "1", "held")

	// A config change host1's lease cannot survive: refused, not ready.
	good := string(l.NetworkConfig())
	if !strings.Contains(good, `"10.100.0.0/16"`) {
		t.Fatalf("the lab's config %s is not on 10.100.0.0/16", good)
	}
	if _, err := l.Client.Put(ctx(t), "/leased/network/config", strings.ReplaceAll(good, `"10.100.`, `"10.200.`)); err != nil {
		t.Fatal(err)
	}
	waitReadiness(t, h1, "not ready while the config is refused", "0", "network config refused")
	if _, err := l.Client.Put(ctx(t), "/leased/network/config", good); err != nil {
		t.Fatal(err)
	}
	waitReadiness(t, h1, "ready with the config back", "1", "held")

	// host1 cut off from etcd for longer than its lease TTL.
	host := strings.TrimPrefix(l.EtcdEndpoint, "http://")
	ip, port := host[:strings.LastIndexByte(host, ':')], host[strings.LastIndexByte(host, ':')+1:]
	rules := [][]string{
		{"OUTPUT", "-p", "tcp", "-d", ip, "--dport", port, "-j", "DROP"},
		{"INPUT", "-p", "tcp", "-s", ip, "--sport", port, "-j", "DROP"},
	}
	iptables := func(op string) {
		for _, rule := range rules {
			args := append([]string{"netns", "exec", h1.NS, "iptables", "-w", op}, rule...)
			if out, err := runCmd("ip", args...); err != nil {
				t.Fatalf("iptables in %s: %v: %s", h1.Name, err, out)
			}
		}
	}
	iptables("-I")
	cut := true
	t.Cleanup(func() {
		if cut {
			iptables("-D")
		}
	})
	waitReadiness(t, h1, "not ready after the lease is lost", "0", "lease lost")
	iptables("-D")
	cut = false
	waitReadiness(t, h1, "ready once the lease is claimed again", "1", "held")
}
