package testutil

import (
	"testing"
	"time"
)

// Condition is what Eventually and Poll wait for: a func() bool that is
// true once the state is reached, or a func() error that is nil once it is
// (its error says what is still missing and is shown when time runs out).
type Condition interface {
	func() bool | func() error
}

// Poll calls cond until it holds or timeout has passed, and returns nil
// once it holds, else cond's last error (for a func() bool, one that says
// it never became true). cond is called at least once; the first calls
// come quickly (from 10 ms apart) and later ones every 100 ms.
func Poll[C Condition](timeout time.Duration, cond C) error {
	check := func() error {
		switch c := any(cond).(type) {
		case func() bool:
			if c() {
				return nil
			}
			return errNotYet
		case func() error:
			return c()
		}
		panic("unreachable")
	}
	deadline := time.Now().Add(timeout)
	wait := 10 * time.Millisecond
	for {
		err := check()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(wait)
		wait = min(2*wait, 100*time.Millisecond)
	}
}

type notYet struct{}

func (notYet) Error() string { return "still false" }

var errNotYet error = notYet{}

// Eventually waits up to timeout for cond (see Poll) and fails t with what
// (the state waited for), the timeout and cond's last error if it never
// holds.
func Eventually[C Condition](t testing.TB, timeout time.Duration, what string, cond C) {
	t.Helper()
	if err := Poll(timeout, cond); err != nil {
		if err == errNotYet {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		t.Fatalf("%s: still not true after %s: %v", what, timeout, err)
	}
}
