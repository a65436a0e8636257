package keys

import "sync/atomic"

// LearnFresh scores one begin's key in v, for a store that guesses whether most keys its begins
// name are fresh (no record yet) and skips work that only a stored record needs: v rises by up
// for an absent key and falls by down for a stored one, within ±limit. Its sign is the guess.
// Safe for concurrent use; at either bound it writes nothing.
func LearnFresh(v *atomic.Int32, absent bool, up, down, limit int32) {
	for {
		cur := v.Load()
		next := cur - down
		if absent {
			next = cur + up
		}
		next = min(max(next, -limit), limit)
		if next == cur || v.CompareAndSwap(cur, next) {
			return
		}
	}
}
