package lease

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"unsafe"
)

// decodeRecordFast decodes the common shape of a lease value — one flat
// object of string fields plus a BackendData object — without reflection.
// It reports ok=false whenever the input is anything else (escapes, other
// value types, case-mismatched keys, trailing data ...), and the caller
// then uses encoding/json, so the result never differs from
// json.Unmarshal's; FuzzDecodeRecordFast checks exactly that. Listing
// 50,000 leases at start-up is dominated by this decoding.
func decodeRecordFast(data []byte, r *Record) (ok bool) {
	return decodeRecordFastNode(data, r, "")
}

// decodeRecordFastNode is decodeRecordFast that, when the record's Node
// equals node (the name from the key), uses that string instead of
// allocating a copy: one allocation fewer per record of a listing.
func decodeRecordFastNode(data []byte, r *Record, node string) (ok bool) {
	p := skipWS(data, 0)
	if p >= len(data) || data[p] != '{' {
		return false
	}
	p = skipWS(data, p+1)
	if p < len(data) && data[p] == '}' {
		return skipWS(data, p+1) == len(data)
	}
	for {
		key, q, ok := scanString(data, p)
		if !ok {
			return false
		}
		p = skipWS(data, q)
		if p >= len(data) || data[p] != ':' {
			return false
		}
		p = skipWS(data, p+1)
		if p >= len(data) {
			return false
		}
		if string(key) == "BackendData" {
			end, ok := scanComposite(data, p)
			if !ok {
				return false
			}
			r.BackendData = json.RawMessage(bytes.Clone(data[p:end]))
			p = end
		} else {
			val, q, ok := scanString(data, p)
			if !ok || !setField(r, key, val, node) {
				return false
			}
			p = q
		}
		p = skipWS(data, p)
		if p >= len(data) {
			return false
		}
		if data[p] == '}' {
			return skipWS(data, p+1) == len(data)
		}
		if data[p] != ',' {
			return false
		}
		p = skipWS(data, p+1)
	}
}

func setField(r *Record, key, val []byte, node string) bool {
	var err error
	switch string(key) {
	case "Node":
		if string(val) == node {
			r.Node = node
		} else {
			r.Node = string(val)
		}
	case "Subnet":
		r.Subnet, err = netip.ParsePrefix(transient(val))
	case "IPv6Subnet":
		r.IPv6Subnet, err = netip.ParsePrefix(transient(val))
	case "PublicIP":
		r.PublicIP, err = netip.ParseAddr(transient(val))
	case "PublicIPv6":
		r.PublicIPv6, err = netip.ParseAddr(transient(val))
	case "BackendType":
		r.BackendType = internBackendType(val)
	case "Acquired":
		err = r.Acquired.UnmarshalText(val) // strict RFC 3339, as encoding/json
	default:
		return false // unknown or case-mismatched key: let encoding/json decide
	}
	return err == nil
}

// transient returns b's bytes as a string without copying them, for the
// netip parsers: a parsed address keeps no reference to its input (a zone
// is interned as a copy), and setField drops their errors, which do. The
// string must not outlive the call it is passed to.
func transient(b []byte) string { return unsafe.String(unsafe.SliceData(b), len(b)) }

func skipWS(d []byte, p int) int {
	for p < len(d) && (d[p] == ' ' || d[p] == '\t' || d[p] == '\n' || d[p] == '\r') {
		p++
	}
	return p
}

// scanString reads a string without escapes or control characters at p
// and returns its content and the position after the closing quote.
func scanString(d []byte, p int) ([]byte, int, bool) {
	if p >= len(d) || d[p] != '"' {
		return nil, 0, false
	}
	for q := p + 1; q < len(d); q++ {
		if c := d[q]; !plainChar[c] {
			if c == '"' {
				return d[p+1 : q], q + 1, true
			}
			return nil, 0, false
		}
	}
	return nil, 0, false
}

// plainChar holds the bytes scanString takes as they are: printable ASCII
// other than '"' and '\\'.
var plainChar = func() (t [256]bool) {
	for c := 0x20; c < 0x80; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// scanComposite finds the end of a JSON object at p whose strings carry no
// escapes; it does not validate the content beyond that (encoding/json
// would accept any valid JSON value as RawMessage, so anything that is not
// plainly an object goes to the slow path, which validates).
func scanComposite(d []byte, p int) (int, bool) {
	if d[p] != '{' {
		return 0, false
	}
	depth := 0
	for q := p; q < len(d); q++ {
		switch d[q] {
		case '"':
			_, e, ok := scanString(d, q)
			if !ok {
				return 0, false
			}
			q = e - 1
		case '{', '[':
			depth++
		case '}', ']':
			depth--
			if depth == 0 {
				end := q + 1
				return end, json.Valid(d[p:end])
			}
		}
	}
	return 0, false
}

// internBackendType returns the known backend type names without an
// allocation each, anything else as a new string.
func internBackendType(val []byte) string {
	for _, t := range backendTypes {
		if string(val) == t {
			return t
		}
	}
	return string(val)
}
