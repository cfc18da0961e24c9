package backend

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// PrivilegeExitStatus is the exit status of an agent that stops because
// CheckPrivileges failed: 4, the LSB status for "insufficient privilege".
// dist/leased.service lists it in RestartPreventExitStatus=, as restarting
// cannot fix it.
const PrivilegeExitStatus = 4

// PrivilegeError says what this process may not do that a backend needs.
// Each problem names the capability or the setting that is missing.
type PrivilegeError struct {
	Backend  string
	Problems []string
}

func (e *PrivilegeError) Error() string {
	return fmt.Sprintf("the %s backend cannot program this host's network: %s. Run leased as root with CAP_NET_ADMIN and CAP_NET_RAW, as dist/leased.service does (AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW, AF_PACKET in RestrictAddressFamilies=, no ProtectKernelTunables=)",
		e.Backend, strings.Join(e.Problems, "; "))
}

// CheckPrivileges checks, without changing anything, that this process can
// program what a backend of type typ needs for the enabled families (v4,
// v6) in opts.NetNS: links, routes, neighbour entries and nftables-based
// iptables rules (CAP_NET_ADMIN), the forwarding sysctls (write access to
// /proc/sys/net), iptables-legacy's raw socket and lock file, and for
// proxy-ndp an AF_PACKET socket (CAP_NET_RAW). It returns a
// *PrivilegeError naming every missing privilege, or nil. Every probe is a
// system call or two, without running iptables, so the check adds about a
// millisecond to the agent's start. The agent calls it before it claims a
// subnet: a host that cannot forward must not advertise one.
func CheckPrivileges(typ string, ext ExtIface, v4, v6 bool, opts Options) error {
	var p privileges
	err := nsExec{path: opts.NetNS}.do(func() error {
		p.rtnl = probeRtnetlink()
		if v4 {
			p.sysctl = append(p.sysctl, probeSysctls(ext, true, false)...)
			p.ipt = append(p.ipt, probeIptables("iptables", unix.AF_INET)...)
		}
		if v6 {
			p.sysctl = append(p.sysctl, probeSysctls(ext, false, true)...)
			p.ipt = append(p.ipt, probeIptables("ip6tables", unix.AF_INET6)...)
		}
		if typ == TypeProxyNDP {
			p.packet = probePacketSocket()
		}
		return nil
	})
	if err != nil {
		return err
	}
	return p.check(typ)
}

// privileges holds the probes' findings; each nil or empty means allowed.
type privileges struct {
	rtnl, packet error
	sysctl, ipt  []string
}

func (p *privileges) check(typ string) error {
	var problems []string
	if p.rtnl != nil {
		problems = append(problems, p.rtnl.Error())
	}
	problems = append(problems, p.sysctl...)
	problems = append(problems, p.ipt...)
	if typ == TypeProxyNDP && p.packet != nil {
		problems = append(problems, p.packet.Error())
	}
	if len(problems) > 0 {
		return &PrivilegeError{Backend: typ, Problems: problems}
	}
	return nil
}

// probeRtnetlink sends an RTM_DELLINK that names no link. The kernel checks
// CAP_NET_ADMIN (over the namespace) before it looks at the request: EPERM
// means the capability is missing, EINVAL ("no link given") that it is
// there. Nothing is changed either way. nftables, which iptables-nft
// programs, checks the same capability.
func probeRtnetlink() error {
	req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	switch {
	case err == nil, errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENODEV):
		return nil
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("CAP_NET_ADMIN is missing: links, routes, neighbour entries and iptables rules cannot be changed (%v)", err)
	}
	return fmt.Errorf("checking netlink access (CAP_NET_ADMIN): %v", err)
}

// probeSysctls opens for writing each sysctl enableForwarding may write.
// Opening checks the permission; nothing is written.
func probeSysctls(ext ExtIface, v4, v6 bool) []string {
	var names []string
	if v4 {
		names = append(names, "net/ipv4/ip_forward")
	}
	if v6 {
		names = append(names, "net/ipv6/conf/all/forwarding")
		if l := ext.Link(ipfam.IPv6).Name; l != "" {
			ra := "net/ipv6/conf/" + l + "/accept_ra"
			if cur, err := getSysctl(ra); err == nil && cur == "1" {
				names = append(names, ra)
			}
		}
	}
	var out []string
	for _, n := range names {
		p := filepath.Join("/proc/sys", n)
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err == nil {
			f.Close()
			continue
		}
		msg := fmt.Sprintf("cannot write the sysctl %s (%v)", strings.ReplaceAll(n, "/", "."), unwrapPath(err))
		switch {
		case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
			msg += ": run leased as root (uid 0)"
		case errors.Is(err, unix.EROFS):
			msg += ": /proc/sys is read-only (systemd's ProtectKernelTunables=yes, or a container): leave it writable"
		}
		out = append(out, msg)
	}
	return out
}

// probeIptables checks what bin needs beyond CAP_NET_ADMIN (which
// probeRtnetlink checks): nothing for iptables-nft; for iptables-legacy
// (bin resolves to xtables-legacy-multi) a raw socket of family fam
// (CAP_NET_RAW) and write access to its lock file. A missing binary is not
// a privilege problem (the backend reports ErrNoIptables).
func probeIptables(bin string, fam int) []string {
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil || !strings.Contains(filepath.Base(real), "legacy") {
		return nil
	}
	var out []string
	fd, err := unix.Socket(fam, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err == nil {
		unix.Close(fd)
	} else {
		out = append(out, fmt.Sprintf("%s is iptables-legacy (%s), which needs CAP_NET_RAW for its raw socket (%v)", bin, real, err))
	}
	lock := os.Getenv("XTABLES_LOCKFILE")
	if lock == "" {
		lock = "/run/xtables.lock"
	}
	target := lock
	if _, err := os.Stat(lock); err != nil {
		target = filepath.Dir(lock) // iptables creates it
	}
	if err := unix.Faccessat(unix.AT_FDCWD, target, unix.W_OK, unix.AT_EACCESS); err != nil {
		out = append(out, fmt.Sprintf("%s is iptables-legacy, which cannot write its lock file %s (%v): create it before leased starts and let leased write it (the unit's ExecStartPre= and ReadWritePaths=)", bin, lock, err))
	}
	return out
}

// probePacketSocket opens and closes the kind of socket proxy-ndp answers on.
func probePacketSocket() error {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err == nil {
		unix.Close(fd)
		return nil
	}
	switch {
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("CAP_NET_RAW is missing: proxy-ndp cannot open its AF_PACKET socket to answer neighbour solicitations (%v)", err)
	case errors.Is(err, unix.EAFNOSUPPORT):
		return fmt.Errorf("AF_PACKET sockets are not allowed (%v): proxy-ndp answers neighbour solicitations on one; add AF_PACKET to systemd's RestrictAddressFamilies=", err)
	}
	return fmt.Errorf("opening an AF_PACKET socket for proxy-ndp (needs CAP_NET_RAW): %v", err)
}

// getSysctl reads a sysctl in the calling thread's namespace.
func getSysctl(name string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/proc/sys", name))
	if err != nil {
		return "", fmt.Errorf("reading sysctl %s: %w", name, err)
	}
	return string(bytes.TrimSpace(b)), nil
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
