package backend

import (
	"net/netip"
	"slices"
	"testing"
)

func TestDiff(t *testing.T) {
	p := netip.MustParsePrefix
	a := netip.MustParseAddr
	r := func(dst, gw string, link int) route {
		return route{Dst: p(dst), Gw: a(gw), Link: link}
	}
	f := func(mac, dst string) fdb { return fdb{Link: 5, MAC: mac, Dst: a(dst)} }
	const m1, m2 = "0a:00:00:00:00:01", "0a:00:00:00:00:02"

	routeCases := []struct {
		name       string
		want, have []route
		put, del   []route
	}{
		{name: "empty"},
		{name: "add all", want: []route{r("10.0.1.0/24", "192.0.2.1", 2)}, put: []route{r("10.0.1.0/24", "192.0.2.1", 2)}},
		{name: "equal is untouched", want: []route{r("10.0.1.0/24", "192.0.2.1", 2)}, have: []route{r("10.0.1.0/24", "192.0.2.1", 2)}},
		{name: "changed gateway replaced in place, not deleted",
			want: []route{r("10.0.1.0/24", "192.0.2.1", 2)}, have: []route{r("10.0.1.0/24", "192.0.2.9", 2)},
			put: []route{r("10.0.1.0/24", "192.0.2.1", 2)}},
		{name: "changed device replaced", want: []route{r("10.0.1.0/24", "192.0.2.1", 2)}, have: []route{r("10.0.1.0/24", "192.0.2.1", 3)},
			put: []route{r("10.0.1.0/24", "192.0.2.1", 2)}},
		{name: "onlink differs", want: []route{{Dst: p("10.0.1.0/24"), Gw: a("10.0.1.0"), Link: 4, OnLink: true}},
			have: []route{{Dst: p("10.0.1.0/24"), Gw: a("10.0.1.0"), Link: 4}},
			put:  []route{{Dst: p("10.0.1.0/24"), Gw: a("10.0.1.0"), Link: 4, OnLink: true}}},
		{name: "stale deleted", have: []route{r("10.0.4.0/24", "192.0.2.4", 2)}, del: []route{r("10.0.4.0/24", "192.0.2.4", 2)}},
		{name: "other metric is another route",
			want: []route{r("10.0.1.0/24", "192.0.2.1", 2)},
			have: []route{{Dst: p("10.0.1.0/24"), Gw: a("192.0.2.1"), Link: 2, Priority: 100}},
			put:  []route{r("10.0.1.0/24", "192.0.2.1", 2)},
			del:  []route{{Dst: p("10.0.1.0/24"), Gw: a("192.0.2.1"), Link: 2, Priority: 100}}},
		{name: "mixed",
			want: []route{r("10.0.1.0/24", "192.0.2.1", 2), r("10.0.2.0/24", "192.0.2.2", 2)},
			have: []route{r("10.0.2.0/24", "192.0.2.2", 2), r("10.0.3.0/24", "192.0.2.3", 2)},
			put:  []route{r("10.0.1.0/24", "192.0.2.1", 2)},
			del:  []route{r("10.0.3.0/24", "192.0.2.3", 2)}},
	}
	for _, tc := range routeCases {
		t.Run("route/"+tc.name, func(t *testing.T) {
			want := map[routeKey]route{}
			for _, w := range tc.want {
				want[w.key()] = w
			}
			put, del := diff(want, tc.have)
			checkSame(t, "put", put, tc.put)
			checkSame(t, "del", del, tc.del)
		})
	}

	fdbCases := []struct {
		name       string
		want, have []fdb
		put, del   []fdb
	}{
		{name: "new remote", want: []fdb{f(m1, "192.0.2.1")}, put: []fdb{f(m1, "192.0.2.1")}},
		{name: "moved remote replaced in place", want: []fdb{f(m1, "192.0.2.1")}, have: []fdb{f(m1, "192.0.2.7")}, put: []fdb{f(m1, "192.0.2.1")}},
		{name: "extra remotes of a wanted MAC deleted", want: []fdb{f(m1, "192.0.2.1")},
			have: []fdb{f(m1, "192.0.2.7"), f(m1, "192.0.2.1"), f(m1, "192.0.2.8")},
			del:  []fdb{f(m1, "192.0.2.7"), f(m1, "192.0.2.8")}},
		{name: "duplicates without the wanted one", want: []fdb{f(m1, "192.0.2.1")},
			have: []fdb{f(m1, "192.0.2.7"), f(m1, "192.0.2.8")},
			put:  []fdb{f(m1, "192.0.2.1")},
			del:  []fdb{f(m1, "192.0.2.7"), f(m1, "192.0.2.8")}},
		{name: "gone peer", have: []fdb{f(m2, "192.0.2.2")}, del: []fdb{f(m2, "192.0.2.2")}},
	}
	for _, tc := range fdbCases {
		t.Run("fdb/"+tc.name, func(t *testing.T) {
			want := map[fdbKey]fdb{}
			for _, w := range tc.want {
				want[w.key()] = w
			}
			put, del := diff(want, tc.have)
			checkSame(t, "put", put, tc.put)
			checkSame(t, "del", del, tc.del)
		})
	}
}

func checkSame[V interface {
	comparable
	String() string
}](t *testing.T, what string, got, want []V) {
	t.Helper()
	sortByString(got)
	sortByString(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s = %v, want %v", what, got, want)
	}
}
