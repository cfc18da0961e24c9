package lab

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestJoinTraceReadsAgentLines checks that the bench reads the agent's
// hop trace as klog writes it and attributes a join to the span it
// overlapped.
func TestJoinTraceReadsAgentLines(t *testing.T) {
	base := time.Unix(1_800_000_000, 0)
	ns := func(ms float64) int64 { return base.Add(time.Duration(ms * float64(time.Millisecond))).UnixNano() }
	line := func(s string, a ...any) string {
		return `I1207 21:49:32.254070   27950 hoptrace.go:130] ` + fmt.Sprintf(s, a...)
	}
	agentLog := strings.Join([]string{
		line(`"ready" node="host1" peers=5000`),
		line(`"hop trace" node="peer-7" watch=%d loop=%d peers=%d apply=%d kernel=%d acked=%d done=%d gc=0 events=1 batch=1`,
			ns(2), ns(2.1), ns(2.2), ns(2.3), ns(2.4), ns(2.6), ns(2.8)),
		line(`"hop span" what="host check" start=%d end=%d`, ns(1), ns(50)),
	}, "\n")
	hops, spans := agentHops(agentLog)
	h, ok := hops["peer-7"]
	if !ok || h["watch"] != ns(2) || h["acked"] != ns(2.6) || h["events"] != 1 {
		t.Fatalf("peer-7's stamps: %v", hops)
	}
	if len(spans) != 1 || spans[0].what != "host check" || spans[0].end != ns(50) {
		t.Fatalf("spans: %+v", spans)
	}
	var out []string
	logf := func(f string, a ...any) { out = append(out, fmt.Sprintf(f, a...)) }
	j := joinTimes{node: "peer-7", sent: base, answered: base.Add(time.Millisecond), seen: base.Add(3 * time.Millisecond)}
	logJoinTrace(logf, []joinTimes{j}, nil, agentLog)
	text := strings.Join(out, "\n")
	for _, want := range []string{"hop trace over 1 of 1 joins", "sent     → answered    1.00", "kernel   → acked       0.20", "host check 49.0ms"} {
		if !strings.Contains(text, want) {
			t.Errorf("no %q in:\n%s", want, text)
		}
	}
}
