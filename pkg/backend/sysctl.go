package backend

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/klog/v2"
)

// setSysctl writes value to /proc/sys/<name> (name uses slashes) unless it
// already holds it. The caller runs it inside the backend's namespace.
func setSysctl(name, value string, changed *bool) error {
	p := filepath.Join("/proc/sys", name)
	cur, err := os.ReadFile(p)
	if err != nil {
		return fmt.Errorf("reading sysctl %s: %w", name, err)
	}
	if string(bytes.TrimSpace(cur)) == value {
		return nil
	}
	if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
		return fmt.Errorf("setting sysctl %s=%s: %w", name, value, err)
	}
	mark(changed)
	klog.V(2).InfoS("set sysctl", "name", name, "value", value)
	return nil
}

func getSysctl(name string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/proc/sys", name))
	if err != nil {
		return "", fmt.Errorf("reading sysctl %s: %w", name, err)
	}
	return string(bytes.TrimSpace(b)), nil
}

// enableForwarding turns on IP forwarding for the enabled families.
//
// IPv6: with net.ipv6.conf.all.forwarding=1 the kernel ignores router
// advertisements on interfaces whose accept_ra is 1, which would drop an
// RA-learned default route on ext. accept_ra=2 keeps accepting them while
// forwarding, so ext's accept_ra is raised from 1 to 2 (0 is left alone).
func enableForwarding(ext string, v4, v6 bool, changed *bool) error {
	if v4 {
		if err := setSysctl("net/ipv4/ip_forward", "1", changed); err != nil {
			return err
		}
	}
	if v6 {
		if ext != "" {
			ra := "net/ipv6/conf/" + ext + "/accept_ra"
			if cur, err := getSysctl(ra); err == nil && cur == "1" {
				if err := setSysctl(ra, "2", changed); err != nil {
					return err
				}
			}
		}
		if err := setSysctl("net/ipv6/conf/all/forwarding", "1", changed); err != nil {
			return err
		}
	}
	return nil
}
