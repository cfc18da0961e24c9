package e2e

import (
	"context"
	be "encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/lease"
)

// In present mode, 100,000 solicitations for distinct addresses of a
// host's slice, sent by the upstream router as raw frames, leave the
// agent's memory and the bridge's neighbour table within the bounds
// Documentation/backends.md states, and the host's real container is
// still answered, during the flood and after it.
func TestNDPPresentModeFlood(t *testing.T) {
	l := up(t, lab.Config{Backend: "proxy-ndp", Hosts: 1, IPv6: true, BackendExtra: map[string]any{"Mode": "present"}})
	h := l.Hosts[0]
	if err := lab.PingUntil(ctx(t), l.Upstream.NS, h.Container.Addr6, 0, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	env, err := h.Env()
	if err != nil {
		t.Fatal(err)
	}
	pid := agentPID(h)
	rss0, _ := procRSS(pid)
	nh := testutil.NSHandle(t, h.NS)
	br, err := nh.LinkByName("cbr0")
	if err != nil {
		t.Fatal(err)
	}
	bridgeNeighs := func() int {
		ns, err := nh.NeighList(br.Attrs().Index, unix.AF_INET6)
		if err != nil {
			t.Fatal(err)
		}
		// A dump that races with changes may repeat entries: count addresses.
		seen := map[string]bool{}
		for _, e := range ns {
			if e.LinkIndex == br.Attrs().Index {
				seen[e.IP.String()] = true
			}
		}
		return len(seen)
	}
	base := bridgeNeighs()

	s, err := newNSSender(l.Upstream.NS, "eth0", lab.UpstreamRouter)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.close)
	const targets = 100_000
	done := make(chan time.Duration)
	go func() {
		start := time.Now()
		var f []byte
		for i := range targets {
			a := env.Subnet.V6.Masked().Addr().As16()
			be.BigEndian.PutUint32(a[12:], 0x10000+uint32(i)) // clear of the container's address
			f = s.appendNS(f[:0], netip.AddrFrom16(a))
			unix.Write(s.fd, f)
			if i%100 == 99 {
				time.Sleep(5 * time.Millisecond) // about 20,000 per second
			}
		}
		done <- time.Since(start)
	}()

	// During the flood: the router resolves the container again from
	// scratch and reaches it; the bridge's table stays within bounds.
	maxNeigh, rssMax := base, rss0
	var during error
	resolved := false
	var elapsed time.Duration
	for elapsed == 0 {
		select {
		case elapsed = <-done:
		case <-time.After(200 * time.Millisecond):
		}
		maxNeigh = max(maxNeigh, bridgeNeighs())
		rss, _ := procRSS(pid)
		rssMax = max(rssMax, rss)
		if !resolved {
			resolved = true
			_ = l.Upstream.FlushNeigh()
			during = lab.PingUntil(ctx(t), l.Upstream.NS, h.Container.Addr6, 0, 5*time.Second)
		}
	}
	time.Sleep(time.Second)
	maxNeigh = max(maxNeigh, bridgeNeighs())
	rss1, _ := procRSS(pid)
	rssMax = max(rssMax, rss1)
	t.Logf("%d solicitations in %v: bridge neighbour entries %d before, at most %d during; agent RSS %d KiB before, at most %d KiB during, %d KiB after",
		targets, elapsed.Round(time.Millisecond), base, maxNeigh, rss0>>10, rssMax>>10, rss1>>10)
	if during != nil {
		t.Errorf("router → container during the flood: %v", during)
	}
	// backends.md: at most 20 probes at once and 4 per second, each at
	// most two neighbour entries on the bridge (the address and its
	// solicited-node group).
	if limit := base + 2*(20+int(4*(elapsed+2*time.Second).Seconds())); maxNeigh > limit {
		t.Errorf("the bridge held %d neighbour entries during the flood, want at most %d (%d before, 2 per probe, 20 probes at once, 4/s)", maxNeigh, limit, base)
	}
	// backends.md: the present mode's state stays under 1 MiB; allow the
	// Go runtime's slack on top.
	if grow := rssMax - rss0; grow > 16<<20 {
		t.Errorf("the agent's RSS grew by %d KiB during the flood, want at most 16 MiB", grow>>10)
	}
	_ = l.Upstream.FlushNeigh()
	if err := lab.PingUntil(ctx(t), l.Upstream.NS, h.Container.Addr6, 0, 10*time.Second); err != nil {
		t.Errorf("router → container after the flood: %v", err)
	}
	wantMAC(t, l, h.Container.Addr6, h)
}

// When this host's lease keys are deleted in etcd and it cannot claim its
// slice again (another host took it), proxy-ndp stops answering for it at
// once, not only when the agent's session ends.
func TestNDPStopsWhenOwnKeysDeleted(t *testing.T) {
	// One /81 in the hosts' range (the other is above IPv6SubnetMax): once
	// it is taken, there is nothing else to claim.
	l := up(t, lab.Config{Backend: "proxy-ndp", Hosts: 1, IPv6: true, IPv6Network: "2001:db8:ab11:0:8000::/80", IPv6SubnetLen: 81, ReserveTop: 1})
	h := l.Hosts[0]
	rtr := l.Upstream
	if err := lab.PingUntil(ctx(t), rtr.NS, h.Container.Addr6, 0, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	env, err := h.Env()
	if err != nil {
		t.Fatal(err)
	}
	// In one transaction, as an operator reassigning the slice would: the
	// host's keys go, another host's record and subnet lock come.
	k := lease.NewKeys("")
	rec := mustJSON(synthPeer(l, "intruder", netip.Prefix{}, env.Subnet.V6, 0x99))
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	_, err = l.Client.Txn(c).Then(
		clientv3.OpDelete(k.Lease(h.Name)),
		clientv3.OpPut(k.Lease("intruder"), rec),
		clientv3.OpPut(k.SubnetLock(env.Subnet.V6), "intruder"),
	).Commit()
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	// The record's deletion reaches the agent through its lease watch,
	// the lock's new holder through the watch of its own locks (a
	// separate stream since the range watch of issue 18): whichever it
	// sees first, it stops serving the slice and says why.
	testutil.Eventually(t, 10*time.Second, "the agent logs that its keys were deleted or its lock taken", func() error {
		tail := l.LogTail(h, 200)
		if !strings.Contains(tail, "lease keys were deleted") && !strings.Contains(tail, "subnet lock was taken in etcd by another node") {
			return fmt.Errorf("not logged yet")
		}
		return nil
	})
	if err := rtr.FlushNeigh(); err != nil {
		t.Fatal(err)
	}
	_ = lab.Ping(ctx(t), rtr.NS, h.Container.Addr6, 0)
	testutil.Eventually(t, 6*time.Second, "the router's resolution fails", func() error {
		n, err := rtr.Neigh(h.Container.Addr6)
		if err != nil {
			return err
		}
		if strings.Contains(n, "lladdr") {
			t.Fatalf("the slice taken by another host is still answered: %s", n)
		}
		if !strings.Contains(n, "FAILED") && n != "" {
			return fmt.Errorf("%s", n)
		}
		return nil
	})
}
