package main

// Issue 14, part 1: the etcd connection never lies. Flags no retry can fix
// exit at once with status 2; nothing meant for TLS is sent in plaintext;
// while etcd cannot be used the agent says why at the default verbosity,
// without a line per retry. The agent runs as a real process (the test
// binary through TestHelperLeasedProcess), in a network namespace of its
// own where it needs an interface, against a real etcd.

import (
	"bytes"
	"context"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"

	"github.com/leased/leased/internal/agent"
	"github.com/leased/leased/internal/etcdserver"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/internal/testutil/testcerts"
)

// leasedProc is the leased command run as a process.
type leasedProc struct {
	cmd    *exec.Cmd
	log    *testutil.SyncBuffer
	start  time.Time
	exited chan struct{}
	code   int
}

// startLeased runs `leased args...` (in network namespace ns unless it is
// ""); the process is killed at the end of the test.
func startLeased(t *testing.T, ns string, env []string, args ...string) *leasedProc {
	t.Helper()
	argv := append([]string{os.Args[0], "-test.run=^TestHelperLeasedProcess$", "--"}, args...)
	if ns != "" {
		argv = append([]string{"ip", "netns", "exec", ns}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(append(os.Environ(), "LEASED_TEST_HELPER=1"), env...)
	p := &leasedProc{cmd: cmd, log: &testutil.SyncBuffer{}, exited: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.log, p.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.start = time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		cmd.Wait()
		p.code = cmd.ProcessState.ExitCode()
		close(p.exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.exited
	})
	return p
}

// wait waits up to d for the process to exit and returns its exit code,
// or -1 when it still runs.
func (p *leasedProc) wait(d time.Duration) int {
	select {
	case <-p.exited:
		return p.code
	case <-time.After(d):
		return -1
	}
}

// lines returns the log lines matching re.
func (p *leasedProc) lines(re string) []string {
	var out []string
	for _, l := range strings.Split(p.log.String(), "\n") {
		if regexp.MustCompile(re).MatchString(l) {
			out = append(out, l)
		}
	}
	return out
}

// waitLine waits up to d for a log line matching re and returns how long
// after the start it was seen (d+ when never).
func (p *leasedProc) waitLine(t *testing.T, re string, d time.Duration) time.Duration {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if len(p.lines(re)) > 0 {
			return time.Since(p.start)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return time.Since(p.start)
}

// agentArgs are the flags of an agent in a testutil.UplinkNS namespace.
func agentArgs(t *testing.T, node string, more ...string) []string {
	dir := t.TempDir()
	return append([]string{"--iface=eth0", "--node-name=" + node, "--subnet-file=" + filepath.Join(dir, "subnet.env"),
		"--lease-ttl=10s", "--docker-ipam=false"}, more...)
}

// Endpoints that do not parse, TLS mixed with plaintext, TLS flags with an
// http:// endpoint and a user without a password are refused at once with
// exit status 2 by the agent and by every command that connects to etcd,
// and the message names the endpoint and the fix. Nothing here connects.
func TestEtcdFlagsUsageErrors(t *testing.T) {
	ca := testcerts.NewCA(t, t.TempDir(), "ca").File
	cfgFile := filepath.Join(t.TempDir(), "net.json")
	os.WriteFile(cfgFile, []byte(`{"Network":"10.100.0.0/16"}`), 0o600)
	cases := []struct {
		name  string
		flags []string
		want  []string // in the message
	}{
		{"bad scheme", []string{"--etcd-endpoints=htp://x:1"}, []string{`"htp://x:1"`, "http:// or https://"}},
		{"empty", []string{"--etcd-endpoints="}, []string{"--etcd-endpoints is empty"}},
		{"empty entry", []string{"--etcd-endpoints=http://127.0.0.1:2379,"}, []string{"empty entry"}},
		{"no scheme", []string{"--etcd-endpoints=127.0.0.1:2379"}, []string{`"127.0.0.1:2379"`, "http://HOST:PORT"}},
		{"no port", []string{"--etcd-endpoints=https://etcd1"}, []string{`"https://etcd1"`, "HOST:PORT"}},
		{"mixed", []string{"--etcd-endpoints=http://127.0.0.1:1,https://127.0.0.1:2"},
			[]string{"https://127.0.0.1:2", "http://127.0.0.1:1", "every endpoint with https://"}},
		{"mixed, https first", []string{"--etcd-endpoints=https://127.0.0.1:2,http://127.0.0.1:1"},
			[]string{"http://127.0.0.1:1", "every endpoint with https://"}},
		{"cafile with http", []string{"--etcd-endpoints=http://127.0.0.1:2379", "--etcd-cafile=" + ca},
			[]string{"--etcd-cafile given", "http://127.0.0.1:2379", "https://127.0.0.1:2379"}},
		{"client cert with http", []string{"--etcd-endpoints=http://127.0.0.1:2379", "--etcd-certfile=" + ca, "--etcd-keyfile=" + ca},
			[]string{"--etcd-certfile, --etcd-keyfile given", "https://127.0.0.1:2379"}},
		{"user without password", []string{"--etcd-endpoints=http://127.0.0.1:2379", "--etcd-username=leased"},
			[]string{"--etcd-username leased given without a password", "--etcd-password-file"}},
	}
	commands := [][]string{nil, {"leases"}, {"status"}, {"config", "get"}, {"config", "put"}}
	for _, c := range cases {
		for _, cmd := range commands {
			name := c.name + "/agent"
			if cmd != nil {
				name = c.name + "/" + strings.Join(cmd[:min(2, len(cmd))], " ")
			}
			t.Run(name, func(t *testing.T) {
				args := append(append([]string{}, cmd...), c.flags...)
				switch {
				case cmd == nil:
					args = append(args, "--iface=lo", "--node-name=x", "--subnet-file="+filepath.Join(t.TempDir(), "s.env"))
				case cmd[len(cmd)-1] == "put":
					args = append(args, cfgFile)
				}
				p := startLeased(t, "", nil, args...)
				code := p.wait(20 * time.Second)
				out := p.log.String()
				if code != 2 {
					t.Fatalf("leased %v: exit status %d within 20s (-1: still running), want 2 at once; output:\n%s", args, code, out)
				}
				for _, w := range c.want {
					if !strings.Contains(out, w) {
						t.Errorf("leased %v: the message does not say %q:\n%s", args, w, out)
					}
				}
			})
		}
	}
}

// An https:// listener never receives a plaintext HTTP/2 preface, whatever
// the flags: TLS mixed with http:// endpoints (in either order) and TLS
// flags with an http:// endpoint are refused before anything is sent; the
// rest speaks TLS. (Before, the etcd client spoke the first endpoint's
// scheme to every endpoint.)
func TestTLSListenerNeverGetsPlaintext(t *testing.T) {
	l := testutil.NewSniffer(t, nil)
	// A second endpoint that accepts nothing.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	other := closed.Addr().String()
	closed.Close()
	tlsEP, ca := "https://"+l.Addr(), testcerts.NewCA(t, t.TempDir(), "ca").File
	for _, c := range []struct {
		o       agent.Options
		refused bool // a usage error (exit status 2) before anything is sent
	}{
		{agent.Options{EtcdEndpoints: tlsEP}, false},
		{agent.Options{EtcdEndpoints: tlsEP, EtcdCAFile: ca}, false},
		{agent.Options{EtcdEndpoints: "http://" + other + "," + tlsEP}, true},
		{agent.Options{EtcdEndpoints: "http://" + other + "," + tlsEP, EtcdCAFile: ca}, true},
		{agent.Options{EtcdEndpoints: tlsEP + ",http://" + other}, true},
		// The listener meant as TLS by the flags, written http://.
		{agent.Options{EtcdEndpoints: "http://" + l.Addr(), EtcdCAFile: ca}, true},
	} {
		err := tryClient(t, &c.o)
		switch {
		case err == nil:
			t.Errorf("%+v: a request to a server that speaks nothing worked", c.o)
		case c.refused && agent.ExitCode(err) != 2:
			t.Errorf("%+v: not refused as a usage error: %v", c.o, err)
		case !c.refused && agent.ExitCode(err) == 2:
			t.Errorf("%+v: refused: %v", c.o, err)
		}
	}
	firsts := l.Take()
	if len(firsts) == 0 {
		t.Fatal("the client never connected")
	}
	for _, b := range firsts {
		if bytes.HasPrefix(b, []byte("PRI * HTTP/2")) || len(b) > 0 && b[0] != 0x16 {
			t.Errorf("the TLS listener was sent %q, not a TLS handshake", b)
		}
	}
}

// With authentication on in etcd: a wrong password and a missing user name
// stop the agent (exit status 2) saying so, naming the flag; the commands
// say so too. A wrong password is no longer "creating etcd client".
func TestEtcdAuthFailsFast(t *testing.T) {
	ns := testutil.UplinkNS(t, "ec", "192.0.2.1/24")
	m, root := startAuthEtcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := root.Put(ctx, cfgKey, `{"Network":"10.100.0.0/16"}`); err != nil {
		t.Fatal(err)
	}
	ep := "--etcd-endpoints=" + m.UnixURL
	for _, c := range []struct {
		name string
		args []string
		env  []string
		want []string
		code int
	}{
		{"agent, wrong password", agentArgs(t, "a1", ep, "--etcd-username=leased"), []string{"LEASED_ETCD_PASSWORD=wrong"},
			[]string{`etcd refused the login of user \"leased\": check --etcd-username and the password`}, 2},
		{"agent, no user", agentArgs(t, "a2", ep), nil,
			[]string{"etcd has authentication enabled: give --etcd-username"}, 2},
		{"leases, wrong password", []string{"leases", ep, "--etcd-username=leased"}, []string{"LEASED_ETCD_PASSWORD=wrong"},
			[]string{`etcd refused the login of user "leased": check --etcd-username and the password`}, 2},
		{"leases, no user", []string{"leases", ep}, nil,
			[]string{"etcd has authentication enabled: give --etcd-username"}, 1},
		{"config get, no user", []string{"config", "get", ep}, nil,
			[]string{"etcd has authentication enabled: give --etcd-username"}, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := startLeased(t, ns, c.env, c.args...)
			code := p.wait(40 * time.Second)
			out := p.log.String()
			t.Logf("exit status %d:\n%s", code, out)
			if code != c.code {
				t.Fatalf("exit status %d within 40s (-1: still running), want %d; output:\n%s", code, c.code, out)
			}
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Errorf("the output does not say %q:\n%s", w, out)
				}
			}
			if strings.Contains(out, "creating etcd client") || strings.Contains(out, "=wrong") {
				t.Errorf("misleading output (or the password shown):\n%s", out)
			}
		})
	}
}

// While etcd cannot be reached from the start, the agent says why at the
// default verbosity within 10s (plus slack for a loaded machine), then at
// most one line every 30s. Cases: nothing listens (refused; also with a
// user name, when the client logs in before the agent starts), and a TLS
// etcd whose CA the agent was not given.
func TestAgentSaysWhyEtcdIsUnreachable(t *testing.T) {
	ns := testutil.UplinkNS(t, "ec", "192.0.2.1/24")
	dir := t.TempDir()
	ca := testcerts.NewCA(t, dir, "ca")
	other := testcerts.NewCA(t, dir, "other")
	cert, key := ca.Issue(t, "server", true, time.Now().Add(24*time.Hour))
	// A TLS etcd on a unix socket, reachable from the namespace. The etcd
	// client checks the server certificate against the socket's file name.
	sock := filepath.Join(dir, "localhost")
	c, err := etcdserver.StartCluster(filepath.Join(dir, "etcd"), 1, etcdserver.ClusterOptions{Configure: func(cfg *embed.Config) {
		cfg.ClientTLSInfo = transport.TLSInfo{CertFile: cert, KeyFile: key}
		cfg.ListenClientUrls = append(cfg.ListenClientUrls, url.URL{Scheme: "unixs", Path: sock})
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	for _, tc := range []struct {
		name, ep string
		flags    []string
		why      string
	}{
		{"refused", "http://127.0.0.1:9", nil, "is not reachable"},
		// With a user, building the client needs etcd (it logs in).
		{"refused with a user", "http://127.0.0.1:9", []string{"--etcd-username=leased", "--etcd-password=pw"}, "is not reachable"},
		{"unknown CA", "unixs://" + sock, []string{"--etcd-cafile=" + other.File}, "not signed by the CA in --etcd-cafile " + other.File},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startLeased(t, ns, nil, agentArgs(t, "u-"+strings.ReplaceAll(tc.name, " ", ""), append(tc.flags, "--etcd-endpoints="+tc.ep)...)...)
			const window = 50 * time.Second
			// The agent's clock starts at its first line: on a loaded
			// machine the fork and exec of the test binary (through ip
			// netns exec) can take seconds that are not the agent's.
			started := p.waitLine(t, `leased starting`, 60*time.Second)
			if len(p.lines(`leased starting`)) == 0 {
				t.Fatalf("the agent printed nothing within %s of its fork (exit status %d; -1: still running); log:\n%s", started.Round(time.Second), p.wait(0), p.log)
			}
			at := p.waitLine(t, `cannot use etcd`, 25*time.Second)
			lines := p.lines(`cannot use etcd`)
			if len(lines) == 0 {
				t.Fatalf("no line saying why etcd cannot be used within 25s of the agent's start; log:\n%s", p.log)
			}
			t.Logf("first line after %s (the agent started after %s): %s", at.Round(time.Millisecond), started.Round(time.Millisecond), lines[0])
			if !strings.Contains(lines[0], tc.why) {
				t.Errorf("the first line does not say %q: %s", tc.why, lines[0])
			}
			time.Sleep(window - time.Since(p.start))
			if code := p.wait(0); code != -1 {
				t.Fatalf("the agent exited (status %d) while etcd was unreachable:\n%s", code, p.log)
			}
			// Over 50s: the first line, then at most one per 30s.
			errs := p.lines(`^E`)
			if len(errs) > 3 {
				t.Errorf("%d error lines in %s (at most 3 expected: no line per retry):\n%s", len(errs), window, strings.Join(errs, "\n"))
			}
			if n := len(p.lines(`still cannot use etcd`)); n > 1 {
				t.Errorf("%d reminder lines in %s, want at most one per 30s:\n%s", n, window, p.log)
			}
		})
	}
}

// When etcd goes away while the agent runs: one line when it is lost and
// one when it is back, with the outage's length, and no line per retry in
// between (the outage outlasts the lease TTL, so the agent re-claims).
func TestAgentSaysEtcdLostAndBack(t *testing.T) {
	ns := testutil.UplinkNS(t, "ec", "192.0.2.1/24")
	c, err := etcdserver.StartCluster(t.TempDir(), 1, etcdserver.ClusterOptions{Unix: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	m := c.Members[0]
	etcdtest.Put(t, etcdtest.Client(t, m.ClientURL), cfgKey, `{"Network":"10.100.0.0/16"}`)
	p := startLeased(t, ns, nil, agentArgs(t, "lost", "--etcd-endpoints="+m.UnixURL)...)
	if p.waitLine(t, `"ready"`, 60*time.Second) > 60*time.Second {
		t.Fatalf("the agent did not get ready:\n%s", p.log)
	}
	if n := len(p.lines(`etcd`)); n > 0 && len(p.lines(`cannot use etcd|lost the connection`)) > 0 {
		t.Fatalf("connection lines before etcd went away:\n%s", p.log)
	}
	before := len(p.lines(`^[EW]`))
	m.Stop()
	stopped := time.Now()
	deadline := time.Now().Add(40 * time.Second)
	for len(p.lines(`lost the connection to etcd`)) == 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	lost := p.lines(`lost the connection to etcd`)
	if len(lost) == 0 {
		t.Fatalf("no line within 40s of etcd stopping:\n%s", p.log)
	}
	t.Logf("lost after %s: %s", time.Since(stopped).Round(time.Millisecond), lost[0])
	time.Sleep(45*time.Second - time.Since(stopped))
	if err := m.Restart(); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(40 * time.Second)
	for len(p.lines(`etcd is back`)) == 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	back := p.lines(`etcd is back`)
	om := regexp.MustCompile(`outage="([0-9ms]+)"`)
	if len(back) != 1 || !om.MatchString(back[0]) {
		t.Fatalf("want one line saying etcd is back with the outage's length, got %q:\n%s", back, p.log)
	}
	// etcd was away for 45s and more (the restart takes its time too).
	if d, err := time.ParseDuration(om.FindStringSubmatch(back[0])[1]); err != nil || d < 40*time.Second || d > 3*time.Minute {
		t.Errorf("the outage's length is not about how long etcd was away (45s plus the restart): %s", back[0])
	}
	if len(lost) != 1 || len(p.lines(`lost the connection to etcd`)) != 1 {
		t.Errorf("want one 'lost' line:\n%s", p.log)
	}
	// Errors and warnings during the outage: the lost line, the lease
	// lost warning (the outage outlasted --lease-ttl), and few others.
	if during := p.lines(`^[EW]`)[before:]; len(during) > 4 {
		t.Errorf("%d error/warning lines during a 45s outage (no line per retry expected):\n%s", len(during), strings.Join(during, "\n"))
	}
	if code := p.wait(0); code != -1 {
		t.Fatalf("the agent exited (status %d):\n%s", code, p.log)
	}
	t.Logf("the agent's log:\n%s", p.log)
}
