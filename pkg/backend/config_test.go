package backend

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestValidateConfig(t *testing.T) {
	cases := []struct {
		raw     string
		want    Config
		errHas  []string
		unknown bool
	}{
		{raw: ``, want: Config{Type: TypeHostGW, VNI: 1, Port: 8472}},
		{raw: `null`, want: Config{Type: TypeHostGW, VNI: 1, Port: 8472}},
		{raw: `{}`, want: Config{Type: TypeHostGW, VNI: 1, Port: 8472}},
		{raw: `{"Type":""}`, want: Config{Type: TypeHostGW, VNI: 1, Port: 8472}},
		{raw: `{"Type":"vxlan","VNI":1,"Port":8472,"DirectRouting":false}`, want: Config{Type: TypeVXLAN, VNI: 1, Port: 8472}},
		{raw: `{"Type":"vxlan","VNI":16777215,"Port":65535,"DirectRouting":true}`, want: Config{Type: TypeVXLAN, VNI: 16777215, Port: 65535, DirectRouting: true}},
		{raw: `{"Type":"proxy-ndp"}`, want: Config{Type: TypeProxyNDP, VNI: 1, Port: 8472, Mode: ModeSubnet}},
		{raw: `{"Type":"proxy-ndp","Mode":"present"}`, want: Config{Type: TypeProxyNDP, VNI: 1, Port: 8472, Mode: ModePresent}},
		{raw: `{"Type":"proxy-ndp","Mode":"subnet"}`, want: Config{Type: TypeProxyNDP, VNI: 1, Port: 8472, Mode: ModeSubnet}},
		{raw: `{"Type":"proxy-ndp","Mode":"auto"}`, errHas: []string{"Backend.Mode", `"subnet"`, `"present"`}},
		{raw: `{"Type":"proxy-ndp","Mode":1}`, errHas: []string{"Backend.Mode"}},
		{raw: `{"Type":"proxy-ndp","mode":"present"}`, errHas: []string{"Backend.mode", `did you mean "Mode"`}},
		{raw: `{"Type":"proxy-ndp","VNI":3}`, errHas: []string{"Backend.VNI", "it takes Mode"}},
		{raw: `{"Type":"host-gw","Mode":"subnet"}`, errHas: []string{"Backend.Mode", "no options"}},
		{raw: `{"Type":"vxlan","VNI":0}`, errHas: []string{"Backend.VNI", "1..16777215"}},
		{raw: `{"Type":"vxlan","VNI":16777216}`, errHas: []string{"Backend.VNI", "1..16777215"}},
		{raw: `{"Type":"vxlan","VNI":"1"}`, errHas: []string{"Backend.VNI", "integer"}},
		{raw: `{"Type":"vxlan","VNI":1.5}`, errHas: []string{"Backend.VNI"}},
		{raw: `{"Type":"vxlan","Port":0}`, errHas: []string{"Backend.Port", "1..65535"}},
		{raw: `{"Type":"vxlan","Port":70000}`, errHas: []string{"Backend.Port", "1..65535"}},
		{raw: `{"Type":"vxlan","DirectRouting":"yes"}`, errHas: []string{"Backend.DirectRouting", "true or false"}},
		{raw: `{"Type":"vxlan","vni":3}`, errHas: []string{"Backend.vni", `did you mean "VNI"`}},
		{raw: `{"Type":"vxlan","GBP":true}`, errHas: []string{"Backend.GBP", "VNI, Port, DirectRouting"}},
		{raw: `{"Type":"host-gw","VNI":3}`, errHas: []string{"Backend.VNI", "no options"}},
		{raw: `{"Type":"udp"}`, errHas: []string{`"udp"`, "host-gw"}, unknown: true},
		{raw: `{"Type":5}`, errHas: []string{"Backend.Type", "string"}},
		{raw: `[1]`, errHas: []string{"JSON object"}},
	}
	for _, tc := range cases {
		t.Run(tc.raw, func(t *testing.T) {
			got, err := parseConfig([]byte(tc.raw))
			if verr := ValidateConfig([]byte(tc.raw)); (verr == nil) != (err == nil) {
				t.Fatalf("ValidateConfig and parseConfig disagree: %v vs %v", verr, err)
			}
			if tc.errHas == nil {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if got != tc.want {
					t.Errorf("config = %+v, want %+v", got, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error, want one mentioning %q", tc.errHas)
			}
			for _, s := range tc.errHas {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
			if errors.Is(err, ErrUnknownType) != tc.unknown {
				t.Errorf("errors.Is(ErrUnknownType) = %v, want %v", !tc.unknown, tc.unknown)
			}
		})
	}
}

func TestNewProxyNDP(t *testing.T) {
	b, err := New([]byte(`{"Type":"proxy-ndp","Mode":"present"}`), ExtIface{V4: ExtLink{Name: "eth0", Index: 2, MTU: 1500}}, "n", Options{})
	if err != nil {
		t.Fatalf("New(proxy-ndp) = %v", err)
	}
	p, ok := b.(*proxyNDP)
	if !ok || b.Type() != TypeProxyNDP || p.r.Mode() != ModePresent {
		t.Fatalf("New(proxy-ndp) = %T type %q", b, b.Type())
	}
	if _, ok := b.(Withdrawer); !ok {
		t.Error("proxy-ndp does not implement Withdrawer")
	}
	p.Close()
}

func TestVTEPMAC(t *testing.T) {
	m := vtepMAC("node-1", false)
	if m.String() != vtepMAC("node-1", false).String() {
		t.Fatal("VTEP MAC is not stable")
	}
	if m[0]&2 == 0 || m[0]&1 != 0 {
		t.Errorf("VTEP MAC %s must be locally administered unicast", m)
	}
	if m.String() == vtepMAC("node-2", false).String() || m.String() == vtepMAC("node-1", true).String() {
		t.Error("VTEP MACs collide across nodes or families")
	}
}

func TestSameConfig(t *testing.T) {
	for _, tt := range []struct {
		a, b string
		same bool
	}{
		{`{"Type":"vxlan"}`, `{ "Type" : "vxlan" }`, true},
		{`{"Type":"vxlan"}`, `{"VNI":1,"Type":"vxlan","Port":8472}`, true},
		{`{"Type":"host-gw"}`, `{}`, true},
		{`{"Type":"vxlan","VNI":2}`, `{"Type":"vxlan","VNI":3}`, false},
		{`{"Type":"vxlan"}`, `{"Type":"host-gw"}`, false},
		{`{"Type":"proxy-ndp"}`, `{"Type":"proxy-ndp","Mode":"present"}`, false},
		{`{"Type":"bogus"}`, `{"Type":"bogus"}`, true},
		{`{"Type":"bogus"}`, `{"Type": "bogus"}`, false},
	} {
		if got := SameConfig(json.RawMessage(tt.a), json.RawMessage(tt.b)); got != tt.same {
			t.Errorf("SameConfig(%s, %s) = %v, want %v", tt.a, tt.b, got, tt.same)
		}
	}
}
