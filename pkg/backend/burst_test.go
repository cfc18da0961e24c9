package backend

import (
	"context"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A subscription that overflows (ENOBUFS, as the netlink library reports
// it) while the agent programs many routes of its own does not start a
// full pass at once, on top of the burst's memory: the full pass is due at
// the next resync instead. Any other failure, or an overflow outside such
// a burst, starts one at once as before.
func TestOverflowDuringOwnBurstDefersFullPass(t *testing.T) {
	for _, tc := range []struct {
		name         string
		burst        bool
		err          error
		kick, defers bool
	}{
		{"overflow during own burst", true, fmt.Errorf("Receive failed: %v", unix.ENOBUFS), false, true},
		{"overflow without a burst", false, fmt.Errorf("Receive failed: %v", unix.ENOBUFS), true, false},
		{"other failure during a burst", true, fmt.Errorf("Receive failed: %v", unix.EBADF), true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, _ := newHostGWFake()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			second := make(chan struct{})
			calls := 0
			sub := func(ch chan<- int, done <-chan struct{}, onErr func(error)) error {
				calls++
				switch calls {
				case 1: // the subscription breaks
					go func() { onErr(tc.err); close(ch) }()
				case 2:
					close(second)
					fallthrough
				default:
					go func() { <-done; close(ch) }()
				}
				return nil
			}
			if tc.burst {
				defer e.burst(burstMin)()
			}
			finished := make(chan struct{})
			go func() { subscribe(ctx, e, "route", sub, func(int) bool { return false }); close(finished) }()
			defer func() { cancel(); <-finished }()
			select {
			case <-e.kick: // the first subscription's own request
			case <-time.After(30 * time.Second):
				t.Fatal("no pass requested at the first subscription")
			}
			select {
			case <-second:
			case <-time.After(30 * time.Second):
				t.Fatal("no second subscription after the failure")
			}
			if tc.kick {
				select {
				case <-e.kick:
				case <-time.After(30 * time.Second):
					t.Fatal("no pass requested after resubscribing")
				}
			} else {
				for deadline := time.Now().Add(30 * time.Second); !e.passDue.Load() && time.Now().Before(deadline); {
					time.Sleep(10 * time.Millisecond)
				}
				select {
				case <-e.kick:
					t.Error("a pass was requested at once after the overflow")
				default:
				}
			}
			if e.passDue.Load() != tc.defers {
				t.Errorf("full pass due at the next resync: %v, want %v", e.passDue.Load(), tc.defers)
			}
		})
	}
}
