package backend

import (
	"k8s.io/klog/v2"
)

// setSysctl writes value to the sysctl name (name uses slashes) through k
// unless it already holds it.
func setSysctl(k sysctls, name, value string, changed *bool) error {
	cur, err := k.Sysctl(name)
	if err != nil {
		return err
	}
	if cur == value {
		return nil
	}
	if err := k.SetSysctl(name, value); err != nil {
		return err
	}
	mark(changed)
	klog.V(2).InfoS("set sysctl", "name", name, "value", value)
	return nil
}

// enableForwarding turns on IP forwarding for the enabled families.
//
// IPv6: with net.ipv6.conf.all.forwarding=1 the kernel ignores router
// advertisements on interfaces whose accept_ra is 1, which would drop an
// RA-learned default route on ext. accept_ra=2 keeps accepting them while
// forwarding, so ext's accept_ra is raised from 1 to 2 (0 is left alone).
func enableForwarding(k sysctls, ext string, v4, v6 bool, changed *bool) error {
	if v4 {
		if err := setSysctl(k, "net/ipv4/ip_forward", "1", changed); err != nil {
			return err
		}
	}
	if v6 {
		if ext != "" {
			ra := "net/ipv6/conf/" + ext + "/accept_ra"
			if cur, err := k.Sysctl(ra); err == nil && cur == "1" {
				if err := setSysctl(k, ra, "2", changed); err != nil {
					return err
				}
			}
		}
		if err := setSysctl(k, "net/ipv6/conf/all/forwarding", "1", changed); err != nil {
			return err
		}
	}
	return nil
}
