package testutil

import (
	"bytes"
	"os"
	"sync"
	"testing"

	"k8s.io/klog/v2"
)

// SyncBuffer is a bytes.Buffer that several goroutines may write and read
// at once (a process's stdout and stderr, klog's writer, and the test).
// The zero value is ready to use.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// CaptureKlog sends klog's output (what leased logs, at the verbosity set)
// to the buffer it returns, instead of stderr, until the test ends.
func CaptureKlog(t testing.TB) *SyncBuffer {
	t.Helper()
	buf := &SyncBuffer{}
	klog.LogToStderr(false)
	klog.SetOutput(buf)
	t.Cleanup(func() {
		klog.Flush()
		klog.SetOutput(os.Stderr)
		klog.LogToStderr(true)
	})
	return buf
}
