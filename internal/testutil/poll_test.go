package testutil

import (
	"errors"
	"testing"
	"time"
)

func TestPoll(t *testing.T) {
	errMissing := errors.New("missing")
	for _, c := range []struct {
		name string
		run  func(calls *int) error
		want error
	}{
		{"bool true on the third call", func(calls *int) error {
			return Poll(10*time.Second, func() bool { *calls++; return *calls == 3 })
		}, nil},
		{"error nil on the third call", func(calls *int) error {
			return Poll(10*time.Second, func() error {
				if *calls++; *calls < 3 {
					return errMissing
				}
				return nil
			})
		}, nil},
		{"bool never true", func(calls *int) error {
			return Poll(50*time.Millisecond, func() bool { *calls++; return false })
		}, errNotYet},
		{"error never nil: the last error", func(calls *int) error {
			return Poll(50*time.Millisecond, func() error { *calls++; return errMissing })
		}, errMissing},
	} {
		t.Run(c.name, func(t *testing.T) {
			calls := 0
			if err := c.run(&calls); err != c.want {
				t.Errorf("Poll = %v, want %v", err, c.want)
			}
			if c.want == nil && calls != 3 {
				t.Errorf("cond called %d times, want 3 (Poll returns once it holds)", calls)
			}
			if c.want != nil && calls < 2 {
				t.Errorf("cond called %d times before the timeout, want it polled", calls)
			}
		})
	}
}
