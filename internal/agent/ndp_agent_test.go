package agent

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/internal/testutil/etcdtest"
	"github.com/leased/leased/pkg/backend"
	"github.com/leased/leased/pkg/lease"
)

// answeringRecorder is a recorder that answers for the host's lease on the
// link, as proxy-ndp does, and records the order of the calls the agent
// makes: "answer", "start", "withdraw", "handoff" and "run ended".
type answeringRecorder struct {
	recorder
	emu    sync.Mutex
	events []string
}

func (r *answeringRecorder) event(e string) {
	r.emu.Lock()
	defer r.emu.Unlock()
	r.events = append(r.events, e)
}

func (r *answeringRecorder) log() []string {
	r.emu.Lock()
	defer r.emu.Unlock()
	return slices.Clone(r.events)
}

func (r *answeringRecorder) Start(ctx context.Context, l backend.Local) error {
	r.event("start")
	return r.recorder.Start(ctx, l)
}
func (r *answeringRecorder) Answer(backend.Local) error { r.event("answer"); return nil }
func (r *answeringRecorder) Withdraw()                  { r.event("withdraw") }
func (r *answeringRecorder) Handoff()                   { r.event("handoff") }
func (r *answeringRecorder) Run(ctx context.Context) error {
	<-ctx.Done()
	r.event("run ended")
	return nil
}

// A backend that answers on the link (proxy-ndp) answers as soon as the
// lease is claimed, before it is started; stops answering when the host's
// own lease keys are deleted, and starts again once they are claimed
// again; and, when the agent stops with its lease held, is told to keep
// answering before its Run ends.
func TestAgentAnsweringBackendLifetime(t *testing.T) {
	srv, cli := etcdtest.Start(t)
	etcdtest.Put(t, cli, cfgKey, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48"}`)
	rec := &answeringRecorder{}
	ia := newIdleAgent(t, srv.ClientURL, "a", "192.168.1.1", rec)
	ctx, cancel := context.WithCancel(context.Background())
	ia.run(ctx)
	t.Cleanup(func() { cancel(); <-ia.done })
	testutil.Eventually(t, 20*time.Second, "the backend started", func() bool { return slices.Contains(rec.log(), "start") })
	if got := rec.log(); got[0] != "answer" {
		t.Errorf("calls %v: want answering right after the claim, before the start", got)
	}

	n := len(rec.log())
	if _, err := cli.Delete(context.Background(), lease.NewKeys("").Lease("a")); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "a withdraw, then a start with the lease claimed again", func() bool {
		after := rec.log()[n:]
		i := slices.Index(after, "withdraw")
		return i >= 0 && slices.Contains(after[i:], "start")
	})

	cancel()
	<-ia.done
	testutil.Eventually(t, 20*time.Second, "the backend's Run ended", func() bool { return slices.Contains(rec.log(), "run ended") })
	if got := strings.Join(rec.log(), ","); !strings.HasSuffix(got, "handoff,run ended") {
		t.Errorf("calls %s: want a handoff before the backend's Run ends on stop", got)
	}
}
