package bolt

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

func openT(t *testing.T, path string) *Store {
	t.Helper()
	s, err := Open(path, Options{CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// frameOffsets returns the offsets of the frames of a segment file, up to its end.
func frameOffsets(b []byte) []int {
	var offs []int
	for off := walHeaderSize; off+frameHeader <= len(b); {
		n := int(binary.LittleEndian.Uint32(b[off:]))
		if n == 0 { // the end
			break
		}
		offs = append(offs, off)
		off += frameHeader + n
	}
	return offs
}

// writeAtEnd writes tail into segment file seg over its end, at size (the wal's size when the
// file was copied), as an append that a crash cut would have.
func writeAtEnd(t *testing.T, seg string, size int64, tail []byte) {
	t.Helper()
	f, err := os.OpenFile(seg, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(tail, size); err != nil {
		t.Fatal(err)
	}
}

// TestAuditDamagedFrameMidSegment: a damaged frame followed by intact, acknowledged frames in
// the last segment is taken for a torn tail: Open succeeds and silently drops every later
// acknowledged write (and the fences they handed out).
func TestAuditDamagedFrameMidSegment(t *testing.T) {
	ctx := context.Background()
	s := openT(t, filepath.Join(t.TempDir(), FileName))
	defer s.Close()
	var fences []uint64
	for i := range 4 {
		res, err := s.Begin(ctx, "t", fmt.Sprintf("k%d", i), keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		fences = append(fences, res.Record.Lease.Fence)
	}
	path := crashCopy(t, s)
	seg := segmentPath(path, s.wal.num)
	b, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	offs := frameOffsets(b)
	if len(offs) != 4 {
		t.Fatalf("%d frames, want 4", len(offs))
	}
	b[offs[1]+frameHeader+3] ^= 0xff // one bit-rotted byte inside the second frame's payload
	if err := os.WriteFile(seg, b, 0o600); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(path, Options{CheckpointInterval: time.Hour})
	if err != nil {
		if errors.Is(err, ErrDamaged) {
			return // what the design says should happen
		}
		t.Fatal(err)
	}
	defer s2.Close()
	var lost []string
	for i := 1; i < 4; i++ {
		if _, err := s2.Get(ctx, "t", fmt.Sprintf("k%d", i)); err != nil {
			lost = append(lost, fmt.Sprintf("k%d: %v", i, err))
		}
	}
	res, err := s2.Begin(ctx, "t", "new", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Errorf("Open accepted a damaged frame followed by intact acknowledged frames: lost %v; new fence %d, but fence %d was already handed out",
		lost, res.Record.Lease.Fence, fences[3])
}

// TestAuditPingWithBrokenLog: once the log is broken (a failed write that could not be cut off,
// or a failed fdatasync: the same w.fail), every write fails until a restart, yet Ping (and so
// /readyz) says the store is fine, and the writes' error is not keys.ErrUnavailable (a 500, not
// a 503). The fault is injected by closing the segment's descriptor: WriteAt and Truncate fail.
func TestAuditPingWithBrokenLog(t *testing.T) {
	ctx := context.Background()
	s := openT(t, filepath.Join(t.TempDir(), FileName))
	defer s.Close()
	if _, err := s.Begin(ctx, "t", "a", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	_ = s.wal.f.Close()
	_, err := s.Begin(ctx, "t", "b", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
	if err == nil {
		t.Fatal("a write on a closed log succeeded")
	}
	if s.wal.err() == nil {
		t.Fatal("the log is not broken")
	}
	_, err = s.Begin(ctx, "t", "c", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
	if !errors.Is(err, errWALBroken) {
		t.Fatalf("later write: %v", err)
	}
	if !errors.Is(err, keys.ErrUnavailable) {
		t.Errorf("a write on a broken log: %v, not keys.ErrUnavailable (500 rather than 503)", err)
	}
	ckErr := s.checkpoint()
	if perr := s.Ping(ctx); perr == nil {
		t.Errorf("Ping = nil with the log broken (every write fails until a restart; checkpoint: %v)", ckErr)
	}
}

// TestAuditDiskFullLog: a full disk fails a log append with ErrUnavailable; the frame is cut off
// (the segment is as long as what was synced, and its end), writes resume once there is room, and a crash
// image keeps every acknowledged write and none of the refused ones.
func TestAuditDiskFullLog(t *testing.T) {
	dir := smallTmpfs(t, "300k")
	s, err := Open(filepath.Join(dir, FileName), Options{CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	body := make([]byte, 7000)
	var acked []string
	var refused string
	for n := 0; n < 1000; n++ {
		k := fmt.Sprintf("k%d", n)
		res, err := s.Begin(ctx, "t", k, keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
		if err == nil {
			acked = append(acked, k+"/begin")
			_, err = s.Complete(ctx, "t", k, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200, Body: body}})
			if err == nil {
				acked[len(acked)-1] = k
			}
		}
		if err != nil {
			if !errors.Is(err, keys.ErrUnavailable) {
				t.Fatalf("%s: %v", k, err)
			}
			refused = k
			break
		}
	}
	if refused == "" {
		t.Fatal("never full")
	}
	fi, err := os.Stat(segmentPath(s.path, s.wal.num))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != s.wal.size+frameHeader {
		t.Errorf("segment holds %d bytes after ENOSPC, synced %d and its end", fi.Size(), s.wal.size)
	}
	if s.wal.err() != nil {
		t.Errorf("log broken by ENOSPC: %v", s.wal.err())
	}
	remount(t, dir, "4m")
	if _, err := s.Begin(ctx, "t", "after", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
		t.Fatalf("after room: %v", err)
	}
	path := crashCopy(t, s)
	s2 := openT(t, path)
	defer s2.Close()
	for _, k := range append(acked, "after") {
		k, _, _ = strings.Cut(k, "/")
		if _, err := s2.Get(ctx, "t", k); err != nil {
			t.Errorf("acked %s lost: %v", k, err)
		}
	}
	t.Logf("%d acked, refused %s", len(acked), refused)
}

func beginN(t *testing.T, s *Store, prefix string, n int) {
	t.Helper()
	for i := range n {
		if _, err := s.Begin(context.Background(), "t", fmt.Sprintf("%s%d", prefix, i), keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
			t.Fatal(err)
		}
	}
}

func expectN(t *testing.T, s *Store, prefix string, n int) {
	t.Helper()
	for i := range n {
		if _, err := s.Get(context.Background(), "t", fmt.Sprintf("%s%d", prefix, i)); err != nil {
			t.Errorf("%s%d: %v", prefix, i, err)
		}
	}
}

// TestAuditCrashPoints: crash images between prepare and rotate, between a checkpoint's commit
// and the removal of its segments, and with a torn last frame followed by the prepared segment.
func TestAuditCrashPoints(t *testing.T) {
	s := openT(t, filepath.Join(t.TempDir(), FileName))
	defer s.Close()
	beginN(t, s, "a", 5)
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	beginN(t, s, "b", 5)
	// (1) prepare done, rotate not yet.
	s.ckMu.Lock()
	next, err := s.wal.prepare()
	if err != nil {
		t.Fatal(err)
	}
	img1 := crashCopy(t, s)
	// (3) and a torn frame at the end of the current segment.
	img3 := crashCopy(t, s)
	writeAtEnd(t, segmentPath(img3, s.wal.num), s.wal.size, []byte{0x40, 0, 0, 0, 1, 2, 3, 4, 5, 6})
	_ = next.f.Close()
	_ = os.Remove(segmentPath(s.path, s.wal.num+1))
	s.ckMu.Unlock()
	// (2) checkpoint committed, segments not removed: keep a copy of the segments first.
	segs, _ := segments(s.path)
	saved := map[uint64][]byte{}
	for _, n := range segs {
		saved[n], _ = os.ReadFile(segmentPath(s.path, n))
	}
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	img2 := crashCopy(t, s)
	for n, b := range saved {
		os.WriteFile(segmentPath(img2, n), b, 0o600)
	}
	for i, img := range []string{img1, img2, img3} {
		s2, err := Open(img, Options{CheckpointInterval: time.Hour})
		if err != nil {
			t.Errorf("image %d: %v", i+1, err)
			continue
		}
		expectN(t, s2, "a", 5)
		expectN(t, s2, "b", 5)
		res, err := s2.Begin(context.Background(), "t", "z", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
		if err != nil || res.Record.Lease.Fence != 11 {
			t.Errorf("image %d: fence %d, %v; want 11", i+1, res.Record.Lease.Fence, err)
		}
		s2.Close()
	}
}

// TestAuditCrashInCreateSegment: a crash while createSegment writes the header may leave the
// new (last) segment with a partial header or a header-sized run of zeros (file systems that
// log the size before the data): no frame can be in it, yet Open refuses to start.
func TestAuditCrashInCreateSegment(t *testing.T) {
	// The first format's header cut short; zeros; this format's cut in the number, and in the salt.
	for _, tail := range []func(num uint64) []byte{
		func(uint64) []byte { return []byte("IDEMWAL1\x00\x00") },
		func(uint64) []byte { return make([]byte, walHeaderSize) },
		func(num uint64) []byte { return segmentPrefix(walMagic, num)[:len(walMagic)+3] },
		func(num uint64) []byte { return append(segmentPrefix(walMagic, num), 1, 2, 3) },
	} {
		s := openT(t, filepath.Join(t.TempDir(), FileName))
		beginN(t, s, "a", 3)
		img := crashCopy(t, s)
		num := s.wal.num
		s.Close()
		if err := os.WriteFile(segmentPath(img, num+1), tail(num+1), 0o600); err != nil {
			t.Fatal(err)
		}
		s2, err := Open(img, Options{CheckpointInterval: time.Hour})
		if err != nil {
			t.Errorf("last segment %q: Open: %v", tail(num+1), err)
			continue
		}
		expectN(t, s2, "a", 3)
		s2.Close()
	}
}

// TestAuditCommitNilRtx: when the group's read transaction cannot begin (bbolt's Begin returns
// ErrDatabaseNotOpen, or ErrInvalidMapping after a failed remap), commit calls Rollback on a nil
// *bbolt.Tx and the committer goroutine panics: the process dies instead of failing the group.
// Reached here by closing the bbolt DB under the store (an internal test only).
func TestAuditCommitNilRtx(t *testing.T) {
	if os.Getenv("AUDIT_CHILD") == "1" {
		s := openT(t, filepath.Join(t.TempDir(), FileName))
		_ = s.db.Close()
		err := s.comm.do(func(*wtx) error { return nil })
		fmt.Println("group failed cleanly:", err)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestAuditCommitNilRtx$")
	cmd.Env = append(os.Environ(), "AUDIT_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("the child died: %v\n%s", err, lastLines(string(out), 12))
	}
}

func lastLines(s string, n int) string {
	l := strings.Split(s, "\n")
	return strings.Join(l[:min(len(l), n)], "\n")
}

// TestAuditSweepOnFullDisk: on a full disk the checkpoint fails; a sweep then refuses to run
// (it checkpoints first when a memtable holds an expired record), so the expired records whose
// pages would let the checkpoint fit are never removed, and the store stays stuck.
func TestAuditSweepOnFullDisk(t *testing.T) {
	dir := smallTmpfs(t, "600k")
	clock := storagetest.NewClock(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	s, err := Open(filepath.Join(dir, FileName), Options{Now: clock.Now, CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	body := make([]byte, 3000)
	var ckErr error
	n := 0
	for ; n < 2000 && ckErr == nil; n++ {
		k := fmt.Sprintf("k%d", n)
		res, err := s.Begin(ctx, "t", k, keys.BeginRequest{Lease: time.Second, TTL: time.Minute})
		if err == nil {
			_, err = s.Complete(ctx, "t", k, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200, Body: body}})
		}
		if err != nil {
			break
		}
		if n%10 == 9 {
			ckErr = s.checkpoint()
		}
	}
	t.Logf("%d records; checkpoint: %v; frozen stuck: %v", n, ckErr, s.frozen != nil)
	clock.Advance(time.Hour) // everything has expired
	swept, err := s.Sweep(ctx, 100000)
	t.Logf("sweep: %d, %v", swept, err)
	if err != nil {
		t.Errorf("the sweep refused to run on a full disk (%v): nothing expired can be removed", err)
	}
	if err := s.checkpoint(); err != nil {
		t.Errorf("checkpoint after the sweep: %v", err)
	}
	if _, err := s.Begin(ctx, "t", "after", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
		t.Errorf("a write after the sweep: %v", err)
	}
}

// TestAuditCloseWhenCheckpointFails: Close on a full disk reports the failed checkpoint; the log
// keeps the writes, and the next Open (with room) carries them into the file.
func TestAuditCloseWhenCheckpointFails(t *testing.T) {
	dir := smallTmpfs(t, "600k")
	path := filepath.Join(dir, FileName)
	s, err := Open(path, Options{CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	body := make([]byte, 3000)
	var acked []string
	for n := 0; n < 2000; n++ {
		k := fmt.Sprintf("k%d", n)
		res, err := s.Begin(ctx, "t", k, keys.BeginRequest{Lease: time.Second, TTL: time.Hour})
		if err == nil {
			_, err = s.Complete(ctx, "t", k, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200, Body: body}})
		}
		if err != nil {
			break
		}
		acked = append(acked, k)
		if n%10 == 9 && s.checkpoint() != nil {
			break
		}
	}
	cerr := s.Close()
	t.Logf("%d acked; Close: %v", len(acked), cerr)
	remount(t, dir, "8m")
	s2, err := Open(path, Options{CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for _, k := range acked {
		if got := bodyOf(t, s2, "t", k); len(got) != len(body) {
			t.Errorf("%s: %q", k, got[:min(len(got), 20)])
		}
	}
	res, err := s2.Begin(ctx, "t", "new", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
	if err != nil || res.Record.Lease.Fence <= uint64(len(acked)) {
		t.Errorf("fence after reopen: %d, %v (%d handed out)", res.Record.Lease.Fence, err, len(acked))
	}
}

// auditPut is a frame payload that puts a completed record of key with body, at now.
func auditPut(now time.Time, key, body string) []byte {
	rec := keys.Record{Key: key, State: keys.StateCompleted, Fingerprint: "f",
		Lease:     keys.Lease{Token: "tok", Fence: 1, ExpiresAt: now.Add(time.Minute)},
		Response:  &keys.Response{Status: 200, Body: []byte(body)},
		CreatedAt: now, CompletedAt: now, ExpiresAt: now.Add(time.Hour), TTL: time.Hour}
	return appendOp(nil, opPut, keys.StorageID("t", key), keys.AppendRecord(nil, &rec))
}

// TestAuditPageTornLastFrame: the last frame of the log (never synced, never acknowledged) is
// cut by a crash on a file system that persists the new size before (some of) the data, at page
// granularity. The page that holds the frame's header was, or was not, written; the next page(s)
// the other way. Open must start and keep the acknowledged frame before it. (A second audit's
// find: Open refused all three, as the code before the log's salt did.)
func TestAuditPageTornLastFrame(t *testing.T) {
	const page = 4096
	clock := storagetest.NewClock(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
	now := clock.Now()
	for _, tc := range []struct {
		name  string
		start int // where the torn frame starts in the file
		img   func(b []byte, start int) []byte
	}{
		// The header's page was not written (zeros past the old end), a later page was.
		{"header page lost, header at a page start", 2 * page, func(b []byte, start int) []byte {
			clear(b[start : start+page])
			return b
		}},
		// The frame's header straddles a page boundary: the first page was written, the next was not.
		{"header straddles, second page lost", 2*page - 2, func(b []byte, start int) []byte {
			clear(b[2*page:])
			return b
		}},
		// The same, the other way.
		{"header straddles, first page lost", 2*page - 2, func(b []byte, start int) []byte {
			clear(b[start : 2*page])
			return b
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := filepath.Join(t.TempDir(), FileName)
			w := walWith(t, base, 1, auditPut(now, "acked", "kept"))
			// Pad (an acknowledged delete of an id of a chosen length) so the torn frame starts at tc.start.
			for w.size < int64(tc.start) {
				need := tc.start - int(w.size) - frameHeader - 1 - 2 // kind, 2-byte varint
				if need < 200 {
					need += page
				}
				if err := w.append(appendOp(nil, opDel, make([]byte, need), nil)); err != nil {
					t.Fatal(err)
				}
			}
			if w.size != int64(tc.start) {
				t.Fatalf("torn frame at %d, want %d", w.size, tc.start)
			}
			if err := w.append(auditPut(now, "torn", strings.Repeat("x", 100_000))); err != nil {
				t.Fatal(err)
			}
			_ = w.close()
			seg := segmentPath(base, 1)
			b, err := os.ReadFile(seg)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(seg, tc.img(b, tc.start), 0o600); err != nil {
				t.Fatal(err)
			}
			s, err := Open(base, Options{Now: clock.Now, CheckpointInterval: time.Hour})
			if err != nil {
				t.Fatalf("Open after a crash that tore the last (unacknowledged) frame: %v (ErrDamaged: %v)", err, errors.Is(err, ErrDamaged))
			}
			defer s.Close()
			if got := bodyOf(t, s, "t", "acked"); got != "kept" {
				t.Errorf("acked: %q", got)
			}
		})
	}
}
