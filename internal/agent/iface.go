package agent

import (
	"github.com/leased/leased/pkg/ipfam"

	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/pkg/backend"
)

// findExtIface picks the interface that carries inter-host traffic: the
// first --iface (name or address) that exists, else the first link whose
// name matches --iface-regex and has an address; both families then use
// that link. Without either, each family uses the link of its own default
// route (IPv4 the IPv4 default route's, IPv6 the IPv6 one's), and a family
// without a default route uses the other family's link. The returned text
// says why, per family when they differ.
func findExtIface(o *Options) (backend.ExtIface, string, error) {
	link4, link6, why, err := pickLinks(o)
	if err != nil {
		return backend.ExtIface{}, "", err
	}
	a4 := link4.Attrs()
	ext := backend.ExtIface{V4: backend.ExtLink{Name: a4.Name, Index: a4.Index, MTU: a4.MTU, HardwareAddr: a4.HardwareAddr}}
	ext.V4.Addr, ext.V6.Addr = linkAddrs(link4)
	if a6 := link6.Attrs(); a6.Index != a4.Index {
		ext.V6.Name, ext.V6.Index, ext.V6.MTU, ext.V6.HardwareAddr = a6.Name, a6.Index, a6.MTU, a6.HardwareAddr
		_, ext.V6.Addr = linkAddrs(link6)
	}
	ext.V4.Public, ext.V6.Public = ext.V4.Addr, ext.V6.Addr
	if o.PublicIP != "" {
		ext.V4.Public = netip.MustParseAddr(o.PublicIP) // validated in options.validate
	}
	if o.PublicIPv6 != "" {
		ext.V6.Public = netip.MustParseAddr(o.PublicIPv6)
	}
	if !ipfam.Any(ext.Public()) {
		if ext.Split() {
			return ext, "", fmt.Errorf("interface %s has no global IPv4 address and %s no global IPv6 address: add one, or pick another interface with --iface", ext.V4.Name, ext.V6.Name)
		}
		return ext, "", fmt.Errorf("interface %s has no global IPv4 or IPv6 address: add one, or pick another with --iface", ext.V4.Name)
	}
	return ext, why, nil
}

// pickLinks returns the links of IPv4 and IPv6 traffic and why they were
// chosen.
func pickLinks(o *Options) (link4, link6 netlink.Link, why string, err error) {
	if len(o.Ifaces) > 0 {
		for _, spec := range o.Ifaces {
			if ip, err := netip.ParseAddr(spec); err == nil {
				if l := linkWithAddr(ip); l != nil {
					return l, l, "--iface " + spec, nil
				}
				continue
			}
			if l, err := netlink.LinkByName(spec); err == nil {
				return l, l, "--iface " + spec, nil
			}
		}
		return nil, nil, "", fmt.Errorf("none of --iface %v exists on this host: check the names with 'ip link' and addresses with 'ip addr'", []string(o.Ifaces))
	}
	if o.IfaceRegex != "" {
		re, err := regexp.Compile(o.IfaceRegex)
		if err != nil {
			return nil, nil, "", fmt.Errorf("--iface-regex %q: %w", o.IfaceRegex, err)
		}
		links, err := netlink.LinkList()
		if err != nil {
			return nil, nil, "", fmt.Errorf("listing links: %w", err)
		}
		for _, l := range links {
			if a4, a6 := linkAddrs(l); re.MatchString(l.Attrs().Name) && (a4.IsValid() || a6.IsValid()) {
				return l, l, "--iface-regex " + o.IfaceRegex, nil
			}
		}
		return nil, nil, "", fmt.Errorf("no interface with an address matches --iface-regex %q", o.IfaceRegex)
	}
	if link4, err = defaultRouteLink(netlink.FAMILY_V4); err != nil {
		return nil, nil, "", err
	}
	if link6, err = defaultRouteLink(netlink.FAMILY_V6); err != nil {
		return nil, nil, "", err
	}
	switch {
	case link4 == nil && link6 == nil:
		return nil, nil, "", errors.New("no default route to pick the interface from: give --iface (name or address) or --iface-regex")
	case link6 == nil:
		return link4, link4, "IPv4 default route (no IPv6 default route: IPv6 uses it too)", nil
	case link4 == nil:
		return link6, link6, "IPv6 default route (no IPv4 default route: IPv4 uses it too)", nil
	case link4.Attrs().Index == link6.Attrs().Index:
		return link4, link6, "default route", nil
	}
	return link4, link6, fmt.Sprintf("IPv4 default route; IPv6 uses %s, the link of the IPv6 default route", link6.Attrs().Name), nil
}

// defaultRouteLink returns the link of the main table's default route of
// family with the lowest metric (of its first next hop if it has several),
// or nil when there is none. Unreachable, blackhole and prohibit default
// routes do not count.
func defaultRouteLink(family int) (netlink.Link, error) {
	routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	var best netlink.Link
	bestPrio := 0
	for _, r := range routes {
		if (r.Dst != nil && !isDefault(r.Dst)) || (r.Type != 0 && r.Type != unix.RTN_UNICAST) {
			continue // not a default route, or an unreachable/blackhole one
		}
		idx := r.LinkIndex
		if idx <= 0 && len(r.MultiPath) > 0 {
			idx = r.MultiPath[0].LinkIndex
		}
		if idx <= 0 || (best != nil && r.Priority >= bestPrio) {
			continue
		}
		if l, err := netlink.LinkByIndex(idx); err == nil {
			best, bestPrio = l, r.Priority
		}
	}
	return best, nil
}

func isDefault(n *net.IPNet) bool { ones, _ := n.Mask.Size(); return ones == 0 }

func linkWithAddr(ip netip.Addr) netlink.Link {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil
	}
	for _, a := range addrs {
		if x, ok := netip.AddrFromSlice(a.IP); ok && x.Unmap() == ip {
			if l, err := netlink.LinkByIndex(a.LinkIndex); err == nil {
				return l
			}
		}
	}
	return nil
}

// linkAddrs returns the first global (non link-local) IPv4 and IPv6
// addresses of l.
func linkAddrs(l netlink.Link) (v4, v6 netip.Addr) {
	addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLinkLocalUnicast() || ip.IsLoopback() || a.Flags&unix.IFA_F_DEPRECATED != 0 {
			continue
		}
		if ip.Is4() && !v4.IsValid() {
			v4 = ip
		}
		if ip.Is6() && !v6.IsValid() {
			v6 = ip
		}
	}
	return
}
