package backend

import (
	"context"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/testutil"
)

// vxHost is one host of the vxlan lab: a host namespace with eth0 on the
// shared LAN and a "container" namespace behind a veth whose host end holds
// the subnet's .1 (::1) address.
type vxHost struct {
	ns, ctr string
	h       *netlink.Handle
	b       *engine
	local   Local
	ext     ExtIface
}

func (x *vxHost) peer() Peer {
	return Peer{
		Node: x.local.Node, Subnet: ipfam.Pair[netip.Prefix]{V4: x.local.Subnet.V4, V6: x.local.Subnet.V6},
		PublicIP:    ipfam.Pair[netip.Addr]{V4: x.ext.V4.Public, V6: x.ext.V6.Public},
		BackendType: TypeVXLAN, BackendData: x.b.LeaseData(),
	}
}

// vxlanLab builds hosts a and b joined by one veth pair. With v4Underlay
// false the LAN has only IPv6 addresses, so both overlays ride IPv6.
func vxlanLab(t *testing.T, raw string, v4Underlay bool) (*vxHost, *vxHost) {
	testutil.RequireRoot(t)
	if _, err := exec.LookPath("ping"); err != nil {
		t.Fatal("ping not found: install iputils-ping")
	}
	nsA, nsB := testutil.NewNS(t, "vxa"), testutil.NewNS(t, "vxb")
	testutil.Run(t, "ip", "-n", nsA, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", nsB)
	hosts := make([]*vxHost, 2)
	for i, ns := range []string{nsA, nsB} {
		n := i + 1
		x := &vxHost{ns: ns, ctr: testutil.NewNS(t, fmt.Sprintf("ctr%d", n))}
		a4, a6 := fmt.Sprintf("192.168.88.%d", n), fmt.Sprintf("fd88::%d", n)
		testutil.Run(t, "ip", "-n", ns, "link", "set", "eth0", "up")
		if v4Underlay {
			testutil.Run(t, "ip", "-n", ns, "addr", "add", a4+"/24", "dev", "eth0")
		} else {
			a4 = ""
		}
		testutil.Run(t, "ip", "-n", ns, "addr", "add", a6+"/64", "dev", "eth0", "nodad")
		x.h = testutil.NSHandle(t, ns)
		x.ext = extOf(t, x.h, "eth0", a4, a6)
		x.local = Local{
			Node:   fmt.Sprintf("node-%d", n),
			Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix(fmt.Sprintf("10.100.%d.0/24", n)), V6: netip.MustParsePrefix(fmt.Sprintf("fd00:100:%d::/64", n))}, Network: ipfam.Pair[netip.Prefix]{V4: net4, V6: net6},
		}
		x.b = mustNew(t, raw, x.ext, x.local.Node, ns, Options{Resync: 300 * time.Millisecond})
		if err := x.b.Start(context.Background(), x.local); err != nil {
			t.Fatal(err)
		}
		mtu := strconv.Itoa(x.b.MTU())
		testutil.Run(t, "ip", "-n", ns, "link", "add", "vc", "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu, "netns", x.ctr)
		testutil.Run(t, "ip", "-n", ns, "link", "set", "vc", "up")
		testutil.Run(t, "ip", "-n", ns, "addr", "add", fmt.Sprintf("10.100.%d.1/24", n), "dev", "vc")
		testutil.Run(t, "ip", "-n", ns, "addr", "add", fmt.Sprintf("fd00:100:%d::1/64", n), "dev", "vc", "nodad")
		testutil.Run(t, "ip", "-n", x.ctr, "link", "set", "eth0", "up")
		testutil.Run(t, "ip", "-n", x.ctr, "addr", "add", fmt.Sprintf("10.100.%d.2/24", n), "dev", "eth0")
		testutil.Run(t, "ip", "-n", x.ctr, "addr", "add", fmt.Sprintf("fd00:100:%d::2/64", n), "dev", "eth0", "nodad")
		testutil.Run(t, "ip", "-n", x.ctr, "route", "add", "default", "via", fmt.Sprintf("10.100.%d.1", n))
		testutil.Run(t, "ip", "-n", x.ctr, "-6", "route", "add", "default", "via", fmt.Sprintf("fd00:100:%d::1", n))
		hosts[i] = x
	}
	a, b := hosts[0], hosts[1]
	ctx := context.Background()
	if err := a.b.SetPeers(ctx, []Peer{b.peer()}); err != nil {
		t.Fatal(err)
	}
	if err := b.b.SetPeers(ctx, []Peer{a.peer()}); err != nil {
		t.Fatal(err)
	}
	return a, b
}

// ping runs ping in ns and reports whether it got a reply.
func ping(ns string, args ...string) (bool, string) {
	cmd := append([]string{"netns", "exec", ns, "ping", "-c", "1", "-W", "1"}, args...)
	out, err := exec.Command("ip", cmd...).CombinedOutput()
	return err == nil, string(out)
}

func mustPing(t *testing.T, ns string, args ...string) {
	t.Helper()
	var out string
	for range 3 { // the first packet may race neighbour resolution on vc
		var ok bool
		if ok, out = ping(ns, args...); ok {
			return
		}
	}
	t.Fatalf("ping %v from %s failed:\n%s", args, ns, out)
}

func checkOverlay(t *testing.T, a, b *vxHost) {
	t.Helper()
	mtu := a.b.MTU()
	mustPing(t, a.ctr, "10.100.2.2")
	mustPing(t, a.ctr, "-6", "fd00:100:2::2")
	mustPing(t, a.ctr, "-M", "do", "-s", strconv.Itoa(mtu-28), "10.100.2.2")
	mustPing(t, a.ctr, "-6", "-M", "do", "-s", strconv.Itoa(mtu-48), "fd00:100:2::2")
	mustPing(t, b.ctr, "-M", "do", "-s", strconv.Itoa(mtu-28), "10.100.1.2")
}

func TestVXLANIPv4Underlay(t *testing.T) {
	a, b := vxlanLab(t, `{"Type":"vxlan"}`, true)
	// leased.6 rides IPv6 (70 bytes of overhead), leased.4 IPv4 (50).
	if got, want := a.b.MTU(), a.ext.V4.MTU-70; got != want {
		t.Fatalf("MTU() = %d, want %d (the smaller device MTU)", got, want)
	}
	checkOverlay(t, a, b)
	assertSteady(t, a.b)
	assertSteady(t, b.b)

	l, err := a.h.LinkByName(VXLANDev4)
	if err != nil {
		t.Fatal(err)
	}
	vx := l.(*netlink.Vxlan)
	if vx.MTU != a.ext.V4.MTU-50 {
		t.Errorf("%s MTU = %d, want %d", VXLANDev4, vx.MTU, a.ext.V4.MTU-50)
	}
	if vx.VxlanId != DefaultVNI || vx.Port != DefaultPort || vx.Learning || vx.VtepDevIndex != a.ext.V4.Index {
		t.Errorf("%s = vni %d port %d learning %v vtepdev %d", VXLANDev4, vx.VxlanId, vx.Port, vx.Learning, vx.VtepDevIndex)
	}
	if got, want := vx.HardwareAddr.String(), vtepMAC("node-1", false).String(); got != want {
		t.Errorf("%s MAC = %s, want %s", VXLANDev4, got, want)
	}

	// Deleted by hand: recreated and every peer replayed.
	runBackend(t, a.b)
	runBackend(t, b.b)
	for _, dev := range []string{VXLANDev4, VXLANDev6} {
		testutil.Run(t, "ip", "-n", a.ns, "link", "del", dev)
		testutil.Eventually(t, 5*time.Second, dev+" recreated with its peer", func() bool {
			ok4, _ := ping(a.ctr, "10.100.2.2")
			ok6, _ := ping(a.ctr, "-6", "fd00:100:2::2")
			return ok4 && ok6
		})
	}
}

func TestVXLANIPv6Underlay(t *testing.T) {
	a, b := vxlanLab(t, `{"Type":"vxlan","VNI":7,"Port":4789}`, false)
	if got, want := a.b.MTU(), a.ext.V4.MTU-70; got != want {
		t.Fatalf("MTU() = %d, want %d (IPv6 underlay)", got, want)
	}
	checkOverlay(t, a, b)
	assertSteady(t, a.b)
	assertSteady(t, b.b)
	for dev, vni := range map[string]int{VXLANDev4: 8, VXLANDev6: 7} {
		l, err := a.h.LinkByName(dev)
		if err != nil {
			t.Fatal(err)
		}
		if vx := l.(*netlink.Vxlan); vx.VxlanId != vni || vx.Port != 4789 || !vx.SrcAddr.Equal(a.ext.V6.Addr.AsSlice()) {
			t.Errorf("%s = vni %d port %d local %s, want vni %d port 4789 local %s", dev, vx.VxlanId, vx.Port, vx.SrcAddr, vni, a.ext.V6.Addr)
		}
	}

	// A peer that leaves takes its route, neighbour and FDB entries along.
	if err := a.b.SetPeers(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if rs := ourRoutes(t, a.h); len(rs) != 0 {
		t.Errorf("routes left: %v", rs)
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6, unix.AF_BRIDGE} {
		ns, err := a.h.NeighList(0, fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range ns {
			if slices.Contains(*a.b.owned.Load(), n.LinkIndex) && n.State&netlink.NUD_PERMANENT != 0 && n.HardwareAddr[0]&1 == 0 {
				t.Errorf("entry left on our device: %s", n.String())
			}
		}
	}
}

func TestVXLANConfigChangeRecreatesDevice(t *testing.T) {
	a, _ := vxlanLab(t, `{"Type":"vxlan"}`, true)
	old, err := a.h.LinkByName(VXLANDev4)
	if err != nil {
		t.Fatal(err)
	}
	b2 := mustNew(t, `{"Type":"vxlan","VNI":42}`, a.ext, a.local.Node, a.ns, Options{})
	if err := b2.Start(context.Background(), a.local); err != nil {
		t.Fatal(err)
	}
	links, err := a.h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range links {
		if vx, ok := l.(*netlink.Vxlan); ok {
			n++
			if vx.VxlanId != 42 {
				t.Errorf("%s has VNI %d, want 42", vx.Name, vx.VxlanId)
			}
			if vx.Index == old.Attrs().Index {
				t.Errorf("%s was not recreated", vx.Name)
			}
		}
	}
	if n != 2 {
		t.Errorf("%d vxlan devices, want 2 (old ones must be deleted)", n)
	}
}
