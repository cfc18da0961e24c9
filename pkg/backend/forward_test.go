package backend

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestForwarding(t *testing.T) {
	ns, _, ext := hostGWLab(t)
	ctx := context.Background()
	save := func() string {
		return sh(t, "ip", "netns", "exec", ns, "iptables", "-S") + sh(t, "ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S") +
			sh(t, "ip", "netns", "exec", ns, "ip6tables", "-S") + sh(t, "ip", "netns", "exec", ns, "ip6tables", "-t", "nat", "-S")
	}
	b := mustNew(t, `{}`, ext, "a", ns, Options{IPMasq: true})
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	first := save()
	for _, want := range []string{
		`-A FORWARD -m comment --comment "leased: jump to LEASED-FWD" -j LEASED-FWD`,
		`-A LEASED-FWD -s 10.100.0.0/16 -m comment --comment "leased: from the cluster network" -j ACCEPT`,
		`-A LEASED-FWD -d 10.100.0.0/16 -m comment --comment "leased: to the cluster network" -j ACCEPT`,
		`-A LEASED-FWD -s fd00:100::/32 -m comment --comment "leased: from the cluster network" -j ACCEPT`,
		`-A POSTROUTING -m comment --comment "leased: jump to LEASED-POSTRTG" -j LEASED-POSTRTG`,
		`-A LEASED-POSTRTG -s 10.100.1.0/24 -d 10.100.0.0/16 -m comment --comment "leased: no NAT inside the cluster network" -j RETURN`,
		`-A LEASED-POSTRTG -s 10.100.1.0/24 -m comment --comment "leased: NAT leaving the cluster network" -j MASQUERADE`,
	} {
		if !strings.Contains(first, want+"\n") {
			t.Errorf("missing rule %s", want)
		}
	}
	if strings.Count(first, "LEASED-POSTRTG") != 6 { // -N, jump, 3 rules... in IPv4 nat only
		t.Errorf("IPv6 must never be NATed and the chain must appear once:\n%s", first)
	}
	for name, want := range map[string]string{"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"} {
		if got := strings.TrimSpace(sh(t, "ip", "netns", "exec", ns, "sysctl", "-n", name)); got != want {
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
	// Someone inserts a rule above ours: the jump moves back to the top.
	sh(t, "ip", "netns", "exec", ns, "iptables", "-I", "FORWARD", "1", "-j", "DROP")
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	fwd := sh(t, "ip", "netns", "exec", ns, "iptables", "-S", "FORWARD")
	if lines := strings.Split(fwd, "\n"); len(lines) < 3 || !strings.Contains(lines[1], "-j LEASED-FWD") || strings.Count(fwd, "-j LEASED-FWD") != 1 {
		t.Errorf("jump is not the single first rule of FORWARD:\n%s", fwd)
	}

	// Without --ip-masq the NAT chain goes away.
	b2 := mustNew(t, `{}`, ext, "a", ns, Options{})
	if err := b2.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	if nat := sh(t, "ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S"); strings.Contains(nat, "LEASED-POSTRTG") {
		t.Errorf("NAT chain left without IPMasq:\n%s", nat)
	}
}

func TestForwardingWithoutIptables(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	err := setupForwarding(localA(), false, nil)
	if !errors.Is(err, ErrNoIptables) || !strings.Contains(err.Error(), "install the iptables package") {
		t.Fatalf("setupForwarding without iptables = %v, want ErrNoIptables", err)
	}
}

// The periodic resync puts the firewall and sysctl state back: a flushed
// FORWARD chain (the jump gone), a flushed LEASED-FWD, a rule inserted above
// the jump and ip_forward turned off all come back within a few resyncs.
func TestForwardingRestoredOnResync(t *testing.T) {
	ns, _ := resyncingHostGW(t)
	ipt := func(args ...string) string { return sh(t, append([]string{"ip", "netns", "exec", ns}, args...)...) }
	jumpFirst := func(bin string) bool {
		lines := strings.Split(ipt(bin, "-S", "FORWARD"), "\n")
		return len(lines) > 1 && strings.Contains(lines[1], "-j LEASED-FWD")
	}
	chainFull := func(bin string) bool { return strings.Count(ipt(bin, "-S", "LEASED-FWD"), "-j ACCEPT") == 2 }

	ipt("iptables", "-F", "FORWARD")
	ipt("iptables", "-F", "LEASED-FWD")
	ipt("ip6tables", "-I", "FORWARD", "1", "-j", "DROP")
	ipt("sysctl", "-qw", "net.ipv4.ip_forward=0")
	eventually(t, 5*time.Second, "forwarding state restored", func() bool {
		return jumpFirst("iptables") && chainFull("iptables") && jumpFirst("ip6tables") &&
			strings.TrimSpace(ipt("sysctl", "-n", "net.ipv4.ip_forward")) == "1"
	})
}
