package backend

import (
	"net"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestZZProbe(t *testing.T) {
	ns := newNS(t, "probe")
	sh(t, "ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
	sh(t, "ip", "-n", ns, "link", "set", "eth0p", "up")
	sh(t, "ip", "-n", ns, "link", "set", "eth0", "up")
	sh(t, "ip", "-n", ns, "addr", "add", "192.168.0.1/16", "dev", "eth0")
	h := nsHandle(t, ns)
	l, _ := h.LinkByName("eth0")
	start := time.Now()
	for i := range 5000 {
		j, k := i+1, i+2
		r := &netlink.Route{Dst: &net.IPNet{IP: net.IPv4(10, byte(j>>8), byte(j), 0).To4(), Mask: net.CIDRMask(24, 32)},
			Gw: net.IPv4(192, 168, byte(k/250), byte(k%250+1)).To4(), LinkIndex: l.Attrs().Index, Protocol: 76, Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST}
		if err := h.RouteReplace(r); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("5000 RouteReplace: %v", time.Since(start))
}
