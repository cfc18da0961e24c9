package lab

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// The upstream-router topology of the proxy-ndp backend (scenario B): the
// hosts' IPv6 addresses sit low in one on-link /64, an upstream router at
// ::1 on the same LAN knows only that /64 (on-link, no route to any slice),
// and the cluster's IPv6Network is the upper half of the /64, leased to
// hosts in /80s. The router reaches containers only if their hosts answer
// its Neighbor Solicitations. Every other part of the lab (etcd, IPv4,
// containers) is as for the other backends.

// UpstreamBackend is the backend whose labs get the upstream topology.
const UpstreamBackend = "proxy-ndp"

// Addressing of the upstream topology.
var (
	UpstreamPrefix  = netip.MustParsePrefix("2001:db8:ab11::/64")
	UpstreamRouter  = netip.MustParseAddr("2001:db8:ab11::1")
	UpstreamNetwork = "2001:db8:ab11:0:8000::/65" // default IPv6Network
	// upstreamSubnetLen is the default IPv6SubnetLen: /80 slices.
	upstreamSubnetLen = 80
)

// Upstream is the lab's upstream router (proxy-ndp labs only).
type Upstream struct {
	NS     string       // the router's namespace; its LAN interface is eth0
	Addr   netip.Addr   // UpstreamRouter
	Prefix netip.Prefix // UpstreamPrefix, on-link on eth0
}

// upstreamDefaults fills the IPv6 defaults of a proxy-ndp lab before the
// generic ones apply.
func (c *Config) upstreamDefaults() {
	if c.Backend != UpstreamBackend {
		return
	}
	if c.IPv6Network == "" {
		c.IPv6Network = UpstreamNetwork
	}
	if c.IPv6SubnetLen == 0 {
		c.IPv6SubnetLen = upstreamSubnetLen
	}
}

// buildUpstream turns the LAN built by buildNetwork into the upstream
// topology when the backend is proxy-ndp (else it does nothing): it adds the
// router on the first LAN, moves each host's IPv6 address into the /64
// (host i at ::(10+i)) with its IPv6 default route via the router, and
// keeps the LAN's own prefix reachable on-link so that etcd stays reachable
// over an IPv6-only underlay.
func (l *Lab) buildUpstream() error {
	if l.Cfg.Backend != UpstreamBackend || !l.underlay6() {
		if l.Cfg.Backend == UpstreamBackend {
			return fmt.Errorf("lab: %s needs an IPv6 underlay (--underlay dual or v6)", UpstreamBackend)
		}
		return nil
	}
	for _, h := range l.Hosts {
		if h.LAN != 0 {
			return fmt.Errorf("lab: %s puts every host on one LAN; drop --routed", UpstreamBackend)
		}
	}
	r, err := l.addNS("up")
	if err != nil {
		return err
	}
	lan := l.ns("lan1")
	_, etcd6 := lanAddr(0, 254)
	cmds := []string{
		"-n " + r + " link add eth0 type veth peer name upr netns " + lan,
		"-n " + lan + " link set upr master br0 up",
		"-n " + r + " link set eth0 up",
		"-n " + r + " addr add " + netip.PrefixFrom(UpstreamRouter, UpstreamPrefix.Bits()).String() + " dev eth0 nodad",
		// etcd's namespace reaches the hosts' new addresses on-link.
		"-n " + lan + " addr add " + netip.PrefixFrom(lastAddr(UpstreamPrefix, 0xfe), UpstreamPrefix.Bits()).String() + " dev br0 nodad",
	}
	for i, h := range l.Hosts {
		a6 := lastAddr(UpstreamPrefix, byte(11+i)) // host i+1 at ::(10+i+1), as on the LAN
		cmds = append(cmds,
			"-n "+h.NS+" addr del "+netip.PrefixFrom(h.Addr6, 64).String()+" dev eth0",
			"-n "+h.NS+" addr add "+netip.PrefixFrom(a6, UpstreamPrefix.Bits()).String()+" dev eth0 nodad",
			"-n "+h.NS+" -6 route replace "+lans[0].v6.String()+" dev eth0", // etcd's LAN stays on-link
			"-n "+h.NS+" -6 route replace default via "+UpstreamRouter.String()+" dev eth0",
		)
		h.Addr6 = a6
	}
	if err := batch(cmds); err != nil {
		return err
	}
	if err := sysctl(r, "net.ipv6.conf.all.forwarding=1"); err != nil {
		return err
	}
	l.Upstream = &Upstream{NS: r, Addr: UpstreamRouter, Prefix: UpstreamPrefix}
	l.Cfg.Log("upstream router %s in namespace %s: only %s on-link, no route to any host's slice (etcd at %s)", UpstreamRouter, r, UpstreamPrefix, etcd6)
	return nil
}

// lastAddr returns p's address with the last byte set to b.
func lastAddr(p netip.Prefix, b byte) netip.Addr {
	a := p.Addr().As16()
	a[15] = b
	return netip.AddrFrom16(a)
}

// Neigh returns the router's neighbour entry for a (`ip -6 neigh show`),
// empty when it has none.
func (u *Upstream) Neigh(a netip.Addr) (string, error) {
	out, err := nsExec(u.NS, "ip", "-6", "neigh", "show", a.String(), "dev", "eth0")
	if err != nil {
		return "", fmt.Errorf("ip -6 neigh show %s in %s: %v: %s", a, u.NS, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}

// FlushNeigh empties the router's neighbour cache.
func (u *Upstream) FlushNeigh() error {
	return ip("-n", u.NS, "-6", "neigh", "flush", "dev", "eth0")
}

// MAC returns the MAC address of h's eth0, the link to the router.
func (h *Host) MAC() (string, error) {
	out, err := nsExec(h.NS, "cat", "/sys/class/net/eth0/address")
	if err != nil {
		return "", fmt.Errorf("reading the MAC of %s: %v: %s", h.Name, err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

// UpstreamCell is one router ↔ container reachability check.
type UpstreamCell struct {
	Host     *Host
	ToRouter bool // container → router; else router → container
	Dst      netip.Addr
	Err      error
}

// UpstreamMatrix pings every container's IPv6 address from the router and
// the router from every container, retrying each for up to timeout.
func (l *Lab) UpstreamMatrix(ctx context.Context, timeout time.Duration) []UpstreamCell {
	if l.Upstream == nil {
		return nil
	}
	var cells []UpstreamCell
	for _, h := range l.Hosts {
		if !h.Container.Addr6.IsValid() {
			continue
		}
		cells = append(cells, UpstreamCell{Host: h, Dst: h.Container.Addr6},
			UpstreamCell{Host: h, ToRouter: true, Dst: l.Upstream.Addr})
	}
	var wg sync.WaitGroup
	for i := range cells {
		wg.Add(1)
		go func(c *UpstreamCell) {
			defer wg.Done()
			from := l.Upstream.NS
			if c.ToRouter {
				from = c.Host.CNS
			}
			c.Err = PingUntil(ctx, from, c.Dst, 0, timeout)
		}(&cells[i])
	}
	wg.Wait()
	return cells
}

// PrintUpstream writes the router ↔ container table with the router's
// neighbour entry for each container, and returns the number of failures.
func PrintUpstream(w io.Writer, l *Lab, cells []UpstreamCell) int {
	if l.Upstream == nil {
		return 0
	}
	failed := 0
	res := map[string][2]string{}
	for _, c := range cells {
		v := res[c.Host.Name]
		i := 0
		if c.ToRouter {
			i = 1
		}
		v[i] = "ok"
		if c.Err != nil {
			v[i], failed = "FAIL", failed+1
		}
		res[c.Host.Name] = v
	}
	fmt.Fprintf(w, "\nupstream router %s (knows only %s on-link) ↔ containers:\n", l.Upstream.Addr, l.Upstream.Prefix)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "host\tcontainer\trouter → ctr\tctr → router\thost MAC\trouter's neighbour entry")
	for _, h := range l.Hosts {
		v, ok := res[h.Name]
		if !ok {
			continue
		}
		mac, _ := h.MAC()
		n, _ := l.Upstream.Neigh(h.Container.Addr6)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", h.Name, h.Container.Addr6, v[0], v[1], mac, n)
	}
	tw.Flush()
	for _, c := range cells {
		if c.Err != nil {
			fmt.Fprintf(w, "  %v\n", c.Err)
		}
	}
	return failed
}
