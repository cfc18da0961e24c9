package lab

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
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
	Peers         int
	Routes        int
	AgentStart    time.Duration // agent start → all 2N routes in the kernel
	IPBatch       time.Duration // ip -batch installing the same 2N routes
	PeakRSS       int64         // agent VmHWM in bytes
	NewPeerP50    time.Duration
	NewPeerP99    time.Duration
	NewPeerSample int
}

// BenchDatapath measures, for each N in sizes, one host-gw host in a
// namespace with N synthetic dual-stack peers in etcd: the time from agent
// start until all 2N routes are in the kernel, the agent's peak RSS, the
// latency from a new peer lease to its route, and — on the same host
// namespace — the time `ip -batch` takes to install the same routes.
func BenchDatapath(ctx context.Context, binary string, sizes []int, newPeers int, log func(string, ...any)) ([]BenchResult, error) {
	var out []BenchResult
	for _, n := range sizes {
		r, err := benchOne(ctx, binary, n, newPeers, log)
		if err != nil {
			return out, err
		}
		out = append(out, r)
	}
	return out, nil
}

func benchOne(ctx context.Context, binary string, n, newPeers int, log func(string, ...any)) (BenchResult, error) {
	res := BenchResult{Peers: n, Routes: 2 * n}
	l, err := Up(ctx, Config{Hosts: 1, Backend: "host-gw", IPv4: true, IPv6: true, Network: "10.0.0.0/8", SubnetLen: 24,
		IPv6Network: "2001:db8::/32", IPv6SubnetLen: 64, Binary: binary, LeaseTTL: 10 * time.Minute, Log: log})
	if err != nil {
		return res, err
	}
	defer l.Close()
	h := l.Hosts[0]
	if err := l.StopAgent(h, syscall.SIGTERM); err != nil {
		return res, err
	}
	// N peers on the LAN (gateways .20-.219 / ::14-..., repeated).
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
			if rec.Subnet != own.Subnet4 && rec.IPv6Subnet != own.Subnet6 {
				return rec
			}
		}
	}
	var batch4, batch6 strings.Builder
	for range n {
		rec := nextPeer()
		v, _ := json.Marshal(rec)
		ops = append(ops, clientv3.OpPut(lease.NewKeys("").Lease(rec.Node), string(v), clientv3.WithLease(g.ID)))
		fmt.Fprintf(&batch4, "route add %s via %s dev eth0 proto 76\n", rec.Subnet, rec.PublicIP)
		fmt.Fprintf(&batch6, "route add %s via %s dev eth0 proto 76\n", rec.IPv6Subnet, rec.PublicIPv6)
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
		for _, fam := range []string{"-4", "-6"} {
			if _, err := h.IP(fam, "route", "flush", "proto", "76"); err != nil {
				return err
			}
		}
		if c := countRoutes(); c != 0 {
			return fmt.Errorf("%d routes left after flush", c)
		}
		return nil
	}

	// ip -batch baseline, on the same namespace.
	if err := flushRoutes(); err != nil {
		return res, err
	}
	bf := filepath.Join(h.Dir, "routes.batch")
	if err := os.WriteFile(bf, []byte(batch4.String()+batch6.String()), 0o644); err != nil {
		return res, err
	}
	t0 := time.Now()
	if out, err := exec.Command("ip", "-n", h.NS, "-batch", bf).CombinedOutput(); err != nil {
		return res, fmt.Errorf("ip -batch: %v: %s", err, out)
	}
	res.IPBatch = time.Since(t0)
	if c := countRoutes(); c != 2*n {
		return res, fmt.Errorf("ip -batch installed %d routes, want %d", c, 2*n)
	}
	if err := flushRoutes(); err != nil {
		return res, err
	}

	// Agent start → 2N routes. The routes are counted as the kernel
	// announces them (RTM_NEWROUTE, proto 76) rather than by dumping the
	// table in a loop: a dump of 10,000 routes every few milliseconds would
	// take CPU from the agent being measured. A dump every 100ms backs the
	// count up in case the subscription overflows.
	startUpdates := make(chan netlink.RouteUpdate, 4096)
	startDone := make(chan struct{})
	overflow := make(chan error, 1)
	if err := netlink.RouteSubscribeWithOptions(startUpdates, startDone, netlink.RouteSubscribeOptions{
		Namespace: &nsh, ReceiveBufferSize: 64 << 20, ReceiveBufferForceSize: true,
		ErrorCallback: func(err error) {
			select {
			case overflow <- err:
			default:
			}
		},
	}); err != nil {
		close(startDone)
		return res, err
	}
	seen := make(map[netip.Prefix]bool, 2*n)
	t0 = time.Now()
	if err := l.StartAgent(h); err != nil {
		close(startDone)
		return res, err
	}
	deadline := time.After(5 * time.Minute)
	tick := time.NewTicker(100 * time.Millisecond)
count:
	for len(seen) < 2*n {
		select {
		case u := <-startUpdates:
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
			tick.Stop()
			close(startDone)
			return res, fmt.Errorf("agent installed %d of %d routes within 5m; log:\n%s", countRoutes(), 2*n, l.LogTail(h, 20))
		}
	}
	res.AgentStart = time.Since(t0)
	tick.Stop()
	close(startDone)
	if c := countRoutes(); c != 2*n {
		return res, fmt.Errorf("agent: %d routes in the kernel, want %d", c, 2*n)
	}
	log("agent log after start with %d peers (t0 %s):\n%s", n, t0.Format("15:04:05.000000"), l.LogTail(h, 0))

	// New peer → route, measured with a route subscription in the namespace.
	updates := make(chan netlink.RouteUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.RouteSubscribeAt(nsh, updates, done); err != nil {
		return res, err
	}
	var lat []time.Duration
	for range newPeers {
		rec := nextPeer()
		rec.IPv6Subnet, rec.PublicIPv6 = netip.Prefix{}, netip.Addr{}
		v, _ := json.Marshal(rec)
		want := rec.Subnet.String()
		t0 := time.Now()
		if _, err := l.Client.Put(ctx, lease.NewKeys("").Lease(rec.Node), string(v), clientv3.WithLease(g.ID)); err != nil {
			return res, err
		}
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
		res.NewPeerSample = len(lat)
	}
	res.PeakRSS = vmHWM(h.cmd.Process.Pid)
	return res, l.StopAgent(h, syscall.SIGTERM)
}

// benchPeer is the i-th synthetic peer: 10.x.y.0/24, 2001:db8:i::/64, a
// gateway on the lab LAN.
func benchPeer(i int) *lease.Record {
	i4 := uint32(i + 1)
	var a6 [16]byte
	copy(a6[:4], []byte{0x20, 0x01, 0x0d, 0xb8})
	binary.BigEndian.PutUint32(a6[4:8], i4)
	g4, g6 := lanAddr(0, byte(20+i%200))
	return &lease.Record{
		Node:        "peer-" + strconv.Itoa(i),
		Subnet:      netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i4 >> 8), byte(i4), 0}), 24),
		IPv6Subnet:  netip.PrefixFrom(netip.AddrFrom16(a6), 64),
		PublicIP:    g4,
		PublicIPv6:  g6,
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

func vmHWM(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
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

// PrintBench writes the results as a table.
func PrintBench(w io.Writer, rs []BenchResult) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "peers\troutes\tagent start→routes\tip -batch\tratio\tpeak RSS\tnew peer→route p50\tp99\t")
	for _, r := range rs {
		ratio := float64(r.AgentStart) / float64(r.IPBatch)
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%.2f×\t%.1f MB\t%s\t%s\t\n", r.Peers, r.Routes, r.AgentStart.Round(time.Millisecond),
			r.IPBatch.Round(time.Millisecond), ratio, float64(r.PeakRSS)/(1<<20), r.NewPeerP50.Round(10*time.Microsecond), r.NewPeerP99.Round(10*time.Microsecond))
	}
	tw.Flush()
}
