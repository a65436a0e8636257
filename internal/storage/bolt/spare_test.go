package bolt

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
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

// TestLostWriteOverAnEndStopsOpen: each append writes its frame over the end that the last one
// synced, and a new end after it. When the disk loses that write (the sector reads as it was),
// the old end is back, with acknowledged writes after it: frames that check, or (the segment's
// last frame lost) the end that its append wrote. Open refuses (ErrDamaged) rather than stop at
// the old end and drop them: with frames after it, or with a later segment that has writes. When
// the lost frame is the last of the whole log, the image is that of a crash in an append that
// was never acknowledged, and Open starts, as it does then. (Two audits' finds: reading stopped
// at the old end.)
func TestLostWriteOverAnEndStopsOpen(t *testing.T) {
	t.Parallel()
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct {
		name    string
		after   []string // acknowledged in the segment after the lost one, k2
		next    bool     // a later segment with an acknowledged write
		damaged bool
	}{
		{"frames after it", []string{"k3"}, false, true},
		{"frames after it, a later segment", []string{"k3"}, true, true},
		{"the segment's last frame, a later segment", nil, true, true},
		{"the log's last frame", nil, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := filepath.Join(t.TempDir(), FileName)
			w := walWith(t, base, 1, auditPut(now, "k1", "one"))
			seg := segmentPath(base, 1)
			before, err := os.ReadFile(seg) // the disk after k1's sync
			if err != nil {
				t.Fatal(err)
			}
			at := int(w.size) // k2's frame, over k1's end
			for _, k := range append([]string{"k2"}, tc.after...) {
				if err := w.append(auditPut(now, k, strings.Repeat(k, 1000))); err != nil {
					t.Fatal(err)
				}
			}
			_ = w.close()
			if tc.next {
				_ = walWith(t, base, 2, auditPut(now, "k4", "four")).close()
			}
			b, err := os.ReadFile(seg)
			if err != nil {
				t.Fatal(err)
			}
			// The 512-byte sector that holds k2's header reads as before k2's append.
			for i := at &^ 511; i < at&^511+512 && i < len(b); i++ {
				b[i] = 0
				if i < len(before) {
					b[i] = before[i]
				}
			}
			if err := os.WriteFile(seg, b, 0o600); err != nil {
				t.Fatal(err)
			}
			err = openErr(base)
			switch {
			case tc.damaged && !errors.Is(err, ErrDamaged):
				t.Errorf("Open with k1's end back over k2's header, and acknowledged writes after it: %v, want ErrDamaged", err)
			case !tc.damaged && err != nil:
				t.Errorf("Open with k1's end back over k2's header, the log's last write: %v, want it to start", err)
			}
		})
	}
}

// TestFailedWriteKeepsTheEnd: a write to the log that fails part-way (a full disk) may have put
// part of its frame over the segment's end. The end is written back and synced, and the log goes
// on: the segment reads to its end with nothing cut short, so a later segment's writes do not
// make it look damaged after a power loss, which keeps of the segment what its last sync wrote,
// and what was written after it, or not (a spare's syncs, written in place, no longer carry a
// truncate with them; here the failed write removed the spare, and the next segment is new).
// (An audit's find: the failed write's frame was cut off with a truncate that nothing synced,
// and a power loss could keep the frame's head instead.)
func TestFailedWriteKeepsTheEnd(t *testing.T) {
	s, clock := openLogStore(t)
	pairOf(t, s, "t", "a", "A", time.Hour)
	if err := s.checkpoint(); err != nil { // the first segment becomes the spare
		t.Fatal(err)
	}
	pairOf(t, s, "t", "b", "B", time.Hour)
	s.walMu.Lock()
	num, seg, size := s.wal.num, segmentPath(s.path, s.wal.num), s.wal.size
	var (
		synced  []byte // the segment as its last sync left it on disk
		partial []byte // what the failed write wrote, at size
		after   bool   // written after that sync
	)
	synced, err := os.ReadFile(seg) // b's append synced it
	if err != nil {
		t.Fatal(err)
	}
	syncLog = func(f *os.File) error {
		err := fdatasync(f)
		if f.Name() == seg {
			synced, _ = os.ReadFile(seg)
			after = false
		}
		return err
	}
	defer func() { syncLog = fdatasync }()
	writeFrame = func(f *os.File, b []byte, off int64) (int, error) {
		partial, after = bytes.Clone(b[:frameHeader+3]), true
		n, _ := f.WriteAt(partial, off) // the frame's header over the end, and no more
		return n, syscall.ENOSPC
	}
	err = s.wal.append(appendOp(nil, opDel, []byte("refused"), nil))
	writeFrame = (*os.File).WriteAt
	s.walMu.Unlock()
	if !errors.Is(err, keys.ErrUnavailable) || s.wal.err() != nil {
		t.Fatalf("append: %v, broken %v; want ErrUnavailable and a log that goes on", err, s.wal.err())
	}
	if _, err := os.Stat(spareName(s.path)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the spare after a failed write: %v; want it removed, to give its room", err)
	}
	// The next segment takes acknowledged writes (the checkpoint's cut, its transaction not run).
	s.ckMu.Lock()
	_, _, err = s.cut()
	s.ckMu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	pairOf(t, s, "t", "c", "C", time.Hour)
	killed := crashCopy(t, s) // the page cache as it is
	lost := copyImage(t, killed)
	rewriteSegment(t, lost, num, func([]byte) []byte {
		b := bytes.Clone(synced)
		if after { // the failed write reached the disk, whatever came after it did not
			b = append(b[:size], partial...)
			b = append(b, synced[min(len(synced), int(size)+len(partial)):]...)
		}
		return b
	})
	for name, path := range map[string]string{"kill -9": killed, "power loss": lost} {
		c, err := Open(copyImage(t, path), Options{Now: clock.Now})
		if err != nil {
			t.Errorf("%s: Open: %v; want a, b and c, all acknowledged", name, err)
			continue
		}
		for k, want := range map[string]string{"a": "A", "b": "B", "c": "C", "refused": "<none>"} {
			if got := bodyOf(t, c, "t", k); got != want {
				t.Errorf("%s: %s = %q, want %q", name, k, got, want)
			}
		}
		_ = c.Close()
	}
}

// walWith starts segment num of base and appends payloads to it.
func walWith(t *testing.T, base string, num uint64, payloads ...[]byte) *wal {
	t.Helper()
	w, err := openWAL(base, num)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range payloads {
		if err := w.append(p); err != nil {
			t.Fatal(err)
		}
	}
	return w
}
