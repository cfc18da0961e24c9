// Package subnetenv reads and writes subnet.env, the file through which
// dockerd learns the host's leased subnets. dockerd's unit loads it with a
// systemd drop-in:
//
//	[Service]
//	EnvironmentFile=/run/leased/subnet.env
//	ExecStart=
//	ExecStart=/usr/bin/dockerd $LEASED_DOCKER_OPTS
//
// The file holds one KEY=VALUE per line, in systemd EnvironmentFile syntax:
//
//	# written by leased; do not edit
//	LEASED_NETWORK=10.100.0.0/16
//	LEASED_SUBNET=10.100.15.1/24
//	LEASED_NETWORK6=2001:db8:cd11::/48
//	LEASED_SUBNET6=2001:db8:cd11:0:8000::/80
//	LEASED_MTU=1450
//	LEASED_IPMASQ=true
//	LEASED_IPMASQ4=leased
//	LEASED_IPMASQ6=leased
//	LEASED_BACKEND=vxlan
//	LEASED_DOCKER_OPTS="--bip=10.100.15.1/24 --mtu=1450 --ipv6 --fixed-cidr-v6=2001:db8:cd11:0:8000::/80 --ip-masq=false"
//
// When leased's Docker IPAM driver has part of the lease (Env.Docker0Bits),
// LEASED_DOCKER0_SUBNET and LEASED_DOCKER0_SUBNET6 give docker0's share
// (e.g. 10.100.15.1/26), and --bip and --fixed-cidr-v6 in
// LEASED_DOCKER_OPTS are that share; LEASED_SUBNET and LEASED_SUBNET6 stay
// the whole lease.
//
// The IPv4 network lines appear only when IPv4 is enabled, the IPv6 lines
// (LEASED_IPMASQ6 among them) only when IPv6 is. LEASED_IPMASQ4 and
// LEASED_IPMASQ6 say who masquerades each family's container traffic that
// leaves the cluster network (see Env.Masq4 and Env.Masq6); like
// LEASED_DOCKER_OPTS they are derived from the other lines, and Parse
// ignores them. The package only reads and writes the file; it knows nothing of
// etcd or the datapath.
package subnetenv

import (
	"github.com/leased/leased/pkg/ipfam"

	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/leased/leased/internal/atomicfile"
)

// Variable names in the file.
const (
	KeyNetwork    = "LEASED_NETWORK"
	KeySubnet     = "LEASED_SUBNET"
	KeyNetwork6   = "LEASED_NETWORK6"
	KeySubnet6    = "LEASED_SUBNET6"
	KeyMTU        = "LEASED_MTU"
	KeyIPMasq     = "LEASED_IPMASQ"
	KeyIPMasq4    = "LEASED_IPMASQ4"
	KeyIPMasq6    = "LEASED_IPMASQ6"
	KeyBackend    = "LEASED_BACKEND"
	KeyDockerOpts = "LEASED_DOCKER_OPTS"
	// KeyDocker0 and KeyDocker06 are docker0's share of the leased subnets
	// when the rest goes to user-defined networks (Env.Docker0Bits > 0).
	KeyDocker0  = "LEASED_DOCKER0_SUBNET"
	KeyDocker06 = "LEASED_DOCKER0_SUBNET6"
)

// Header is the comment line the file starts with.
const Header = "# written by leased; do not edit"

// Env is the content of subnet.env.
type Env struct {
	// Network is the cluster's network and Subnet the host's leased subnet
	// (a masked prefix) per family; both zero when the family is disabled.
	Network, Subnet ipfam.Pair[netip.Prefix]
	// MTU is the MTU containers must use (docker0's --mtu).
	MTU int
	// IPMasq says that leased runs with --ip-masq: it masquerades the
	// traffic of every enabled family from the host's subnets that leaves
	// the cluster network (see Masq4 and Masq6 for who masquerades what).
	IPMasq bool
	// Backend is the backend type, e.g. "vxlan".
	Backend string
	// Docker0Bits splits the leased subnets between docker0 and leased's
	// Docker IPAM driver: docker0 keeps the first 1/2^Docker0Bits of each
	// (its --bip and --fixed-cidr-v6), user-defined networks get pools
	// from the rest. 0 hands docker0 the whole subnets.
	Docker0Bits int
}

// Docker0Subnet4 is the part of Subnet4 docker0 uses: Subnet4 itself, or
// its first 1/2^Docker0Bits. Zero when IPv4 is disabled.
func (e Env) Docker0Subnet4() netip.Prefix { return share(e.Subnet.V4, e.Docker0Bits) }

// Docker0Subnet6 is the part of Subnet6 docker0 uses (--fixed-cidr-v6).
func (e Env) Docker0Subnet6() netip.Prefix { return share(e.Subnet.V6, e.Docker0Bits) }

func share(p netip.Prefix, bits int) netip.Prefix {
	if !p.IsValid() {
		return p
	}
	return netip.PrefixFrom(p.Addr(), p.Bits()+bits)
}

var backendRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// Validate reports whether e can be written: at least one family, each
// enabled family with both a network and a leased subnet of that family,
// masked, the subnet inside the network and with room for hosts (IPv4 at
// most /30, IPv6 at most /126); an MTU from 68 (1280 with IPv6) to 65535;
// and a backend name of letters, digits, '.', '_' and '-'.
func (e Env) Validate() error {
	fams := 0
	for _, f := range []struct {
		network, subnet netip.Prefix
		nKey, sKey      string
		v6              bool
		maxBits         int
	}{
		{e.Network.V4, e.Subnet.V4, "Network4", "Subnet4", false, 30},
		{e.Network.V6, e.Subnet.V6, "Network6", "Subnet6", true, 126},
	} {
		if !f.network.IsValid() && !f.subnet.IsValid() {
			continue
		}
		fams++
		if !f.network.IsValid() || !f.subnet.IsValid() {
			return fmt.Errorf("subnetenv: %s is %v but %s is %v: set both or neither", f.nKey, f.network, f.sKey, f.subnet)
		}
		for _, p := range []struct {
			key string
			p   netip.Prefix
		}{{f.nKey, f.network}, {f.sKey, f.subnet}} {
			a := p.p.Addr()
			if f.v6 != a.Is6() || a.Is4In6() {
				want := "IPv4"
				if f.v6 {
					want = "IPv6"
				}
				return fmt.Errorf("subnetenv: %s %s is not an %s prefix", p.key, p.p, want)
			}
			if p.p.Masked() != p.p {
				return fmt.Errorf("subnetenv: %s %s is not a network address: use %s", p.key, p.p, p.p.Masked())
			}
		}
		if f.subnet.Bits() < f.network.Bits() || !f.network.Contains(f.subnet.Addr()) {
			return fmt.Errorf("subnetenv: %s %s is not inside %s %s", f.sKey, f.subnet, f.nKey, f.network)
		}
		if f.subnet.Bits() > f.maxBits {
			return fmt.Errorf("subnetenv: %s %s is too small for containers: use a /%d or shorter subnet", f.sKey, f.subnet, f.maxBits)
		}
		if e.Docker0Bits < 0 || f.subnet.Bits()+e.Docker0Bits > f.maxBits {
			return fmt.Errorf("subnetenv: docker0's share of %s %s (1/2^%d of it) is too small for containers: use a smaller --docker-ipam-docker0-bits", f.sKey, f.subnet, e.Docker0Bits)
		}
	}
	if fams == 0 {
		return errors.New("subnetenv: no subnet to write: set Network4/Subnet4 and/or Network6/Subnet6")
	}
	minMTU := 68
	if e.Subnet.V6.IsValid() {
		minMTU = 1280
	}
	if e.MTU < minMTU || e.MTU > 65535 {
		return fmt.Errorf("subnetenv: MTU %d is out of range: use %d to 65535", e.MTU, minMTU)
	}
	if !backendRE.MatchString(e.Backend) {
		return fmt.Errorf("subnetenv: backend name %q is invalid: use letters, digits, '.', '_' or '-'", e.Backend)
	}
	return nil
}

// Who masquerades a family's container traffic that leaves the cluster
// network: the values of LEASED_IPMASQ4 and LEASED_IPMASQ6.
const (
	MasqLeased  = "leased"  // leased's LEASED-POSTRTG chain (--ip-masq)
	MasqDockerd = "dockerd" // dockerd's own rule for docker0 (its --ip-masq, on by default)
	MasqNone    = "none"    // nobody: the addresses are routed as they are
)

// Masq4 says who masquerades IPv4 traffic from docker0 that leaves the
// cluster network: leased when it masquerades and IPv4 is enabled (dockerd
// then gets --ip-masq=false), dockerd otherwise, including on an IPv6-only
// network, where docker0's IPv4 subnet is dockerd's own.
func (e Env) Masq4() string {
	if e.IPMasq && e.Subnet.V4.IsValid() {
		return MasqLeased
	}
	return MasqDockerd
}

// Masq6 says who masquerades IPv6 traffic from the host's IPv6 subnet that
// leaves the cluster network: leased with --ip-masq, else nobody (dockerd
// 20.10 does not NAT IPv6 unless its experimental --ip6tables is on). It is
// "" when IPv6 is disabled.
func (e Env) Masq6() string {
	switch {
	case !e.Subnet.V6.IsValid():
		return ""
	case e.IPMasq:
		return MasqLeased
	}
	return MasqNone
}

// BridgeIP returns the address docker0 takes in Subnet4 (dockerd --bip): the
// first address after the network address, with the subnet's length. It is
// the zero prefix when IPv4 is disabled. It is LEASED_SUBNET, the whole
// lease, also when docker0 keeps only a share (see Docker0BridgeIP).
func (e Env) BridgeIP() netip.Prefix {
	if !e.Subnet.V4.IsValid() {
		return netip.Prefix{}
	}
	return netip.PrefixFrom(e.Subnet.V4.Addr().Next(), e.Subnet.V4.Bits())
}

// Docker0BridgeIP is dockerd's --bip: BridgeIP with docker0's share's
// length.
func (e Env) Docker0BridgeIP() netip.Prefix {
	if !e.Subnet.V4.IsValid() {
		return netip.Prefix{}
	}
	return netip.PrefixFrom(e.Subnet.V4.Addr().Next(), e.Docker0Subnet4().Bits())
}

// DockerOpts returns the dockerd flags for e, in order: --bip, --mtu, then
// --ipv6 --fixed-cidr-v6, then --ip-masq=false when leased masquerades
// IPv4 (Masq4 is MasqLeased).
//
// --ip-masq=false is needed then: dockerd's own rule masquerades
// everything from docker0's subnet that leaves through another interface,
// which includes traffic to containers on other hosts; leased's rules
// exclude the cluster network. Otherwise dockerd keeps its default, as
// flannel's mk-docker-opts.sh does without --ip-masq; on an IPv6-only
// network it must, or nobody masquerades docker0's own IPv4 subnet.
func (e Env) DockerOpts() []string {
	var opts []string
	if e.Subnet.V4.IsValid() {
		opts = append(opts, "--bip="+e.Docker0BridgeIP().String())
	}
	opts = append(opts, "--mtu="+strconv.Itoa(e.MTU))
	if e.Subnet.V6.IsValid() {
		opts = append(opts, "--ipv6", "--fixed-cidr-v6="+e.Docker0Subnet6().String())
	}
	if e.Masq4() == MasqLeased {
		opts = append(opts, "--ip-masq=false")
	}
	return opts
}

// Render returns the file content for e. It does not validate e; Write
// does.
func (e Env) Render() []byte {
	var b bytes.Buffer
	line := func(k, v string) { b.WriteString(k + "=" + quote(v) + "\n") }
	b.WriteString(Header + "\n")
	if e.Subnet.V4.IsValid() || e.Network.V4.IsValid() {
		line(KeyNetwork, prefixString(e.Network.V4))
		line(KeySubnet, prefixString(e.BridgeIP()))
	}
	if e.Subnet.V6.IsValid() || e.Network.V6.IsValid() {
		line(KeyNetwork6, prefixString(e.Network.V6))
		line(KeySubnet6, prefixString(e.Subnet.V6))
	}
	line(KeyMTU, strconv.Itoa(e.MTU))
	line(KeyIPMasq, strconv.FormatBool(e.IPMasq))
	line(KeyIPMasq4, e.Masq4())
	if m := e.Masq6(); m != "" {
		line(KeyIPMasq6, m)
	}
	line(KeyBackend, e.Backend)
	if e.Docker0Bits > 0 {
		if e.Subnet.V4.IsValid() {
			line(KeyDocker0, e.Docker0BridgeIP().String())
		}
		if e.Subnet.V6.IsValid() {
			line(KeyDocker06, e.Docker0Subnet6().String())
		}
	}
	line(KeyDockerOpts, strings.Join(e.DockerOpts(), " "))
	return b.Bytes()
}

func prefixString(p netip.Prefix) string {
	if !p.IsValid() {
		return ""
	}
	return p.String()
}

// quote double-quotes v when systemd's EnvironmentFile parser (or a shell
// sourcing the file) would otherwise split or reinterpret it.
func quote(v string) string {
	if !strings.ContainsAny(v, " \t\"'\\$`#;") {
		return v
	}
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "$", `\$`, "`", "\\`")
	return `"` + r.Replace(v) + `"`
}

// Write atomically replaces the file at path with e's content and reports
// whether it changed anything. If the file already holds exactly that
// content, Write leaves it alone (same inode and mtime) and returns false.
// Otherwise it replaces the file, mode 0644, with atomicfile.Write, so that
// a reader sees either the old or the new content, never a mix, even
// across a crash. It creates the directory (mode 0755) if missing. e must
// pass Validate. Concurrent Writes to one path are safe: the last rename
// wins. Errors name path. A directory-sync failure (atomicfile.ErrDirSync)
// returns changed=true with the error.
func Write(path string, e Env) (changed bool, err error) {
	if err := e.Validate(); err != nil {
		return false, fmt.Errorf("not writing %s: %w", path, err)
	}
	data := e.Render()
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, fmt.Errorf("creating the directory of %s: %w", path, err)
	}
	if err := atomicfile.Write(path, data, 0o644); err != nil {
		return errors.Is(err, atomicfile.ErrDirSync), err
	}
	return true, nil
}

// Read parses the file at path. An error for a missing file wraps
// fs.ErrNotExist. See Parse.
func Read(path string) (Env, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Env{}, fmt.Errorf("reading subnet env: %w", err)
	}
	e, err := Parse(data)
	if err != nil {
		return Env{}, fmt.Errorf("%s: %w", path, err)
	}
	return e, nil
}

// Parse parses subnet.env content as Render writes it. Blank lines, '#'
// comments, LEASED_DOCKER_OPTS, LEASED_IPMASQ4, LEASED_IPMASQ6 (derived from
// the rest) and unknown keys are ignored, so files written before the
// per-family lines existed parse as before; when a key repeats, the last value wins, as with systemd. Values
// may be double- or single-quoted. LEASED_SUBNET holds the bridge address
// (e.g. 10.100.15.1/24) and comes back as the masked subnet
// (10.100.15.0/24). The result must pass Validate. Errors name the line.
func Parse(data []byte) (Env, error) {
	var e Env
	var d0, d06 string
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || text[0] == '#' || text[0] == ';' {
			continue
		}
		k, raw, ok := strings.Cut(text, "=")
		if !ok {
			return Env{}, fmt.Errorf("line %d: %q is not KEY=VALUE", n, short(text))
		}
		k = strings.TrimSpace(k)
		v, err := unquote(strings.TrimSpace(raw))
		if err != nil {
			return Env{}, fmt.Errorf("line %d: %s: %w", n, k, err)
		}
		switch k {
		case KeyDocker0:
			d0 = v
		case KeyDocker06:
			d06 = v
		}
		if err := e.set(k, v); err != nil {
			return Env{}, fmt.Errorf("line %d: %w", n, err)
		}
		seen[k] = v != ""
	}
	if err := sc.Err(); err != nil {
		return Env{}, fmt.Errorf("reading subnet env: %w", err)
	}
	for _, pair := range [][2]string{{KeyNetwork, KeySubnet}, {KeyNetwork6, KeySubnet6}} {
		if seen[pair[0]] != seen[pair[1]] {
			return Env{}, fmt.Errorf("%s and %s must both be set or both be absent", pair[0], pair[1])
		}
	}
	if !seen[KeySubnet] && !seen[KeySubnet6] {
		return Env{}, fmt.Errorf("neither %s nor %s is set: the file holds no subnet", KeySubnet, KeySubnet6)
	}
	for _, k := range []string{KeyMTU, KeyIPMasq, KeyBackend} {
		if !seen[k] {
			return Env{}, fmt.Errorf("%s is missing", k)
		}
	}
	if err := e.parseDocker0(d0, d06); err != nil {
		return Env{}, err
	}
	if err := e.Validate(); err != nil {
		return Env{}, err
	}
	return e, nil
}

// parseDocker0 derives Docker0Bits from the docker0 lines (each "" when
// absent): each must be the start of its leased subnet, and both must
// keep the same share.
func (e *Env) parseDocker0(d0, d06 string) error {
	bits := -1
	for _, f := range []struct {
		key, v string
		subnet netip.Prefix
	}{{KeyDocker0, d0, e.Subnet.V4}, {KeyDocker06, d06, e.Subnet.V6}} {
		if f.v == "" {
			continue
		}
		p, err := netip.ParsePrefix(f.v)
		if err != nil {
			return fmt.Errorf("%s=%q: want a CIDR prefix: %w", f.key, short(f.v), err)
		}
		if !f.subnet.IsValid() || p.Masked().Addr() != f.subnet.Addr() || p.Bits() < f.subnet.Bits() {
			return fmt.Errorf("%s=%s is not the first part of the leased subnet %v", f.key, p, f.subnet)
		}
		b := p.Bits() - f.subnet.Bits()
		if bits >= 0 && b != bits {
			return fmt.Errorf("%s and %s keep different shares of their subnets", KeyDocker0, KeyDocker06)
		}
		bits = b
	}
	if bits > 0 {
		e.Docker0Bits = bits
	}
	return nil
}

// set assigns the value of one known key; unknown keys are ignored.
func (e *Env) set(k, v string) error {
	prefix := func(dst *netip.Prefix, mask bool, example string) error {
		if v == "" {
			*dst = netip.Prefix{}
			return nil
		}
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return fmt.Errorf("%s=%q: want a CIDR prefix such as %s: %w", k, short(v), example, err)
		}
		if mask {
			p = p.Masked()
		}
		*dst = p
		return nil
	}
	switch k {
	case KeyNetwork:
		return prefix(&e.Network.V4, false, "10.100.0.0/16")
	case KeySubnet:
		return prefix(&e.Subnet.V4, true, "10.100.15.1/24")
	case KeyNetwork6:
		return prefix(&e.Network.V6, false, "2001:db8:cd11::/48")
	case KeySubnet6:
		return prefix(&e.Subnet.V6, false, "2001:db8:cd11:0:8000::/80")
	case KeyMTU:
		n, err := strconv.Atoi(v)
		if err != nil {
			return fmt.Errorf("%s=%q: want a number such as 1450", k, short(v))
		}
		e.MTU = n
	case KeyIPMasq:
		switch v {
		case "true":
			e.IPMasq = true
		case "false":
			e.IPMasq = false
		default:
			return fmt.Errorf("%s=%q: want true or false", k, short(v))
		}
	case KeyBackend:
		e.Backend = v
	}
	return nil
}

// unquote strips one level of double or single quotes, undoing the
// backslash escapes quote adds inside double quotes.
func unquote(v string) (string, error) {
	if v == "" || (v[0] != '"' && v[0] != '\'') {
		return v, nil
	}
	q := v[0]
	if len(v) < 2 || v[len(v)-1] != q {
		return "", fmt.Errorf("unterminated %c quote in %s", q, short(v))
	}
	inner := v[1 : len(v)-1]
	if q == '\'' {
		return inner, nil
	}
	var b strings.Builder
	for i := 0; i < len(inner); i++ {
		c := inner[i]
		if c == '\\' && i+1 < len(inner) {
			i++
			c = inner[i]
		} else if c == '"' {
			return "", fmt.Errorf("unescaped '\"' inside quotes in %s", short(v))
		}
		b.WriteByte(c)
	}
	return b.String(), nil
}

func short(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}
