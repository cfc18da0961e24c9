package lab

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
)

// BenchResult is one row of the datapath benchmark.
type BenchResult struct {
	Peers      int
	Routes     int
	AgentStart time.Duration // agent start → all 2N routes in the kernel
	IPBatch    time.Duration // ip -batch installing the same 2N routes as plain gateway routes
	// IPBatchNH is ip -batch installing them through one nexthop object
	// per route (`nexthop add id …` + `route add … nhid …`); zero when the
	// kernel refused nexthop objects.
	IPBatchNH  time.Duration
	PeakRSS    int64 // agent VmHWM in bytes
	NewPeerP50 time.Duration
	NewPeerP99 time.Duration
	NewPeerMax time.Duration
	// PutP99 is the p99 of the lease puts themselves (etcd's commit, with
	// its fsync), which each join latency includes.
	PutP99 time.Duration
	// AfterPutP99 is the p99 of each join's time from its put's answer to
	// its route (0 when the route came first): what leased adds to etcd.
	AfterPutP99   time.Duration
	NewPeerSample int
	// IdleCPU is the agent's CPU time divided by IdleWindow, measured with
	// no lease changes after the joins (0 when not measured).
	IdleCPU    float64
	IdleWindow time.Duration
}

// BenchOptions configure BenchDatapathWith.
type BenchOptions struct {
	Binary string // the leased agent
	Sizes  []int  // peer counts, each measured Runs times on a fresh lab
	Runs   int
	// NewPeers joins are timed (lease put → route), JoinInterval apart, so
	// that they spread across several resync periods.
	NewPeers     int
	JoinInterval time.Duration
	// IdleWindow is how long the idle agent's CPU is averaged, at the
	// largest size only; 0 skips it.
	IdleWindow time.Duration
	// PlainMax skips the plain-route ip -batch above this many peers (0:
	// never): at 50,000 it takes minutes on an idle machine, far longer
	// on a loaded one.
	PlainMax int
	Log      func(string, ...any)
}

// BenchDatapath measures, for each N in sizes, one host-gw host in a
// namespace with N synthetic dual-stack peers in etcd: the time from agent
// start until all 2N routes are in the kernel, the agent's peak RSS, the
// latency from a new peer lease to its route, and — on the same host
// namespace — the time `ip -batch` takes to install the same routes.
// Each size is measured runs times (at least once), each run on a fresh lab.
func BenchDatapath(ctx context.Context, binary string, sizes []int, runs, newPeers int, log func(string, ...any)) ([]BenchResult, error) {
	return BenchDatapathWith(ctx, BenchOptions{Binary: binary, Sizes: sizes, Runs: runs, NewPeers: newPeers, Log: log})
}

// BenchDatapathWith is BenchDatapath with every option.
func BenchDatapathWith(ctx context.Context, o BenchOptions) ([]BenchResult, error) {
	var out []BenchResult
	largest := slices.Max(o.Sizes)
	for _, n := range o.Sizes {
		for range max(o.Runs, 1) {
			oo := o
			if n != largest {
				oo.IdleWindow = 0
			}
			r, err := benchOne(ctx, oo, n)
			if err != nil {
				return out, err
			}
			out = append(out, r)
		}
	}
	return out, nil
}

// benchRun is one measured run of the datapath benchmark at one size: a
// fresh lab with one host-gw host whose agent is stopped, N synthetic
// peers in etcd, and the same routes as ip -batch input. Its steps run in
// the order of benchOne; each fills in its part of res.
type benchRun struct {
	ctx  context.Context
	o    BenchOptions
	n    int
	log  func(string, ...any)
	l    *Lab
	h    *Host
	own  subnetenv.Env
	g    *clientv3.LeaseGrantResponse
	next int // the next synthetic peer's index
	// The same 2N routes as ip -batch input: plain gateway routes per
	// family, and through one nexthop object per route.
	batch4, batch6, batchNH strings.Builder
	nsh                     netns.NsHandle
	nl                      *netlink.Handle
	res                     BenchResult
}

func benchOne(ctx context.Context, o BenchOptions, n int) (BenchResult, error) {
	b := &benchRun{ctx: ctx, o: o, n: n, log: o.Log, nsh: netns.None(), res: BenchResult{Peers: n, Routes: 2 * n}}
	defer b.close()
	if err := b.setup(); err != nil {
		return b.res, err
	}
	if err := b.ipBatches(); err != nil {
		return b.res, err
	}
	if err := b.agentStart(); err != nil {
		return b.res, err
	}
	if err := b.joins(); err != nil {
		return b.res, err
	}
	if err := b.idle(); err != nil {
		return b.res, err
	}
	return b.res, b.finish()
}

// close releases what setup made, in reverse order.
func (b *benchRun) close() {
	if b.nl != nil {
		b.nl.Close()
	}
	if b.nsh.IsOpen() {
		b.nsh.Close()
	}
	if b.l != nil {
		b.l.Close()
	}
}

// setup brings up the lab, stops its agent, puts the N peers into etcd
// (100 per transaction) while writing the ip -batch input for the same
// routes, and opens a netlink handle in the host's namespace.
func (b *benchRun) setup() error {
	ctx := b.ctx
	l, err := Up(ctx, Config{Hosts: 1, Backend: "host-gw", IPv4: true, IPv6: true, Network: "10.0.0.0/8", SubnetLen: 24,
		IPv6Network: "2001:db8::/32", IPv6SubnetLen: 64, Binary: b.o.Binary, LeaseTTL: 30 * time.Minute, Log: b.log})
	if err != nil {
		return err
	}
	b.l = l
	h := l.Hosts[0]
	b.h = h
	if err := l.StopAgent(h, syscall.SIGTERM); err != nil {
		return err
	}
	// N peers, each with a public IP of its own on the host's link, as in
	// a real cluster: IPv4 from benchPeerNet4 (an extra prefix on eth0),
	// IPv6 from the LAN's /64.
	if _, err := h.IP("addr", "add", benchPeerNet4.String(), "dev", "eth0"); err != nil {
		return fmt.Errorf("adding %s to eth0: %w", benchPeerNet4, err)
	}
	if b.g, err = l.Client.Grant(ctx, 3600); err != nil {
		return err
	}
	var ops []clientv3.Op
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		_, err := l.Client.Txn(ctx).Then(ops...).Commit()
		ops = ops[:0]
		return err
	}
	if b.own, err = h.Env(); err != nil {
		return err
	}
	for i := range b.n {
		rec := b.nextPeer()
		v, _ := json.Marshal(rec)
		ops = append(ops, clientv3.OpPut(lease.NewKeys("").Lease(rec.Node), string(v), clientv3.WithLease(b.g.ID)))
		fmt.Fprintf(&b.batch4, "route add %s via %s dev eth0 proto 76\n", rec.Subnet.V4, rec.PublicIP.V4)
		fmt.Fprintf(&b.batch6, "route add %s via %s dev eth0 proto 76\n", rec.Subnet.V6, rec.PublicIP.V6)
		id4, id6 := 1000000+2*i, 1000000+2*i+1
		fmt.Fprintf(&b.batchNH, "nexthop add id %d via %s dev eth0 proto 76\nroute add %s nhid %d proto 76\n", id4, rec.PublicIP.V4, rec.Subnet.V4, id4)
		fmt.Fprintf(&b.batchNH, "nexthop add id %d via %s dev eth0 proto 76\nroute add %s nhid %d proto 76\n", id6, rec.PublicIP.V6, rec.Subnet.V6, id6)
		if len(ops) == 100 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	if b.nsh, err = netns.GetFromName(h.NS); err != nil {
		return err
	}
	b.nl, err = netlink.NewHandleAt(b.nsh)
	return err
}

// nextPeer returns the next synthetic peer, never one of the host's own
// subnets.
func (b *benchRun) nextPeer() *lease.Record {
	for {
		rec := benchPeer(b.next)
		b.next++
		if rec.Subnet.V4 != b.own.Subnet.V4 && rec.Subnet.V6 != b.own.Subnet.V6 {
			return rec
		}
	}
}

// countRoutes counts the host's routes of protocol 76, both families.
func (b *benchRun) countRoutes() int {
	c := 0
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, _ := b.nl.RouteListFiltered(fam, &netlink.Route{Protocol: backend.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		c += len(rs)
	}
	return c
}

// flushRoutes removes every route and nexthop object of protocol 76.
func (b *benchRun) flushRoutes() error {
	// Nexthop objects first (ip -batch's or the agent's), which takes
	// the routes through them along: `ip route flush` cannot delete
	// those. An older kernel or ip has none to flush.
	_, _ = b.h.IP("nexthop", "flush", "proto", "76")
	for _, fam := range []string{"-4", "-6"} {
		if out, err := b.h.IP(fam, "route", "flush", "proto", "76"); err != nil {
			b.log("ip %s route flush proto 76: %v: %s", fam, err, out)
		}
	}
	if c := b.countRoutes(); c != 0 {
		return fmt.Errorf("%d routes left after flush", c)
	}
	return nil
}

// untilRoutes starts something that installs the 2N routes and times
// it until the last one is in the kernel. The routes are counted as the
// kernel announces them (RTM_NEWROUTE, proto 76) rather than by dumping
// the table in a loop: a dump of 10,000 routes every few milliseconds
// would take CPU from what is being measured. ip -batch and the agent
// are timed the same way, so the cost of reading the announcements is
// in both. A dump every 100ms backs the count up should the
// subscription overflow.
func (b *benchRun) untilRoutes(what string, start func() error) (time.Duration, error) {
	n := b.n
	if err := b.flushRoutes(); err != nil {
		return 0, err
	}
	updates := make(chan netlink.RouteUpdate, 4096)
	done := make(chan struct{})
	defer close(done)
	overflow := make(chan error, 1)
	if err := netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{
		Namespace: &b.nsh, ReceiveBufferSize: 64 << 20, ReceiveBufferForceSize: true,
		ErrorCallback: func(err error) {
			select {
			case overflow <- err:
			default:
			}
		},
	}); err != nil {
		return 0, err
	}
	seen := make(map[netip.Prefix]bool, 2*n)
	t0 := time.Now()
	if err := start(); err != nil {
		return 0, err
	}
	deadline := time.After(15 * time.Minute)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
count:
	for len(seen) < 2*n {
		select {
		case u := <-updates:
			if u.Type == syscall.RTM_NEWROUTE && u.Protocol == backend.RouteProtocol && u.Dst != nil {
				if p, ok := netipx(u.Dst); ok {
					seen[p] = true
				}
			}
		case err := <-overflow:
			b.log("route subscription: %v; counting by dumps", err)
		case <-tick.C:
			if b.countRoutes() >= 2*n {
				break count
			}
		case <-deadline:
			return 0, fmt.Errorf("%s installed %d of %d routes within 15m", what, b.countRoutes(), 2*n)
		}
	}
	took := time.Since(t0)
	if c := b.countRoutes(); c != 2*n {
		return took, fmt.Errorf("%s: %d routes in the kernel, want %d", what, c, 2*n)
	}
	b.log("%s: %d routes in %s (t0 %s)", what, 2*n, took, t0.Format("15:04:05.000000"))
	return took, nil
}

// runBatch times `ip -batch` installing text (written to file in the
// host's directory) until all 2N routes are in the kernel.
func (b *benchRun) runBatch(what, file, text string) (time.Duration, error) {
	bf := filepath.Join(b.h.Dir, file)
	if err := os.WriteFile(bf, []byte(text), 0o644); err != nil {
		return 0, err
	}
	ipBatch := exec.Command("ip", "-n", b.h.NS, "-batch", bf)
	var ipOut strings.Builder
	ipBatch.Stdout, ipBatch.Stderr = &ipOut, &ipOut
	took, err := b.untilRoutes(what, ipBatch.Start)
	if werr := ipBatch.Wait(); werr != nil {
		return took, fmt.Errorf("%s: %v: %s", what, werr, ipOut.String())
	}
	return took, err
}

// ipBatches runs the ip -batch baselines, on the same namespace: plain
// gateway routes (unless above PlainMax), then routes through nexthop
// objects.
func (b *benchRun) ipBatches() error {
	var err error
	if b.o.PlainMax == 0 || b.n <= b.o.PlainMax {
		if b.res.IPBatch, err = b.runBatch("ip -batch", "routes.batch", b.batch4.String()+b.batch6.String()); err != nil {
			return err
		}
	}
	if b.res.IPBatchNH, err = b.runBatch("ip -batch (nexthops)", "routes-nh.batch", b.batchNH.String()); err != nil {
		// Kernels before 5.3 have no nexthop objects: the column stays empty.
		b.log("%v", err)
		b.res.IPBatchNH = 0
	}
	return nil
}

// agentStart times agent start → 2N routes.
func (b *benchRun) agentStart() error {
	var err error
	b.res.AgentStart, err = b.untilRoutes("agent", func() error { return b.l.StartAgent(b.h) })
	if err != nil {
		return fmt.Errorf("%w; log:\n%s", err, b.l.LogTail(b.h, 20))
	}
	b.log("agent log after start with %d peers:\n%s", b.n, b.l.LogTail(b.h, 0))
	return nil
}

// joins times NewPeers joins, JoinInterval apart: new peer lease put →
// its route, seen by a route subscription in the namespace.
func (b *benchRun) joins() error {
	ctx := b.ctx
	updates := make(chan netlink.RouteUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.RouteSubscribeAt(b.nsh, updates, done); err != nil {
		return err
	}
	var lat, puts []time.Duration
	var joins []joinTimes // for the hop trace (jointrace.go)
	var bw *benchWatch
	if traceHops() {
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		bw = startBenchWatch(wctx, b.l.Client)
	}
	for j := range b.o.NewPeers {
		if j > 0 && b.o.JoinInterval > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(b.o.JoinInterval):
			}
		}
		rec := b.nextPeer()
		rec.Subnet.V6, rec.PublicIP.V6 = netip.Prefix{}, netip.Addr{}
		v, _ := json.Marshal(rec)
		want := rec.Subnet.V4.String()
		gc0 := benchGCCycles()
		t0 := time.Now()
		if _, err := b.l.Client.Put(ctx, lease.NewKeys("").Lease(rec.Node), string(v), clientv3.WithLease(b.g.ID)); err != nil {
			return err
		}
		puts = append(puts, time.Since(t0))
		jt := joinTimes{node: rec.Node, sent: t0, answered: t0.Add(puts[len(puts)-1])}
		timeout := time.After(5 * time.Second)
	wait:
		for {
			select {
			case u := <-updates:
				if u.Type == syscall.RTM_NEWROUTE && u.Dst != nil && u.Dst.String() == want {
					lat = append(lat, time.Since(t0))
					jt.seen, jt.gc = t0.Add(lat[len(lat)-1]), benchGCCycles()-gc0
					joins = append(joins, jt)
					break wait
				}
			case <-timeout:
				inKernel := "not in the kernel either"
				if rs, err := b.nl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: netipNet(rec.Subnet.V4)}, netlink.RT_FILTER_DST); err == nil && len(rs) > 0 {
					inKernel = fmt.Sprintf("but the kernel has it (%d route(s)): its event did not reach the bench's subscription", len(rs))
				}
				return fmt.Errorf("no route event for new peer %s within 5s, %s; agent log tail:\n%s", want, inKernel, b.l.LogTail(b.h, 30))
			}
		}
	}
	if traceHops() {
		logJoinTrace(b.log, joins, bw, b.l.LogTail(b.h, 0))
	}
	b.res.joinStats(lat, puts)
	return nil
}

// joinStats fills in the join columns from each join's latency and its
// put's duration (same order).
func (res *BenchResult) joinStats(lat, puts []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	res.NewPeerP50 = lat[len(lat)/2]
	res.NewPeerP99 = lat[min(len(lat)-1, len(lat)*99/100)]
	res.NewPeerMax = lat[len(lat)-1]
	res.NewPeerSample = len(lat)
	after := make([]time.Duration, len(lat))
	for i := range lat {
		after[i] = max(0, lat[i]-puts[i])
	}
	slices.Sort(after)
	res.AfterPutP99 = after[min(len(after)-1, len(after)*99/100)]
	slices.Sort(puts)
	res.PutP99 = puts[min(len(puts)-1, len(puts)*99/100)]
}

// idle measures the agent's own CPU time (utime+stime) over IdleWindow,
// with no lease changes; children (iptables runs of the periodic check)
// are counted once they are reaped. IdleWindow 0 skips it.
func (b *benchRun) idle() error {
	if b.o.IdleWindow <= 0 {
		return nil
	}
	pid := b.h.cmd.Process.Pid
	c0, ch0, err := procCPU(pid)
	if err != nil {
		return err
	}
	t0 := time.Now()
	b.log("measuring the idle agent's CPU for %s", b.o.IdleWindow)
	select {
	case <-b.ctx.Done():
		return b.ctx.Err()
	case <-time.After(b.o.IdleWindow):
	}
	c1, ch1, err := procCPU(pid)
	if err != nil {
		return err
	}
	b.res.IdleWindow = time.Since(t0)
	b.res.IdleCPU = float64(c1-c0) / float64(b.res.IdleWindow)
	b.log("idle CPU: agent %s (of which its reaped children, such as iptables runs: %s) in %s", c1-c0, ch1-ch0, b.res.IdleWindow)
	return nil
}

// finish reads the agent's peak RSS, logs the result and stops the agent.
func (b *benchRun) finish() error {
	pid := b.h.cmd.Process.Pid
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	b.res.PeakRSS = vmHWM(string(status))
	b.log("result: %+v", b.res)
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "Rss") { // file-backed (binary) vs anonymous (heap)
			b.log("agent %s", line)
		}
	}
	return b.l.StopAgent(b.h, syscall.SIGTERM)
}

// benchPeerNet4 is added to the bench host's eth0 so that every synthetic
// peer has an on-link IPv4 address of its own (100.64.0.2 on); the
// host keeps its LAN address as its first.
var benchPeerNet4 = netip.MustParsePrefix("100.64.0.1/10")

// benchPeer is the i-th synthetic peer: 10.x.y.0/24, 2001:db8:i::/64, and
// public addresses of its own: 100.64.0.0/10 + i + 2 and the lab LAN's
// /64 with i + 0x10000 in its last 32 bits (no other peer shares a
// gateway, as in a real cluster; the kernel's cost of plain gateway
// routes depends on that).
func benchPeer(i int) *lease.Record {
	i4 := uint32(i + 1)
	var a6 [16]byte
	copy(a6[:4], []byte{0x20, 0x01, 0x0d, 0xb8})
	binary.BigEndian.PutUint32(a6[4:8], i4)
	g4b := benchPeerNet4.Masked().Addr().As4()
	binary.BigEndian.PutUint32(g4b[:], binary.BigEndian.Uint32(g4b[:])+uint32(i)+2)
	_, lan6 := lanAddr(0, 0)
	g6b := lan6.As16()
	binary.BigEndian.PutUint32(g6b[12:], uint32(i)+0x10000)
	g4, g6 := netip.AddrFrom4(g4b), netip.AddrFrom16(g6b)
	return &lease.Record{
		Node:        "peer-" + strconv.Itoa(i),
		Subnet:      ipfam.Pair[netip.Prefix]{V4: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i4 >> 8), byte(i4), 0}), 24), V6: netip.PrefixFrom(netip.AddrFrom16(a6), 64)},
		PublicIP:    ipfam.Pair[netip.Addr]{V4: g4, V6: g6},
		BackendType: "host-gw",
	}
}

func netipx(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// procCPU returns the user and system CPU time of process pid
// (/proc/<pid>/stat fields 14 and 15, and 16–17 for reaped children).
func procCPU(pid int) (all, children time.Duration, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:]) // fields from 3 on
	if len(f) < 15 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	var ticks [4]int64
	for i, x := range f[11:15] { // utime stime cutime cstime
		ticks[i], _ = strconv.ParseInt(x, 10, 64)
	}
	d := func(t int64) time.Duration { return time.Duration(t) * time.Second / 100 } // USER_HZ is 100 on Linux
	return d(ticks[0] + ticks[1] + ticks[2] + ticks[3]), d(ticks[2] + ticks[3]), nil
}

// vmHWM reads the peak resident set (VmHWM) in bytes from a
// /proc/<pid>/status text, or 0.
func vmHWM(status string) int64 {
	for _, line := range strings.Split(status, "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				return kb * 1024
			}
		}
	}
	return 0
}

// PrintBench writes the results as a table, one row per run, and for a
// peer count measured more than once a median row (each column's median).
func PrintBench(w io.Writer, rs []BenchResult) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "peers\troutes\tagent start→routes\tip -batch\tip -batch nexthops\tratio (nexthops)\tpeak RSS\tjoins\tjoin p50\tp99\tmax\tetcd put p99\tput→route p99\tidle CPU\t")
	row := func(label string, r BenchResult) {
		ratio, nh := "-", "-"
		if r.IPBatchNH > 0 {
			ratio = fmt.Sprintf("%.2f×", float64(r.AgentStart)/float64(r.IPBatchNH))
			nh = r.IPBatchNH.Round(time.Millisecond).String()
		}
		idle := "-"
		if r.IdleWindow > 0 {
			idle = fmt.Sprintf("%.2f%% over %s", 100*r.IdleCPU, r.IdleWindow.Round(time.Second))
		}
		plain := "-"
		if r.IPBatch > 0 {
			plain = r.IPBatch.Round(time.Millisecond).String()
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%.1f MB\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t\n", label, r.Routes, r.AgentStart.Round(time.Millisecond),
			plain, nh, ratio, float64(r.PeakRSS)/(1<<20), r.NewPeerSample,
			r.NewPeerP50.Round(10*time.Microsecond), r.NewPeerP99.Round(10*time.Microsecond), r.NewPeerMax.Round(10*time.Microsecond), r.PutP99.Round(10*time.Microsecond), r.AfterPutP99.Round(10*time.Microsecond), idle)
	}
	for i, r := range rs {
		row(strconv.Itoa(r.Peers), r)
		last := i == len(rs)-1 || rs[i+1].Peers != r.Peers
		if !last {
			continue
		}
		var same []BenchResult
		for j := i; j >= 0 && rs[j].Peers == r.Peers; j-- {
			same = append(same, rs[j])
		}
		if len(same) > 1 {
			row(fmt.Sprintf("median of %d", len(same)), medianResult(same))
		}
	}
	tw.Flush()
}

// medianResult takes the median of each column separately (the ratio
// column of its row is then the ratio of the medians).
func medianResult(rs []BenchResult) BenchResult {
	med := func(f func(BenchResult) int64) int64 {
		v := make([]int64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	d := func(f func(BenchResult) time.Duration) time.Duration {
		return time.Duration(med(func(r BenchResult) int64 { return int64(f(r)) }))
	}
	return BenchResult{
		Peers: rs[0].Peers, Routes: rs[0].Routes,
		AgentStart:    d(func(r BenchResult) time.Duration { return r.AgentStart }),
		IPBatch:       d(func(r BenchResult) time.Duration { return r.IPBatch }),
		IPBatchNH:     d(func(r BenchResult) time.Duration { return r.IPBatchNH }),
		NewPeerMax:    d(func(r BenchResult) time.Duration { return r.NewPeerMax }),
		IdleCPU:       float64(med(func(r BenchResult) int64 { return int64(r.IdleCPU * 1e6) })) / 1e6,
		IdleWindow:    d(func(r BenchResult) time.Duration { return r.IdleWindow }),
		NewPeerSample: rs[0].NewPeerSample,
		PeakRSS:       med(func(r BenchResult) int64 { return r.PeakRSS }),
		NewPeerP50:    d(func(r BenchResult) time.Duration { return r.NewPeerP50 }),
		NewPeerP99:    d(func(r BenchResult) time.Duration { return r.NewPeerP99 }),
		PutP99:        d(func(r BenchResult) time.Duration { return r.PutP99 }),
		AfterPutP99:   d(func(r BenchResult) time.Duration { return r.AfterPutP99 }),
	}
}

func netipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
