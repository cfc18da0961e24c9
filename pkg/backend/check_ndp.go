package backend

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
)

// checkAnswers is Check's part for proxy-ndp, run with the engine's mutex
// held. The answers come from the agent's user-space responder, which
// `leased status` (another process) cannot ask; what it checks instead:
//
//   - missing: no leased process holds an IPv6 packet socket bound to the
//     uplink, so nothing answers the upstream router's solicitations for
//     local.Subnet.V6 (the agent is not running, or its responder stopped);
//   - extra: kernel proxy-NDP entries (ip -6 neigh add proxy) on the
//     uplink for addresses of the cluster network. leased uses none; such
//     an entry answers (with proxy_ndp on) besides or instead of the
//     host that holds the address.
func (b *proxyNDP) checkAnswers(local Local) (missing, extra []string, err error) {
	link := b.ext.Link(ipfam.IPv6)
	if !local.Subnet.V6.IsValid() {
		return nil, nil, nil
	}
	inodes, err := b.k.PacketSockets(link.Index)
	if err != nil {
		return nil, nil, fmt.Errorf("listing packet sockets: %w", err)
	}
	owned, err := ownedByLeased(inodes)
	if err != nil {
		return nil, nil, err
	}
	if !owned {
		missing = append(missing, fmt.Sprintf("ndp answers for %s on %s (no leased process listens for neighbour solicitations there: is the agent running?)", local.Subnet.V6.Masked(), link.Name))
	}
	if local.Network.V6.IsValid() {
		ps, err := b.k.NeighProxyList(link.Index, netlink.FAMILY_V6)
		if err != nil {
			return nil, nil, fmt.Errorf("listing proxy neighbour entries on %s: %w", link.Name, err)
		}
		for _, p := range ps {
			a, ok := netip.AddrFromSlice(p.IP)
			if !ok || !local.Network.V6.Contains(a.Unmap()) {
				continue
			}
			extra = append(extra, fmt.Sprintf("ndp proxy entry %s dev %s (leased answers from user space; delete it: ip -6 neigh del proxy %s dev %s)", a, link.Name, a, link.Name))
		}
	}
	return missing, extra, nil
}

// PacketSockets returns the inodes of the packet sockets in the kernel's
// namespace that are bound to ifindex for IPv6.
func (k netlinkKernel) PacketSockets(ifindex int) (map[uint64]bool, error) {
	var data []byte
	err := k.ns.do(func() (err error) {
		data, err = os.ReadFile("/proc/thread-self/net/packet")
		return err
	})
	if err != nil {
		return nil, err
	}
	return parsePacketSockets(data, ifindex)
}

// parsePacketSockets picks the IPv6 sockets bound to ifindex from the
// text of /proc/net/packet (sk RefCnt Type Proto Iface R Rmem User Inode).
func parsePacketSockets(data []byte, ifindex int) (map[uint64]bool, error) {
	out := map[uint64]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Scan() // header
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 9 || !strings.EqualFold(f[3], "86dd") || f[4] != strconv.Itoa(ifindex) {
			continue
		}
		if ino, err := strconv.ParseUint(f[8], 10, 64); err == nil {
			out[ino] = true
		}
	}
	return out, sc.Err()
}

// ownedByLeased reports whether a process named leased holds one of the
// sockets with the given inodes. It fails when it may not look at such a
// process's descriptors (leased status run as another user than the agent).
func ownedByLeased(inodes map[uint64]bool) (bool, error) {
	if len(inodes) == 0 {
		return false, nil
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		comm, err := os.ReadFile(filepath.Join(p, "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != "leased" {
			continue
		}
		fds, err := os.ReadDir(filepath.Join(p, "fd"))
		if errors.Is(err, fs.ErrPermission) {
			return false, fmt.Errorf("cannot see which sockets the agent (%s) holds: %w; run leased status as root", p, err)
		}
		for _, fd := range fds {
			t, err := os.Readlink(filepath.Join(p, "fd", fd.Name()))
			if err != nil || !strings.HasPrefix(t, "socket:[") {
				continue
			}
			if ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(t, "socket:["), "]"), 10, 64); err == nil && inodes[ino] {
				return true, nil
			}
		}
	}
	return false, nil
}
