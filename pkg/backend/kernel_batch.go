package backend

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// routeBatcher sends route requests on a NETLINK_ROUTE socket of its own,
// many per sendmsg, and reads back only the failures plus one
// acknowledgement per batch. The kernel handles every request of a
// sendmsg in order, within the call, so a batch costs two system calls
// instead of the two to four per route of netlink.Handle (which waits for
// each acknowledgement, as `ip -batch` does).
//
// Only the route attributes the reconciler sets are encoded (Dst, Gw,
// LinkIndex, Priority, Protocol, Table, Type, Scope, Flags); a route with
// any other attribute is refused. It is not safe for concurrent use; the
// engine serialises kernel calls with its mutex.
type routeBatcher struct {
	s    *nl.NetlinkSocket
	seq  uint32
	send []byte
	recv []byte
}

// Batch limits: the acknowledgements of one batch (at most one per
// request, when every request fails) must fit in the socket's receive
// buffer, and the requests in the send buffer.
const (
	batchMaxMsgs  = 128
	batchMaxBytes = 16 << 10
	batchTimeout  = 30 * time.Second
)

func newRouteBatcher(ns nsExec) (*routeBatcher, error) {
	target := netns.None()
	if ns.path != "" {
		h, err := netns.GetFromPath(ns.path)
		if err != nil {
			return nil, fmt.Errorf("opening network namespace %s: %w", ns.path, err)
		}
		defer h.Close()
		target = h
	}
	s, err := nl.GetNetlinkSocketAt(target, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening a netlink socket: %w", err)
	}
	// Room for a full batch of error answers; SO_RCVBUFFORCE needs
	// CAP_NET_ADMIN, which the agent has, else the plain option.
	if s.SetReceiveBufferSize(1<<20, true) != nil {
		_ = s.SetReceiveBufferSize(1<<20, false)
	}
	// Error answers carry only the header of the failed request.
	_ = unix.SetsockoptInt(s.GetFd(), unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	return &routeBatcher{s: s, recv: make([]byte, 64<<10)}, nil
}

// do sends one request per route (typ RTM_NEWROUTE with NLM_F_CREATE|
// NLM_F_REPLACE, or RTM_DELROUTE) and returns the outcome of each.
func (b *routeBatcher) do(typ uint16, rs []*netlink.Route) []error {
	return b.doFlags(typ, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, rs)
}

// add is do for RTM_NEWROUTE with NLM_F_CREATE|NLM_F_EXCL: the kernel
// refuses (EEXIST) a route whose destination and metric another route of
// the table already has, instead of replacing that route.
func (b *routeBatcher) add(rs []*netlink.Route) []error {
	return b.doFlags(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, rs)
}

// doFlags is do with the flags of RTM_NEWROUTE requests.
func (b *routeBatcher) doFlags(typ, newFlags uint16, rs []*netlink.Route) []error {
	return b.batch(len(rs), func(buf []byte, i int, seq uint32) ([]byte, error) {
		return appendRouteMsg(buf, typ, newFlags, seq, rs[i])
	})
}

// batch sends n requests, the i-th appended to buf by enc with sequence
// number seq, many per sendmsg, and returns the outcome of each.
func (b *routeBatcher) batch(n int, enc func(buf []byte, i int, seq uint32) ([]byte, error)) []error {
	errs := make([]error, n)
	for start := 0; start < n; {
		b.send = b.send[:0]
		end := start
		first := b.seq + 1
		for end < n && end-start < batchMaxMsgs && len(b.send) < batchMaxBytes {
			msg, err := enc(b.send, end, first+uint32(end-start))
			if err != nil {
				errs[end] = err
				// Keep the sequence numbers contiguous: send nothing for
				// it; its slot stays answered by this error.
			} else {
				b.send = msg
			}
			end++
		}
		b.seq += uint32(end - start)
		if len(b.send) > 0 {
			b.exchange(first, errs[start:end])
		}
		start = end
	}
	return errs
}

// exchange sends b.send, whose requests have the sequence numbers from
// first on (errs[i] for first+i; slots already holding an error were not
// sent), and fills errs from the kernel's answers.
func (b *routeBatcher) exchange(first uint32, errs []error) {
	// Ask for an acknowledgement of the last request sent only: the kernel
	// answers failures whatever the flags, so once that one is answered
	// every earlier failure has been read.
	last := lastHeader(b.send)
	flags := binary.NativeEndian.Uint16(b.send[last+6:])
	binary.NativeEndian.PutUint16(b.send[last+6:], flags|unix.NLM_F_ACK)
	lastSeq := binary.NativeEndian.Uint32(b.send[last+8:])

	fail := func(err error) {
		for i := range errs {
			if errs[i] == nil {
				errs[i] = err
			}
		}
	}
	fd := b.s.GetFd()
	deadline := time.Now().Add(batchTimeout)
	for {
		err := unix.Sendto(fd, b.send, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		if err == nil {
			break
		}
		if err != unix.EAGAIN && err != unix.EINTR || wait(fd, unix.POLLOUT, deadline) != nil {
			fail(fmt.Errorf("sending netlink batch: %w", err))
			return
		}
	}
	for {
		n, _, err := unix.Recvfrom(fd, b.recv, 0)
		if err == unix.EAGAIN || err == unix.EINTR {
			if werr := wait(fd, unix.POLLIN, deadline); werr != nil {
				fail(werr)
				return
			}
			continue
		}
		if err != nil {
			// ENOBUFS: answers were dropped, so which requests failed
			// is unknown. Report them all; the next full pass looks.
			fail(fmt.Errorf("reading netlink answers: %w", err))
			return
		}
		for m := b.recv[:n]; len(m) >= unix.NLMSG_HDRLEN; {
			l := int(binary.NativeEndian.Uint32(m))
			if l < unix.NLMSG_HDRLEN || l > len(m) {
				break
			}
			typ := binary.NativeEndian.Uint16(m[4:])
			seq := binary.NativeEndian.Uint32(m[8:])
			if typ == unix.NLMSG_ERROR && l >= unix.NLMSG_HDRLEN+4 && seq-first < uint32(len(errs)) {
				if errno := int32(binary.NativeEndian.Uint32(m[unix.NLMSG_HDRLEN:])); errno != 0 {
					errs[seq-first] = unix.Errno(-errno)
				}
				if seq == lastSeq {
					return
				}
			}
			m = m[min(nlmAlign(l), len(m)):]
		}
	}
}

var errBatchTimeout = errors.New("backend: no netlink answer within 30s")

func wait(fd int, events int16, deadline time.Time) error {
	for {
		ms := int(time.Until(deadline) / time.Millisecond)
		if ms <= 0 {
			return errBatchTimeout
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: events}}, ms)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("polling netlink socket: %w", err)
		}
		if n > 0 {
			return nil
		}
	}
}

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// lastHeader returns the offset of the last message in buf.
func lastHeader(buf []byte) int {
	off := 0
	for {
		next := off + nlmAlign(int(binary.NativeEndian.Uint32(buf[off:])))
		if next >= len(buf) {
			return off
		}
		off = next
	}
}

// appendRouteMsg appends the request for r to buf the way netlink.Handle's
// RouteReplace (RouteAdd, with newFlags NLM_F_CREATE|NLM_F_EXCL) and
// RouteDel encode it; newFlags are the flags of an RTM_NEWROUTE.
func appendRouteMsg(buf []byte, typ, newFlags uint16, seq uint32, r *netlink.Route) ([]byte, error) {
	if r.Dst == nil || r.Dst.IP == nil || r.Src != nil || r.MultiPath != nil || r.Encap != nil || r.Via != nil ||
		r.NewDst != nil || r.MPLSDst != nil || r.ILinkIndex != 0 || r.Tos != 0 || r.MTU != 0 || r.AdvMSS != 0 ||
		r.Hoplimit != 0 || r.Realm != 0 || r.Congctl != "" {
		return buf, fmt.Errorf("backend: route %s has attributes the batch encoder does not write", r)
	}
	dst, fam := addrBytes(r.Dst.IP)
	ones, _ := r.Dst.Mask.Size()
	var gw []byte
	if r.Gw != nil {
		var gfam uint8
		if gw, gfam = addrBytes(r.Gw); gfam != fam {
			return buf, fmt.Errorf("backend: route %s: gateway and destination are not the same IP family", r)
		}
	}
	start := len(buf)
	flags := uint16(unix.NLM_F_REQUEST)
	rt := unix.RtMsg{Family: fam, Dst_len: uint8(ones), Table: unix.RT_TABLE_MAIN}
	if typ == unix.RTM_NEWROUTE {
		flags |= newFlags
		rt.Protocol, rt.Type = unix.RTPROT_BOOT, unix.RTN_UNICAST
	}
	if r.Protocol > 0 {
		rt.Protocol = uint8(r.Protocol)
	}
	if r.Type > 0 {
		rt.Type = uint8(r.Type)
	}
	rt.Flags, rt.Scope = uint32(r.Flags), uint8(r.Scope)
	var table []byte
	if r.Table > 0 {
		if r.Table >= 256 {
			rt.Table = unix.RT_TABLE_UNSPEC
			table = binary.NativeEndian.AppendUint32(nil, uint32(r.Table))
		} else {
			rt.Table = uint8(r.Table)
		}
	}
	ne := binary.NativeEndian
	buf = ne.AppendUint32(buf, 0) // length, set below
	buf = ne.AppendUint16(buf, typ)
	buf = ne.AppendUint16(buf, flags)
	buf = ne.AppendUint32(buf, seq)
	buf = ne.AppendUint32(buf, 0) // port id: the kernel fills it in
	buf = append(buf, rt.Family, rt.Dst_len, rt.Src_len, rt.Tos, rt.Table, rt.Protocol, rt.Scope, rt.Type)
	buf = ne.AppendUint32(buf, rt.Flags)
	buf = appendAttr(buf, unix.RTA_DST, dst)
	if gw != nil {
		buf = appendAttr(buf, unix.RTA_GATEWAY, gw)
	}
	if table != nil {
		buf = appendAttr(buf, unix.RTA_TABLE, table)
	}
	if r.Priority > 0 {
		buf = appendAttr(buf, unix.RTA_PRIORITY, ne.AppendUint32(nil, uint32(r.Priority)))
	}
	buf = appendAttr(buf, unix.RTA_OIF, ne.AppendUint32(nil, uint32(r.LinkIndex)))
	ne.PutUint32(buf[start:], uint32(len(buf)-start))
	return buf, nil
}

func addrBytes(ip net.IP) ([]byte, uint8) {
	if v4 := ip.To4(); v4 != nil {
		return v4, unix.AF_INET
	}
	return ip.To16(), unix.AF_INET6
}

func appendAttr(buf []byte, typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	buf = binary.NativeEndian.AppendUint16(buf, uint16(l))
	buf = binary.NativeEndian.AppendUint16(buf, typ)
	buf = append(buf, data...)
	for range nlmAlign(l) - l {
		buf = append(buf, 0)
	}
	return buf
}
