package backend

import (
	"errors"
	"fmt"
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
// v6) in opts.NetNS: links, routes and neighbour entries (CAP_NET_ADMIN),
// the forwarding sysctls (write access to /proc/sys/net), iptables, and for
// proxy-ndp an AF_PACKET socket (CAP_NET_RAW). It returns a
// *PrivilegeError naming every missing privilege, or nil. The agent calls
// it before it claims a subnet: a host that cannot forward must not
// advertise one.
func CheckPrivileges(typ string, ext ExtIface, v4, v6 bool, opts Options) error {
	return StartPrivilegeCheck(ext, opts)(typ, v4, v6)
}

// StartPrivilegeCheck runs CheckPrivileges' probes for every backend type
// and family in the background (the iptables runs take tens of
// milliseconds) and returns a function that waits for them and returns
// what CheckPrivileges would for typ, v4 and v6. The agent starts it
// before it knows the config, so that the probes overlap etcd's answers.
func StartPrivilegeCheck(ext ExtIface, opts Options) func(typ string, v4, v6 bool) error {
	var p privileges
	done := make(chan struct{})
	go func() {
		defer close(done)
		ipt := make(chan struct{})
		go func() {
			defer close(ipt)
			p.ipt6 = probeIptables(opts.NetNS, "ip6tables")
		}()
		p.ipt4 = probeIptables(opts.NetNS, "iptables")
		err := nsExec{path: opts.NetNS}.do(func() error {
			p.rtnl = probeRtnetlink()
			p.sysctl4 = probeSysctls(ext, true, false)
			p.sysctl6 = probeSysctls(ext, false, true)
			p.packet = probePacketSocket()
			return nil
		})
		if err != nil {
			p.rtnl = err
		}
		<-ipt
	}()
	return func(typ string, v4, v6 bool) error {
		<-done
		return p.check(typ, v4, v6)
	}
}

// privileges holds the probes' findings; each nil or empty means allowed.
type privileges struct {
	rtnl, packet     error
	sysctl4, sysctl6 []string
	ipt4, ipt6       []string
}

func (p *privileges) check(typ string, v4, v6 bool) error {
	var problems []string
	if p.rtnl != nil {
		problems = append(problems, p.rtnl.Error())
	}
	if v4 {
		problems = append(problems, p.sysctl4...)
	}
	if v6 {
		problems = append(problems, p.sysctl6...)
	}
	if v4 {
		problems = append(problems, p.ipt4...)
	}
	if v6 {
		problems = append(problems, p.ipt6...)
	}
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
// there. Nothing is changed either way.
func probeRtnetlink() error {
	req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	switch {
	case err == nil, errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENODEV):
		return nil
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("CAP_NET_ADMIN is missing: links, routes and neighbour entries cannot be changed (%v)", err)
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
		if l := ext.Link(true).Name; l != "" {
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

// probeIptables lists the FORWARD chain with bin, as the backend does
// before it changes it. A missing binary is not a privilege problem (the
// backend reports ErrNoIptables).
func probeIptables(netns, bin string) []string {
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil
	}
	var out []byte
	err = nsExec{path: netns}.do(func() error {
		var err error
		out, err = exec.Command(path, "-w", "5", "-t", "filter", "-S", "FORWARD").CombinedOutput()
		return err
	})
	if err == nil {
		return nil
	}
	msg := strings.TrimSpace(string(out))
	if i := strings.IndexByte(msg, '\n'); i >= 0 {
		msg = msg[:i]
	}
	if msg == "" {
		msg = err.Error()
	}
	return []string{fmt.Sprintf("%s cannot read the FORWARD chain (it needs CAP_NET_ADMIN; iptables-legacy also CAP_NET_RAW and a writable /run/xtables.lock): %s", bin, msg)}
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

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
