// Package atomicfile replaces a file's content so that a reader, or the
// machine after a crash, sees either the old content or the new, never a
// mix or an empty file.
package atomicfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// ErrDirSync is wrapped by the error of a Write whose new content is in
// place but whose directory could not be synced: the file reads the new
// content, but after a crash the old one may come back.
var ErrDirSync = errors.New("the new content is in place, but syncing the directory failed, so after a crash the old content may come back")

// Write replaces the file at path with data, mode perm (exactly: the umask
// does not apply), atomically: it writes a temporary file in the same
// directory (named ".NAME.tmp" and a random suffix, mode 0600 until it
// is complete), sets its mode, syncs it, renames it over path and syncs
// the directory. The directory must exist; Write does not create it.
//
// On an error before the rename, path keeps its old content (or stays
// absent) and no temporary file is left. If only the directory sync fails,
// the error wraps ErrDirSync. The file is owned by the calling process's
// user and group, whoever owned the file it replaces. Errors name path,
// the step that failed and what to check. Concurrent Writes to one path
// are safe: the last rename wins.
func Write(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("writing %s: creating a temporary file next to it: %w (the directory must exist and be writable by this process)", path, err)
	}
	renamed := false
	defer func() {
		if !renamed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("writing %s: writing the temporary file: %w (is the file system full or read-only?)", path, err)
	}
	if err := tmp.Chmod(perm); err != nil {
		return fmt.Errorf("writing %s: setting the mode of the temporary file to %v: %w", path, perm, err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("writing %s: syncing the temporary file: %w (is the file system full or failing?)", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: closing the temporary file: %w (is the file system full or failing?)", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: renaming the temporary file over it: %w (is the path a directory?)", path, err)
	}
	renamed = true
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("writing %s: %w: %w", path, ErrDirSync, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
