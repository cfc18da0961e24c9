package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/subnetenv"
)

// Config describes a lab.
type Config struct {
	Hosts         int    // number of hosts (default 3)
	Backend       string // host-gw (default) or vxlan
	BackendExtra  map[string]any
	IPv4          bool   // lease IPv4 subnets
	IPv6          bool   // lease IPv6 subnets
	Network       string // IPv4 cluster network (default 10.100.0.0/16)
	SubnetLen     int    // default 24
	IPv6Network   string // default 2001:db8:cd11::/48
	IPv6SubnetLen int    // default 64
	// Underlay is "dual" (default), "v4" or "v6": which address families
	// the LAN between hosts carries.
	Underlay string
	// Routed puts every second host on a second LAN behind a router, so
	// hosts are not all on one link (vxlan crosses it, host-gw cannot).
	Routed bool
	// Binary is the leased executable the agents run (default: this one).
	Binary string
	// Dir holds etcd data, subnet files and agent logs (default: a temp dir).
	Dir string
	// LeaseTTL is the agents' --lease-ttl (default 30s).
	LeaseTTL time.Duration
	// AgentArgs are extra arguments for every agent (e.g. -v=2).
	AgentArgs []string
	// EtcdEndpoints are an external etcd's client URLs (plain http) to use
	// instead of the embedded member; the lab relays them into the LAN.
	EtcdEndpoints []string
	// ReserveTop keeps the top ReserveTop subnets of each family out of
	// the hosts' range (SubnetMax), so that tests can put synthetic peers
	// there without colliding with a host's random subnet.
	ReserveTop int
	// Log receives progress lines (default: discarded).
	Log func(format string, args ...any)

	// NoContainers skips the stand-in container (bridge cbr0 and namespace
	// CNS) of each host, for tests that run a real dockerd instead.
	NoContainers bool

	// BeforeAgents, when set, runs once the namespaces and etcd are up and
	// before any agent starts (e.g. to record a host's pristine state).
	BeforeAgents func(*Lab) error
}

// Host is one lab host.
type Host struct {
	Name  string // node name, e.g. host1
	NS    string // host namespace
	CNS   string // container namespace
	LAN   int    // 0 or 1
	Addr4 netip.Addr
	Addr6 netip.Addr
	Dir   string
	// Binary, when set, is the leased executable this host's agent runs
	// instead of Config.Binary (another version, in a mixed fleet).
	Binary    string
	cmd       *exec.Cmd
	exited    chan struct{}
	Container struct{ Addr4, Addr6 netip.Addr }
}

// SubnetFile is the host's subnet.env.
func (h *Host) SubnetFile() string { return filepath.Join(h.Dir, "subnet.env") }

// IPAMSocket is h's Docker IPAM driver socket, in the directory h's dockerd
// must see as /run/docker/plugins.
func (h *Host) IPAMSocket() string { return filepath.Join(h.Dir, "plugins", "leased.sock") }

// LogFile is the host's agent log.
func (h *Host) LogFile() string { return filepath.Join(h.Dir, "leased.log") }

// Lab is a running lab. Close tears everything down.
type Lab struct {
	Cfg    Config
	Tag    string
	Hosts  []*Host
	Etcd   *etcdserver.Server
	Client *clientv3.Client
	// EtcdEndpoint is the URL agents use.
	EtcdEndpoint string
	namespaces   []string
	tmpDir       bool
	relay        io.Closer // the external-etcd relay, if any
	mu           sync.Mutex

	// Upstream is the upstream router of a proxy-ndp lab (ndp.go), else nil.
	Upstream *Upstream
}

func (c *Config) defaults() error {
	c.upstreamDefaults() // proxy-ndp (ndp.go)
	if c.Hosts == 0 {
		c.Hosts = 3
	}
	if c.Hosts < 1 || c.Hosts > 200 {
		return fmt.Errorf("lab: --hosts %d: use 1 to 200", c.Hosts)
	}
	if c.Backend == "" {
		c.Backend = "host-gw"
	}
	if !c.IPv4 && !c.IPv6 {
		return errors.New("lab: enable IPv4, IPv6 or both")
	}
	if c.Network == "" {
		c.Network = "10.100.0.0/16"
	}
	if c.SubnetLen == 0 {
		c.SubnetLen = 24
	}
	if c.IPv6Network == "" {
		c.IPv6Network = "2001:db8:cd11::/48"
	}
	if c.IPv6SubnetLen == 0 {
		c.IPv6SubnetLen = 64
	}
	switch c.Underlay {
	case "":
		c.Underlay = "dual"
	case "dual", "v4", "v6":
	default:
		return fmt.Errorf("lab: --underlay %q: use dual, v4 or v6", c.Underlay)
	}
	if c.Binary == "" {
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		c.Binary = exe
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = 30 * time.Second
	}
	if c.Log == nil {
		c.Log = func(string, ...any) {}
	}
	return nil
}

func (l *Lab) underlay4() bool { return l.Cfg.Underlay != "v6" }
func (l *Lab) underlay6() bool { return l.Cfg.Underlay != "v4" }

// NetworkConfig is the JSON the lab puts at <prefix>/config.
func (l *Lab) NetworkConfig() []byte {
	c := map[string]any{}
	if l.Cfg.IPv4 {
		c["Network"], c["SubnetLen"] = l.Cfg.Network, l.Cfg.SubnetLen
		if l.Cfg.ReserveTop > 0 {
			c["SubnetMax"] = topSubnet(l.Cfg.Network, l.Cfg.SubnetLen, l.Cfg.ReserveTop).Addr().String()
		}
	}
	if l.Cfg.IPv6 {
		c["IPv6Network"], c["IPv6SubnetLen"] = l.Cfg.IPv6Network, l.Cfg.IPv6SubnetLen
		if l.Cfg.ReserveTop > 0 {
			c["IPv6SubnetMax"] = topSubnet(l.Cfg.IPv6Network, l.Cfg.IPv6SubnetLen, l.Cfg.ReserveTop).Addr().String()
		}
	}
	be := map[string]any{"Type": l.Cfg.Backend}
	for k, v := range l.Cfg.BackendExtra {
		be[k] = v
	}
	c["Backend"] = be
	b, _ := json.Marshal(c)
	return b
}

// Up builds the lab: namespaces, LANs, etcd, the config, one agent per
// host, and a container per host once the host has its lease. On error
// everything built so far is torn down.
func Up(ctx context.Context, cfg Config) (l *Lab, err error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	l = &Lab{Cfg: cfg, Tag: "l" + randomTag()}
	defer func() {
		if err != nil {
			l.Close()
			l = nil
		}
	}()
	if l.Cfg.Dir == "" {
		d, err := os.MkdirTemp("", "leased-lab-")
		if err != nil {
			return l, err
		}
		l.Cfg.Dir, l.tmpDir = d, true
	}
	if err := l.buildNetwork(); err != nil {
		return l, err
	}
	if err := l.buildUpstream(); err != nil { // proxy-ndp only (ndp.go)
		return l, err
	}
	if err := l.startEtcd(); err != nil {
		return l, err
	}
	if _, err := l.Client.Put(ctx, lease.NewKeys("").Config(), string(l.NetworkConfig())); err != nil {
		return l, fmt.Errorf("putting the network config: %w", err)
	}
	cfg.Log("network config %s = %s", lease.NewKeys("").Config(), l.NetworkConfig())
	if cfg.BeforeAgents != nil {
		if err := cfg.BeforeAgents(l); err != nil {
			return l, err
		}
	}
	for _, h := range l.Hosts {
		if err := l.StartAgent(h); err != nil {
			return l, err
		}
	}
	for _, h := range l.Hosts {
		if err := l.WaitSubnetFile(ctx, h); err != nil {
			return l, err
		}
		if l.Cfg.NoContainers {
			continue
		}
		if err := l.addContainer(h); err != nil {
			return l, err
		}
	}
	return l, nil
}

func (l *Lab) ns(name string) string { return l.Tag + "-" + name }

func (l *Lab) addNS(name string) (string, error) {
	n := l.ns(name)
	if err := newNS(n); err != nil {
		return n, err
	}
	l.mu.Lock()
	l.namespaces = append(l.namespaces, n)
	l.mu.Unlock()
	return n, nil
}

// buildNetwork creates the LAN(s), the router and the hosts.
func (l *Lab) buildNetwork() error {
	nLANs := 1
	if l.Cfg.Routed {
		nLANs = 2
	}
	lanNS := make([]string, nLANs)
	for i := range nLANs {
		n, err := l.addNS("lan" + strconv.Itoa(i+1))
		if err != nil {
			return err
		}
		lanNS[i] = n
		cmds := []string{
			"-n " + n + " link add br0 type bridge",
			"-n " + n + " link set br0 up",
		}
		if i == 0 { // etcd listens on the first LAN
			a4, a6 := lanAddr(0, 254)
			cmds = append(cmds, "-n "+n+" addr add "+a4.String()+"/24 dev br0", "-n "+n+" addr add "+a6.String()+"/64 dev br0 nodad")
		}
		if err := batch(cmds); err != nil {
			return err
		}
	}
	if l.Cfg.Routed {
		r, err := l.addNS("rtr")
		if err != nil {
			return err
		}
		if err := sysctl(r, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"); err != nil {
			return err
		}
		for i := range 2 {
			a4, a6 := lanAddr(i, 1)
			eth := "eth" + strconv.Itoa(i)
			if err := batch([]string{
				"-n " + r + " link add " + eth + " type veth peer name rtr netns " + lanNS[i],
				"-n " + lanNS[i] + " link set rtr master br0 up",
				"-n " + r + " link set " + eth + " up",
				"-n " + r + " addr add " + a4.String() + "/24 dev " + eth,
				"-n " + r + " addr add " + a6.String() + "/64 dev " + eth + " nodad",
			}); err != nil {
				return err
			}
		}
		// The LAN namespace (etcd) reaches hosts on the second LAN via the router.
		g4, g6 := lanAddr(0, 1)
		if err := batch([]string{
			"-n " + lanNS[0] + " route add 192.168.200.0/24 via " + g4.String(),
			"-n " + lanNS[0] + " -6 route add fd00:200::/64 via " + g6.String(),
		}); err != nil {
			return err
		}
	}
	for i := 1; i <= l.Cfg.Hosts; i++ {
		h := &Host{Name: "host" + strconv.Itoa(i), Dir: filepath.Join(l.Cfg.Dir, "host"+strconv.Itoa(i))}
		if l.Cfg.Routed && i%2 == 0 {
			h.LAN = 1
		}
		var err error
		if h.NS, err = l.addNS("h" + strconv.Itoa(i)); err != nil {
			return err
		}
		if h.CNS, err = l.addNS("c" + strconv.Itoa(i)); err != nil {
			return err
		}
		if err := os.MkdirAll(h.Dir, 0o755); err != nil {
			return err
		}
		a4, a6 := lanAddr(h.LAN, byte(10+i))
		g4, g6 := lanAddr(h.LAN, 1)
		if !l.Cfg.Routed {
			g4, g6 = lanAddr(0, 254)
		}
		peer := "h" + strconv.Itoa(i)
		cmds := []string{
			"-n " + h.NS + " link add eth0 type veth peer name " + peer + " netns " + lanNS[h.LAN],
			"-n " + lanNS[h.LAN] + " link set " + peer + " master br0 up",
			"-n " + h.NS + " link set eth0 up",
		}
		if l.underlay4() {
			h.Addr4 = a4
			cmds = append(cmds, "-n "+h.NS+" addr add "+a4.String()+"/24 dev eth0",
				"-n "+h.NS+" route add default via "+g4.String())
		}
		if l.underlay6() {
			h.Addr6 = a6
			cmds = append(cmds, "-n "+h.NS+" addr add "+a6.String()+"/64 dev eth0 nodad",
				"-n "+h.NS+" -6 route add default via "+g6.String())
		}
		if err := batch(cmds); err != nil {
			return err
		}
		l.Hosts = append(l.Hosts, h)
	}
	return nil
}

func (l *Lab) startEtcd() error {
	a4, a6 := lanAddr(0, 254)
	listen := a4.String() + ":2379"
	l.EtcdEndpoint = "http://" + listen
	if !l.underlay4() {
		listen = "[" + a6.String() + "]:2379"
		l.EtcdEndpoint = "http://" + listen
	}
	if len(l.Cfg.EtcdEndpoints) > 0 {
		return l.useExternalEtcd(listen)
	}
	sock := filepath.Join(l.Cfg.Dir, "etcd.sock")
	srv, err := etcdserver.StartIn(netnsPath(l.ns("lan1")), filepath.Join(l.Cfg.Dir, "etcd"), listen, "127.0.0.1:2380", "unix://"+sock)
	if err != nil {
		return err
	}
	l.Etcd = srv
	l.Cfg.Log("etcd (embedded, real) listening on %s in namespace %s", l.EtcdEndpoint, l.ns("lan1"))
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"unix://" + sock}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return fmt.Errorf("etcd client on %s: %w", sock, err)
	}
	l.Client = cli
	return nil
}

// StartAgent starts (or restarts) the leased agent of h.
func (l *Lab) StartAgent(h *Host) error {
	bin := l.Cfg.Binary
	if h.Binary != "" {
		bin = h.Binary
	}
	args := []string{"netns", "exec", h.NS, bin,
		"--etcd-endpoints=" + l.EtcdEndpoint,
		"--iface=eth0",
		"--node-name=" + h.Name,
		"--subnet-file=" + h.SubnetFile(),
		"--lease-ttl=" + l.Cfg.LeaseTTL.String(),
		// Each host's own Docker IPAM driver, not the machine's.
		"--docker-ipam-socket=" + h.IPAMSocket(),
		"--docker-ipam-state=" + filepath.Join(h.Dir, "docker-ipam.json"),
	}
	args = append(args, l.Cfg.AgentArgs...)
	logf, err := os.OpenFile(h.LogFile(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command("ip", args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("starting the agent of %s: %w", h.Name, err)
	}
	h.cmd, h.exited = cmd, make(chan struct{})
	go func(done chan struct{}) { cmd.Wait(); logf.Close(); close(done) }(h.exited)
	return nil
}

// StopAgent sends sig to h's agent and waits up to 10s for it to exit.
func (l *Lab) StopAgent(h *Host, sig syscall.Signal) error {
	if h.cmd == nil {
		return nil
	}
	h.cmd.Process.Signal(sig)
	select {
	case <-h.exited:
	case <-time.After(10 * time.Second):
		h.cmd.Process.Kill()
		<-h.exited
		return fmt.Errorf("agent of %s did not exit within 10s of %v", h.Name, sig)
	}
	h.cmd = nil
	return nil
}

// WaitSubnetFile waits until h's agent has written its subnet.env.
func (l *Lab) WaitSubnetFile(ctx context.Context, h *Host) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for !fileExists(h.SubnetFile()) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s wrote no %s within 30s; its log:\n%s", h.Name, h.SubnetFile(), l.LogTail(h, 30))
		case <-h.exited:
			return fmt.Errorf("the agent of %s exited; its log:\n%s", h.Name, l.LogTail(h, 30))
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// LogTail returns the last n lines of h's agent log.
func (l *Lab) LogTail(h *Host, n int) string { // n <= 0: the whole log
	b, _ := os.ReadFile(h.LogFile())
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if n > 0 && len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// addContainer builds h's container: a bridge in the host addressed with
// the first address of each leased subnet (what dockerd does with --bip and
// --fixed-cidr-v6), and a namespace on it with the second address.
func (l *Lab) addContainer(h *Host) error {
	env, err := subnetenv.Read(h.SubnetFile())
	if err != nil {
		return err
	}
	mtu := strconv.Itoa(env.MTU)
	cmds := []string{
		"-n " + h.NS + " link add cbr0 type bridge",
		"-n " + h.NS + " link set cbr0 mtu " + mtu + " up",
		"-n " + h.CNS + " link add eth0 type veth peer name veth0 netns " + h.NS,
		"-n " + h.NS + " link set veth0 master cbr0 mtu " + mtu + " up",
		"-n " + h.CNS + " link set eth0 mtu " + mtu + " up",
	}
	if env.Subnet.V4.IsValid() {
		gw := env.Subnet.V4.Addr().Next()
		h.Container.Addr4 = gw.Next()
		cmds = append(cmds,
			"-n "+h.NS+" addr add "+netip.PrefixFrom(gw, env.Subnet.V4.Bits()).String()+" dev cbr0",
			"-n "+h.CNS+" addr add "+netip.PrefixFrom(h.Container.Addr4, env.Subnet.V4.Bits()).String()+" dev eth0",
			"-n "+h.CNS+" route add default via "+gw.String())
	}
	if env.Subnet.V6.IsValid() {
		gw := env.Subnet.V6.Addr().Next()
		h.Container.Addr6 = gw.Next()
		cmds = append(cmds,
			"-n "+h.NS+" addr add "+netip.PrefixFrom(gw, env.Subnet.V6.Bits()).String()+" dev cbr0 nodad",
			"-n "+h.CNS+" addr add "+netip.PrefixFrom(h.Container.Addr6, env.Subnet.V6.Bits()).String()+" dev eth0 nodad",
			"-n "+h.CNS+" -6 route add default via "+gw.String())
	}
	return batch(cmds)
}

// Close stops the agents and etcd and deletes every namespace and the
// temporary directory. It is safe to call more than once.
func (l *Lab) Close() {
	for _, h := range l.Hosts {
		l.StopAgent(h, syscall.SIGKILL)
	}
	if l.Client != nil {
		l.Client.Close()
		l.Client = nil
	}
	if l.Etcd != nil {
		l.Etcd.Stop()
		l.Etcd = nil
	}
	if l.relay != nil {
		l.relay.Close()
		l.relay = nil
	}
	l.mu.Lock()
	nss := l.namespaces
	l.namespaces = nil
	l.mu.Unlock()
	for i := len(nss) - 1; i >= 0; i-- {
		delNS(nss[i])
	}
	if l.tmpDir {
		os.RemoveAll(l.Cfg.Dir)
		l.tmpDir = false
	}
}

// IP runs `ip args...` inside h's namespace and returns its output.
func (h *Host) IP(args ...string) (string, error) {
	out, err := nsExec(h.NS, append([]string{"ip"}, args...)...)
	return string(out), err
}

// Env reads h's subnet.env.
func (h *Host) Env() (subnetenv.Env, error) { return subnetenv.Read(h.SubnetFile()) }

// topSubnet returns the subnet of length bits that lies k places below the
// last one of network (k=0: the last one).
func topSubnet(network string, bits, k int) netip.Prefix {
	n := netip.MustParsePrefix(network)
	a := new(big.Int).SetBytes(n.Addr().AsSlice())
	size := n.Addr().BitLen()
	last := new(big.Int).Lsh(big.NewInt(1), uint(size-n.Bits()))
	last.Sub(last, new(big.Int).Lsh(big.NewInt(int64(k)+1), uint(size-bits)))
	a.Add(a, last)
	addr, _ := netip.AddrFromSlice(a.FillBytes(make([]byte, size/8)))
	return netip.PrefixFrom(addr, bits)
}
