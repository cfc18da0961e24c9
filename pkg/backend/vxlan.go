package backend

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/leased/leased/pkg/ipfam"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/pkg/backend/vtep"
	"k8s.io/klog/v2"
)

// VXLAN device names. The vxlan backend creates one device per enabled
// overlay family:
//
//   - VXLANDev4 ("leased.4") carries the IPv4 overlay; its underlay is IPv4
//     (source ext.V4.Addr) when the external interface has an IPv4 address,
//     else IPv6.
//   - VXLANDev6 ("leased.6") carries the IPv6 overlay; its underlay is IPv6
//     (source ext.V6.Addr) when ext has an IPv6 address, else IPv4.
//
// Both use the configured UDP port and VNI, learning off, bound to the
// external link of their underlay family (ExtIface.Link: IPv4 and IPv6 may
// use different links), with that link's MTU minus the encapsulation: 50
// bytes over IPv4, 70 over IPv6. Two
// devices on the same underlay family and port cannot share a VNI, so a
// device whose underlay is borrowed from the other family uses VNI+1
// (16777215 wraps to 1); the rule depends only on the host's own addresses,
// so it agrees across a cluster whose hosts have the same underlay families.
//
// The device address is the local subnet's network address as /32 (/128),
// e.g. 10.100.15.0/32 on leased.4; each peer is reached via its subnet's
// network address, resolved by a permanent neighbour entry to the peer's
// VTEP MAC, which a permanent FDB entry maps to the peer's public address.
const (
	VXLANDev4 = "leased.4"
	VXLANDev6 = "leased.6"
)

// VXLANLeaseData is what the vxlan backend publishes in its lease
// (LeaseData): the MACs of its two devices, each derived from the node name
// (see package vtep, which the peer filter checks records against).
type VXLANLeaseData = vtep.LeaseData

// vtepMAC derives a stable, locally administered unicast MAC for the node's
// device of one overlay family.
func vtepMAC(node string, v6 bool) net.HardwareAddr { return vtep.MAC(node, v6) }

// vxDev is the wanted shape of one VXLAN device.
type vxDev struct {
	name       string
	overlay6   bool
	underlay6  bool
	vni, port  int
	src        netip.Addr
	mac        net.HardwareAddr
	mtu        int
	underIndex int
}

type vxlan struct {
	cfg  Config
	ext  ExtIface
	data json.RawMessage
	devs [2]vxDev // by overlay family (indexed by ipfam.Family)
	idx  [2]int   // ifindex after the last ensure, 0 when absent
}

func newVXLAN(cfg Config, ext ExtIface, node string) *vxlan {
	v := &vxlan{cfg: cfg, ext: ext}
	for overlay := range ipfam.Families() {
		under := overlay
		if !ext.Link(under).Addr.IsValid() {
			under = under.Other()
		}
		link := ext.Link(under)
		d := vxDev{
			name: VXLANDev4, overlay6: overlay == ipfam.IPv6, underlay6: under == ipfam.IPv6,
			vni: cfg.VNI, port: cfg.Port, mac: vtepMAC(node, overlay == ipfam.IPv6),
			mtu: link.MTU - 50, underIndex: link.Index, src: link.Addr,
		}
		if overlay == ipfam.IPv6 {
			d.name = VXLANDev6
		}
		if under == ipfam.IPv6 {
			d.mtu = link.MTU - 70
		}
		if under != overlay {
			d.vni = d.vni%maxVNI + 1
		}
		v.devs[overlay] = d
	}
	v.data = vtep.Data(node)
	return v
}

func (v *vxlan) leaseData() json.RawMessage { return v.data }

func (v *vxlan) mtu(local Local) int {
	m := 0
	for i, d := range v.devs {
		if local.Subnet.Get(ipfam.Family(i)).IsValid() || !ipfam.Any(local.Subnet) {
			if m == 0 || d.mtu < m {
				m = d.mtu
			}
		}
	}
	return m
}

// checkDevices implements deviceChecker. The desired state names the
// devices by ifindex; it takes the indexes of the devices as they are
// (ensure, which would set them, changes the kernel).
func (v *vxlan) checkDevices(k kernel, local Local) (owned []int, missing, extra []string) {
	for i, dev := range v.devs {
		v.idx[i] = 0
		l, err := k.LinkByName(dev.name)
		if !local.Subnet.Get(ipfam.Family(i)).IsValid() {
			if err == nil {
				extra = append(extra, "device "+dev.name+" (its family holds no subnet)")
			}
			continue
		}
		if err != nil {
			missing = append(missing, "device "+dev.name)
			continue
		}
		if why := dev.mismatch(l); why != "" {
			extra = append(extra, fmt.Sprintf("device %s (%s)", dev.name, why))
		}
		v.idx[i] = l.Attrs().Index
		owned = append(owned, v.idx[i])
	}
	return owned, missing, extra
}

// ensure creates, repairs or removes the devices so that exactly the enabled
// overlay families have a correct device, and returns their ifindexes.
func (v *vxlan) ensure(k kernel, local Local) ([]int, error) {
	var errs []error
	var owned []int
	for i, d := range v.devs {
		subnet := local.Subnet.Get(ipfam.Family(i))
		if !subnet.IsValid() {
			errs = append(errs, removeDevice(k, d.name))
			v.idx[i] = 0
			continue
		}
		idx, err := ensureDevice(k, d, subnet, v.idx[i] != 0)
		if err != nil {
			errs = append(errs, fmt.Errorf("setting up %s: %w", d.name, err))
		}
		v.idx[i] = idx
		if idx != 0 {
			owned = append(owned, idx)
		}
	}
	return owned, errors.Join(errs...)
}

func removeDevice(k kernel, name string) error {
	l, err := k.LinkByName(name)
	if err != nil {
		if isLinkNotFound(err) {
			return nil
		}
		return fmt.Errorf("looking up %s: %w", name, err)
	}
	if err := k.LinkDel(l); err != nil && !isGone(err) {
		return fmt.Errorf("deleting %s: %w", name, err)
	}
	klog.InfoS("deleted VXLAN device of a disabled family", "device", name)
	return nil
}

// mismatch says why an existing link cannot serve as d, or "".
func (d vxDev) mismatch(l netlink.Link) string {
	vx, ok := l.(*netlink.Vxlan)
	switch {
	case !ok:
		return "not a vxlan device (" + l.Type() + ")"
	case vx.VxlanId != d.vni:
		return fmt.Sprintf("VNI %d, want %d", vx.VxlanId, d.vni)
	case vx.Port != d.port:
		return fmt.Sprintf("port %d, want %d", vx.Port, d.port)
	case !vx.SrcAddr.Equal(net.IP(d.src.AsSlice())):
		return fmt.Sprintf("source %s, want %s", vx.SrcAddr, d.src)
	case vx.VtepDevIndex != d.underIndex:
		return fmt.Sprintf("underlay device #%d, want #%d", vx.VtepDevIndex, d.underIndex)
	case vx.Learning:
		return "learning on"
	}
	return ""
}

// ensureDevice makes the device match d and carry subnet's network address;
// it returns the device's ifindex (0 if it could not be created).
func ensureDevice(k kernel, d vxDev, subnet netip.Prefix, hadIt bool) (int, error) {
	l, err := k.LinkByName(d.name)
	switch {
	case err != nil && !isLinkNotFound(err):
		return 0, fmt.Errorf("looking up device: %w", err)
	case err == nil:
		if why := d.mismatch(l); why != "" {
			klog.InfoS("recreating VXLAN device", "device", d.name, "reason", why)
			if err := k.LinkDel(l); err != nil && !isGone(err) {
				return 0, fmt.Errorf("deleting device: %w", err)
			}
			l = nil
		}
	default:
		l = nil
		if hadIt {
			klog.Warningf("VXLAN device %s disappeared; recreating it and replaying every peer", d.name)
		}
	}
	if l == nil {
		attrs := netlink.NewLinkAttrs()
		attrs.Name, attrs.MTU, attrs.HardwareAddr = d.name, d.mtu, d.mac
		vx := &netlink.Vxlan{
			LinkAttrs: attrs, VxlanId: d.vni, Port: d.port, VtepDevIndex: d.underIndex,
			SrcAddr: net.IP(d.src.AsSlice()), Learning: false,
		}
		if err := k.LinkAdd(vx); err != nil {
			return 0, fmt.Errorf("creating device (vni %d, port %d, local %s): %w", d.vni, d.port, d.src, err)
		}
		klog.InfoS("created VXLAN device", "device", d.name, "vni", d.vni, "port", d.port, "local", d.src, "mtu", d.mtu)
		if l, err = k.LinkByName(d.name); err != nil {
			return 0, fmt.Errorf("looking up created device: %w", err)
		}
	}
	a := l.Attrs()
	var errs []error
	if a.MTU != d.mtu {
		errs = append(errs, wrap("setting MTU", k.LinkSetMTU(l, d.mtu)))
	}
	if a.HardwareAddr.String() != d.mac.String() {
		errs = append(errs, wrap("setting MAC", k.LinkSetHardwareAddr(l, d.mac)))
	}
	if a.Flags&net.FlagUp == 0 {
		errs = append(errs, wrap("setting link up", k.LinkSetUp(l)))
	}
	errs = append(errs, ensureAddr(k, l, subnet))
	return a.Index, errors.Join(errs...)
}

func wrap(what string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", what, err)
}

// ensureAddr gives l exactly one global address of subnet's family: the
// subnet's network address as a host prefix.
func ensureAddr(k kernel, l netlink.Link, subnet netip.Prefix) error {
	want := netip.PrefixFrom(subnet.Masked().Addr(), subnet.Addr().BitLen())
	fam := family(want.Addr())
	addrs, err := k.AddrList(l.Attrs().Index, fam)
	if err != nil {
		return err
	}
	var errs []error
	found := false
	for _, a := range addrs {
		p, ok := prefixFromIPNet(a.IPNet)
		if !ok || a.Scope != unix.RT_SCOPE_UNIVERSE {
			continue
		}
		if p == want {
			found = true
			continue
		}
		if err := k.AddrDel(l, &a); err != nil && !isGone(err) {
			errs = append(errs, fmt.Errorf("deleting old address %s: %w", p, err))
		}
	}
	if !found {
		a := &netlink.Addr{IPNet: ipNet(want)}
		if fam == unix.AF_INET6 {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := k.AddrReplace(l, a); err != nil {
			errs = append(errs, fmt.Errorf("adding address %s: %w", want, err))
		}
	}
	return errors.Join(errs...)
}

// peerMACs decodes a vxlan peer's lease data.
func peerMACs(p Peer) (VXLANLeaseData, error) {
	var d VXLANLeaseData
	if p.BackendType != TypeVXLAN {
		return d, fmt.Errorf("peer runs backend %q, not vxlan", p.BackendType)
	}
	if err := json.Unmarshal(p.BackendData, &d); err != nil {
		return d, fmt.Errorf("decoding peer backend data: %w", err)
	}
	return d, nil
}

func (v *vxlan) desired(in input) (state, []skip) {
	st := newState()
	var skips []skip
	for _, p := range in.peers {
		data, derr := peerMACs(p)
		fams, nf := families(in.local, p)
		for _, f := range fams[:nf] {
			if v.cfg.DirectRouting && f.public.IsValid() && onLink(f.public, in.connected) {
				if s, ok := directRoute(in, p, f, &st); !ok {
					skips = append(skips, s)
				}
				continue
			}
			if s, ok := v.overlayPeer(in, p, f, data, derr, &st); !ok {
				skips = append(skips, s)
			}
		}
	}
	return st, skips
}

// overlayPeer adds the neighbour, FDB entry and route that reach one peer
// family over its VXLAN device, or returns why it cannot.
func (v *vxlan) overlayPeer(in input, p Peer, f peerFamily, data VXLANLeaseData, derr error, st *state) (skip, bool) {
	i := 0
	macStr := data.VtepMAC
	if f.fam == ipfam.IPv6 {
		i, macStr = 1, data.VtepMAC6
	}
	d, idx := v.devs[i], v.idx[i]
	dst := p.PublicIP.V4
	if d.underlay6 {
		dst = p.PublicIP.V6
	}
	gw := f.subnet.Addr()
	sk := skip{node: p.Node, subnet: f.subnet, gateway: dst}
	mac, merr := net.ParseMAC(macStr)
	switch {
	case p.Node == in.local.Node:
		sk.reason = "peer has this host's node name: skipped"
	case in.refusal(f) != "":
		sk.reason = in.refusal(f)
	case idx == 0:
		sk.reason = "no " + d.name + " device: skipped"
	case derr != nil:
		sk.reason = derr.Error() + ": skipped"
	case merr != nil || len(mac) != 6:
		sk.reason = fmt.Sprintf("peer has no usable VTEP MAC for %s (%q): skipped", d.name, macStr)
	case mac[0]&1 != 0 || bytes.Equal(mac, make(net.HardwareAddr, 6)):
		sk.reason = fmt.Sprintf("peer's VTEP MAC for %s (%s) is not a unicast MAC: skipped", d.name, mac)
	case !dst.IsValid():
		sk.reason = "peer has no public address of the underlay family of " + d.name + ": skipped"
	}
	if sk.reason != "" {
		return sk, false
	}
	r := route{Dst: f.subnet, Priority: defaultPriority(f.subnet), Gw: gw, Link: idx, OnLink: true}
	fe := fdb{Link: idx, MAC: mac.String(), Dst: dst}
	if _, dup := st.fdbs[fe.key()]; dup {
		sk.reason, sk.dup = "peer VTEP MAC "+fe.MAC+" is already used by another peer: skipped", true
		return sk, false
	}
	if _, dup := st.routes[r.key()]; dup {
		sk.reason, sk.dup = "peer subnet is already routed: skipped", true
		return sk, false
	}
	st.fdbs[fe.key()] = fe
	n := neigh{Link: idx, IP: gw, MAC: fe.MAC}
	st.neighs[n.key()] = n
	st.routes[r.key()] = r
	return sk, true
}
