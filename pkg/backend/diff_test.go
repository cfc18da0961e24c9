package backend

import (
	"math/rand/v2"
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

// TestDiffYieldingMatchesDiff: the full pass's sorting, yielding
// comparison finds the same puts and deletes as diff, on random route sets
// with drifted, missing, stale and duplicate-key routes, with and without
// touched keys (which make it look for missing keys the long way).
func TestDiffYieldingMatchesDiff(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 500 {
		want := map[routeKey]route{}
		var have []route
		n := rng.IntN(60)
		for j := range n {
			r := route{Dst: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(rng.IntN(4)), byte(j), 0}), 24),
				Priority: rng.IntN(2) * 100, Gw: netip.AddrFrom4([4]byte{192, 0, 2, byte(rng.IntN(3))}), Link: 2}
			if rng.IntN(4) > 0 {
				want[r.key()] = r
			}
			switch x := rng.IntN(10); {
			case x < 6:
				have = append(have, r) // as wanted (or stale, when not wanted)
			case x < 8:
				d := r
				d.Gw = netip.AddrFrom4([4]byte{192, 0, 2, 99})
				have = append(have, d) // drifted
				if x == 7 {
					have = append(have, r) // and a second route of the key
				}
			} // else missing
		}
		rng.Shuffle(len(have), func(a, b int) { have[a], have[b] = have[b], have[a] })
		wantPut, wantDel := diff(want, slices.Clone(have))
		sortObjects(wantPut)
		sortObjects(wantDel)
		sorted := slices.Clone(have)
		sortObjects(sorted)
		for _, touched := range []bool{false, true} {
			yields := 0
			put, del, ok := diffYielding(want, sorted, compareRouteKey, 7, func() bool { yields++; return true }, func() bool { return touched })
			if !ok {
				t.Fatalf("case %d: stopped without being asked to", i)
			}
			sortObjects(put)
			sortObjects(del)
			if !slices.Equal(put, wantPut) || !slices.Equal(del, wantDel) {
				t.Fatalf("case %d (touched %v): put %v del %v, diff gives put %v del %v", i, touched, put, del, wantPut, wantDel)
			}
			if len(have) >= 7 && yields == 0 {
				t.Fatalf("case %d: %d routes compared without yielding", i, len(have))
			}
		}
	}
	stopped := 0
	_, _, ok := diffYielding(map[routeKey]route{}, make([]route, 20), compareRouteKey, 5, func() bool { stopped++; return false }, func() bool { return false })
	if ok || stopped != 1 {
		t.Errorf("a yield reporting false: ok %v after %d yields, want false after 1", ok, stopped)
	}
}
