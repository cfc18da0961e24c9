package fleetsim

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Result holds the figures of one run (one K).
type Result struct {
	Hosts     int
	Endpoints int // how many endpoints the hosts were spread over
	Label     string
	LeaseTTL  time.Duration

	// Join storm: K hosts start within one second.
	StormLeases        time.Duration // until every host holds its lease
	StormPeers         time.Duration // until every host's peer set is complete
	StormRetries       int64         // claim transactions that lost a race
	StormErrors        int64         // grants or claims that failed (etcd errors) and were retried
	StormLostLeases    int64         // etcd leases lost during the storm (claimed again)
	StormEventsPerHost float64       // watch events delivered per host during the storm

	// Steady state.
	SteadySeconds           float64
	SteadyReqPerHost        float64 // requests/s per host (unary + keep-alives + watch messages)
	SteadyKeepAlivesPerHost float64
	SteadyEventsPerHost     float64 // watch events/s per host
	Procs                   []ProcFigures

	// One new host at a time.
	Join                    Dist
	EventsPerJoinPerWatcher float64

	// Rolling restart.
	RestartStep                       int
	RestartTotal                      time.Duration
	Restart                           Dist
	RestartFlaps                      int64
	RestartLostLeases                 int64
	RestartSubnetMoved                int
	RestartEventsPerRestartPerWatcher float64

	// Mass expiry.
	Expired       int
	ExpiryDropped time.Duration

	// Invariants over the whole run (all must be 0).
	Duplicates         int
	IncompletePeerSets int
	Rejected           int64
	LostLeases         int64 // after the storm
	// LeaderChanges is the most leader changes a member saw (its start
	// counts as one).
	LeaderChanges int64
}

// Violations lists the invariants the run broke.
func (r *Result) Violations() []string {
	var v []string
	if r.Duplicates > 0 {
		v = append(v, fmt.Sprintf("%d subnets held twice", r.Duplicates))
	}
	if r.IncompletePeerSets > 0 {
		v = append(v, fmt.Sprintf("%d hosts with an incomplete peer set at the end", r.IncompletePeerSets))
	}
	if r.LostLeases > 0 {
		v = append(v, fmt.Sprintf("%d etcd leases lost by running hosts after the join storm", r.LostLeases))
	}
	if r.RestartFlaps > 0 {
		v = append(v, fmt.Sprintf("%d peer-set entries removed during the rolling restart", r.RestartFlaps))
	}
	if r.RestartSubnetMoved > 0 {
		v = append(v, fmt.Sprintf("%d hosts came back from a restart with another subnet", r.RestartSubnetMoved))
	}
	if r.Rejected > 0 {
		v = append(v, fmt.Sprintf("%d records rejected by peer filters", r.Rejected))
	}
	return v
}

// ProcFigures are one etcd process's figures in the steady state.
type ProcFigures struct {
	Name   string
	Member bool
	CPU    float64 // cores (CPU seconds per second)
	RSSMiB float64
	// Watchers are the watchers a member serves
	// (etcd_debugging_mvcc_watcher_total; members only).
	Watchers float64
	// ReqPerS are the gRPC messages a member receives per second
	// (grpc_server_msg_received_total: unary requests and stream
	// messages, keep-alives included); proxies do not export it.
	ReqPerS float64
}

type procSample struct {
	cpu  float64 // seconds
	rss  float64 // MiB
	msgs float64
	w    float64
}

func readProcs(ps []Proc) []procSample {
	out := make([]procSample, len(ps))
	for i, p := range ps {
		out[i].cpu, out[i].rss = procStat(p.Pid)
		m := scrape(p.MetricsURL, "grpc_server_msg_received_total", "etcd_debugging_mvcc_watcher_total")
		out[i].msgs, out[i].w = m[0], m[1]
	}
	return out
}

func procDeltas(ps []Proc, a, b []procSample, secs float64) []ProcFigures {
	var out []ProcFigures
	for i, p := range ps {
		out = append(out, ProcFigures{Name: p.Name, Member: p.Member,
			CPU: (b[i].cpu - a[i].cpu) / secs, RSSMiB: b[i].rss,
			Watchers: b[i].w, ReqPerS: (b[i].msgs - a[i].msgs) / secs})
	}
	return out
}

// procStat returns the CPU seconds (user + system) and resident MiB of pid.
func procStat(pid int) (cpu, rssMiB float64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) > 22 {
		ut, _ := strconv.ParseFloat(fields[11], 64) // utime is field 14 of stat
		st, _ := strconv.ParseFloat(fields[12], 64)
		cpu = (ut + st) / 100 // USER_HZ
		rss, _ := strconv.ParseFloat(fields[21], 64)
		rssMiB = rss * float64(os.Getpagesize()) / (1 << 20)
	}
	return cpu, rssMiB
}

// scrape sums every series of each named metric at url (0 when absent).
func scrape(url string, names ...string) []float64 {
	out := make([]float64, len(names))
	if url == "" {
		return out
	}
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url + "/metrics")
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		for i, n := range names {
			if strings.HasPrefix(line, n) && (len(line) > len(n) && (line[len(n)] == ' ' || line[len(n)] == '{')) {
				f := strings.Fields(line)
				v, _ := strconv.ParseFloat(f[len(f)-1], 64)
				out[i] += v
			}
		}
	}
	return out
}

func ms(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 0, 64)
}

// Print writes the results as a table: one row per figure, one column per
// run.
func Print(w io.Writer, rs []*Result) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	row := func(name string, f func(r *Result) string) {
		fmt.Fprint(tw, name+"\t")
		for _, r := range rs {
			fmt.Fprint(tw, f(r)+"\t")
		}
		fmt.Fprintln(tw)
	}
	row("hosts (K)", func(r *Result) string { return strconv.Itoa(r.Hosts) })
	row("hosts connect to", func(r *Result) string {
		if r.Label != "" {
			return r.Label
		}
		return strconv.Itoa(r.Endpoints) + " endpoints"
	})
	row("join storm: all leases held (ms)", func(r *Result) string { return ms(r.StormLeases) })
	row("join storm: all peer sets complete (ms)", func(r *Result) string { return ms(r.StormPeers) })
	row("join storm: claim retries", func(r *Result) string { return strconv.FormatInt(r.StormRetries, 10) })
	row("join storm: failed grants/claims retried", func(r *Result) string { return strconv.FormatInt(r.StormErrors, 10) })
	row("join storm: etcd leases lost (claimed again)", func(r *Result) string { return strconv.FormatInt(r.StormLostLeases, 10) })
	row("join storm: watch events per host", func(r *Result) string { return fmt.Sprintf("%.0f", r.StormEventsPerHost) })
	row("steady: requests/s per host", func(r *Result) string { return fmt.Sprintf("%.3f", r.SteadyReqPerHost) })
	row("steady: keep-alives/s per host", func(r *Result) string { return fmt.Sprintf("%.3f", r.SteadyKeepAlivesPerHost) })
	row("steady: watch events/s per host", func(r *Result) string { return fmt.Sprintf("%.3f", r.SteadyEventsPerHost) })
	nproc := 0
	for _, r := range rs {
		nproc = max(nproc, len(r.Procs))
	}
	for i := range nproc {
		name := func(r *Result) (ProcFigures, bool) {
			if i < len(r.Procs) {
				return r.Procs[i], true
			}
			return ProcFigures{}, false
		}
		label := "member"
		for _, r := range rs {
			if p, ok := name(r); ok {
				label = p.Name
				break
			}
		}
		row("steady: "+label+" CPU (cores)", func(r *Result) string {
			if p, ok := name(r); ok {
				return fmt.Sprintf("%.3f", p.CPU)
			}
			return "-"
		})
		row("steady: "+label+" RSS (MiB)", func(r *Result) string {
			if p, ok := name(r); ok {
				return fmt.Sprintf("%.0f", p.RSSMiB)
			}
			return "-"
		})
		row("steady: "+label+" gRPC msgs in/s", func(r *Result) string {
			if p, ok := name(r); ok && p.Member {
				return fmt.Sprintf("%.1f", p.ReqPerS)
			}
			return "-"
		})
		row("steady: "+label+" watchers", func(r *Result) string {
			if p, ok := name(r); ok && p.Member {
				return fmt.Sprintf("%.0f", p.Watchers)
			}
			return "-"
		})
	}
	row("one new host: all peer sets p50 (ms)", func(r *Result) string { return ms(r.Join.P50) })
	row("one new host: p99 (ms)", func(r *Result) string { return ms(r.Join.P99) })
	row("one new host: max (ms)", func(r *Result) string { return ms(r.Join.Max) })
	row("one new host: joins timed", func(r *Result) string { return strconv.Itoa(r.Join.N) })
	row("events per join per watcher", func(r *Result) string { return fmt.Sprintf("%.2f", r.EventsPerJoinPerWatcher) })
	row("rolling restart: hosts at a time", func(r *Result) string { return strconv.Itoa(r.RestartStep) })
	row("rolling restart: total (s)", func(r *Result) string { return fmt.Sprintf("%.1f", r.RestartTotal.Seconds()) })
	row("rolling restart: propagation p99 (ms)", func(r *Result) string { return ms(r.Restart.P99) })
	row("rolling restart: leases lost", func(r *Result) string { return strconv.FormatInt(r.RestartLostLeases, 10) })
	row("rolling restart: peer entries flapped", func(r *Result) string { return strconv.FormatInt(r.RestartFlaps, 10) })
	row("rolling restart: events per restart per watcher", func(r *Result) string {
		return fmt.Sprintf("%.2f", r.RestartEventsPerRestartPerWatcher)
	})
	row("mass expiry: hosts killed", func(r *Result) string { return strconv.Itoa(r.Expired) })
	row("mass expiry: until all survivors dropped them (ms)", func(r *Result) string { return ms(r.ExpiryDropped) })
	row("mass expiry: lease TTL (ms)", func(r *Result) string { return ms(r.LeaseTTL) })
	row("etcd leader changes (start = 1)", func(r *Result) string { return strconv.FormatInt(r.LeaderChanges, 10) })
	row("leases lost after the storm", func(r *Result) string { return strconv.FormatInt(r.LostLeases, 10) })
	row("duplicate subnets", func(r *Result) string { return strconv.Itoa(r.Duplicates) })
	row("incomplete peer sets at the end", func(r *Result) string { return strconv.Itoa(r.IncompletePeerSets) })
	tw.Flush()
}
