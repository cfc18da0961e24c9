// Package e2e runs leased end to end: real etcd, real agent processes in
// network namespaces, real kernel datapath. It needs root; CI runs as root.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/leased/leased/internal/lab"
)

var binary string

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" { // as testutil.RequireRoot: never skip in CI
			fmt.Println("e2e: needs root (network namespaces); CI must run the tests as root")
			os.Exit(1)
		}
		fmt.Println("e2e: needs root (network namespaces); skipping")
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "leased-e2e-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "leased")
	build := exec.Command("go", "build", "-o", binary, "../../cmd/leased")
	build.Env = append(os.Environ(), "CGO_ENABLED=0") // as make build does
	out, err := build.CombinedOutput()
	if err != nil {
		fmt.Printf("building leased: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// up starts a lab for the test and tears it down when the test ends,
// printing the agents' logs if the test failed.
func up(t *testing.T, cfg lab.Config) *lab.Lab {
	t.Helper()
	cfg.Binary = binary
	if cfg.Hosts == 0 {
		cfg.Hosts = 2
	}
	if !cfg.IPv4 && !cfg.IPv6 {
		cfg.IPv4, cfg.IPv6 = true, true
	}
	cfg.AgentArgs = append(cfg.AgentArgs, "-v=2", "--resync-interval=2s")
	if cfg.ReserveTop == 0 {
		cfg.ReserveTop = 32 // synthetic peers live at the top of the range (lastSubnet)
	}
	cfg.Log = t.Logf
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	l, err := lab.Up(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range l.Hosts {
				t.Logf("--- agent log of %s ---\n%s", h.Name, l.LogTail(h, 40))
			}
		}
		l.Close()
	})
	return l
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

// routeTo returns the line of `ip route show <dst>` in h (empty if none).
func routeTo(t *testing.T, h *lab.Host, dst string) string {
	t.Helper()
	fam := "-4"
	if strings.Contains(dst, ":") {
		fam = "-6"
	}
	out, err := h.IP(fam, "route", "show", dst)
	if err != nil {
		t.Fatalf("ip route show %s in %s: %v %s", dst, h.Name, err, out)
	}
	return strings.TrimSpace(out)
}

func mustIP(t *testing.T, h *lab.Host, args ...string) string {
	t.Helper()
	out, err := h.IP(args...)
	if err != nil {
		t.Fatalf("ip %v in %s: %v: %s", args, h.Name, err, out)
	}
	return out
}
