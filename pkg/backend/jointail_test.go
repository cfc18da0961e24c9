package backend

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestHostCheckDoesNotBlockPeerChanges: a peer change is applied while the
// periodic host check (its sysctls and iptables runs, tens to hundreds of
// milliseconds) is under way, instead of waiting for it.
func TestHostCheckDoesNotBlockPeerChanges(t *testing.T) {
	ns, _, ext := hostGWLab(t)
	ctx := context.Background()
	b := mustNew(t, `{"Type":"host-gw"}`, ext, "a", ns, Options{})
	if err := b.SetPeers(ctx, []Peer{peerB}); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx, localA()); err != nil {
		t.Fatal(err)
	}
	// Hold the host check inside setupHost, where its iptables runs are.
	b.hostMu.Lock()
	checked := make(chan struct{})
	go func() { defer close(checked); b.ensureHost() }()
	released := false
	release := func() {
		if !released {
			released = true
			b.hostMu.Unlock()
			<-checked
		}
	}
	t.Cleanup(release)
	// Wait until the check is inside setupHost, waiting for hostMu.
	for deadline := time.Now().Add(20 * time.Second); !inStack("(*engine).setupHost"); {
		if time.Now().After(deadline) {
			t.Fatal("the host check did not reach setupHost")
		}
		time.Sleep(time.Millisecond)
	}
	changed := make(chan error, 1)
	go func() { changed <- b.UpdatePeers(ctx, []Peer{peerC}, nil) }()
	select {
	case err := <-changed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		release()
		t.Fatal("UpdatePeers waited for the host check")
	}
	// The route is in the kernel before the host check ends.
	wantNH(t, ns, "10.100.5.0/24", "192.168.77.5")
	release()
}

// inStack reports whether some goroutine is in fn.
func inStack(fn string) bool {
	buf := make([]byte, 1<<20)
	return strings.Contains(string(buf[:runtime.Stack(buf, true)]), fn)
}
