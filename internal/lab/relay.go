package lab

import (
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/nsutil"
)

// useExternalEtcd points the lab at an etcd outside it. Hosts live in
// namespaces that cannot reach the machine's own addresses, so the lab
// listens on listen inside the LAN namespace and relays each connection,
// from the lab process, to the first reachable external endpoint.
func (l *Lab) useExternalEtcd(listen string) error {
	var targets []string
	for _, ep := range l.Cfg.EtcdEndpoints {
		u, err := url.Parse(ep)
		if err != nil || u.Scheme != "http" || u.Host == "" {
			return fmt.Errorf("lab: etcd endpoint %q: want http://host:port (the lab relays plain TCP)", ep)
		}
		targets = append(targets, u.Host)
	}
	var ln net.Listener
	err := nsutil.Do(netnsPath(l.ns("lan1")), func() (err error) {
		ln, err = net.Listen("tcp", listen)
		return err
	})
	if err != nil {
		return fmt.Errorf("lab: relay listener in the LAN: %w", err)
	}
	r := &relay{ln: ln, targets: targets}
	go r.serve()
	l.relay = r
	l.EtcdEndpoint = "http://" + listen
	l.Cfg.Log("etcd (external %s) relayed to %s in namespace %s", strings.Join(l.Cfg.EtcdEndpoints, ","), l.EtcdEndpoint, l.ns("lan1"))
	cli, err := clientv3.New(clientv3.Config{Endpoints: l.Cfg.EtcdEndpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return fmt.Errorf("etcd client for %v: %w", l.Cfg.EtcdEndpoints, err)
	}
	l.Client = cli
	return nil
}

// relay copies TCP connections from a listener to the first target that
// accepts a connection.
type relay struct {
	ln      net.Listener
	targets []string
	mu      sync.Mutex
	conns   []net.Conn
}

func (r *relay) serve() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		go r.pipe(c)
	}
}

func (r *relay) pipe(c net.Conn) {
	var up net.Conn
	var err error
	for _, t := range r.targets {
		if up, err = net.DialTimeout("tcp", t, 3*time.Second); err == nil {
			break
		}
	}
	if up == nil {
		c.Close()
		return
	}
	r.mu.Lock()
	r.conns = append(r.conns, c, up)
	r.mu.Unlock()
	go func() { io.Copy(up, c); up.Close() }()
	io.Copy(c, up)
	c.Close()
}

// Close stops accepting and cuts every relayed connection.
func (r *relay) Close() error {
	err := r.ln.Close()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.conns {
		c.Close()
	}
	r.conns = nil
	return err
}
