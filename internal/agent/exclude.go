package agent

import (
	"fmt"
	"net/netip"
	"os"
	"strings"

	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
)

// exclusions returns the host's own routes inside the config's networks
// (connected LANs, VPN and bridge links, local addresses; not routes that
// cover a whole network): the parts of the network this host cannot lease
// a subnet in. It logs them, at the first
// claim and whenever they change.
func (k *leaseKeeper) exclusions(cfg *lease.Config) ([]lease.Excluded, error) {
	var net4, net6 netip.Prefix
	var nets []netip.Prefix
	if cfg.IPv4 != nil {
		net4 = cfg.IPv4.Network
		nets = append(nets, net4)
	}
	if cfg.IPv6 != nil {
		net6 = cfg.IPv6.Network
		nets = append(nets, net6)
	}
	rs, err := backend.HostRoutes(net4, net6)
	if err != nil {
		return nil, fmt.Errorf("listing this host's routes to keep its lease off them: %w", err)
	}
	out := make([]lease.Excluded, 0, len(rs))
	var descs []string
	for _, r := range rs {
		out = append(out, lease.Excluded{Prefix: r.Dst, Route: r.Desc, Own: r.Own})
		if !r.Own {
			descs = append(descs, r.Desc)
		}
	}
	if logged := strings.Join(descs, ", "); logged != k.exclLogged {
		k.exclLogged = logged
		if logged != "" {
			klog.InfoS("this host routes part of the cluster network itself; it will not lease a subnet that overlaps these routes",
				"routes", descs, "networks", nets)
		}
	}
	return out, nil
}

// HostReport is `leased config validate --host`: which parts of the valid
// config data's networks this host cannot lease a subnet in, because it
// routes them itself. It returns the exit status.
func HostReport(data []byte) int {
	cfg, _, err := lease.ParseConfig(data)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%v\n", err)
		return 1
	}
	var net4, net6 netip.Prefix
	if cfg.IPv4 != nil {
		net4 = cfg.IPv4.Network
	}
	if cfg.IPv6 != nil {
		net6 = cfg.IPv6.Network
	}
	rs, err := backend.HostRoutes(net4, net6)
	if err != nil {
		fmt.Fprintf(os.Stderr, "this host: listing its routes: %v\n", err)
		return 1
	}
	for _, r := range rs {
		if r.Own {
			fmt.Fprintf(os.Stderr, "this host: %s is on a bridge or a leased device: it keeps this host off %s unless this host held a subnet there before\n", r.Desc, r.Dst)
			continue
		}
		fmt.Fprintf(os.Stderr, "this host: cannot lease a subnet overlapping %s: it routes it itself (%s)\n", r.Dst, r.Desc)
	}
	if len(rs) == 0 {
		fmt.Fprintln(os.Stderr, "this host: routes no part of the network itself; it can lease any subnet")
	}
	return 0
}
