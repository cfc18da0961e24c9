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

func benchOne(ctx context.Context, o BenchOptions, n int) (BenchResult, error) {
	log, newPeers := o.Log, o.NewPeers
	res := BenchResult{Peers: n, Routes: 2 * n}
	l, err := Up(ctx, Config{Hosts: 1, Backend: "host-gw", IPv4: true, IPv6: true, Network: "10.0.0.0/8", SubnetLen: 24,
		IPv6Network: "2001:db8::/32", IPv6SubnetLen: 64, Binary: o.Binary, LeaseTTL: 30 * time.Minute, Log: log})
	if err != nil {
		return res, err
	}
	defer l.Close()
	h := l.Hosts[0]
	if err := l.StopAgent(h, syscall.SIGTERM); err != nil {
		return res, err
	}
	// N peers, each with a public IP of its own on the host's link, as in
	// a real cluster: IPv4 from benchPeerNet4 (an extra prefix on eth0),
	// IPv6 from the LAN's /64.
	if _, err := h.IP("addr", "add", benchPeerNet4.String(), "dev", "eth0"); err != nil {
		return res, fmt.Errorf("adding %s to eth0: %w", benchPeerNet4, err)
	}
	g, err := l.Client.Grant(ctx, 3600)
	if err != nil {
		return res, err
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
	own, err := h.Env()
	if err != nil {
		return res, err
	}
	next := 0
	nextPeer := func() *lease.Record { // synthetic peers, never the host's own subnets
		for {
			rec := benchPeer(next)
			next++
			if rec.Subnet.V4 != own.Subnet.V4 && rec.Subnet.V6 != own.Subnet.V6 {
				return rec
			}
		}
	}
	var batch4, batch6, batchNH strings.Builder
	for i := range n {
		rec := nextPeer()
		v, _ := json.Marshal(rec)
		ops = append(ops, clientv3.OpPut(lease.NewKeys("").Lease(rec.Node), string(v), clientv3.WithLease(g.ID)))
		fmt.Fprintf(&batch4, "route add %s via %s dev eth0 proto 76\n", rec.Subnet.V4, rec.PublicIP.V4)
		fmt.Fprintf(&batch6, "route add %s via %s dev eth0 proto 76\n", rec.Subnet.V6, rec.PublicIP.V6)
		id4, id6 := 1000000+2*i, 1000000+2*i+1
		fmt.Fprintf(&batchNH, "nexthop add id %d via %s dev eth0 proto 76\nroute add %s nhid %d proto 76\n", id4, rec.PublicIP.V4, rec.Subnet.V4, id4)
		fmt.Fprintf(&batchNH, "nexthop add id %d via %s dev eth0 proto 76\nroute add %s nhid %d proto 76\n", id6, rec.PublicIP.V6, rec.Subnet.V6, id6)
		if len(ops) == 100 {
			if err := flush(); err != nil {
				return res, err
			}
		}
	}
	if err := flush(); err != nil {
		return res, err
	}
	nsh, err := netns.GetFromName(h.NS)
	if err != nil {
		return res, err
	}
	defer nsh.Close()
	nl, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return res, err
	}
	defer nl.Close()
	countRoutes := func() int {
		c := 0
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			rs, _ := nl.RouteListFiltered(fam, &netlink.Route{Protocol: backend.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
			c += len(rs)
		}
		return c
	}
	flushRoutes := func() error {
		// Nexthop objects first (ip -batch's or the agent's), which takes
		// the routes through them along: `ip route flush` cannot delete
		// those. An older kernel or ip has none to flush.
		_, _ = h.IP("nexthop", "flush", "proto", "76")
		for _, fam := range []string{"-4", "-6"} {
			if out, err := h.IP(fam, "route", "flush", "proto", "76"); err != nil {
				log("ip %s route flush proto 76: %v: %s", fam, err, out)
			}
		}
		if c := countRoutes(); c != 0 {
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
	untilRoutes := func(what string, start func() error) (time.Duration, error) {
		if err := flushRoutes(); err != nil {
			return 0, err
		}
		updates := make(chan netlink.RouteUpdate, 4096)
		done := make(chan struct{})
		defer close(done)
		overflow := make(chan error, 1)
		if err := netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{
			Namespace: &nsh, ReceiveBufferSize: 64 << 20, ReceiveBufferForceSize: true,
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
				log("route subscription: %v; counting by dumps", err)
			case <-tick.C:
				if countRoutes() >= 2*n {
					break count
				}
			case <-deadline:
				return 0, fmt.Errorf("%s installed %d of %d routes within 15m", what, countRoutes(), 2*n)
			}
		}
		took := time.Since(t0)
		if c := countRoutes(); c != 2*n {
			return took, fmt.Errorf("%s: %d routes in the kernel, want %d", what, c, 2*n)
		}
		log("%s: %d routes in %s (t0 %s)", what, 2*n, took, t0.Format("15:04:05.000000"))
		return took, nil
	}

	// ip -batch baselines, on the same namespace: plain gateway routes,
	// then routes through nexthop objects.
	runBatch := func(what, file, text string) (time.Duration, error) {
		bf := filepath.Join(h.Dir, file)
		if err := os.WriteFile(bf, []byte(text), 0o644); err != nil {
			return 0, err
		}
		ipBatch := exec.Command("ip", "-n", h.NS, "-batch", bf)
		var ipOut strings.Builder
		ipBatch.Stdout, ipBatch.Stderr = &ipOut, &ipOut
		took, err := untilRoutes(what, ipBatch.Start)
		if werr := ipBatch.Wait(); werr != nil {
			return took, fmt.Errorf("%s: %v: %s", what, werr, ipOut.String())
		}
		return took, err
	}
	if o.PlainMax == 0 || n <= o.PlainMax {
		if res.IPBatch, err = runBatch("ip -batch", "routes.batch", batch4.String()+batch6.String()); err != nil {
			return res, err
		}
	}
	if res.IPBatchNH, err = runBatch("ip -batch (nexthops)", "routes-nh.batch", batchNH.String()); err != nil {
		// Kernels before 5.3 have no nexthop objects: the column stays empty.
		log("%v", err)
		res.IPBatchNH = 0
	}

	// Agent start → 2N routes.
	res.AgentStart, err = untilRoutes("agent", func() error { return l.StartAgent(h) })
	if err != nil {
		return res, fmt.Errorf("%w; log:\n%s", err, l.LogTail(h, 20))
	}
	log("agent log after start with %d peers:\n%s", n, l.LogTail(h, 0))

	// New peer → route, measured with a route subscription in the namespace.
	updates := make(chan netlink.RouteUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.RouteSubscribeAt(nsh, updates, done); err != nil {
		return res, err
	}
	var lat, puts []time.Duration
	for j := range newPeers {
		if j > 0 && o.JoinInterval > 0 {
			select {
			case <-ctx.Done():
				return res, ctx.Err()
			case <-time.After(o.JoinInterval):
			}
		}
		rec := nextPeer()
		rec.Subnet.V6, rec.PublicIP.V6 = netip.Prefix{}, netip.Addr{}
		v, _ := json.Marshal(rec)
		want := rec.Subnet.V4.String()
		t0 := time.Now()
		if _, err := l.Client.Put(ctx, lease.NewKeys("").Lease(rec.Node), string(v), clientv3.WithLease(g.ID)); err != nil {
			return res, err
		}
		puts = append(puts, time.Since(t0))
		timeout := time.After(5 * time.Second)
	wait:
		for {
			select {
			case u := <-updates:
				if u.Type == syscall.RTM_NEWROUTE && u.Dst != nil && u.Dst.String() == want {
					lat = append(lat, time.Since(t0))
					break wait
				}
			case <-timeout:
				return res, fmt.Errorf("no route for new peer %s within 5s", want)
			}
		}
	}
	if len(lat) > 0 {
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
	pid := h.cmd.Process.Pid
	if o.IdleWindow > 0 {
		// The agent's own CPU time (utime+stime) over the window, with no
		// lease changes; children (iptables runs of the periodic check)
		// are counted once they are reaped.
		c0, ch0, err := procCPU(pid)
		if err != nil {
			return res, err
		}
		t0 := time.Now()
		log("measuring the idle agent's CPU for %s", o.IdleWindow)
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(o.IdleWindow):
		}
		c1, ch1, err := procCPU(pid)
		if err != nil {
			return res, err
		}
		res.IdleWindow = time.Since(t0)
		res.IdleCPU = float64(c1-c0) / float64(res.IdleWindow)
		log("idle CPU: agent %s (of which its reaped children, such as iptables runs: %s) in %s", c1-c0, ch1-ch0, res.IdleWindow)
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	res.PeakRSS = vmHWM(string(status))
	log("result: %+v", res)
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "Rss") { // file-backed (binary) vs anonymous (heap)
			log("agent %s", line)
		}
	}
	return res, l.StopAgent(h, syscall.SIGTERM)
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
