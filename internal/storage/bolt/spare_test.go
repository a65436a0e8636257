package bolt

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSpareSegmentRecovers: a checkpoint keeps the segment it retired as the spare, and the next
// segment is that file, written over: after a crash, its frames up to its end are read, and
// nothing of what the file held before, whether the segment is the log's last or one with
// frames after it. A damaged frame in it, with frames after it that check, still stops Open,
// and a last frame cut short in it is dropped as in a new file.
func TestSpareSegmentRecovers(t *testing.T) {
	t.Parallel()
	s, clock := openLogStore(t)
	// A large first segment, so that the spare it becomes holds more than what is written over it.
	for i := range 200 {
		pairOf(t, s, "t", fmt.Sprintf("old%d", i), "old", time.Hour)
	}
	// The first checkpoint retires the first segment, the spare then; the second takes it as
	// the third segment, and retires the second (one pair) as the spare.
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	pairOf(t, s, "t", "between", "between", time.Hour)
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	spare, err := os.Stat(spareName(s.path))
	if err != nil {
		t.Fatalf("no spare after two checkpoints: %v", err)
	}
	cur, err := os.Stat(segmentPath(s.path, s.wal.num))
	if err != nil {
		t.Fatal(err)
	}
	if cur.Size() <= s.wal.size+frameHeader {
		t.Fatalf("the current segment (%d bytes, %d written) is not a spare written over", cur.Size(), s.wal.size)
	}
	for i := range 3 {
		pairOf(t, s, "t", fmt.Sprintf("last%d", i), "in the last segment", time.Hour)
	}
	lastOnly := crashCopy(t, s) // the log: one segment, a spare written over

	// A checkpoint's cut without its transaction: the segment above is the log's first, and the
	// spare (the segment the last checkpoint retired) its second, with frames too.
	s.ckMu.Lock()
	first := s.wal.num
	if _, _, err := s.cut(); err != nil {
		s.ckMu.Unlock()
		t.Fatal(err)
	}
	s.ckMu.Unlock()
	if got, err := os.Stat(segmentPath(s.path, s.wal.num)); err != nil || !os.SameFile(got, spare) {
		t.Fatalf("the second segment is not the spare: %v", err)
	}
	for i := range 2 {
		pairOf(t, s, "t", fmt.Sprintf("next%d", i), "in the next segment", time.Hour)
	}
	size := s.wal.size
	twoSegments := crashCopy(t, s)

	for name, path := range map[string]string{"last": lastOnly, "not last": twoSegments} {
		c := openWith(t, copyImage(t, path), clock, Options{})
		for i := range 3 {
			if got := bodyOf(t, c, "t", fmt.Sprintf("last%d", i)); got != "in the last segment" {
				t.Errorf("%s: last%d = %q", name, i, got)
			}
		}
		if got := bodyOf(t, c, "t", "old0"); got != "old" {
			t.Errorf("%s: old0 = %q", name, got)
		}
	}
	c := openWith(t, copyImage(t, twoSegments), clock, Options{})
	for i := range 2 {
		if got := bodyOf(t, c, "t", fmt.Sprintf("next%d", i)); got != "in the next segment" {
			t.Errorf("next%d = %q", i, got)
		}
	}

	// Damage in the first segment's frames, with frames after it in the same segment, and in
	// the next: ErrDamaged.
	for name, path := range map[string]string{"last": lastOnly, "not last": twoSegments} {
		damaged := copyImage(t, path)
		rewriteSegment(t, damaged, first, func(b []byte) []byte {
			b[frameOffsets(b)[1]+frameHeader+2] ^= 0xff
			return b
		})
		if err := openErr(damaged); !errors.Is(err, ErrDamaged) {
			t.Errorf("%s: a damaged frame in a spare written over, frames after it: %v, want ErrDamaged", name, err)
		}
	}
	// A last frame cut short in the second segment: dropped, the rest kept.
	torn := copyImage(t, twoSegments)
	writeAtEnd(t, segmentPath(torn, first+1), size, []byte{0x40, 0, 0, 0, 1, 2, 3})
	c = openWith(t, torn, clock, Options{})
	if got := bodyOf(t, c, "t", "next1"); got != "in the next segment" {
		t.Errorf("after a last frame cut short: next1 = %q", got)
	}
}

// copyImage copies the data file at path (not open) and its log into a new directory, and
// returns the copy's data file: Open recovers, and changes, what it opens.
func copyImage(t *testing.T, path string) string {
	t.Helper()
	dir := t.TempDir()
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() != FileName && !strings.HasPrefix(e.Name(), FileName+".wal-") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(filepath.Dir(path), e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, FileName)
}
