package bolt

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

// crashCopy copies the data file and the log of the open store s into a new directory, as a
// kill -9 would leave them (the page cache is what the files hold), and returns the copy's data
// file. s stays open.
func crashCopy(t *testing.T, s *Store) string {
	t.Helper()
	s.walMu.Lock() // no group half-way through its frame
	defer s.walMu.Unlock()
	return copyImage(t, s.path)
}

// copyImage copies the data file at path and its log (the spare included) into a new directory,
// and returns the copy's data file: Open recovers, and changes, what it opens, so each Open of an
// image takes a copy. A store open on path must not be writing (see crashCopy).
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

// inFile reports whether the bbolt file at path (closed) holds a record for (tenant, key).
func inFile(t *testing.T, path, tenant, key string) bool {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	found := false
	_ = db.View(func(tx *bbolt.Tx) error {
		found = tx.Bucket(bucketRecords).Get(keys.StorageID(tenant, key)) != nil
		return nil
	})
	return found
}

// openLogStore opens a store in a new directory, on a clock that stands still, whose
// checkpoints wait for the test (one an hour), so that its writes stay in the log.
func openLogStore(t *testing.T) (*Store, *storagetest.Clock) {
	t.Helper()
	clock := storagetest.NewClock(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
	return openWith(t, filepath.Join(t.TempDir(), FileName), clock, Options{CheckpointInterval: time.Hour}), clock
}

// TestLogRecoversWhatTheFileLacks: what was acknowledged and is only in the log (no checkpoint
// ran) is all there after a crash: completes, a delete, a release, and fences that keep growing.
func TestLogRecoversWhatTheFileLacks(t *testing.T) {
	t.Parallel()
	s, clock := openLogStore(t)
	ctx := context.Background()
	for i := range 50 {
		pairOf(t, s, "t", fmt.Sprintf("k%d", i), fmt.Sprintf("body %d", i), time.Hour)
	}
	if err := s.Delete(ctx, "t", "k7"); err != nil {
		t.Fatal(err)
	}
	held, err := s.Begin(ctx, "t", "held", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	released, err := s.Begin(ctx, "u", "released", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Release(ctx, "u", "released", released.Record.Lease.Token); err != nil {
		t.Fatal(err)
	}

	path := crashCopy(t, s)
	if inFile(t, path, "t", "k0") {
		t.Fatal("the record is in the bbolt file already: this test does not test the log")
	}
	c := openWith(t, path, clock, Options{CheckpointInterval: time.Hour})
	for i := range 50 {
		want := fmt.Sprintf("body %d", i)
		if i == 7 {
			want = "<none>"
		}
		if got := bodyOf(t, c, "t", fmt.Sprintf("k%d", i)); got != want {
			t.Errorf("k%d after the crash: %q, want %q", i, got, want)
		}
	}
	if got := bodyOf(t, c, "t", "held"); got != "<in progress>" {
		t.Errorf("the held key after the crash: %q", got)
	}
	if got := bodyOf(t, c, "u", "released"); got != "<none>" {
		t.Errorf("the released key after the crash: %q", got)
	}
	for _, x := range []struct {
		tenant string
		last   uint64
	}{{"t", held.Record.Lease.Fence}, {"u", released.Record.Lease.Fence}} {
		res, err := c.Begin(ctx, x.tenant, "next", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		if res.Record.Lease.Fence <= x.last {
			t.Errorf("tenant %s: fence %d after the crash, not above %d before it", x.tenant, res.Record.Lease.Fence, x.last)
		}
	}
	// Recovery carried the log into the file and removed it.
	if nums, _ := segments(path); len(nums) != 1 {
		t.Errorf("segments after recovery: %v, want the new one alone", nums)
	}
}

// TestLogCutShort: a frame cut short by a crash (never acknowledged: its sync had not returned)
// is dropped, and everything before it is kept; so is a segment the crash cut in its header.
func TestLogCutShort(t *testing.T) {
	t.Parallel()
	s, clock := openLogStore(t)
	pairOf(t, s, "t", "a", "kept", time.Hour)
	for _, cut := range []struct {
		name string
		tail []byte
	}{
		{"header", []byte{200, 0}},
		{"payload", append(binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, 100), 7), "partial"...)},
		{"checksum", append(binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, 3), 7), "abc"...)},
	} {
		t.Run(cut.name, func(t *testing.T) {
			path := crashCopy(t, s)
			nums, _ := segments(path)
			if nums[len(nums)-1] != s.wal.num {
				t.Fatalf("the last segment is %d, the current one %d", nums[len(nums)-1], s.wal.num)
			}
			writeAtEnd(t, segmentPath(path, s.wal.num), s.wal.size, cut.tail)
			// And a next segment that the crash cut in its header.
			if err := os.WriteFile(segmentPath(path, nums[len(nums)-1]+1), []byte(walMagic[:3]), 0o600); err != nil {
				t.Fatal(err)
			}
			c := openWith(t, path, clock, Options{})
			if got := bodyOf(t, c, "t", "a"); got != "kept" {
				t.Errorf("after a frame cut short: %q, want kept", got)
			}
		})
	}
}

// TestLogDamageStopsOpen: a damaged frame followed by writes in a later segment, or a missing
// segment, stops Open with ErrDamaged: records that were acknowledged would be lost. Without the
// damage, both segments' writes are there.
func TestLogDamageStopsOpen(t *testing.T) {
	t.Parallel()
	s, clock := openLogStore(t)
	pairOf(t, s, "t", "first", "in the first segment", time.Hour)
	// The log moves to a new segment, as a checkpoint would before it writes the file; a
	// crash comes before the file holds anything.
	next, err := s.wal.prepare()
	if err != nil {
		t.Fatal(err)
	}
	s.walMu.Lock()
	first, err := s.wal.rotate(next)
	s.walMu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	pairOf(t, s, "t", "second", "in the second segment", time.Hour)

	t.Run("Intact", func(t *testing.T) {
		c := openWith(t, crashCopy(t, s), clock, Options{})
		for k, want := range map[string]string{"first": "in the first segment", "second": "in the second segment"} {
			if got := bodyOf(t, c, "t", k); got != want {
				t.Errorf("%s: %q, want %q", k, got, want)
			}
		}
	})
	t.Run("DamagedFrame", func(t *testing.T) {
		path := crashCopy(t, s)
		rewriteSegment(t, path, first, func(b []byte) []byte { b[walHeaderSize+frameHeader+3] ^= 0xff; return b })
		if err := openErr(path); !errors.Is(err, ErrDamaged) {
			t.Errorf("open with a damaged frame before a segment with writes: %v, want ErrDamaged", err)
		}
	})
	t.Run("MissingSegment", func(t *testing.T) {
		path := crashCopy(t, s)
		if err := os.Remove(segmentPath(path, first)); err != nil {
			t.Fatal(err)
		}
		if err := openErr(path); !errors.Is(err, ErrDamaged) {
			t.Errorf("open with a segment missing: %v, want ErrDamaged", err)
		}
	})
}

// rewriteSegment replaces segment num of the data file at path with what edit makes of it.
func rewriteSegment(t *testing.T, path string, num uint64, edit func([]byte) []byte) {
	t.Helper()
	seg := segmentPath(path, num)
	b, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(seg, edit(b), 0o600); err != nil {
		t.Fatal(err)
	}
}

// openErr opens the data file at path, closes the store at once when it opened, and returns
// Open's error.
func openErr(path string) error {
	c, err := Open(path, Options{})
	if c != nil {
		c.Close()
	}
	return err
}

// TestLogSyncFails: a write whose log sync fails is not acknowledged (503), and the log takes
// no more writes (a failed fdatasync leaves what is on disk unknown, and a later one may not
// say so): Ping reports it; what was acknowledged before is still read, and after a restart.
func TestLogSyncFails(t *testing.T) {
	clock := storagetest.NewClock(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
	path := filepath.Join(t.TempDir(), FileName)
	s, err := Open(path, Options{Now: clock.Now, CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	pairOf(t, s, "t", "before", "acknowledged", time.Hour)
	syncLog = func(*os.File) error { return syscall.EIO }
	t.Cleanup(func() { syncLog = fdatasync })
	if _, err := s.Begin(ctx, "t", "during", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); !errors.Is(err, keys.ErrUnavailable) {
		t.Fatalf("begin whose sync failed: %v, want keys.ErrUnavailable", err)
	}
	syncLog = fdatasync
	if _, err := s.Begin(ctx, "t", "after", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); !errors.Is(err, keys.ErrUnavailable) {
		t.Errorf("begin after a failed sync: %v, want keys.ErrUnavailable", err)
	}
	if err := s.Ping(ctx); !errors.Is(err, errWALBroken) {
		t.Errorf("Ping after a failed sync: %v", err)
	}
	if got := bodyOf(t, s, "t", "before"); got != "acknowledged" {
		t.Errorf("a record acknowledged before: %q", got)
	}
	if got := bodyOf(t, s, "t", "during"); got != "<none>" {
		t.Errorf("the begin that was not acknowledged is seen: %q", got)
	}
	if err := s.Close(); !errors.Is(err, errWALBroken) {
		t.Errorf("Close with the log broken: %v, want the log's error", err)
	}
	c := openWith(t, path, clock, Options{})
	if got := bodyOf(t, c, "t", "before"); got != "acknowledged" {
		t.Errorf("a record acknowledged before, after a restart: %q", got)
	}
}

// TestCheckpointsBesideWriters: writers, readers and sweeps beside checkpoints every
// millisecond; every writer reads its own writes back at once, whether they are in the active
// memtable, the frozen one, or the file, and fences only grow. Run it with -race.
func TestCheckpointsBesideWriters(t *testing.T) {
	t.Parallel()
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{CheckpointInterval: time.Millisecond, CacheBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer checkAndClose(t, s)
	ctx := context.Background()
	deadline := time.Now().Add(1500 * time.Millisecond)
	var wg sync.WaitGroup
	for w := range 6 {
		wg.Go(func() {
			var lastFence uint64 // of this writer's begins, one after the other
			for i := 0; time.Now().Before(deadline); i++ {
				key := fmt.Sprintf("w%d-%d", w, i%20)
				res, err := s.Begin(ctx, "t", key, keys.BeginRequest{Fingerprint: "f", Lease: time.Minute, TTL: time.Hour})
				if err != nil {
					t.Error(err)
					return
				}
				if res.Outcome == keys.Replayed {
					// Done before: delete it, and it must be gone at once.
					if err := s.Delete(ctx, "t", key); err != nil {
						t.Error(err)
						return
					}
					if _, err := s.Get(ctx, "t", key); !errors.Is(err, keys.ErrNotFound) {
						t.Errorf("%s right after its delete: %v", key, err)
						return
					}
					continue
				}
				if res.Outcome != keys.Acquired {
					t.Errorf("%s: %v", key, res.Outcome)
					return
				}
				if res.Record.Lease.Fence <= lastFence {
					t.Errorf("fence %d after %d", res.Record.Lease.Fence, lastFence)
				}
				lastFence = res.Record.Lease.Fence
				body := fmt.Sprintf("%s/%d", key, i)
				if _, err := s.Complete(ctx, "t", key, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200, Body: []byte(body)}}); err != nil {
					t.Error(err)
					return
				}
				for range 2 { // a get, and a replay
					got, err := s.Get(ctx, "t", key)
					if err != nil || got.Response == nil || string(got.Response.Body) != body {
						t.Errorf("%s right after its complete: %+v, %v", key, got.Response, err)
						return
					}
				}
				rep, err := s.Begin(ctx, "t", key, keys.BeginRequest{Fingerprint: "f", Lease: time.Minute, TTL: time.Hour})
				if err != nil || rep.Outcome != keys.Replayed || string(rep.Record.Response.Body) != body {
					t.Errorf("%s replayed right after its complete: %v, %v", key, rep.Outcome, err)
					return
				}
			}
		})
	}
	wg.Go(func() {
		for time.Now().Before(deadline) {
			if _, err := s.Sweep(ctx, 100); err != nil {
				t.Error(err)
				return
			}
		}
	})
	wg.Wait()
	if st := s.CommitStats(); st.Checkpoints < 10 {
		t.Errorf("%d checkpoints ran beside the writers: the test tested little", st.Checkpoints)
	}
}

// TestLogBoundWhileCheckpointsFail: while checkpoints fail, the log (and the memtable that
// mirrors it) grows only to logLimit; the group that finds it there is refused with
// ErrUnavailable, reads go on, and writes resume once a checkpoint succeeds. Nothing answered
// is lost, before or after, across a reopen.
func TestLogBoundWhileCheckpointsFail(t *testing.T) {
	path := filepath.Join(t.TempDir(), FileName)
	const ckBytes = 4 << 10
	s, err := Open(path, Options{CheckpointInterval: time.Hour, CheckpointBytes: ckBytes})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Close() }()
	s.logLimit = logLimitFactor * ckBytes // below minLogLimit, to reach it in a few writes
	body := strings.Repeat("b", 200)
	pairOf(t, s, "t", "before", body, time.Hour)
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	// A frozen memtable whose apply fails (bbolt refuses a bucket with an empty name), standing
	// in for a data file that cannot be written: every checkpoint from here fails.
	bad := newMemtable()
	bad.fences[""] = 1
	s.memMu.Lock()
	s.frozen, s.frozenThrough = bad, 0
	s.memMu.Unlock()

	ctx := context.Background()
	var acked []string
	var refused error
	for i := 0; i < 10*logLimitFactor*ckBytes/200 && refused == nil; i++ {
		key := fmt.Sprintf("k%d", i)
		res, err := s.Begin(ctx, "t", key, keys.BeginRequest{Fingerprint: "f", Lease: time.Minute, TTL: time.Hour})
		if err == nil {
			_, err = s.Complete(ctx, "t", key, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200, Body: []byte(body)}})
		}
		if err != nil {
			refused = err
			break
		}
		acked = append(acked, key)
		_ = s.checkpoint() // fails: the frozen memtable cannot be applied
	}
	if !errors.Is(refused, keys.ErrUnavailable) || !errors.Is(refused, errLogFull) {
		t.Fatalf("after %d pairs with checkpoints failing: %v; want errLogFull (ErrUnavailable)", len(acked), refused)
	}
	if size := s.wal.size; size < s.logLimit || size > s.logLimit+2<<10 {
		t.Errorf("the log stopped at %d bytes; its limit is %d", size, s.logLimit)
	}
	if s.checkpointFailures.Load() == 0 {
		t.Error("no checkpoint failure counted")
	}
	t.Logf("%d pairs answered, then %v; the log holds %d bytes (limit %d)", len(acked), refused, s.wal.size, s.logLimit)
	for _, k := range append([]string{"before"}, acked...) {
		if got := bodyOf(t, s, "t", k); got != body {
			t.Fatalf("%s reads %q while the log is full", k, got)
		}
	}

	// The data file can be written again: the next checkpoint carries the log, and writes resume.
	s.memMu.Lock()
	s.frozen = nil
	s.memMu.Unlock()
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	pairOf(t, s, "t", "after", body, time.Hour)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range append([]string{"before", "after"}, acked...) {
		if got := bodyOf(t, s, "t", k); got != body {
			t.Fatalf("%s reads %q after a reopen", k, got)
		}
	}
}

// TestLogDamagedLengthStopsOpen: a frame whose length field is damaged so that it runs past the
// segment's end looks like a frame cut short by a crash; but frames synced after it follow, and
// they check with the segment's seed, so Open refuses (ErrDamaged) instead of dropping them,
// acknowledged writes among them.
func TestLogDamagedLengthStopsOpen(t *testing.T) {
	t.Parallel()
	s, _ := openLogStore(t)
	for i := range 3 {
		pairOf(t, s, "t", fmt.Sprintf("k%d", i), "acknowledged", time.Hour)
	}
	for _, length := range []uint32{0xfffffff0, 1 << 20} { // past maxFrame, and merely past the end
		t.Run(fmt.Sprint(length), func(t *testing.T) {
			path := crashCopy(t, s)
			rewriteSegment(t, path, s.wal.num, func(b []byte) []byte {
				offs := frameOffsets(b)
				if len(offs) < 4 {
					t.Fatalf("%d frames, want 6 (three pairs)", len(offs))
				}
				binary.LittleEndian.PutUint32(b[offs[1]:], length)
				return b
			})
			if err := openErr(path); !errors.Is(err, ErrDamaged) {
				t.Errorf("open with the second frame's length damaged: %v, want ErrDamaged", err)
			}
		})
	}
}

// TestLogBodyIsNotAFrame: a response body is bytes a tenant chooses, and one may hold a frame
// made to check. When the frame that carries it is cut short by a crash (and so was never
// acknowledged), Open drops it as it drops any other, and starts: the frame in the body does not
// check, because each segment's checksums start from its own random salt.
func TestLogBodyIsNotAFrame(t *testing.T) {
	t.Parallel()
	s, clock := openLogStore(t)
	pairOf(t, s, "t", "before", "kept", time.Hour)
	// The best a tenant can do without the salt: a frame that checks with the first format's
	// checksum (no salt), or with a salt of its own.
	payload := appendOp(nil, opDel, []byte("someone else's record"), nil)
	var forged []byte
	for _, seed := range []uint32{0, crc32.Checksum([]byte("a guess"), castagnoli)} {
		forged = binary.LittleEndian.AppendUint32(forged, uint32(len(payload)))
		forged = binary.LittleEndian.AppendUint32(forged, crc32.Update(seed, castagnoli, payload))
		forged = append(forged, payload...)
	}
	pairOf(t, s, "t", "forger", string(forged)+strings.Repeat("x", 64), time.Hour)
	path := crashCopy(t, s)
	// The crash cut the last frame (the complete that stored the body) after the forged frames.
	rewriteSegment(t, path, s.wal.num, func(b []byte) []byte {
		offs := frameOffsets(b)
		last := offs[len(offs)-1]
		at := bytes.Index(b[last:], forged)
		if at < 0 {
			t.Fatal("the forged frames are not in the last frame")
		}
		return b[:last+at+len(forged)+8]
	})
	c := openWith(t, path, clock, Options{})
	if got := bodyOf(t, c, "t", "before"); got != "kept" {
		t.Errorf("before: %q, want kept", got)
	}
	if got := bodyOf(t, c, "t", "forger"); got != "<in progress>" {
		t.Errorf("forger: %q, want <in progress> (its complete was cut short)", got)
	}
}

// TestLogFirstFormatRecovers: a segment of the first format (IDEMWAL1: no salt, the payload's
// CRC-32C alone), as the release before this one left it at a crash, is applied at Open.
func TestLogFirstFormatRecovers(t *testing.T) {
	t.Parallel()
	clock := storagetest.NewClock(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
	path := filepath.Join(t.TempDir(), FileName)
	s := openWith(t, path, clock, Options{CheckpointInterval: time.Hour})
	num := s.wal.num                  // Close removes it, empty; the next Open would make it again
	if err := s.Close(); err != nil { // the file holds everything; the log is empty
		t.Fatal(err)
	}
	now := clock.Now()
	rec := keys.Record{Key: "old", State: keys.StateCompleted, Fingerprint: "f",
		Lease:     keys.Lease{Token: "tok", Fence: 1, ExpiresAt: now.Add(time.Minute)},
		Response:  &keys.Response{Status: 200, Body: []byte("from the first format")},
		CreatedAt: now, CompletedAt: now, ExpiresAt: now.Add(time.Hour), TTL: time.Hour}
	payload := appendOp(nil, opPut, keys.StorageID("t", "old"), keys.AppendRecord(nil, &rec))
	seg := segmentPrefix(walMagicV1, num)
	seg = binary.LittleEndian.AppendUint32(seg, uint32(len(payload)))
	seg = binary.LittleEndian.AppendUint32(seg, crc32.Checksum(payload, castagnoli))
	seg = append(seg, payload...)
	if err := os.WriteFile(segmentPath(path, num), seg, 0o600); err != nil {
		t.Fatal(err)
	}
	c := openWith(t, path, clock, Options{})
	if got := bodyOf(t, c, "t", "old"); got != "from the first format" {
		t.Errorf("a write in a first-format segment: %q after Open", got)
	}
}

// TestLogSecondFormatRecovers: segments of the second format (IDEMWAL2: the salt in the header
// only, frames of 8-byte headers, no end), as the release before this one leaves them at a
// crash, are applied at Open; a damaged frame in one, with a frame that checks after it, stops
// Open (ErrDamaged), and a last frame cut short is dropped.
func TestLogSecondFormatRecovers(t *testing.T) {
	t.Parallel()
	clock := storagetest.NewClock(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
	now := clock.Now()
	path := filepath.Join(t.TempDir(), FileName)
	s := openWith(t, path, clock, Options{CheckpointInterval: time.Hour})
	num := s.wal.num
	if err := s.Close(); err != nil { // the file holds everything; the log is empty
		t.Fatal(err)
	}
	head := append(segmentPrefix(walMagicV2, num), 1, 2, 3, 4, 5, 6, 7, 8)
	seed := crc32.Checksum(head, castagnoli)
	seg := bytes.Clone(head)
	var offs []int
	for _, k := range []string{"v2a", "v2b", "v2c"} {
		p := auditPut(now, k, "from the second format")
		offs = append(offs, len(seg))
		seg = binary.LittleEndian.AppendUint32(seg, uint32(len(p)))
		seg = binary.LittleEndian.AppendUint32(seg, crc32.Update(seed, castagnoli, p))
		seg = append(seg, p...)
	}
	for _, tc := range []struct {
		name    string
		edit    func([]byte) []byte
		want    map[string]string
		damaged bool
	}{
		{"whole", func(b []byte) []byte { return b },
			map[string]string{"v2a": "from the second format", "v2b": "from the second format", "v2c": "from the second format"}, false},
		{"last frame cut short", func(b []byte) []byte { return b[:len(b)-5] },
			map[string]string{"v2a": "from the second format", "v2b": "from the second format", "v2c": "<none>"}, false},
		{"a damaged frame with one after it", func(b []byte) []byte { b[offs[1]+frameHeaderV2+2] ^= 0xff; return b }, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := copyImage(t, path)
			if err := os.WriteFile(segmentPath(img, num), tc.edit(bytes.Clone(seg)), 0o600); err != nil {
				t.Fatal(err)
			}
			if tc.damaged {
				if err := openErr(img); !errors.Is(err, ErrDamaged) {
					t.Errorf("Open: %v, want ErrDamaged", err)
				}
				return
			}
			c := openWith(t, img, clock, Options{})
			for k, want := range tc.want {
				if got := bodyOf(t, c, "t", k); got != want {
					t.Errorf("%s = %q, want %q", k, got, want)
				}
			}
		})
	}
}

// TestCloseLeavesNoLog: a clean Close carries the log into the file and removes it, the empty
// current segment and the spare included, so that the data file alone holds everything (an older release,
// which cannot read this one's segments, can open it); the next Open starts a new segment.
func TestCloseLeavesNoLog(t *testing.T) {
	t.Parallel()
	clock := storagetest.NewClock(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
	path := filepath.Join(t.TempDir(), FileName)
	s, err := Open(path, Options{Now: clock.Now, CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	pairOf(t, s, "t", "k", "kept", time.Hour)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if nums, err := segments(path); err != nil || len(nums) != 0 {
		t.Fatalf("segments after a clean Close: %v, %v; want none", nums, err)
	}
	if _, err := os.Stat(spareName(path)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the spare segment after a clean Close: %v; want none", err)
	}
	c := openWith(t, path, clock, Options{})
	if got := bodyOf(t, c, "t", "k"); got != "kept" {
		t.Errorf("after a clean Close and Open: %q, want kept", got)
	}
	pairOf(t, c, "t", "k2", "kept too", time.Hour)
	if got := bodyOf(t, c, "t", "k2"); got != "kept too" {
		t.Errorf("a write after the reopen: %q", got)
	}
}
