package lease

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/testutil/etcdtest"
)

const benchConfig = `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/32","IPv6SubnetLen":64}`

// fillLeases writes the network config (benchConfig) and n dual-stack
// leases (record plus both subnet locks) under one etcd lease, 40 hosts
// per transaction.
func fillLeases(b testing.TB, cli *clientv3.Client, reg *Registry, n int) {
	b.Helper()
	if _, err := cli.Put(context.Background(), reg.Keys().Config(), benchConfig); err != nil {
		b.Fatal(err)
	}
	fillMore(b, cli, reg, 0, n, n)
}

// fillMore writes fillLeases' leases lo to hi-1 of a network of n, under
// a new etcd lease.
func fillMore(b testing.TB, cli *clientv3.Client, reg *Registry, lo, hi, n int) {
	ctx := context.Background()
	g, err := cli.Grant(ctx, 3600)
	if err != nil {
		b.Fatal(err)
	}
	var ops []clientv3.Op
	flush := func() {
		if len(ops) == 0 {
			return
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			b.Fatal(err)
		}
		ops = ops[:0]
	}
	for i := lo; i < hi; i++ {
		// Spread IPv4 subnets over the /8 (every index of 65536 scaled), IPv6 at random-looking indices.
		i4 := uint32(i) * 65536 / uint32(n)
		s4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i4 >> 8), byte(i4), 0}), 24)
		var a6 [16]byte
		a6[0], a6[1], a6[2], a6[3] = 0x20, 0x01, 0x0d, 0xb8
		binary.BigEndian.PutUint32(a6[4:8], uint32(i)*2654435761)
		s6 := netip.PrefixFrom(netip.AddrFrom16(a6), 64)
		node := fmt.Sprintf("filler-%05d", i)
		rec := Record{Node: node, Subnet: ipfam.Pair[netip.Prefix]{V4: s4, V6: s6}, PublicIP: ipfam.Pair[netip.Addr]{V4: netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)})}, BackendType: "host-gw"}
		v, _ := json.Marshal(rec)
		l := clientv3.WithLease(g.ID)
		ops = append(ops, clientv3.OpPut(reg.Keys().SubnetLock(s4), node, l), clientv3.OpPut(reg.Keys().SubnetLock(s6), node, l),
			clientv3.OpPut(reg.Keys().Lease(node), string(v), l))
		if len(ops) >= 120 {
			flush()
		}
	}
	flush()
}

var benchN = 50000

// BenchmarkAcquire50k: a new host joins a network that already has 50,000
// dual-stack leases (/8 with /24s: 76% full; /32 with /64s): grant its etcd
// lease and claim an IPv4 and an IPv6 subnet.
func BenchmarkAcquire50k(b *testing.B) {
	_, cli := etcdtest.Start(b)
	reg := NewRegistry(cli, "")
	cfg := mustConfig(b, benchConfig)
	fillLeases(b, cli, reg, benchN)
	ctx := context.Background()
	i := 0
	b.ResetTimer()
	for b.Loop() {
		sess, err := NewSession(context.Background(), cli, time.Minute, 10*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := reg.Acquire(ctx, sess.Lease(), cfg, Claim{Node: fmt.Sprintf("new-%d", i), PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}}); err != nil {
			b.Fatal(err)
		}
		i++
		sess.Orphan()
	}
}

// BenchmarkReady50k: what a starting agent does before it can program the
// datapath, with 50,000 leases present: list the config and every lease
// at one revision and decode them, claim its lease meanwhile, and filter
// the peers.
func BenchmarkReady50k(b *testing.B) {
	cli := benchEtcd(b)
	reg := NewRegistry(cli, "")
	fillLeases(b, cli, reg, benchN)
	benchReady(b, cli, reg, false, func(ctx context.Context, ch chan Batch) { go reg.Watch(ctx, ch) })
}

// BenchmarkReady50kFromCache: Ready50k for an agent restarting with the
// lease cache its previous run saved: claim, load the cache, check it
// against etcd and resume the watch, filter the peers.
func BenchmarkReady50kFromCache(b *testing.B) {
	cli := benchEtcd(b)
	reg := NewRegistry(cli, "")
	fillLeases(b, cli, reg, benchN)
	v := listView(reg)
	path := filepath.Join(b.TempDir(), "leases.cache")
	if err := SaveSnapshot(path, reg.Keys().Prefix(), v); err != nil {
		b.Fatal(err)
	}
	benchReady(b, cli, reg, true, func(ctx context.Context, ch chan Batch) {
		h, decode, err := OpenSnapshot(path)
		if err != nil || !reg.Usable(ctx, h) {
			b.Fatal("cache not usable", err)
		}
		go reg.WatchFromSnapshot(ctx, h, decode, ch)
	})
}

// listView returns the view of etcd's leases that one listing gives.
func listView(reg *Registry) *View {
	ch := make(chan Batch, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go reg.Watch(ctx, ch)
	var v View
	v.Apply(<-ch)
	return &v
}

// benchReady times, per iteration: follow (which starts delivering the
// lease set to ch) and, meanwhile, a new node's session and claim; then
// the first batch and the peer set (the peer filter and the map of
// accepted peers the agent hands to the backend).
func benchReady(b *testing.B, cli *clientv3.Client, reg *Registry, fromCache bool, follow func(context.Context, chan Batch)) {
	cfg := mustConfig(b, benchConfig)
	i := 0
	cpu0 := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		ch := make(chan Batch, 1)
		follow(ctx, ch)
		// The agent claims while the listing streams, after reading the
		// config key on its own (claimEarly in cmd/leased).
		if _, err := cli.Get(ctx, reg.Keys().Config()); err != nil {
			b.Fatal(err)
		}
		sess, err := NewSession(context.Background(), cli, time.Minute, 10*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		self, err := reg.Acquire(ctx, sess.Lease(), cfg, Claim{Node: fmt.Sprintf("ready-%d", i), PublicIP: ipfam.Pair[netip.Addr]{V4: netip.MustParseAddr("192.0.2.1")}})
		if err != nil {
			b.Fatal(err)
		}
		var v View
		first := <-ch
		if fromCache && !first.FromCache {
			b.Fatal("the lease cache was not used")
		}
		v.Apply(first)
		// What the agent builds its hand-over to the backend from.
		ps := NewPeerSet(cfg, self, v.Records)
		if n := len(ps.Accepted()); n < benchN {
			b.Fatalf("%d peers, want at least %d", n, benchN)
		}
		cancel()
		sess.Orphan()
		i++
	}
	// CPU time of the whole process (etcd included) per op: unlike the
	// wall time, it does not grow when the hypervisor steals cycles.
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Millisecond)/float64(b.N), "cpu-ms/op")
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchEtcd is the etcd the READY benchmarks use: embedded in the
// benchmark process, or the etcd at $LEASED_BENCH_ETCD (a separate
// process, as in production; its data is replaced).
func benchEtcd(b *testing.B) *clientv3.Client {
	ep := os.Getenv("LEASED_BENCH_ETCD")
	if ep == "" {
		_, cli := etcdtest.Start(b)
		return cli
	}
	cli := etcdtest.Client(b, ep)
	if _, err := cli.Delete(context.Background(), DefaultPrefix, clientv3.WithPrefix()); err != nil {
		b.Fatal(err)
	}
	return cli
}

// BenchmarkRead50kFloor is the floor under Ready50k's fresh start: etcd's
// read of the config and the 50,000 lease records in one transaction, as
// the listing does, with nothing decoded (no claim, no peer filter). What
// Ready50k takes beyond this is the agent's own work.
func BenchmarkRead50kFloor(b *testing.B) {
	cli := benchEtcd(b)
	reg := NewRegistry(cli, "")
	fillLeases(b, cli, reg, benchN)
	k := reg.Keys()
	cpu0 := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		resp, err := cli.Txn(ctx).Then(clientv3.OpGet(k.Config()), clientv3.OpGet(k.Leases(), clientv3.WithPrefix())).Commit()
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		if n := len(resp.Responses[1].GetResponseRange().Kvs); n != benchN {
			b.Fatalf("read %d records", n)
		}
	}
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(time.Millisecond)/float64(b.N), "cpu-ms/op")
}

// BenchmarkDecodeRecords50k is the JSON decoding of 50,000 dual-stack lease
// values, as a listing decodes them, without etcd.
func BenchmarkDecodeRecords50k(b *testing.B) {
	vals := make([][]byte, benchN)
	nodes := make([]string, benchN)
	for i := range vals {
		var a6 [16]byte
		a6[0], a6[1], a6[2], a6[3] = 0x20, 0x01, 0x0d, 0xb8
		binary.BigEndian.PutUint32(a6[4:8], uint32(i)*2654435761)
		nodes[i] = fmt.Sprintf("filler-%05d", i)
		vals[i] = fmt.Appendf(nil, `{"Node":%q,"Subnet":"10.%d.%d.0/24","IPv6Subnet":%q,"PublicIP":"172.16.%d.%d","BackendType":"host-gw","Acquired":"2026-01-02T03:04:05Z"}`,
			nodes[i], byte(i>>8), byte(i), netip.PrefixFrom(netip.AddrFrom16(a6), 64).String(), byte(i>>8), byte(i))
	}
	recs := make([]Record, benchN)
	b.ResetTimer()
	for b.Loop() {
		for i := range vals {
			if err := decodeRecordInto(nodes[i], vals[i], &recs[i]); err != nil {
				b.Fatal(err)
			}
		}
	}
}
