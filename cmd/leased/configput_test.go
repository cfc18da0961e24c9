package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/lease"
)

// cfgKey is the config key under the default prefix.
var cfgKey = lease.NewKeys("").Config()

// configCLI runs `leased config ARGS` against etcd at endpoint, with the
// config text in a file (the last argument), and returns the exit code,
// standard output and standard error.
func configCLI(t *testing.T, endpoint, cfg string, args ...string) (int, string, string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "cfg.json")
	if err := os.WriteFile(f, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	argv := append(append([]string{"put", "--etcd-endpoints=" + endpoint}, args...), f)
	code := runConfigTo(argv, &out, &errb)
	return code, out.String(), errb.String()
}

// storedConfig returns the config value in etcd and its mod revision.
func storedConfig(t *testing.T, cli *clientv3.Client) (string, int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, cfgKey)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return "", 0
	}
	return string(resp.Kvs[0].Value), resp.Kvs[0].ModRevision
}

// `leased config put` refuses, with the hosts and subnets named, a config
// that would strand a held subnet or switch the backend under running
// hosts; --dry-run shows the change and writes nothing; --force writes; a
// reformatted config writes nothing; a put that loses the race to another
// writer says so and overwrites nothing.
func TestConfigPutChecksLiveLeases(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	const base = `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`
	if code, out, errs := configCLI(t, srv.ClientURL, base); code != 0 || !strings.Contains(out, "wrote "+cfgKey) {
		t.Fatalf("first put: exit %d\n%s%s", code, out, errs)
	}
	k := lease.NewKeys("")
	etcdtest.Put(t, cli, k.Lease("low"), `{"Node":"low","Subnet":"10.100.1.0/24","IPv6Subnet":"2001:db8:0:1::/64","PublicIP":"192.0.2.1","BackendType":"host-gw"}`)
	etcdtest.Put(t, cli, k.Lease("high"), `{"Node":"high","Subnet":"10.100.200.0/24","IPv6Subnet":"2001:db8:0:2::/64","PublicIP":"192.0.2.2","BackendType":"host-gw"}`)
	stored, rev := storedConfig(t, cli)

	refused := []struct {
		name, cfg string
		want      []string // in standard error
		notWant   string
	}{
		{"narrower Network", `{"Network":"10.100.0.0/17","IPv6Network":"2001:db8::/48"}`,
			[]string{"refused", "high [10.100.200.0/24]", "outside 10.100.0.0/17", "--force"}, "low"},
		{"SubnetMax below a held subnet", `{"Network":"10.100.0.0/16","SubnetMax":"10.100.100.0","IPv6Network":"2001:db8::/48"}`,
			[]string{"high [10.100.200.0/24]", "outside 10.100.0.0/24..10.100.100.0/24"}, "low"},
		{"SubnetMin above a held subnet", `{"Network":"10.100.0.0/16","SubnetMin":"10.100.100.0","IPv6Network":"2001:db8::/48"}`,
			[]string{"low [10.100.1.0/24]"}, "high"},
		{"another SubnetLen", `{"Network":"10.100.0.0/16","SubnetLen":25,"IPv6Network":"2001:db8::/48"}`,
			[]string{"2 live host(s)", "high [10.100.200.0/24]", "low [10.100.1.0/24]", "the IPv4 subnets are /25"}, ""},
		{"IPv6 disabled", `{"Network":"10.100.0.0/16"}`,
			[]string{"low [2001:db8:0:1::/64]", "IPv6 is disabled"}, ""},
		{"another backend", `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","Backend":{"Type":"vxlan"}}`,
			[]string{"runs the host-gw backend and the new config says vxlan"}, ""},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			code, out, errs := configCLI(t, srv.ClientURL, tt.cfg)
			if code != 1 {
				t.Errorf("exit %d, want 1\n%s%s", code, out, errs)
			}
			for _, w := range tt.want {
				if !strings.Contains(errs, w) {
					t.Errorf("standard error does not say %q:\n%s", w, errs)
				}
			}
			if tt.notWant != "" && strings.Contains(errs, tt.notWant+" [") {
				t.Errorf("standard error names %s, whose subnets stay inside:\n%s", tt.notWant, errs)
			}
			if now, nrev := storedConfig(t, cli); now != stored || nrev != rev {
				t.Errorf("a refused put changed etcd to %s", now)
			}
		})
	}

	narrow := `{"Network":"10.100.0.0/17","IPv6Network":"2001:db8::/48"}`
	code, out, _ := configCLI(t, srv.ClientURL, narrow, "--dry-run")
	if code != 1 || !strings.Contains(out, "IPv4: 10.100.0.0/16 (/24 subnets from 10.100.0.0/24 to 10.100.255.0/24) -> 10.100.0.0/17") ||
		!strings.Contains(out, "would be refused") || !strings.Contains(out, "high [10.100.200.0/24]") || !strings.Contains(out, "dry run: nothing written") {
		t.Errorf("--dry-run of a refused config: exit %d, want 1 and the change, the host and 'nothing written':\n%s", code, out)
	}
	wide := `{"Network":"10.0.0.0/8","IPv6Network":"2001:db8::/48"}`
	if code, out, errs := configCLI(t, srv.ClientURL, wide, "--dry-run"); code != 0 || !strings.Contains(out, "IPv4: 10.100.0.0/16") || !strings.Contains(out, "-> 10.0.0.0/8") || strings.Contains(out+errs, "refused") {
		t.Errorf("--dry-run of a compatible config: exit %d\n%s%s", code, out, errs)
	}
	if now, nrev := storedConfig(t, cli); now != stored || nrev != rev {
		t.Fatalf("--dry-run changed etcd to %s", now)
	}

	// The same config, reformatted, writes nothing.
	if code, out, errs := configCLI(t, srv.ClientURL, "{\n  \"IPv6Network\": \"2001:db8::/48\",\n  \"Network\": \"10.100.0.0/16\",\n  \"Backend\": {\"Type\": \"host-gw\"}\n}\n"); code != 0 || !strings.Contains(out, "nothing written") {
		t.Errorf("reformatted put: exit %d\n%s%s", code, out, errs)
	}
	if _, nrev := storedConfig(t, cli); nrev != rev {
		t.Errorf("a reformatted put wrote etcd (mod revision %d -> %d)", rev, nrev)
	}

	// Another writer between the read and the write: nothing is overwritten.
	other := `{"Network":"10.0.0.0/9","IPv6Network":"2001:db8::/48"}`
	beforeConfigWrite = func() { etcdtest.Put(t, cli, cfgKey, other) }
	code, out, errs := configCLI(t, srv.ClientURL, wide)
	beforeConfigWrite = nil
	if code != 1 || !strings.Contains(errs, "changed while this put ran") || !strings.Contains(errs, fmt.Sprintf("read at revision %d", rev)) || strings.Contains(out, "wrote") {
		t.Errorf("put that lost the race: exit %d, want 1 and why\n%s%s", code, out, errs)
	}
	if now, _ := storedConfig(t, cli); now != other {
		t.Errorf("the other writer's config was overwritten: etcd holds %s", now)
	}

	// --force writes a refused config, still naming the hosts.
	code, out, errs = configCLI(t, srv.ClientURL, narrow, "--force")
	if code != 0 || !strings.Contains(errs, "written anyway (--force)") || !strings.Contains(errs, "high [10.100.200.0/24]") || !strings.Contains(out, "wrote") {
		t.Errorf("--force: exit %d\n%s%s", code, out, errs)
	}
	if now, _ := storedConfig(t, cli); now != narrow {
		t.Errorf("--force: etcd holds %s, want %s", now, narrow)
	}
}

// `leased config validate` refuses what every agent would refuse, with the
// reason: networks no host can use, and proxy-ndp without IPv6.
func TestConfigValidateRefusesWhatAgentsRefuse(t *testing.T) {
	for _, tt := range []struct{ cfg, want string }{
		{`{"Network":"0.0.0.0/0"}`, "is the whole address space"},
		{`{"IPv6Network":"::/0","IPv6SubnetLen":64}`, "is the whole address space"},
		{`{"Network":"127.0.0.0/16"}`, "loopback"},
		{`{"Network":"224.0.0.0/16"}`, "multicast"},
		{`{"Network":"169.254.0.0/16"}`, "link-local"},
		{`{"IPv6Network":"ff00::/8","IPv6SubnetLen":64}`, "multicast"},
		{`{"IPv6Network":"fe80::/10","IPv6SubnetLen":64}`, "link-local"},
		{`{"Network":"10.100.0.0/16","Backend":{"Type":"proxy-ndp"}}`, "needs IPv6"},
	} {
		f := filepath.Join(t.TempDir(), "cfg.json")
		os.WriteFile(f, []byte(tt.cfg), 0o644)
		var out, errb bytes.Buffer
		if code := runConfigTo([]string{"validate", f}, &out, &errb); code != 1 || !strings.Contains(errb.String(), tt.want) {
			t.Errorf("validate %s: exit %d, want 1 and %q:\n%s", tt.cfg, code, tt.want, errb.String())
		}
	}
}
