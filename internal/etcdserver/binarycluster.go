package etcdserver

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// BinaryCluster is n etcd members run from the etcd binary on $PATH, each
// its own process with its own data directory, on loopback. fsync is left
// on (etcd's default): what the cluster costs is what a real one costs.
// Each member is a process of its own so that its CPU time and memory can
// be read from /proc (see Proc).
type BinaryCluster struct {
	Members []*Proc
	Version string
}

// Proc is an etcd process (a member or a gRPC proxy).
type Proc struct {
	Name string
	// ClientURL is where clients connect (http:// or https://).
	ClientURL string
	// MetricsURL serves the process's Prometheus metrics (plain http).
	MetricsURL string
	cmd        *exec.Cmd
	log        *bytes.Buffer
	mu         sync.Mutex
	done       chan struct{}
	bin        string
	args       []string
	waitAddr   string
}

// Pid returns the process ID.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Stop kills the process and waits for it; stopping twice is a no-op.
func (p *Proc) Stop() {
	p.cmd.Process.Kill()
	<-p.done
}

// Restart stops the process and starts it again with the same arguments
// (the same addresses and data directory).
func (p *Proc) Restart() error {
	p.Stop()
	return p.run()
}

// Log returns what the process wrote to stdout and stderr so far.
func (p *Proc) Log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

type lockedWriter struct{ p *Proc }

func (w lockedWriter) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	if w.p.log.Len() > 1<<20 { // keep the last MiB or so
		w.p.log.Reset()
	}
	return w.p.log.Write(b)
}

func etcdBinary() (string, string, error) {
	bin, err := exec.LookPath("etcd")
	if err != nil {
		return "", "", fmt.Errorf("etcd binary not found: install the etcd-server package (test/deps.sh does): %w", err)
	}
	out, _ := exec.Command(bin, "--version").Output()
	version := strings.TrimSpace(strings.TrimPrefix(strings.SplitN(string(out), "\n", 2)[0], "etcd Version:"))
	return bin, version, nil
}

func startProc(name, bin string, args []string, waitAddr string) (*Proc, error) {
	p := &Proc{Name: name, log: &bytes.Buffer{}, bin: bin, args: args, waitAddr: waitAddr}
	if err := p.run(); err != nil {
		return nil, err
	}
	return p, nil
}

// run starts the process and waits until it accepts connections.
func (p *Proc) run() error {
	p.cmd, p.done = exec.Command(p.bin, p.args...), make(chan struct{})
	p.cmd.Stdout, p.cmd.Stderr = lockedWriter{p}, lockedWriter{p}
	if err := p.cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", p.Name, err)
	}
	done := p.done
	cmd := p.cmd
	go func() { cmd.Wait(); close(done) }()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		c, err := net.Dial("tcp", p.waitAddr)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("%s exited: %s", p.Name, lastLines(p.Log(), 5))
		default:
		}
		if time.Now().After(deadline) {
			p.Stop()
			return fmt.Errorf("%s at %s not up after 30s: %w", p.Name, p.waitAddr, err)
		}
	}
}

func lastLines(s string, n int) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n")
}

// StartBinaryCluster starts n members of the etcd binary with data under
// dir (one directory per member) and returns once each accepts
// connections. extra arguments go to every member (e.g.
// --auto-compaction-retention). On error, the members started are stopped.
func StartBinaryCluster(dir string, n int, extra ...string) (*BinaryCluster, error) {
	bin, version, err := etcdBinary()
	if err != nil {
		return nil, err
	}
	c := &BinaryCluster{Version: version}
	type addrs struct{ client, peer, metrics string }
	as := make([]addrs, n)
	var peers []string
	for i := range as {
		for _, p := range []*string{&as[i].client, &as[i].peer, &as[i].metrics} {
			if *p, err = FreeAddr("127.0.0.1"); err != nil {
				return nil, err
			}
		}
		peers = append(peers, "m"+strconv.Itoa(i)+"=http://"+as[i].peer)
	}
	errs := make([]error, n)
	procs := make([]*Proc, n)
	var wg sync.WaitGroup
	for i, a := range as {
		name := "m" + strconv.Itoa(i)
		mdir := filepath.Join(dir, name)
		if err := os.MkdirAll(mdir, 0o700); err != nil {
			return nil, err
		}
		args := append([]string{"--name", name, "--data-dir", mdir,
			"--listen-client-urls", "http://" + a.client, "--advertise-client-urls", "http://" + a.client,
			"--listen-peer-urls", "http://" + a.peer, "--initial-advertise-peer-urls", "http://" + a.peer,
			"--listen-metrics-urls", "http://" + a.metrics,
			"--initial-cluster", strings.Join(peers, ","), "--initial-cluster-token", "leased-sim",
			"--logger", "zap", "--log-level", "warn"}, extra...)
		wg.Add(1)
		go func() {
			defer wg.Done()
			procs[i], errs[i] = startProc("etcd member "+name, bin, args, a.client)
			if procs[i] != nil {
				procs[i].ClientURL, procs[i].MetricsURL = "http://"+a.client, "http://"+a.metrics
			}
		}()
	}
	wg.Wait()
	for _, p := range procs {
		if p != nil {
			c.Members = append(c.Members, p)
		}
	}
	if err := errors.Join(errs...); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

// Endpoints returns the members' client URLs.
func (c *BinaryCluster) Endpoints() []string {
	var out []string
	for _, m := range c.Members {
		out = append(out, m.ClientURL)
	}
	return out
}

// Stop kills every member; their data stays.
func (c *BinaryCluster) Stop() {
	for _, m := range c.Members {
		m.Stop()
	}
}

// ProxyTLS is the TLS of an etcd gRPC proxy: towards its clients (Cert,
// Key, and ClientCA to require client certificates) and towards the
// cluster (CA to verify the members, ClusterCert/ClusterKey to present).
// Empty fields mean plain text on that side.
type ProxyTLS struct {
	Cert, Key, ClientCA     string
	CA                      string
	ClusterCert, ClusterKey string
}

// StartGRPCProxy runs `etcd grpc-proxy start` in front of endpoints
// (host:port or URLs of the cluster's members) and returns once it accepts
// connections. The proxy keeps its files under dir.
func StartGRPCProxy(name, dir string, endpoints []string, tls ProxyTLS) (*Proc, error) {
	bin, _, err := etcdBinary()
	if err != nil {
		return nil, err
	}
	listen, err := FreeAddr("127.0.0.1")
	if err != nil {
		return nil, err
	}
	metrics, err := FreeAddr("127.0.0.1")
	if err != nil {
		return nil, err
	}
	var eps []string
	for _, e := range endpoints {
		eps = append(eps, strings.TrimPrefix(strings.TrimPrefix(e, "http://"), "https://"))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	args := []string{"grpc-proxy", "start", "--endpoints", strings.Join(eps, ","),
		"--listen-addr", listen, "--advertise-client-url", listen,
		"--metrics-addr", "http://" + metrics, "--data-dir", dir}
	scheme := "http://"
	if tls.Cert != "" {
		scheme = "https://"
		args = append(args, "--cert-file", tls.Cert, "--key-file", tls.Key)
		if tls.ClientCA != "" {
			args = append(args, "--trusted-ca-file", tls.ClientCA)
		}
	}
	if tls.CA != "" {
		args = append(args, "--cacert", tls.CA)
	}
	if tls.ClusterCert != "" {
		args = append(args, "--cert", tls.ClusterCert, "--key", tls.ClusterKey)
	}
	p, err := startProc("etcd grpc-proxy "+name, bin, args, listen)
	if err != nil {
		return nil, err
	}
	p.ClientURL, p.MetricsURL = scheme+listen, "http://"+metrics
	return p, nil
}
