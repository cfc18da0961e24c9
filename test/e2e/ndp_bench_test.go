package e2e

import (
	"context"
	be "encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/vishvananda/netns"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/internal/lab"
)

// BenchmarkNDP sends Neighbor Solicitations from the upstream router's
// namespace for addresses of host1's slice and measures the answers: rate,
// NS→NA latency (p50, p99, max) and solicitations left unanswered. It runs
// leased's proxy-ndp responder, then, in the same lab, on the same host,
// for the same slice, ndppd with a static rule (Debian package ndppd).
//
//	go test ./test/e2e -run '^$' -bench NDP -benchtime 20000x
//
// "serial" keeps one solicitation outstanding (latency without queueing),
// "window8" and "window64" keep 8 and 64 outstanding (throughput). Latency
// runs from just before the write of the NS to the kernel's arrival
// timestamp of the NA on the router (SO_TIMESTAMPNS). Metrics: answers/s,
// p50/p99/max in µs, and solicitations left unanswered after 1 s.
func BenchmarkNDP(b *testing.B) {
	cfg := lab.Config{Backend: "proxy-ndp", Hosts: 1, IPv6: true, Binary: binary, LeaseTTL: 30 * time.Second, AgentArgs: []string{"-v=0"}}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	l, err := lab.Up(ctx, cfg)
	cancel()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(l.Close)
	h := l.Hosts[0]
	env, err := h.Env()
	if err != nil {
		b.Fatal(err)
	}
	mac, err := h.MAC()
	if err != nil {
		b.Fatal(err)
	}
	if err := lab.PingUntil(context.Background(), l.Upstream.NS, h.Container.Addr6, 0, 10*time.Second); err != nil {
		b.Fatal(err)
	}
	s, err := newNSSender(l.Upstream.NS, "eth0", l.Upstream.Addr)
	if err != nil {
		b.Fatal(err)
	}
	defer s.close()
	wantMAC, _ := net.ParseMAC(mac)

	run := func(name string) {
		for _, w := range ndpWindows {
			sub := fmt.Sprintf("%s/serial", name)
			if w > 1 {
				sub = fmt.Sprintf("%s/window%d", name, w)
			}
			b.Run(sub, func(b *testing.B) {
				r := s.run(env.Subnet.V6, wantMAC, b.N, w)
				b.ReportMetric(0, "ns/op")
				b.ReportMetric(r.rate, "answers/s")
				b.ReportMetric(float64(r.p50.Microseconds()), "p50-µs")
				b.ReportMetric(float64(r.p99.Microseconds()), "p99-µs")
				b.ReportMetric(float64(r.max.Microseconds()), "max-µs")
				b.ReportMetric(float64(r.unanswered), "unanswered")
				if r.wrongMAC > 0 {
					b.Errorf("%d answers carried another MAC than the host's %s", r.wrongMAC, mac)
				}
			})
		}
	}
	run("leased")

	if _, err := exec.LookPath("ndppd"); err != nil {
		b.Log("ndppd not installed (apt-get install ndppd): skipping the comparison")
		return
	}
	if err := l.StopAgent(h, syscall.SIGTERM); err != nil {
		b.Fatal(err)
	}
	conf := filepath.Join(b.TempDir(), "ndppd.conf")
	rule := fmt.Sprintf("route-ttl 30000\nproxy eth0 {\n  router no\n  timeout 500\n  ttl 30000\n  rule %s {\n    static\n  }\n}\n", env.Subnet.V6)
	if err := os.WriteFile(conf, []byte(rule), 0o644); err != nil {
		b.Fatal(err)
	}
	nd := exec.Command("ip", "netns", "exec", h.NS, "ndppd", "-c", conf, "-p", filepath.Join(b.TempDir(), "ndppd.pid"))
	nd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := nd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { nd.Process.Kill(); nd.Wait() }()
	// Wait until ndppd answers.
	deadline := time.Now().Add(10 * time.Second)
	for s.run(env.Subnet.V6, wantMAC, 1, 1).unanswered > 0 {
		if time.Now().After(deadline) {
			b.Fatal("ndppd does not answer")
		}
		time.Sleep(100 * time.Millisecond)
	}
	run("ndppd")
}

// arrival returns the SCM_TIMESTAMPNS time in oob (ns since the epoch), or 0.
func arrival(oob []byte) int64 {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return 0
	}
	for _, m := range msgs {
		if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SCM_TIMESTAMPNS && len(m.Data) >= 16 {
			return (*unix.Timespec)(unsafe.Pointer(&m.Data[0])).Nano()
		}
	}
	return 0
}

// nsSender is a packet socket on the router's LAN interface that sends
// solicitations and receives advertisements.
type nsSender struct {
	fd  int
	mac net.HardwareAddr
	src netip.Addr
	seq uint32
}

func newNSSender(ns, ifname string, src netip.Addr) (*nsSender, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return nil, err
	}
	defer orig.Close()
	target, err := netns.GetFromName(ns)
	if err != nil {
		return nil, err
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		return nil, err
	}
	defer netns.Set(orig)
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_IPV6)))
	if err != nil {
		return nil, err
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	// Arrival times from the kernel, so that the benchmark's own wakeup
	// latency is not counted against the responder.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IPV6), Ifindex: ifi.Index}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &nsSender{fd: fd, mac: ifi.HardwareAddr, src: src, seq: 1}, nil
}

func (s *nsSender) close() { unix.Close(s.fd) }

func htons(v uint16) uint16 { return v<<8 | v>>8 }

type ndpResult struct {
	rate          float64
	p50, p99, max time.Duration
	unanswered    int
	wrongMAC      int
}

// run sends n solicitations for distinct addresses of slice, keeping at
// most window outstanding, and waits up to 1 s after the last for answers.
func (s *nsSender) run(slice netip.Prefix, wantMAC net.HardwareAddr, n, window int) ndpResult {
	base := s.seq
	s.seq += uint32(n)
	sent := make([]int64, n) // wall clock, ns; 0: not sent
	got := make([]int64, n)  // kernel arrival time of the answer, ns
	var answered, wrong atomic.Int64
	// slots holds one token per outstanding solicitation; the receiver
	// frees one per answer, so the sender sleeps, not spins, while the
	// window is full (the responder needs the CPU more than we do).
	slots := make(chan struct{}, window)
	frames := make([][]byte, n) // built before the clock runs
	for i := range frames {
		a := slice.Masked().Addr().As16()
		be.BigEndian.PutUint32(a[12:], base+uint32(i))
		frames[i] = s.appendNS(nil, netip.AddrFrom16(a))
	}
	var wg sync.WaitGroup
	done := make(chan struct{})
	wg.Add(1)
	go func() { // receiver
		defer wg.Done()
		// No runtime.LockOSThread here: a locked thread dies with its
		// goroutine, and Pdeathsig would then kill the processes (agents,
		// ndppd) that happened to be forked from it.
		buf, oob := make([]byte, 2048), make([]byte, 128)
		for {
			m, oobn, _, _, err := unix.Recvmsg(s.fd, buf, oob, 0)
			select {
			case <-done:
				return
			default:
			}
			if err != nil || m < 86 || buf[20] != 58 || buf[54] != 136 {
				continue
			}
			t := arrival(oob[:oobn])
			target := netip.AddrFrom16([16]byte(buf[62:78]))
			i := int(be.BigEndian.Uint32(buf[74:78]) - base)
			if !slice.Contains(target) || i < 0 || i >= n || atomic.LoadInt64(&sent[i]) == 0 || got[i] != 0 || t == 0 {
				continue
			}
			got[i] = t
			if buf[78] != 2 || !slices.Equal(buf[80:86], wantMAC) {
				wrong.Add(1)
			}
			answered.Add(1)
			select {
			case <-slots:
			default: // its slot was already given up
			}
		}
	}()
	timeouts := 0
	for i := 0; i < n && timeouts < 5; i++ {
		select {
		case slots <- struct{}{}:
			timeouts = 0
		case <-time.After(200 * time.Millisecond):
			// Nothing answered for 200 ms: count what is outstanding as
			// lost and go on; after five such waits the responder is
			// stuck and the rest counts as unanswered.
			for len(slots) > 0 {
				<-slots
			}
			timeouts++
			i--
			continue
		}
		atomic.StoreInt64(&sent[i], time.Now().UnixNano())
		if _, err := unix.Write(s.fd, frames[i]); err != nil {
			panic(err)
		}
	}
	deadline := time.Now().Add(time.Second)
	for answered.Load() < int64(n) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	close(done)
	wg.Wait()
	var lastNA int64
	var lat []time.Duration
	for i := range n {
		if got[i] != 0 {
			lat = append(lat, time.Duration(got[i]-sent[i]))
			lastNA = max(lastNA, got[i])
		}
	}
	first := sent[0]
	r := ndpResult{unanswered: n - len(lat), wrongMAC: int(wrong.Load())}
	if len(lat) > 0 {
		slices.Sort(lat)
		r.p50, r.p99, r.max = lat[len(lat)/2], lat[(len(lat)*99)/100], lat[len(lat)-1]
		r.rate = float64(len(lat)) / time.Duration(lastNA-first).Seconds()
	}
	return r
}

// appendNS appends a multicast Neighbor Solicitation for target, as a
// router resolving it sends, encoded with golang.org/x/net/icmp.
func (s *nsSender) appendNS(f []byte, target netip.Addr) []byte {
	t := target.As16()
	dst := netip.AddrFrom16([16]byte{0xff, 0x02, 11: 1, 12: 0xff, 13: t[13], 14: t[14], 15: t[15]})
	body := make([]byte, 20, 28)
	copy(body[4:], t[:])
	body = append(append(body, 1, 1), s.mac...)
	m := icmp.Message{Type: ipv6.ICMPTypeNeighborSolicitation, Body: &icmp.RawBody{Data: body}}
	msg, err := m.Marshal(icmp.IPv6PseudoHeader(net.IP(s.src.AsSlice()), net.IP(dst.AsSlice())))
	if err != nil {
		panic(err)
	}
	f = append(f, 0x33, 0x33, 0xff, t[13], t[14], t[15])
	f = append(f, s.mac...)
	f = append(f, 0x86, 0xdd, 0x60, 0, 0, 0, byte(len(msg)>>8), byte(len(msg)), 58, 255)
	f = append(f, s.src.AsSlice()...)
	f = append(f, dst.AsSlice()...)
	return append(f, msg...)
}

// ndpWindows are the numbers of solicitations kept outstanding.
var ndpWindows = []int{1, 8, 64}
