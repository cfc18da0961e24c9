package lease

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/etcdserver"
)

// startEtcd runs a real etcd member for the test and returns it with a
// client; both are closed when the test ends.
func startEtcd(t testing.TB) (*etcdserver.Server, *clientv3.Client) {
	t.Helper()
	srv, err := etcdserver.Start(t.TempDir(), "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return srv, newClient(t, srv)
}

func newClient(t testing.TB, srv *etcdserver.Server) *clientv3.Client {
	t.Helper()
	return newClientAt(t, srv.ClientURL)
}

func newClientAt(t testing.TB, url string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func newSession(t testing.TB, cli *clientv3.Client, ttl int) *Session {
	t.Helper()
	s, err := NewSession(context.Background(), cli, time.Duration(ttl)*time.Second, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Orphan() })
	return s
}

func mustConfig(t testing.TB, js string) *Config {
	t.Helper()
	cfg, _, err := ParseConfig([]byte(js))
	if err != nil {
		t.Fatalf("config %s: %v", js, err)
	}
	return cfg
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}
