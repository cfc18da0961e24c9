package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// The agent holds a shared flock(2) on agent.lock, next to --subnet-file,
// for as long as it runs; `leased teardown` takes the exclusive lock, so it
// cannot run while an agent with the same --subnet-file runs, and an agent
// started during a teardown waits for it to finish. The kernel drops the
// lock when the process ends however it ends (SIGKILL included), so a
// crashed agent leaves no stale lock behind.

// agentLockFile is the lock file of the agents that use o.SubnetFile.
func (o *Options) agentLockFile() string {
	return filepath.Join(filepath.Dir(o.SubnetFile), "agent.lock")
}

// holdAgentLock takes the agent's shared lock and keeps it until the
// process exits. While a teardown holds the exclusive lock it waits (until
// ctx ends). A lock that cannot be taken for another reason is logged and
// not waited for: the agent runs without it (teardown then cannot tell
// that it runs).
func holdAgentLock(ctx context.Context, o *Options) error {
	path := o.agentLockFile()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		klog.ErrorS(err, "cannot create the agent lock file; running without it, so leased teardown cannot tell that this agent runs", "path", path)
		return nil
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		klog.ErrorS(err, "cannot create the agent lock file; running without it, so leased teardown cannot tell that this agent runs", "path", path)
		return nil
	}
	logged := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
		if err == nil {
			agentLock = f // held until the process exits
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			klog.ErrorS(err, "cannot lock the agent lock file; running without it, so leased teardown cannot tell that this agent runs", "path", path)
			return nil
		}
		if !logged {
			klog.InfoS("leased teardown is running for this host; waiting for it to finish", "lock", path)
			logged = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// agentLock keeps the agent's lock file open (and so locked).
var agentLock *os.File
