package backend

import (
	"errors"
	"io"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/bpf"

	"github.com/leased/leased/pkg/backend/ndp"
)

// ErrClosed is returned by every kernel call of a backend after Close.
var ErrClosed = errors.New("backend: the backend is closed (the agent replaced it)")

// Closer is implemented by the backends New returns. Close releases every
// handle the backend holds (its netlink handle and sockets, the proxy-ndp
// packet socket) and leaves the kernel state in place, so that a backend
// built to replace it takes over without disturbing traffic. Call it once
// Run has returned (or when Run never ran); afterwards Start, SetPeers and
// UpdatePeers fail with ErrClosed. It is idempotent.
type Closer = io.Closer

// Close implements Closer.
func (e *engine) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.closedLocked() {
		e.k.Close()
	}
	e.k = closedKernel{}
	return nil
}

// closedLocked reports whether Close ran; e.mu must be held.
func (e *engine) closedLocked() bool {
	return e.k == closedKernel{}
}

// Close implements Closer: it also stops the answers.
func (b *proxyNDP) Close() error {
	b.r.Close()
	return b.engine.Close()
}

// close closes the batcher's socket.
func (b *routeBatcher) close() {
	if b != nil && b.s != nil {
		b.s.Close()
		b.s = nil
	}
}

// closedKernel is the kernel of a closed backend: every call fails.
type closedKernel struct{}

func (closedKernel) RouteList(int) ([]netlink.Route, error) { return nil, ErrClosed }
func (closedKernel) RoutesReplace(rs []*netlink.Route) []error {
	return closedErrs(len(rs))
}
func (closedKernel) RoutesDel(rs []*netlink.Route) []error          { return closedErrs(len(rs)) }
func (closedKernel) RoutesAdd(rs []*netlink.Route) []error          { return closedErrs(len(rs)) }
func (closedKernel) NeighList(int) ([]netlink.Neigh, error)         { return nil, ErrClosed }
func (closedKernel) NeighSet(*netlink.Neigh) error                  { return ErrClosed }
func (closedKernel) NeighDel(*netlink.Neigh) error                  { return ErrClosed }
func (closedKernel) LinkByName(string) (netlink.Link, error)        { return nil, ErrClosed }
func (closedKernel) LinkByIndex(int) (netlink.Link, error)          { return nil, ErrClosed }
func (closedKernel) LinkAdd(netlink.Link) error                     { return ErrClosed }
func (closedKernel) LinkDel(netlink.Link) error                     { return ErrClosed }
func (closedKernel) LinkSetUp(netlink.Link) error                   { return ErrClosed }
func (closedKernel) LinkSetMTU(netlink.Link, int) error             { return ErrClosed }
func (closedKernel) LinkSetHardwareAddr(netlink.Link, []byte) error { return ErrClosed }
func (closedKernel) AddrList(int, int) ([]netlink.Addr, error)      { return nil, ErrClosed }
func (closedKernel) AddrReplace(netlink.Link, *netlink.Addr) error  { return ErrClosed }
func (closedKernel) AddrDel(netlink.Link, *netlink.Addr) error      { return ErrClosed }
func (closedKernel) RouteListAll(int, func(*netlink.Route) bool) ([]netlink.Route, error) {
	return nil, ErrClosed
}
func (closedKernel) NeighProxyList(int, int) ([]netlink.Neigh, error) { return nil, ErrClosed }
func (closedKernel) Sysctl(string) (string, error)                    { return "", ErrClosed }
func (closedKernel) SetSysctl(string, string) error                   { return ErrClosed }
func (closedKernel) IPTables(bool) (ipTables, error)                  { return nil, ErrClosed }
func (closedKernel) SubscribeRoutes(chan<- netlink.RouteUpdate, <-chan struct{}, func(error)) error {
	return ErrClosed
}
func (closedKernel) SubscribeLinks(chan<- netlink.LinkUpdate, <-chan struct{}, func(error)) error {
	return ErrClosed
}
func (closedKernel) SubscribeNeighs(chan<- netlink.NeighUpdate, <-chan struct{}, func(error)) error {
	return ErrClosed
}
func (closedKernel) Side() ndp.Kernel                           { return closedSide{} }
func (closedKernel) Close() error                               { return nil }
func (closedKernel) Nexthops() nexthopKernel                    { return nil }
func (closedKernel) PacketSockets(int) (map[uint64]bool, error) { return nil, ErrClosed }

// closedSide is the side connection of a closed backend's kernel.
type closedSide struct{ closedKernel }

func (closedSide) ListenPacket(string, int, []bpf.RawInstruction) (ndp.PacketConn, error) {
	return nil, ErrClosed
}
func (closedSide) RouteGet(netip.Addr) ([]netlink.Route, error) { return nil, ErrClosed }
func (closedSide) Probe(netip.Addr) error                       { return ErrClosed }

func closedErrs(n int) []error {
	errs := make([]error, n)
	for i := range errs {
		errs[i] = ErrClosed
	}
	return errs
}
