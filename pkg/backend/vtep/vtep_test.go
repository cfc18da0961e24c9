package vtep

import (
	"encoding/json"
	"strings"
	"testing"
)

// Data is byte for byte what encoding/json makes of LeaseData, so that
// Check's fast path recognises what agents publish.
func TestDataIsTheJSONOfLeaseData(t *testing.T) {
	for _, node := range []string{"a", "host-17.example.org", "ü"} {
		want, err := json.Marshal(LeaseData{VtepMAC: MAC(node, false).String(), VtepMAC6: MAC(node, true).String()})
		if err != nil {
			t.Fatal(err)
		}
		if got := Data(node); string(got) != string(want) {
			t.Errorf("Data(%q) = %s, want %s", node, got, want)
		}
		for _, v6 := range []bool{false, true} {
			if m := MAC(node, v6); m[0]&1 != 0 || m[0]&2 == 0 {
				t.Errorf("MAC(%q, %v) = %s is not a locally administered unicast MAC", node, v6, m)
			}
		}
	}
}

func TestCheck(t *testing.T) {
	a4, a6 := MAC("a", false).String(), MAC("a", true).String()
	b4, b6 := MAC("b", false).String(), MAC("b", true).String()
	for _, tc := range []struct {
		name, node, data string
		wantErr          string // "" = accepted
	}{
		{"own MACs", "a", string(Data("a")), ""},
		{"own MACs, other spelling", "a", `{ "VtepMAC6": "` + strings.ToUpper(a6) + `", "VtepMAC": "` + a4 + `" }`, ""},
		{"another host's MACs", "mallory", string(Data("a")), `VtepMAC "` + a4 + `" is not ` + MAC("mallory", false).String()},
		{"another host's IPv4 MAC", "b", `{"VtepMAC":"` + a4 + `","VtepMAC6":"` + b6 + `"}`, "VtepMAC "},
		{"another host's IPv6 MAC", "b", `{"VtepMAC":"` + b4 + `","VtepMAC6":"` + a6 + `"}`, "VtepMAC6 "},
		{"no IPv6 MAC", "b", `{"VtepMAC":"` + b4 + `"}`, `VtepMAC6 ""`},
		{"garbage MAC", "b", `{"VtepMAC":"not-a-mac","VtepMAC6":"` + b6 + `"}`, `"not-a-mac"`},
		{"not an object", "b", `"x"`, "is not {"},
		{"empty", "b", ``, "is not {"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Check(tc.node, []byte(tc.data))
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("refused: %v", err)
			case tc.wantErr != "" && err == nil:
				t.Errorf("accepted")
			case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Errorf("error %q does not contain %q", err, tc.wantErr)
			}
		})
	}
}

// The peer filter checks every vxlan record of a listing: 50,000 of them
// cost 50,000 of these.
func BenchmarkCheck(b *testing.B) {
	data := Data("host-12345.example.org")
	for b.Loop() {
		if err := Check("host-12345.example.org", data); err != nil {
			b.Fatal(err)
		}
	}
}
