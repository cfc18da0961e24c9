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
	byKey := make(map[K][]V, len(have))
	for _, h := range have {
		byKey[h.key()] = append(byKey[h.key()], h)
	}
	for k, w := range want {
		if !slices.Contains(byKey[k], w) {
			put = append(put, w)
		}
	}
	for k, hs := range byKey {
		w, wanted := want[k]
		if !wanted {
			del = append(del, hs...)
			continue
		}
		if len(hs) < 2 {
			continue
		}
		for _, h := range hs {
			if h != w {
				del = append(del, h)
			}
		}
	}
	return put, del
}

// sortByString orders objects for deterministic application and logs.
func sortByString[V interface{ String() string }](vs []V) {
	slices.SortFunc(vs, func(a, b V) int { return cmp.Compare(a.String(), b.String()) })
}
