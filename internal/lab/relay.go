package lab

import (
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/nsutil"
	"github.com/leased/leased/internal/tcpproxy"
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
	l.relay = tcpproxy.New(ln, targets...)
	l.EtcdEndpoint = "http://" + listen
	l.Cfg.Log("etcd (external %s) relayed to %s in namespace %s", strings.Join(l.Cfg.EtcdEndpoints, ","), l.EtcdEndpoint, l.ns("lan1"))
	cli, err := clientv3.New(clientv3.Config{Endpoints: l.Cfg.EtcdEndpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return fmt.Errorf("etcd client for %v: %w", l.Cfg.EtcdEndpoints, err)
	}
	l.Client = cli
	return nil
}
