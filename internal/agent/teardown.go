package agent

// The agent's side of leased teardown: keeping the agent from running
// while the host is torn down, and releasing this host's keys in etcd.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/pkg/lease"
)

// LockOutAgent makes sure no leased agent runs for this host and none
// starts until unlock is called: it takes the exclusive lock on the
// agents' lock file (see agentlock.go), and also looks for a process
// named leased running as an agent in this network namespace (an agent
// of a build without the lock, or one whose --subnet-file differs).
func LockOutAgent(o *Options) (unlock func(), err error) {
	unlock = func() {}
	path := o.agentLockFile()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// No agent with this --subnet-file ran since boot.
	case err != nil:
		return nil, fmt.Errorf("opening the agent lock file %s: %w", path, err)
	default:
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("the leased agent of this host is running (it holds %s): stop it first (systemctl stop leased; systemctl disable leased keeps it from starting again), then run leased teardown again", path)
			}
			return nil, fmt.Errorf("locking the agent lock file %s: %w", path, err)
		}
		unlock = func() { f.Close() }
	}
	if pid := runningAgent(); pid != 0 {
		unlock()
		return nil, fmt.Errorf("a leased agent runs in this network namespace (pid %d): stop it first (systemctl stop leased; systemctl disable leased keeps it from starting again), then run leased teardown again", pid)
	}
	return unlock, nil
}

// runningAgent returns the pid of another process named leased, in this
// process's network namespace, whose command line runs the agent (no
// subcommand), or 0.
func runningAgent() int {
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return 0
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		if comm, _ := os.ReadFile(filepath.Join(dir, "comm")); strings.TrimSpace(string(comm)) != "leased" {
			continue
		}
		if ns, _ := os.Readlink(filepath.Join(dir, "ns", "net")); ns != self {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join(dir, "cmdline"))
		argv := strings.Split(string(bytes.TrimRight(cmdline, "\x00")), "\x00")
		if len(argv) > 1 && !strings.HasPrefix(argv[1], "-") {
			continue // an operator command (leased status, leased teardown, ...)
		}
		if len(argv) > 1 && strings.TrimLeft(argv[1], "-") == "version" || slices.Contains(argv, "-h") || slices.Contains(argv, "--help") {
			continue
		}
		return pid
	}
	return 0
}

// NotOwnError says which keys carrying this host's node name --release
// left alone because this machine cannot prove they are its own.
type NotOwnError struct {
	keys []string
	file string
}

func (e *NotOwnError) Error() string {
	return fmt.Sprintf("left in etcd: %s: not held under an etcd lease that %s lists as granted by this machine's agent (another host with the same node name? a lease from before a reboot? written by hand?); keys under a lease expire with it (--lease-ttl); delete them with etcdctl once you know no other host uses them",
		strings.Join(e.keys, ", "), e.file)
}

// ErrKeysChanged is ReleaseOwnKeys's error when a key changed between
// reading and deleting it.
var ErrKeysChanged = errors.New("this host's keys changed in etcd while they were being deleted (is an agent with this node name running elsewhere?); nothing was deleted: run leased teardown --release again")

// ReleaseOwnKeys deletes node's lease record and the subnet locks whose
// value is node, each only when it is held under one of the etcd leases
// ids (read from the agent's own-leases file, ownFile), in one transaction
// that checks exactly that; then it revokes those etcd leases. It returns
// the deleted keys. Keys carrying node under another lease are left,
// reported in a *NotOwnError; other errors are etcd's.
func ReleaseOwnKeys(ctx context.Context, cli *clientv3.Client, k lease.Keys, node string, ids []clientv3.LeaseID, ownFile string) ([]string, error) {
	resp, err := cli.Txn(ctx).Then(
		clientv3.OpGet(k.Lease(node)),
		clientv3.OpGet(k.SubnetLocks(false), clientv3.WithPrefix()),
		clientv3.OpGet(k.SubnetLocks(true), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, err
	}
	var del []string
	var cmps []clientv3.Cmp
	var leases []clientv3.LeaseID
	notOwn := &NotOwnError{file: ownFile}
	for i, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().Kvs {
			if i > 0 && string(kv.Value) != node {
				continue // another host's lock
			}
			id := clientv3.LeaseID(kv.Lease)
			if kv.Lease == 0 || !slices.Contains(ids, id) {
				notOwn.keys = append(notOwn.keys, string(kv.Key))
				continue
			}
			del = append(del, string(kv.Key))
			cmps = append(cmps, clientv3.Compare(clientv3.LeaseValue(string(kv.Key)), "=", id), clientv3.Compare(clientv3.ModRevision(string(kv.Key)), "=", kv.ModRevision))
			if !slices.Contains(leases, id) {
				leases = append(leases, id)
			}
		}
	}
	if len(del) > 0 {
		ops := make([]clientv3.Op, len(del))
		for i, key := range del {
			ops[i] = clientv3.OpDelete(key)
		}
		tr, err := cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			return nil, err
		}
		if !tr.Succeeded {
			return nil, ErrKeysChanged
		}
		// The keys are gone; revoking the leases also ends any key under
		// them written since by an earlier run of this machine's agent.
		for _, id := range leases {
			cli.Revoke(ctx, id) //nolint:errcheck // best effort: it expires anyway
		}
	}
	if len(notOwn.keys) > 0 {
		return del, notOwn
	}
	return del, nil
}
