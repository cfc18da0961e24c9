package lab

import "testing"

func TestTopSubnet(t *testing.T) {
	for _, c := range []struct {
		n    string
		b, k int
		want string
	}{
		{"10.100.0.0/16", 24, 0, "10.100.255.0/24"}, {"10.100.0.0/16", 24, 32, "10.100.223.0/24"},
		{"2001:db8:cd11::/48", 64, 0, "2001:db8:cd11:ffff::/64"}, {"2001:db8:cd11::/48", 80, 1, "2001:db8:cd11:ffff:fffe::/80"}} {
		if got := topSubnet(c.n, c.b, c.k).String(); got != c.want {
			t.Errorf("%v: %s want %s", c, got, c.want)
		}
	}
}
