package lease

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"io/fs"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/internal/atomicfile"
)

// ErrNotHeld is wrapped by Publish's error when the node's record or one of
// its subnet locks is no longer under the host's etcd lease: someone else
// deleted or took it, and the host must claim again.
var ErrNotHeld = errors.New("lease: the keys are no longer this host's")

// ConflictError says that another live host holds keys carrying this
// host's node name: two hosts were given the same node name (typically
// cloned machines that share /etc/machine-id and the hostname). The host
// claims nothing while it lasts.
type ConflictError struct {
	Node string
	// Key is the key the other host holds (its lease record or a subnet
	// lock carrying Node).
	Key string
	// Lease is the etcd lease the key is attached to (0: none, the key was
	// written by hand and never expires).
	Lease int64
	// PublicIP is the other host's address per family from its lease
	// record, when there is one.
	PublicIP ipfam.Pair[netip.Addr]
	// TTL is how long the other lease lives unless it is renewed (-1:
	// unknown).
	TTL time.Duration
}

// Holder describes the other host for logs: its public addresses, or why
// they are not known.
func (e *ConflictError) Holder() string {
	var a []string
	for _, ip := range ipfam.Valid(e.PublicIP) {
		a = append(a, ip.String())
	}
	if len(a) == 0 {
		return "unknown public address"
	}
	return "public address " + strings.Join(a, " and ")
}

func (e *ConflictError) Error() string {
	var held string
	switch {
	case e.Lease == 0:
		held = fmt.Sprintf("%s is held without an etcd lease (written by hand?) and never expires: delete it if no host uses it", e.Key)
	case e.TTL >= 0:
		held = fmt.Sprintf("%s is held under etcd lease %x (expires in %s unless that host renews it)", e.Key, e.Lease, e.TTL)
	default:
		held = fmt.Sprintf("%s is held under etcd lease %x", e.Key, e.Lease)
	}
	return fmt.Sprintf("node name %q is in use by another host (%s): %s; "+
		"two hosts must not share a node name: give this host its own --node-name, or on a cloned machine regenerate /etc/machine-id "+
		"(rm /etc/machine-id && systemd-machine-id-setup) and the hostname, then restart leased; until then this host claims no subnet and retries",
		e.Node, e.Holder(), held)
}

// ownSet holds the etcd lease IDs whose keys carrying the node name are
// this host's.
type ownSet map[int64]bool

// sameAddrs reports whether rec names exactly c's public addresses (and at
// least one).
func sameAddrs(rec *Record, c Claim) bool {
	return rec.PublicIP == c.PublicIP && ipfam.Any(c.PublicIP)
}

// conflict builds the *ConflictError for kv, a key carrying node held under
// another host's lease: it reads that host's record (for its addresses) and
// the lease's remaining time.
func (r *Registry) conflict(ctx context.Context, node, key string, kv *mvccpb.KeyValue) error {
	e := &ConflictError{Node: node, Key: key, Lease: kv.Lease, TTL: -1}
	recKV := kv
	if key != r.keys.Lease(node) {
		recKV = nil
		if resp, err := r.cli.Get(ctx, r.keys.Lease(node)); err == nil && len(resp.Kvs) > 0 {
			recKV = resp.Kvs[0]
		}
	}
	if recKV != nil {
		if rec, err := DecodeRecord(node, recKV.Value); err == nil {
			e.PublicIP = rec.PublicIP
		}
	}
	if kv.Lease != 0 {
		if ttl, err := r.cli.TimeToLive(ctx, clientv3.LeaseID(kv.Lease)); err == nil && ttl.TTL >= 0 {
			e.TTL = time.Duration(ttl.TTL) * time.Second
		}
	}
	return e
}

// OwnLeases is the file in which an agent keeps the etcd leases it granted
// (next to subnet.env, in /run, so that neither a reboot nor a copied disk
// image carries it to another machine). A restarted agent reads it to
// know which keys carrying its node name are its own (Claim.Own).
type OwnLeases struct {
	Path string
	Node string
}

// ownLeasesMax is how many lease IDs the file keeps, newest last.
const ownLeasesMax = 4

// Load returns the lease IDs saved for o.Node; ok is false when there is no
// file (or it is for another node name), so that the caller knows it has
// no history (Claim.NoHistory).
func (o OwnLeases) Load() (ids []clientv3.LeaseID, ok bool, err error) {
	data, err := os.ReadFile(o.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	node := ""
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "node="):
			node = strings.TrimPrefix(line, "node=")
		default:
			id, err := strconv.ParseUint(line, 16, 64)
			if err != nil {
				return nil, false, fmt.Errorf("%s: %q is not an etcd lease ID (hex)", o.Path, line)
			}
			ids = append(ids, clientv3.LeaseID(id))
		}
	}
	if node != o.Node {
		return nil, false, nil
	}
	return ids, true, nil
}

// Save writes ids (the last ownLeasesMax of them) for o.Node, atomically,
// mode 0600 (see atomicfile.Write).
func (o OwnLeases) Save(ids []clientv3.LeaseID) error {
	if len(ids) > ownLeasesMax {
		ids = ids[len(ids)-ownLeasesMax:]
	}
	var b strings.Builder
	b.WriteString("# etcd leases granted by leased on this machine, newest last; never copy this file to another machine\n")
	fmt.Fprintf(&b, "node=%s\n", o.Node)
	for _, id := range ids {
		fmt.Fprintf(&b, "%x\n", uint64(id))
	}
	return atomicfile.Write(o.Path, []byte(b.String()), 0o600)
}
