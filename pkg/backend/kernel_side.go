package backend

import (
	"fmt"
	"net/netip"
	"os"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/pkg/backend/ndp"
)

// sideKernel is the proxy-NDP responder's connection to the backend's
// namespace (ndp.Kernel): a netlink handle and a UDP socket of its own,
// opened on first use, and the packet sockets it asks for. Its methods
// serialise on a mutex, so the responder's goroutines may share it.
type sideKernel struct {
	ns nsExec

	mu     sync.Mutex
	h      *netlink.Handle // nil until first use
	probe  int             // UDP socket for Probe; -1 until first use
	closed bool
}

// handleLocked returns the netlink handle, opening it on first use.
func (s *sideKernel) handleLocked() (*netlink.Handle, error) {
	if s.closed {
		return nil, errSideClosed
	}
	if s.h == nil {
		h, err := s.ns.handle()
		if err != nil {
			return nil, fmt.Errorf("opening netlink handle: %w", err)
		}
		s.h = h
	}
	return s.h, nil
}

func (s *sideKernel) NeighList(family int) ([]netlink.Neigh, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h, err := s.handleLocked()
	if err != nil {
		return nil, err
	}
	return retryDump("neighbours", func() ([]netlink.Neigh, error) { return h.NeighList(0, family) })
}

func (s *sideKernel) AddrList(ifindex, family int) ([]netlink.Addr, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h, err := s.handleLocked()
	if err != nil {
		return nil, err
	}
	return netlinkKernel{h: h}.AddrList(ifindex, family)
}

func (s *sideKernel) RouteGet(a netip.Addr) ([]netlink.Route, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h, err := s.handleLocked()
	if err != nil {
		return nil, err
	}
	return h.RouteGet(a.AsSlice())
}

func (s *sideKernel) SubscribeNeighs(ch chan<- netlink.NeighUpdate, done <-chan struct{}, onErr func(error)) error {
	return subscribeNeighs(s.ns, ch, done, onErr)
}

func (s *sideKernel) Probe(a netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errSideClosed
	}
	if s.probe < 0 {
		err := s.ns.do(func() error {
			fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
			if err == nil {
				s.probe = fd
			}
			return err
		})
		if err != nil {
			return fmt.Errorf("opening the probe socket: %w", err)
		}
	}
	sa := &unix.SockaddrInet6{Port: 9, Addr: a.As16()} // discard
	return unix.Sendto(s.probe, nil, 0, sa)
}

func (s *sideKernel) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	if s.h != nil {
		s.h.Close()
		s.h = nil
	}
	if s.probe >= 0 {
		unix.Close(s.probe)
		s.probe = -1
	}
	return nil
}

// ListenPacket creates the socket in the namespace: protocol 0 first (it
// receives nothing), then the filter, then the bind to the link for IPv6,
// so that no unfiltered frame is ever queued.
func (s *sideKernel) ListenPacket(ifname string, ifindex int, filter []bpf.RawInstruction) (ndp.PacketConn, error) {
	fd := -1
	err := s.ns.do(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			fd = -1
			return fmt.Errorf("opening a packet socket (needs CAP_NET_RAW): %w", err)
		}
		if err := attachFilter(fd, filter); err != nil {
			return err
		}
		// Frames we send are not looped back to us (Linux ≥ 4.20; older
		// kernels deliver them and the responder drops them as
		// advertisements).
		_ = unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1)
		// Room for bursts: a router resolving many addresses at once.
		if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20) != nil {
			_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IPV6), Ifindex: ifindex}); err != nil {
			return fmt.Errorf("binding a packet socket to %s: %w", ifname, err)
		}
		// Solicitations go to solicited-node multicast groups this host
		// never joined; a NIC filters those unless it is in all-multicast.
		mreq := unix.PacketMreq{Ifindex: int32(ifindex), Type: unix.PACKET_MR_ALLMULTI}
		if err := unix.SetsockoptPacketMreq(fd, unix.SOL_PACKET, unix.PACKET_ADD_MEMBERSHIP, &mreq); err != nil {
			return fmt.Errorf("setting %s to all-multicast: %w", ifname, err)
		}
		return nil
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, err
	}
	return packetConn{os.NewFile(uintptr(fd), "ndp@"+ifname)}, nil // non-blocking: uses the poller
}

// packetConn is a packet socket on the runtime's poller.
type packetConn struct{ *os.File }

func (c packetConn) SetFilter(filter []bpf.RawInstruction) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = attachFilter(int(fd), filter) }); err != nil {
		return err
	}
	return ferr
}

func attachFilter(fd int, raw []bpf.RawInstruction) error {
	fs := make([]unix.SockFilter, len(raw))
	for i, in := range raw {
		fs[i] = unix.SockFilter{Code: in.Op, Jt: in.Jt, Jf: in.Jf, K: in.K}
	}
	fprog := unix.SockFprog{Len: uint16(len(fs)), Filter: &fs[0]}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &fprog); err != nil {
		return fmt.Errorf("attaching the solicitation filter: %w", err)
	}
	return nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
