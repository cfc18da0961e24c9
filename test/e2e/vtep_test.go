package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/backend/vtep"
	"github.com/leased/leased/pkg/lease"
)

// A lease record that copies an honest host's VTEP MACs (a cloned or
// hostile host) is refused with a log line naming it, and never takes over
// the honest host's FDB entry, however often the leases change: host1's
// tunnel to host2 keeps pointing at host2.
func TestVXLANCopiedMACNeverTakesOverFDB(t *testing.T) {
	l := up(t, lab.Config{Backend: "vxlan", Hosts: 2})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	mac4, mac6 := vtep.MAC(h2.Name, false).String(), vtep.MAC(h2.Name, true).String()
	// fdbOf returns host1's FDB entries for host2's MACs.
	fdbOf := func() []string {
		var out []string
		for _, line := range leasedState(t, h1) {
			if strings.HasPrefix(line, "fdb ") && (strings.Contains(line, mac4) || strings.Contains(line, mac6)) {
				out = append(out, line)
			}
		}
		return out
	}
	honest := func() error {
		fdb := fdbOf()
		ok4, ok6 := false, false
		for _, line := range fdb {
			switch {
			case strings.Contains(line, mac4+" dev leased.4 dst "+h2.Addr4.String()+" "):
				ok4 = true
			case strings.Contains(line, mac6+" dev leased.6 dst "+h2.Addr6.String()+" "):
				ok6 = true
			default:
				return fmt.Errorf("FDB entry for host2's MAC that does not point at host2: %q", line)
			}
		}
		if !ok4 || !ok6 {
			return fmt.Errorf("host2's FDB entries are not both there: %q", fdb)
		}
		return nil
	}
	testutil.Eventually(t, 15*time.Second, "host1's FDB entries for host2", honest)

	r2, err := leaseRecord(t, l.Client, h2.Name)
	if err != nil || r2 == nil {
		t.Fatalf("host2's lease record: %v %v", r2, err)
	}
	var copied map[string]string
	if err := json.Unmarshal(r2.BackendData, &copied); err != nil || copied["VtepMAC"] != mac4 || copied["VtepMAC6"] != mac6 {
		t.Fatalf("host2 publishes %s (%v); want its derived MACs %s, %s", r2.BackendData, err, mac4, mac6)
	}
	cfg := l.Cfg
	n4, n6 := lastSubnet(cfg.Network, cfg.SubnetLen), lastSubnet(cfg.IPv6Network, cfg.IPv6SubnetLen)
	// A broken record as well: while one exists, the peer filter is
	// recomputed on every change, and the whole peer set goes to the
	// backend each time.
	etcdtest.Put(t, l.Client, lease.NewKeys("").Lease("broken"), map[string]any{"Node": "broken", "Subnet": "10.254.0.0/24", "PublicIP": "192.168.100.66", "BackendType": "vxlan"})
	s4, s6 := prevSubnet(n4), prevSubnet(n6)
	for i := range 8 {
		forged := synthPeer(l, "mallory", n4, n6, byte(70+i))
		forged["BackendData"] = copied
		etcdtest.Put(t, l.Client, lease.NewKeys("").Lease("mallory"), forged)
		// A valid record written after it: once host1 programs it, it
		// has processed the forged one.
		etcdtest.Put(t, l.Client, lease.NewKeys("").Lease("canary"), synthPeer(l, "canary", s4, s6, byte(90+i)))
		testutil.Eventually(t, 15*time.Second, "host1 programs the canary", func() error {
			for _, line := range leasedState(t, h1) {
				if strings.Contains(line, fmt.Sprintf(" dst 192.168.100.%d ", 90+i)) {
					return nil
				}
			}
			return fmt.Errorf("canary's FDB entry (dst 192.168.100.%d) not there", 90+i)
		})
		if err := honest(); err != nil {
			t.Fatalf("after the forged record's change %d: %v", i+1, err)
		}
		for _, line := range leasedState(t, h1) {
			if strings.Contains(line, n4.String()) || strings.Contains(line, n6.String()) || strings.Contains(line, fmt.Sprintf(" dst 192.168.100.%d ", 70+i)) {
				t.Fatalf("host1 programmed the forged record: %s", line)
			}
		}
	}
	for _, h := range l.Hosts {
		log, _ := os.ReadFile(h.LogFile())
		found := false
		for _, line := range strings.Split(string(log), "\n") {
			if strings.Contains(line, `ignoring lease of "mallory"`) && strings.Contains(line, "the MAC derived from the node name") {
				found = true
			}
		}
		if !found {
			t.Errorf("%s does not log that it refuses mallory's copied MACs", h.Name)
		}
	}
	for _, dst := range []netip.Addr{h2.Container.Addr4, h2.Container.Addr6} {
		if err := lab.Ping(ctx(t), h1.CNS, dst, 0); err != nil {
			t.Errorf("host1 → host2 %s: %v", dst, err)
		}
	}
}
