package backend

import (
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net/netip"
	"slices"
	"strings"

	"k8s.io/klog/v2"
)

// Chains leased owns, in iptables and ip6tables alike. FORWARD jumps to
// ForwardChain from a rule leased appends (so that Docker's chains, which
// dockerd inserts at the top, are evaluated first); nat POSTROUTING jumps
// to MasqChain from a rule leased inserts at the top when --ip-masq is set.
// leased adds a jump only when it is missing and never moves one that is
// there, except a FORWARD jump found above FORWARD's jump to DOCKER-USER,
// which it moves to the end once.
const (
	ForwardChain = "LEASED-FWD"
	MasqChain    = "LEASED-POSTRTG"
)

// DockerUserChain is the chain Docker evaluates first in FORWARD and leaves
// to the operator. leased's FORWARD jump always comes after the jump to it.
const DockerUserChain = "DOCKER-USER"

// ErrNoIptables is returned when the iptables (or ip6tables) binary is missing.
var ErrNoIptables = errors.New("backend: iptables not found; install the iptables package")

// rule is one rule's arguments after "-A CHAIN", written as iptables -S
// prints them so that listed and desired rules compare as strings.
type rule []string

func (r rule) line(chain string) string {
	parts := []string{"-A", chain}
	for _, a := range r {
		if strings.ContainsAny(a, " \t") {
			a = `"` + a + `"`
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}

// forwardRules are LEASED-FWD's rules: accept traffic from and to the
// cluster network. With IPv4, traffic from the local subnet to the local
// subnet returns first: it never leaves the host, and dockerd's own rules
// (--icc=false appends a DROP after leased's jump) decide about it.
func forwardRules(network, subnet netip.Prefix) []rule {
	n := network.Masked().String()
	var rs []rule
	if subnet.IsValid() && subnet.Addr().Is4() {
		s := subnet.Masked().String()
		rs = append(rs, rule{"-s", s, "-d", s, "-m", "comment", "--comment", "leased: traffic within this host subnet is left to Docker rules", "-j", "RETURN"})
	}
	return append(rs,
		rule{"-s", n, "-m", "comment", "--comment", "leased: from the cluster network", "-j", "ACCEPT"},
		rule{"-d", n, "-m", "comment", "--comment", "leased: to the cluster network", "-j", "ACCEPT"},
	)
}

// masqRules are LEASED-POSTRTG's rules for one family: traffic from the
// local subnet is masqueraded unless it stays in the cluster network or is
// multicast.
func masqRules(subnet, network netip.Prefix) []rule {
	s, n := subnet.Masked().String(), network.Masked().String()
	mcast := "224.0.0.0/4"
	if subnet.Addr().Is6() {
		mcast = "ff00::/8"
	}
	return []rule{
		{"-s", s, "-d", n, "-m", "comment", "--comment", "leased: no NAT inside the cluster network", "-j", "RETURN"},
		{"-s", s, "-d", mcast, "-m", "comment", "--comment", "leased: no NAT for multicast", "-j", "RETURN"},
		{"-s", s, "-m", "comment", "--comment", "leased: NAT leaving the cluster network", "-j", "MASQUERADE"},
	}
}

// fwOptions say which rules setupForwarding keeps.
type fwOptions struct {
	masq  bool // --ip-masq: LEASED-POSTRTG for every enabled family
	noFwd bool // --iptables-forward-rules=false: no LEASED-FWD, FORWARD is the operator's
	// natGone, when set, remembers per family (0: IPv4, 1: IPv6) that
	// LEASED-POSTRTG was found absent or removed without --ip-masq: only
	// leased creates it, so later checks need not list the nat table
	// again (two iptables runs fewer per resync).
	natGone *[2]bool
}

// setupForwarding installs the forward and (with masq) NAT rules for the
// enabled families through k and is idempotent:
// chains already holding exactly the desired rules are not touched, so a
// restart does not disturb traffic. A chain whose rules differ is replaced
// in one iptables-restore transaction, so it never passes through an empty
// state. It sets *changed (when not nil) if it had to change anything.
func setupForwarding(k firewall, local Local, o fwOptions, changed *bool) error {
	var errs []error
	for fam, network := range local.Network.All() {
		if !network.IsValid() {
			continue
		}
		subnet := local.Subnet.Get(fam)
		ipt, err := k.IPTables(fam == ipfam.IPv6)
		if err != nil {
			return errors.Join(append(errs, err)...)
		}
		c := chains{ipt: ipt, bin: ipt.Cmd()}
		if o.noFwd {
			errs = append(errs, c.remove("filter", "FORWARD", ForwardChain, changed))
		} else {
			errs = append(errs, c.ensure("filter", "FORWARD", ForwardChain, forwardRules(network, subnet), changed))
		}
		switch {
		case o.masq && subnet.IsValid():
			errs = append(errs, c.ensure("nat", "POSTROUTING", MasqChain, masqRules(subnet, network), changed))
			if o.natGone != nil {
				o.natGone[fam] = false
			}
		case o.natGone != nil && o.natGone[fam]:
		default:
			listed, err := c.removeListed("nat", "POSTROUTING", MasqChain, changed)
			errs = append(errs, err)
			if o.natGone != nil {
				o.natGone[fam] = listed && err == nil
			}
		}
	}
	return errors.Join(errs...)
}

func jumpRule(chain string) rule {
	return rule{"-m", "comment", "--comment", "leased: jump to " + chain, "-j", chain}
}

// chains edits leased's chains of one family.
type chains struct {
	ipt ipTables
	bin string // iptables or ip6tables
}

// ensure makes chain hold exactly rules, in order, and makes parent jump to
// it (see placeJump). A chain that is missing or differs is written in one
// iptables-restore --noflush transaction: declaring the chain flushes it
// and the new rules land in the same commit, so packets see either the old
// rules or the new ones, never an empty chain. The table is read with one
// listing (one iptables run), so that the periodic check of a host whose
// rules are in place costs one run per table and family.
func (c chains) ensure(table, parent, chain string, rules []rule, changed *bool) error {
	lines, err := c.ipt.ListTable(table)
	if err != nil {
		return fmt.Errorf("listing table %s: %w", table, err)
	}
	t := parseTable(lines)
	want := make([]string, len(rules))
	for i, r := range rules {
		want[i] = r.line(chain)
	}
	if !t.chains[chain] || !slices.Equal(t.rules[chain], want) {
		if err := c.ipt.Restore(table, chain, want); err != nil {
			return err
		}
		mark(changed)
		klog.V(2).InfoS("set iptables chain", "cmd", c.bin, "table", table, "chain", chain, "rules", len(rules))
	}
	// The restore wrote chain only: parent's rules are as listed.
	return c.placeJump(table, parent, chain, t.rules[parent], changed)
}

// tableRules is one listing of a table (iptables -t TABLE -S): the chains
// it declares and each chain's rules, in order, as "-A CHAIN args" lines.
type tableRules struct {
	chains map[string]bool // user-defined chains (-N); built-in ones have -P lines
	rules  map[string][]string
}

// parseTable reads an iptables -S listing of a whole table.
func parseTable(lines []string) tableRules {
	t := tableRules{chains: map[string]bool{}, rules: map[string][]string{}}
	for _, l := range lines {
		switch {
		case strings.HasPrefix(l, "-N "):
			t.chains[strings.TrimSpace(l[3:])] = true
		case strings.HasPrefix(l, "-P "):
			if f := strings.Fields(l); len(f) >= 2 {
				t.chains[f[1]] = true
			}
		case strings.HasPrefix(l, "-A "):
			name, _, _ := strings.Cut(l[3:], " ")
			t.rules[name] = append(t.rules[name], l)
		}
	}
	return t
}

// placeJump makes parent, whose rules are parentRules ("-A PARENT args"
// lines), jump to chain exactly once. A missing jump is
// appended to FORWARD, after Docker's rules (dockerd inserts its own at the
// top, so this also holds when dockerd starts or restarts later), and
// inserted first in other chains (nat POSTROUTING). A jump that is there is
// left where it is, so leased and dockerd never move each other's rules;
// the one exception is a FORWARD jump above the jump to DOCKER-USER (left
// by an older leased, which kept its jump first), which is moved to the
// end: the operator's DOCKER-USER rules must be evaluated before leased's
// accept rules. Moving adds the new jump before deleting the old one.
func (c chains) placeJump(table, parent, chain string, parentRules []string, changed *bool) error {
	jump := jumpRule(chain)
	jl := jump.line(parent)
	rules := parentRules
	n := 0
	for _, r := range rules {
		if r == jl {
			n++
		}
	}
	forward := table == "filter" && parent == "FORWARD"
	misplaced := forward && n > 0 && slices.Index(rules, jl) < dockerUserIndex(rules, parent)
	if n == 1 && !misplaced {
		return nil
	}
	var err error
	switch {
	case n == 0 || misplaced:
		if forward {
			err = c.ipt.Append(table, parent, jump...)
		} else {
			err = c.ipt.Insert(table, parent, 1, jump...)
		}
		if err != nil {
			return fmt.Errorf("adding jump to %s in %s/%s: %w", chain, table, parent, err)
		}
		if misplaced {
			klog.InfoS("moved leased's FORWARD jump below the jump to DOCKER-USER, so that DOCKER-USER's rules are evaluated first", "cmd", c.bin, "chain", chain)
		} else {
			klog.V(2).InfoS("added iptables jump", "cmd", c.bin, "table", table, "from", parent, "to", chain)
		}
	}
	// Delete the surplus: iptables -D removes the first match, so the jump
	// added above (the last one) is the one that stays.
	extra := n
	if n > 0 && !misplaced {
		extra = n - 1
	}
	for range extra {
		if err := c.ipt.Delete(table, parent, jump...); err != nil {
			return fmt.Errorf("removing a surplus jump to %s in %s/%s: %w", chain, table, parent, err)
		}
	}
	mark(changed)
	return nil
}

// dockerUserIndex is the index in rules of parent's first jump to
// DOCKER-USER, or -1.
func dockerUserIndex(rules []string, parent string) int {
	for i, r := range rules {
		if r == "-A "+parent+" -j "+DockerUserChain {
			return i
		}
	}
	return -1
}

// ruleLines drops the policy and chain-creation lines of an iptables -S listing.
func ruleLines(lines []string) []string {
	out := lines[:0:0]
	for _, l := range lines {
		if strings.HasPrefix(l, "-A ") {
			out = append(out, l)
		}
	}
	return out
}

// remove deletes parent's jumps to chain and the chain, if present. A table
// that cannot be listed (e.g. no ip6tables nat support in the kernel) holds
// nothing of leased's, so that is not an error: hosts without --ip-masq do
// not need the nat table. When the chain is absent it costs one listing.
func (c chains) remove(table, parent, chain string, changed *bool) error {
	_, err := c.removeListed(table, parent, chain, changed)
	return err
}

// removeListed is remove that also reports whether the table could be
// listed (false: nothing was checked).
func (c chains) removeListed(table, parent, chain string, changed *bool) (listed bool, err error) {
	lines, err := c.ipt.ListTable(table)
	if err != nil {
		klog.V(2).InfoS("cannot list the table; nothing of leased's to remove there", "cmd", c.bin, "table", table, "err", err)
		return false, nil
	}
	return true, c.removeFrom(parseTable(lines), table, parent, chain, changed)
}

// removeFrom is remove on the table's listing t.
func (c chains) removeFrom(t tableRules, table, parent, chain string, changed *bool) error {
	if !t.chains[chain] {
		return nil
	}
	jl := jumpRule(chain).line(parent)
	for _, r := range t.rules[parent] {
		if r != jl {
			continue
		}
		if err := c.ipt.Delete(table, parent, jumpRule(chain)...); err != nil {
			return fmt.Errorf("deleting jump to %s in %s/%s: %w", chain, table, parent, err)
		}
	}
	if err := c.ipt.ClearAndDeleteChain(table, chain); err != nil {
		return fmt.Errorf("deleting chain %s/%s: %w", table, chain, err)
	}
	mark(changed)
	klog.V(2).InfoS("removed iptables chain", "cmd", c.bin, "table", table, "chain", chain)
	return nil
}

// mark sets *changed when changed is not nil.
func mark(changed *bool) {
	if changed != nil {
		*changed = true
	}
}
