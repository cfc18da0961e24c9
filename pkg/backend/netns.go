package backend

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// nsExec runs work that depends on the calling thread's network namespace
// (/proc/sys/net writes, iptables commands) in the backend's namespace.
// An empty path means the agent's own namespace.
type nsExec struct {
	path string
}

// do runs fn on a thread switched into the namespace and switches back after.
// fn must not start goroutines that rely on the namespace; exec.Cmd forks
// from the calling thread, so commands it runs inherit the namespace.
func (n nsExec) do(fn func() error) error {
	if n.path == "" {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("getting current network namespace: %w", err)
	}
	defer orig.Close()
	target, err := netns.GetFromPath(n.path)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("opening network namespace %s: %w", n.path, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering network namespace %s: %w", n.path, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime discards it when the
		// goroutine exits, so no other goroutine runs in the wrong namespace.
		return errors.Join(ferr, fmt.Errorf("leaving network namespace %s: %w", n.path, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// handle opens the netlink handle bound to the namespace.
func (n nsExec) handle() (*netlink.Handle, error) {
	if n.path == "" {
		return netlink.NewHandle()
	}
	ns, err := netns.GetFromPath(n.path)
	if err != nil {
		return nil, fmt.Errorf("opening network namespace %s: %w", n.path, err)
	}
	defer ns.Close()
	return netlink.NewHandleAt(ns)
}

// subscribeNS returns the namespace handle for netlink subscriptions (nil for
// the agent's own) and a function that closes it.
func (n nsExec) subscribeNS() (*netns.NsHandle, func(), error) {
	if n.path == "" {
		return nil, func() {}, nil
	}
	ns, err := netns.GetFromPath(n.path)
	if err != nil {
		return nil, nil, fmt.Errorf("opening network namespace %s: %w", n.path, err)
	}
	return &ns, func() { ns.Close() }, nil
}
