package lease

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/testutil/etcdtest"
)

func newSession(t testing.TB, cli *clientv3.Client, ttl int) *Session {
	t.Helper()
	s, err := NewSession(context.Background(), cli, time.Duration(ttl)*time.Second, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Orphan() })
	return s
}

// startRegistry starts an etcd member (etcdtest.Start) and returns its
// client, a registry under the default prefix and the config js.
func startRegistry(t testing.TB, js string) (*clientv3.Client, *Registry, *Config) {
	t.Helper()
	_, cli := etcdtest.Start(t)
	return cli, NewRegistry(cli, ""), mustConfig(t, js)
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
