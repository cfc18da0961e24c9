package backend

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/testutil"
)

// As root, in a fresh namespace, every backend type and family passes the
// check, and the check changes nothing: forwarding stays off, accept_ra
// stays 1, no device appears and iptables holds no chain of leased's.
func TestCheckPrivilegesAsRootChangesNothing(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.NewNS(t, "priv")
	testutil.Run(t, "ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	testutil.RunIn(t, ns, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=1", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0")
	h := testutil.NSHandle(t, ns)
	ext := extOf(t, h, "eth0", "", "")
	snapshot := func() string {
		return testutil.RunIn(t, ns, "sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.eth0.accept_ra") +
			testutil.Run(t, "ip", "-n", ns, "-o", "link") +
			testutil.RunIn(t, ns, "iptables-save") + testutil.RunIn(t, ns, "ip6tables-save")
	}
	before := snapshot()
	for _, typ := range []string{TypeHostGW, TypeVXLAN, TypeProxyNDP} {
		for _, fam := range []struct{ v4, v6 bool }{{true, false}, {false, true}, {true, true}} {
			if err := CheckPrivileges(typ, ext, fam.v4, fam.v6, Options{NetNS: testutil.NSPath(ns)}); err != nil {
				t.Errorf("%s v4=%v v6=%v: %v", typ, fam.v4, fam.v6, err)
			}
		}
	}
	if after := snapshot(); after != before {
		t.Errorf("the check changed the namespace:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// The packet socket matters only to proxy-ndp.
func TestPrivilegesCheckPicksRelevantProblems(t *testing.T) {
	p := privileges{
		sysctl: []string{"cannot write the sysctl net.ipv4.ip_forward"},
		packet: errors.New("CAP_NET_RAW is missing"),
	}
	for _, tc := range []struct {
		typ  string
		want []string
	}{
		{TypeHostGW, []string{"net.ipv4.ip_forward"}},
		{TypeVXLAN, []string{"net.ipv4.ip_forward"}},
		{TypeProxyNDP, []string{"net.ipv4.ip_forward", "CAP_NET_RAW"}},
	} {
		err := p.check(tc.typ)
		var pe *PrivilegeError
		if !errors.As(err, &pe) || len(pe.Problems) != len(tc.want) {
			t.Errorf("%s: %v, want %d problems %q", tc.typ, err, len(tc.want), tc.want)
			continue
		}
		for i, w := range tc.want {
			if !strings.Contains(pe.Problems[i], w) || !strings.Contains(err.Error(), "the "+tc.typ+" backend cannot") {
				t.Errorf("%s: problem %d %q, want one about %q", tc.typ, i, pe.Problems[i], w)
			}
		}
	}
	if err := (&privileges{packet: errors.New("CAP_NET_RAW is missing")}).check(TypeHostGW); err != nil {
		t.Errorf("host-gw needs no packet socket, got %v", err)
	}
}

// iptables-legacy is recognised through its symlinks; as root its raw
// socket and lock file are allowed, and iptables-nft needs nothing beyond
// CAP_NET_ADMIN.
func TestProbeIptablesVariants(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tc := range []struct{ multi string }{{"xtables-legacy-multi"}, {"xtables-nft-multi"}} {
		real := ""
		for _, d := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
			if _, err := os.Stat(filepath.Join(d, tc.multi)); err == nil {
				real = filepath.Join(d, tc.multi)
				break
			}
		}
		if real == "" {
			t.Logf("%s not installed", tc.multi)
			continue
		}
		dir := t.TempDir()
		if err := os.Symlink(real, filepath.Join(dir, "iptables")); err != nil {
			t.Fatal(err)
		}
		t.Setenv("PATH", dir)
		if got := probeIptables("iptables", unix.AF_INET); len(got) != 0 {
			t.Errorf("%s as root: %q", tc.multi, got)
		}
		t.Setenv("XTABLES_LOCKFILE", "/nonexistent-leased/xtables.lock") // cannot be created
		got := probeIptables("iptables", unix.AF_INET)
		legacy := strings.Contains(tc.multi, "legacy")
		if legacy && (len(got) != 1 || !strings.Contains(got[0], "cannot write its lock file /nonexistent-leased/xtables.lock")) {
			t.Errorf("legacy with an unwritable lock file: %q", got)
		}
		if !legacy && len(got) != 0 {
			t.Errorf("nft needs no lock file: %q", got)
		}
	}
}
