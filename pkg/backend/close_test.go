package backend

import (
	"context"
	"encoding/json"
	"errors"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"testing"
	"time"

	"github.com/leased/leased/internal/testutil"
)

// Close releases every descriptor New, Start and Run opened, for each
// backend type, leaves the kernel state in place, and makes later calls fail
// with ErrClosed instead of touching the kernel.
func TestCloseReleasesHandles(t *testing.T) {
	testutil.RequireRoot(t)
	ns := testutil.UplinkNS(t, "close", "192.0.2.1/24", "2001:db8:1::1/64")
	h := testutil.NSHandle(t, ns)
	ext := extOf(t, h, "eth0", "192.0.2.1", "2001:db8:1::1")
	local := Local{Node: "a", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.1.0/24"), V6: netip.MustParsePrefix("2001:db8:1:0:8000::/80")}, Network: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.0.0/16"), V6: netip.MustParsePrefix("2001:db8:1:0:8000::/65")}}
	vx, _ := json.Marshal(VXLANLeaseData{VtepMAC: vtepMAC("b", false).String(), VtepMAC6: vtepMAC("b", true).String()})
	fds := func() int {
		des, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(des)
	}
	// Leaked sockets are *os.File, which the collector would close later.
	runtime.GC()
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	for _, raw := range []string{`{"Type":"host-gw"}`, `{"Type":"vxlan"}`, `{"Type":"proxy-ndp","Mode":"present"}`} {
		t.Run(raw, func(t *testing.T) {
			base := fds()
			b, err := New([]byte(raw), ext, "a", Options{NetNS: testutil.NSPath(ns)})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- b.Run(ctx) }()
			peer := Peer{Node: "b", Subnet: ipfam.Pair[netip.Prefix]{V4: netip.MustParsePrefix("10.100.2.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.2")}, BackendType: b.Type()}
			if b.Type() == TypeVXLAN {
				peer.BackendData = vx
			}
			if err := b.SetPeers(ctx, []Peer{peer}); err != nil {
				t.Fatal(err)
			}
			if err := b.Start(ctx, local); err != nil {
				t.Fatal(err)
			}
			testutil.Eventually(t, 10*time.Second, "the route to b", func() bool { _, ok := ourRoutes(t, h)["10.100.2.0/24"]; return ok })
			if fds() <= base {
				t.Fatalf("the backend opened no descriptor (%d before, %d now): the test counts nothing", base, fds())
			}
			cancel()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if err := b.(Closer).Close(); err != nil {
				t.Fatal(err)
			}
			// The netlink subscriptions close their sockets as they wind down.
			deadline := time.Now().Add(10 * time.Second)
			for fds() != base && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if now := fds(); now != base {
				t.Errorf("%d descriptors open before New, %d after Close", base, now)
			}
			if _, ok := ourRoutes(t, h)["10.100.2.0/24"]; !ok {
				t.Error("Close removed the route to b; the kernel state must stay")
			}
			if err := b.SetPeers(context.Background(), nil); !errors.Is(err, ErrClosed) {
				t.Errorf("SetPeers after Close: %v, want ErrClosed", err)
			}
			if _, ok := ourRoutes(t, h)["10.100.2.0/24"]; !ok {
				t.Error("SetPeers after Close removed the route to b")
			}
			if err := b.(Closer).Close(); err != nil {
				t.Errorf("a second Close: %v", err)
			}
		})
	}
}
