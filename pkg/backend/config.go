package backend

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// Defaults and limits of the vxlan options.
const (
	DefaultVNI  = 1
	DefaultPort = 8472
	maxVNI      = 1<<24 - 1
)

// Config is the network config's Backend object, decoded. Only the fields
// of the selected Type apply.
type Config struct {
	// Type is TypeHostGW (the default when empty), TypeVXLAN or TypeProxyNDP.
	Type string
	// VNI is the VXLAN network identifier, 1..16777215 (default 1).
	VNI int
	// Port is the VXLAN UDP port, 1..65535 (default 8472).
	Port int
	// DirectRouting makes vxlan route directly, as host-gw does, to peers
	// whose public address is on-link on the external interface.
	DirectRouting bool
	// Mode is what proxy-ndp answers for: ModeSubnet (the default) every
	// address of the host's IPv6 subnet, ModePresent only addresses
	// present behind the host. Empty for other types.
	Mode string
}

// options lists the keys each backend type accepts besides "Type".
var options = map[string][]string{
	TypeHostGW:   nil,
	TypeVXLAN:    {"VNI", "Port", "DirectRouting"},
	TypeProxyNDP: {"Mode"},
}

// ValidateConfig checks the network config's Backend object: a known Type,
// no option the type does not take, and values in range. Errors name the
// field and say what would be right; an unknown type wraps ErrUnknownType.
func ValidateConfig(raw json.RawMessage) error {
	_, err := parseConfig(raw)
	return err
}

// SameConfig reports whether the Backend objects a and b configure the same
// backend once defaults are applied (`{"Type":"vxlan"}` and
// `{"VNI":1, "Type":"vxlan"}` do), whatever their formatting. Objects that
// do not validate are the same only when byte for byte equal.
func SameConfig(a, b json.RawMessage) bool {
	if bytes.Equal(a, b) {
		return true
	}
	ca, erra := parseConfig(a)
	cb, errb := parseConfig(b)
	if erra != nil || errb != nil {
		return bytes.Equal(a, b)
	}
	return ca == cb
}

func parseConfig(raw json.RawMessage) (Config, error) {
	cfg := Config{Type: TypeHostGW, VNI: DefaultVNI, Port: DefaultPort}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return cfg, nil
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return cfg, fmt.Errorf("backend: Backend must be a JSON object such as {\"Type\":\"vxlan\"}: %w", err)
	}
	if t, ok := fields["Type"]; ok {
		if err := json.Unmarshal(t, &cfg.Type); err != nil {
			return cfg, fmt.Errorf("backend: Backend.Type must be a string (%q, %q or %q), got %s", TypeHostGW, TypeVXLAN, TypeProxyNDP, t)
		}
		if cfg.Type == "" {
			cfg.Type = TypeHostGW
		}
	}
	known, ok := options[cfg.Type]
	if !ok {
		return cfg, fmt.Errorf("%w: Backend.Type %q; use %q, %q or %q", ErrUnknownType, cfg.Type, TypeHostGW, TypeVXLAN, TypeProxyNDP)
	}
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if k == "Type" || slices.Contains(known, k) {
			continue
		}
		return cfg, unknownOption(cfg.Type, k, known)
	}
	if v, ok := fields["VNI"]; ok {
		if err := intField(v, "VNI", 1, maxVNI, &cfg.VNI); err != nil {
			return cfg, err
		}
	}
	if v, ok := fields["Port"]; ok {
		if err := intField(v, "Port", 1, 65535, &cfg.Port); err != nil {
			return cfg, err
		}
	}
	if v, ok := fields["DirectRouting"]; ok {
		if err := json.Unmarshal(v, &cfg.DirectRouting); err != nil {
			return cfg, fmt.Errorf("backend: Backend.DirectRouting must be true or false, got %s", v)
		}
	}
	if cfg.Type == TypeProxyNDP {
		cfg.Mode = ModeSubnet
		if v, ok := fields["Mode"]; ok {
			if err := json.Unmarshal(v, &cfg.Mode); err != nil || (cfg.Mode != ModeSubnet && cfg.Mode != ModePresent) {
				return cfg, fmt.Errorf("backend: Backend.Mode must be %q (answer for the whole subnet, the default) or %q (only addresses present behind the host), got %s", ModeSubnet, ModePresent, v)
			}
		}
	}
	return cfg, nil
}

func unknownOption(typ, key string, known []string) error {
	for _, k := range append([]string{"Type"}, known...) {
		if strings.EqualFold(k, key) {
			return fmt.Errorf("backend: unknown option Backend.%s for type %q; did you mean %q? (names are case-sensitive)", key, typ, k)
		}
	}
	if len(known) == 0 {
		return fmt.Errorf("backend: unknown option Backend.%s: type %q takes no options besides Type", key, typ)
	}
	return fmt.Errorf("backend: unknown option Backend.%s for type %q; it takes %s", key, typ, strings.Join(known, ", "))
}

func intField(v json.RawMessage, name string, lo, hi int, dst *int) error {
	var n json.Number
	dec := json.NewDecoder(bytes.NewReader(v))
	dec.UseNumber()
	if err := dec.Decode(&n); err != nil || bytes.HasPrefix(bytes.TrimSpace(v), []byte(`"`)) {
		return fmt.Errorf("backend: Backend.%s must be an integer in %d..%d, got %s", name, lo, hi, v)
	}
	i, err := n.Int64()
	if err != nil || i < int64(lo) || i > int64(hi) {
		return fmt.Errorf("backend: Backend.%s is %s; use an integer in %d..%d", name, n, lo, hi)
	}
	*dst = int(i)
	return nil
}
