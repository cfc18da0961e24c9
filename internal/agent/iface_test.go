package agent

import (
	"crypto/rand"
	"encoding/hex"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/leased/leased/internal/nsutil"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/backend"
)

// ifaceTestNS creates a network namespace (deleted in t.Cleanup, also when
// the test fails) with two links, each a veth whose other end (lnkap,
// lnkbp) stays in the namespace, up (veth rather than dummy: the dummy
// module is not everywhere):
//
//	lnka  mtu 1500  192.0.2.2/24     2001:db8:a::2/64
//	lnkb  mtu 1400  198.51.100.2/24  2001:db8:b::2/64
//
// then runs each of cmds as `ip -n NS ...`, and returns the namespace path.
func ifaceTestNS(t *testing.T, cmds [][]string) string {
	t.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "leased-iface-" + hex.EncodeToString(b)
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ip("netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("deleting namespace %s: %v %s", name, err, out)
		}
	})
	setup := [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "lnka", "mtu", "1500", "type", "veth", "peer", "name", "lnkap", "mtu", "1500"},
		{"link", "add", "lnkb", "mtu", "1400", "type", "veth", "peer", "name", "lnkbp", "mtu", "1400"},
		{"link", "set", "lnkap", "up"},
		{"link", "set", "lnkbp", "up"},
		{"link", "set", "lnka", "up"},
		{"link", "set", "lnkb", "up"},
		{"addr", "add", "192.0.2.2/24", "dev", "lnka"},
		{"addr", "add", "2001:db8:a::2/64", "dev", "lnka", "nodad"},
		{"addr", "add", "198.51.100.2/24", "dev", "lnkb"},
		{"addr", "add", "2001:db8:b::2/64", "dev", "lnkb", "nodad"},
	}
	for _, c := range append(setup, cmds...) {
		ip(append([]string{"-n", name}, c...)...)
	}
	return "/var/run/netns/" + name
}

// TestFindExtIfacePerFamily: without --iface each family uses its own
// default route's link, a family without one uses the other's, and
// --iface/--iface-regex choose one link for both.
func TestFindExtIfacePerFamily(t *testing.T) {
	testutil.RequireRoot(t)
	var (
		default4 = []string{"route", "add", "default", "via", "192.0.2.1", "dev", "lnka"}
		default6 = []string{"-6", "route", "add", "default", "via", "2001:db8:b::1", "dev", "lnkb"}
		// lnkb's IPv4 default route has the higher metric: lnka's wins.
		default4b = []string{"route", "add", "default", "via", "198.51.100.1", "dev", "lnkb", "metric", "200"}
		default4a = []string{"route", "add", "default", "via", "192.0.2.1", "dev", "lnka", "metric", "100"}
		// An unreachable IPv6 default route has no link to use.
		unreach6 = []string{"-6", "route", "add", "unreachable", "default", "metric", "1"}
	)
	addr4 := map[string]string{"lnka": "192.0.2.2", "lnkb": "198.51.100.2"}
	addr6 := map[string]string{"lnka": "2001:db8:a::2", "lnkb": "2001:db8:b::2"}
	mtu := map[string]int{"lnka": 1500, "lnkb": 1400}
	cases := []struct {
		name         string
		routes       [][]string
		o            Options
		want4, want6 string // link names; "" with wantErr
		why          string // a part of the reason
		wantErr      string
	}{
		{name: "IPv4 and IPv6 default routes on different links", routes: [][]string{default4, default6},
			want4: "lnka", want6: "lnkb", why: "IPv6 uses lnkb"},
		{name: "only an IPv4 default route", routes: [][]string{default4},
			want4: "lnka", want6: "lnka", why: "no IPv6 default route"},
		{name: "only an IPv6 default route", routes: [][]string{default6},
			want4: "lnkb", want6: "lnkb", why: "no IPv4 default route"},
		{name: "lowest metric wins; unreachable default ignored", routes: [][]string{default4b, default4a, unreach6, default6},
			want4: "lnka", want6: "lnkb", why: "IPv6 uses lnkb"},
		{name: "--iface names one link for both", routes: [][]string{default4, default6}, o: Options{Ifaces: []string{"lnkb"}},
			want4: "lnkb", want6: "lnkb", why: "--iface lnkb"},
		{name: "--iface by address", routes: [][]string{default4, default6}, o: Options{Ifaces: []string{"nope", "2001:db8:a::2"}},
			want4: "lnka", want6: "lnka", why: "--iface 2001:db8:a::2"},
		{name: "--iface-regex names one link for both", routes: [][]string{default4, default6}, o: Options{IfaceRegex: "^lnka$"},
			want4: "lnka", want6: "lnka", why: "--iface-regex ^lnka$"},
		{name: "no default route", wantErr: "no default route"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ns := ifaceTestNS(t, tc.routes)
			var (
				ext  backend.ExtIface
				why  string
				ferr error
				idx  = map[string]int{}
			)
			err := nsutil.Do(ns, func() error {
				for _, n := range []string{"lnka", "lnkb"} {
					l, err := netlink.LinkByName(n)
					if err != nil {
						return err
					}
					idx[n] = l.Attrs().Index
				}
				o := tc.o
				ext, why, ferr = findExtIface(&o)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantErr != "" {
				if ferr == nil || !strings.Contains(ferr.Error(), tc.wantErr) {
					t.Fatalf("findExtIface error = %v, want one saying %q", ferr, tc.wantErr)
				}
				return
			}
			if ferr != nil {
				t.Fatal(ferr)
			}
			if !strings.Contains(why, tc.why) {
				t.Errorf("reason %q, want it to mention %q", why, tc.why)
			}
			if ext.V4.Name != tc.want4 || ext.V4.Index != idx[tc.want4] || ext.V4.MTU != mtu[tc.want4] {
				t.Errorf("IPv4 link = %s #%d mtu %d, want %s #%d mtu %d", ext.V4.Name, ext.V4.Index, ext.V4.MTU, tc.want4, idx[tc.want4], mtu[tc.want4])
			}
			l6 := ext.Link(ipfam.IPv6)
			if l6.Name != tc.want6 || l6.Index != idx[tc.want6] || l6.MTU != mtu[tc.want6] || len(l6.HardwareAddr) != 6 {
				t.Errorf("IPv6 link = %s #%d mtu %d mac %s, want %s #%d mtu %d with a MAC", l6.Name, l6.Index, l6.MTU, l6.HardwareAddr, tc.want6, idx[tc.want6], mtu[tc.want6])
			}
			if split := tc.want4 != tc.want6; ext.Split() != split {
				t.Errorf("Split() = %v, want %v", ext.Split(), split)
			} else if split && (ext.V6.Name != tc.want6 || ext.V6.Index != idx[tc.want6] || ext.V6.MTU != mtu[tc.want6]) {
				t.Errorf("Name6/Index6/MTU6 = %s/%d/%d, want %s/%d/%d", ext.V6.Name, ext.V6.Index, ext.V6.MTU, tc.want6, idx[tc.want6], mtu[tc.want6])
			} else if !split && (ext.V6.Name != "" || ext.V6.Index != 0 || ext.V6.MTU != 0) {
				t.Errorf("Name6/Index6/MTU6 = %s/%d/%d, want zero (same link)", ext.V6.Name, ext.V6.Index, ext.V6.MTU)
			}
			want4, want6 := netip.MustParseAddr(addr4[tc.want4]), netip.MustParseAddr(addr6[tc.want6])
			if ext.V4.Addr != want4 || ext.V4.Public != want4 {
				t.Errorf("Addr4/Public4 = %s/%s, want %s (of %s)", ext.V4.Addr, ext.V4.Public, want4, tc.want4)
			}
			if ext.V6.Addr != want6 || ext.V6.Public != want6 {
				t.Errorf("Addr6/Public6 = %s/%s, want %s (of %s)", ext.V6.Addr, ext.V6.Public, want6, tc.want6)
			}
		})
	}
}
