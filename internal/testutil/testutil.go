// Package testutil holds helpers shared by the tests of several packages.
// Only tests import it, so it never reaches the leased binaries.
package testutil

import (
	"os"
	"testing"
)

// RequireRoot skips t when not run as root (network namespaces, iptables),
// except in CI (CI set), which runs every test as root: there it fails, so
// that no kernel test is ever skipped silently.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("needs root for network namespaces; CI must run the tests as root")
	}
	t.Skip("needs root for network namespaces; CI runs as root")
}
