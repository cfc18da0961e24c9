package backend

import (
	"errors"
	"strings"
	"testing"
)

// As root, in a fresh namespace, every backend type and family passes the
// check, and the check changes nothing: forwarding stays off, accept_ra
// stays 1, no device appears and iptables holds no chain of leased's.
func TestCheckPrivilegesAsRootChangesNothing(t *testing.T) {
	requireRoot(t)
	ns := newNS(t, "priv")
	sh(t, "ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=1", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0")
	h := nsHandle(t, ns)
	ext := extOf(t, h, "eth0", "", "")
	snapshot := func() string {
		return sh(t, "ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.eth0.accept_ra") +
			sh(t, "ip", "-n", ns, "-o", "link") +
			sh(t, "ip", "netns", "exec", ns, "iptables-save") + sh(t, "ip", "netns", "exec", ns, "ip6tables-save")
	}
	before := snapshot()
	for _, typ := range []string{TypeHostGW, TypeVXLAN, TypeProxyNDP} {
		for _, fam := range []struct{ v4, v6 bool }{{true, false}, {false, true}, {true, true}} {
			if err := CheckPrivileges(typ, ext, fam.v4, fam.v6, Options{NetNS: nsPath(ns)}); err != nil {
				t.Errorf("%s v4=%v v6=%v: %v", typ, fam.v4, fam.v6, err)
			}
		}
	}
	if after := snapshot(); after != before {
		t.Errorf("the check changed the namespace:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// Only the problems that matter for the backend and families are reported.
func TestPrivilegesCheckPicksRelevantProblems(t *testing.T) {
	p := privileges{
		sysctl4: []string{"cannot write the sysctl net.ipv4.ip_forward"},
		ipt6:    []string{"ip6tables cannot read the FORWARD chain"},
		packet:  errors.New("CAP_NET_RAW is missing"),
	}
	for _, tc := range []struct {
		typ    string
		v4, v6 bool
		want   []string // empty: no error
	}{
		{TypeHostGW, true, false, []string{"net.ipv4.ip_forward"}},
		{TypeHostGW, false, true, []string{"ip6tables"}},
		{TypeVXLAN, true, true, []string{"net.ipv4.ip_forward", "ip6tables"}},
		{TypeProxyNDP, false, true, []string{"ip6tables", "CAP_NET_RAW"}},
	} {
		err := p.check(tc.typ, tc.v4, tc.v6)
		var pe *PrivilegeError
		if !errors.As(err, &pe) || len(pe.Problems) != len(tc.want) {
			t.Errorf("%s v4=%v v6=%v: %v, want %d problems %q", tc.typ, tc.v4, tc.v6, err, len(tc.want), tc.want)
			continue
		}
		for i, w := range tc.want {
			if !strings.Contains(pe.Problems[i], w) || !strings.Contains(err.Error(), "the "+tc.typ+" backend cannot") {
				t.Errorf("%s: problem %d %q, want one about %q", tc.typ, i, pe.Problems[i], w)
			}
		}
	}
	if err := (&privileges{packet: errors.New("CAP_NET_RAW is missing")}).check(TypeHostGW, true, true); err != nil {
		t.Errorf("host-gw needs no packet socket, got %v", err)
	}
}
