// Package vtep derives the MACs of a node's VXLAN devices from its node
// name and checks the ones a lease record publishes. The vxlan backend and
// the peer filter (pkg/lease) both use it, so they agree on what a node's
// MAC is; it depends on nothing else of leased.
package vtep

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net"
)

// Type is the backend type whose lease records carry LeaseData.
const Type = "vxlan"

// LeaseData is what the vxlan backend publishes in its lease record's
// BackendData: the MACs of its two devices, e.g.
// {"VtepMAC":"0e:..","VtepMAC6":"2a:.."}. Each MAC is derived from the
// node name (MAC), so it survives restarts and device re-creation, and
// peers can check it.
type LeaseData struct {
	VtepMAC  string // MAC of leased.4
	VtepMAC6 string // MAC of leased.6
}

// MAC derives a stable, locally administered unicast MAC for the node's
// device of one overlay family: the first six bytes of
// SHA-256("leased-vtep/" + node + "/4" or "/6"), with the
// locally-administered bit set and the multicast bit cleared.
func MAC(node string, v6 bool) net.HardwareAddr {
	m := mac(node, v6)
	return net.HardwareAddr(m[:])
}

func mac(node string, v6 bool) [6]byte {
	var buf [128]byte
	in := append(buf[:0], "leased-vtep/"...)
	in = append(in, node...)
	if v6 {
		in = append(in, "/6"...)
	} else {
		in = append(in, "/4"...)
	}
	sum := sha256.Sum256(in)
	var m [6]byte
	copy(m[:], sum[:6])
	m[0] = (m[0] | 0x02) &^ 0x01
	return m
}

const (
	dataHead = `{"VtepMAC":"`
	dataMid  = `","VtepMAC6":"`
	dataTail = `"}`
	macLen   = len("00:00:00:00:00:00")
	dataLen  = len(dataHead) + macLen + len(dataMid) + macLen + len(dataTail)
)

// appendMAC appends m as net.HardwareAddr.String spells it.
func appendMAC(b []byte, m [6]byte) []byte {
	const hex = "0123456789abcdef"
	for i, c := range m {
		if i > 0 {
			b = append(b, ':')
		}
		b = append(b, hex[c>>4], hex[c&0xf])
	}
	return b
}

func appendData(b []byte, node string) []byte {
	b = append(b, dataHead...)
	b = appendMAC(b, mac(node, false))
	b = append(b, dataMid...)
	b = appendMAC(b, mac(node, true))
	return append(b, dataTail...)
}

// Data returns the BackendData an agent of node publishes: LeaseData with
// both derived MACs, encoded as encoding/json encodes it.
func Data(node string) json.RawMessage {
	return appendData(make([]byte, 0, dataLen), node)
}

// Check returns nil when data, the BackendData of a vxlan lease record of
// node, names exactly the MACs derived from node (in any spelling
// net.ParseMAC accepts), and otherwise an error saying which MAC is wrong.
// A record carrying another node's MAC would otherwise take over that
// node's FDB entry on the hosts that program it.
func Check(node string, data []byte) error {
	if len(data) == dataLen {
		var buf [dataLen]byte
		if bytes.Equal(data, appendData(buf[:0], node)) {
			return nil // what every agent writes
		}
	}
	var d LeaseData
	if err := json.Unmarshal(data, &d); err != nil {
		return fmt.Errorf("vxlan BackendData %.60q is not {\"VtepMAC\":…,\"VtepMAC6\":…}: %v", data, err)
	}
	for _, f := range []struct {
		name, got string
		v6        bool
	}{{"VtepMAC", d.VtepMAC, false}, {"VtepMAC6", d.VtepMAC6, true}} {
		want := MAC(node, f.v6)
		got, err := net.ParseMAC(f.got)
		if err != nil || !bytes.Equal(got, want) {
			return fmt.Errorf("vxlan %s %q is not %s, the MAC derived from the node name %q (a record with another host's MAC would take over that host's tunnel)", f.name, f.got, want, node)
		}
	}
	return nil
}
