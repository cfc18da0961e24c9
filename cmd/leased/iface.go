package main

import (
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
// name matches --iface-regex and has an address, else the interface of the
// IPv4 default route, else of the IPv6 default route.
func findExtIface(o *options) (backend.ExtIface, string, error) {
	link, why, err := pickLink(o)
	if err != nil {
		return backend.ExtIface{}, "", err
	}
	attrs := link.Attrs()
	ext := backend.ExtIface{Name: attrs.Name, Index: attrs.Index, MTU: attrs.MTU, HardwareAddr: attrs.HardwareAddr}
	ext.Addr4, ext.Addr6 = linkAddrs(link)
	ext.Public4, ext.Public6 = ext.Addr4, ext.Addr6
	if o.publicIP != "" {
		ext.Public4 = netip.MustParseAddr(o.publicIP) // validated in options.validate
	}
	if o.publicIPv6 != "" {
		ext.Public6 = netip.MustParseAddr(o.publicIPv6)
	}
	if !ext.Public4.IsValid() && !ext.Public6.IsValid() {
		return ext, "", fmt.Errorf("interface %s has no global IPv4 or IPv6 address: add one, or pick another with --iface", ext.Name)
	}
	return ext, why, nil
}

func pickLink(o *options) (netlink.Link, string, error) {
	if len(o.ifaces) > 0 {
		for _, spec := range o.ifaces {
			if ip, err := netip.ParseAddr(spec); err == nil {
				if l := linkWithAddr(ip); l != nil {
					return l, "--iface " + spec, nil
				}
				continue
			}
			if l, err := netlink.LinkByName(spec); err == nil {
				return l, "--iface " + spec, nil
			}
		}
		return nil, "", fmt.Errorf("none of --iface %v exists on this host: check the names with 'ip link' and addresses with 'ip addr'", []string(o.ifaces))
	}
	if o.ifaceRegex != "" {
		re, err := regexp.Compile(o.ifaceRegex)
		if err != nil {
			return nil, "", fmt.Errorf("--iface-regex %q: %w", o.ifaceRegex, err)
		}
		links, err := netlink.LinkList()
		if err != nil {
			return nil, "", fmt.Errorf("listing links: %w", err)
		}
		for _, l := range links {
			if a4, a6 := linkAddrs(l); re.MatchString(l.Attrs().Name) && (a4.IsValid() || a6.IsValid()) {
				return l, "--iface-regex " + o.ifaceRegex, nil
			}
		}
		return nil, "", fmt.Errorf("no interface with an address matches --iface-regex %q", o.ifaceRegex)
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, "", fmt.Errorf("listing routes: %w", err)
		}
		for _, r := range routes {
			if (r.Dst == nil || isDefault(r.Dst)) && r.LinkIndex > 0 {
				l, err := netlink.LinkByIndex(r.LinkIndex)
				if err == nil {
					return l, "default route", nil
				}
			}
		}
	}
	return nil, "", errors.New("no default route to pick the interface from: give --iface (name or address) or --iface-regex")
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
