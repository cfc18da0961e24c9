package lease

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/netip"
	"slices"
	"strings"
)

// Config is a validated network config, as stored at <prefix>/config.
type Config struct {
	// IPv4 and IPv6 are the allocation pools; nil when the family is disabled.
	// At least one is non-nil in a valid config.
	IPv4 *Pool
	IPv6 *Pool
	// Backend is the Backend object of the config.
	Backend BackendConfig
}

// BackendConfig is the config's Backend object. Type is always set: it is
// DefaultBackendType when the config has no Backend or an empty Type. Raw is
// the whole object (`{"Type":"host-gw"}` when the config has none) for
// pkg/backend to decode its own options from; ParseConfig checks only Type.
type BackendConfig struct {
	Type string
	Raw  json.RawMessage
}

// DefaultBackendType is the backend used when the config names none.
const DefaultBackendType = "host-gw"

// backendTypes are the Backend.Type values ParseConfig accepts. They match
// the backend package's Type* constants (this package must not import it).
var backendTypes = []string{"host-gw", "vxlan", "proxy-ndp"}

// ErrInvalidConfig is wrapped by every error ParseConfig returns, so callers
// can tell a bad config (wait for the operator to fix it) from other errors
// with errors.Is.
var ErrInvalidConfig = errors.New("lease: invalid network config")

// configError is a ParseConfig error: msg is the full operator-facing text.
type configError struct {
	msg string
	err error // wrapped cause, may be nil
}

func (e *configError) Error() string { return e.msg }

func (e *configError) Unwrap() []error {
	if e.err != nil {
		return []error{ErrInvalidConfig, e.err}
	}
	return []error{ErrInvalidConfig}
}

func cfgErrorf(format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return &configError{msg: err.Error(), err: errors.Unwrap(err)}
}

// famSpec describes one address family's config keys and rules, so that the
// IPv4 and IPv6 halves share one code path.
type famSpec struct {
	name                         string // "IPv4"
	v6                           bool
	enable                       string // "EnableIPv4"
	network, subnetLen, min, max string // key names
	defaultLen                   int    // default SubnetLen
	maxLen                       int    // longest allowed SubnetLen
	example                      string // an example network
}

var (
	family4 = famSpec{
		name: "IPv4", enable: "EnableIPv4",
		network: "Network", subnetLen: "SubnetLen", min: "SubnetMin", max: "SubnetMax",
		defaultLen: 24, maxLen: 30, example: "10.100.0.0/16",
	}
	family6 = famSpec{
		name: "IPv6", v6: true, enable: "EnableIPv6",
		network: "IPv6Network", subnetLen: "IPv6SubnetLen", min: "IPv6SubnetMin", max: "IPv6SubnetMax",
		defaultLen: 64, maxLen: 126, example: "2001:db8:cd11::/48",
	}
)

// knownKeys are the top-level keys of a network config.
var knownKeys = []string{
	"Network", "SubnetLen", "SubnetMin", "SubnetMax",
	"IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax",
	"EnableIPv4", "EnableIPv6", "Backend",
}

// ignoredFlannelKeys are flannel settings leased accepts and ignores.
var ignoredFlannelKeys = map[string]string{
	"EnableNFTables": "leased does not choose between iptables and nftables through the network config",
}

// ParseConfig decodes and validates a network config (flannel's JSON format;
// see Documentation/configuration.md).
//
// A family is enabled when its network (Network, IPv6Network) is set, unless
// EnableIPv4/EnableIPv6 is false; at least one must be enabled. SubnetLen
// defaults to 24 for IPv4 networks of /22 or shorter and IPv6SubnetLen to 64
// for IPv6 networks of /62 or shorter; SubnetMin/SubnetMax default to the
// first and last subnet of the network and may be given as an address
// ("10.100.0.0", as flannel does) or as a prefix of SubnetLen bits.
// Backend.Type defaults to DefaultBackendType.
//
// Keys match case-sensitively. Unknown keys, and settings that have no effect
// because their family is disabled, produce warnings, which never make the
// config invalid; warnings are returned even when err is non-nil so that the
// caller can show them next to the error (e.g. `"network"` → did you mean
// "Network"?). Every error wraps ErrInvalidConfig, names the JSON field, says
// what is wrong and what would be right. ParseConfig never panics.
func ParseConfig(data []byte) (cfg *Config, warnings []string, err error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, nil, cfgErrorf(`config is empty: store a JSON object such as {"Network": %q}`, family4.example)
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			// Offset counts the bytes read up to and including the bad one.
			pos := max(se.Offset-1, 0)
			line, col := lineCol(data, pos)
			return nil, nil, cfgErrorf("config is not valid JSON: at line %d, column %d (byte offset %d): %w; check for a missing or extra comma, quote or brace", line, col, pos, err)
		}
		return nil, nil, cfgErrorf(`config must be a JSON object such as {"Network": %q}, not %s`, family4.example, describeJSON(data))
	}
	if top == nil { // the literal null
		return nil, nil, cfgErrorf(`config must be a JSON object such as {"Network": %q}, not null`, family4.example)
	}

	// Unknown keys: warn, and remember which known key each resembles.
	nearMiss := map[string]string{} // known key -> unknown key that resembles it
	var unknown []string
	for k := range top {
		if !slices.Contains(knownKeys, k) {
			unknown = append(unknown, k)
		}
	}
	slices.Sort(unknown)
	for _, k := range unknown {
		if why, ok := ignoredFlannelKeys[k]; ok {
			warnings = append(warnings, fmt.Sprintf("ignoring flannel key %q: %s", k, why))
			continue
		}
		if s := suggestKey(k, knownKeys); s != "" {
			nearMiss[s] = k
			warnings = append(warnings, fmt.Sprintf("unknown key %q (did you mean %q?); it is ignored", shorten(k), s))
		} else {
			warnings = append(warnings, fmt.Sprintf("unknown key %q is ignored; known keys are %s", shorten(k), strings.Join(knownKeys, ", ")))
		}
	}

	cfg = &Config{}
	for _, f := range []*famSpec{&family4, &family6} {
		p, w, err := f.parse(top)
		warnings = append(warnings, w...)
		if err != nil {
			return nil, warnings, err
		}
		if f.v6 {
			cfg.IPv6 = p
		} else {
			cfg.IPv4 = p
		}
	}
	if cfg.IPv4 == nil && cfg.IPv6 == nil {
		msg := fmt.Sprintf("config enables no address family: set Network (e.g. %q) and/or IPv6Network (e.g. %q)", family4.example, family6.example)
		for _, k := range []string{"Network", "IPv6Network"} {
			if u, ok := nearMiss[k]; ok {
				msg += fmt.Sprintf(`; the config has %q, but keys are case-sensitive: did you mean %q?`, shorten(u), k)
			}
		}
		if isFalse(top, "EnableIPv4") || isFalse(top, "EnableIPv6") {
			msg += "; EnableIPv4/EnableIPv6 set to false disable a family even when its network is set"
		}
		return nil, warnings, cfgErrorf("%s", msg)
	}

	if cfg.Backend, err = parseBackend(top["Backend"]); err != nil {
		return nil, warnings, err
	}
	if cfg.Backend.Type == "proxy-ndp" && cfg.IPv6 == nil {
		return nil, warnings, cfgErrorf(`Backend.Type "proxy-ndp" needs IPv6, but the config enables no IPv6 network: set IPv6Network (a part of the hosts' on-link IPv6 prefix), or use Backend.Type %q for an IPv4-only network`, DefaultBackendType)
	}
	return cfg, warnings, nil
}

// parse returns the family's pool, or nil when the family is disabled.
func (f *famSpec) parse(top map[string]json.RawMessage) (*Pool, []string, error) {
	var warnings []string
	var enable *bool
	if raw, ok := present(top, f.enable); ok {
		var b bool
		if err := decodeField(f.enable, raw, &b, "true or false"); err != nil {
			return nil, nil, err
		}
		enable = &b
	}
	var netStr string
	netRaw, hasNet := present(top, f.network)
	if hasNet {
		if err := decodeField(f.network, netRaw, &netStr, fmt.Sprintf("a string such as %q", f.example)); err != nil {
			return nil, nil, err
		}
	}
	others := []string{}
	for _, k := range []string{f.subnetLen, f.min, f.max} {
		if _, ok := present(top, k); ok {
			others = append(others, k)
		}
	}

	switch {
	case enable != nil && *enable && !hasNet:
		return nil, nil, cfgErrorf("%s is true but %s is not set: set %s (e.g. %q) or remove %s",
			f.enable, f.network, f.network, f.example, f.enable)
	case enable != nil && !*enable:
		if hasNet || len(others) > 0 {
			set := others
			if hasNet {
				set = append([]string{f.network}, others...)
			}
			warnings = append(warnings, fmt.Sprintf("%s is disabled by %s=false: ignoring %s", f.name, f.enable, strings.Join(set, ", ")))
		}
		return nil, warnings, nil
	case !hasNet:
		if len(others) > 0 {
			warnings = append(warnings, fmt.Sprintf("%s is not set, so %s is disabled: ignoring %s", f.network, f.name, strings.Join(others, ", ")))
		}
		return nil, warnings, nil
	}

	network, err := f.parseNetwork(netStr)
	if err != nil {
		return nil, warnings, err
	}
	p := &Pool{Network: network}
	if p.SubnetLen, err = f.parseSubnetLen(top, network); err != nil {
		return nil, warnings, err
	}
	p.Min, p.Max = netip.PrefixFrom(network.Addr(), p.SubnetLen), p.lastOfNetwork()
	if raw, ok := present(top, f.min); ok {
		if p.Min, err = f.parseBound(f.min, raw, p); err != nil {
			return nil, warnings, err
		}
	}
	if raw, ok := present(top, f.max); ok {
		if p.Max, err = f.parseBound(f.max, raw, p); err != nil {
			return nil, warnings, err
		}
	}
	if p.Min.Addr().Compare(p.Max.Addr()) > 0 {
		return nil, warnings, cfgErrorf("%s %s is after %s %s: %s must not be greater than %s (swap them?)",
			f.min, p.Min.Addr(), f.max, p.Max.Addr(), f.min, f.max)
	}
	return p, warnings, nil
}

// parseNetwork checks that s is a network address of the family.
func (f *famSpec) parseNetwork(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, cfgErrorf("%s %q is not a CIDR prefix: want a network such as %q: %w", f.network, shorten(s), f.example, err)
	}
	if err := f.checkFamily(f.network, s, p.Addr()); err != nil {
		return netip.Prefix{}, err
	}
	if p.Masked() != p {
		return netip.Prefix{}, cfgErrorf("%s %s is not a network address: did you mean %s?", f.network, p, p.Masked())
	}
	if why := reservedNetwork(p); why != "" {
		return netip.Prefix{}, cfgErrorf("%s %s %s: no host can use it as a container network; pick another range, such as %q", f.network, p, why, f.example)
	}
	if p.Bits() >= f.maxLen {
		return netip.Prefix{}, cfgErrorf("%s %s is too small to split into subnets of at most /%d: use a /%d or shorter network",
			f.network, p, f.maxLen, f.maxLen-1)
	}
	return p, nil
}

// checkFamily reports an error when a (the value of key, as written s) is
// not of the family.
func (f *famSpec) checkFamily(key, s string, a netip.Addr) error {
	switch {
	case a.Zone() != "":
		return cfgErrorf("%s %q has a zone: remove the %%%s suffix", key, shorten(s), a.Zone())
	case !f.v6 && !a.Is4():
		return cfgErrorf("%s %q is IPv6, not IPv4: put IPv6 networks in IPv6Network; Network and its keys are for IPv4 (e.g. %q)", key, shorten(s), family4.example)
	case f.v6 && a.Is4():
		return cfgErrorf("%s %q is IPv4, not IPv6: put IPv4 networks in Network; IPv6Network and its keys are for IPv6 (e.g. %q)", key, shorten(s), family6.example)
	case f.v6 && a.Is4In6():
		return cfgErrorf("%s %q is an IPv4-mapped IPv6 address: write IPv4 networks in dotted form in Network", key, shorten(s))
	}
	return nil
}

// parseSubnetLen returns SubnetLen (or IPv6SubnetLen), or its default.
func (f *famSpec) parseSubnetLen(top map[string]json.RawMessage, network netip.Prefix) (int, error) {
	lo, hi := network.Bits()+1, f.maxLen
	raw, ok := present(top, f.subnetLen)
	if !ok {
		if network.Bits() <= f.defaultLen-2 {
			return f.defaultLen, nil
		}
		return 0, cfgErrorf("%s is required when %s is longer than /%d (it is %s): set %s to a value from %d to %d",
			f.subnetLen, f.network, f.defaultLen-2, network, f.subnetLen, lo, hi)
	}
	var n int
	if err := decodeField(f.subnetLen, raw, &n, fmt.Sprintf("an integer such as %d", f.defaultLen)); err != nil {
		return 0, err
	}
	if n < lo || n > hi {
		return 0, cfgErrorf("%s %d does not fit %s %s: it must be longer than the network's /%d and at most %d; use a value from %d to %d",
			f.subnetLen, n, f.network, network, network.Bits(), hi, lo, hi)
	}
	return n, nil
}

// parseBound parses SubnetMin/SubnetMax: an address or a prefix of
// p.SubnetLen bits, on a subnet boundary inside p.Network.
func (f *famSpec) parseBound(key string, raw json.RawMessage, p *Pool) (netip.Prefix, error) {
	var s string
	if err := decodeField(key, raw, &s, fmt.Sprintf("a string such as %q", p.Network.Addr().String())); err != nil {
		return netip.Prefix{}, err
	}
	var a netip.Addr
	asPrefix := strings.Contains(s, "/")
	if asPrefix {
		pp, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, cfgErrorf("%s %q is not an address or CIDR prefix: want e.g. %q or %q: %w",
				key, shorten(s), p.Network.Addr(), netip.PrefixFrom(p.Network.Addr(), p.SubnetLen), err)
		}
		a = pp.Addr()
		if err := f.checkFamily(key, s, a); err != nil {
			return netip.Prefix{}, err
		}
		if pp.Bits() != p.SubnetLen {
			return netip.Prefix{}, cfgErrorf("%s %s is a /%d but %s is %d: write %s or just the address %s",
				key, pp, pp.Bits(), f.subnetLen, p.SubnetLen, netip.PrefixFrom(a, p.SubnetLen), a)
		}
	} else {
		var err error
		if a, err = netip.ParseAddr(s); err != nil {
			return netip.Prefix{}, cfgErrorf("%s %q is not an address: want the first address of a subnet such as %q: %w",
				key, shorten(s), p.Network.Addr(), err)
		}
		if err := f.checkFamily(key, s, a); err != nil {
			return netip.Prefix{}, err
		}
	}
	show := func(x netip.Addr) string {
		if asPrefix {
			return netip.PrefixFrom(x, p.SubnetLen).String()
		}
		return x.String()
	}
	if !p.Network.Contains(a) {
		return netip.Prefix{}, cfgErrorf("%s %s is outside %s %s: use a subnet from %s to %s",
			key, s, f.network, p.Network, show(p.Network.Addr()), show(p.lastOfNetwork().Addr()))
	}
	sub := netip.PrefixFrom(a, p.SubnetLen).Masked()
	if sub.Addr() != a {
		return netip.Prefix{}, cfgErrorf("%s %s is not on a /%d subnet boundary (%s is %d): did you mean %s?",
			key, s, p.SubnetLen, f.subnetLen, p.SubnetLen, show(p.nearestBoundary(a)))
	}
	return sub, nil
}

// parseBackend returns the Backend object with its Type defaulted.
func parseBackend(raw json.RawMessage) (BackendConfig, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return BackendConfig{Type: DefaultBackendType, Raw: json.RawMessage(`{"Type":"host-gw"}`)}, nil
	}
	want := fmt.Sprintf(`an object such as {"Type": %q}`, "vxlan")
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return BackendConfig{}, cfgErrorf("Backend must be %s, not %s", want, describeJSON(raw))
	}
	b := BackendConfig{Type: DefaultBackendType, Raw: bytes.Clone(raw)}
	if t, ok := present(obj, "Type"); ok {
		var s string
		if err := decodeField("Backend.Type", t, &s, fmt.Sprintf("a string, one of %s", quoteList(backendTypes))); err != nil {
			return BackendConfig{}, err
		}
		if s != "" {
			b.Type = s
		}
	} else {
		for k := range obj {
			if strings.EqualFold(k, "Type") {
				return BackendConfig{}, cfgErrorf("Backend has %q but no \"Type\": keys are case-sensitive, write \"Type\"", shorten(k))
			}
		}
	}
	if !slices.Contains(backendTypes, b.Type) {
		hint := ""
		if s := suggestKey(b.Type, backendTypes); s != "" {
			hint = fmt.Sprintf(" (did you mean %q?)", s)
		}
		return BackendConfig{}, cfgErrorf("Backend.Type %q is not supported%s: use one of %s, or leave it out for %q",
			shorten(b.Type), hint, quoteList(backendTypes), DefaultBackendType)
	}
	return b, nil
}

// present returns the raw value of key, treating an explicit null as absent.
func present(m map[string]json.RawMessage, key string) (json.RawMessage, bool) {
	raw, ok := m[key]
	if !ok || string(bytes.TrimSpace(raw)) == "null" {
		return nil, false
	}
	return raw, true
}

func isFalse(m map[string]json.RawMessage, key string) bool {
	raw, ok := present(m, key)
	return ok && string(bytes.TrimSpace(raw)) == "false"
}

// decodeField decodes raw into v; on failure it names key and what it wants.
func decodeField(key string, raw json.RawMessage, v any, want string) error {
	err := json.Unmarshal(raw, v)
	if err == nil {
		return nil
	}
	return cfgErrorf("%s must be %s, not %s", key, want, describeJSON(raw))
}

// describeJSON names the kind of a JSON value, with the value when short.
func describeJSON(raw []byte) string {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return "nothing"
	}
	kind := ""
	switch raw[0] {
	case '"':
		kind = "the string"
	case '{':
		return "an object"
	case '[':
		return "an array"
	case 't', 'f':
		kind = "the boolean"
	case 'n':
		return "null"
	default:
		kind = "the number"
	}
	return kind + " " + shorten(string(raw))
}

// shorten truncates s for error messages (fuzzed inputs can be huge).
func shorten(s string) string {
	const limit = 64
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}

func quoteList(xs []string) string {
	q := make([]string, len(xs))
	for i, x := range xs {
		q[i] = fmt.Sprintf("%q", x)
	}
	return strings.Join(q, ", ")
}

// lineCol converts a 0-based byte offset into a 1-based line and column
// (counted in bytes).
func lineCol(data []byte, off int64) (line, col int) {
	if off < 0 {
		off = 0
	}
	if off > int64(len(data)) {
		off = int64(len(data))
	}
	before := data[:off]
	line = bytes.Count(before, []byte{'\n'}) + 1
	col = int(off) - (bytes.LastIndexByte(before, '\n') + 1) + 1
	return line, col
}

// suggestKey returns the candidate that k most likely misspells: a
// case-insensitive match, else the closest one within edit distance 2
// (ties go to the first candidate), else "".
func suggestKey(k string, candidates []string) string {
	for _, c := range candidates {
		if strings.EqualFold(k, c) {
			return c
		}
	}
	if len(k) > 64 {
		return ""
	}
	best, bestD := "", 3
	for _, c := range candidates {
		if d := editDistance(strings.ToLower(k), strings.ToLower(c)); d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// Contains reports whether subnet is one of the pool's subnets: a prefix of
// exactly SubnetLen bits of the pool's family, aligned on a subnet boundary
// (a network address), from Min to Max inclusive. A nil pool contains
// nothing.
func (p *Pool) Contains(subnet netip.Prefix) bool {
	if p == nil || !subnet.IsValid() || subnet.Bits() != p.SubnetLen || !p.Network.IsValid() {
		return false
	}
	a := subnet.Addr()
	if a.BitLen() != p.Network.Addr().BitLen() || a.Zone() != "" || subnet.Masked() != subnet {
		return false
	}
	return p.Network.Contains(a) && a.Compare(p.Min.Addr()) >= 0 && a.Compare(p.Max.Addr()) <= 0
}

// String describes the pool for logs and errors, e.g.
// "10.100.0.0/16 (/24 subnets from 10.100.0.0/24 to 10.100.255.0/24)".
func (p *Pool) String() string {
	if p == nil {
		return "<disabled>"
	}
	return fmt.Sprintf("%s (/%d subnets from %s to %s)", p.Network, p.SubnetLen, p.Min, p.Max)
}

// lastOfNetwork returns the last subnet of the network (not of [Min, Max]).
func (p *Pool) lastOfNetwork() netip.Prefix {
	last := addrAdd(p.Network.Addr(), onesBelow(uint(p.Network.Addr().BitLen()-p.Network.Bits())))
	return netip.PrefixFrom(last, p.SubnetLen).Masked()
}

// nearestBoundary returns the subnet address nearest to a (inside the
// network), rounding down on a tie.
func (p *Pool) nearestBoundary(a netip.Addr) netip.Addr {
	down := netip.PrefixFrom(a, p.SubnetLen).Masked().Addr()
	size := new(big.Int).Lsh(big.NewInt(1), uint(a.BitLen()-p.SubnetLen))
	distDown := new(big.Int).Sub(addrInt(a), addrInt(down))
	if distDown.Lsh(distDown, 1).Cmp(size) <= 0 {
		return down
	}
	up := addrAdd(down, size)
	if !up.IsValid() || !p.Network.Contains(up) {
		return down
	}
	return up
}

// onesBelow returns 2^n - 1, the offset from the first to the last address
// of a block of n host bits.
func onesBelow(n uint) *big.Int {
	v := new(big.Int).Lsh(big.NewInt(1), n)
	return v.Sub(v, big.NewInt(1))
}

// addrAdd returns a + d, or the zero Addr when the sum overflows the family.
func addrAdd(a netip.Addr, d *big.Int) netip.Addr {
	v := new(big.Int).Add(addrInt(a), d)
	b := make([]byte, a.BitLen()/8)
	if v.Sign() < 0 || v.BitLen() > len(b)*8 {
		return netip.Addr{}
	}
	v.FillBytes(b)
	r, _ := netip.AddrFromSlice(b)
	return r
}
