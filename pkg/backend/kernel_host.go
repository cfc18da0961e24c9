package backend

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/coreos/go-iptables/iptables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/pkg/backend/ndp"
)

// The parts of kernel beyond the tables: sysctls, firewall rules, netlink
// events and the proxy-NDP responder's own connection. Each may be used
// from any goroutine.

// sysctls reads and writes /proc/sys in the kernel's namespace. Names use
// slashes: "net/ipv4/ip_forward".
type sysctls interface {
	// Sysctl returns the value of the sysctl, without surrounding space.
	Sysctl(name string) (string, error)
	// SetSysctl writes value to the sysctl.
	SetSysctl(name, value string) error
}

// firewall gives the namespace's iptables.
type firewall interface {
	// IPTables returns iptables (v6: ip6tables); it fails with an error
	// wrapping ErrNoIptables when the binary or its -restore is missing.
	IPTables(v6 bool) (ipTables, error)
}

// ipTables is one family's iptables as leased's chains need it. Rules are
// given as arguments after the chain, lists in iptables -S form.
type ipTables interface {
	// Cmd is the binary's name, iptables or ip6tables, for messages.
	Cmd() string
	// ListTable lists every chain and rule of table (iptables -t TABLE
	// -S: "-P", "-N" and "-A" lines), in one run.
	ListTable(table string) ([]string, error)
	Append(table, chain string, rule ...string) error
	Insert(table, chain string, pos int, rule ...string) error
	Delete(table, chain string, rule ...string) error
	ClearAndDeleteChain(table, chain string) error
	// Restore replaces chain's rules with lines (iptables -S form) in
	// one transaction, creating the chain if needed; other chains are
	// untouched.
	Restore(table, chain string, lines []string) error
}

// eventSource subscribes to the kernel's netlink events. Each call keeps
// sending on ch until done is closed, then closes ch; onErr is called when
// the subscription breaks (ch is closed then too).
type eventSource interface {
	SubscribeRoutes(ch chan<- netlink.RouteUpdate, done <-chan struct{}, onErr func(error)) error
	SubscribeLinks(ch chan<- netlink.LinkUpdate, done <-chan struct{}, onErr func(error)) error
	SubscribeNeighs(ch chan<- netlink.NeighUpdate, done <-chan struct{}, onErr func(error)) error
}

// sideOpener gives a part that runs beside the engine (the proxy-NDP
// responder) its own connection to the same namespace, so that it never
// waits for the engine's mutex. The connection opens its sockets on first
// use; its owner closes it.
type sideOpener interface {
	Side() ndp.Kernel
}

// packetSockets tells which packet sockets exist (for leased status: is
// a responder listening?).
type packetSockets interface {
	// PacketSockets returns the inodes of the packet sockets bound to
	// ifindex for IPv6.
	PacketSockets(ifindex int) (map[uint64]bool, error)
}

// openKernel opens the production kernel in ns.
func openKernel(ns nsExec) (netlinkKernel, error) {
	h, err := ns.handle()
	if err != nil {
		return netlinkKernel{}, fmt.Errorf("opening netlink handle: %w", err)
	}
	b, err := newRouteBatcher(ns)
	if err != nil {
		h.Close()
		return netlinkKernel{}, err
	}
	db, err := newRouteBatcher(ns)
	if err != nil {
		h.Close()
		b.close()
		return netlinkKernel{}, err
	}
	return netlinkKernel{h: h, b: b, d: &dumper{b: db}, ns: ns, ipts: &iptCache{t: map[bool]ipTables{}}}, nil
}

func (k netlinkKernel) Close() error {
	k.h.Close()
	k.b.close()
	if k.d != nil {
		// After a dump in flight, which holds d.mu.
		k.d.mu.Lock()
		k.d.b.close()
		k.d.mu.Unlock()
	}
	return nil
}

func (k netlinkKernel) NeighProxyList(index, family int) ([]netlink.Neigh, error) {
	return k.h.NeighProxyList(index, family)
}

func (k netlinkKernel) RouteListAll(family int, keep func(*netlink.Route) bool) ([]netlink.Route, error) {
	return retryDump("routes", func() ([]netlink.Route, error) {
		var out []netlink.Route
		err := k.h.RouteListFilteredIter(family, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE, func(r netlink.Route) bool {
			if keep(&r) {
				out = append(out, r)
			}
			return true
		})
		return out, err
	})
}

func (k netlinkKernel) Sysctl(name string) (string, error) {
	var v string
	err := k.ns.do(func() error {
		b, err := os.ReadFile(filepath.Join("/proc/sys", name))
		v = string(bytes.TrimSpace(b))
		return err
	})
	if err != nil {
		return "", fmt.Errorf("reading sysctl %s: %w", name, err)
	}
	return v, nil
}

func (k netlinkKernel) SetSysctl(name, value string) error {
	err := k.ns.do(func() error { return os.WriteFile(filepath.Join("/proc/sys", name), []byte(value), 0o644) })
	if err != nil {
		return fmt.Errorf("setting sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

func (k netlinkKernel) IPTables(v6 bool) (ipTables, error) {
	proto, bin := iptables.ProtocolIPv4, "iptables"
	if v6 {
		proto, bin = iptables.ProtocolIPv6, "ip6tables"
	}
	if _, err := exec.LookPath(bin); err != nil {
		return nil, fmt.Errorf("%w (%s: %v)", ErrNoIptables, bin, err)
	}
	if _, err := exec.LookPath(bin + "-restore"); err != nil {
		return nil, fmt.Errorf("%w (%s-restore: %v)", ErrNoIptables, bin, err)
	}
	if k.ipts != nil {
		k.ipts.mu.Lock()
		defer k.ipts.mu.Unlock()
		if t := k.ipts.t[v6]; t != nil {
			return t, nil
		}
	}
	var ipt *iptables.IPTables
	err := k.ns.do(func() error {
		var err error
		ipt, err = iptables.NewWithProtocol(proto)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("running %s: %w", bin, err)
	}
	t := nsIPTables{ns: k.ns, ipt: ipt, bin: bin}
	if k.ipts != nil {
		k.ipts.t[v6] = t
	}
	return t, nil
}

// iptCache keeps each family's iptables across the periodic host checks:
// making one runs `iptables --version`. The binaries' presence is still
// checked on every call.
type iptCache struct {
	mu sync.Mutex
	t  map[bool]ipTables
}

// nsIPTables runs go-iptables in a namespace: a command forks from the
// calling thread, which nsExec.do has switched into it.
type nsIPTables struct {
	ns  nsExec
	ipt *iptables.IPTables
	bin string
}

func (t nsIPTables) Cmd() string { return t.bin }

func (t nsIPTables) ListTable(table string) (lines []string, err error) {
	err = t.ns.do(func() error {
		// -w 5 as the restore: wait for iptables-legacy's lock rather
		// than fail while another program holds it.
		cmd := exec.Command(t.bin, "-w", "5", "-t", table, "-S")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("%s -t %s -S: %w: %s", t.bin, table, err, bytes.TrimSpace(stderr.Bytes()))
		}
		lines = strings.Split(strings.TrimSpace(string(out)), "\n")
		return nil
	})
	return lines, err
}

func (t nsIPTables) Append(table, chain string, rule ...string) error {
	return t.ns.do(func() error { return t.ipt.Append(table, chain, rule...) })
}

func (t nsIPTables) Insert(table, chain string, pos int, rule ...string) error {
	return t.ns.do(func() error { return t.ipt.Insert(table, chain, pos, rule...) })
}

func (t nsIPTables) Delete(table, chain string, rule ...string) error {
	return t.ns.do(func() error { return t.ipt.Delete(table, chain, rule...) })
}

func (t nsIPTables) ClearAndDeleteChain(table, chain string) error {
	return t.ns.do(func() error { return t.ipt.ClearAndDeleteChain(table, chain) })
}

func (t nsIPTables) Restore(table, chain string, lines []string) error {
	var in bytes.Buffer
	fmt.Fprintf(&in, "*%s\n:%s - [0:0]\n", table, chain)
	for _, l := range lines {
		in.WriteString(l + "\n")
	}
	in.WriteString("COMMIT\n")
	return t.ns.do(func() error {
		cmd := exec.Command(t.bin+"-restore", "--noflush", "-w", "5")
		cmd.Stdin = &in
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("writing chain %s/%s with %s-restore: %w: %s", table, chain, t.bin, err, bytes.TrimSpace(out))
		}
		return nil
	})
}

// subscribeBuf is the receive buffer of each subscription's socket: room
// for the bursts of a large pass.
const subscribeBuf = 1 << 22

// inNS calls sub with the namespace handle for netlink subscriptions (nil
// for the agent's own), closed again once the socket is open.
func (k netlinkKernel) inNS(sub func(*netns.NsHandle) error) error {
	nsh, closeNS, err := k.ns.subscribeNS()
	if err != nil {
		return err
	}
	defer closeNS()
	return sub(nsh)
}

func (k netlinkKernel) SubscribeRoutes(ch chan<- netlink.RouteUpdate, done <-chan struct{}, onErr func(error)) error {
	return k.inNS(func(nsh *netns.NsHandle) error {
		return netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{Namespace: nsh, ErrorCallback: onErr, ReceiveBufferSize: subscribeBuf})
	})
}

func (k netlinkKernel) SubscribeLinks(ch chan<- netlink.LinkUpdate, done <-chan struct{}, onErr func(error)) error {
	return k.inNS(func(nsh *netns.NsHandle) error {
		return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{Namespace: nsh, ErrorCallback: onErr, ReceiveBufferSize: subscribeBuf})
	})
}

func (k netlinkKernel) SubscribeNeighs(ch chan<- netlink.NeighUpdate, done <-chan struct{}, onErr func(error)) error {
	return subscribeNeighs(k.ns, ch, done, onErr)
}

func subscribeNeighs(ns nsExec, ch chan<- netlink.NeighUpdate, done <-chan struct{}, onErr func(error)) error {
	nsh, closeNS, err := ns.subscribeNS()
	if err != nil {
		return err
	}
	defer closeNS()
	return netlink.NeighSubscribeWithOptions(ch, done, netlink.NeighSubscribeOptions{Namespace: nsh, ErrorCallback: onErr, ReceiveBufferSize: subscribeBuf})
}

func (k netlinkKernel) Side() ndp.Kernel { return &sideKernel{ns: k.ns, probe: -1} }

// closedErr is what a closed side connection's calls return.
var errSideClosed = errors.New("backend: the connection is closed")
