// Package lab builds a multi-host leased network on one machine: hosts are
// network namespaces on a LAN (optionally two LANs behind a router), a real
// etcd runs in-process, one leased agent process runs per host, and each
// host has a "container" namespace behind a bridge addressed from the
// host's subnet.env. It is the `leased-lab lab` command and the end-to-end
// test harness.
package lab

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
)

// LAN addressing. Host i (1-based) on LAN n has .(10+i) / ::(10+i); the LAN
// namespace (where etcd listens) has .254 / ::fe; the router has .1 / ::1.
var lans = []struct{ v4, v6 netip.Prefix }{
	{netip.MustParsePrefix("192.168.100.0/24"), netip.MustParsePrefix("fd00:100::/64")},
	{netip.MustParsePrefix("192.168.200.0/24"), netip.MustParsePrefix("fd00:200::/64")},
}

func lanAddr(lan int, host byte) (netip.Addr, netip.Addr) {
	a4 := lans[lan].v4.Addr().As4()
	a4[3] = host
	a6 := lans[lan].v6.Addr().As16()
	a6[15] = host
	return netip.AddrFrom4(a4), netip.AddrFrom16(a6)
}

// ip runs the ip command and returns its error with its output.
func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// batch runs each line as one ip command, stopping at the first failure.
func batch(lines []string) error {
	for _, l := range lines {
		if err := ip(strings.Fields(l)...); err != nil {
			return err
		}
	}
	return nil
}

// nsExec runs a command in a namespace and returns its combined output.
func nsExec(ns string, args ...string) ([]byte, error) {
	return exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
}

// sysctl writes net sysctls in a namespace (names like net.ipv6.conf.all.forwarding).
func sysctl(ns string, kv ...string) error {
	args := []string{"sysctl", "-q", "-w"}
	args = append(args, kv...)
	if out, err := nsExec(ns, args...); err != nil {
		return fmt.Errorf("sysctl in %s: %v: %s", ns, err, bytes.TrimSpace(out))
	}
	return nil
}

func randomTag() string {
	b := make([]byte, 2)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// newNS creates a namespace with loopback up and DAD off, so addresses are
// usable at once.
func newNS(name string) error {
	if err := ip("netns", "add", name); err != nil {
		return err
	}
	if err := ip("-n", name, "link", "set", "lo", "up"); err != nil {
		return err
	}
	return sysctl(name, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
		"net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0")
}

func delNS(name string) {
	// Killing what still runs inside first lets the namespace go at once.
	if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
		for _, pid := range strings.Fields(string(out)) {
			exec.Command("kill", "-9", pid).Run()
		}
	}
	exec.Command("ip", "netns", "del", name).Run()
}

// netnsPath is where `ip netns add` puts a namespace.
func netnsPath(name string) string { return "/var/run/netns/" + name }

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }
