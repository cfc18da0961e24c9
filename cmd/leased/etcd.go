package main

import (
	"crypto/tls"
	"fmt"
	"os"
	"strings"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// newEtcdClient builds the etcd client from the options. It does not wait
// for etcd to be reachable: callers retry their own requests.
func newEtcdClient(o *options) (*clientv3.Client, error) {
	eps := strings.Split(o.etcdEndpoints, ",")
	cfg := clientv3.Config{
		Endpoints:   eps,
		DialTimeout: 5 * time.Second,
		Username:    o.etcdUsername,
		Password:    o.etcdPassword,
		// The client's own zap logger is noisy about every retry; leased
		// logs what matters itself.
		Logger: zap.NewNop(),
	}
	if o.etcdPasswordFile != "" {
		b, err := os.ReadFile(o.etcdPasswordFile)
		if err != nil {
			return nil, fmt.Errorf("reading --etcd-password-file: %w", err)
		}
		cfg.Password = strings.TrimRight(string(b), "\r\n")
	}
	tlsWanted := o.etcdCAFile != "" || o.etcdCertFile != "" || o.etcdKeyFile != ""
	for _, ep := range eps {
		if strings.HasPrefix(ep, "https://") {
			tlsWanted = true
		}
	}
	if tlsWanted {
		if (o.etcdCertFile == "") != (o.etcdKeyFile == "") {
			return nil, fmt.Errorf("--etcd-certfile and --etcd-keyfile go together: give both or neither")
		}
		info := transport.TLSInfo{CertFile: o.etcdCertFile, KeyFile: o.etcdKeyFile, TrustedCAFile: o.etcdCAFile}
		var tc *tls.Config
		var err error
		if info.Empty() && o.etcdCAFile == "" {
			tc = &tls.Config{MinVersion: tls.VersionTLS12}
		} else if tc, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("loading etcd TLS files (ca %q, cert %q, key %q): %w", o.etcdCAFile, o.etcdCertFile, o.etcdKeyFile, err)
		}
		cfg.TLS = tc
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("creating etcd client for %s: %w", o.etcdEndpoints, err)
	}
	return cli, nil
}
