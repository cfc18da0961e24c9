package e2e

// Reliability scenarios of issue 6 that need the real datapath: real agent
// processes in network namespaces, real etcd, real kernel state.
// Documentation/reliability.md maps every scenario to its test. Scenario 4
// (agent restart under a 10ms ping, SIGTERM and SIGKILL, zero loss) is
// TestAgentRestartLosesNoPacket in datapath_test.go.

import (
	"context"
	"encoding/json"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/lease"
)

// Scenario 2: a 3-member etcd cluster (real members, each its own raft
// node). Killing the leader: the agents fail over to the other members,
// keep renewing the same etcd leases past their TTL, and program a peer that
// appears meanwhile. With two of three members down for longer than the
// lease TTL: traffic between containers loses no packet, no route or FDB
// entry is withdrawn, no agent exits. When quorum returns the agents catch
// up: same subnets, a new peer is programmed, and the state holds after the
// pre-outage etcd leases have had time to expire.
func TestEtcdClusterMemberLossAndQuorum(t *testing.T) {
	const ttl = 6 * time.Second
	l := up(t, lab.Config{Backend: "vxlan", Hosts: 2, LeaseTTL: ttl})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	c, err := etcdserver.StartCluster(t.TempDir(), 3, etcdserver.ClusterOptions{Unix: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.Put(ctx(t), "/leased/network/config", string(l.NetworkConfig())); err != nil {
		t.Fatal(err)
	}
	// Move both agents to the cluster (the agents reach the members' unix
	// sockets from their namespaces; the last --etcd-endpoints wins).
	l.Cfg.AgentArgs = append(l.Cfg.AgentArgs, "--etcd-endpoints="+strings.Join(c.UnixEndpoints(), ","))
	envs := map[string]string{}
	for _, h := range l.Hosts {
		env, _ := h.Env()
		envs[h.Name] = fmt.Sprint(env)
		if err := l.StopAgent(h, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	leases := map[string]int64{}
	for _, h := range l.Hosts {
		testutil.Eventually(t, 30*time.Second, h.Name+"'s lease in the cluster", func() error {
			r, err := leaseRecord(t, cli, h.Name)
			if err != nil || r == nil {
				return fmt.Errorf("no record: %v", err)
			}
			env, _ := h.Env()
			if r.Subnet != env.Subnet {
				return fmt.Errorf("record %v, subnet.env %v", r.Subnets(), env)
			}
			leases[h.Name] = r.Lease
			return nil
		})
	}
	for _, dst := range []netip.Addr{h2.Container.Addr4, h2.Container.Addr6} {
		if err := lab.PingUntil(ctx(t), h1.CNS, dst, 0, 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	pids := map[string]int{h1.Name: agentPID(h1), h2.Name: agentPID(h2)}

	// The leader dies.
	var leader *etcdserver.Member
	for _, m := range c.Members {
		if m.IsLeader() {
			leader = m
		}
	}
	if leader == nil {
		t.Fatal("no leader")
	}
	t.Logf("stopping the leader %s", leader.Name)
	leader.Stop()
	cfg := l.Cfg
	peerA := synthPeer(l, "peer-a", lastSubnet(cfg.Network, cfg.SubnetLen), lastSubnet(cfg.IPv6Network, cfg.IPv6SubnetLen), 91)
	testutil.Eventually(t, 15*time.Second, "a write to the two remaining members", func() error {
		c, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := cli.Put(c, "/leased/network/leases/peer-a", mustJSON(peerA))
		return err
	})
	for _, h := range l.Hosts {
		testutil.Eventually(t, 15*time.Second, h.Name+" programs peer-a", func() error {
			if !mentions(leasedState(t, h), peerA["Subnet"].(string)) || !mentions(leasedState(t, h), peerA["IPv6Subnet"].(string)) {
				return fmt.Errorf("no route to peer-a")
			}
			return nil
		})
	}
	time.Sleep(ttl + 2*time.Second) // longer than the TTL: only renewals keep the leases
	for _, h := range l.Hosts {
		r, err := leaseRecord(t, cli, h.Name)
		if err != nil || r == nil || r.Lease != leases[h.Name] {
			t.Errorf("%s's record after the leader died and a TTL passed: %+v (%v), want it under lease %x", h.Name, r, err, leases[h.Name])
		}
	}
	if err := leader.Restart(); err != nil {
		t.Fatal(err)
	}

	// Quorum lost for longer than the TTL.
	before := map[string][]string{h1.Name: leasedState(t, h1), h2.Name: leasedState(t, h2)}
	outage := ttl + 4*time.Second
	pings := []*pinger{
		startPing(t, h1.CNS, h2.Container.Addr4, 50*time.Millisecond, outage+10*time.Second),
		startPing(t, h1.CNS, h2.Container.Addr6, 50*time.Millisecond, outage+10*time.Second),
	}
	mons := []*nlMonitor{startMonitor(t, h1), startMonitor(t, h2)}
	down := []*etcdserver.Member{c.Members[0], c.Members[1]}
	for _, m := range down {
		m.Stop()
	}
	t.Logf("members %s and %s stopped: no quorum", down[0].Name, down[1].Name)
	checkStays := func(phase string) {
		t.Helper()
		for i, h := range l.Hosts {
			if gone := missingFrom(before[h.Name], leasedState(t, h)); len(gone) > 0 {
				t.Errorf("%s %s: datapath entries withdrawn:\n%s", h.Name, phase, strings.Join(gone, "\n"))
			}
			if pid := agentPID(h); pid != pids[h.Name] {
				t.Errorf("%s %s: agent pid %d, was %d (it exited)", h.Name, phase, pid, pids[h.Name])
			}
			if w := mons[i].withdrawn(); len(w) > 0 {
				t.Fatalf("%s: the kernel reports withdrawals, however brief:\n%s", phase, strings.Join(w, "\n"))
			}
		}
	}
	for end := time.Now().Add(outage); time.Now().Before(end); time.Sleep(500 * time.Millisecond) {
		checkStays("without quorum")
	}
	for _, m := range down {
		if err := m.Restart(); err != nil {
			t.Fatal(err)
		}
	}
	t.Log("quorum is back")
	peerB := synthPeer(l, "peer-b", prevSubnet(lastSubnet(cfg.Network, cfg.SubnetLen)), prevSubnet(lastSubnet(cfg.IPv6Network, cfg.IPv6SubnetLen)), 92)
	testutil.Eventually(t, 15*time.Second, "a write after quorum returned", func() error {
		c, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := cli.Put(c, "/leased/network/leases/peer-b", mustJSON(peerB))
		return err
	})
	for _, h := range l.Hosts {
		testutil.Eventually(t, 30*time.Second, h.Name+" catches up", func() error {
			r, err := leaseRecord(t, cli, h.Name)
			if err != nil || r == nil {
				return fmt.Errorf("no record: %v", err)
			}
			env, _ := h.Env()
			if fmt.Sprint(env) != envs[h.Name] || r.Subnet != env.Subnet {
				return fmt.Errorf("record %v, subnet.env %v, before %v", r.Subnets(), env, envs[h.Name])
			}
			if dp := leasedState(t, h); !mentions(dp, peerB["Subnet"].(string)) || !mentions(dp, peerB["IPv6Subnet"].(string)) {
				return fmt.Errorf("peer-b not programmed")
			}
			return nil
		})
	}
	checkStays("after quorum returned")
	// Leases granted before the outage run out now at the latest; nothing
	// the agents hold may go with them.
	time.Sleep(ttl + 2*time.Second)
	for _, h := range l.Hosts {
		if r, err := leaseRecord(t, cli, h.Name); err != nil || r == nil {
			t.Errorf("%s's record a TTL after quorum returned: %v %v", h.Name, r, err)
		}
	}
	checkStays("a TTL after quorum returned")
	for _, p := range pings {
		p.wait(t, "across quorum loss and recovery")
	}
}

// Scenario 3: every host is cut off from etcd (its packets to etcd's port
// dropped, so connections hang as in a real partition, while the LAN
// carries container traffic). The 60s is shortened to the lease TTL
// plus 6s (12s): longer than the TTL, so etcd expires every host's lease
// during the outage — the harder case. Throughout and after: container
// traffic loses no packet and no route, FDB or proxy-NDP entry is withdrawn;
// no agent exits; afterwards every host holds the same subnets as before and
// a peer that appeared during the outage is programmed.
func TestEtcdUnreachable(t *testing.T) {
	for _, backend := range []string{"host-gw", "vxlan", "proxy-ndp"} {
		t.Run(backend, func(t *testing.T) {
			const ttl = 6 * time.Second
			outage := ttl + 6*time.Second
			l := up(t, lab.Config{Backend: backend, Hosts: 2, LeaseTTL: ttl})
			h1, h2 := l.Hosts[0], l.Hosts[1]
			for _, pair := range [][2]*lab.Host{{h1, h2}, {h2, h1}} {
				for _, dst := range []netip.Addr{pair[1].Container.Addr4, pair[1].Container.Addr6} {
					if err := lab.PingUntil(ctx(t), pair[0].CNS, dst, 0, 10*time.Second); err != nil {
						t.Fatal(err)
					}
				}
			}
			time.Sleep(time.Second) // let the datapath settle before the snapshot
			before := map[string][]string{}
			envs := map[string]string{}
			pids := map[string]int{}
			for _, h := range l.Hosts {
				before[h.Name] = leasedState(t, h)
				env, _ := h.Env()
				envs[h.Name], pids[h.Name] = fmt.Sprint(env), agentPID(h)
			}
			pings := []*pinger{
				startPing(t, h1.CNS, h2.Container.Addr4, 50*time.Millisecond, outage+12*time.Second),
				startPing(t, h2.CNS, h1.Container.Addr6, 50*time.Millisecond, outage+12*time.Second),
			}
			cut := func(on bool) {
				op := "-I"
				if !on {
					op = "-D"
				}
				host := strings.TrimPrefix(l.EtcdEndpoint, "http://")
				ip, port := host[:strings.LastIndexByte(host, ':')], host[strings.LastIndexByte(host, ':')+1:]
				for _, h := range l.Hosts {
					for _, rule := range [][]string{
						{"OUTPUT", "-p", "tcp", "-d", ip, "--dport", port, "-j", "DROP"},
						{"INPUT", "-p", "tcp", "-s", ip, "--sport", port, "-j", "DROP"},
					} {
						args := append([]string{"netns", "exec", h.NS, "iptables", "-w", op}, rule...)
						if out, err := runCmd("ip", args...); err != nil {
							t.Fatalf("iptables in %s: %v: %s", h.Name, err, out)
						}
					}
				}
			}
			mons := []*nlMonitor{startMonitor(t, h1), startMonitor(t, h2)}
			cut(true)
			cutDone := false
			defer func() {
				if !cutDone {
					cut(false)
				}
			}()
			t.Logf("etcd cut off from every host for %s (lease TTL %s)", outage, ttl)
			cfg := l.Cfg
			s4, s6 := lastSubnet(cfg.Network, cfg.SubnetLen), lastSubnet(cfg.IPv6Network, cfg.IPv6SubnetLen)
			newPeer := synthPeer(l, "newpeer", s4, s6, 93)
			reported := false
			checkStays := func(phase string) {
				t.Helper()
				for i, h := range l.Hosts {
					if gone := missingFrom(before[h.Name], leasedState(t, h)); len(gone) > 0 {
						t.Errorf("%s %s: datapath entries withdrawn:\n%s", h.Name, phase, strings.Join(gone, "\n"))
					}
					if pid := agentPID(h); pid != pids[h.Name] {
						t.Errorf("%s %s: agent pid %d, was %d (it exited)", h.Name, phase, pid, pids[h.Name])
					}
					if w := mons[i].withdrawn(); len(w) > 0 && !reported {
						reported = true
						t.Errorf("%s: the kernel reports withdrawals, however brief:\n%s", phase, strings.Join(w, "\n"))
					}
				}
			}
			start := time.Now()
			wrote := false
			for time.Since(start) < outage {
				checkStays("while etcd is unreachable")
				if !wrote && time.Since(start) > outage/2 {
					etcdtest.Put(t, l.Client, lease.NewKeys("").Lease("newpeer"), newPeer) // etcd itself is up; only the hosts are cut off
					wrote = true
				}
				time.Sleep(500 * time.Millisecond)
			}
			for _, h := range l.Hosts {
				if r, _ := leaseRecord(t, l.Client, h.Name); r != nil {
					t.Logf("%s's record survived the outage (lease not expired?)", h.Name)
				}
			}
			cut(false)
			cutDone = true
			t.Log("etcd reachable again")
			recovered := time.Now()
			for _, h := range l.Hosts {
				err := testutil.Poll(30*time.Second, func() error {
					checkStays("after etcd came back")
					r, err := leaseRecord(t, l.Client, h.Name)
					if err != nil || r == nil {
						return fmt.Errorf("no lease record: %v", err)
					}
					env, _ := h.Env()
					if fmt.Sprint(env) != envs[h.Name] || r.Subnet != env.Subnet {
						return fmt.Errorf("record %v, subnet.env %v, before %v", r.Subnets(), env, envs[h.Name])
					}
					dp := leasedState(t, h)
					if !mentions(dp, s4.String()) || !mentions(dp, s6.String()) {
						return fmt.Errorf("newpeer (%s, %s) not programmed", s4, s6)
					}
					return nil
				})
				if err != nil {
					t.Errorf("%s after etcd came back: %v", h.Name, err)
				}
			}
			t.Logf("caught up %s after etcd came back", time.Since(recovered).Round(time.Millisecond))
			for _, p := range pings {
				p.wait(t, "across the etcd outage")
			}
			checkStays("at the end")
			if os.Getenv("LEASED_E2E_VERBOSE") != "" {
				for _, h := range l.Hosts {
					t.Logf("--- %s ---\n%s", h.Name, l.LogTail(h, 80))
				}
			}
		})
	}
}

// Scenario 5: a host dies for good (agent SIGKILLed, never back). Its peers
// keep its routes while its lease may still be alive, and withdraw its
// routes, FDB entries and neighbours within the lease TTL plus 5s.
func TestDeadHostRemovedWithinTTL(t *testing.T) {
	const ttl = 5 * time.Second // the shortest --lease-ttl leased accepts
	l := up(t, lab.Config{Backend: "vxlan", Hosts: 3, LeaseTTL: ttl})
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	env3, _ := h3.Env()
	for _, h := range []*lab.Host{h1, h2} {
		testutil.Eventually(t, 10*time.Second, h.Name+" routes to host3", func() error {
			if !mentions(leasedState(t, h), env3.Subnet.V4.String()) || !mentions(leasedState(t, h), env3.Subnet.V6.String()) {
				return fmt.Errorf("no routes to %s", h3.Name)
			}
			return nil
		})
	}
	if err := l.StopAgent(h3, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	// Keep-alives go out every TTL/3, so the lease has at least 2/3 of the
	// TTL left at the kill: one second later nothing may be gone yet.
	time.Sleep(time.Second)
	for _, h := range []*lab.Host{h1, h2} {
		if dp := leasedState(t, h); !mentions(dp, env3.Subnet.V4.String()) {
			t.Errorf("%s dropped host3 1s after its agent died, before its lease could expire", h.Name)
		}
	}
	vtep := func(h *lab.Host) []string {
		var out []string
		for _, line := range leasedState(t, h) {
			if strings.Contains(line, env3.Subnet.V4.String()) || strings.Contains(line, env3.Subnet.V6.String()) ||
				strings.Contains(line, " dst "+h3.Addr4.String()+" ") || strings.Contains(line, " dst "+h3.Addr6.String()+" ") ||
				strings.HasPrefix(line, "neigh "+env3.Subnet.V4.Addr().String()+" ") || strings.HasPrefix(line, "neigh "+env3.Subnet.V6.Addr().String()+" ") {
				out = append(out, line)
			}
		}
		return out
	}
	limit := ttl + 5*time.Second
	for _, h := range []*lab.Host{h1, h2} {
		err := testutil.Poll(limit-time.Since(killed), func() error {
			if left := vtep(h); len(left) > 0 {
				return fmt.Errorf("still there:\n%s", strings.Join(left, "\n"))
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s still has host3's datapath %s after its agent died (TTL %s): %v", h.Name, time.Since(killed).Round(time.Millisecond), ttl, err)
		} else {
			t.Logf("%s: host3 withdrawn %s after its agent died", h.Name, time.Since(killed).Round(100*time.Millisecond))
		}
	}
	if err := lab.PingUntil(ctx(t), h1.CNS, h2.Container.Addr6, 0, 5*time.Second); err != nil {
		t.Errorf("host1 → host2 after host3 died: %v", err)
	}
}

// Scenario 7: the config in etcd is replaced by invalid JSON, by a smaller
// network that leaves the hosts' subnets out, and by another backend type.
// Each time every agent keeps running, keeps its datapath (routes and
// traffic), and logs precisely what is wrong; then the next valid config
// (IPv6 enabled) is applied without a restart.
func TestBadConfigKeepsDatapath(t *testing.T) {
	l := up(t, lab.Config{Backend: "host-gw", Hosts: 2, IPv4: true})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	env1, _ := h1.Env()
	env2, _ := h2.Env()
	testutil.Eventually(t, 10*time.Second, "routes", func() error {
		if !mentions(leasedState(t, h1), env2.Subnet.V4.String()) || !mentions(leasedState(t, h2), env1.Subnet.V4.String()) {
			return fmt.Errorf("hosts do not route to each other yet")
		}
		return nil
	})
	before := map[string][]string{h1.Name: leasedState(t, h1), h2.Name: leasedState(t, h2)}
	pids := map[string]int{h1.Name: agentPID(h1), h2.Name: agentPID(h2)}
	// A /20 holding neither host's subnet.
	var small netip.Prefix
	for i := 0; i < 16; i++ {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 100, byte(16 * i), 0}), 20)
		if !p.Overlaps(env1.Subnet.V4) && !p.Overlaps(env2.Subnet.V4) {
			small = p
			break
		}
	}
	bad := []struct {
		name, config string
		logs         []string // every one must be in the log line the change causes
	}{
		{"invalid JSON", `{"Network":"10.100.0.0/16","Backend":{"Type":"host-gw"}`,
			[]string{"invalid network config; keeping the last good one", "/leased/network/config"}},
		{"smaller network", fmt.Sprintf(`{"Network":%q,"Backend":{"Type":"host-gw"}}`, small),
			[]string{"would invalidate this host's lease", "is not in the new range " + small.String()}},
		{"other backend type", `{"Network":"10.100.0.0/16","Backend":{"Type":"vxlan"}}`,
			[]string{"Backend.Type changed from host-gw to vxlan"}},
	}
	for _, b := range bad {
		offsets := map[string]int{}
		for _, h := range l.Hosts {
			st, _ := os.Stat(h.LogFile())
			offsets[h.Name] = int(st.Size())
		}
		if _, err := l.Client.Put(ctx(t), "/leased/network/config", b.config); err != nil {
			t.Fatal(err)
		}
		for _, h := range l.Hosts {
			var line string
			err := testutil.Poll(10*time.Second, func() error {
				log, _ := os.ReadFile(h.LogFile())
				for _, ln := range strings.Split(string(log[offsets[h.Name]:]), "\n") {
					all := true
					for _, w := range b.logs {
						all = all && strings.Contains(ln, w)
					}
					if all {
						line = ln
						return nil
					}
				}
				return fmt.Errorf("no log line with %q; the log since the change:\n%s", b.logs, log[offsets[h.Name]:])
			})
			if err != nil {
				t.Errorf("%s: %s: %v", b.name, h.Name, err)
			} else {
				t.Logf("%s: %s logs: %s", b.name, h.Name, line)
			}
		}
		time.Sleep(2500 * time.Millisecond) // past a --resync-interval (2s) pass
		for _, h := range l.Hosts {
			if gone := missingFrom(before[h.Name], leasedState(t, h)); len(gone) > 0 {
				t.Errorf("%s: %s withdrew:\n%s", b.name, h.Name, strings.Join(gone, "\n"))
			}
			if pid := agentPID(h); pid != pids[h.Name] {
				t.Errorf("%s: %s's agent exited", b.name, h.Name)
			}
		}
		if err := lab.Ping(ctx(t), h1.CNS, h2.Container.Addr4, 0); err != nil {
			t.Errorf("%s: host1 → host2: %v", b.name, err)
		}
	}
	// The next valid config is applied: IPv6 is enabled, the hosts take
	// IPv6 subnets, keep their IPv4 subnets, and route IPv6 to each other.
	good := `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8:cd11::/48","Backend":{"Type":"host-gw"}}`
	if _, err := l.Client.Put(ctx(t), "/leased/network/config", good); err != nil {
		t.Fatal(err)
	}
	for _, pair := range [][2]*lab.Host{{h1, h2}, {h2, h1}} {
		h, peer := pair[0], pair[1]
		testutil.Eventually(t, 15*time.Second, h.Name+" applies the valid config", func() error {
			env, _ := h.Env()
			penv, _ := peer.Env()
			was, _ := map[string]netip.Prefix{h1.Name: env1.Subnet.V4, h2.Name: env2.Subnet.V4}[h.Name]
			if env.Subnet.V4 != was || !env.Subnet.V6.IsValid() || !penv.Subnet.V6.IsValid() {
				return fmt.Errorf("subnet.env %+v", env)
			}
			if !mentions(leasedState(t, h), penv.Subnet.V6.String()) {
				return fmt.Errorf("no IPv6 route to %s", peer.Name)
			}
			return nil
		})
	}
	for _, h := range l.Hosts {
		log, _ := os.ReadFile(h.LogFile())
		if !strings.Contains(string(log), "network config changed; applying") {
			t.Errorf("%s does not log that it applied the new config", h.Name)
		}
		if pid := agentPID(h); pid != pids[h.Name] {
			t.Errorf("%s's agent restarted", h.Name)
		}
	}
}

// Scenario 8: hostile or broken peer leases written straight into etcd are
// ignored with a log line naming the record, and never programmed (no
// route, FDB entry or neighbour); the hosts' own routes and their routes to
// each other are untouched. A valid record written after them is
// programmed, which shows the hostile ones were processed, not missed.
func TestHostileLeasesNeverProgrammed(t *testing.T) {
	l := up(t, lab.Config{Backend: "vxlan", Hosts: 2})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	env1, _ := h1.Env()
	env2, _ := h2.Env()
	testutil.Eventually(t, 10*time.Second, "routes", func() error {
		if !mentions(leasedState(t, h1), env2.Subnet.V6.String()) || !mentions(leasedState(t, h2), env1.Subnet.V6.String()) {
			return fmt.Errorf("hosts do not route to each other yet")
		}
		return nil
	})
	own1 := routeTo(t, h1, env1.Subnet.V4.String()) + routeTo(t, h1, env1.Subnet.V6.String())
	toH2 := routeTo(t, h1, env2.Subnet.V4.String()) + routeTo(t, h1, env2.Subnet.V6.String())
	before := map[string][]string{h1.Name: leasedState(t, h1), h2.Name: leasedState(t, h2)}

	cfg := l.Cfg
	n4, n6 := lastSubnet(cfg.Network, cfg.SubnetLen), lastSubnet(cfg.IPv6Network, cfg.IPv6SubnetLen)
	sub := func(i int) (netip.Prefix, netip.Prefix) { // distinct free subnets from the top of the range
		a, b := n4, n6
		for range i {
			a, b = prevSubnet(a), prevSubnet(b)
		}
		return a, b
	}
	type hostile struct {
		node string
		rec  any
		ip   string      // its public address, for the FDB check ("" = none)
		mac  string      // its VTEP MAC, for the neighbour check
		on   []*lab.Host // hosts that must not program it
	}
	both := []*lab.Host{h1, h2}
	mk := func(node string, i int, mod func(r map[string]any)) hostile {
		s4, s6 := sub(i)
		r := synthPeer(l, node, s4, s6, byte(100+i))
		mod(r)
		mac, _ := r["BackendData"].(map[string]string)
		return hostile{node: node, rec: r, ip: fmt.Sprint(r["PublicIP"]), mac: mac["VtepMAC"], on: both}
	}
	hs := []hostile{
		{node: "h-unparsable", rec: `{"Node":"h-unparsable","Subnet":`, on: both},
		mk("h-outside", 1, func(r map[string]any) { r["Subnet"], r["IPv6Subnet"] = "10.200.1.0/24", "2001:db8:ee::/64" }),
		mk("h-wrong-length", 2, func(r map[string]any) {
			r["Subnet"] = strings.Replace(r["Subnet"].(string), "/24", "/25", 1)
			delete(r, "IPv6Subnet")
		}),
		mk("h-overlaps-host1", 3, func(r map[string]any) {
			r["Subnet"], r["IPv6Subnet"] = env1.Subnet.V4.String(), env1.Subnet.V6.String()
		}),
		mk("h-overlaps-host2", 4, func(r map[string]any) {
			r["Subnet"], r["IPv6Subnet"] = env2.Subnet.V4.String(), env2.Subnet.V6.String()
		}),
		mk("h-host1-ip", 5, func(r map[string]any) { r["PublicIP"], r["PublicIPv6"] = h1.Addr4.String(), h1.Addr6.String() }),
		mk("h-loopback", 6, func(r map[string]any) { r["PublicIP"], r["PublicIPv6"] = "127.0.0.1", "::1" }),
		mk("h-multicast", 7, func(r map[string]any) { r["PublicIP"], r["PublicIPv6"] = "224.0.0.1", "ff02::1" }),
		mk("h-link-local", 8, func(r map[string]any) { r["PublicIP"], r["PublicIPv6"] = "169.254.1.1", "fe80::1" }),
		mk("h-mac-garbage", 9, func(r map[string]any) {
			r["BackendData"] = map[string]string{"VtepMAC": "not-a-mac", "VtepMAC6": "zz:zz"}
		}),
		mk("h-mac-broadcast", 10, func(r map[string]any) {
			r["BackendData"] = map[string]string{"VtepMAC": "ff:ff:ff:ff:ff:ff", "VtepMAC6": "ff:ff:ff:ff:ff:ff"}
		}),
		mk("h-mac-zero", 11, func(r map[string]any) {
			r["BackendData"] = map[string]string{"VtepMAC": "00:00:00:00:00:00", "VtepMAC6": "00:00:00:00:00:00"}
		}),
		mk("h-mac-multicast", 12, func(r map[string]any) {
			r["BackendData"] = map[string]string{"VtepMAC": "01:00:5e:00:00:01", "VtepMAC6": "33:33:00:00:00:01"}
		}),
		mk("h-mac-long", 13, func(r map[string]any) {
			r["BackendData"] = map[string]string{"VtepMAC": "02:00:00:00:00:00:00:01", "VtepMAC6": "02:00:00:00:00:00:00:02"}
		}),
	}
	hs[5].on = []*lab.Host{h1} // host1's own address: hostile to host1 only
	for i := range hs {
		if hs[i].ip == "" || strings.HasPrefix(hs[i].node, "h-host1") || strings.HasPrefix(hs[i].node, "h-loop") ||
			strings.HasPrefix(hs[i].node, "h-multi") || strings.HasPrefix(hs[i].node, "h-link") {
			hs[i].ip = "" // not an address the FDB check can look for uniquely
		}
	}
	for _, h := range hs {
		etcdtest.Put(t, l.Client, lease.NewKeys("").Lease(h.node), h.rec)
	}
	c4, c6 := sub(20)
	etcdtest.Put(t, l.Client, lease.NewKeys("").Lease("canary"), synthPeer(l, "canary", c4, c6, 120))
	for _, h := range l.Hosts {
		testutil.Eventually(t, 15*time.Second, h.Name+" programs the canary written after the hostile records", func() error {
			if dp := leasedState(t, h); !mentions(dp, c4.String()) || !mentions(dp, c6.String()) {
				return fmt.Errorf("canary not programmed")
			}
			return nil
		})
	}
	time.Sleep(2500 * time.Millisecond) // and one resync pass (--resync-interval=2s)
	for _, bad := range hs {
		for _, h := range bad.on {
			dp := leasedState(t, h)
			var got []string
			if r, ok := bad.rec.(map[string]any); ok {
				for _, k := range []string{"Subnet", "IPv6Subnet"} {
					s, _ := r[k].(string)
					if s == "" || s == env1.Subnet.V4.String() || s == env1.Subnet.V6.String() || s == env2.Subnet.V4.String() || s == env2.Subnet.V6.String() {
						continue // checked below: the route stays the legitimate holder's
					}
					for _, line := range dp {
						if strings.Contains(line, s) {
							got = append(got, line)
						}
					}
				}
			}
			for _, line := range dp {
				if bad.ip != "" && strings.Contains(line, " dst "+bad.ip+" ") {
					got = append(got, line)
				}
				if bad.mac != "" && bad.mac != "not-a-mac" && strings.Contains(line, bad.mac) {
					got = append(got, line)
				}
			}
			if len(got) > 0 {
				t.Errorf("%s programmed the hostile lease %s:\n%s", h.Name, bad.node, strings.Join(got, "\n"))
			}
			log, _ := os.ReadFile(h.LogFile())
			if !logNames(string(log), bad.node) {
				t.Errorf("%s did not log why it ignores %s", h.Name, bad.node)
			}
		}
	}
	if now := routeTo(t, h1, env1.Subnet.V4.String()) + routeTo(t, h1, env1.Subnet.V6.String()); now != own1 {
		t.Errorf("host1's own routes changed from %q to %q", own1, now)
	}
	if now := routeTo(t, h1, env2.Subnet.V4.String()) + routeTo(t, h1, env2.Subnet.V6.String()); now != toH2 {
		t.Errorf("host1's routes to host2 changed from %q to %q", toH2, now)
	}
	for _, h := range l.Hosts {
		if gone := missingFrom(before[h.Name], leasedState(t, h)); len(gone) > 0 {
			t.Errorf("%s withdrew:\n%s", h.Name, strings.Join(gone, "\n"))
		}
	}
	for _, dst := range []netip.Addr{h2.Container.Addr4, h2.Container.Addr6} {
		if err := lab.Ping(ctx(t), h1.CNS, dst, 0); err != nil {
			t.Errorf("host1 → host2: %v", err)
		}
	}
}

// logNames reports whether a log line says a lease of node is ignored or skipped.
func logNames(log, node string) bool {
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, node) && (strings.Contains(line, "ignor") || strings.Contains(line, "skip")) {
			return true
		}
	}
	return false
}

// prevSubnet returns the subnet of the same length just below p.
func prevSubnet(p netip.Prefix) netip.Prefix {
	a := new(big.Int).SetBytes(p.Addr().AsSlice())
	a.Sub(a, new(big.Int).Lsh(big.NewInt(1), uint(p.Addr().BitLen()-p.Bits())))
	addr, _ := netip.AddrFromSlice(a.FillBytes(make([]byte, p.Addr().BitLen()/8)))
	return netip.PrefixFrom(addr, p.Bits())
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}
