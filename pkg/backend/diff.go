package backend

import (
	"cmp"
	"slices"
)

// keyed is a kernel object value whose key is the kernel's identity for it.
type keyed[K comparable] interface {
	comparable
	key() K
}

// diff compares the desired objects with the actual ones and returns what to
// put (add or replace in place) and what to delete. It is pure.
//
// An actual object whose key is desired is never deleted when it is the only
// one with that key: the put replaces it in place, so a changed route is
// updated without a window in which it is missing. Only when the kernel holds
// several objects under one key (e.g. extra FDB remotes for one MAC) are the
// ones that differ from the desired value deleted. Actual objects equal to
// the desired value produce nothing, so a restart touches nothing that is
// already right. Callers apply puts before deletes.
func diff[K comparable, V keyed[K]](want map[K]V, have []V) (put, del []V) {
	// Per key: how many actual objects have it and whether one equals
	// the desired value. Not the objects themselves: at 50,000 peers this
	// index of 100,000 routes is built at every full pass, at a third of
	// the size.
	type seen struct {
		n    uint32
		same bool
	}
	byKey := make(map[K]seen, len(have))
	for _, h := range have {
		k := h.key()
		s := byKey[k]
		s.n++
		if w, ok := want[k]; ok && w == h {
			s.same = true
		}
		byKey[k] = s
	}
	if missing := len(want) - len(byKey); missing > 0 {
		put = make([]V, 0, missing) // at least this many: one growth, not a dozen
	}
	for k, w := range want {
		if !byKey[k].same {
			put = append(put, w)
		}
	}
	for _, h := range have {
		k := h.key()
		if w, wanted := want[k]; !wanted || (byKey[k].n > 1 && h != w) {
			del = append(del, h)
		}
	}
	return put, del
}

// diffYielding is diff for a full pass that lets other writers at want
// between steps: after every `every` objects looked at it calls yield, and
// stops, reporting ok false, when yield does. Objects whose key changed in
// want or in the kernel while it yielded are the caller's to leave out
// (for them the result is stale); touched reports whether any did. have
// must be sorted by compare (sortObjects), which orders by key first
// (keyCmp compares an object's key with a key the same way): the objects
// of one key are adjacent, and no index of have is allocated (at 50,000
// peers diff's index of 100,000 routes would be 8 MB).
func diffYielding[K comparable, V object[K, V]](want map[K]V, have []V, keyCmp func(V, K) int, every int, yield, touched func() bool) (put, del []V, ok bool) {
	n := 0
	step := func() bool {
		n++
		return n%every != 0 || yield()
	}
	matched := 0 // keys of have that are wanted
	for i := 0; i < len(have); {
		k := have[i].key()
		j := i + 1
		for j < len(have) && have[j].key() == k {
			j++
		}
		w, wanted := want[k]
		if wanted {
			matched++
			if !slices.Contains(have[i:j], w) {
				put = append(put, w)
			}
		}
		for _, h := range have[i:j] {
			// As diff: one object of a wanted key is replaced in place by
			// the put; of several, those that differ go.
			if !wanted || (j-i > 1 && h != w) {
				del = append(del, h)
			}
			if !step() {
				return nil, nil, false
			}
		}
		i = j
	}
	if matched == len(want) && !touched() {
		return put, del, true // every wanted key is in have
	}
	for k, w := range want {
		if _, found := slices.BinarySearchFunc(have, k, keyCmp); !found {
			put = append(put, w)
		}
		if !step() {
			return nil, nil, false
		}
	}
	return put, del, true
}

// compareRouteKey, compareNeighKey and compareFDBKey order an object by
// its key the way its compare method does.
func compareRouteKey(r route, k routeKey) int {
	return cmp.Or(comparePrefix(r.Dst, k.Dst), cmp.Compare(r.Priority, k.Priority))
}

func compareNeighKey(n neigh, k neighKey) int {
	return cmp.Or(cmp.Compare(n.Link, k.Link), n.IP.Compare(k.IP))
}

func compareFDBKey(f fdb, k fdbKey) int {
	return cmp.Or(cmp.Compare(f.Link, k.Link), cmp.Compare(f.MAC, k.MAC))
}

// object is a kernel object value the reconciler applies: keyed,
// printable, and ordered by compare for deterministic application and logs.
type object[K comparable, V any] interface {
	keyed[K]
	String() string
	compare(V) int
}

// sortObjects orders objects by their compare method.
func sortObjects[V interface{ compare(V) int }](vs []V) {
	slices.SortFunc(vs, func(a, b V) int { return a.compare(b) })
}

// sortByString orders objects by their text.
func sortByString[V interface{ String() string }](vs []V) {
	slices.SortFunc(vs, func(a, b V) int { return cmp.Compare(a.String(), b.String()) })
}
