package lease

import (
	"context"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// An agent restart that keeps its subnets does not write its affinity
// record (nodes/<node>, no lease) again: every watcher of the prefix gets
// the record and the lock, which move to the new etcd lease, and nothing
// else. A changed subnet still updates the affinity.
func TestRestartDoesNotRewriteAffinity(t *testing.T) {
	cli, reg, cfg := startRegistry(t, `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/32","IPv6SubnetLen":64}`)
	first := newSession(t, cli, 30)
	rec, err := reg.Acquire(ctxT(t), first.Lease(), cfg, Claim{Node: "a", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	wch := cli.Watch(ctx, reg.Keys().Prefix(), clientv3.WithPrefix(), clientv3.WithRev(rec.ModRev+1))
	again := newSession(t, cli, 30)
	rec2, err := reg.Acquire(ctxT(t), again.Lease(), cfg, Claim{Node: "a", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}, Own: []clientv3.LeaseID{first.Lease()}})
	if err != nil {
		t.Fatal(err)
	}
	if rec2.Subnet != rec.Subnet {
		t.Fatalf("the restart moved the host from %v to %v", rec.Subnets(), rec2.Subnets())
	}
	var keys []string
	for quiet := false; !quiet; {
		select {
		case resp := <-wch:
			for _, ev := range resp.Events {
				keys = append(keys, string(ev.Kv.Key))
			}
		case <-time.After(time.Second):
			quiet = true
		}
	}
	want := map[string]bool{reg.Keys().Lease("a"): true, reg.Keys().SubnetLock(rec.Subnet.V4): true, reg.Keys().SubnetLock(rec.Subnet.V6): true}
	if len(keys) != len(want) {
		t.Errorf("the restart sent watchers %d events %v; want only the record and the two locks", len(keys), keys)
	}
	for _, k := range keys {
		if !want[k] {
			t.Errorf("the restart rewrote %s", k)
		}
	}

	// The affinity still follows a change of subnet.
	if _, err := cli.Delete(ctxT(t), reg.Keys().Lease("a")); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctxT(t), reg.Keys().Reservation("a"), `{"Subnet":"10.9.9.0/24"}`); err != nil {
		t.Fatal(err)
	}
	third := newSession(t, cli, 30)
	if _, err := reg.Acquire(ctxT(t), third.Lease(), cfg, Claim{Node: "a", PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}, Own: []clientv3.LeaseID{first.Lease(), again.Lease()}}); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctxT(t), reg.Keys().Node("a"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("affinity of a: %v, %v", resp, err)
	}
	if aff, _ := decodeAffinity(resp.Kvs[0].Value); aff.Subnet != netip.MustParsePrefix("10.9.9.0/24") {
		t.Errorf("after a move to 10.9.9.0/24 the affinity says %s", resp.Kvs[0].Value)
	}
}

// Hosts whose watches broke at the same moment do not retry at the same
// moment: the waits of one backoff step spread over half its delay.
func TestBackoffSpreadsRetries(t *testing.T) {
	const n = 50
	wakes := make([]time.Time, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			newBackoff().wait(context.Background())
			wakes[i] = time.Now()
		}()
	}
	wg.Wait()
	lo, hi := wakes[0], wakes[0]
	for _, w := range wakes {
		if w.Before(lo) {
			lo = w
		}
		if w.After(hi) {
			hi = w
		}
	}
	// Without jitter all 50 wake within a few ms of each other; with it
	// they spread over about 50 ms (100 ms delay, waits in [50, 100] ms).
	if spread := hi.Sub(lo); spread < 20*time.Millisecond {
		t.Errorf("%d retries of one backoff step spread over only %s", n, spread)
	}
}

// The delay a retry log line names (peek) is the one the retry waits, not
// the jitter's upper bound: a user reading "retry=73ms" sees the retry 73
// ms later.
func TestBackoffLogsTheDelayItWaits(t *testing.T) {
	b := newBackoff()
	for range 10 {
		d := b.peek()
		if again := b.peek(); again != d {
			t.Fatalf("peek changed from %s to %s without a wait", d, again)
		}
		start := time.Now()
		b.wait(context.Background())
		if took := time.Since(start); took < d {
			t.Fatalf("logged retry=%s, but the wait took %s", d, took)
		}
		b.reset()
	}
}
