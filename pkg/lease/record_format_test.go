package lease

import (
	"encoding/json"
	"net/netip"
	"testing"
	"time"

	"github.com/leased/leased/pkg/ipfam"
)

// TestRecordStoredFormat pins the JSON of a lease record, the format of
// Documentation/etcd-data-model.md that every host reads: the keys, their
// order, and which are left out when a family or field is unset. A record
// decodes back to itself.
func TestRecordStoredFormat(t *testing.T) {
	acq := time.Date(2026, 11, 22, 7, 5, 21, 0, time.UTC)
	p, a := netip.MustParsePrefix, netip.MustParseAddr
	for _, tc := range []struct {
		rec  Record
		want string
	}{
		{Record{Node: "host1", Subnet: ipfam.Pair[netip.Prefix]{V4: p("10.100.134.0/24"), V6: p("2001:db8:cd11:9064::/64")},
			PublicIP: ipfam.Pair[netip.Addr]{V4: a("192.168.100.11"), V6: a("fd00:100::b")}, BackendType: "host-gw", Acquired: acq},
			`{"Node":"host1","Subnet":"10.100.134.0/24","IPv6Subnet":"2001:db8:cd11:9064::/64","PublicIP":"192.168.100.11","PublicIPv6":"fd00:100::b","BackendType":"host-gw","Acquired":"2026-11-22T07:05:21Z"}`},
		{Record{Node: "v4", Subnet: ipfam.Pair[netip.Prefix]{V4: p("10.100.1.0/24")}, PublicIP: ipfam.Pair[netip.Addr]{V4: a("192.0.2.1")}, BackendType: "host-gw"},
			`{"Node":"v4","Subnet":"10.100.1.0/24","PublicIP":"192.0.2.1","BackendType":"host-gw"}`},
		{Record{Node: "v6", Subnet: ipfam.Pair[netip.Prefix]{V6: p("2001:db8::/64")}, PublicIP: ipfam.Pair[netip.Addr]{V6: a("2001:db8:1::1")},
			BackendType: "vxlan", BackendData: json.RawMessage(`{"VtepMAC6":"aa:bb:cc:dd:ee:ff"}`)},
			`{"Node":"v6","IPv6Subnet":"2001:db8::/64","PublicIPv6":"2001:db8:1::1","BackendType":"vxlan","BackendData":{"VtepMAC6":"aa:bb:cc:dd:ee:ff"}}`},
	} {
		for _, v := range []any{tc.rec, &tc.rec} {
			got, err := json.Marshal(v)
			if err != nil || string(got) != tc.want {
				t.Errorf("json.Marshal(%T of %s) = %s, %v; want %s", v, tc.rec.Node, got, err, tc.want)
			}
		}
		back, err := DecodeRecord(tc.rec.Node, []byte(tc.want))
		if err != nil {
			t.Fatalf("DecodeRecord(%s): %v", tc.want, err)
		}
		var viaStd Record
		if err := json.Unmarshal([]byte(tc.want), &viaStd); err != nil {
			t.Fatal(err)
		}
		for _, r := range []*Record{back, &viaStd} {
			if r.Node != tc.rec.Node || r.Subnet != tc.rec.Subnet || r.PublicIP != tc.rec.PublicIP || r.BackendType != tc.rec.BackendType ||
				string(r.BackendData) != string(tc.rec.BackendData) || !r.Acquired.Equal(tc.rec.Acquired) {
				t.Errorf("%s decodes to %+v, want %+v", tc.want, *r, tc.rec)
			}
		}
	}
	// The fields that are not stored survive a decode into a record.
	r := Record{Rev: 7, Lease: 8, ModRev: 9}
	if err := json.Unmarshal([]byte(`{"Node":"x","Subnet":"10.0.0.0/24"}`), &r); err != nil || r.Rev != 7 || r.Lease != 8 || r.ModRev != 9 || r.Subnet.V4 != p("10.0.0.0/24") {
		t.Errorf("decoding into a record: %+v, %v", r, err)
	}
}
