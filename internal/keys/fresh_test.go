package keys

import (
	"sync/atomic"
	"testing"
)

func TestLearnFresh(t *testing.T) {
	var v atomic.Int32
	for range 10 {
		LearnFresh(&v, true, 3, 1, 8)
	}
	if got := v.Load(); got != 8 {
		t.Fatalf("after 10 absent keys (+3 each, limit 8): %d, want 8", got)
	}
	LearnFresh(&v, false, 3, 1, 8)
	if got := v.Load(); got != 7 {
		t.Fatalf("after a stored key (-1): %d, want 7", got)
	}
	for range 20 {
		LearnFresh(&v, false, 3, 1, 8)
	}
	if got := v.Load(); got != -8 {
		t.Fatalf("after 20 stored keys: %d, want -8", got)
	}
}
