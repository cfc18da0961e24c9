package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Run runs the command args[0] with args[1:], fails t with the command
// line and its output if it fails, and returns its combined output.
func Run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// RunIn is Run inside the network namespace named ns (ip netns exec).
func RunIn(t testing.TB, ns string, args ...string) string {
	t.Helper()
	return Run(t, append([]string{"ip", "netns", "exec", ns}, args...)...)
}

// NewNS creates a network namespace named leased-<role>-<8 random hex
// digits> (so that parallel runs do not collide), with lo up and IPv6
// duplicate address detection off, and returns its name. The namespace is
// deleted when t ends. It skips t as RequireRoot does when not root.
func NewNS(t testing.TB, role string) string {
	t.Helper()
	RequireRoot(t)
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "leased-" + role + "-" + hex.EncodeToString(b)
	Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	for _, s := range []string{"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"} {
		Run(t, "ip", "netns", "exec", name, "sysctl", "-qw", s)
	}
	Run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

// UplinkNS is NewNS with the uplink of a test host: eth0, a veth whose
// peer eth0p stays inside the namespace, both up, with the addresses
// addrs (prefixes such as "192.0.2.1/24"; IPv6 ones without duplicate
// address detection).
func UplinkNS(t testing.TB, role string, addrs ...string) string {
	t.Helper()
	ns := NewNS(t, role)
	ip := func(args ...string) { t.Helper(); Run(t, append([]string{"ip", "-n", ns}, args...)...) }
	ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
	ip("link", "set", "eth0p", "up")
	ip("link", "set", "eth0", "up")
	for _, a := range addrs {
		if strings.Contains(a, ":") {
			ip("addr", "add", a, "dev", "eth0", "nodad")
		} else {
			ip("addr", "add", a, "dev", "eth0")
		}
	}
	return ns
}

// NSPath is the path of the namespace named name (as `ip netns` names it).
func NSPath(name string) string { return "/var/run/netns/" + name }

// NSHandle returns a netlink handle in the namespace named name, closed
// when t ends.
func NSHandle(t testing.TB, name string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(NSPath(name))
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}
