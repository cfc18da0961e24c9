package etcdserver

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// ClusterOptions shape a Cluster. The zero value is a plain-HTTP cluster on
// loopback.
type ClusterOptions struct {
	// Unix adds a unix socket client URL per member (unix://<dir>/client.sock),
	// reachable from every network namespace of the machine.
	Unix bool
	// Configure, when set, edits each member's embed config before it starts
	// (e.g. client TLS, auth token). When it sets ClientTLSInfo, clients
	// are served https:// on the loopback URL.
	Configure func(cfg *embed.Config)
}

// Cluster is n real etcd members (etcd's own server, embedded) that form one
// raft cluster, each with its own data directory, peer URL and client URLs.
// Members can be stopped and restarted one by one to take quorum away and
// give it back.
type Cluster struct {
	Members []*Member
}

// Member is one member of a Cluster.
type Member struct {
	Name string
	Dir  string
	// ClientURL is the member's loopback client URL (http:// or https://).
	ClientURL string
	// UnixURL is unix://… when ClusterOptions.Unix was set, else "".
	UnixURL string
	peerURL string
	cluster string
	opts    ClusterOptions

	mu sync.Mutex
	e  *embed.Etcd
}

// StartCluster starts n members with data under dir and waits until they
// all serve clients. Members start concurrently: none can become ready
// before a quorum of them runs. On error, the members started are stopped.
func StartCluster(dir string, n int, opts ClusterOptions) (*Cluster, error) {
	if n < 1 {
		return nil, fmt.Errorf("etcd cluster of %d members: need at least one", n)
	}
	c := &Cluster{}
	var peers []string
	scheme := "http"
	if opts.Configure != nil {
		probe := embed.NewConfig()
		opts.Configure(probe)
		if !probe.ClientTLSInfo.Empty() {
			scheme = "https"
		}
	}
	for i := range n {
		ca, err := FreeAddr("127.0.0.1")
		if err != nil {
			return nil, err
		}
		pa, err := FreeAddr("127.0.0.1")
		if err != nil {
			return nil, err
		}
		m := &Member{Name: "m" + strconv.Itoa(i), Dir: filepath.Join(dir, "m"+strconv.Itoa(i)),
			ClientURL: scheme + "://" + ca, peerURL: "http://" + pa, opts: opts}
		if opts.Unix {
			m.UnixURL = "unix://" + filepath.Join(dir, "m"+strconv.Itoa(i)+".sock")
		}
		peers = append(peers, m.Name+"="+m.peerURL)
		c.Members = append(c.Members, m)
	}
	for _, m := range c.Members {
		m.cluster = strings.Join(peers, ",")
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, m := range c.Members {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = m.start() }()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

// Endpoints returns the members' loopback client URLs.
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, m := range c.Members {
		out = append(out, m.ClientURL)
	}
	return out
}

// UnixEndpoints returns the members' unix socket client URLs.
func (c *Cluster) UnixEndpoints() []string {
	var out []string
	for _, m := range c.Members {
		out = append(out, m.UnixURL)
	}
	return out
}

// Stop stops every member; their data stays.
func (c *Cluster) Stop() {
	for _, m := range c.Members {
		m.Stop()
	}
}

func (m *Member) start() error {
	cfg := embed.NewConfig()
	cfg.Dir = m.Dir
	cfg.Name = m.Name
	cu, err := url.Parse(m.ClientURL)
	if err != nil {
		return err
	}
	pu, err := url.Parse(m.peerURL)
	if err != nil {
		return err
	}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	if m.UnixURL != "" {
		uu, err := url.Parse(m.UnixURL)
		if err != nil {
			return err
		}
		os.Remove(uu.Host + uu.Path) // a socket left by the previous run of this member
		cfg.ListenClientUrls = append(cfg.ListenClientUrls, *uu)
	}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = m.cluster
	cfg.InitialClusterToken = "leased-test"
	cfg.EnableGRPCGateway = false
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.LogLevel = "error"
	// Fast elections for tests, but not so fast that a loaded CI machine
	// flaps leaders: 50ms ticks, 1s election timeout.
	cfg.TickMs, cfg.ElectionMs = 50, 1000
	if m.opts.Configure != nil {
		m.opts.Configure(cfg)
	}
	if err := os.MkdirAll(m.Dir, 0o700); err != nil {
		return err
	}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("starting etcd member %s in %s: %w", m.Name, m.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return fmt.Errorf("etcd member %s: %w", m.Name, err)
	case <-time.After(60 * time.Second):
		e.Close()
		return fmt.Errorf("etcd member %s in %s did not become ready within 60s", m.Name, m.Dir)
	}
	m.mu.Lock()
	m.e = e
	m.mu.Unlock()
	return nil
}

// Stop stops the member (its listeners close, clients on it lose their
// connections); its data stays in Dir. Stopping a stopped member is a no-op.
func (m *Member) Stop() {
	m.mu.Lock()
	e := m.e
	m.e = nil
	m.mu.Unlock()
	if e != nil {
		e.Close()
	}
}

// Restart starts a stopped member again on the same data and URLs. It
// returns once the member serves clients, which needs a quorum of the
// cluster to be running (this member included).
func (m *Member) Restart() error {
	m.Stop()
	return m.start()
}

// Running reports whether the member is up.
func (m *Member) Running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.e != nil
}

// IsLeader reports whether the member is running and the raft leader.
func (m *Member) IsLeader() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.e != nil && m.e.Server.Leader() == m.e.Server.MemberID()
}
