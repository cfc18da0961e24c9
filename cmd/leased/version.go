package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"
)

// version is stamped at build time by the Makefile
// (-ldflags "-X main.version=$(dist/version.sh)"); a plain `go build`
// leaves it empty and buildVersion derives one from the VCS stamp.
var version string

// buildVersion returns the version this binary reports: the stamped one,
// else "0.0.0+git<revision>[.dirty]" from the Go toolchain's VCS stamp,
// else "0.0.0+unknown".
func buildVersion() string {
	if version != "" {
		return version
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "0.0.0+unknown"
	}
	rev, dirty := "", false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return "0.0.0+unknown"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	v := "0.0.0+git" + rev
	if dirty {
		v += ".dirty"
	}
	return v
}

// versionText is what `leased version` and `leased --version` print.
func versionText() string {
	return fmt.Sprintf("leased %s (%s, %s/%s)\n", buildVersion(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// isVersionFlag reports whether arg asks for the version.
func isVersionFlag(arg string) bool {
	switch strings.TrimLeft(arg, "-") {
	case "version":
		return strings.HasPrefix(arg, "-")
	}
	return false
}
