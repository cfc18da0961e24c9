package main

import (
	"context"
	"os"
	"runtime"
	"runtime/pprof"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/leased/leased/pkg/metrics"
)

// writeHeapWhenReady writes the heap profile to path once the agent first
// reports itself ready (leased_ready = 1, what /readyz and systemd's
// READY=1 report), for performance work (LEASED_MEMPROFILE). It gives up
// when ctx ends first.
func writeHeapWhenReady(ctx context.Context, path string) {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		var m dto.Metric
		if metrics.Ready.Write(&m) == nil && m.GetGauge().GetValue() == 1 {
			break
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return
	}
	defer f.Close()
	runtime.GC()
	pprof.Lookup("heap").WriteTo(f, 0) //nolint:errcheck // best effort
}
