// Package etcdtest runs real etcd members for tests and talks to them:
// the embedded member of internal/etcdserver, a client, writes that fail
// the test, and a TCP proxy that cuts a client off. It is apart from
// package testutil so that tests without etcd do not build the etcd server.
// Only tests import it; it must not import pkg/lease, whose tests use it.
package etcdtest

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/tcpproxy"
)

// Start runs an embedded etcd member with its data in a temporary
// directory of t, and returns it with a client (see Client). Both are
// closed when t ends.
func Start(t testing.TB) (*etcdserver.Server, *clientv3.Client) {
	t.Helper()
	srv, err := etcdserver.Start(t.TempDir(), "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return srv, Client(t, srv.ClientURL)
}

// Client returns a client of the etcd member at endpoint (a URL), with a
// 5 s dial timeout and no logging, closed when t ends.
func Client(t testing.TB, endpoint string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// Put writes val under key and fails t if etcd does not take it within
// 60 s. A string or []byte is written as it is, any other value as JSON.
func Put(t testing.TB, cli *clientv3.Client, key string, val any) {
	t.Helper()
	var s string
	switch v := val.(type) {
	case string:
		s = v
	case []byte:
		s = string(v)
	default:
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatalf("putting %s: %v", key, err)
		}
		s = string(b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, key, s); err != nil {
		t.Fatalf("putting %s: %v", key, err)
	}
}

// Delete deletes key and fails t if etcd does not take it within 60 s.
func Delete(t testing.TB, cli *clientv3.Client, key string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := cli.Delete(ctx, key); err != nil {
		t.Fatalf("deleting %s: %v", key, err)
	}
}

// Proxy relays a free loopback port to target (host:port) until t ends.
// SetDown(true) on it cuts every client that connects through it off etcd
// while others keep writing; SetDown(false) lets them back.
func Proxy(t testing.TB, target string) *tcpproxy.Proxy {
	t.Helper()
	p, err := tcpproxy.Loopback(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// GRPCProxy runs etcd's gRPC proxy (etcdserver.StartGRPCProxy) named name
// in front of endpoints, with its files under dir, until t ends; a failed
// test logs the proxy's output.
func GRPCProxy(t testing.TB, name, dir string, endpoints []string, tls etcdserver.ProxyTLS) *etcdserver.Proc {
	t.Helper()
	p, err := etcdserver.StartGRPCProxy(name, dir, endpoints, tls)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- %s log ---\n%s", name, p.Log())
		}
		p.Stop()
	})
	return p
}
