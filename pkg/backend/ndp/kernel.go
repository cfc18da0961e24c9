package ndp

import (
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/bpf"
)

// Kernel is the responder's way to the kernel of one network namespace;
// pkg/backend's kernel gives one (its Side). It must be safe for
// concurrent use: the reader and the present mode's goroutine both use it.
type Kernel interface {
	// ListenPacket opens a packet socket bound to the link ifindex (named
	// ifname, for messages) for IPv6 frames, which passes only the frames
	// filter accepts from the start (no unfiltered frame is queued), puts
	// the link in all-multicast mode for as long as the socket is open,
	// and does not receive the frames it sends.
	ListenPacket(ifname string, ifindex int, filter []bpf.RawInstruction) (PacketConn, error)
	// NeighList returns the neighbour entries of family on every link.
	NeighList(family int) ([]netlink.Neigh, error)
	// AddrList returns the addresses of family on the link ifindex, or on
	// every link when ifindex is 0.
	AddrList(ifindex, family int) ([]netlink.Addr, error)
	// SubscribeNeighs sends neighbour events on ch until done is closed,
	// then closes ch; a broken subscription closes ch too.
	SubscribeNeighs(ch chan<- netlink.NeighUpdate, done <-chan struct{}, onErr func(error)) error
	// RouteGet returns the route the kernel would use to reach a.
	RouteGet(a netip.Addr) ([]netlink.Route, error)
	// Probe sends an empty UDP datagram to a's discard port (9), which
	// makes the kernel resolve a on the link it is routed to.
	Probe(a netip.Addr) error
	// Close closes what the Kernel opened (not the PacketConns).
	Close() error
}

// PacketConn is a packet socket from Kernel.ListenPacket.
type PacketConn interface {
	// Read reads one frame; after Close it fails with an error matching
	// os.ErrClosed.
	Read(b []byte) (int, error)
	// Write sends one frame as it is (Ethernet header included).
	Write(b []byte) (int, error)
	// SetFilter replaces the socket's filter.
	SetFilter(filter []bpf.RawInstruction) error
	Close() error
}
