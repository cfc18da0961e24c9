package lab

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os/exec"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/leased/leased/pkg/lease"
)

// Ping sends one ping from namespace ns to dst and reports success. size >
// 0 sets the payload size with fragmentation prohibited (DF).
func Ping(ctx context.Context, ns string, dst netip.Addr, size int) error {
	args := []string{"netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "1"}
	if size > 0 {
		args = append(args, "-M", "do", "-s", strconv.Itoa(size))
	}
	args = append(args, dst.String())
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ping %s from %s: %v: %s", dst, ns, err, strings.TrimSpace(lastLine(string(out))))
	}
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// PingUntil retries Ping until it succeeds or timeout passes.
func PingUntil(ctx context.Context, ns string, dst netip.Addr, size int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := Ping(ctx, ns, dst, size)
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Cell is one entry of the connectivity matrix.
type Cell struct {
	From, To *Host
	Dst      netip.Addr
	Err      error
}

// Matrix pings every container from every other container, for each
// family the containers have, retrying each pair for up to timeout. It
// returns the cells in order (family, from, to).
func (l *Lab) Matrix(ctx context.Context, timeout time.Duration) []Cell {
	var cells []Cell
	for _, v6 := range []bool{false, true} {
		for _, from := range l.Hosts {
			for _, to := range l.Hosts {
				dst := to.Container.Addr4
				if v6 {
					dst = to.Container.Addr6
				}
				if from == to || !dst.IsValid() {
					continue
				}
				cells = append(cells, Cell{From: from, To: to, Dst: dst})
			}
		}
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range cells {
		wg.Add(1)
		go func(c *Cell) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			c.Err = PingUntil(ctx, c.From.CNS, c.Dst, 0, timeout)
		}(&cells[i])
	}
	wg.Wait()
	return cells
}

// PrintMatrix writes the matrix as a table per family and returns the
// number of failed pairs.
func PrintMatrix(w io.Writer, l *Lab, cells []Cell) int {
	failed := 0
	for _, fam := range []string{"IPv4", "IPv6"} {
		res := map[[2]string]string{}
		any := false
		for _, c := range cells {
			if c.Dst.Is6() != (fam == "IPv6") {
				continue
			}
			any = true
			v := "ok"
			if c.Err != nil {
				v, failed = "FAIL", failed+1
			}
			res[[2]string{c.From.Name, c.To.Name}] = v
		}
		if !any {
			continue
		}
		fmt.Fprintf(w, "\n%s connectivity, container → container (rows ping columns):\n", fam)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprint(tw, "from \\ to")
		for _, h := range l.Hosts {
			a := h.Container.Addr4
			if fam == "IPv6" {
				a = h.Container.Addr6
			}
			fmt.Fprintf(tw, "\t%s %s", h.Name, a)
		}
		fmt.Fprintln(tw)
		for _, from := range l.Hosts {
			fmt.Fprint(tw, from.Name)
			for _, to := range l.Hosts {
				v, ok := res[[2]string{from.Name, to.Name}]
				if !ok {
					v = "-"
				}
				fmt.Fprintf(tw, "\t%s", v)
			}
			fmt.Fprintln(tw)
		}
		tw.Flush()
	}
	for _, c := range cells {
		if c.Err != nil {
			fmt.Fprintf(w, "  %v\n", c.Err)
		}
	}
	return failed
}

// Leases reads every well-formed lease record from etcd, by node name.
func (l *Lab) Leases(ctx context.Context) ([]*lease.Record, error) {
	view, err := lease.NewRegistry(l.Client, "").List(ctx)
	if err != nil {
		return nil, err
	}
	out := slices.Collect(maps.Values(view.Records))
	sort.Slice(out, func(i, j int) bool { return out[i].Node < out[j].Node })
	return out, nil
}
