package lab

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/pkg/lease"
)

// benchWatch records when a watch of the bench's own sees each lease key
// change. It runs in the lab etcd's process, over its unix socket, so
// the difference to the agent's watch stamp is the way from etcd to the
// agent: the agent's gRPC stream, its etcd client and its scheduling.
type benchWatch struct {
	mu   sync.Mutex
	seen map[string]time.Time
}

func startBenchWatch(ctx context.Context, cli *clientv3.Client) *benchWatch {
	w := &benchWatch{seen: map[string]time.Time{}}
	prefix := lease.NewKeys("").Leases()
	wch := cli.Watch(ctx, prefix, clientv3.WithPrefix())
	go func() {
		for resp := range wch {
			now := time.Now()
			w.mu.Lock()
			for _, ev := range resp.Events {
				node := strings.TrimPrefix(string(ev.Kv.Key), prefix)
				if _, ok := w.seen[node]; !ok {
					w.seen[node] = now
				}
			}
			w.mu.Unlock()
		}
	}()
	return w
}

func (w *benchWatch) at(node string) int64 {
	if w == nil {
		return 0
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if t, ok := w.seen[node]; ok {
		return t.UnixNano()
	}
	return 0
}

// joinTimes is what the bench sees of one timed join: the lease put sent
// and answered, the route announced, and its own process's garbage
// collections meanwhile (the lab's etcd runs in this process).
type joinTimes struct {
	node                 string
	sent, answered, seen time.Time
	gc                   uint64
}

// traceHops reports whether the bench runs with LEASED_TRACE=hops, which
// the agent inherits (internal/hoptrace).
func traceHops() bool {
	for _, w := range strings.Split(os.Getenv("LEASED_TRACE"), ",") {
		if strings.TrimSpace(w) == "hops" {
			return true
		}
	}
	return false
}

var benchGCSample = []metrics.Sample{{Name: "/gc/cycles/total:gc-cycles"}}

func benchGCCycles() uint64 {
	metrics.Read(benchGCSample)
	if benchGCSample[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return benchGCSample[0].Value.Uint64()
}

// hopStages are the agent's stamps of a join (internal/hoptrace), in order.
var hopStages = []string{"watch", "loop", "peers", "apply", "kernel", "acked", "done"}

var kvRE = regexp.MustCompile(`(\w+)=("[^"]*"|\S+)`)

// agentHops parses the agent log's "hop trace" and "hop span" lines.
func agentHops(agentLog string) (hops map[string]map[string]int64, spans []hopSpan) {
	hops = map[string]map[string]int64{}
	for _, line := range strings.Split(agentLog, "\n") {
		trace, span := strings.Contains(line, `"hop trace"`), strings.Contains(line, `"hop span"`)
		if !trace && !span {
			continue
		}
		kv := map[string]string{}
		for _, m := range kvRE.FindAllStringSubmatch(line, -1) {
			kv[m[1]] = strings.Trim(m[2], `"`)
		}
		num := func(k string) int64 { v, _ := strconv.ParseInt(kv[k], 10, 64); return v }
		if span {
			spans = append(spans, hopSpan{what: kv["what"], start: num("start"), end: num("end")})
			continue
		}
		h := map[string]int64{}
		for k := range kv {
			if k != "node" {
				h[k] = num(k)
			}
		}
		hops[kv["node"]] = h
	}
	return hops, spans
}

type hopSpan struct {
	what       string
	start, end int64 // unix ns
}

// logJoinTrace correlates the bench's times of each join with the agent's
// stamps and logs where the time went: each hop's p50/p99/max, and the
// slowest joins hop by hop with what they coincided with.
func logJoinTrace(log func(string, ...any), joins []joinTimes, bw *benchWatch, agentLog string) {
	hops, spans := agentHops(agentLog)
	type row struct {
		j     joinTimes
		h     map[string]int64
		total time.Duration
	}
	var rows []row
	for _, j := range joins {
		h, ok := hops[j.node]
		if !ok {
			continue
		}
		rows = append(rows, row{j, h, j.seen.Sub(j.sent)})
	}
	if len(rows) == 0 {
		log("hop trace: no agent stamps found (is the agent built with internal/hoptrace?)")
		return
	}
	// Each hop as a function of a row: the difference of two instants.
	at := func(r row, name string) int64 {
		switch name {
		case "sent":
			return r.j.sent.UnixNano()
		case "answered":
			return r.j.answered.UnixNano()
		case "seen":
			return r.j.seen.UnixNano()
		case "etcdw":
			return bw.at(r.j.node)
		}
		return r.h[name]
	}
	points := append(append([]string{"sent"}, hopStages...), "seen")
	type hopDef struct{ from, to string }
	var defs []hopDef
	defs = append(defs, hopDef{"sent", "answered"}, hopDef{"answered", "watch"}, hopDef{"sent", "etcdw"}, hopDef{"answered", "etcdw"}, hopDef{"etcdw", "watch"})
	for i := 0; i+1 < len(points); i++ {
		defs = append(defs, hopDef{points[i], points[i+1]})
	}
	// The route exists once the kernel acked it: sent → acked is the join
	// without the bench's own reading of the announcement (acked → seen).
	// watch → acked is the agent's own share.
	defs = append(defs, hopDef{"acked", "seen"}, hopDef{"sent", "acked"}, hopDef{"watch", "acked"})
	delta := func(r row, d hopDef) time.Duration {
		a, b := at(r, d.from), at(r, d.to)
		if a == 0 || b == 0 {
			return 0
		}
		return time.Duration(b - a)
	}
	log("hop trace over %d of %d joins (p50 / p99 / max, ms; etcdw: the bench's own watch, in etcd's process; < 0: the later point came first):", len(rows), len(joins))
	for _, d := range defs {
		v := make([]time.Duration, len(rows))
		for i, r := range rows {
			v[i] = delta(r, d)
		}
		slices.Sort(v)
		log("  %-8s → %-8s %7.2f %7.2f %7.2f", d.from, d.to, ms(v[len(v)/2]), ms(v[min(len(v)-1, len(v)*99/100)]), ms(v[len(v)-1]))
	}
	slices.SortFunc(rows, func(a, b row) int { return int(b.total - a.total) })
	log("slowest joins (ms per hop: %s; agent GCs, bench/etcd GCs, events in the watch response, changes in the step, spans overlapping):", strings.Join(points, " "))
	for _, r := range rows[:min(len(rows), 12)] {
		var parts []string
		for i := 0; i+1 < len(points); i++ {
			parts = append(parts, fmt.Sprintf("%.2f", ms(delta(r, hopDef{points[i], points[i+1]}))))
		}
		var over []string
		s, e := r.j.sent.UnixNano(), r.j.seen.UnixNano()
		for _, sp := range spans {
			if sp.start < e && sp.end > s {
				over = append(over, fmt.Sprintf("%s %.1fms", sp.what, ms(time.Duration(sp.end-sp.start))))
			}
		}
		log("  %s at %s total %.2f (put %.2f, bench watch %.2f): %s; gc %d/%d; events %d; batch %d; %s", r.j.node, r.j.sent.UTC().Format("15:04:05.000"), ms(r.total), ms(r.j.answered.Sub(r.j.sent)), ms(delta(r, hopDef{"sent", "etcdw"})),
			strings.Join(parts, " "), r.h["gc"], r.j.gc, r.h["events"], r.h["batch"], strings.Join(over, ", "))
	}
	// Joins that overlapped a span of other agent work against the rest.
	for _, what := range []string{"host check", "full pass"} {
		var in, out []time.Duration
		for _, r := range rows {
			s, e := r.j.sent.UnixNano(), r.j.seen.UnixNano()
			hit := false
			for _, sp := range spans {
				if sp.what == what && sp.start < e && sp.end > s {
					hit = true
				}
			}
			if hit {
				in = append(in, r.total)
			} else {
				out = append(out, r.total)
			}
		}
		if len(in) > 0 && len(out) > 0 {
			slices.Sort(in)
			slices.Sort(out)
			log("joins during a %s: %d, median %.2f ms, max %.2f ms; the others: %d, median %.2f ms, max %.2f ms", what,
				len(in), ms(in[len(in)/2]), ms(in[len(in)-1]), len(out), ms(out[len(out)/2]), ms(out[len(out)-1]))
		}
	}
	var hc, fp int
	var hcDur []time.Duration
	for _, sp := range spans {
		if sp.what == "host check" {
			hc++
			hcDur = append(hcDur, time.Duration(sp.end-sp.start))
		} else {
			fp++
		}
	}
	if len(hcDur) > 0 {
		slices.Sort(hcDur)
		log("spans in the agent's log: %d host checks (median %.1f ms, max %.1f ms), %d full passes", hc, ms(hcDur[len(hcDur)/2]), ms(hcDur[len(hcDur)-1]), fp)
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
