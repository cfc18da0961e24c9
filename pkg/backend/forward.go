package backend

import (
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"

	"github.com/coreos/go-iptables/iptables"
	"k8s.io/klog/v2"
)

// Chains leased owns. FORWARD jumps to ForwardChain from its first rule;
// nat POSTROUTING jumps to MasqChain from its first rule when --ip-masq is set.
const (
	ForwardChain = "LEASED-FWD"
	MasqChain    = "LEASED-POSTRTG"
)

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

func forwardRules(network netip.Prefix) []rule {
	n := network.Masked().String()
	return []rule{
		{"-s", n, "-m", "comment", "--comment", "leased: from the cluster network", "-j", "ACCEPT"},
		{"-d", n, "-m", "comment", "--comment", "leased: to the cluster network", "-j", "ACCEPT"},
	}
}

func masqRules(subnet, network netip.Prefix) []rule {
	s, n := subnet.Masked().String(), network.Masked().String()
	return []rule{
		{"-s", s, "-d", n, "-m", "comment", "--comment", "leased: no NAT inside the cluster network", "-j", "RETURN"},
		{"-s", s, "-d", "224.0.0.0/4", "-m", "comment", "--comment", "leased: no NAT for multicast", "-j", "RETURN"},
		{"-s", s, "-m", "comment", "--comment", "leased: NAT leaving the cluster network", "-j", "MASQUERADE"},
	}
}

// setupForwarding installs the forward (and, with masq, IPv4 NAT) rules for
// the enabled families. It runs in the backend's namespace and is
// idempotent: chains already holding exactly the desired rules are not
// touched, so a restart does not disturb traffic. It sets *changed (when
// not nil) if it had to change anything.
func setupForwarding(local Local, masq bool, changed *bool) error {
	var errs []error
	if local.Network4.IsValid() {
		ipt, err := newIPTables(iptables.ProtocolIPv4, "iptables")
		if err != nil {
			return err
		}
		errs = append(errs, ensureChain(ipt, "filter", "FORWARD", ForwardChain, forwardRules(local.Network4), changed))
		if masq && local.Subnet4.IsValid() {
			errs = append(errs, ensureChain(ipt, "nat", "POSTROUTING", MasqChain, masqRules(local.Subnet4, local.Network4), changed))
		} else {
			errs = append(errs, removeChain(ipt, "nat", "POSTROUTING", MasqChain, changed))
		}
	}
	if local.Network6.IsValid() {
		ipt, err := newIPTables(iptables.ProtocolIPv6, "ip6tables")
		if err != nil {
			return errors.Join(append(errs, err)...)
		}
		errs = append(errs, ensureChain(ipt, "filter", "FORWARD", ForwardChain, forwardRules(local.Network6), changed))
	}
	return errors.Join(errs...)
}

func newIPTables(proto iptables.Protocol, bin string) (*iptables.IPTables, error) {
	if _, err := exec.LookPath(bin); err != nil {
		return nil, fmt.Errorf("%w (%s: %v)", ErrNoIptables, bin, err)
	}
	ipt, err := iptables.NewWithProtocol(proto)
	if err != nil {
		return nil, fmt.Errorf("running %s: %w", bin, err)
	}
	return ipt, nil
}

func jumpRule(chain string) rule {
	return rule{"-m", "comment", "--comment", "leased: jump to " + chain, "-j", chain}
}

// ensureChain makes chain hold exactly rules, in order, and makes the first
// rule of parent jump to it. A chain that differs is flushed and refilled.
func ensureChain(ipt *iptables.IPTables, table, parent, chain string, rules []rule, changed *bool) error {
	exists, err := ipt.ChainExists(table, chain)
	if err != nil {
		return fmt.Errorf("checking chain %s/%s: %w", table, chain, err)
	}
	if !exists {
		if err := ipt.NewChain(table, chain); err != nil {
			return fmt.Errorf("creating chain %s/%s: %w", table, chain, err)
		}
		mark(changed)
	}
	have, err := ipt.List(table, chain)
	if err != nil {
		return fmt.Errorf("listing chain %s/%s: %w", table, chain, err)
	}
	want := make([]string, len(rules))
	for i, r := range rules {
		want[i] = r.line(chain)
	}
	if !slices.Equal(ruleLines(have), want) {
		if err := ipt.ClearChain(table, chain); err != nil {
			return fmt.Errorf("flushing chain %s/%s: %w", table, chain, err)
		}
		for _, r := range rules {
			if err := ipt.Append(table, chain, r...); err != nil {
				return fmt.Errorf("adding rule %q: %w", r.line(chain), err)
			}
		}
		mark(changed)
		klog.V(2).InfoS("set iptables chain", "table", table, "chain", chain, "rules", len(rules))
	}
	return ensureFirstJump(ipt, table, parent, chain, changed)
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

func ensureFirstJump(ipt *iptables.IPTables, table, parent, chain string, changed *bool) error {
	jump := jumpRule(chain)
	lines, err := ipt.List(table, parent)
	if err != nil {
		return fmt.Errorf("listing chain %s/%s: %w", table, parent, err)
	}
	rules := ruleLines(lines)
	if len(rules) > 0 && rules[0] == jump.line(parent) {
		return nil
	}
	// Insert first, then delete the old jump by its number: there is no
	// moment without a jump while it moves to the top.
	if err := ipt.Insert(table, parent, 1, jump...); err != nil {
		return fmt.Errorf("adding jump to %s in %s/%s: %w", chain, table, parent, err)
	}
	if slices.Contains(rules, jump.line(parent)) {
		lines, err := ipt.List(table, parent)
		if err != nil {
			return fmt.Errorf("listing chain %s/%s: %w", table, parent, err)
		}
		now := ruleLines(lines)
		if old := lastIndex(now, jump.line(parent)); old > 0 {
			if err := ipt.Delete(table, parent, strconv.Itoa(old+1)); err != nil { // rule numbers start at 1
				return fmt.Errorf("removing the old jump to %s in %s/%s: %w", chain, table, parent, err)
			}
		}
	}
	mark(changed)
	klog.V(2).InfoS("added iptables jump", "table", table, "from", parent, "to", chain)
	return nil
}

// removeChain deletes parent's jump to chain and the chain, if present.
func removeChain(ipt *iptables.IPTables, table, parent, chain string, changed *bool) error {
	exists, err := ipt.ChainExists(table, chain)
	if err != nil || !exists {
		return err
	}
	if err := ipt.DeleteIfExists(table, parent, jumpRule(chain)...); err != nil {
		return fmt.Errorf("deleting jump to %s in %s/%s: %w", chain, table, parent, err)
	}
	if err := ipt.ClearAndDeleteChain(table, chain); err != nil {
		return fmt.Errorf("deleting chain %s/%s: %w", table, chain, err)
	}
	mark(changed)
	klog.V(2).InfoS("removed iptables chain", "table", table, "chain", chain)
	return nil
}

// mark sets *changed when changed is not nil.
func mark(changed *bool) {
	if changed != nil {
		*changed = true
	}
}

func lastIndex(s []string, v string) int {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == v {
			return i
		}
	}
	return -1
}
