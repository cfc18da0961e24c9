package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
	"github.com/leased/leased/internal/testutil"
	"github.com/leased/leased/pkg/lease"
)

// previousCommit is the last commit before issue 18 changed what an agent
// watches (config and leases/ only, its own locks apart) and how it
// restarts (resuming its etcd lease, writing nothing): the "previous
// version" of a rolling upgrade across that change.
const previousCommit = "06b256fef9adbb4d6548c837840925fb8865542c"

// buildPrevious builds the agent of previousCommit from this git
// checkout (git archive, so the repository is not touched). It skips the
// test outside a git checkout or in a shallow one (whose history lacks the
// commit), and fails in CI otherwise.
func buildPrevious(t *testing.T) string {
	t.Helper()
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err == nil {
		err = exec.Command("git", "cat-file", "-e", previousCommit+"^{commit}").Run()
	}
	if err != nil {
		// A shallow clone lacks the commit, and .ci/run could not fetch
		// the history (see there): say so, but do not fail the run for
		// how the checkout was cloned. Anything else in CI fails.
		shallow, _ := exec.Command("git", "rev-parse", "--is-shallow-repository").Output()
		if os.Getenv("CI") != "" && strings.TrimSpace(string(shallow)) != "true" {
			t.Fatalf("CI must run this test in a git checkout that has %s: %v", previousCommit, err)
		}
		t.Skipf("not a git checkout with %s (%v; shallow: %s): cannot build the previous agent; clone with full history to run it", previousCommit, err, strings.TrimSpace(string(shallow)))
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	archive := exec.Command("sh", "-c", `git -C "$1" archive "$2" | tar -x -C "$3"`, "sh", strings.TrimSpace(string(top)), previousCommit, src)
	if out, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("extracting %s: %v\n%s", previousCommit, err, out)
	}
	bin := filepath.Join(dir, "leased-previous")
	build := exec.Command("go", "build", "-o", bin, "./cmd/leased")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the agent of %s: %v\n%s", previousCommit, err, out)
	}
	return bin
}

// A fleet in the middle of a rolling upgrade across issue 18's changes:
// one host runs the agent of the commit before them, the other the
// current one, on one etcd. They hold distinct subnets, each programs the
// other (containers reach each other), and a restart of either, and the
// upgrade of the previous one to the current version, keeps every subnet
// and the traffic.
func TestMixedVersionsShareANetwork(t *testing.T) {
	previous := buildPrevious(t)
	l := up(t, lab.Config{Hosts: 2, Backend: "host-gw"})
	oldHost, newHost := l.Hosts[0], l.Hosts[1]
	subnets := func() map[string][]string {
		t.Helper()
		out := map[string][]string{}
		seen := map[string]string{}
		for _, h := range l.Hosts {
			rec, err := leaseRecord(t, l.Client, h.Name)
			if err != nil || rec == nil {
				t.Fatalf("%s's record: %+v, %v", h.Name, rec, err)
			}
			for _, s := range rec.Subnets() {
				if other, dup := seen[s.String()]; dup {
					t.Errorf("%s is held by %s and %s", s, other, h.Name)
				}
				seen[s.String()] = h.Name
				out[h.Name] = append(out[h.Name], s.String())
			}
		}
		return out
	}
	restart := func(h *lab.Host, bin string) {
		t.Helper()
		if err := l.StopAgent(h, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		h.Binary = bin
		if err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	check := func(when string, want map[string][]string) {
		t.Helper()
		for _, cell := range l.Matrix(ctx(t), 30*time.Second) {
			if cell.Err != nil {
				t.Errorf("%s: %s → %s (%s): %v", when, cell.From.Name, cell.To.Name, cell.Dst, cell.Err)
			}
		}
		if got := subnets(); want != nil && !equalSubnets(got, want) {
			t.Errorf("%s: subnets %v, want %v", when, got, want)
		}
	}
	check("both current", nil)
	start := subnets()

	restart(oldHost, previous) // the downgrade half of a rollback, or a host not upgraded yet
	check("previous next to current", start)
	if log := l.LogTail(oldHost, 400); strings.Contains(log, "resuming the etcd lease") {
		t.Fatalf("%s does not run the previous agent: its log mentions resuming a lease", oldHost.Name)
	}
	// A join and an expiry reach both kinds of agent.
	cfg := l.Cfg
	s4, s6 := lastSubnet(cfg.Network, cfg.SubnetLen), lastSubnet(cfg.IPv6Network, cfg.IPv6SubnetLen)
	if _, err := l.Client.Put(ctx(t), lease.NewKeys("").Lease("joiner"), mustJSON(synthPeer(l, "joiner", s4, s6, 93))); err != nil {
		t.Fatal(err)
	}
	for _, h := range l.Hosts {
		testutil.Eventually(t, 30*time.Second, h.Name+" programs the joiner", func() bool {
			st := leasedState(t, h)
			return mentions(st, s4.String()) && mentions(st, s6.String())
		})
	}
	if _, err := l.Client.Delete(ctx(t), lease.NewKeys("").Lease("joiner")); err != nil {
		t.Fatal(err)
	}
	for _, h := range l.Hosts {
		testutil.Eventually(t, 30*time.Second, h.Name+" drops the joiner", func() bool {
			st := leasedState(t, h)
			return !mentions(st, s4.String()) && !mentions(st, s6.String())
		})
	}

	restart(oldHost, previous)
	check("the previous agent restarted", start)
	resumed := func(h *lab.Host) {
		t.Helper()
		testutil.Eventually(t, 30*time.Second, h.Name+" resumes its etcd lease", func() bool {
			return strings.Contains(l.LogTail(h, 400), "resuming the etcd lease of this host's previous run")
		})
	}
	restart(newHost, "")
	check("the current agent restarted next to the previous one", start)
	resumed(newHost)
	restart(oldHost, "") // upgraded: resumes the lease the previous agent granted
	check("both current again", start)
	resumed(oldHost)

	// The current agents watch only the config and the lease records;
	// the records all agents wrote are well-formed for every version.
	v, err := lease.NewRegistry(l.Client, "").List(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(v.Records) != 2 || len(v.Malformed) != 0 {
		t.Errorf("records %v, malformed %v; want 2 well-formed", v.Records, v.Malformed)
	}
}

func equalSubnets(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if strings.Join(v, ",") != strings.Join(b[k], ",") {
			return false
		}
	}
	return true
}
