package backend

import (
	"context"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"strings"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/backend/ndp"
)

// Proxy-NDP modes (Backend.Mode).
const (
	// ModeSubnet answers for every address of the host's IPv6 slice.
	ModeSubnet = ndp.ModeSubnet
	// ModePresent answers only for addresses present behind the host: a
	// neighbour entry or an address on a link other than the uplink.
	ModePresent = ndp.ModePresent
)

// ErrNotOnLink is returned by the proxy-ndp backend's Start when the IPv6
// network is not part of a prefix on-link on the external interface's IPv6
// link (ExtIface.Link(ipfam.IPv6)), or holds one of that link's own addresses.
var ErrNotOnLink = errors.New("backend: proxy-ndp: IPv6Network must be a part of a prefix that is on-link on the external interface")

// proxyNDP is the proxy-ndp backend. Hosts share an on-link IPv6 prefix
// (a /64 the upstream router treats as on-link and routes nowhere), the
// cluster's IPv6Network is a part of it, and each host's leased slice is
// made reachable on the link by answering Neighbor Solicitations for its
// addresses with the host's MAC (package ndp). Nothing happens per
// container. The link is the external interface's IPv6 link
// (ExtIface.Link(ipfam.IPv6)), which may differ from the IPv4 one.
//
// Peers' subnets of both families are routed via the peer's address on the
// link exactly as host-gw does (the engine with the hostGW datapath), so
// traffic between hosts' containers does not depend on NDP. IPv4 is routed
// the same way; it has no NDP side.
//
// No kernel proxy entries are used, so net.ipv6.conf.*.proxy_ndp and
// proxy_delay are left alone; the sysctls set are IPv6 forwarding and, on
// the uplink, accept_ra 1→2 (enableForwarding).
type proxyNDP struct {
	*engine
	r    *ndp.Responder
	keep atomic.Bool // Handoff: Run leaves the responder answering
}

// Withdrawer is implemented by backends that answer for the host's lease on
// the link (proxy-ndp). Withdraw stops answering at once, before the lease
// could be claimed by another host; the next Start resumes. The agent calls
// it when its lease session ends and then calls Start again once it holds a
// lease, even if the subnet is the same.
type Withdrawer interface {
	Withdraw()
}

// Handoff is implemented by backends that answer for the host's lease on
// the link (proxy-ndp). After Handoff, the end of the backend's Run leaves
// the answering in place: it lasts until the process exits (the packet
// socket closes with it). The agent calls it when it stops with its lease
// held and left in place for the next run, so that the upstream router's
// neighbour entries are answered until the last moment, and the next run
// resumes answering as soon as it holds the lease again.
type Handoff interface {
	Handoff()
}

// Answerer is implemented by backends that answer for the host's lease on
// the link (proxy-ndp). Answer starts answering for local's subnet without
// the rest of Start, so that the agent can answer as soon as it holds its
// lease, before it has read the other leases. Start does it again.
type Answerer interface {
	Answer(local Local) error
}

func newProxyNDP(e *engine, cfg Config) (*proxyNDP, error) {
	l := e.ext.Link(ipfam.IPv6)
	side := e.k.Side()
	r, err := ndp.NewResponder(side, l.Name, l.Index, cfg.Mode)
	if err != nil {
		side.Close()
		return nil, err
	}
	return &proxyNDP{engine: e, r: r}, nil
}

// Start checks that the IPv6 network lies inside a prefix on-link on the
// external interface and holds none of its addresses, answers for
// local.Subnet.V6 from now on (Answer; the packet socket opens on the first
// call), then programs what the engine programs for host-gw (forwarding
// sysctls, forward rules, routes to peers once known); the engine's part
// runs even when the socket cannot be opened. A Start with a new lease
// moves the answering to the new slice; the old one is no longer answered.
// It is idempotent. It refuses a lease without IPv6: proxy-ndp exists for
// IPv6 (use host-gw for an IPv4-only network).
func (b *proxyNDP) Start(ctx context.Context, local Local) error {
	// Answering first: it needs neither the firewall nor the routes, and a
	// restarted agent should answer the router again as soon as it can.
	checkErr, startErr := b.answer(local)
	if checkErr != nil {
		return checkErr
	}
	err := b.engine.Start(ctx, local)
	b.logSysctls()
	return errors.Join(err, startErr)
}

// Answer checks that the IPv6 network lies inside a prefix on-link on the
// external interface and holds none of its addresses, then answers for
// local.Subnet.V6 from now on (see Answerer), opening the packet socket on
// the first call.
func (b *proxyNDP) Answer(local Local) error {
	checkErr, startErr := b.answer(local)
	return errors.Join(checkErr, startErr)
}

// answer is Answer; checkErr says why local cannot be answered for on
// this link, startErr why the responder could not start.
func (b *proxyNDP) answer(local Local) (checkErr, startErr error) {
	link := b.ext.Link(ipfam.IPv6)
	if !local.Network.V6.IsValid() || !local.Subnet.V6.IsValid() {
		return fmt.Errorf("backend: proxy-ndp needs IPv6: set IPv6Network in the network config (a part of the on-link prefix of %s), or use Backend.Type %q for an IPv4-only network", link.Name, TypeHostGW), nil
	}
	b.mu.Lock()
	addrs, err := b.k.AddrList(link.Index, netlink.FAMILY_V6)
	mac := link.HardwareAddr
	if err == nil && len(mac) != 6 {
		var l netlink.Link
		if l, err = b.k.LinkByName(link.Name); err == nil {
			mac = l.Attrs().HardwareAddr
		}
	}
	b.mu.Unlock()
	if err != nil {
		return fmt.Errorf("reading %s: %w", link.Name, err), nil
	}
	if len(mac) != 6 {
		return fmt.Errorf("backend: proxy-ndp: %s has no Ethernet address (%q); it needs an Ethernet-like link", link.Name, mac), nil
	}
	var ifAddrs []netip.Prefix
	var src netip.Addr
	for _, a := range addrs {
		if p, ok := prefixFromIPNet(a.IPNet); ok {
			ifAddrs = append(ifAddrs, p)
			if p.Addr().IsLinkLocalUnicast() && !src.IsValid() {
				src = p.Addr()
			}
		}
	}
	if err := checkOnLink(link.Name, local.Network.V6, ifAddrs); err != nil {
		return err, nil
	}
	cfg := ndp.Answer{Slice: local.Subnet.V6.Masked(), MAC: [6]byte(mac), Src: src}
	if b.r.Answering() == cfg {
		return nil, nil // answering already (Answer, then Start)
	}
	if err := b.r.Start(cfg); err != nil {
		return nil, err
	}
	klog.InfoS("proxy-ndp answering", "subnet", local.Subnet.V6.Masked(), "iface", link.Name, "mac", mac.String(), "mode", b.r.Mode(), "source", src)
	return nil, nil
}

// Run runs the engine's reconcile loop and stops answering when it ends,
// unless Handoff was called: whatever else ends the agent's use of the
// backend (a replaced backend) ends the answers too (the packet socket
// closes, which also drops its all-multicast membership).
func (b *proxyNDP) Run(ctx context.Context) error {
	defer func() {
		if !b.keep.Load() {
			b.r.Close()
		}
	}()
	return b.engine.Run(ctx)
}

// Handoff leaves the answering in place when Run ends (see Handoff).
func (b *proxyNDP) Handoff() {
	b.keep.Store(true)
	klog.V(2).InfoS("proxy-ndp keeps answering until the process exits", "iface", b.ext.Link(ipfam.IPv6).Name)
}

// Withdraw stops answering until the next Start (see Withdrawer).
func (b *proxyNDP) Withdraw() {
	if err := b.r.Withdraw(); err != nil {
		klog.ErrorS(err, "proxy-ndp: withdrawing the solicitation filter; answering is off in user space")
	}
	klog.InfoS("proxy-ndp stopped answering until the lease is held again", "iface", b.ext.Link(ipfam.IPv6).Name)
}

// logSysctls logs the sysctls the backend depends on, as they are now.
func (b *proxyNDP) logSysctls() {
	name := b.ext.Link(ipfam.IPv6).Name
	names := []string{"net/ipv6/conf/all/forwarding", "net/ipv6/conf/" + name + "/forwarding", "net/ipv6/conf/" + name + "/accept_ra"}
	kv := make([]any, 0, 2*len(names))
	b.mu.Lock()
	k := b.k
	b.mu.Unlock()
	for _, n := range names {
		v, err := k.Sysctl(n)
		if err != nil {
			v = "?"
		}
		kv = append(kv, strings.ReplaceAll(n, "/", "."), v)
	}
	klog.InfoS("proxy-ndp sysctls (kernel proxy entries unused: proxy_ndp, proxy_delay untouched)", kv...)
}

// checkOnLink returns why the IPv6 network cannot be served by proxy NDP on
// iface, whose addresses (with prefix lengths) are ifAddrs, or nil. The
// network must lie inside a prefix on-link on iface — otherwise the
// upstream router never solicits its addresses there — and must not hold
// an address of iface, or this host would answer for other hosts'
// addresses on the same link.
func checkOnLink(iface string, network netip.Prefix, ifAddrs []netip.Prefix) error {
	network = network.Masked()
	var globals []string
	for _, a := range ifAddrs {
		if !a.Addr().Is6() || a.Addr().IsLinkLocalUnicast() {
			continue
		}
		p := a.Masked()
		globals = append(globals, a.String())
		if network.Contains(a.Addr()) {
			return fmt.Errorf("%w: IPv6Network %s contains %s, an address of %s, so this host would answer for its neighbours' addresses; set IPv6Network to a part of %s that holds no host address, e.g. %s",
				ErrNotOnLink, network, a.Addr(), iface, p, upperHalf(p))
		}
	}
	for _, a := range ifAddrs {
		p := a.Masked()
		if a.Addr().Is6() && !a.Addr().IsLinkLocalUnicast() && p.Bits() <= network.Bits() && p.Contains(network.Addr()) {
			return nil
		}
	}
	if len(globals) == 0 {
		return fmt.Errorf("%w: %s has no global IPv6 address, so no prefix is on-link there; add the host's address in the shared /64 to %s (or pick the interface that has it with --iface)",
			ErrNotOnLink, iface, iface)
	}
	return fmt.Errorf("%w: IPv6Network %s is not inside a prefix on-link on %s (it has %s); set IPv6Network to a part of that prefix, e.g. %s, or pick the interface on that prefix with --iface",
		ErrNotOnLink, network, iface, strings.Join(globals, ", "), upperHalf(netip.MustParsePrefix(globals[0]).Masked()))
}

// upperHalf returns the upper half of p (p with one more bit, set), the
// usual choice for container slices when hosts number from the bottom.
func upperHalf(p netip.Prefix) netip.Prefix {
	if p.Bits() >= 128 {
		return p
	}
	a := p.Masked().Addr().As16()
	a[p.Bits()/8] |= 0x80 >> (p.Bits() % 8)
	return netip.PrefixFrom(netip.AddrFrom16(a), p.Bits()+1)
}
