package main

// The alerting rules of dist/prometheus/leased-rules.yml, evaluated by
// promtool on what a real agent exposes: the agent runs as a process in a
// network namespace of its own, with the host-gw backend programming that
// namespace's kernel, against a real etcd. The test drives it into each
// state an alert describes, scrapes its /metrics there, and hands promtool
// the scrape before and the scrape in the state as input series, with the
// alerts expected: exactly those of the state fire, and none fires on a
// healthy agent.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"text/template"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"sigs.k8s.io/yaml"

	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/nsutil"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/lease"
)

const rulesFile = "../../dist/prometheus/leased-rules.yml"

// scrape is one /metrics answer: the value of every leased_* counter and
// gauge series, by series name as promtool writes it (labels sorted).
type scrape map[string]float64

// scrapeAgent reads /metrics from addr inside network namespace ns.
func scrapeAgent(ns, addr string) (scrape, error) {
	var conn net.Conn
	err := nsutil.Do("/var/run/netns/"+ns, func() error {
		var err error
		conn, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n", addr)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("/metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, err
	}
	s := scrape{}
	for name, f := range fams {
		if !strings.HasPrefix(name, "leased_") {
			continue
		}
		for _, m := range f.Metric {
			var v float64
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				v = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				v = m.GetGauge().GetValue()
			default:
				continue // histograms: no rule reads them
			}
			labels := []string{`instance="agent:9464"`, `job="leased"`}
			for _, l := range m.Label {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			sort.Strings(labels)
			s[name+"{"+strings.Join(labels, ",")+"}"] = v
		}
	}
	return s, nil
}

// get returns the value of the series of metric name whose labels include
// all of the "k=\"v\"" strings in match (-1 when there is none).
func (s scrape) get(name string, match ...string) float64 {
	for k, v := range s {
		if !strings.HasPrefix(k, name+"{") {
			continue
		}
		ok := true
		for _, m := range match {
			ok = ok && strings.Contains(k, m)
		}
		if ok {
			return v
		}
	}
	return -1
}

// rule is an alerting rule of the rules file.
type rule struct {
	Alert       string            `json:"alert"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
}

func loadRules(t *testing.T) []rule {
	t.Helper()
	data, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []struct {
			Rules []rule `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.Unmarshal(data, &f); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	var out []rule
	for _, g := range f.Groups {
		out = append(out, g.Rules...)
	}
	return out
}

// expected is the alert promtool should report for r on the test's
// target: the target's labels, the rule's, and its annotations expanded
// as Prometheus does (they use only $labels).
func (r rule) expected(t *testing.T) map[string]any {
	labels := map[string]string{"instance": "agent:9464", "job": "leased"}
	for k, v := range r.Labels {
		labels[k] = v
	}
	ann := map[string]string{}
	for k, v := range r.Annotations {
		tmpl, err := template.New(k).Option("missingkey=zero").Parse("{{$labels := .Labels}}" + v)
		if err != nil {
			t.Fatalf("%s: annotation %s: %v", r.Alert, k, err)
		}
		var b bytes.Buffer
		if err := tmpl.Execute(&b, map[string]any{"Labels": labels}); err != nil {
			t.Fatalf("%s: annotation %s: %v", r.Alert, k, err)
		}
		ann[k] = b.String()
	}
	return map[string]any{"exp_labels": labels, "exp_annotations": ann}
}

// state is one scenario: the scrape just before the agent entered it, the
// scrape in it, and the alerts that must fire.
type state struct {
	name          string
	before, after scrape
	fire          []string
}

// Before and after are held for these many minutes each (samples one
// minute apart); alerts are evaluated evalAt minutes in, long enough
// after the change for every rule's `for` and within the 15m windows.
const (
	beforeMinutes = 10
	afterMinutes  = 20
	evalAt        = "20m"
)

// series writes before's value beforeMinutes times then after's, "_"
// where the scrape lacks the series.
func series(before, after scrape) []map[string]string {
	names := map[string]bool{}
	for k := range before {
		names[k] = true
	}
	for k := range after {
		names[k] = true
	}
	var out []map[string]string
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range names {
			if !yield(k) {
				return
			}
		}
	}) {
		var vals []string
		for i, s := range []scrape{before, after} {
			n := beforeMinutes
			if i == 1 {
				n = afterMinutes + 1
			}
			v := "_"
			if x, ok := s[k]; ok {
				v = fmt.Sprint(x)
			}
			for range n {
				vals = append(vals, v)
			}
		}
		out = append(out, map[string]string{"series": k, "values": strings.Join(vals, " ")})
	}
	return out
}

// Each alert in dist/prometheus/leased-rules.yml fires on the metrics a
// real agent exposes in the state it describes, and only those alerts do:
// none on a healthy agent (at the start, and again after every state is
// over), LeasedKernelDrift after a route of leased is deleted,
// LeasedPeersRejected while a malformed peer lease is in etcd,
// LeasedNotReady while the config in etcd is refused,
// LeasedEtcdUnreachable while etcd is stopped, all three of
// LeasedEtcdUnreachable, LeasedLeaseLost and LeasedNotReady once etcd has
// been away for longer than the lease TTL, and LeasedLeaseLost alone once
// etcd is back and the host ready again.
func TestAlertRulesFireOnAgentMetrics(t *testing.T) {
	testutil.RequireRoot(t)
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not found: test/deps.sh installs it (Debian package prometheus): %v", err)
	}
	if out, err := exec.Command(promtool, "check", "rules", rulesFile).CombinedOutput(); err != nil {
		t.Fatalf("promtool check rules %s: %v\n%s", rulesFile, err, out)
	}
	rules := loadRules(t)
	ns := testutil.UplinkNS(t, "alerts", "192.0.2.1/24")
	c, err := etcdserver.StartCluster(t.TempDir(), 1, etcdserver.ClusterOptions{Unix: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	m := c.Members[0]
	cli := etcdtest.Client(t, m.ClientURL)
	good := `{"Network":"10.100.0.0/16","Backend":{"Type":"host-gw"}}`
	etcdtest.Put(t, cli, cfgKey, good)
	const metricsAddr = "127.0.0.1:9464"
	p := startLeased(t, ns, nil, agentArgs(t, "agent", "--etcd-endpoints="+m.UnixURL,
		"--metrics-addr="+metricsAddr, "--lease-ttl=30s")...)

	// waitFor scrapes until cond holds, and returns that scrape.
	waitFor := func(what string, cond func(s scrape) bool) scrape {
		t.Helper()
		deadline := time.Now().Add(90 * time.Second)
		var last scrape
		var err error
		for time.Now().Before(deadline) {
			if code := p.wait(0); code != -1 {
				t.Fatalf("the agent exited (status %d) waiting for %s:\n%s", code, what, p.log)
			}
			if last, err = scrapeAgent(ns, metricsAddr); err == nil && cond(last) {
				return last
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Fatalf("timed out waiting for %s (last scrape %v, error %v):\n%s", what, last, err, p.log)
		return nil
	}
	settled := func(s scrape) bool {
		return s.get("leased_ready") == 1 && s.get("leased_etcd_reachable") == 1 && s.get("leased_peers_rejected") == 0
	}

	// A peer on eth0's link, so that the agent has a route to lose.
	waitFor("the agent to be ready", settled)
	resp, err := cli.Get(context.Background(), lease.NewKeys("").Lease("agent"))
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("the agent has no lease record (%v):\n%s", err, p.log)
	}
	own, err := lease.DecodeRecord("agent", resp.Kvs[0].Value)
	if err != nil {
		t.Fatal(err)
	}
	peerNet := "10.100.77.0/24"
	if own.Subnet.V4.String() == peerNet {
		peerNet = "10.100.78.0/24"
	}
	etcdtest.Put(t, cli, lease.NewKeys("").Lease("peer"), fmt.Sprintf(`{"Node":"peer","Subnet":%q,"PublicIP":"192.0.2.2","BackendType":"host-gw"}`, peerNet))
	routed := func(s scrape) bool { return settled(s) && s.get("leased_peers_programmed") == 1 }
	var states []state

	h0 := waitFor("the peer to be programmed", routed)
	time.Sleep(2 * time.Second)
	states = append(states, state{name: "healthy", before: h0, after: waitFor("a second healthy scrape", routed)})

	// Kernel drift: the route to the peer deleted behind leased's back.
	before := waitFor("a healthy agent", routed)
	if out, err := exec.Command("ip", "-n", ns, "route", "del", peerNet).CombinedOutput(); err != nil {
		t.Fatalf("ip route del %s: %v %s", peerNet, err, out)
	}
	after := waitFor("the route to be restored", func(s scrape) bool {
		return routed(s) && s.get("leased_kernel_drift_repairs_total", `kind="route"`) > before.get("leased_kernel_drift_repairs_total", `kind="route"`)
	})
	states = append(states, state{"route deleted outside leased", before, after, []string{"LeasedKernelDrift"}})

	// A malformed peer lease.
	before = waitFor("a healthy agent", routed)
	etcdtest.Put(t, cli, lease.NewKeys("").Lease("broken"), `{"Node":"broken","Subnet":`)
	after = waitFor("the malformed lease to be rejected", func(s scrape) bool { return s.get("leased_peers_rejected") == 1 })
	states = append(states, state{"malformed peer lease", before, after, []string{"LeasedPeersRejected"}})
	etcdtest.Delete(t, cli, lease.NewKeys("").Lease("broken"))

	// A config this host refuses: its subnet is outside the new network.
	before = waitFor("a healthy agent", routed)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.200.0.0/16","Backend":{"Type":"host-gw"}}`)
	after = waitFor("the config to be refused", func(s scrape) bool { return s.get("leased_ready") == 0 })
	states = append(states, state{"config refused", before, after, []string{"LeasedNotReady"}})
	etcdtest.Put(t, cli, cfgKey, good)

	// etcd stopped: first unreachable only, then, after the lease TTL,
	// the lease is lost and the host not ready.
	before = waitFor("a healthy agent", routed)
	m.Stop()
	after = waitFor("etcd to be unreachable", func(s scrape) bool { return s.get("leased_etcd_reachable") == 0 })
	states = append(states, state{"etcd stopped", before, after, []string{"LeasedEtcdUnreachable"}})
	after = waitFor("the lease to be lost", func(s scrape) bool {
		return s.get("leased_ready") == 0 && s.get("leased_lease_failures_total", `reason="lost"`) > before.get("leased_lease_failures_total", `reason="lost"`)
	})
	states = append(states, state{"etcd away for longer than the lease TTL", before, after,
		[]string{"LeasedEtcdUnreachable", "LeasedLeaseLost", "LeasedNotReady"}})
	stopped := before
	if err := m.Restart(); err != nil {
		t.Fatal(err)
	}
	// etcd back: the host claimed its lease again and is ready, but the
	// lost lease is worth an alert for a while.
	after = waitFor("the agent to be ready again", routed)
	states = append(states, state{"etcd back after an outage longer than the lease TTL", stopped, after, []string{"LeasedLeaseLost"}})

	// Healthy again: the counters stay where the states left them.
	before = after
	time.Sleep(2 * time.Second)
	states = append(states, state{name: "healthy again", before: before, after: waitFor("a second healthy scrape", routed)})

	// The promtool test file: one test per state, every rule evaluated.
	abs, err := filepath.Abs(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var tests []any
	for _, s := range states {
		var checks []any
		for _, r := range rules {
			exp := []any{}
			if slices.Contains(s.fire, r.Alert) {
				exp = append(exp, r.expected(t))
			}
			checks = append(checks, map[string]any{"eval_time": evalAt, "alertname": r.Alert, "exp_alerts": exp})
		}
		tests = append(tests, map[string]any{"name": s.name, "interval": "1m",
			"input_series": series(s.before, s.after), "alert_rule_test": checks})
	}
	for _, s := range states {
		for _, a := range s.fire {
			if !slices.ContainsFunc(rules, func(r rule) bool { return r.Alert == a }) {
				t.Fatalf("state %q expects alert %s, which %s lacks", s.name, a, rulesFile)
			}
		}
	}
	for _, r := range rules {
		if !slices.ContainsFunc(states, func(s state) bool { return slices.Contains(s.fire, r.Alert) }) {
			t.Errorf("no state shows that %s fires: add one", r.Alert)
		}
	}
	doc, err := json.MarshalIndent(map[string]any{"rule_files": []string{abs}, "evaluation_interval": "1m", "tests": tests}, "", " ")
	if err != nil {
		t.Fatal(err)
	}
	testFile := filepath.Join(t.TempDir(), "leased-rules.test.yml")
	if err := os.WriteFile(testFile, doc, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(promtool, "test", "rules", testFile).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool test rules: %v\n%s\nthe test file:\n%s", err, out, doc)
	}
	t.Logf("promtool test rules: %s", out)
}

// putKey and delKey write and delete a key straight in etcd, as a broken
// or hostile client could.
