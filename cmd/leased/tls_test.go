package main

// Scenario 9 of issue 6: the agent's etcd client over TLS (client
// certificates, server-only TLS) and with user/password authentication.
// Each case builds the client exactly as the agent does (NewEtcdClient from
// the options the flags fill) and makes a real request.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/leased/leased/internal/agent"
	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/testcerts"
	"github.com/leased/leased/pkg/lease"
)

// startTLSEtcd runs a one-member etcd serving clients over TLS with the
// server certificate of ca; clientCertAuth makes it demand client
// certificates signed by ca.
func startTLSEtcd(t *testing.T, ca *testcerts.CA, clientCertAuth bool) string {
	t.Helper()
	cert, key := ca.Issue(t, "server", true, time.Now().Add(24*time.Hour))
	c, err := etcdserver.StartCluster(t.TempDir(), 1, etcdserver.ClusterOptions{Configure: func(cfg *embed.Config) {
		// etcd demands client certificates whenever it has a trusted CA file.
		cfg.ClientTLSInfo = transport.TLSInfo{CertFile: cert, KeyFile: key, ClientCertAuth: clientCertAuth}
		if clientCertAuth {
			cfg.ClientTLSInfo.TrustedCAFile = ca.File
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	return c.Members[0].ClientURL
}

// tryClient builds the agent's client from o and makes one request, as the
// agent's first step does; it returns the error the agent would log.
func tryClient(t *testing.T, o *agent.Options) error {
	t.Helper()
	cli, err := agent.NewEtcdClient(o)
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err = cli.Get(ctx, "/leased/network/config")
	return err
}

func TestEtcdClientCertificates(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.NewCA(t, dir, "ca")
	wrongCA := testcerts.NewCA(t, dir, "wrong-ca")
	ep := startTLSEtcd(t, ca, true)
	good, goodKey := ca.Issue(t, "client", false, time.Now().Add(24*time.Hour))
	expired, expiredKey := ca.Issue(t, "expired-client", false, time.Now().Add(-time.Hour))
	foreign, foreignKey := wrongCA.Issue(t, "foreign-client", false, time.Now().Add(24*time.Hour))

	tests := []struct {
		name      string
		o         agent.Options
		wantError []string // substrings the error must contain; nil = must work
	}{
		{"right CA and client cert", agent.Options{EtcdCAFile: ca.File, EtcdCertFile: good, EtcdKeyFile: goodKey}, nil},
		{"wrong CA for the server", agent.Options{EtcdCAFile: wrongCA.File, EtcdCertFile: good, EtcdKeyFile: goodKey},
			[]string{"certificate signed by unknown authority"}},
		{"expired client cert", agent.Options{EtcdCAFile: ca.File, EtcdCertFile: expired, EtcdKeyFile: expiredKey},
			[]string{expired, "expired"}},
		{"client cert from another CA", agent.Options{EtcdCAFile: ca.File, EtcdCertFile: foreign, EtcdKeyFile: foreignKey},
			[]string{"unknown certificate authority"}},
		{"missing client cert", agent.Options{EtcdCAFile: ca.File},
			[]string{"certificate required"}},
		{"cert without its key", agent.Options{EtcdCAFile: ca.File, EtcdCertFile: good},
			[]string{"--etcd-keyfile"}},
		{"key of another cert", agent.Options{EtcdCAFile: ca.File, EtcdCertFile: good, EtcdKeyFile: expiredKey},
			[]string{"private key does not match public key"}},
		{"CA file missing", agent.Options{EtcdCAFile: filepath.Join(dir, "nope.pem"), EtcdCertFile: good, EtcdKeyFile: goodKey},
			[]string{"nope.pem"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.o
			o.EtcdEndpoints = ep
			start := time.Now()
			err := tryClient(t, &o)
			t.Logf("after %s: %v", time.Since(start).Round(time.Millisecond), err)
			if tc.wantError == nil {
				if err != nil {
					t.Fatalf("request failed: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("request worked")
			}
			for _, w := range tc.wantError {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not name the problem (%q):\n%v", w, err)
				}
			}
		})
	}
}

// Server-only TLS: the server has a certificate, clients need only the CA.
func TestEtcdServerOnlyTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testcerts.NewCA(t, dir, "ca")
	ep := startTLSEtcd(t, ca, false)
	if err := tryClient(t, &agent.Options{EtcdEndpoints: ep, EtcdCAFile: ca.File}); err != nil {
		t.Fatalf("CA only: %v", err)
	}
	// Without the CA the system roots do not know the server: refused, and said so.
	err := tryClient(t, &agent.Options{EtcdEndpoints: ep})
	if err == nil || !strings.Contains(err.Error(), "certificate signed by unknown authority") {
		t.Errorf("https without the CA: %v", err)
	}
}

// An https:// endpoint is only ever spoken to in TLS: what reaches the
// server is a TLS ClientHello, never a plaintext HTTP/2 preface, and the
// request fails against a plaintext server.
func TestHTTPSEndpointNeverPlaintext(t *testing.T) {
	l := testutil.NewSniffer(t, []byte("HTTP/1.1 400 Bad Request\r\n\r\n")) // a plaintext server's answer
	for _, o := range []agent.Options{
		{EtcdEndpoints: "https://" + l.Addr()},
		{EtcdEndpoints: "https://" + l.Addr(), EtcdCAFile: testcerts.NewCA(t, t.TempDir(), "ca").File},
	} {
		if err := tryClient(t, &o); err == nil {
			t.Errorf("%+v: a request to a plaintext server over https:// worked", o)
		}
	}
	firsts := l.Take()
	if len(firsts) == 0 {
		t.Fatal("the client never connected")
	}
	for _, b := range firsts {
		if len(b) == 0 {
			continue
		}
		if bytes.HasPrefix(b, []byte("PRI * HTTP/2")) || b[0] != 0x16 {
			t.Errorf("an https:// endpoint was sent %q, not a TLS handshake", b)
		}
	}
	// The same server with a plain http:// endpoint does get plaintext: the
	// check above can tell the two apart.
	tryClient(t, &agent.Options{EtcdEndpoints: "http://" + l.Addr()})
	firsts = l.Take()
	plain := false
	for _, b := range firsts {
		plain = plain || bytes.HasPrefix(b, []byte("PRI * HTTP/2"))
	}
	if !plain {
		t.Errorf("control: an http:// endpoint sent %q, expected the HTTP/2 preface", firsts)
	}
}

const testPassword = "pw-Zq81-never-show-me"

// startAuthEtcd runs etcd with authentication on: user root (password
// "rootpw") and user leased (testPassword), both with the root role. It
// returns the member (with a unix socket URL, reachable from any network
// namespace) and a client logged in as root.
func startAuthEtcd(t *testing.T) (*etcdserver.Member, *clientv3.Client) {
	t.Helper()
	c, err := etcdserver.StartCluster(t.TempDir(), 1, etcdserver.ClusterOptions{Unix: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	m := c.Members[0]
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{m.ClientURL}, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, step := range []func() error{
		func() error { _, err := cli.UserAdd(ctx, "root", "rootpw"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := cli.UserAdd(ctx, "leased", testPassword); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "leased", "root"); return err },
		func() error { _, err := cli.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	cli.Close()
	root, err := clientv3.New(clientv3.Config{Endpoints: []string{m.ClientURL}, Username: "root", Password: "rootpw", Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { root.Close() })
	return m, root
}

// Username/password authentication works from the password file and from
// the environment, and a wrong password fails saying so.
func TestEtcdPasswordAuth(t *testing.T) {
	m, _ := startAuthEtcd(t)
	pwFile := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(pwFile, []byte(testPassword+"\n"), 0o600)
	if err := tryClient(t, &agent.Options{EtcdEndpoints: m.ClientURL, EtcdUsername: "leased", EtcdPasswordFile: pwFile}); err != nil {
		t.Errorf("password file: %v", err)
	}
	if err := tryClient(t, &agent.Options{EtcdEndpoints: m.ClientURL, EtcdUsername: "leased", EtcdPassword: testPassword}); err != nil {
		t.Errorf("password flag: %v", err)
	}
	err := tryClient(t, &agent.Options{EtcdEndpoints: m.ClientURL, EtcdUsername: "leased", EtcdPassword: "wrong"})
	if err == nil || !strings.Contains(err.Error(), "authentication failed") {
		t.Errorf("wrong password: %v", err)
	}
	if err != nil && strings.Contains(err.Error(), "wrong") {
		t.Errorf("the error repeats the password: %v", err)
	}
	if err := tryClient(t, &agent.Options{EtcdEndpoints: m.ClientURL}); err == nil {
		t.Error("no credentials: a request worked with auth enabled")
	}
}

// TestHelperLeasedProcess is not a test: TestEtcdPasswordNeverShown runs
// the test binary as the leased agent through it (arguments after "--").
func TestHelperLeasedProcess(t *testing.T) {
	if os.Getenv("LEASED_TEST_HELPER") != "1" {
		return
	}
	for i, a := range os.Args {
		if a == "--" {
			os.Exit(run(os.Args[i+1:]))
		}
	}
	os.Exit(2)
}

// The real agent process, given the password in a file or in
// LEASED_ETCD_PASSWORD, authenticates (its lease appears in etcd), and the
// password appears neither in /proc/<pid>/cmdline nor anywhere in its log
// at the highest verbosity. The agent runs in a network namespace of its
// own, so its datapath touches nothing of the machine's.
func TestEtcdPasswordNeverShown(t *testing.T) {
	testutil.RequireRoot(t)
	m, root := startAuthEtcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := root.Put(ctx, cfgKey, `{"Network":"10.100.0.0/16"}`); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"file", "env"} {
		t.Run(mode, func(t *testing.T) {
			ns := testutil.UplinkNS(t, "pw-"+mode, "192.0.2.1/24")
			dir := t.TempDir()
			node := "pw-" + mode
			args := []string{"netns", "exec", ns, os.Args[0], "-test.run=^TestHelperLeasedProcess$", "--",
				"--etcd-endpoints=" + m.UnixURL, "--etcd-username=leased", "--iface=eth0", "--node-name=" + node,
				"--subnet-file=" + filepath.Join(dir, "subnet.env"), "--lease-ttl=10s", "-v=10", "--docker-ipam=false"}
			env := append(os.Environ(), "LEASED_TEST_HELPER=1")
			if mode == "file" {
				pw := filepath.Join(dir, "pw")
				os.WriteFile(pw, []byte(testPassword+"\n"), 0o600)
				args = append(args, "--etcd-password-file="+pw)
			} else {
				env = append(env, "LEASED_ETCD_PASSWORD="+testPassword)
			}
			cmd := exec.Command("ip", args...)
			cmd.Env = env
			var log testutil.SyncBuffer
			cmd.Stdout, cmd.Stderr = &log, &log
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan struct{})
			go func() { cmd.Wait(); close(exited) }()
			defer func() { cmd.Process.Kill(); <-exited }()
			testutil.Eventually(t, 20*time.Second, "the agent's lease in etcd (it authenticated)", func() bool {
				c, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				r, err := root.Get(c, lease.NewKeys("").Lease(node))
				return err == nil && len(r.Kvs) == 1
			})
			testutil.Eventually(t, 20*time.Second, "the agent's log line for its lease", func() bool { return strings.Contains(log.String(), "Lease acquired") })
			cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", cmd.Process.Pid))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(cmdline), "TestHelperLeasedProcess") {
				t.Fatalf("pid %d is not the agent: %q", cmd.Process.Pid, cmdline)
			}
			if strings.Contains(string(cmdline), testPassword) {
				t.Errorf("the password is in /proc/%d/cmdline: %q", cmd.Process.Pid, cmdline)
			}
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(15 * time.Second):
				t.Error("the agent did not stop within 15s of SIGTERM")
			}
			out := log.String()
			if !strings.Contains(out, "Lease acquired") {
				t.Errorf("the log does not show the lease (is this the agent's log?):\n%s", out)
			}
			if strings.Contains(out, testPassword) {
				t.Errorf("the password is in the agent's log:\n%s", out)
			}
		})
	}
}
