package backend

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/leased/leased/pkg/backend/ndp"
)

// fakeKernel is an in-memory kernel for tests of pure logic: routes keyed
// by family, table, destination and metric; neighbour and FDB entries
// keyed by link and address; links and their addresses; sysctls; iptables
// chains (fakeIPTables); the packet sockets of the proxy-NDP responder
// (fakeConn). It implements kernel, the seam production calls through, so
// a backend's Start runs against it.
type fakeKernel struct {
	routes map[string]netlink.Route
	neighs map[string]netlink.Neigh
	addrs  map[int][]netip.Prefix // by ifindex
	links  map[int]netlink.Link   // by ifindex
	// failRoute makes RouteReplace fail for this destination.
	failRoute string
	calls     int // mutating calls of the tables

	// host guards what may be used beside the table calls: sysctls,
	// iptables, subscriptions and the side connection.
	host    sync.Mutex
	sysctl  map[string]string
	ipt     [2]*fakeIPTables // by family: 0 iptables, 1 ip6tables
	noIpt   bool             // IPTables fails with ErrNoIptables
	subs    map[string]int   // subscriptions made, by kind
	conns   []*fakeConn      // packet sockets opened, in order
	closed  bool
	sockets map[uint64]bool // PacketSockets
	proxies []netlink.Neigh // NeighProxyList
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{routes: map[string]netlink.Route{}, neighs: map[string]netlink.Neigh{}, addrs: map[int][]netip.Prefix{},
		links: map[int]netlink.Link{},
		sysctl: map[string]string{
			"net/ipv4/ip_forward":          "0",
			"net/ipv6/conf/all/forwarding": "0",
		},
		ipt:  [2]*fakeIPTables{newFakeIPTables("iptables"), newFakeIPTables("ip6tables")},
		subs: map[string]int{},
	}
}

// addLink adds a link as a test's starting state.
func (f *fakeKernel) addLink(l netlink.Link, addrs ...string) {
	f.links[l.Attrs().Index] = l
	for _, a := range addrs {
		f.addrs[l.Attrs().Index] = append(f.addrs[l.Attrs().Index], netip.MustParsePrefix(a))
	}
}

func routeID(r *netlink.Route) string {
	table := r.Table
	if table == 0 {
		table = unix.RT_TABLE_MAIN
	}
	return fmt.Sprintf("%d/%s/%d", table, r.Dst, r.Priority)
}

func (f *fakeKernel) RouteList(family int) ([]netlink.Route, error) {
	var out []netlink.Route
	for _, r := range f.routes {
		is4 := r.Dst.IP.To4() != nil
		if is4 == (family == unix.AF_INET) {
			out = append(out, r)
		}
	}
	return out, nil
}

func (f *fakeKernel) RouteReplace(r *netlink.Route) error {
	f.calls++
	if r.Dst.String() == f.failRoute {
		return unix.ENETUNREACH
	}
	f.routes[routeID(r)] = *r
	return nil
}

func (f *fakeKernel) RoutesReplace(rs []*netlink.Route) []error {
	errs := make([]error, len(rs))
	for i, r := range rs {
		errs[i] = f.RouteReplace(r)
	}
	return errs
}

func (f *fakeKernel) RoutesAdd(rs []*netlink.Route) []error {
	errs := make([]error, len(rs))
	for i, r := range rs {
		if _, ok := f.routes[routeID(r)]; ok {
			errs[i] = unix.EEXIST
			continue
		}
		errs[i] = f.RouteReplace(r)
	}
	return errs
}

func (f *fakeKernel) RoutesDel(rs []*netlink.Route) []error {
	errs := make([]error, len(rs))
	for i, r := range rs {
		errs[i] = f.RouteDel(r)
	}
	return errs
}

func (f *fakeKernel) RouteDel(r *netlink.Route) error {
	f.calls++
	id := routeID(r)
	if _, ok := f.routes[id]; !ok {
		return unix.ESRCH
	}
	delete(f.routes, id)
	return nil
}

func neighID(n *netlink.Neigh) string {
	return fmt.Sprintf("%d/%d/%s/%s", n.Family, n.LinkIndex, n.IP, n.HardwareAddr)
}

func (f *fakeKernel) NeighList(family int) ([]netlink.Neigh, error) {
	var out []netlink.Neigh
	for _, n := range f.neighs {
		if n.Family == family {
			out = append(out, n)
		}
	}
	return out, nil
}

func (f *fakeKernel) NeighSet(n *netlink.Neigh) error {
	f.calls++
	f.neighs[neighID(n)] = *n
	return nil
}
func (f *fakeKernel) NeighDel(n *netlink.Neigh) error {
	f.calls++
	if _, ok := f.neighs[neighID(n)]; !ok {
		return unix.ENOENT
	}
	delete(f.neighs, neighID(n))
	return nil
}

func (f *fakeKernel) LinkByName(name string) (netlink.Link, error) {
	for _, l := range f.links {
		if l.Attrs().Name == name {
			return l, nil
		}
	}
	return nil, netlink.LinkNotFoundError{}
}

func (f *fakeKernel) LinkByIndex(i int) (netlink.Link, error) {
	if l, ok := f.links[i]; ok {
		return l, nil
	}
	return nil, unix.ENODEV
}

func (f *fakeKernel) LinkAdd(l netlink.Link) error {
	f.calls++
	if _, err := f.LinkByName(l.Attrs().Name); err == nil {
		return unix.EEXIST
	}
	idx := 100
	for f.links[idx] != nil {
		idx++
	}
	l.Attrs().Index = idx
	l.Attrs().Flags &^= net.FlagUp
	f.links[idx] = l
	return nil
}

func (f *fakeKernel) LinkDel(l netlink.Link) error {
	f.calls++
	if _, ok := f.links[l.Attrs().Index]; !ok {
		return unix.ENODEV
	}
	delete(f.links, l.Attrs().Index)
	delete(f.addrs, l.Attrs().Index)
	return nil
}

// link returns the stored link l stands for.
func (f *fakeKernel) link(l netlink.Link) (netlink.Link, error) {
	f.calls++
	if s, ok := f.links[l.Attrs().Index]; ok {
		return s, nil
	}
	return nil, unix.ENODEV
}

func (f *fakeKernel) LinkSetUp(l netlink.Link) error {
	s, err := f.link(l)
	if err == nil {
		s.Attrs().Flags |= net.FlagUp
	}
	return err
}

func (f *fakeKernel) LinkSetMTU(l netlink.Link, mtu int) error {
	s, err := f.link(l)
	if err == nil {
		s.Attrs().MTU = mtu
	}
	return err
}

func (f *fakeKernel) LinkSetHardwareAddr(l netlink.Link, mac []byte) error {
	s, err := f.link(l)
	if err == nil {
		s.Attrs().HardwareAddr = slices.Clone(mac)
	}
	return err
}

func (f *fakeKernel) AddrReplace(l netlink.Link, a *netlink.Addr) error {
	if _, err := f.link(l); err != nil {
		return err
	}
	p, _ := prefixFromIPNet(a.IPNet)
	idx := l.Attrs().Index
	if !slices.Contains(f.addrs[idx], p) {
		f.addrs[idx] = append(f.addrs[idx], p)
	}
	return nil
}

func (f *fakeKernel) AddrDel(l netlink.Link, a *netlink.Addr) error {
	if _, err := f.link(l); err != nil {
		return err
	}
	p, _ := prefixFromIPNet(a.IPNet)
	idx := l.Attrs().Index
	i := slices.Index(f.addrs[idx], p)
	if i < 0 {
		return unix.EADDRNOTAVAIL
	}
	f.addrs[idx] = slices.Delete(f.addrs[idx], i, i+1)
	return nil
}

func (f *fakeKernel) AddrList(index, family int) ([]netlink.Addr, error) {
	var out []netlink.Addr
	for idx, ps := range f.addrs {
		if index != 0 && idx != index {
			continue
		}
		for _, p := range ps {
			if (family == unix.AF_INET && !p.Addr().Is4()) || (family == unix.AF_INET6 && !p.Addr().Is6()) {
				continue
			}
			out = append(out, netlink.Addr{IPNet: &netIPNet{IP: p.Addr().AsSlice(), Mask: cidrMask(p)}, LinkIndex: idx})
		}
	}
	return out, nil
}

func (f *fakeKernel) RouteListAll(family int, keep func(*netlink.Route) bool) ([]netlink.Route, error) {
	var out []netlink.Route
	for _, r := range f.routes {
		if (r.Dst.IP.To4() != nil) == (family == unix.AF_INET) && keep(&r) {
			out = append(out, r)
		}
	}
	return out, nil
}

func (f *fakeKernel) NeighProxyList(index, _ int) ([]netlink.Neigh, error) {
	var out []netlink.Neigh
	for _, n := range f.proxies {
		if n.LinkIndex == index {
			out = append(out, n)
		}
	}
	return out, nil
}

func (f *fakeKernel) Sysctl(name string) (string, error) {
	f.host.Lock()
	defer f.host.Unlock()
	v, ok := f.sysctl[name]
	if !ok {
		return "", fmt.Errorf("reading sysctl %s: %w", name, os.ErrNotExist)
	}
	return v, nil
}

func (f *fakeKernel) SetSysctl(name, value string) error {
	f.host.Lock()
	defer f.host.Unlock()
	if _, ok := f.sysctl[name]; !ok {
		return fmt.Errorf("setting sysctl %s=%s: %w", name, value, os.ErrNotExist)
	}
	f.sysctl[name] = value
	return nil
}

func (f *fakeKernel) IPTables(v6 bool) (ipTables, error) {
	f.host.Lock()
	defer f.host.Unlock()
	if f.noIpt {
		return nil, fmt.Errorf("%w (fake)", ErrNoIptables)
	}
	if v6 {
		return f.ipt[1], nil
	}
	return f.ipt[0], nil
}

func fakeSubscribe[T any](f *fakeKernel, kind string, ch chan<- T, done <-chan struct{}) error {
	f.host.Lock()
	f.subs[kind]++
	f.host.Unlock()
	go func() { <-done; close(ch) }()
	return nil
}

func (f *fakeKernel) SubscribeRoutes(ch chan<- netlink.RouteUpdate, done <-chan struct{}, _ func(error)) error {
	return fakeSubscribe(f, "route", ch, done)
}
func (f *fakeKernel) SubscribeLinks(ch chan<- netlink.LinkUpdate, done <-chan struct{}, _ func(error)) error {
	return fakeSubscribe(f, "link", ch, done)
}
func (f *fakeKernel) SubscribeNeighs(ch chan<- netlink.NeighUpdate, done <-chan struct{}, _ func(error)) error {
	return fakeSubscribe(f, "neighbour", ch, done)
}

func (f *fakeKernel) PacketSockets(int) (map[uint64]bool, error) { return f.sockets, nil }

func (f *fakeKernel) Close() error {
	f.host.Lock()
	defer f.host.Unlock()
	f.closed = true
	return nil
}

func (f *fakeKernel) Side() ndp.Kernel { return fakeSide{f} }

// Nexthops implements nexthopSource: the fake has no nexthop objects, so
// the engine lists routes with RouteList and puts plain gateway routes.
func (f *fakeKernel) Nexthops() nexthopKernel { return nil }

// fakeSide is the responder's connection: packet sockets are fakeConns;
// the rest is not used in subnet mode and fails.
type fakeSide struct{ f *fakeKernel }

func (s fakeSide) ListenPacket(ifname string, ifindex int, filter []bpf.RawInstruction) (ndp.PacketConn, error) {
	c := &fakeConn{ifname: ifname, ifindex: ifindex, filter: filter, in: make(chan []byte, 16), closed: make(chan struct{})}
	s.f.host.Lock()
	s.f.conns = append(s.f.conns, c)
	s.f.host.Unlock()
	return c, nil
}
func (fakeSide) NeighList(int) ([]netlink.Neigh, error)    { return nil, unix.EOPNOTSUPP }
func (fakeSide) AddrList(int, int) ([]netlink.Addr, error) { return nil, unix.EOPNOTSUPP }
func (fakeSide) SubscribeNeighs(chan<- netlink.NeighUpdate, <-chan struct{}, func(error)) error {
	return unix.EOPNOTSUPP
}
func (fakeSide) RouteGet(netip.Addr) ([]netlink.Route, error) { return nil, unix.EOPNOTSUPP }
func (fakeSide) Probe(netip.Addr) error                       { return unix.EOPNOTSUPP }
func (fakeSide) Close() error                                 { return nil }

// fakeConn is a packet socket: frames sent to in are read, frames written
// are kept in out.
type fakeConn struct {
	ifname  string
	ifindex int
	in      chan []byte
	closed  chan struct{}

	mu     sync.Mutex
	filter []bpf.RawInstruction
	out    [][]byte
	once   sync.Once
}

func (c *fakeConn) Read(b []byte) (int, error) {
	select {
	case <-c.closed:
		return 0, os.ErrClosed
	case fr := <-c.in:
		return copy(b, fr), nil
	}
}

func (c *fakeConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.out = append(c.out, slices.Clone(b))
	return len(b), nil
}

func (c *fakeConn) SetFilter(filter []bpf.RawInstruction) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.filter = filter
	return nil
}

func (c *fakeConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return nil
}

// passes reports whether the socket's filter passes frame.
func (c *fakeConn) passes(frame []byte) bool {
	c.mu.Lock()
	raw := c.filter
	c.mu.Unlock()
	prog := make([]bpf.Instruction, len(raw))
	for i, r := range raw {
		prog[i] = r.Disassemble()
	}
	vm, err := bpf.NewVM(prog)
	if err != nil {
		panic(err)
	}
	n, err := vm.Run(frame)
	return err == nil && n > 0
}

// fakeIPTables is one family's tables: chains of rules in iptables -S
// form ("-A CHAIN args").
type fakeIPTables struct {
	bin    string
	mu     sync.Mutex
	chains map[string][]string // "table/chain" -> rule lines
	calls  int                 // changes
	runs   int                 // iptables runs, changes and listings alike
}

func newFakeIPTables(bin string) *fakeIPTables {
	t := &fakeIPTables{bin: bin, chains: map[string][]string{}}
	for _, c := range []string{"filter/INPUT", "filter/FORWARD", "filter/OUTPUT", "nat/PREROUTING", "nat/INPUT", "nat/OUTPUT", "nat/POSTROUTING"} {
		t.chains[c] = nil
	}
	return t
}

func (t *fakeIPTables) Cmd() string { return t.bin }

func (t *fakeIPTables) ListTable(table string) ([]string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.runs++
	keys := make([]string, 0, len(t.chains))
	for k := range t.chains {
		if tb, _, _ := strings.Cut(k, "/"); tb == table {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var decl, rules []string
	for _, k := range keys {
		_, chain, _ := strings.Cut(k, "/")
		if slices.Contains([]string{"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}, chain) {
			decl = append(decl, "-P "+chain+" ACCEPT")
		} else {
			decl = append(decl, "-N "+chain)
		}
		rules = append(rules, t.chains[k]...)
	}
	return append(decl, rules...), nil
}

// edit applies fn to a chain that must exist.
func (t *fakeIPTables) edit(table, chain string, fn func([]string) ([]string, error)) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	rules, ok := t.chains[table+"/"+chain]
	if !ok {
		return fmt.Errorf("%s: no chain %s/%s", t.bin, table, chain)
	}
	t.runs++
	rules, err := fn(rules)
	if err == nil {
		t.chains[table+"/"+chain] = rules
		t.calls++
	}
	return err
}

func (t *fakeIPTables) Append(table, chain string, r ...string) error {
	return t.edit(table, chain, func(rs []string) ([]string, error) { return append(rs, rule(r).line(chain)), nil })
}

func (t *fakeIPTables) Insert(table, chain string, pos int, r ...string) error {
	return t.edit(table, chain, func(rs []string) ([]string, error) {
		return slices.Insert(rs, min(pos-1, len(rs)), rule(r).line(chain)), nil
	})
}

func (t *fakeIPTables) Delete(table, chain string, r ...string) error {
	return t.edit(table, chain, func(rs []string) ([]string, error) {
		i := slices.Index(rs, rule(r).line(chain))
		if i < 0 {
			return nil, fmt.Errorf("%s: no such rule in %s/%s", t.bin, table, chain)
		}
		return slices.Delete(rs, i, i+1), nil
	})
}

func (t *fakeIPTables) ClearAndDeleteChain(table, chain string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.chains, table+"/"+chain)
	t.calls++
	t.runs++
	return nil
}

func (t *fakeIPTables) Restore(table, chain string, lines []string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.chains[table+"/"+chain] = slices.Clone(lines)
	t.calls++
	t.runs++
	return nil
}

// dump renders every rule as "table -A CHAIN args", chains sorted by
// table and name, rules in their order.
func (t *fakeIPTables) dump() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	keys := make([]string, 0, len(t.chains))
	for k := range t.chains {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var out []string
	for _, k := range keys {
		table, _, _ := strings.Cut(k, "/")
		for _, r := range t.chains[k] {
			out = append(out, table+" "+r)
		}
	}
	return out
}

// dump renders the routes as sorted text, e.g. "10.0.1.0/24 via 192.0.2.1 dev 2 proto 76".
func (f *fakeKernel) dump() []string {
	var out []string
	for _, r := range f.routes {
		out = append(out, fmt.Sprintf("%s via %s dev %d proto %d", r.Dst, r.Gw, r.LinkIndex, r.Protocol))
	}
	slices.Sort(out)
	return out
}
