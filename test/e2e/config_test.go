package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
)

// A config that leaves one host's subnet out is refused by `leased config
// put` (naming the host), and, written anyway with --force, by every agent:
// no host drops its route to the other, in the kernel, while they hold
// their subnets. Before, the host whose subnet stayed inside the narrowed
// Network adopted it and removed its route to the other one.
func TestConfigThatStrandsAHostIsRefusedEverywhere(t *testing.T) {
	l := up(t, lab.Config{Hosts: 2, IPv4: true})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	env1, err := h1.Env()
	if err != nil {
		t.Fatal(err)
	}
	env2, err := h2.Env()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []struct {
		h   *lab.Host
		dst string
	}{{h1, env2.Subnet.V4.String()}, {h2, env1.Subnet.V4.String()}} {
		testutil.Eventually(t, 20*time.Second, p.h.Name+" routes to "+p.dst, func() error {
			if routeTo(t, p.h, p.dst) == "" {
				return fmt.Errorf("no route")
			}
			return nil
		})
	}
	// A longer Network that holds h1's subnet but not h2's, as narrowing
	// 10.100.0.0/16 to a /17 does when the hosts sit in different halves.
	bits := env1.Network.V4.Bits() + 1
	for netip.PrefixFrom(env1.Subnet.V4.Addr(), bits).Contains(env2.Subnet.V4.Addr()) {
		bits++
	}
	narrow := fmt.Sprintf(`{"Network":%q,"SubnetLen":%d}`, netip.PrefixFrom(env1.Subnet.V4.Addr(), bits).Masked(), env1.Subnet.V4.Bits())
	if bits >= env1.Subnet.V4.Bits() {
		// Sibling subnets: no shorter network holds one without the
		// other, so bounds narrow the range to h1's subnet instead.
		narrow = fmt.Sprintf(`{"Network":%q,"SubnetLen":%d,"SubnetMin":%q,"SubnetMax":%q}`,
			env1.Network.V4, env1.Subnet.V4.Bits(), env1.Subnet.V4.Addr(), env1.Subnet.V4.Addr())
	}
	f := filepath.Join(t.TempDir(), "narrow.json")
	os.WriteFile(f, []byte(narrow), 0o644)
	out, code := cli(t, "", "config", "put", etcdFlag(l), f)
	if code != 1 || !strings.Contains(out, h2.Name+" ["+env2.Subnet.V4.String()+"]") || strings.Contains(out, h1.Name+" [") {
		t.Fatalf("config put of a config that strands %s: exit %d, want 1 naming it (and not %s):\n%s", h2.Name, code, h1.Name, out)
	}
	if out, code := cli(t, "", "config", "put", "--force", etcdFlag(l), f); code != 0 {
		t.Fatalf("config put --force: exit %d\n%s", code, out)
	}
	time.Sleep(5 * time.Second) // two resync intervals
	if r := routeTo(t, h1, env2.Subnet.V4.String()); r == "" {
		t.Errorf("%s dropped its route to %s's subnet %s", h1.Name, h2.Name, env2.Subnet.V4)
	}
	if r := routeTo(t, h2, env1.Subnet.V4.String()); r == "" {
		t.Errorf("%s dropped its route to %s's subnet %s", h2.Name, h1.Name, env1.Subnet.V4)
	}
	testutil.Eventually(t, 20*time.Second, "both agents log the refusal", func() error {
		for _, h := range l.Hosts {
			if log := l.LogTail(h, 0); !strings.Contains(log, "network config refused") && !strings.Contains(log, "would invalidate this host's lease") {
				return fmt.Errorf("%s has not logged it", h.Name)
			}
		}
		return nil
	})
	for _, h := range l.Hosts {
		if env, _ := h.Env(); env.Network.V4 != env1.Network.V4 {
			t.Errorf("%s's subnet.env says network %s, want %s", h.Name, env.Network.V4, env1.Network.V4)
		}
	}
}
