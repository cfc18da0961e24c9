package backend

import (
	"slices"
	"strings"
	"testing"

	"github.com/leased/leased/internal/testutil"
)

// TestTeardownOwnsOnlyItsObjects: Teardown removes routes of protocol 76,
// the vxlan device leased.6 and leased's chains, and leaves routes of
// other protocols, a link named leased.4 that is not a vxlan device (a veth) (with
// an error naming it) and other chains in FORWARD. A second run removes
// nothing more.
func TestTeardownOwnsOnlyItsObjects(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.UplinkNS(t, "teardown", "192.0.2.1/24")
	ip := func(args ...string) string { return testutil.Run(t, append([]string{"ip", "-n", ns}, args...)...) }
	ipt := func(args ...string) string {
		return testutil.Run(t, append([]string{"ip", "netns", "exec", ns, "iptables", "-w"}, args...)...)
	}
	ip("route", "add", "10.1.0.0/24", "via", "192.0.2.2", "proto", "76")
	ip("route", "add", "10.1.1.0/24", "via", "192.0.2.3", "proto", "static")
	ip("link", "add", "leased.4", "type", "veth", "peer", "name", "l4p") // not leased's
	ip("link", "add", "leased.6", "type", "vxlan", "id", "7", "dstport", "8472", "local", "192.0.2.1", "dev", "eth0")
	ipt("-N", "OTHER-FWD")
	ipt("-A", "FORWARD", "-j", "OTHER-FWD")
	ipt("-N", ForwardChain)
	ipt("-A", ForwardChain, "-j", "ACCEPT")
	ipt("-A", "FORWARD", "-m", "comment", "--comment", "leased: jump to "+ForwardChain, "-j", ForwardChain)

	removed, err := Teardown(testutil.NSPath(ns))
	t.Logf("removed: %q, err: %v", removed, err)
	if err == nil || !strings.Contains(err.Error(), "a link named leased.4 exists but is of type veth") {
		t.Errorf("want an error about the veth leased.4, got %v", err)
	}
	for _, want := range []string{"route 10.1.0.0/24 via 192.0.2.2 dev eth0 proto 76", "VXLAN device leased.6 (with its addresses, neighbour and FDB entries)", "iptables chain filter/LEASED-FWD and the jumps to it from FORWARD"} {
		if !slices.Contains(removed, want) {
			t.Errorf("removed %q lacks %q", removed, want)
		}
	}
	if out := ip("route", "show", "proto", "76"); strings.TrimSpace(out) != "" {
		t.Errorf("routes of protocol 76 left: %s", out)
	}
	if out := ip("route", "show", "10.1.1.0/24"); !strings.Contains(out, "proto static") {
		t.Errorf("the static route is gone: %q", out)
	}
	links := ip("-br", "link")
	if !strings.Contains(links, "leased.4") || strings.Contains(links, "leased.6") {
		t.Errorf("want the veth leased.4 kept and leased.6 gone:\n%s", links)
	}
	rules := ipt("-S")
	if strings.Contains(rules, ForwardChain) || !strings.Contains(rules, "-A FORWARD -j OTHER-FWD") {
		t.Errorf("want LEASED-FWD gone and OTHER-FWD kept:\n%s", rules)
	}

	again, err := Teardown(testutil.NSPath(ns))
	if len(again) != 0 {
		t.Errorf("a second run removed %q", again)
	}
	if err == nil {
		t.Errorf("the second run does not mention the veth leased.4 any more")
	}
}
