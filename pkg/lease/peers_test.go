package lease

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestPeersRefusesHostileRecords(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.100.0.0/16","IPv6Network":"2001:db8::/48","IPv6SubnetLen":64}`)
	self := &Record{Node: "me", Subnet: netip.MustParsePrefix("10.100.1.0/24"), IPv6Subnet: netip.MustParsePrefix("2001:db8:0:1::/64"),
		PublicIP: netip.MustParseAddr("192.168.1.1"), PublicIPv6: netip.MustParseAddr("fd00::1")}
	rec := func(node, s4, s6, ip string, rev int64) *Record {
		r := &Record{Node: node, Rev: rev}
		if s4 != "" {
			r.Subnet = netip.MustParsePrefix(s4)
		}
		if s6 != "" {
			r.IPv6Subnet = netip.MustParsePrefix(s6)
		}
		if ip != "" {
			a := netip.MustParseAddr(ip)
			if a.Is4() {
				r.PublicIP = a
			} else {
				r.PublicIPv6 = a
			}
		}
		return r
	}
	records := map[string]*Record{
		"me":          self,
		"good":        rec("good", "10.100.2.0/24", "2001:db8:0:2::/64", "192.168.1.2", 10),
		"good6":       rec("good6", "", "2001:db8:0:3::/64", "fd00::3", 11),
		"outside":     rec("outside", "10.200.0.0/24", "", "192.168.1.4", 12),
		"wronglen":    rec("wronglen", "10.100.4.0/25", "", "192.168.1.5", 13),
		"overlapself": rec("overlapself", "10.100.1.0/24", "", "192.168.1.6", 1),
		"overlapgood": rec("overlapgood", "10.100.2.0/24", "", "192.168.1.7", 20),
		"selfip":      rec("selfip", "10.100.8.0/24", "", "192.168.1.1", 14),
		"loopback":    rec("loopback", "10.100.9.0/24", "", "127.0.0.1", 15),
		"multicast":   rec("multicast", "", "2001:db8:0:9::/64", "ff02::1", 16),
		"linklocal":   rec("linklocal", "", "2001:db8:0:a::/64", "fe80::1", 17),
		"noaddr":      rec("noaddr", "10.100.11.0/24", "", "", 18),
	}
	peers, rejected := Peers(cfg, self, records)
	var got []string
	for _, p := range peers {
		got = append(got, p.Node)
	}
	if strings.Join(got, ",") != "good,good6" {
		t.Errorf("peers %v, want good,good6", got)
	}
	for _, n := range []string{"outside", "wronglen", "overlapself", "overlapgood", "selfip", "loopback", "multicast", "linklocal", "noaddr"} {
		if rejected[n] == nil {
			t.Errorf("%s was not rejected", n)
		}
	}
	if err := rejected["overlapgood"]; err == nil || !strings.Contains(err.Error(), "good") {
		t.Errorf("overlap reason %v should name the older holder", err)
	}
}

func TestDecodeRecord(t *testing.T) {
	for _, bad := range []string{
		`{`, `[]`, `{"Node":"x"}`, `{"Node":"y","Subnet":"10.0.0.0/8"}`,
		`{"Node":"x","Subnet":"10.0.0.1/8"}`, `{"Node":"x","Subnet":"2001:db8::/64"}`,
		`{"Node":"x","IPv6Subnet":"10.0.0.0/8"}`, `{"Node":"x","Subnet":"10.0.0.0/8","PublicIP":"::1"}`,
	} {
		if _, err := DecodeRecord("x", []byte(bad)); err == nil {
			t.Errorf("DecodeRecord(%s) accepted", bad)
		}
	}
	if _, err := DecodeRecord("x", []byte(`{"Node":"x","Subnet":"10.0.0.0/24","PublicIP":"192.0.2.1"}`)); err != nil {
		t.Error(err)
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add("x", []byte(`{"Node":"x","Subnet":"10.0.0.0/24","PublicIP":"192.0.2.1"}`))
	f.Add("n", []byte(`{"Node":"n","IPv6Subnet":"2001:db8::/64","BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:ff"}}`))
	f.Fuzz(func(t *testing.T, node string, data []byte) {
		r, err := DecodeRecord(node, data)
		if err == nil && (r.Node != node || len(r.Subnets()) == 0) {
			t.Fatalf("accepted inconsistent record %+v", r)
		}
	})
}

func FuzzParseSubnetKey(f *testing.F) {
	f.Add("10.100.15.0-24")
	f.Add("2001:db8::-64")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseSubnetKey(s)
		if err == nil && SubnetKey(p) != s && p.Masked() != p {
			t.Fatalf("%q parsed to unmasked %v", s, p)
		}
	})
}

// The fast decoder agrees with encoding/json on every input it accepts.
func FuzzDecodeRecordFast(f *testing.F) {
	f.Add([]byte(`{"Node":"x","Subnet":"10.0.0.0/24","PublicIP":"192.0.2.1","Acquired":"2026-11-22T07:00:00Z"}`))
	f.Add([]byte(`{"Node":"n","IPv6Subnet":"2001:db8::/64","BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:ff","x":[1,{"y":"}"}]}}`))
	f.Add([]byte(` { "node" : "x" } `))
	f.Add([]byte(`{"Node":"x","Acquired":"2026-11-22T7:00:00Z"}`))
	f.Add([]byte(`{"Node":"x","Subnet":"10.0.0.0/24","BackendType":"vxlan","Node":"y"}`))
	_ = time.RFC3339
	f.Fuzz(func(t *testing.T, data []byte) {
		var fast Record
		if !decodeRecordFast(data, &fast) {
			return
		}
		var slow Record
		if err := json.Unmarshal(data, &slow); err != nil {
			t.Fatalf("fast path accepted %q, encoding/json: %v", data, err)
		}
		if !reflect.DeepEqual(fast.Subnets(), slow.Subnets()) || fast.Node != slow.Node || fast.PublicIP != slow.PublicIP || fast.PublicIPv6 != slow.PublicIPv6 || !fast.Acquired.Equal(slow.Acquired) || fast.BackendType != slow.BackendType || !bytes.Equal(fast.BackendData, slow.BackendData) {
			t.Fatalf("%q: fast %+v, encoding/json %+v", data, fast, slow)
		}
		// With the key's node name given (a listing), the record is the same.
		for _, node := range []string{"x", "n", fast.Node} {
			var named Record
			if !decodeRecordFastNode(data, &named, node) || named.Node != fast.Node || named.Subnet != fast.Subnet ||
				named.IPv6Subnet != fast.IPv6Subnet || named.BackendType != fast.BackendType {
				t.Fatalf("%q with node %q: %+v, without: %+v", data, node, named, fast)
			}
		}
	})
}
