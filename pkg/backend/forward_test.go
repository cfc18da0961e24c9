package backend

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/metrics"
)

// forwardLines is ns's FORWARD chain in bin, rules only.
func forwardLines(t *testing.T, ns, bin string) []string {
	return ruleLines(strings.Split(strings.TrimSpace(testutil.RunIn(t, ns, bin, "-S", "FORWARD")), "\n"))
}

func TestForwarding(t *testing.T) {
	ns, _, ext := hostGWLab(t)
	ctx := context.Background()
	save := func() string {
		return testutil.RunIn(t, ns, "iptables", "-S") + testutil.RunIn(t, ns, "iptables", "-t", "nat", "-S") +
			testutil.RunIn(t, ns, "ip6tables", "-S") + testutil.RunIn(t, ns, "ip6tables", "-t", "nat", "-S")
	}
	// Rules of others already in FORWARD stay above leased's jump.
	testutil.RunIn(t, ns, "iptables", "-A", "FORWARD", "-i", "docker0", "-j", "ACCEPT")
	b := mustNew(t, `{}`, ext, "a", ns, Options{IPMasq: true})
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	first := save()
	for _, want := range []string{
		`-A FORWARD -i docker0 -j ACCEPT`,
		`-A FORWARD -m comment --comment "leased: jump to LEASED-FWD" -j LEASED-FWD`,
		`-A LEASED-FWD -s 10.100.1.0/24 -d 10.100.1.0/24 -m comment --comment "leased: traffic within this host subnet is left to Docker rules" -j RETURN`,
		`-A LEASED-FWD -s 10.100.0.0/16 -m comment --comment "leased: from the cluster network" -j ACCEPT`,
		`-A LEASED-FWD -d 10.100.0.0/16 -m comment --comment "leased: to the cluster network" -j ACCEPT`,
		`-A LEASED-FWD -s fd00:100::/32 -m comment --comment "leased: from the cluster network" -j ACCEPT`,
		`-A POSTROUTING -m comment --comment "leased: jump to LEASED-POSTRTG" -j LEASED-POSTRTG`,
		`-A LEASED-POSTRTG -s 10.100.1.0/24 -d 10.100.0.0/16 -m comment --comment "leased: no NAT inside the cluster network" -j RETURN`,
		`-A LEASED-POSTRTG -s 10.100.1.0/24 -m comment --comment "leased: NAT leaving the cluster network" -j MASQUERADE`,
		`-A LEASED-POSTRTG -s fd00:100:1::/64 -d fd00:100::/32 -m comment --comment "leased: no NAT inside the cluster network" -j RETURN`,
		`-A LEASED-POSTRTG -s fd00:100:1::/64 -d ff00::/8 -m comment --comment "leased: no NAT for multicast" -j RETURN`,
		`-A LEASED-POSTRTG -s fd00:100:1::/64 -m comment --comment "leased: NAT leaving the cluster network" -j MASQUERADE`,
	} {
		if !strings.Contains(first, want+"\n") {
			t.Errorf("missing rule %s", want)
		}
	}
	if got := forwardLines(t, ns, "iptables"); len(got) != 2 || !strings.Contains(got[1], "-j LEASED-FWD") {
		t.Errorf("leased's jump must be appended after the rules already in FORWARD: %q", got)
	}
	for name, want := range map[string]string{"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"} {
		if got := strings.TrimSpace(testutil.RunIn(t, ns, "sysctl", "-n", name)); got != want {
			t.Errorf("%s = %s, want %s", name, got, want)
		}
	}

	// Idempotent: a second Start changes nothing.
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	if again := save(); again != first {
		t.Errorf("second Start changed the rules:\n%s\nvs\n%s", first, again)
	}
	// Someone inserts rules above ours, as dockerd does when it starts:
	// leased's jump stays where it is, once.
	testutil.RunIn(t, ns, "iptables", "-N", "DOCKER-USER")
	testutil.RunIn(t, ns, "iptables", "-I", "FORWARD", "1", "-j", "DOCKER-USER")
	testutil.RunIn(t, ns, "iptables", "-I", "FORWARD", "1", "-j", "DROP")
	before := forwardLines(t, ns, "iptables")
	var changed bool
	if err := b.setupHost(b.k, localA(), &changed); err != nil {
		t.Fatal(err)
	}
	if after := forwardLines(t, ns, "iptables"); changed || !slices.Equal(after, before) {
		t.Errorf("leased moved rules in FORWARD (changed=%v):\n%q\nvs\n%q", changed, before, after)
	}
	// A jump above DOCKER-USER's (what an older leased left) moves below
	// it, and only one remains.
	testutil.RunIn(t, ns, "iptables", "-I", "FORWARD", "1", "-m", "comment", "--comment", "leased: jump to LEASED-FWD", "-j", "LEASED-FWD")
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	fwd := forwardLines(t, ns, "iptables")
	if n := len(fwd); n == 0 || !strings.Contains(fwd[n-1], "-j LEASED-FWD") || strings.Count(strings.Join(fwd, "\n"), "-j LEASED-FWD") != 1 ||
		slices.Index(fwd, "-A FORWARD -j DOCKER-USER") > n-2 {
		t.Errorf("jump is not the single last rule of FORWARD, below DOCKER-USER:\n%q", fwd)
	}

	// Without --ip-masq the NAT chains go away, in both families.
	b2 := mustNew(t, `{}`, ext, "a", ns, Options{})
	if err := b2.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		if nat := testutil.RunIn(t, ns, bin, "-t", "nat", "-S"); strings.Contains(nat, "LEASED-POSTRTG") {
			t.Errorf("%s: NAT chain left without IPMasq:\n%s", bin, nat)
		}
	}

	// --iptables-forward-rules=false: leased's filter chains and jumps go
	// away, everything else in FORWARD stays.
	others := slices.DeleteFunc(forwardLines(t, ns, "iptables"), func(l string) bool { return strings.Contains(l, "LEASED-FWD") })
	b3 := mustNew(t, `{}`, ext, "a", ns, Options{NoForwardRules: true})
	if err := b3.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		if all := testutil.RunIn(t, ns, bin, "-S"); strings.Contains(all, "LEASED-FWD") {
			t.Errorf("%s: LEASED-FWD left with NoForwardRules:\n%s", bin, all)
		}
	}
	if got := forwardLines(t, ns, "iptables"); !slices.Equal(got, others) {
		t.Errorf("FORWARD changed beyond leased's jump: %q, want %q", got, others)
	}
}

// A change of the cluster network replaces LEASED-FWD's rules without a
// moment in which the chain is empty (the FORWARD policy is DROP here, as
// dockerd sets it: an empty chain drops cluster traffic). An observer
// lists the chain as fast as it can while the network flips back and forth.
func TestForwardingSwapNeverEmpty(t *testing.T) {
	ns, _, ext := hostGWLab(t)
	ctx := context.Background()
	b := mustNew(t, `{}`, ext, "a", ns, Options{})
	wide := localA()
	wide.Network.V4, wide.Network.V6 = netip.MustParsePrefix("10.96.0.0/11"), netip.MustParsePrefix("fd00::/16")
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	seen := make(chan string, 1)
	go func() {
		defer close(seen)
		for {
			select {
			case <-stop:
				return
			default:
			}
			out, err := exec.Command("ip", "netns", "exec", ns, "iptables", "-S", "LEASED-FWD").CombinedOutput()
			if err != nil || strings.Count(string(out), "-j ACCEPT") < 2 {
				seen <- string(out)
				return
			}
		}
	}()
	for i := range 40 {
		l := localA()
		if i%2 == 0 {
			l = wide
		}
		if err := b.Start(ctx, l); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	if out, bad := <-seen; bad {
		t.Fatalf("LEASED-FWD was seen without its accept rules during a network change:\n%s", out)
	}
	if got := testutil.RunIn(t, ns, "iptables", "-S", "LEASED-FWD"); !strings.Contains(got, "-s 10.96.0.0/11") && !strings.Contains(got, "-s 10.100.0.0/16") {
		t.Errorf("LEASED-FWD after the changes:\n%s", got)
	}
}

func TestForwardingWithoutIptables(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	err := setupForwarding(netlinkKernel{}, localA(), fwOptions{}, nil)
	if !errors.Is(err, ErrNoIptables) || !strings.Contains(err.Error(), "install the iptables package") {
		t.Fatalf("setupForwarding without iptables = %v, want ErrNoIptables", err)
	}
}

// The periodic resync puts the firewall and sysctl state back: a flushed
// FORWARD chain (the jump gone), a flushed LEASED-FWD, deleted NAT jumps and
// rules (both families) and ip_forward turned off all come back within a
// few resyncs. A rule inserted above leased's jump is left alone.
func TestForwardingRestoredOnResync(t *testing.T) {
	ns, _, ext := hostGWLab(t)
	ctx := context.Background()
	b := mustNew(t, `{}`, ext, "a", ns, Options{IPMasq: true, Resync: 300 * time.Millisecond})
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	runBackend(t, b)
	run := func(args ...string) string { return testutil.RunIn(t, ns, args...) }
	jumps := func(bin, table, parent, chain string) int {
		return strings.Count(run(bin, "-t", table, "-S", parent), "-j "+chain+"\n")
	}
	rules := func(bin, table, chain, target string) int {
		return strings.Count(run(bin, "-t", table, "-S", chain), "-j "+target+"\n")
	}
	repairs := func() float64 {
		var m dto.Metric
		if err := metrics.DriftRepairs.WithLabelValues("forwarding").Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetCounter().GetValue()
	}
	before := repairs()

	run("iptables", "-F", "FORWARD")
	run("iptables", "-F", "LEASED-FWD")
	run("ip6tables", "-I", "FORWARD", "1", "-j", "DROP")
	run("iptables", "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "leased: jump to LEASED-POSTRTG", "-j", "LEASED-POSTRTG")
	run("ip6tables", "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "leased: jump to LEASED-POSTRTG", "-j", "LEASED-POSTRTG")
	run("ip6tables", "-t", "nat", "-D", "LEASED-POSTRTG", "3")
	run("sysctl", "-qw", "net.ipv4.ip_forward=0")
	testutil.Eventually(t, 10*time.Second, "forwarding state restored", func() bool {
		return jumps("iptables", "filter", "FORWARD", "LEASED-FWD") == 1 && rules("iptables", "filter", "LEASED-FWD", "ACCEPT") == 2 &&
			jumps("iptables", "nat", "POSTROUTING", "LEASED-POSTRTG") == 1 && jumps("ip6tables", "nat", "POSTROUTING", "LEASED-POSTRTG") == 1 &&
			rules("ip6tables", "nat", "LEASED-POSTRTG", "MASQUERADE") == 1 &&
			strings.TrimSpace(run("sysctl", "-n", "net.ipv4.ip_forward")) == "1"
	})
	if n := repairs(); n <= before {
		t.Errorf("leased_kernel_drift_repairs_total{kind=\"forwarding\"} is %v, was %v: the repair is not counted", n, before)
	}
	if fwd := forwardLines(t, ns, "ip6tables"); len(fwd) != 2 || fwd[0] != "-A FORWARD -j DROP" {
		t.Errorf("ip6tables FORWARD: the operator's rule must stay first, leased's jump after it: %q", fwd)
	}
}

// The periodic host check of rules that are in place lists each table
// once per family (one iptables run each) and changes nothing; a leased
// rule an operator deleted or changed is put back, a rule of the
// operator's is left alone.
func TestHostCheckRuns(t *testing.T) {
	for _, masq := range []bool{false, true} {
		k := newFakeKernel()
		o := fwOptions{masq: masq, natGone: new([2]bool)}
		if err := setupForwarding(k, localA(), o, nil); err != nil {
			t.Fatal(err)
		}
		want4 := k.ipt[0].dump()
		want6 := k.ipt[1].dump()
		runs := func() int { return k.ipt[0].runs + k.ipt[1].runs }
		before := runs()
		var changed bool
		if err := setupForwarding(k, localA(), o, &changed); err != nil {
			t.Fatal(err)
		}
		// filter and nat, per family: 4 runs; without masquerading the
		// nat table, found without leased's chain, is not listed again:
		// 2 (before: ChainExists, List and the parent's List per kept
		// chain, ChainExists per removed one: 8, and an `iptables
		// --version` per family).
		want := 2
		if masq {
			want = 4
		}
		if n := runs() - before; changed || n != want {
			t.Errorf("masq=%v: a check of rules in place made %d iptables runs (changed=%v), want %d and no change", masq, n, changed, want)
		}

		// An operator deletes one of leased's rules, changes another and
		// adds one of their own.
		fwd := k.ipt[0].chains["filter/"+ForwardChain]
		k.ipt[0].chains["filter/"+ForwardChain] = slices.Delete(slices.Clone(fwd), 1, 2)
		k.ipt[1].chains["filter/"+ForwardChain][0] = strings.Replace(k.ipt[1].chains["filter/"+ForwardChain][0], "ACCEPT", "DROP", 1)
		k.ipt[0].chains["filter/FORWARD"] = append([]string{"-A FORWARD -j DROP"}, k.ipt[0].chains["filter/FORWARD"]...)
		changed = false
		if err := setupForwarding(k, localA(), o, &changed); err != nil {
			t.Fatal(err)
		}
		if !changed {
			t.Errorf("masq=%v: the deleted and changed rules were not reported as restored", masq)
		}
		if got := k.ipt[1].dump(); !slices.Equal(got, want6) {
			t.Errorf("masq=%v: ip6tables after the repair:\n%q\nwant\n%q", masq, got, want6)
		}
		if got, w := k.ipt[0].dump(), append([]string{"filter -A FORWARD -j DROP"}, want4...); !slices.Equal(slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(w))) ||
			k.ipt[0].chains["filter/FORWARD"][0] != "-A FORWARD -j DROP" {
			t.Errorf("masq=%v: iptables after the repair:\n%q\nwant\n%q (the operator's rule first)", masq, got, w)
		}
	}
}

// On a real kernel, with iptables-legacy and iptables-nft as Debian ships
// them (xtables-legacy-multi, xtables-nft-multi): the check of rules in
// place runs iptables/ip6tables four times with --ip-masq (a listing of
// filter and nat per family; before, 14 runs) and twice without (10
// before), and a leased rule an operator
// deleted or changed comes back while the operator's own rule stays first.
func TestHostCheckRunsIptablesVariants(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	for _, multi := range []string{"xtables-legacy-multi", "xtables-nft-multi"} {
		t.Run(multi, func(t *testing.T) {
			real, err := exec.LookPath(multi)
			if err != nil {
				if os.Getenv("CI") != "" {
					t.Fatalf("%s not installed: CI must install iptables (test/deps.sh)", multi)
				}
				t.Skipf("%s not installed", multi)
			}
			// Wrappers that log each run, then run the variant.
			dir := t.TempDir()
			logf := filepath.Join(dir, "runs.log")
			for _, name := range []string{"iptables", "ip6tables", "iptables-restore", "ip6tables-restore"} {
				script := fmt.Sprintf("#!/bin/sh\necho \"%s $*\" >> %s\nexec %s %s \"$@\"\n", name, logf, real, name)
				if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
			ns, _, ext := hostGWLab(t)
			b := mustNew(t, `{}`, ext, "a", ns, Options{IPMasq: true})
			if err := b.Start(ctx, localA()); err != nil {
				t.Fatal(err)
			}
			check := func() (changed bool, runs []string) {
				t.Helper()
				os.Remove(logf)
				if err := b.setupHost(b.k, localA(), &changed); err != nil {
					t.Fatal(err)
				}
				out, _ := os.ReadFile(logf)
				return changed, strings.Fields(strings.ReplaceAll(strings.TrimSpace(string(out)), " ", "_"))
			}
			if changed, runs := check(); changed || len(runs) != 4 {
				t.Errorf("a check of rules in place: changed=%v, %d iptables runs, want no change and 4:\n%s", changed, len(runs), strings.Join(runs, "\n"))
			}

			run := func(args ...string) string { return testutil.RunIn(t, ns, args...) }
			defer func() {
				// Without --ip-masq (the default) the nat table, once
				// found without leased's chain, is not listed again: 2.
				b2 := mustNew(t, `{}`, ext, "a", ns, Options{})
				if err := b2.Start(ctx, localA()); err != nil {
					t.Fatal(err)
				}
				b = b2
				if changed, runs := check(); changed || len(runs) != 2 {
					t.Errorf("a check without --ip-masq: changed=%v, %d iptables runs, want no change and 2:\n%s", changed, len(runs), strings.Join(runs, "\n"))
				}
			}()
			run("iptables", "-D", ForwardChain, "2")
			run("ip6tables", "-t", "nat", "-R", MasqChain, "3", "-s", "fd00:100:1::/64", "-j", "ACCEPT")
			run("iptables", "-I", "FORWARD", "1", "-j", "DROP")
			if changed, _ := check(); !changed {
				t.Error("the deleted and changed rules were not reported as restored")
			}
			if got := strings.Count(run("iptables", "-S", ForwardChain), "-j ACCEPT\n"); got != 2 {
				t.Errorf("iptables %s has %d ACCEPT rules after the repair, want 2", ForwardChain, got)
			}
			nat6 := run("ip6tables", "-t", "nat", "-S", MasqChain)
			if strings.Count(nat6, "-j MASQUERADE\n") != 1 || strings.Contains(nat6, "-j ACCEPT") {
				t.Errorf("ip6tables nat %s after the repair:\n%s", MasqChain, nat6)
			}
			if fwd := forwardLines(t, ns, "iptables"); len(fwd) != 2 || fwd[0] != "-A FORWARD -j DROP" {
				t.Errorf("FORWARD: the operator's rule must stay first, leased's jump after it: %q", fwd)
			}
		})
	}
}
