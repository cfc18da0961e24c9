// Package hoptrace records, for performance work, when each peer change
// passes each stage of the agent on its way from the etcd watch to the
// kernel. It is on when the agent starts with LEASED_TRACE=hops and costs
// one branch on a package variable per stage when off.
//
// A change is keyed by the node name of its lease. The watch marks a key
// when etcd's response arrives (Arrived), the agent's loop when it takes
// the batch (Taken); the stages after that (Stage) stamp every key the
// loop has taken and not yet flushed, and Flush logs one line per key:
//
//	"hop trace" node=peer-7 watch=<unix ns> loop=… peers=… apply=… kernel=… acked=… done=… gc=<cycles during> events=<in its watch response>
//
// Spans of other work that may delay a change (the host check, a full
// pass) are logged as they end ("hop span"), with start and end in unix
// nanoseconds, so that a reader can tell which changes they overlapped.
// The times are the wall clock, comparable with another process's on the
// same machine (internal/lab's bench correlates them with its own).
package hoptrace

import (
	"os"
	"runtime/metrics"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// On reports whether tracing is enabled (LEASED_TRACE=hops at start).
var On = envOn(os.Getenv("LEASED_TRACE"))

func envOn(v string) bool {
	for _, w := range strings.Split(v, ",") {
		if strings.TrimSpace(w) == "hops" {
			return true
		}
	}
	return false
}

// Stages after Taken, in the order a change passes them.
const (
	Peers  = "peers"  // the peer tracker computed the change
	Apply  = "apply"  // the backend holds its lock for the change
	Kernel = "kernel" // the backend sends the change's kernel requests
	Acked  = "acked"  // the kernel answered them
)

type hop struct {
	arrived, taken time.Time
	events         int
	gc0            uint64
	stages         []stamp
}

type stamp struct {
	name string
	at   time.Time
}

var (
	mu      sync.Mutex
	arrived = map[string]*hop{} // by node, until the loop takes it
	taken   = map[string]*hop{} // by node, until Flush
)

// Arrived records that a watch response with events changes for key
// arrived now.
func Arrived(key string, events int) {
	if !On {
		return
	}
	now := time.Now()
	gc := gcCycles()
	mu.Lock()
	defer mu.Unlock()
	if _, ok := arrived[key]; !ok && len(arrived) < 4096 {
		arrived[key] = &hop{arrived: now, events: events, gc0: gc}
	}
}

// Taken records that the agent's loop took the change for key.
func Taken(key string) {
	if !On {
		return
	}
	now := time.Now()
	mu.Lock()
	defer mu.Unlock()
	h, ok := arrived[key]
	if !ok {
		return
	}
	delete(arrived, key)
	h.taken = now
	taken[key] = h
}

// Stage stamps every taken change that has not passed name yet.
func Stage(name string) {
	if !On {
		return
	}
	now := time.Now()
	mu.Lock()
	defer mu.Unlock()
	for _, h := range taken {
		if len(h.stages) == 0 || h.stages[len(h.stages)-1].name != name {
			h.stages = append(h.stages, stamp{name, now})
		}
	}
}

// Flush logs and forgets every taken change.
func Flush() {
	if !On {
		return
	}
	for _, kv := range flush(time.Now()) {
		klog.InfoS("hop trace", kv...)
	}
}

// flush forgets every taken change and returns the key/value pairs of
// its "hop trace" line, the stages in the order they were stamped.
func flush(now time.Time) [][]any {
	gc := gcCycles()
	mu.Lock()
	defer mu.Unlock()
	var out [][]any
	for key, h := range taken {
		kv := []any{"node", key, "watch", h.arrived.UnixNano(), "loop", h.taken.UnixNano()}
		for _, s := range h.stages {
			kv = append(kv, s.name, s.at.UnixNano())
		}
		kv = append(kv, "done", now.UnixNano(), "gc", gc-h.gc0, "events", h.events, "batch", len(taken))
		out = append(out, kv)
	}
	clear(taken)
	return out
}

// Span logs that work named what ran from start until now.
func Span(what string, start time.Time) {
	if !On {
		return
	}
	klog.InfoS("hop span", "what", what, "start", start.UnixNano(), "end", time.Now().UnixNano())
}

var gcSample = []metrics.Sample{{Name: "/gc/cycles/total:gc-cycles"}}

func gcCycles() uint64 {
	mu.Lock() // gcSample is shared
	metrics.Read(gcSample)
	v := gcSample[0].Value
	mu.Unlock()
	if v.Kind() != metrics.KindUint64 {
		return 0
	}
	return v.Uint64()
}
