package backend

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Nexthop objects (kernel ≥ 5.3): a route can name a nexthop object
// (RTA_NH_ID) instead of carrying its gateway. IPv4 routes with a plain
// gateway on one device share one bucket of the kernel's fib_info hash, so
// installing N of them costs O(N²); through one nexthop object each they
// install in linear time, and a peer whose address changes is one
// RTM_NEWNEXTHOP that all its routes follow. vishvananda/netlink v1.3.1
// has no nexthop API and does not decode RTA_NH_ID, so this file writes
// and reads those messages itself, on the batched route socket
// (kernel_batch.go), with the constants of golang.org/x/sys/unix.

// rtaNHID is RTA_NH_ID (include/uapi/linux/rtnetlink.h), which x/sys/unix
// does not name.
const rtaNHID = 30

// nhaFDB is NHA_FDB (include/uapi/linux/nexthop.h).
const nhaFDB = 11

// nexthop is a nexthop object: a gateway on a link.
type nexthop struct {
	ID     uint32
	Gw     netip.Addr
	Link   int
	OnLink bool
	// Proto is the nexthop's protocol (dumps only): RouteProtocol marks
	// leased's own.
	Proto uint8
	// Other: not a single gateway (a group, a blackhole, an FDB nexthop).
	Other bool
}

func (n nexthop) String() string {
	s := fmt.Sprintf("id %d via %s dev#%d", n.ID, n.Gw, n.Link)
	if n.OnLink {
		s += " onlink"
	}
	return s
}

// nhRoute is a route of ours through a nexthop object, as sent.
type nhRoute struct {
	Dst      netip.Prefix
	Priority int
	NH       uint32
}

// kroute is a route as a dump reports it, in the few fields the reconciler
// reads; routes of other protocols become netlink.Route (foreign.go).
type kroute struct {
	Dst       netip.Prefix
	Gw        netip.Addr
	Link      int
	Priority  int
	NH        uint32
	Table     uint32
	Flags     uint32
	Family    uint8
	Protocol  uint8
	Type      uint8
	Scope     uint8
	Multipath bool
}

// netlinkRoute returns r as the library would have decoded it, for the
// foreign-route checks.
func (r kroute) netlinkRoute() netlink.Route {
	out := netlink.Route{
		Family:    int(r.Family),
		Dst:       ipNet(r.Dst),
		LinkIndex: r.Link,
		Priority:  r.Priority,
		Protocol:  netlink.RouteProtocol(r.Protocol),
		Table:     int(r.Table),
		Type:      int(r.Type),
		Scope:     netlink.Scope(r.Scope),
		Flags:     int(r.Flags),
	}
	if r.Gw.IsValid() {
		out.Gw = net.IP(r.Gw.AsSlice())
	}
	if r.Multipath {
		out.MultiPath = []*netlink.NexthopInfo{{}}
	}
	return out
}

// nexthopKernel is the netlink kernel's own route dump (which reports
// nexthop ids) and its nexthop objects; kernel.Nexthops returns it. The
// in-memory fake of the unit tests has none; the engine then uses plain
// gateway routes only.
type nexthopKernel interface {
	// RouteDump calls fn for every route of family in every table; an
	// interrupted dump is retried from the start (fn sees the routes of
	// the failed try first, and reset is called before each try).
	RouteDump(family int, reset func(), fn func(*kroute)) error
	// NexthopList returns every nexthop object (of every protocol);
	// NexthopDump calls fn for each instead (as RouteDump).
	NexthopList() ([]nexthop, error)
	NexthopDump(reset func(), fn func(nexthop)) error
	// NexthopsPut creates (replace=false: NLM_F_EXCL, EEXIST when the id
	// is taken) or replaces each nexthop, with protocol RouteProtocol.
	NexthopsPut(nhs []nexthop, replace bool) []error
	NexthopsDel(ids []uint32) []error
	// NHRoutesPut creates (NLM_F_EXCL) or replaces each route through its
	// nexthop object; NHRoutesDel deletes each.
	NHRoutesPut(rs []nhRoute, replace bool) []error
	NHRoutesDel(rs []nhRoute) []error
	// NeighDump calls fn for every neighbour entry of family (AF_INET,
	// AF_INET6; AF_BRIDGE: FDB entries) of every link, as RouteDump does
	// for routes.
	NeighDump(family int, reset func(), fn func(*kneigh)) error
	// NexthopProbe creates and deletes a nexthop object, to learn whether
	// the kernel has them.
	NexthopProbe() error
	// SubscribeNexthops calls fn with each nexthop event (RTM_NEWNEXTHOP,
	// RTM_DELNEXTHOP) until ctx is done (nil) or the subscription fails.
	SubscribeNexthops(ctx context.Context, fn func(typ uint16, n nexthop)) error
}

// Nexthops implements nexthopSource: the netlink kernel has both.
func (k netlinkKernel) Nexthops() nexthopKernel { return k }

var errDumpInterrupted = errors.New("backend: netlink dump interrupted")

// dumper runs netlink dumps on a socket of its own, so that a dump does
// not need the engine's lock. Safe for concurrent use.
type dumper struct {
	mu sync.Mutex
	b  *routeBatcher
}

func (k netlinkKernel) dumpSock() (*routeBatcher, func()) {
	if k.d != nil {
		k.d.mu.Lock()
		return k.d.b, k.d.mu.Unlock
	}
	return k.b, func() {}
}

// dump sends one dump request (typ with the family header hdr) and calls fn
// with each answer's payload (after the netlink header) until the kernel's
// NLMSG_DONE. It reports errDumpInterrupted when the kernel flagged the
// dump as inconsistent (the table changed meanwhile).
func (b *routeBatcher) dump(typ uint16, hdr []byte, fn func(typ uint16, m []byte)) error {
	if b.s == nil {
		return ErrClosed
	}
	b.seq++
	seq := b.seq
	ne := binary.NativeEndian
	req := ne.AppendUint32(nil, uint32(unix.NLMSG_HDRLEN+len(hdr)))
	req = ne.AppendUint16(req, typ)
	req = ne.AppendUint16(req, unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	req = ne.AppendUint32(req, seq)
	req = ne.AppendUint32(req, 0)
	req = append(req, hdr...)
	fd := b.s.GetFd()
	deadline := time.Now().Add(batchTimeout)
	for {
		err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		if err == nil {
			break
		}
		if err != unix.EAGAIN && err != unix.EINTR || wait(fd, unix.POLLOUT, deadline) != nil {
			return fmt.Errorf("sending netlink dump request: %w", err)
		}
	}
	intr := false
	for {
		n, _, err := unix.Recvfrom(fd, b.recv, 0)
		if err == unix.EAGAIN || err == unix.EINTR {
			if werr := wait(fd, unix.POLLIN, deadline); werr != nil {
				return werr
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("reading netlink dump: %w", err)
		}
		for m := b.recv[:n]; len(m) >= unix.NLMSG_HDRLEN; {
			l := int(ne.Uint32(m))
			if l < unix.NLMSG_HDRLEN || l > len(m) {
				break
			}
			mtyp := ne.Uint16(m[4:])
			flags := ne.Uint16(m[6:])
			mseq := ne.Uint32(m[8:])
			body := m[unix.NLMSG_HDRLEN:l]
			m = m[min(nlmAlign(l), len(m)):]
			if mseq != seq {
				continue // an answer to an earlier, abandoned request
			}
			if flags&unix.NLM_F_DUMP_INTR != 0 {
				intr = true
			}
			switch mtyp {
			case unix.NLMSG_DONE:
				if intr {
					return errDumpInterrupted
				}
				return nil
			case unix.NLMSG_ERROR:
				if len(body) >= 4 {
					if errno := int32(ne.Uint32(body)); errno != 0 {
						return unix.Errno(-errno)
					}
				}
				return nil
			default:
				fn(mtyp, body)
			}
		}
	}
}

func retryRawDump(what string, reset func(), dump func() error) error {
	var err error
	for range dumpTries {
		if reset != nil {
			reset()
		}
		if err = dump(); !errors.Is(err, errDumpInterrupted) {
			if err != nil {
				return fmt.Errorf("listing %s: %w", what, err)
			}
			return nil
		}
	}
	return fmt.Errorf("listing %s: %w (after %d tries)", what, err, dumpTries)
}

func (k netlinkKernel) RouteDump(family int, reset func(), fn func(*kroute)) error {
	hdr := make([]byte, unix.SizeofRtMsg)
	hdr[0] = uint8(family)
	return rawDump(k, "routes", unix.RTM_GETROUTE, unix.RTM_NEWROUTE, hdr, reset, parseRoute, fn)
}

// rawDump sends one dump request typ (payload hdr) on k's dump socket,
// retried as retryRawDump does, and calls fn with each answer of type
// want that parse decodes; fn's value is reused for the next answer.
func rawDump[T any](k netlinkKernel, what string, typ, want uint16, hdr []byte, reset func(), parse func([]byte, *T) bool, fn func(*T)) error {
	b, unlock := k.dumpSock()
	defer unlock()
	var v T
	return retryRawDump(what, reset, func() error {
		return b.dump(typ, hdr, func(t uint16, m []byte) {
			if t == want && parse(m, &v) {
				fn(&v)
			}
		})
	})
}

// kneigh is a neighbour or FDB entry as NeighDump decodes it.
type kneigh struct {
	Link   int
	State  uint16
	Family uint8
	IP     netip.Addr // NDA_DST (invalid: none)
	MAC    []byte     // NDA_LLADDR; valid until fn returns
}

func (k netlinkKernel) NeighDump(family int, reset func(), fn func(*kneigh)) error {
	hdr := make([]byte, unix.SizeofNdMsg)
	hdr[0] = uint8(family)
	return rawDump(k, "neighbours", unix.RTM_GETNEIGH, unix.RTM_NEWNEIGH, hdr, reset, parseNeigh, fn)
}

// parseNeigh decodes an RTM_NEWNEIGH payload into n.
func parseNeigh(m []byte, n *kneigh) bool {
	if len(m) < unix.SizeofNdMsg {
		return false
	}
	ne := binary.NativeEndian
	*n = kneigh{Family: m[0], Link: int(int32(ne.Uint32(m[4:]))), State: ne.Uint16(m[8:])}
	for a := m[unix.SizeofNdMsg:]; len(a) >= unix.SizeofRtAttr; {
		l := int(ne.Uint16(a))
		if l < unix.SizeofRtAttr || l > len(a) {
			break
		}
		v := a[unix.SizeofRtAttr:l]
		switch ne.Uint16(a[2:]) {
		case unix.NDA_DST:
			n.IP, _ = netip.AddrFromSlice(v)
		case unix.NDA_LLADDR:
			n.MAC = v
		}
		a = a[min(nlmAlign(l), len(a)):]
	}
	return true
}

// parseRoute decodes an RTM_NEWROUTE payload into r.
func parseRoute(m []byte, r *kroute) bool {
	if len(m) < unix.SizeofRtMsg {
		return false
	}
	ne := binary.NativeEndian
	*r = kroute{Family: m[0], Table: uint32(m[4]), Protocol: m[5], Scope: m[6], Type: m[7], Flags: ne.Uint32(m[8:])}
	dstLen := int(m[1])
	var dst netip.Addr
	for a := m[unix.SizeofRtMsg:]; len(a) >= unix.SizeofRtAttr; {
		l := int(ne.Uint16(a))
		if l < unix.SizeofRtAttr || l > len(a) {
			break
		}
		v := a[unix.SizeofRtAttr:l]
		switch ne.Uint16(a[2:]) {
		case unix.RTA_DST:
			dst, _ = netip.AddrFromSlice(v)
		case unix.RTA_GATEWAY:
			r.Gw, _ = netip.AddrFromSlice(v)
		case unix.RTA_OIF:
			if len(v) >= 4 {
				r.Link = int(ne.Uint32(v))
			}
		case unix.RTA_PRIORITY:
			if len(v) >= 4 {
				r.Priority = int(ne.Uint32(v))
			}
		case unix.RTA_TABLE:
			if len(v) >= 4 {
				r.Table = ne.Uint32(v)
			}
		case unix.RTA_MULTIPATH, unix.RTA_VIA:
			r.Multipath = true
		case rtaNHID:
			if len(v) >= 4 {
				r.NH = ne.Uint32(v)
			}
		}
		a = a[min(nlmAlign(l), len(a)):]
	}
	if !dst.IsValid() {
		switch r.Family {
		case unix.AF_INET:
			dst = netip.IPv4Unspecified()
		case unix.AF_INET6:
			dst = netip.IPv6Unspecified()
		default:
			return false
		}
	}
	if dstLen > dst.BitLen() {
		return false
	}
	r.Dst = netip.PrefixFrom(dst, dstLen)
	return true
}

func (k netlinkKernel) NexthopList() ([]nexthop, error) {
	var out []nexthop
	err := k.NexthopDump(func() { out = out[:0] }, func(n nexthop) { out = append(out, n) })
	return out, err
}

func (k netlinkKernel) NexthopDump(reset func(), fn func(nexthop)) error {
	parse := func(m []byte, n *nexthop) (ok bool) { *n, ok = parseNexthop(m); return ok }
	return rawDump(k, "nexthop objects", unix.RTM_GETNEXTHOP, unix.RTM_NEWNEXTHOP, make([]byte, unix.SizeofNhmsg), reset, parse, func(n *nexthop) { fn(*n) })
}

// parseNexthop decodes an RTM_NEWNEXTHOP (or RTM_DELNEXTHOP) payload.
func parseNexthop(m []byte) (nexthop, bool) {
	if len(m) < unix.SizeofNhmsg {
		return nexthop{}, false
	}
	ne := binary.NativeEndian
	n := nexthop{Proto: m[2], OnLink: ne.Uint32(m[4:])&unix.RTNH_F_ONLINK != 0}
	for a := m[unix.SizeofNhmsg:]; len(a) >= unix.SizeofRtAttr; {
		l := int(ne.Uint16(a))
		if l < unix.SizeofRtAttr || l > len(a) {
			break
		}
		v := a[unix.SizeofRtAttr:l]
		switch ne.Uint16(a[2:]) &^ unix.NLA_F_NESTED {
		case unix.NHA_ID:
			if len(v) >= 4 {
				n.ID = ne.Uint32(v)
			}
		case unix.NHA_OIF:
			if len(v) >= 4 {
				n.Link = int(ne.Uint32(v))
			}
		case unix.NHA_GATEWAY:
			gw, _ := netip.AddrFromSlice(v)
			n.Gw = gw.Unmap()
		case unix.NHA_GROUP, unix.NHA_BLACKHOLE, nhaFDB, unix.NHA_ENCAP:
			n.Other = true
		}
		a = a[min(nlmAlign(l), len(a)):]
	}
	return n, n.ID != 0
}

// appendNexthopMsg appends an RTM_NEWNEXTHOP for n (protocol
// RouteProtocol) or, with typ RTM_DELNEXTHOP, the delete of n.ID.
func appendNexthopMsg(buf []byte, typ, flags uint16, seq uint32, n nexthop, blackhole bool) []byte {
	ne := binary.NativeEndian
	start := len(buf)
	buf = ne.AppendUint32(buf, 0)
	buf = ne.AppendUint16(buf, typ)
	buf = ne.AppendUint16(buf, unix.NLM_F_REQUEST|flags)
	buf = ne.AppendUint32(buf, seq)
	buf = ne.AppendUint32(buf, 0)
	var fam uint8 = unix.AF_UNSPEC
	if blackhole {
		fam = unix.AF_INET // the kernel wants a family for a blackhole
	}
	if n.Gw.IsValid() {
		_, fam = addrBytes(net.IP(n.Gw.AsSlice()))
	}
	var nhFlags uint32
	if n.OnLink {
		nhFlags = unix.RTNH_F_ONLINK
	}
	proto := uint8(0)
	if typ == unix.RTM_NEWNEXTHOP {
		proto = uint8(RouteProtocol)
	}
	buf = append(buf, fam, 0, proto, 0)
	buf = ne.AppendUint32(buf, nhFlags)
	buf = appendAttr(buf, unix.NHA_ID, ne.AppendUint32(nil, n.ID))
	if typ == unix.RTM_NEWNEXTHOP {
		if blackhole {
			buf = appendAttr(buf, unix.NHA_BLACKHOLE, nil)
		} else {
			buf = appendAttr(buf, unix.NHA_OIF, ne.AppendUint32(nil, uint32(n.Link)))
			gw, _ := addrBytes(net.IP(n.Gw.AsSlice()))
			buf = appendAttr(buf, unix.NHA_GATEWAY, gw)
		}
	}
	ne.PutUint32(buf[start:], uint32(len(buf)-start))
	return buf
}

// appendNHRouteMsg appends an RTM_NEWROUTE (flags newFlags) or
// RTM_DELROUTE for a route of ours through nexthop object r.NH.
func appendNHRouteMsg(buf []byte, typ, newFlags uint16, seq uint32, r nhRoute) []byte {
	ne := binary.NativeEndian
	start := len(buf)
	flags := uint16(unix.NLM_F_REQUEST)
	if typ == unix.RTM_NEWROUTE {
		flags |= newFlags
	}
	buf = ne.AppendUint32(buf, 0)
	buf = ne.AppendUint16(buf, typ)
	buf = ne.AppendUint16(buf, flags)
	buf = ne.AppendUint32(buf, seq)
	buf = ne.AppendUint32(buf, 0)
	dst, fam := addrBytes(net.IP(r.Dst.Masked().Addr().AsSlice()))
	buf = append(buf, fam, uint8(r.Dst.Bits()), 0, 0, unix.RT_TABLE_MAIN, uint8(RouteProtocol), unix.RT_SCOPE_UNIVERSE, unix.RTN_UNICAST)
	buf = ne.AppendUint32(buf, 0)
	buf = appendAttr(buf, unix.RTA_DST, dst)
	if r.Priority > 0 {
		buf = appendAttr(buf, unix.RTA_PRIORITY, ne.AppendUint32(nil, uint32(r.Priority)))
	}
	if r.NH != 0 {
		buf = appendAttr(buf, rtaNHID, ne.AppendUint32(nil, r.NH))
	}
	ne.PutUint32(buf[start:], uint32(len(buf)-start))
	return buf
}

func putFlags(replace bool) uint16 {
	if replace {
		return unix.NLM_F_CREATE | unix.NLM_F_REPLACE
	}
	return unix.NLM_F_CREATE | unix.NLM_F_EXCL
}

func (k netlinkKernel) NexthopsPut(nhs []nexthop, replace bool) []error {
	f := putFlags(replace)
	return k.b.batch(len(nhs), func(buf []byte, i int, seq uint32) ([]byte, error) {
		if !nhs[i].Gw.IsValid() || nhs[i].ID == 0 {
			return buf, fmt.Errorf("backend: nexthop %s has no id or gateway", nhs[i])
		}
		return appendNexthopMsg(buf, unix.RTM_NEWNEXTHOP, f, seq, nhs[i], false), nil
	})
}

func (k netlinkKernel) NexthopsDel(ids []uint32) []error {
	return k.b.batch(len(ids), func(buf []byte, i int, seq uint32) ([]byte, error) {
		return appendNexthopMsg(buf, unix.RTM_DELNEXTHOP, 0, seq, nexthop{ID: ids[i]}, false), nil
	})
}

func (k netlinkKernel) NHRoutesPut(rs []nhRoute, replace bool) []error {
	f := putFlags(replace)
	return k.b.batch(len(rs), func(buf []byte, i int, seq uint32) ([]byte, error) {
		return appendNHRouteMsg(buf, unix.RTM_NEWROUTE, f, seq, rs[i]), nil
	})
}

func (k netlinkKernel) NHRoutesDel(rs []nhRoute) []error {
	return k.b.batch(len(rs), func(buf []byte, i int, seq uint32) ([]byte, error) {
		return appendNHRouteMsg(buf, unix.RTM_DELROUTE, 0, seq, rs[i]), nil
	})
}

// nhProbeID is the id of the probe's blackhole nexthop object (it exists
// for the duration of two messages); ids taken by others are skipped.
const nhProbeID = 0x4c4c0000

func (k netlinkKernel) NexthopProbe() error {
	var err error
	for id := uint32(nhProbeID); id < nhProbeID+8; id++ {
		errs := k.b.batch(1, func(buf []byte, _ int, seq uint32) ([]byte, error) {
			return appendNexthopMsg(buf, unix.RTM_NEWNEXTHOP, putFlags(false), seq, nexthop{ID: id}, true), nil
		})
		if err = errs[0]; errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return err
		}
		if derr := k.NexthopsDel([]uint32{id})[0]; derr != nil && !isGone(derr) {
			return fmt.Errorf("deleting the probe nexthop object %d: %w", id, derr)
		}
		return nil
	}
	return err
}

func (k netlinkKernel) SubscribeNexthops(ctx context.Context, fn func(typ uint16, n nexthop)) error {
	return k.inNS(func(nsh *netns.NsHandle) error {
		target := netns.None()
		if nsh != nil {
			target = *nsh
		}
		s, err := nl.SubscribeAt(target, netns.None(), unix.NETLINK_ROUTE, unix.RTNLGRP_NEXTHOP)
		if err != nil {
			return err
		}
		defer s.Close()
		// Wake up every second to notice ctx.
		if err := s.SetReceiveTimeout(&unix.Timeval{Sec: 1}); err != nil {
			return err
		}
		if s.SetReceiveBufferSize(subscribeBuf, true) != nil {
			_ = s.SetReceiveBufferSize(subscribeBuf, false)
		}
		for ctx.Err() == nil {
			msgs, _, err := s.Receive()
			if err != nil {
				if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
					continue
				}
				return err
			}
			for _, m := range msgs {
				typ := m.Header.Type
				if typ != unix.RTM_NEWNEXTHOP && typ != unix.RTM_DELNEXTHOP {
					continue
				}
				if n, ok := parseNexthop(m.Data); ok {
					fn(typ, n)
				}
			}
		}
		return nil
	})
}
