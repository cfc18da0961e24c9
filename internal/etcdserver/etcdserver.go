// Package etcdserver runs a real single-member etcd inside the process, for
// the lab and for tests. It is etcd's own server (go.etcd.io/etcd/server/v3/embed),
// not a fake.
package etcdserver

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"time"

	"go.etcd.io/etcd/server/v3/embed"

	"github.com/leased/leased/internal/nsutil"
	"go.uber.org/zap"
)

// Server is one running etcd member.
type Server struct {
	Dir       string
	ClientURL string // e.g. http://127.0.0.1:23790
	// ExtraURLs are further client URLs (e.g. unix:///dir/etcd.sock).
	ExtraURLs []string
	peerURL   string
	e         *embed.Etcd
}

// FreeAddr returns host:port with a port that was free a moment ago.
func FreeAddr(host string) (string, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// Start runs a member with its data in dir, serving clients on clientAddr
// (host:port; "" picks a free loopback port).
func Start(dir, clientAddr string) (*Server, error) {
	if clientAddr == "" {
		var err error
		if clientAddr, err = FreeAddr("127.0.0.1"); err != nil {
			return nil, err
		}
	}
	peerAddr, err := FreeAddr("127.0.0.1")
	if err != nil {
		return nil, err
	}
	s := &Server{Dir: dir, ClientURL: "http://" + clientAddr, peerURL: "http://" + peerAddr}
	return s, s.start()
}

func (s *Server) start() error {
	cfg := embed.NewConfig()
	cfg.Dir = s.Dir
	cfg.Name = "lab"
	cu, _ := url.Parse(s.ClientURL)
	pu, _ := url.Parse(s.peerURL)
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	for _, x := range s.ExtraURLs {
		u, err := url.Parse(x)
		if err != nil {
			return fmt.Errorf("client URL %q: %w", x, err)
		}
		cfg.ListenClientUrls = append(cfg.ListenClientUrls, *u)
	}
	cfg.EnableGRPCGateway = false
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.Name + "=" + s.peerURL
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.LogLevel = "error"
	// Snappier for tests and labs; a real cluster keeps the defaults.
	cfg.TickMs, cfg.ElectionMs = 10, 100
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return err
	}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("starting etcd in %s: %w", s.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		return fmt.Errorf("etcd in %s did not become ready within 30s", s.Dir)
	}
	s.e = e
	return nil
}

// StartIn is Start with the listening sockets created in the network
// namespace ns (a path such as /var/run/netns/NAME): clients inside that
// namespace reach clientAddr; extraURLs (unix sockets) are reachable from
// anywhere on the file system. The server's goroutines keep running in the
// calling process.
func StartIn(ns, dir, clientAddr, peerAddr string, extraURLs ...string) (*Server, error) {
	s := &Server{Dir: dir, ClientURL: "http://" + clientAddr, peerURL: "http://" + peerAddr, ExtraURLs: extraURLs}
	err := nsutil.Do(ns, s.start)
	return s, err
}

// Stop stops the member; its data stays in Dir.
func (s *Server) Stop() {
	if s.e != nil {
		s.e.Close()
		s.e = nil
	}
}

// Restart stops the member and starts it again on the same data and URLs.
func (s *Server) Restart() error {
	s.Stop()
	return s.start()
}

// Running reports whether the member is up.
func (s *Server) Running() bool { return s.e != nil }
