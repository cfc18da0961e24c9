package atomicfile

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/leased/leased/internal/testutil"
)

// leftovers returns the names in dir other than keep.
func leftovers(t *testing.T, dir string, keep ...string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var extra []string
	for _, e := range entries {
		if !slices.Contains(keep, e.Name()) {
			extra = append(extra, e.Name())
		}
	}
	return extra
}

func TestWriteContentAndMode(t *testing.T) {
	old := syscall.Umask(0o077) // a strict umask must not change the mode
	t.Cleanup(func() { syscall.Umask(old) })
	tests := []struct {
		name    string
		before  os.FileMode // 0: no file yet
		perm    os.FileMode
		content string
	}{
		{"new file 0644", 0, 0o644, "a=1\n"},
		{"new file 0600", 0, 0o600, "secret\n"},
		{"replaces a 0600 file with 0644", 0o600, 0o644, "b=2\n"},
		{"replaces a 0644 file with 0600", 0o644, 0o600, "c=3\n"},
		{"empty content", 0o644, 0o644, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "state")
			var before os.FileInfo
			if tt.before != 0 {
				if err := os.WriteFile(path, []byte("old content\n"), tt.before); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(path, tt.before); err != nil {
					t.Fatal(err)
				}
				var err error
				if before, err = os.Stat(path); err != nil {
					t.Fatal(err)
				}
			}
			if err := Write(path, []byte(tt.content), tt.perm); err != nil {
				t.Fatalf("Write: %v", err)
			}
			got, err := os.ReadFile(path)
			if err != nil || string(got) != tt.content {
				t.Errorf("content = %q, %v; want %q", got, err, tt.content)
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode() != tt.perm {
				t.Errorf("mode = %v, want %v", fi.Mode(), tt.perm)
			}
			if before != nil && os.SameFile(before, fi) {
				t.Error("the file was rewritten in place, not replaced by a rename")
			}
			if extra := leftovers(t, dir, "state"); extra != nil {
				t.Errorf("directory also holds %v (temporary files left behind?)", extra)
			}
		})
	}
}

// TestWriteFailsCleanly: a Write that cannot complete returns an error
// naming the path, leaves no temporary file and leaves what was at the
// path as it was.
func TestWriteFailsCleanly(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) string // returns the path to write
		check func(t *testing.T, path string)       // what was at path is unchanged
	}{
		{"directory missing", func(t *testing.T, dir string) string {
			return filepath.Join(dir, "missing", "state")
		}, func(t *testing.T, path string) {
			if _, err := os.Stat(filepath.Dir(path)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the missing directory exists after Write: %v", err)
			}
		}},
		{"parent is a file", func(t *testing.T, dir string) string {
			if err := os.WriteFile(filepath.Join(dir, "f"), []byte("file\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(dir, "f", "state")
		}, func(t *testing.T, path string) {
			if b, err := os.ReadFile(filepath.Dir(path)); err != nil || string(b) != "file\n" {
				t.Errorf("the parent file reads %q, %v", b, err)
			}
		}},
		{"path is a non-empty directory", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "state")
			if err := os.MkdirAll(filepath.Join(p, "inner"), 0o755); err != nil {
				t.Fatal(err)
			}
			return p
		}, func(t *testing.T, path string) {
			if fi, err := os.Stat(filepath.Join(path, "inner")); err != nil || !fi.IsDir() {
				t.Errorf("the directory at the path is gone: %v", err)
			}
		}},
		{"directory not writable", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "state")
			if err := os.WriteFile(p, []byte("old\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			readOnly(t, dir)
			return p
		}, oldContent},
		{"file system full", func(t *testing.T, dir string) string {
			testutil.RequireRoot(t)
			mountTmpfs(t, dir, "size=64k")
			p := filepath.Join(dir, "state")
			if err := os.WriteFile(p, []byte("old\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			return p
		}, oldContent},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "d")
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			path := tt.setup(t, dir)
			data := bytes.Repeat([]byte("new content\n"), 100_000) // more than the full file system holds
			err := Write(path, data, 0o644)
			if err == nil {
				t.Fatal("Write succeeded")
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("error %q does not name %s", err, path)
			}
			if errors.Is(err, ErrDirSync) {
				t.Errorf("error %q claims the content is in place", err)
			}
			tt.check(t, path)
			for _, d := range slices.Compact([]string{dir, filepath.Dir(path)}) {
				entries, _ := os.ReadDir(d)
				for _, e := range entries {
					if strings.Contains(e.Name(), ".tmp") {
						t.Errorf("temporary file %s left in %s", e.Name(), d)
					}
				}
			}
		})
	}
}

func oldContent(t *testing.T, path string) {
	t.Helper()
	if b, err := os.ReadFile(path); err != nil || string(b) != "old\n" {
		t.Errorf("the old file reads %q, %v; want %q", b, err, "old\n")
	}
}

// readOnly makes dir unwritable for this process: as root, by mounting a
// read-only bind of it over itself; otherwise by its mode.
func readOnly(t *testing.T, dir string) {
	t.Helper()
	if os.Geteuid() != 0 {
		if err := os.Chmod(dir, 0o555); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Chmod(dir, 0o755) })
		return
	}
	if err := syscall.Mount(dir, dir, "", syscall.MS_BIND, ""); err != nil {
		skipOutsideCI(t, "cannot bind-mount %s: %v", dir, err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
	if err := syscall.Mount("", dir, "", syscall.MS_BIND|syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
		t.Fatalf("remounting %s read-only: %v", dir, err)
	}
}

// mountTmpfs mounts a tmpfs with opts on dir until the test ends.
func mountTmpfs(t *testing.T, dir, opts string) {
	t.Helper()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, opts); err != nil {
		skipOutsideCI(t, "cannot mount a tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
}

// skipOutsideCI skips t for a reason a developer's machine may have (no
// mount privilege in a container), and fails it in CI, which runs as root
// and must run every test.
func skipOutsideCI(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}
