package agent

// What leased says about its connection to etcd: endpoint and credential
// checks that refuse a configuration no retry can fix (exit status 2), and
// the monitor that tells the operator, at the default verbosity and without
// a line per retry, why etcd cannot be used and when it is back.

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/leased/leased/pkg/lease"
	"github.com/leased/leased/pkg/metrics"
)

// usageError is a configuration no retry can fix: leased exits with status
// 2, which the unit does not restart (RestartPreventExitStatus=2).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usageErrorf(format string, a ...any) error { return &usageError{fmt.Sprintf(format, a...)} }

// ExitCode is 2 for a usageError, else 1.
func ExitCode(err error) int {
	var ue *usageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}

// ValidateEtcd checks the etcd flags that no retry can fix: every endpoint
// is a URL etcd's client understands, all of them use TLS or none does (the
// etcd client speaks the first endpoint's scheme to every endpoint, so a
// mix would send TLS-meant traffic, the password included, in plaintext),
// TLS flags come with TLS endpoints, and a user name comes with a password.
func (o *Options) ValidateEtcd() error {
	if strings.TrimSpace(o.EtcdEndpoints) == "" {
		return usageErrorf("--etcd-endpoints is empty: give etcd's client URLs, e.g. --etcd-endpoints=https://10.0.0.1:2379,https://10.0.0.2:2379")
	}
	var plain, secure []string
	for _, ep := range strings.Split(o.EtcdEndpoints, ",") {
		if strings.TrimSpace(ep) == "" {
			return usageErrorf("--etcd-endpoints %q has an empty entry: separate URLs with single commas", o.EtcdEndpoints)
		}
		if ep != strings.TrimSpace(ep) {
			return usageErrorf("--etcd-endpoints entry %q has spaces around it: separate URLs with commas only", ep)
		}
		u, err := url.Parse(ep)
		if err != nil || !strings.Contains(ep, "://") {
			return usageErrorf("--etcd-endpoints entry %q is not a URL: write http://HOST:PORT, https://HOST:PORT or unix:///PATH", ep)
		}
		switch u.Scheme {
		case "http", "https":
			if u.Hostname() == "" || u.Port() == "" {
				return usageErrorf("--etcd-endpoints entry %q lacks the host or the port: write %s://HOST:PORT (etcd's client port is usually 2379)", ep, u.Scheme)
			}
			if u.Path != "" && u.Path != "/" || u.RawQuery != "" {
				return usageErrorf("--etcd-endpoints entry %q has a path: the etcd client ignores it; write %s://%s", ep, u.Scheme, u.Host)
			}
		case "unix", "unixs":
			if u.Host == "" && u.Path == "" {
				return usageErrorf("--etcd-endpoints entry %q names no socket: write unix:///PATH", ep)
			}
		default:
			return usageErrorf("--etcd-endpoints entry %q has the scheme %q: use http:// or https:// (unix:// or unixs:// for a socket)", ep, u.Scheme)
		}
		switch u.Scheme {
		case "http":
			plain = append(plain, ep)
		case "https", "unixs":
			secure = append(secure, ep)
		}
	}
	if len(plain) > 0 && len(secure) > 0 {
		return usageErrorf("--etcd-endpoints mixes TLS (%s) and plaintext (%s) endpoints: the etcd client would speak one of them to all; write every endpoint with https:// (or every one with http:// if etcd does not use TLS)",
			strings.Join(secure, ","), strings.Join(plain, ","))
	}
	var tlsFlags []string
	for _, f := range []struct{ name, v string }{{"--etcd-cafile", o.EtcdCAFile}, {"--etcd-certfile", o.EtcdCertFile}, {"--etcd-keyfile", o.EtcdKeyFile}} {
		if f.v != "" {
			tlsFlags = append(tlsFlags, f.name)
		}
	}
	if len(plain) > 0 && len(tlsFlags) > 0 {
		return usageErrorf("%s given, but --etcd-endpoints entry %s is http://, which the etcd client speaks in plaintext: write it as https://%s (or drop the TLS flags if etcd does not use TLS)",
			strings.Join(tlsFlags, ", "), plain[0], strings.TrimPrefix(plain[0], "http://"))
	}
	password := o.EtcdPassword != "" || o.EtcdPasswordFile != ""
	switch {
	case o.EtcdUsername != "" && !password:
		return usageErrorf("--etcd-username %s given without a password: give it in --etcd-password-file or LEASED_ETCD_PASSWORD", o.EtcdUsername)
	case o.EtcdUsername == "" && password:
		return usageErrorf("an etcd password is given but no --etcd-username: give the user name too")
	}
	return nil
}

// explainAuth says what an etcd authentication or authorization error
// means, naming the flag to fix; fatal is true when no retry can fix it.
// It returns "" for other errors.
func explainAuth(o *Options, err error) (why string, fatal bool) {
	pw := "--etcd-password-file " + o.EtcdPasswordFile
	if o.EtcdPasswordFile == "" {
		pw = "--etcd-password (or LEASED_ETCD_PASSWORD)"
	}
	switch e := rpctypes.Error(err); {
	case errors.Is(e, rpctypes.ErrAuthFailed):
		return fmt.Sprintf("etcd refused the login of user %q: check --etcd-username and the password (from %s)", o.EtcdUsername, pw), true
	case errors.Is(e, rpctypes.ErrUserEmpty) && o.EtcdUsername == "":
		return "etcd has authentication enabled: give --etcd-username and the password (--etcd-password-file or LEASED_ETCD_PASSWORD)", true
	case errors.Is(e, rpctypes.ErrPermissionDenied):
		user := "this host's etcd user"
		if o.EtcdUsername != "" {
			user = fmt.Sprintf("etcd user %q", o.EtcdUsername)
		}
		return fmt.Sprintf("%s may not read %s: grant it a role with readwrite on the prefix (etcdctl role grant-permission ROLE --prefix=true readwrite %s/)", user, o.EtcdPrefix, strings.TrimSuffix(o.EtcdPrefix, "/")), false
	case errors.Is(e, rpctypes.ErrUserEmpty), errors.Is(e, rpctypes.ErrInvalidAuthToken), errors.Is(e, rpctypes.ErrAuthOldRevision):
		return "etcd did not accept this host's auth token (etcd restarted or its auth changed); retrying with a new one", false
	}
	return "", false
}

// WhyEtcd says in an operator's terms why a request to etcd failed, and
// whether no retry can fix it.
func WhyEtcd(o *Options, err error) (why string, fatal bool) {
	var ce *connError
	if errors.As(err, &ce) {
		return ce.why + " (" + ce.cause + ")", false
	}
	if why, fatal := explainAuth(o, err); why != "" {
		return why, fatal
	}
	if errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded {
		return "etcd at " + o.EtcdEndpoints + " accepts connections but did not answer in time (has the cluster lost its quorum or leader? check etcdctl endpoint status)", false
	}
	if status.Code(err) == codes.Unavailable {
		return "etcd at " + o.EtcdEndpoints + " is unavailable: " + err.Error(), false
	}
	return err.Error(), false
}

// Monitor timing (variables for tests).
var (
	// etcdCheckTimeout bounds one check request; the first check ends
	// (and says why) within it plus the time probe takes per endpoint.
	etcdCheckTimeout = 5 * time.Second
	// etcdRecheck is the pause between checks while etcd cannot be used.
	etcdRecheck = 3 * time.Second
	// etcdRepeat is the least time between two lines about one outage.
	etcdRepeat = 30 * time.Second
)

// etcdMonitor tells the operator whether etcd can be used, at the default
// verbosity: while the agent has never reached etcd, the reason at once and
// then at most one line every etcdRepeat; once it had, one line when etcd
// is lost (and another only when the reason changes, at most every
// etcdRepeat) and one when it is back, with the outage's length. It makes
// one request per etcdRecheck while etcd is down, and none while the gRPC
// connection stays ready.
type etcdMonitor struct {
	o    *Options
	now  func() time.Time
	down atomic.Bool // etcd cannot be used (as of the last check)

	mu       sync.Mutex
	since    time.Time // start of the outage (the monitor's start until first reached)
	lastLine time.Time
	lastWhy  string
	why      string // why the last check failed ("" after one succeeded)
	changed  chan struct{}
	reached  bool      // etcd answered at least once
	unready  time.Time // when the gRPC connection last left the ready state
}

func newEtcdMonitor(o *Options) *etcdMonitor {
	m := &etcdMonitor{o: o, now: time.Now, changed: make(chan struct{}, 1)}
	m.since = m.now()
	return m
}

// Why says why the last check found etcd unusable, "" when it answered
// (or the monitor is nil).
func (m *etcdMonitor) Why() string {
	if m == nil {
		return ""
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.why
}

// Changed receives when Why changes (nil for a nil monitor: never).
func (m *etcdMonitor) Changed() <-chan struct{} {
	if m == nil {
		return nil
	}
	return m.changed
}

// notify signals Changed without blocking; m.mu is held.
func (m *etcdMonitor) notify() {
	select {
	case m.changed <- struct{}{}:
	default:
	}
}

// Down reports whether the last check found etcd unusable.
func (m *etcdMonitor) Down() bool { return m != nil && m.down.Load() }

// quiet reports whether err is a failed etcd request that the monitor has
// already explained: the caller logs it at -v=2 only.
func (m *etcdMonitor) quiet(err error) bool {
	if !m.Down() {
		return false
	}
	var ce *connError
	c := status.Code(err)
	return errors.As(err, &ce) || errors.Is(err, context.DeadlineExceeded) || c == codes.Unavailable || c == codes.DeadlineExceeded
}

// failed records a failed check and logs per the monitor's contract.
func (m *etcdMonitor) failed(why string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	if why != m.why {
		m.why = why
		m.notify()
	}
	wasDown := m.down.Swap(true)
	metrics.EtcdReachable.Set(0)
	switch {
	case !m.reached && m.lastLine.IsZero():
		klog.ErrorS(nil, "cannot use etcd; retrying", "why", why, "endpoints", m.o.EtcdEndpoints)
	case !m.reached && now.Sub(m.lastLine) >= etcdRepeat:
		klog.ErrorS(nil, "still cannot use etcd; retrying", "for", now.Sub(m.since).Round(time.Second), "why", why)
	case m.reached && !wasDown:
		m.since = now
		if !m.unready.IsZero() {
			m.since = m.unready // the outage began before the check failed
		}
		klog.ErrorS(nil, "lost the connection to etcd; the datapath stays as it is, retrying", "why", why, "endpoints", m.o.EtcdEndpoints)
	case m.reached && why != m.lastWhy && now.Sub(m.lastLine) >= etcdRepeat:
		klog.ErrorS(nil, "still cannot use etcd; retrying", "for", now.Sub(m.since).Round(time.Second), "why", why)
	default:
		klog.V(2).InfoS("etcd check failed", "why", why)
		return
	}
	m.lastLine, m.lastWhy = now, why
}

// ok records a check that succeeded.
func (m *etcdMonitor) ok() {
	m.mu.Lock()
	defer m.mu.Unlock()
	metrics.EtcdReachable.Set(1)
	if m.down.Swap(false) {
		d := m.now().Sub(m.since).Round(time.Second)
		if m.reached {
			klog.InfoS("etcd is back", "outage", d)
		} else {
			klog.InfoS("reached etcd", "after", d)
		}
	}
	m.reached = true
	if m.why != "" {
		m.notify()
	}
	m.lastLine, m.lastWhy, m.why = time.Time{}, "", ""
}

// check makes one small request (the config key, count only) and returns
// its error.
func (m *etcdMonitor) check(ctx context.Context, cli *clientv3.Client) error {
	cctx, cancel := context.WithTimeout(ctx, etcdCheckTimeout)
	defer cancel()
	_, err := cli.Get(cctx, lease.NewKeys(m.o.EtcdPrefix).Config(), clientv3.WithCountOnly())
	return err
}

// run checks etcd until ctx is done: at once, then whenever the gRPC
// connection leaves the ready state, and every etcdRecheck while etcd
// cannot be used. When the failure is one no retry can fix (wrong
// password, authentication needed but no user) it calls stop with a
// usageError and returns.
func (m *etcdMonitor) run(ctx context.Context, cli *clientv3.Client, stop context.CancelCauseFunc) {
	conn := cli.ActiveConnection()
	for ctx.Err() == nil {
		err := m.check(ctx, cli)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			m.ok()
			for conn.GetState() == connectivity.Ready {
				if !conn.WaitForStateChange(ctx, connectivity.Ready) {
					return
				}
			}
			m.mu.Lock()
			m.unready = m.now()
			m.mu.Unlock()
			continue
		}
		why, fatal := WhyEtcd(m.o, err)
		if fatal {
			stop(&usageError{why + " (" + err.Error() + ")"})
			return
		}
		m.failed(why)
		t := time.NewTimer(etcdRecheck)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// connect builds the etcd client. With a user name, building it
// authenticates, which needs etcd: connect retries until etcd answers,
// saying why it cannot through the monitor, and fails at once on what no
// retry fixes (a usageError).
func (m *etcdMonitor) connect(ctx context.Context) (*clientv3.Client, error) {
	for {
		cli, err := NewEtcdClient(m.o)
		if err == nil {
			return cli, nil
		}
		var ce *connError
		if ExitCode(err) == 2 || !errors.As(err, &ce) && !errors.Is(err, context.DeadlineExceeded) {
			return nil, err
		}
		why, _ := WhyEtcd(m.o, err)
		m.failed(why)
		t := time.NewTimer(etcdRecheck)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}
