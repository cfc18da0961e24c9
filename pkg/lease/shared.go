package lease

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The shared lease cache is a snapshot (the lease cache's format, see
// snapshot.go) that one agent keeps in etcd for hosts that start without a
// cache of their own: a new host, or one whose cache was lost. Such a host
// reads the shared cache and brings it up to date exactly as a restarted
// host does with its file (WatchFromSnapshot): one keys-only listing, and
// reads of the leases changed since. It no longer reads every lease value
// from etcd, which at 50,000 leases is most of a fresh start's time and of
// the load a fleet of starting hosts puts on etcd.
//
// Layout (Keys.SharedCache):
//
//	<prefix>/cache/header             JSON: SharedCacheHeader
//	<prefix>/cache/parts/<gen>/<i>    the snapshot's bytes, cut in parts of at most sharedPartSize
//
// "cache" sorts before "config", so the agents' watch, which starts at the
// config key, never carries the cache's megabytes to every host. Every key
// is attached to the writer's etcd lease: when the writer's host goes
// away, so does its cache, and the next writer starts a fresh one.
//
// Nothing in the cache is trusted beyond what etcd confirms: a record is
// kept only when its key still exists with the create revision the record
// names and unchanged since the cache's revision, and it then passes the
// same checks (shape, peer filter) as a record read from etcd. A damaged or
// foreign cache (wrong checksum, parts missing, another etcd cluster or
// prefix, a revision from etcd's future) is ignored, and the host lists.

// SharedCacheMinLeases is the smallest lease set for which the shared
// cache is written and read: below it, a listing takes a few milliseconds,
// no more than checking a cache against etcd.
const SharedCacheMinLeases = 1000

// sharedPartSize is the largest part of a shared cache; etcd refuses
// requests beyond --max-request-bytes (1.5 MiB by default).
const sharedPartSize = 1 << 20

// sharedCacheFormat is the format of the header key; other formats are
// ignored.
const sharedCacheFormat = 1

// SharedCacheHeader describes the shared cache in etcd.
type SharedCacheHeader struct {
	Format int `json:"format"`
	// Gen names the parts of this cache: <prefix>/cache/parts/<Gen>/.
	Gen   string `json:"gen"`
	Parts int    `json:"parts"`
	// Size and CRC32C are those of the parts joined.
	Size   int    `json:"size"`
	CRC32C uint32 `json:"crc32c"`
	// Rev is the revision of the lease set the cache holds, Leases its
	// number of leases.
	Rev    int64 `json:"revision"`
	Leases int   `json:"leases"`
	// Node is the host that wrote it, at Written.
	Node    string    `json:"node"`
	Written time.Time `json:"written"`

	// ModRev is the header key's mod revision (0: there is no header);
	// not stored.
	ModRev int64 `json:"-"`
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// errNoSharedCache is FetchSharedCache's error when etcd holds no shared
// cache.
var errNoSharedCache = errors.New("lease: etcd holds no shared lease cache")

// IsNoSharedCache reports whether err says that etcd holds no shared cache
// (as opposed to one that could not be used).
func IsNoSharedCache(err error) bool { return errors.Is(err, errNoSharedCache) }

// FetchSharedCache reads the shared cache in one request and checks it:
// complete, the checksum matches, from this registry's prefix and the etcd
// cluster that answered, and not from that cluster's future. It returns
// what OpenSnapshot returns for a file, for WatchFromSnapshot.
func (r *Registry) FetchSharedCache(ctx context.Context) (SnapshotHeader, func() Batch, error) {
	k := r.keys
	resp, err := r.cli.Get(ctx, k.SharedCache(), clientv3.WithPrefix())
	if err != nil {
		return SnapshotHeader{}, nil, fmt.Errorf("reading the shared lease cache: %w", err)
	}
	var sh SharedCacheHeader
	parts := map[int][]byte{}
	found := false
	for _, kv := range resp.Kvs {
		key := string(kv.Key)
		if key == k.SharedCacheHeader() {
			found = true
			if err := json.Unmarshal(kv.Value, &sh); err != nil {
				return SnapshotHeader{}, nil, fmt.Errorf("lease: shared lease cache header %s is not valid JSON: %v", key, err)
			}
		}
	}
	if !found {
		return SnapshotHeader{}, nil, errNoSharedCache
	}
	if sh.Format != sharedCacheFormat {
		return SnapshotHeader{}, nil, fmt.Errorf("lease: shared lease cache is in format %d, this leased reads format %d", sh.Format, sharedCacheFormat)
	}
	pfx := k.SharedCacheParts(sh.Gen)
	for _, kv := range resp.Kvs {
		rest, ok := strings.CutPrefix(string(kv.Key), pfx)
		if !ok || sh.Gen == "" {
			continue
		}
		if i, err := strconv.Atoi(rest); err == nil && i >= 0 && i < sh.Parts {
			parts[i] = kv.Value
		}
	}
	if len(parts) != sh.Parts || sh.Parts == 0 {
		return SnapshotHeader{}, nil, fmt.Errorf("lease: shared lease cache %s has %d of its %d parts", sh.Gen, len(parts), sh.Parts)
	}
	size := 0
	for _, p := range parts {
		size += len(p)
	}
	if size != sh.Size {
		return SnapshotHeader{}, nil, fmt.Errorf("lease: shared lease cache %s has %d bytes, its header says %d", sh.Gen, size, sh.Size)
	}
	data := make([]byte, 0, size)
	for i := range sh.Parts {
		data = append(data, parts[i]...)
	}
	if c := crc32.Checksum(data, castagnoli); c != sh.CRC32C {
		return SnapshotHeader{}, nil, fmt.Errorf("lease: shared lease cache %s is damaged (CRC32C %08x, header says %08x)", sh.Gen, c, sh.CRC32C)
	}
	h, decode, err := parseSnapshot(data, "shared lease cache "+sh.Gen)
	if err != nil {
		return h, nil, err
	}
	switch {
	case h.Prefix != k.Prefix():
		return h, nil, fmt.Errorf("lease: shared lease cache %s is for prefix %q, not %q", sh.Gen, h.Prefix, k.Prefix())
	case h.ClusterID != resp.Header.ClusterId:
		return h, nil, fmt.Errorf("lease: shared lease cache %s is from etcd cluster %x, not %x", sh.Gen, h.ClusterID, resp.Header.ClusterId)
	case h.Rev > resp.Header.Revision:
		return h, nil, fmt.Errorf("lease: shared lease cache %s is from revision %d, after etcd's %d (etcd restored from a backup?)", sh.Gen, h.Rev, resp.Header.Revision)
	}
	return h, decode, nil
}

// ReadSharedCacheHeader reads the header of the shared cache; ModRev 0 means
// there is none. A header that does not parse comes back empty but for its
// ModRev, so that the writer replaces it (SharedCacheDue finds it due).
func (r *Registry) ReadSharedCacheHeader(ctx context.Context) (SharedCacheHeader, error) {
	resp, err := r.cli.Get(ctx, r.keys.SharedCacheHeader())
	if err != nil {
		return SharedCacheHeader{}, fmt.Errorf("reading the shared lease cache header: %w", err)
	}
	var h SharedCacheHeader
	if len(resp.Kvs) == 1 {
		if json.Unmarshal(resp.Kvs[0].Value, &h) != nil || h.Format != sharedCacheFormat {
			h = SharedCacheHeader{}
		}
		h.ModRev = resp.Kvs[0].ModRevision
	}
	return h, nil
}

// SharedCacheWriter reports whether node is the host that keeps the
// shared cache, given its view of etcd: the network has at least
// SharedCacheMinLeases leases, and node's sorts first among them. One host
// writes, so that a fleet never uploads its caches at once; when it goes
// away, its cache goes with its etcd lease, and the next first host writes
// one.
func SharedCacheWriter(node string, v *View) bool {
	if !v.Synced || len(v.Records) < SharedCacheMinLeases || v.Records[node] == nil {
		return false
	}
	for n := range v.Records {
		if n < node {
			return false
		}
	}
	return true
}

// SharedCacheDue reports whether the writer should write the shared cache
// now, given its view of etcd and the header it read (ModRev 0: none), and
// why: when there is none, when more than SharedCacheMaxChanged leases
// were added or removed since the cache's revision (a reader reads those
// one by one), or when the cache is older than SharedCacheMaxAge and
// anything changed (leases rewritten in place are not counted otherwise);
// never more often than every SharedCacheMinInterval.
func SharedCacheDue(v *View, h SharedCacheHeader, now time.Time) (bool, string) {
	if h.ModRev == 0 {
		return true, "there is none"
	}
	if h.Rev >= v.Rev || now.Sub(h.Written) < SharedCacheMinInterval {
		return false, ""
	}
	older := 0
	for _, r := range v.Records {
		if r.Rev <= h.Rev {
			older++
		}
	}
	changed := (len(v.Records) - older) + max(h.Leases-older, 0)
	switch {
	case changed > SharedCacheMaxChanged:
		return true, strconv.Itoa(changed) + " leases added or removed since the last one"
	case changed > 0 && now.Sub(h.Written) >= SharedCacheMaxAge:
		return true, "the last one is a day old"
	}
	return false, ""
}

// Rewrite policy of the shared cache (see SharedCacheDue). Each rewrite
// puts about 60 bytes per lease into etcd's history (3 MB at 50,000).
const (
	SharedCacheMaxChanged  = 512
	SharedCacheMaxAge      = 24 * time.Hour
	SharedCacheMinInterval = 10 * time.Minute
)

// PublishSharedCache writes data (EncodeSnapshot's output) as the shared
// cache, under leaseID, in place of the cache whose header had mod
// revision prev (0: none). The parts go first, under a new generation;
// then one transaction, if the header is still prev, points the header at
// them and deletes every other generation (also parts a crashed writer
// left). It reports false, and removes its parts, when another writer
// replaced the header first.
func (r *Registry) PublishSharedCache(ctx context.Context, leaseID clientv3.LeaseID, node string, data []byte, prev int64) (bool, error) {
	h, _, err := parseSnapshot(data, "shared lease cache")
	if err != nil {
		return false, err
	}
	k := r.keys
	sh := SharedCacheHeader{
		Format: sharedCacheFormat, Gen: fmt.Sprintf("%016x", rand.Uint64()),
		Size: len(data), CRC32C: crc32.Checksum(data, castagnoli),
		Rev: h.Rev, Leases: h.Leases, Node: node, Written: time.Now().UTC().Truncate(time.Second),
	}
	pfx := k.SharedCacheParts(sh.Gen)
	for rest := data; len(rest) > 0; sh.Parts++ {
		n := min(len(rest), sharedPartSize)
		if _, err := r.cli.Put(ctx, pfx+strconv.Itoa(sh.Parts), string(rest[:n]), clientv3.WithLease(leaseID)); err != nil {
			r.cli.Delete(context.WithoutCancel(ctx), pfx, clientv3.WithPrefix()) //nolint:errcheck // the lease removes them in the end
			return false, fmt.Errorf("writing part %d of the shared lease cache: %w", sh.Parts, err)
		}
		rest = rest[n:]
	}
	hv, err := json.Marshal(&sh)
	if err != nil {
		return false, err
	}
	all := k.SharedCacheParts("")
	resp, err := r.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.ModRevision(k.SharedCacheHeader()), "=", prev),
	).Then(
		clientv3.OpPut(k.SharedCacheHeader(), string(hv), clientv3.WithLease(leaseID)),
		clientv3.OpDelete(all, clientv3.WithRange(pfx)),
		clientv3.OpDelete(clientv3.GetPrefixRangeEnd(pfx), clientv3.WithRange(clientv3.GetPrefixRangeEnd(all))),
	).Else(
		clientv3.OpDelete(pfx, clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		r.cli.Delete(context.WithoutCancel(ctx), pfx, clientv3.WithPrefix()) //nolint:errcheck // the lease removes them in the end
		return false, fmt.Errorf("writing the shared lease cache header: %w", err)
	}
	return resp.Succeeded, nil
}

// sharedCacheGens returns the generations whose parts etcd holds (for
// tests).
func (r *Registry) sharedCacheGens(ctx context.Context) ([]string, error) {
	all := r.keys.SharedCacheParts("")
	resp, err := r.cli.Get(ctx, all, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, err
	}
	var gens []string
	for _, kv := range resp.Kvs {
		gen, _, _ := bytes.Cut(kv.Key[len(all):], []byte{'/'})
		if !slices.Contains(gens, string(gen)) {
			gens = append(gens, string(gen))
		}
	}
	return gens, nil
}
