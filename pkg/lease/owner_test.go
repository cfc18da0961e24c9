package lease

import (
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/testutil/etcdtest"
)

// lockLeases returns, for every subnet lock under reg, the etcd lease it is
// attached to.
func lockLeases(t *testing.T, cli *clientv3.Client, reg *Registry) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	for _, v6 := range []bool{false, true} {
		resp, err := cli.Get(ctxT(t), reg.Keys().SubnetLocks(v6), clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			out[string(kv.Key)] = kv.Lease
		}
	}
	return out
}

// Two live hosts with one node name (cloned machines) never hold the same
// subnet: the second is refused with a *ConflictError that names the first
// one's public address, and etcd keeps the first one's keys untouched,
// whatever the second knows of its own history. Once the first host's
// lease has expired, the second one claims.
func TestSameNodeNameNeverSharesSubnet(t *testing.T) {
	srv, _ := etcdtest.Start(t)
	cfg := mustConfig(t, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`)
	ipA, ipB := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	tests := []struct {
		name  string
		claim Claim // the second host's claim, besides Node and PublicIP
	}{
		{"no history", Claim{NoHistory: true}},
		{"history of its own", Claim{Own: []clientv3.LeaseID{12345}}},
		{"empty history", Claim{}},
		{"same subnet.env hint", Claim{NoHistory: true}}, // Hint set below
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			prefix := fmt.Sprintf("/twin%d", i)
			cliA, cliB := etcdtest.Client(t, srv.ClientURL), etcdtest.Client(t, srv.ClientURL)
			regA, regB := NewRegistry(cliA, prefix), NewRegistry(cliB, prefix)
			sessA, sessB := newSession(t, cliA, 30), newSession(t, cliB, 30)
			a, err := regA.Acquire(ctxT(t), sessA.Lease(), cfg, Claim{Node: "twin", PublicIP: ipfam.Pair[netip.Addr]{V4: ipA}, NoHistory: true})
			if err != nil {
				t.Fatal(err)
			}
			c := tc.claim
			c.Node, c.PublicIP.V4 = "twin", ipB
			if tc.name == "same subnet.env hint" {
				c.Hint.V4, c.Hint.V6 = a.Subnet.V4, a.Subnet.V6
			}
			b, err := regB.Acquire(ctxT(t), sessB.Lease(), cfg, c)
			var cf *ConflictError
			if !errors.As(err, &cf) {
				t.Fatalf("second host with the same node name got %v, %v; want a node name conflict", b, err)
			}
			if cf.PublicIP.V4 != ipA || !strings.Contains(err.Error(), ipA.String()) || !strings.Contains(err.Error(), "--node-name") || !strings.Contains(err.Error(), "/etc/machine-id") {
				t.Errorf("conflict error does not name the other host's address %s and the fix: %v", ipA, err)
			}
			for key, l := range lockLeases(t, cliA, regA) {
				if l != int64(sessA.Lease()) {
					t.Errorf("lock %s is under lease %x, not the first host's", key, l)
				}
			}
			resp, err := cliA.Get(ctxT(t), regA.Keys().Lease("twin"))
			if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease != int64(sessA.Lease()) {
				t.Fatalf("record of twin is no longer the first host's: %v %v", resp, err)
			}
			if rec, _ := DecodeRecord("twin", resp.Kvs[0].Value); rec.PublicIP.V4 != ipA {
				t.Errorf("record names %s, want the first host's %s", rec.PublicIP.V4, ipA)
			}
			// The first host goes away for good: its lease expires (revoked
			// here); now the second one claims.
			if _, err := cliA.Revoke(ctxT(t), sessA.Lease()); err != nil {
				t.Fatal(err)
			}
			b, err = regB.Acquire(ctxT(t), sessB.Lease(), cfg, c)
			if err != nil || b.PublicIP.V4 != ipB {
				t.Fatalf("after the first host's lease expired: %v, %v", b, err)
			}
		})
	}
}

// Two hosts with one node name that claim at the same moment: exactly one
// wins, the other is refused with a conflict, and no subnet lock is ever
// under the loser's lease.
func TestSameNodeNameConcurrentClaims(t *testing.T) {
	srv, _ := etcdtest.Start(t)
	cfg := mustConfig(t, `{"Network":"10.100.0.0/16","SubnetLen":22,"IPv6Network":"2001:db8::/58","IPv6SubnetLen":64}`)
	for round := range 10 {
		prefix := fmt.Sprintf("/race%d", round)
		clis := []*clientv3.Client{etcdtest.Client(t, srv.ClientURL), etcdtest.Client(t, srv.ClientURL)}
		sess := []*Session{newSession(t, clis[0], 30), newSession(t, clis[1], 30)}
		recs := make([]*Record, 2)
		errs := make([]error, 2)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				recs[i], errs[i] = NewRegistry(clis[i], prefix).Acquire(ctxT(t), sess[i].Lease(), cfg,
					Claim{Node: "twin", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.AddrFrom4([4]byte{192, 0, 2, byte(1 + i)})}, NoHistory: true})
			}()
		}
		close(start)
		wg.Wait()
		var cf *ConflictError
		won := slices.IndexFunc(errs, func(e error) bool { return e == nil })
		if won < 0 || errs[1-won] == nil || !errors.As(errs[1-won], &cf) {
			t.Fatalf("round %d: errors %v; want exactly one claim and one node name conflict", round, errs)
		}
		for key, l := range lockLeases(t, clis[0], NewRegistry(clis[0], prefix)) {
			if l != int64(sess[won].Lease()) {
				t.Fatalf("round %d: lock %s under lease %x, the winner's is %x", round, key, l, sess[won].Lease())
			}
		}
	}
}

// A restart on the same machine keeps the subnets: with the lease of the
// previous run in Claim.Own, and without any history (first start after a
// reboot or an upgrade) when the record names this host's addresses.
func TestRestartOnSameMachineKeepsSubnet(t *testing.T) {
	cli, reg, cfg := startRegistry(t, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`)
	ip := netip.MustParseAddr("192.0.2.1")
	s1 := newSession(t, cli, 30)
	first, err := reg.Acquire(ctxT(t), s1.Lease(), cfg, Claim{Node: "h", PublicIP: ipfam.Pair[netip.Addr]{V4: ip}, NoHistory: true})
	if err != nil {
		t.Fatal(err)
	}
	s1.Orphan() // the agent stops without revoking
	s2 := newSession(t, cli, 30)
	again, err := reg.Acquire(ctxT(t), s2.Lease(), cfg, Claim{Node: "h", PublicIP: ipfam.Pair[netip.Addr]{V4: ip}, Own: []clientv3.LeaseID{s1.Lease(), s2.Lease()}})
	if err != nil || again.Subnet != first.Subnet {
		t.Fatalf("restart with its lease history: %v, %v; want %v", again, err, first.Subnets())
	}
	s2.Orphan()
	s3 := newSession(t, cli, 30)
	third, err := reg.Acquire(ctxT(t), s3.Lease(), cfg, Claim{Node: "h", PublicIP: ipfam.Pair[netip.Addr]{V4: ip}, NoHistory: true})
	if err != nil || third.Subnet != first.Subnet {
		t.Fatalf("restart without history, same addresses: %v, %v; want %v", third, err, first.Subnets())
	}
	for key, l := range lockLeases(t, cli, reg) {
		if l != int64(s3.Lease()) {
			t.Errorf("lock %s under lease %x, want the last run's %x", key, l, s3.Lease())
		}
	}
}

// A reservation never moves a running host off the subnet it serves: a
// re-claim with Keep set stays there; only a claim without (a restart)
// moves to the reservation. A host serving a subnet reserved for another
// node keeps it too.
func TestReservationDoesNotMoveServingHost(t *testing.T) {
	cli, reg, cfg := startRegistry(t, `{"Network":"10.100.0.0/16"}`)
	sess := newSession(t, cli, 30)
	ip := netip.MustParseAddr("192.0.2.1")
	held, err := reg.Acquire(ctxT(t), sess.Lease(), cfg, Claim{Node: "h", PublicIP: ipfam.Pair[netip.Addr]{V4: ip}})
	if err != nil {
		t.Fatal(err)
	}
	other := netip.MustParsePrefix("10.100.250.0/24")
	if held.Subnet.V4 == other {
		other = netip.MustParsePrefix("10.100.251.0/24")
	}
	if _, err := cli.Put(ctxT(t), reg.Keys().Reservation("h"), `{"Subnet":"`+other.String()+`"}`); err != nil {
		t.Fatal(err)
	}
	// The lease is lost and claimed again while the host serves held.
	if _, err := cli.Revoke(ctxT(t), sess.Lease()); err != nil {
		t.Fatal(err)
	}
	sess2 := newSession(t, cli, 30)
	again, err := reg.Acquire(ctxT(t), sess2.Lease(), cfg, Claim{Node: "h", PublicIP: ipfam.Pair[netip.Addr]{V4: ip}, Keep: ipfam.Pair[netip.Prefix]{V4: held.Subnet.V4}})
	if err != nil || again.Subnet.V4 != held.Subnet.V4 {
		t.Fatalf("re-claim of a serving host: %v, %v; want to keep %s (not the reservation %s)", again, err, held.Subnet.V4, other)
	}
	// A reservation of its subnet for another node does not move it either.
	if _, err := cli.Put(ctxT(t), reg.Keys().Reservation("x"), `{"Subnet":"`+held.Subnet.V4.String()+`"}`); err != nil {
		t.Fatal(err)
	}
	again, err = reg.Acquire(ctxT(t), sess2.Lease(), cfg, Claim{Node: "h", PublicIP: ipfam.Pair[netip.Addr]{V4: ip}, Keep: ipfam.Pair[netip.Prefix]{V4: held.Subnet.V4}})
	if err != nil || again.Subnet.V4 != held.Subnet.V4 {
		t.Fatalf("re-claim with its subnet reserved for another node: %v, %v; want to keep %s", again, err, held.Subnet.V4)
	}
	if _, err := cli.Delete(ctxT(t), reg.Keys().Reservation("x")); err != nil {
		t.Fatal(err)
	}
	// A restart (nothing served yet) takes the reservation.
	moved, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), cfg, Claim{Node: "h", PublicIP: ipfam.Pair[netip.Addr]{V4: ip}, Own: []clientv3.LeaseID{sess2.Lease()}})
	if err != nil || moved.Subnet.V4 != other {
		t.Fatalf("restart: %v, %v; want the reservation %s", moved, err, other)
	}
	if resp, _ := cli.Get(ctxT(t), reg.Keys().SubnetLock(held.Subnet.V4)); len(resp.Kvs) != 0 {
		t.Errorf("the lock of the subnet left behind was not released: %v", resp.Kvs)
	}
}

// Publish never rewrites a record another host took.
func TestPublishRefusesForeignRecord(t *testing.T) {
	cli, reg, cfg := startRegistry(t, `{"Network":"10.100.0.0/16"}`)
	sess := newSession(t, cli, 30)
	rec, err := reg.Acquire(ctxT(t), sess.Lease(), cfg, Claim{Node: "h", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}})
	if err != nil {
		t.Fatal(err)
	}
	other := newSession(t, cli, 30)
	foreign := `{"Node":"h","Subnet":"10.100.7.0/24","PublicIP":"192.0.2.2","BackendType":"host-gw"}`
	if _, err := cli.Put(ctxT(t), reg.Keys().Lease("h"), foreign, clientv3.WithLease(other.Lease())); err != nil {
		t.Fatal(err)
	}
	upd := *rec
	upd.BackendData = []byte(`{"x":1}`)
	if err := reg.Publish(ctxT(t), sess.Lease(), &upd); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("Publish over another host's record: %v, want ErrNotHeld", err)
	}
	resp, _ := cli.Get(ctxT(t), reg.Keys().Lease("h"))
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != foreign {
		t.Fatalf("the other host's record was replaced: %v", resp.Kvs)
	}
}

// The lease file round-trips, keeps the newest IDs, is readable by root
// only, and is ignored for another node name.
func TestOwnLeasesFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "own-leases")
	o := OwnLeases{Path: path, Node: "h"}
	if ids, ok, err := o.Load(); ok || err != nil || ids != nil {
		t.Fatalf("no file: %v %v %v", ids, ok, err)
	}
	var all []clientv3.LeaseID
	for i := range 6 {
		all = append(all, clientv3.LeaseID(0x694d9a8f7c3e2100+i))
	}
	if err := o.Save(all); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil {
		t.Fatal(err)
	} else if fi.Mode() != 0o600 {
		t.Errorf("the file's mode is %v, want 0600: it is this machine's alone", fi.Mode())
	}
	ids, ok, err := o.Load()
	if !ok || err != nil || !slices.Equal(ids, all[len(all)-ownLeasesMax:]) {
		t.Fatalf("Load: %x %v %v; want %x", ids, ok, err, all[len(all)-ownLeasesMax:])
	}
	if ids, ok, _ := (OwnLeases{Path: path, Node: "other"}).Load(); ok || ids != nil {
		t.Errorf("another node name's file was used: %v", ids)
	}
	if err := os.WriteFile(path, []byte("node=h\nnot-hex\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := o.Load(); ok || err == nil {
		t.Errorf("garbage: ok=%v err=%v, want an error", ok, err)
	}
}

// The same against Debian's etcd 3.4 (as its own process): the lease
// comparisons the claim and Publish rely on work there too.
func TestNodeNameConflictOnOlderEtcd(t *testing.T) {
	ext, err := etcdserver.StartBinary(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ext.Stop)
	cli := etcdtest.Client(t, ext.ClientURL)
	cfg := mustConfig(t, `{"Network":"10.100.0.0/16"}`)
	reg := NewRegistry(cli, "")
	sessA, sessB := newSession(t, cli, 30), newSession(t, cli, 30)
	a, err := reg.Acquire(ctxT(t), sessA.Lease(), cfg, Claim{Node: "twin", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}})
	if err != nil {
		t.Fatal(err)
	}
	upd := *a
	upd.BackendData = []byte(`{"x":1}`)
	if err := reg.Publish(ctxT(t), sessA.Lease(), &upd); err != nil {
		t.Fatalf("Publish of the holder on etcd %s: %v", ext.Version, err)
	}
	var cf *ConflictError
	if _, err := reg.Acquire(ctxT(t), sessB.Lease(), cfg, Claim{Node: "twin", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.2")}, NoHistory: true}); !errors.As(err, &cf) {
		t.Fatalf("second host on etcd %s: %v, want a conflict", ext.Version, err)
	}
	if err := reg.Publish(ctxT(t), sessB.Lease(), &upd); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("Publish under another lease on etcd %s: %v, want ErrNotHeld", ext.Version, err)
	}
}
