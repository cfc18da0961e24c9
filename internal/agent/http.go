package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/klog/v2"
)

// health is what the HTTP endpoints report; the agent updates it.
type health struct {
	ready  atomic.Bool
	status atomic.Pointer[string]
}

func (h *health) set(ready bool, status string) {
	h.ready.Store(ready)
	h.status.Store(&status)
}

func (h *health) statusText() string {
	if s := h.status.Load(); s != nil {
		return *s
	}
	return "starting"
}

// serveHTTP serves /healthz (the process is alive), /readyz (200 once the
// lease is held, subnet.env written and the datapath applied, else 503 with
// what the agent waits for) and /metrics on addr until ctx is done.
func serveHTTP(ctx context.Context, addr string, h *health) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !h.ready.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintln(w, h.statusText())
	})
	mux.Handle("/metrics", promhttp.Handler())
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--metrics-addr %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx) //nolint:errcheck
	}()
	klog.InfoS("serving health and metrics", "addr", l.Addr().String())
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.ErrorS(err, "metrics server stopped")
		}
	}()
	return nil
}
