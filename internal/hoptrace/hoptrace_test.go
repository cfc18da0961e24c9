package hoptrace

import (
	"testing"
	"time"
)

// names returns the stage names of a flushed line, in order.
func names(kv []any) (node string, stages []string) {
	node = kv[1].(string)
	for i := 2; i+1 < len(kv); i += 2 {
		stages = append(stages, kv[i].(string))
	}
	return node, stages
}

func TestStagesFollowTheChange(t *testing.T) {
	On = true
	t.Cleanup(func() { On = false; clear(arrived); clear(taken) })

	Arrived("a", 1)
	Stage(Peers) // before the loop took it: not a's
	Taken("a")
	Stage(Peers)
	Arrived("b", 1) // arrives while a's step runs
	Stage(Apply)
	Stage(Apply) // once per stage
	Stage(Kernel)
	Stage(Acked)
	Taken("c") // never arrived: not traced
	out := flush(time.Now())
	if len(out) != 1 {
		t.Fatalf("flushed %d changes, want a's only: %v", len(out), out)
	}
	node, stages := names(out[0])
	want := []string{"watch", "loop", Peers, Apply, Kernel, Acked, "done", "gc", "events", "batch"}
	if node != "a" || !equal(stages, want) {
		t.Fatalf("a's line: node %q stages %v, want %v", node, stages, want)
	}
	for i := 3; i+2 < 2+2*7; i += 2 { // the instants are in order
		if out[0][i].(int64) > out[0][i+2].(int64) {
			t.Errorf("%v at %d after %v at %d", out[0][i-1], out[0][i], out[0][i+1], out[0][i+2])
		}
	}

	// b's step: only the stages after the loop took it.
	Taken("b")
	Stage(Peers)
	out = flush(time.Now())
	if len(out) != 1 {
		t.Fatalf("flushed %d changes, want b's: %v", len(out), out)
	}
	if node, stages := names(out[0]); node != "b" || !equal(stages, []string{"watch", "loop", Peers, "done", "gc", "events", "batch"}) {
		t.Fatalf("b's line: node %q stages %v", node, stages)
	}
	if out := flush(time.Now()); len(out) != 0 {
		t.Fatalf("flushed again: %v", out)
	}
}

func TestOffRecordsNothing(t *testing.T) {
	On = false
	Arrived("a", 1)
	Taken("a")
	Stage(Peers)
	if len(arrived)+len(taken) != 0 {
		t.Fatalf("recorded while off: %v %v", arrived, taken)
	}
}

func TestEnvOn(t *testing.T) {
	for _, c := range []struct {
		v  string
		on bool
	}{{"", false}, {"hops", true}, {"gc, hops", true}, {"hop", false}, {"HOPS", false}} {
		if got := envOn(c.v); got != c.on {
			t.Errorf("LEASED_TRACE=%q: on %v, want %v", c.v, got, c.on)
		}
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
