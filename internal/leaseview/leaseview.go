// Package leaseview reads every lease in etcd and renders them for people
// (a table) and scripts (JSON). Used by `leased leases` and the lab.
package leaseview

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"sync"
	"text/tabwriter"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leased/leased/pkg/lease"
)

// validString is v as text, "" when v is not valid.
func validString[T interface {
	IsValid() bool
	String() string
}](v T) string {
	if !v.IsValid() {
		return ""
	}
	return v.String()
}

// Row is one host's lease.
type Row struct {
	Node        string          `json:"node"`
	Subnet      string          `json:"subnet,omitempty"`
	IPv6Subnet  string          `json:"ipv6Subnet,omitempty"`
	PublicIP    string          `json:"publicIP,omitempty"`
	PublicIPv6  string          `json:"publicIPv6,omitempty"`
	Backend     string          `json:"backend"`
	BackendData json.RawMessage `json:"backendData,omitempty"`
	Acquired    *time.Time      `json:"acquired,omitempty"`
	// LeaseID is the etcd lease (hex, as etcdctl prints it); "" when the
	// record has none (it never expires).
	LeaseID string `json:"leaseID,omitempty"`
	// ExpiresIn is the seconds until the lease expires without renewal;
	// -1 when it has no lease.
	ExpiresIn int64 `json:"expiresInSeconds"`
	// DockerPools are the pools leased's Docker IPAM driver holds for
	// user-defined networks on this host; only the row of the host the
	// command runs on has them (they are local, not in etcd).
	DockerPools []string `json:"dockerPools,omitempty"`
}

// Read lists every lease under prefix (lease.Registry.List, the one
// reader of lease keys), and asks etcd for the remaining TTL of each
// distinct lease (16 at a time). Malformed records are returned as errors
// next to the rows, by node name.
func Read(ctx context.Context, cli *clientv3.Client, prefix string) ([]Row, []error, error) {
	view, err := lease.NewRegistry(cli, prefix).List(ctx)
	if err != nil {
		return nil, nil, err
	}
	var rows []Row
	ids := map[clientv3.LeaseID]int64{}
	for _, r := range view.Records {
		row := Row{Node: r.Node, Backend: r.BackendType, BackendData: r.BackendData, ExpiresIn: -1}
		row.Subnet, row.IPv6Subnet = validString(r.Subnet.V4), validString(r.Subnet.V6)
		row.PublicIP, row.PublicIPv6 = validString(r.PublicIP.V4), validString(r.PublicIP.V6)
		if !r.Acquired.IsZero() {
			t := r.Acquired
			row.Acquired = &t
		}
		if r.Lease != 0 {
			row.LeaseID = fmt.Sprintf("%x", r.Lease)
			ids[clientv3.LeaseID(r.Lease)] = -1
		}
		rows = append(rows, row)
	}
	nodes := slices.Sorted(maps.Keys(view.Malformed))
	bad := make([]error, 0, len(nodes))
	for _, n := range nodes {
		bad = append(bad, view.Malformed[n])
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func(id clientv3.LeaseID) {
			defer func() { <-sem; wg.Done() }()
			if t, err := cli.TimeToLive(ctx, id); err == nil {
				mu.Lock()
				ids[id] = t.TTL
				mu.Unlock()
			}
		}(id)
	}
	wg.Wait()
	for i := range rows {
		if rows[i].LeaseID != "" {
			var id int64
			fmt.Sscanf(rows[i].LeaseID, "%x", &id)
			rows[i].ExpiresIn = ids[clientv3.LeaseID(id)]
		}
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].Node < rows[j].Node })
	return rows, bad, nil
}

// Table writes rows as an aligned table.
func Table(w io.Writer, rows []Row, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tSUBNET\tIPV6 SUBNET\tPUBLIC IP\tPUBLIC IPV6\tBACKEND\tAGE\tEXPIRES")
	for _, r := range rows {
		age := "-"
		if r.Acquired != nil {
			age = now.Sub(*r.Acquired).Round(time.Second).String()
		}
		exp := "never"
		if r.ExpiresIn >= 0 {
			exp = "in " + (time.Duration(r.ExpiresIn) * time.Second).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Node, dash(r.Subnet), dash(r.IPv6Subnet),
			dash(r.PublicIP), dash(r.PublicIPv6), r.Backend, age, exp)
	}
	tw.Flush()
}

// JSON writes rows as an indented JSON array.
func JSON(w io.Writer, rows []Row) error {
	if rows == nil {
		rows = []Row{}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rows)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
