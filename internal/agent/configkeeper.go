package agent

import (
	"bytes"
	"fmt"
	"net/netip"
	"strings"

	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
)

// configKeeper is the agent's stage that decides which network config
// applies: the one in etcd when it is valid and compatible with the
// subnets this host and its live peers hold, otherwise the last good one.
// It reads the config from the view, the one way it arrives. Not safe for
// concurrent use.
type configKeeper struct {
	key       string // the config key, for messages
	endpoints string // --etcd-endpoints, for messages

	cfg     *lease.Config // the config applied (nil: none yet)
	seenRaw []byte        // the config value last parsed
	// refused is the valid config in etcd this host refused (it leaves
	// out subnets that this host or a live peer holds, or changes the
	// backend type); it is judged again whenever leases change (nil: none).
	refused *lease.Config
	// refusedWhy says why the config in etcd is not applied ("": it is).
	refusedWhy string
	absent     string // what was last logged about a missing config key
}

// update adopts the config in v when it is valid and compatible with own
// (the subnets this host holds or serves) and the leases in v; otherwise
// it says why and keeps the last good config (and with it the datapath).
// leasesChanged says whether leases changed since the last update (a
// refused config is judged again). It returns the status to report, or "".
func (c *configKeeper) update(v *lease.View, own []netip.Prefix, leasesChanged bool) string {
	if v.Config == nil {
		c.refused, c.seenRaw, c.refusedWhy = nil, nil, "" // nothing left to apply; a config put back is judged afresh
		if c.cfg == nil && c.absent != "waiting" {
			c.absent = "waiting"
			klog.ErrorS(nil, "Key not found: no network config in etcd; waiting for it",
				"key", c.key,
				"create", fmt.Sprintf(`ETCDCTL_API=3 etcdctl --endpoints=%s put %s '{"Network":"10.100.0.0/16","IPv6Network":"2001:db8:1::/48","Backend":{"Type":"host-gw"}}'`, c.endpoints, c.key),
				"note", "the v2-era 'etcdctl set' writes the v2 keyspace, which leased (an etcd v3 client) never sees")
			return "waiting for config"
		} else if c.cfg != nil && c.absent != "deleted" {
			c.absent = "deleted"
			klog.Warningf("network config %s was deleted; keeping the last good config and the datapath", c.key)
		}
		return ""
	}
	c.absent = ""
	status := c.adopt(v.Config, own, v.Records)
	if leasesChanged {
		c.recheckRefused(own, v.Records)
	}
	return status
}

// adopt is update for the config value raw.
func (c *configKeeper) adopt(raw []byte, own []netip.Prefix, records map[string]*lease.Record) string {
	if bytes.Equal(raw, c.seenRaw) {
		return "" // nothing new since the last look
	}
	c.seenRaw = raw
	cfg, warnings, err := lease.ParseConfig(raw)
	if err == nil {
		err = backend.ValidateConfig(cfg.Backend.Raw)
	}
	for _, w := range warnings {
		klog.Warningf("network config %s: %s", c.key, w)
	}
	if err != nil {
		klog.ErrorS(err, "invalid network config; keeping the last good one", "key", c.key,
			"remedy", "fix the JSON and put it again (leased config validate FILE checks a file offline)")
		c.refused = nil // what etcd holds now is this invalid config
		c.refusedWhy = "invalid network config: " + err.Error()
		return c.refusedWhy
	}
	if c.cfg != nil {
		if c.cfg.Equal(cfg) {
			// Only the formatting changed: nothing to do on this host.
			c.refused, c.refusedWhy = nil, ""
			klog.V(2).InfoS("network config rewritten with the same content; nothing changes", "key", c.key)
			return ""
		}
		if why := c.ownConflict(cfg, own); why != "" {
			klog.ErrorS(nil, "network config change would invalidate this host's lease; keeping the last good config and the datapath",
				"why", why, "remedy", "revert the change, or drain this host and restart leased to take a subnet under the new config")
			c.refused = cfg
			c.refusedWhy = "network config refused: " + why
			return c.refusedWhy
		}
		if why := c.peerConflict(cfg, records); why != "" {
			klog.ErrorS(nil, "network config refused: it leaves out subnets that live hosts hold; keeping the last good config and the datapath",
				"why", why, "remedy", "put back a config that keeps every held subnet (leased config put --dry-run checks this), or drain the hosts named; every host refuses the config while they hold those subnets, and applies it once they are gone")
			c.refused = cfg
			c.refusedWhy = "network config refused: " + why
			return c.refusedWhy
		}
		c.refused = nil
		klog.InfoS("network config changed; applying", "ipv4", PoolString(cfg.IPv4), "ipv6", PoolString(cfg.IPv6), "backend", cfg.Backend.Type)
	} else {
		klog.InfoS("network config", "ipv4", PoolString(cfg.IPv4), "ipv6", PoolString(cfg.IPv6), "backend", cfg.Backend.Type)
	}
	c.cfg = cfg
	c.refusedWhy = ""
	return ""
}

func PoolString(p *lease.Pool) string {
	if p == nil {
		return "disabled"
	}
	return p.String()
}

// ownConflict says why this host cannot move from c.cfg to new, or "": the
// backend type changes, or new leaves out a subnet of own, those this host
// holds or still serves in the datapath (also while it re-claims a lost
// lease).
func (c *configKeeper) ownConflict(new *lease.Config, own []netip.Prefix) string {
	old := c.cfg
	if old.Backend.Type != new.Backend.Type {
		return fmt.Sprintf("Backend.Type changed from %s to %s: switching backends needs every host restarted", old.Backend.Type, new.Backend.Type)
	}
	for _, s := range own {
		pool, fam := new.IPv4, "IPv4"
		if s.Addr().Is6() {
			pool, fam = new.IPv6, "IPv6"
		}
		if pool == nil {
			return fmt.Sprintf("%s is disabled in the new config but this host holds %s", fam, s)
		}
		if !pool.Contains(s) {
			return fmt.Sprintf("this host's subnet %s is not in the new range %s", s, pool)
		}
	}
	return ""
}

// peerConflict says which live hosts' subnets new leaves out
// (lease.ConfigConflicts), or "". Every host sees the same leases, so every
// host refuses such a config, and none drops its routes to the stranded
// hosts while the others keep theirs.
func (c *configKeeper) peerConflict(new *lease.Config, records map[string]*lease.Record) string {
	x := lease.ConfigConflicts(c.cfg, new, records)
	if len(x) == 0 {
		return ""
	}
	const show = 3
	names := make([]string, 0, show)
	for _, y := range x[:min(show, len(x))] {
		names = append(names, y.String())
	}
	more := ""
	if len(x) > show {
		more = fmt.Sprintf(" and %d more (leased config put --dry-run lists them)", len(x)-show)
	}
	return fmt.Sprintf("%d live host(s) hold subnets outside it: %s%s", len(x), strings.Join(names, "; "), more)
}

// recheckRefused adopts the refused config once the leases that made it
// refused are gone (for instance the hosts were drained).
func (c *configKeeper) recheckRefused(own []netip.Prefix, records map[string]*lease.Record) {
	if c.refused == nil || c.ownConflict(c.refused, own) != "" || c.peerConflict(c.refused, records) != "" {
		return
	}
	cfg := c.refused
	c.refused, c.refusedWhy = nil, ""
	klog.InfoS("network config no longer strands a held subnet; applying", "ipv4", PoolString(cfg.IPv4), "ipv6", PoolString(cfg.IPv6), "backend", cfg.Backend.Type)
	c.cfg = cfg
}
