package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// NewEtcdClient builds the etcd client from the options. It does not wait
// for etcd to be reachable (callers retry their own requests), except with
// a user name, when it authenticates (within DialTimeout). Flags no retry
// can fix, and a refused user or password, give a usageError.
func NewEtcdClient(o *Options) (*clientv3.Client, error) {
	if err := o.ValidateEtcd(); err != nil {
		return nil, err
	}
	eps := strings.Split(o.EtcdEndpoints, ",")
	cfg := clientv3.Config{
		Endpoints:   eps,
		DialTimeout: 5 * time.Second,
		// gRPC keepalive notices a dead connection (a cut network, a
		// vanished member) in seconds instead of waiting for TCP to give
		// up. etcd refuses pings more often than every 5s by default.
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		Username:             o.EtcdUsername,
		Password:             o.EtcdPassword,
		// The client's own zap logger is noisy about every retry; leased
		// logs what matters itself.
		Logger: zap.NewNop(),
	}
	if o.EtcdPasswordFile != "" {
		b, err := os.ReadFile(o.EtcdPasswordFile)
		if err != nil {
			return nil, fmt.Errorf("reading --etcd-password-file: %w", err)
		}
		cfg.Password = strings.TrimRight(string(b), "\r\n")
	}
	tlsWanted := o.EtcdCAFile != "" || o.EtcdCertFile != "" || o.EtcdKeyFile != ""
	for _, ep := range eps {
		if strings.HasPrefix(ep, "https://") {
			tlsWanted = true
		}
	}
	if tlsWanted {
		if (o.EtcdCertFile == "") != (o.EtcdKeyFile == "") {
			return nil, fmt.Errorf("--etcd-certfile and --etcd-keyfile go together: give both or neither")
		}
		// The client certificate is read again at every handshake, so a
		// renewed certificate is used without a restart. Logger must be
		// set: TLSInfo logs through it when a file has gone missing.
		info := transport.TLSInfo{CertFile: o.EtcdCertFile, KeyFile: o.EtcdKeyFile, TrustedCAFile: o.EtcdCAFile, Logger: zap.NewNop()}
		var tc *tls.Config
		var err error
		if info.Empty() && o.EtcdCAFile == "" {
			tc = &tls.Config{MinVersion: tls.VersionTLS12}
		} else if tc, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("loading etcd TLS files (ca %q, cert %q, key %q): %w", o.EtcdCAFile, o.EtcdCertFile, o.EtcdKeyFile, err)
		}
		cfg.TLS = tc
	}
	cfg.DialOptions = append(cfg.DialOptions, grpc.WithChainUnaryInterceptor(explainConnErrors(o, eps, cfg.TLS)),
		// gRPC's default reconnect backoff grows to 2 minutes, so after a
		// long outage the agent would notice etcd's return that late. 10s
		// (with gRPC's jitter) bounds the delay and spreads a fleet's
		// reconnections.
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
			BaseDelay: time.Second, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 10 * time.Second}, MinConnectTimeout: 20 * time.Second}))
	cli, err := clientv3.New(cfg)
	if err != nil {
		why, fatal := WhyEtcd(o, err)
		if fatal {
			return nil, &usageError{why + " (" + err.Error() + ")"}
		}
		// With a user name, New authenticates and so needs etcd.
		var ce *connError
		if errors.As(err, &ce) {
			return nil, fmt.Errorf("authenticating to etcd as %q: %w", o.EtcdUsername, err)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("authenticating to etcd as %q: %s: %w", o.EtcdUsername, why, err)
		}
		return nil, fmt.Errorf("creating etcd client for %s: %w", o.EtcdEndpoints, err)
	}
	return cli, nil
}

// connError is a request that timed out because no connection to etcd
// could be made. It says why (gRPC only keeps the last connection error in
// the status text, and the etcd client replaces a timed-out status with the
// bare context error), naming the flag or file at fault where it can. It
// wraps the context error, so errors.Is(err, context.DeadlineExceeded)
// holds.
type connError struct {
	why   string // what is wrong, for an operator
	cause string // the connection error as gRPC reported it
	ctx   error
}

func (e *connError) Error() string {
	return fmt.Sprintf("connecting to etcd: %s (%s): %v", e.why, e.cause, e.ctx)
}

func (e *connError) Unwrap() error { return e.ctx }

// explainConnErrors returns an interceptor that turns the timeout of a
// request that never got a connection into a connError. It runs inside the
// etcd client's retry interceptor and only acts once the caller's context is
// done, so the client's own retries are unchanged.
func explainConnErrors(o *Options, eps []string, tc *tls.Config) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		err := invoker(ctx, method, req, reply, cc, opts...)
		if err == nil || ctx.Err() == nil {
			return err
		}
		st, ok := status.FromError(err)
		if !ok || st.Code() != codes.DeadlineExceeded {
			return err
		}
		var cause string
		if i := strings.Index(st.Message(), "connection error: "); i >= 0 {
			cause = strings.TrimSpace(st.Message()[i+len("connection error: "):])
			cause = strings.Trim(strings.TrimPrefix(cause, "desc = "), `"`)
		} else if cause = probe(eps, tc); cause == "" {
			// gRPC kept no connection error (it was between attempts), and a
			// fresh connection works: the request was merely slow.
			return err
		}
		return &connError{why: explainConn(o, cause), cause: cause, ctx: ctx.Err()}
	}
}

// probe connects to each endpoint as the client would — TCP, then the TLS
// handshake for https:// — and returns the first error, or "" when every
// endpoint accepts. Reading briefly after the handshake catches a server
// that refuses the client certificate: with TLS 1.3 it says so only after
// the client's side of the handshake is done. It takes at most ~1.5s per
// endpoint.
func probe(eps []string, tc *tls.Config) string {
	for _, ep := range eps {
		u, err := url.Parse(ep)
		if err != nil || u.Host == "" {
			continue
		}
		if u.Scheme != "http" && u.Scheme != "https" {
			continue
		}
		c, err := net.DialTimeout("tcp", u.Host, time.Second)
		if err != nil {
			return err.Error()
		}
		if u.Scheme == "http" || tc == nil {
			c.Close()
			continue
		}
		cfg := tc.Clone()
		if cfg.ServerName == "" {
			cfg.ServerName = u.Hostname()
		}
		cfg.NextProtos = []string{"h2"}
		tcn := tls.Client(c, cfg)
		tcn.SetDeadline(time.Now().Add(time.Second))
		err = tcn.Handshake()
		if err == nil {
			tcn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			_, err = tcn.Read(make([]byte, 1))
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				err = nil // the server waits for us: it accepted the handshake
			}
			if err != nil && !strings.Contains(err.Error(), "tls:") {
				err = nil // a server frame or a close, not a TLS refusal
			}
		}
		tcn.Close()
		if err != nil {
			return err.Error()
		}
	}
	return ""
}

// explainConn says in an operator's terms what a gRPC connection error
// means, naming the flag and file concerned.
func explainConn(o *Options, cause string) string {
	has := func(s string) bool { return strings.Contains(cause, s) }
	cert := "--etcd-certfile " + o.EtcdCertFile
	switch {
	case has("x509: certificate signed by unknown authority"):
		if o.EtcdCAFile == "" {
			return "etcd's server certificate is not signed by a CA this host trusts: give the CA that signed it with --etcd-cafile"
		}
		return "etcd's server certificate is not signed by the CA in --etcd-cafile " + o.EtcdCAFile
	case has("x509: certificate has expired or is not yet valid"):
		return "etcd's server certificate has expired or is not yet valid (check the server's certificate and this host's clock)"
	case has("x509: certificate is valid for"):
		return "etcd's server certificate does not name the host of --etcd-endpoints " + o.EtcdEndpoints
	case has("remote error: tls: expired certificate"):
		return "etcd refused the client certificate " + cert + ": " + certValidity(o.EtcdCertFile)
	case has("remote error: tls: unknown certificate authority"):
		return "etcd refused the client certificate " + cert + ": it is not signed by a CA etcd trusts (etcd's --trusted-ca-file)"
	case has("remote error: tls: certificate required"):
		if o.EtcdCertFile == "" {
			return "etcd requires a client certificate: give --etcd-certfile and --etcd-keyfile"
		}
		return "etcd did not get the client certificate " + cert
	case has("remote error: tls: bad certificate"), has("remote error: tls: unsupported certificate"):
		return "etcd refused the client certificate " + cert + " (is it a client certificate, with the clientAuth key usage?)"
	case has("first record does not look like a TLS handshake"):
		return "etcd at " + o.EtcdEndpoints + " does not speak TLS: use http:// endpoints or enable TLS on etcd"
	case (has("server preface") || has("http2: frame too large")) && strings.Contains(o.EtcdEndpoints, "http://"):
		return "etcd at " + o.EtcdEndpoints + " does not answer plaintext gRPC (does it use TLS? then write https:// endpoints and give --etcd-cafile)"
	case has("authentication handshake failed"), has("remote error: tls:"):
		return "the TLS handshake with etcd failed (check --etcd-cafile, --etcd-certfile and --etcd-keyfile)"
	case has("connection refused"), has("no route to host"), has("i/o timeout"), has("network is unreachable"), has("no such file or directory"):
		return "etcd at " + o.EtcdEndpoints + " is not reachable (is it up? check --etcd-endpoints)"
	}
	return "no connection to etcd at " + o.EtcdEndpoints
}

// certValidity describes the validity period of the first certificate in
// file, e.g. "it expired at 2026-01-02T03:04:05Z".
func certValidity(file string) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return "it has expired (reading it: " + err.Error() + ")"
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return "it has expired"
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return "it has expired"
	}
	now := time.Now()
	switch {
	case now.After(c.NotAfter):
		return "it expired at " + c.NotAfter.UTC().Format(time.RFC3339)
	case now.Before(c.NotBefore):
		return "it is not valid before " + c.NotBefore.UTC().Format(time.RFC3339) + " (check this host's clock)"
	}
	return "etcd says it has expired, yet it is valid here until " + c.NotAfter.UTC().Format(time.RFC3339) + " (check the clocks)"
}
