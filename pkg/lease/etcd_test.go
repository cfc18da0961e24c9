package lease

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
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
