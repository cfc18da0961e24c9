package lease

import (
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/testutil/etcdtest"
)

func TestAcquireFamiliesAndLengths(t *testing.T) {
	_, cli := etcdtest.Start(t)
	tests := []struct {
		name   string
		config string
		want4  int // subnet length, 0 = no IPv4
		want6  int
	}{
		{"ipv4", `{"Network":"10.100.0.0/16"}`, 24, 0},
		{"dual-stack", `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8:cd11::/48"}`, 24, 64},
		{"ipv6-only /64", `{"IPv6Network":"2001:db8::/48"}`, 0, 64},
		{"ipv6-only /80", `{"IPv6Network":"2001:db8::/48","IPv6SubnetLen":80}`, 0, 80},
		{"ipv6-only /126", `{"IPv6Network":"2001:db8::/120","IPv6SubnetLen":126}`, 0, 126},
		{"ipv4 disabled", `{"Network":"10.100.0.0/16","EnableIPv4":false,"IPv6Network":"2001:db8::/48","IPv6SubnetLen":80}`, 0, 80},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := mustConfig(t, tc.config)
			reg := NewRegistry(cli, fmt.Sprintf("/t%d", i))
			seen := map[netip.Prefix]string{}
			for n := 0; n < 3; n++ {
				node := fmt.Sprintf("host-%d", n)
				rec, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), cfg, Claim{Node: node, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}})
				if err != nil {
					t.Fatal(err)
				}
				if got := rec.Subnet.V4.Bits(); rec.Subnet.V4.IsValid() != (tc.want4 > 0) || (tc.want4 > 0 && got != tc.want4) {
					t.Errorf("%s: IPv4 subnet %v, want a /%d", node, rec.Subnet.V4, tc.want4)
				}
				if got := rec.Subnet.V6.Bits(); rec.Subnet.V6.IsValid() != (tc.want6 > 0) || (tc.want6 > 0 && got != tc.want6) {
					t.Errorf("%s: IPv6 subnet %v, want a /%d", node, rec.Subnet.V6, tc.want6)
				}
				for _, s := range rec.Subnets() {
					if cfg.IPv4 != nil && s.Addr().Is4() && !cfg.IPv4.Contains(s) || cfg.IPv6 != nil && s.Addr().Is6() && !cfg.IPv6.Contains(s) {
						t.Errorf("%s: %v outside the pool", node, s)
					}
					if other, dup := seen[s]; dup {
						t.Errorf("%s and %s both hold %v", node, other, s)
					}
					seen[s] = node
				}
				// The lease record is in etcd, readable by an operator.
				resp, err := cli.Get(ctxT(t), reg.Keys().Lease(node))
				if err != nil || len(resp.Kvs) != 1 {
					t.Fatalf("lease record of %s: %v %v", node, resp, err)
				}
				got, err := DecodeRecord(node, resp.Kvs[0].Value)
				if err != nil || got.Subnet != rec.Subnet {
					t.Errorf("stored record %+v (%v), want %+v", got, err, rec)
				}
			}
		})
	}
}

// 50 hosts claiming at the same moment all get distinct subnets, none fails.
func TestConcurrentClaimsDistinct(t *testing.T) {
	srv, _ := etcdtest.Start(t)
	cfg := mustConfig(t, `{"Network":"10.100.0.0/16","SubnetLen":22,"IPv6Network":"2001:db8::/58","IPv6SubnetLen":64}`)
	// /16 with /22s = 64 subnets and /58 with /64s = 64: 50 claimants collide often.
	const n = 50
	var wg sync.WaitGroup
	start := make(chan struct{})
	recs := make([]*Record, n)
	errs := make([]error, n)
	for i := range n {
		cli := etcdtest.Client(t, srv.ClientURL) // one client per host, like real agents
		sess := newSession(t, cli, 30)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			recs[i], errs[i] = NewRegistry(cli, "").Acquire(ctxT(t), sess.Lease(), cfg, Claim{Node: fmt.Sprintf("host-%02d", i), PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}})
		}()
	}
	close(start)
	wg.Wait()
	seen := map[netip.Prefix]int{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("host-%02d: %v", i, errs[i])
		}
		for _, s := range recs[i].Subnets() {
			if j, dup := seen[s]; dup {
				t.Errorf("host-%02d and host-%02d both hold %v", i, j, s)
			}
			seen[s] = i
		}
	}
	if len(seen) != 2*n {
		t.Errorf("%d distinct subnets, want %d", len(seen), 2*n)
	}
}

// A node gets its subnets back after a restart (new session while the old
// lease lives) and after its lease expired, keyed by node name.
func TestReclaimAfterRestartAndExpiry(t *testing.T) {
	cli, reg, cfg := startRegistry(t, `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/32","IPv6SubnetLen":64}`)
	firstSess := newSession(t, cli, 2)
	first, err := reg.Acquire(ctxT(t), firstSess.Lease(), cfg, Claim{Node: "a", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}})
	if err != nil {
		t.Fatal(err)
	}
	// Restart: a new process with a new session, a different IP; it knows
	// the lease of its previous run (the agent keeps it in a file).
	againSess := newSession(t, cli, 30)
	again, err := reg.Acquire(ctxT(t), againSess.Lease(), cfg, Claim{Node: "a", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.99")}, Own: []clientv3.LeaseID{firstSess.Lease()}})
	if err != nil {
		t.Fatal(err)
	}
	if again.Subnet != first.Subnet {
		t.Fatalf("after restart got %v, want %v", again.Subnets(), first.Subnets())
	}
	if !again.Acquired.Equal(first.Acquired) {
		t.Errorf("Acquired changed from %v to %v although the subnets stayed", first.Acquired, again.Acquired)
	}
	// Expiry: revoke the lease (what a dead host's TTL does), then claim anew.
	sess := newSession(t, cli, 30)
	third, err := reg.Acquire(ctxT(t), sess.Lease(), cfg, Claim{Node: "a", Own: []clientv3.LeaseID{againSess.Lease()}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Revoke(ctxT(t), sess.Lease()); err != nil {
		t.Fatal(err)
	}
	if resp, _ := cli.Get(ctxT(t), reg.Keys().Lease("a")); len(resp.Kvs) != 0 {
		t.Fatal("lease record survived its lease")
	}
	// Meanwhile other hosts come and go.
	for i := range 5 {
		if _, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), cfg, Claim{Node: fmt.Sprintf("other-%d", i), PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.2")}}); err != nil {
			t.Fatal(err)
		}
	}
	back, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), cfg, Claim{Node: "a", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}})
	if err != nil {
		t.Fatal(err)
	}
	if back.Subnet != third.Subnet {
		t.Fatalf("after expiry got %v, want %v", back.Subnets(), third.Subnets())
	}
}

// A real TTL expiry frees the subnet lock and the record.
func TestLeaseExpiresWithTTL(t *testing.T) {
	cli, reg, cfg := startRegistry(t, `{"Network":"10.100.0.0/16"}`)
	sess := newSession(t, cli, 2)
	rec, err := reg.Acquire(ctxT(t), sess.Lease(), cfg, Claim{Node: "dying", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}})
	if err != nil {
		t.Fatal(err)
	}
	sess.Orphan() // stop keep-alives: the host died
	deadline := time.Now().Add(10 * time.Second)
	for {
		r1, _ := cli.Get(ctxT(t), reg.Keys().Lease("dying"))
		r2, _ := cli.Get(ctxT(t), reg.Keys().SubnetLock(rec.Subnet.V4))
		if len(r1.Kvs) == 0 && len(r2.Kvs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("lease of a dead host did not expire within TTL + 8s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The affinity record (no TTL) survives for the node's return.
	if r, _ := cli.Get(ctxT(t), reg.Keys().Node("dying")); len(r.Kvs) != 1 {
		t.Error("affinity record of the node is gone")
	}
}

func TestExhaustionAndReservation(t *testing.T) {
	// The cookbook's example: room for exactly three /25s.
	cli, reg, cfg := startRegistry(t, `{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.0.0","SubnetMax":"10.100.1.0"}`)
	// Reserve 10.100.0.128/25 for "pinned".
	if _, err := cli.Put(ctxT(t), reg.Keys().Reservation("pinned"), `{"Subnet":"10.100.0.128/25"}`); err != nil {
		t.Fatal(err)
	}
	got := map[netip.Prefix]bool{}
	for i := range 2 {
		rec, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), cfg, Claim{Node: fmt.Sprintf("h%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		if rec.Subnet.V4 == netip.MustParsePrefix("10.100.0.128/25") {
			t.Fatalf("h%d got the subnet reserved for pinned", i)
		}
		got[rec.Subnet.V4] = true
	}
	_, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), cfg, Claim{Node: "h2"})
	var ex *ExhaustedError
	if !errors.Is(err, ErrNoFreeSubnet) || !errors.As(err, &ex) || ex.InUse != 3 {
		t.Fatalf("fourth host: err %v, want out of subnets with 3 in use", err)
	}
	pinned, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), cfg, Claim{Node: "pinned"})
	if err != nil || pinned.Subnet.V4 != netip.MustParsePrefix("10.100.0.128/25") {
		t.Fatalf("pinned got %v, %v; want its reservation", pinned, err)
	}
	// Raising SubnetMax makes room without anything else changing.
	bigger := mustConfig(t, `{"Network":"10.100.0.0/16","SubnetLen":25,"SubnetMin":"10.100.0.0","SubnetMax":"10.100.1.128"}`)
	rec, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), bigger, Claim{Node: "h2"})
	if err != nil || rec.Subnet.V4 != netip.MustParsePrefix("10.100.1.128/25") {
		t.Fatalf("after raising SubnetMax: %v, %v", rec, err)
	}
}

// Candidate choice is independent of the range size: a /32 with /64s
// (2^32 candidates) leases like a small range.
func TestHugeRangeAndNearlyFull(t *testing.T) {
	cli, reg, huge := startRegistry(t, `{"IPv6Network":"2001:db8::/32","IPv6SubnetLen":64}`)
	if _, err := reg.Acquire(ctxT(t), newSession(t, cli, 30).Lease(), huge, Claim{Node: "x"}); err != nil {
		t.Fatal(err)
	}
	// 16 subnets, 15 taken: the random probes mostly miss, the gap search finds the last one.
	small := mustConfig(t, `{"Network":"10.1.0.0/24","SubnetLen":28}`)
	reg2 := NewRegistry(cli, "/small")
	sess := newSession(t, cli, 30)
	for i := range 16 {
		if _, err := reg2.Acquire(ctxT(t), sess.Lease(), small, Claim{Node: fmt.Sprintf("n%d", i)}); err != nil {
			t.Fatalf("n%d: %v", i, err)
		}
	}
	if _, err := reg2.Acquire(ctxT(t), sess.Lease(), small, Claim{Node: "n16"}); !errors.Is(err, ErrNoFreeSubnet) {
		t.Fatalf("17th claim in 16 subnets: %v", err)
	}
	resp, _ := cli.Get(ctxT(t), reg2.Keys().SubnetLocks(false), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if resp.Count != 16 {
		t.Errorf("%d subnet locks, want 16", resp.Count)
	}
}
