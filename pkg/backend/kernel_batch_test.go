package backend

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/testutil"
)

// batchNS is a namespace with eth0 (192.168.0.1/16, 2001:db8:ff::1/64) up.
func batchNS(t testing.TB) (string, *netlink.Handle, int) {
	t.Helper()
	ns := testutil.UplinkNS(t, "batch", "192.168.0.1/16", "2001:db8:ff::1/64")
	h := testutil.NSHandle(t, ns)
	l, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	return ns, h, l.Attrs().Index
}

// batchRoutes are n dual-stack host-gw routes over 200 gateways, the shape
// of the datapath benchmark.
func batchRoutes(n, link int) []route {
	var out []route
	for i := range n {
		j := i + 1
		gw4 := netip.AddrFrom4([4]byte{192, 168, 1, byte(20 + i%200)})
		gw6 := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0xff, 15: byte(20 + i%200)})
		d4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(j >> 8), byte(j), 0}), 24)
		d6 := netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, byte(j >> 8), byte(j)}), 64)
		out = append(out, route{Dst: d4, Gw: gw4, Link: link}, route{Dst: d6, Priority: 1024, Gw: gw6, Link: link})
	}
	return out
}

// TestRouteBatcher checks the batch encoder against the kernel: the routes
// it installs read back exactly as the reconciler wants them, a failing
// request in the middle of a batch fails alone, and deletes report routes
// that are gone.
func TestRouteBatcher(t *testing.T) {
	testutil.RequireRoot(t)
	ns, h, link := batchNS(t)
	b, err := newRouteBatcher(nsExec{path: testutil.NSPath(ns)})
	if err != nil {
		t.Fatal(err)
	}
	k := netlinkKernel{h: h, b: b}
	want := batchRoutes(300, link) // 600 routes: several batches
	rs := routesNetlink(want)
	bad := route{Dst: netip.MustParsePrefix("10.250.0.0/24"), Gw: netip.MustParseAddr("172.16.0.1"), Link: link} // not on-link
	rs = append(rs[:150], append([]*netlink.Route{bad.netlink()}, rs[150:]...)...)
	errs := k.RoutesReplace(rs)
	for i, err := range errs {
		if (i == 150) != (err != nil) {
			t.Fatalf("route %d (%s): error %v", i, rs[i].Dst, err)
		}
	}
	if !errors.Is(errs[150], unix.ENETUNREACH) {
		t.Errorf("off-link gateway: %v, want ENETUNREACH", errs[150])
	}
	e := &engine{k: k}
	got, err := e.listRoutes()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("%d routes in the kernel, want %d", len(got), len(want))
	}
	wantSet := map[route]bool{}
	for _, r := range want {
		wantSet[r] = true
	}
	for _, r := range got {
		if !wantSet[r] {
			t.Fatalf("kernel holds %s, which was not wanted (or differs)", r)
		}
	}
	// Replacing with the same routes is idempotent.
	for i, err := range k.RoutesReplace(routesNetlink(want)) {
		if err != nil {
			t.Fatalf("second replace of %s: %v", want[i], err)
		}
	}
	// Delete half, then all: the second time the first half is gone.
	for i, err := range k.RoutesDel(routesNetlink(want[:300])) {
		if err != nil {
			t.Fatalf("deleting %s: %v", want[i], err)
		}
	}
	for i, err := range k.RoutesDel(routesNetlink(want)) {
		if (i < 300) != isGone(err) || (i >= 300 && err != nil) {
			t.Fatalf("deleting %s again: %v", want[i], err)
		}
	}
	if n := len(ourRoutes(t, h)); n != 0 {
		t.Fatalf("%d routes left", n)
	}
}

// BenchmarkRouteInstall installs 10,000 routes (5,000 dual-stack peers, the
// datapath benchmark's shape) into a namespace with the batcher, with
// netlink.Handle one request at a time, and with `ip -batch`.
func BenchmarkRouteInstall(b *testing.B) {
	testutil.RequireRoot(b)
	ns, h, link := batchNS(b)
	want := batchRoutes(5000, link)
	flush := func() {
		b.StopTimer()
		testutil.Run(b, "ip", "-n", ns, "-4", "route", "flush", "proto", "76")
		testutil.Run(b, "ip", "-n", ns, "-6", "route", "flush", "proto", "76")
		b.StartTimer()
	}
	b.Run("batch", func(b *testing.B) {
		bt, err := newRouteBatcher(nsExec{path: testutil.NSPath(ns)})
		if err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			for _, err := range bt.do(unix.RTM_NEWROUTE, routesNetlink(want)) {
				if err != nil {
					b.Fatal(err)
				}
			}
			flush()
		}
	})
	b.Run("handle", func(b *testing.B) {
		for b.Loop() {
			for _, r := range want {
				if err := h.RouteReplace(r.netlink()); err != nil {
					b.Fatal(err)
				}
			}
			flush()
		}
	})
	b.Run("ip-batch", func(b *testing.B) {
		var sb strings.Builder
		for _, r := range want {
			fmt.Fprintf(&sb, "route add %s via %s dev eth0 proto 76\n", r.Dst, r.Gw)
		}
		f := filepath.Join(b.TempDir(), "routes")
		if err := os.WriteFile(f, []byte(sb.String()), 0o644); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if out, err := exec.Command("ip", "-n", ns, "-batch", f).CombinedOutput(); err != nil {
				b.Fatalf("%v: %s", err, out)
			}
			flush()
		}
	})
}
