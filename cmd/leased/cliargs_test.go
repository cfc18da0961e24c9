package main

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/leased/leased/internal/agent"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/lease"
)

// Flags may follow the positional arguments, and "--" ends the flags.
func TestParseInterspersed(t *testing.T) {
	for _, c := range []struct {
		args, pos []string
		prefix    string
	}{
		{[]string{"f.json", "--etcd-prefix=/x"}, []string{"f.json"}, "/x"},
		{[]string{"--etcd-prefix=/x", "f.json"}, []string{"f.json"}, "/x"},
		{[]string{"a", "--etcd-prefix", "/y", "b"}, []string{"a", "b"}, "/y"},
		{[]string{"-", "--etcd-prefix=/z"}, []string{"-"}, "/z"},
		{[]string{"--", "--etcd-prefix=/x"}, []string{"--etcd-prefix=/x"}, lease.DefaultPrefix},
		{[]string{"a", "--", "-b"}, []string{"a", "-b"}, lease.DefaultPrefix},
		{nil, nil, lease.DefaultPrefix},
	} {
		o := &agent.Options{}
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		registerEtcd(fs, o)
		if err := parseInterspersed(fs, c.args); err != nil {
			t.Errorf("%q: %v", c.args, err)
			continue
		}
		if got := fs.Args(); !slices.Equal(got, c.pos) && (len(got) != 0 || len(c.pos) != 0) {
			t.Errorf("%q: positional %q, want %q", c.args, got, c.pos)
		}
		if o.EtcdPrefix != c.prefix {
			t.Errorf("%q: --etcd-prefix %q, want %q", c.args, o.EtcdPrefix, c.prefix)
		}
	}
}

// `leased config put FILE --etcd-endpoints=URL`, as an operator types it,
// writes the config to that etcd (it used to exit 2 with only the usage).
func TestConfigPutFlagsAfterFile(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	f := filepath.Join(t.TempDir(), "net.json")
	if err := os.WriteFile(f, []byte(`{"Network":"10.100.0.0/16"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	if code := runConfigTo([]string{"put", f, "--etcd-endpoints=" + srv.ClientURL}, &out, &errb); code != 0 {
		t.Fatalf("exit %d:\n%s%s", code, out.String(), errb.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, lease.NewKeys("").Config())
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("no config in etcd after the put: %v", err)
	}
}
