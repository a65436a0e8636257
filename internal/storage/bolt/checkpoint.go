package bolt

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// DefaultCheckpointInterval is how often, by default, the writes in the log are carried into the
// bbolt file; see Options.CheckpointInterval.
//
// A checkpoint writes each page that its writes touched once, so the longer the interval, the
// fewer pages per write; but it writes them all at once, and the writers' log syncs wait behind
// that burst. Measured at 64 connections on this project's 2-core VM (scripts/ab.sh, pairs, two
// rounds each, alternately): at 1 s, checkpoints of 255 to 325 ms, p99 19 to 20 ms and p99.9 48
// to 70 ms; at 250 ms, p99 15 ms, p99.9 22 to 26 ms; at 100 ms, 27 to 29 ms each, 0.24 pages
// per write, p99 12.6 to 15.3 ms and p99.9 17 to 22 ms, as many pairs or more; 50 ms was no
// better. (The code before the log: p99 12 to 17 ms, p99.9 14 to 24 ms, 2.3 pages per write,
// and two thirds of the pairs.)
const DefaultCheckpointInterval = 100 * time.Millisecond

// DefaultCheckpointBytes is how large, by default, the log may grow before a checkpoint starts
// early; see Options.CheckpointBytes.
const DefaultCheckpointBytes = 64 << 20

// logLimitFactor times CheckpointBytes is as much as the log may hold beyond the bbolt file:
// a group of writes that finds the current segment this large is refused (errLogFull). Checkpoints
// cut a segment every interval, or once it holds CheckpointBytes, so only checkpoints that fail
// (or one that takes as long as writers need to write this much) let it grow so far. Without the
// bound, the log and the memtable that mirrors it grew until the disk, or the memory, ran out.
const logLimitFactor = 4

// minLogLimit is the least logLimit, whatever CheckpointBytes: the bound is for memory, and a log
// of a few KiB (tests set CheckpointBytes so small) is outrun by writers between two checkpoints
// that succeed.
const minLogLimit = 64 << 20

// errLogFull is a group's error when the log has reached logLimit.
var errLogFull = fmt.Errorf("%w: bolt: the write-ahead log is full: checkpoints have not carried it into the data file (see idemsvc_bolt_checkpoint_failures_total); writes resume once one does", keys.ErrUnavailable)

var (
	bucketMeta     = []byte("meta")
	metaWALThrough = []byte("wal_through") // the last segment of the log whose writes the file holds
)

// memtable holds the writes that are in the log and not yet in the bbolt file: records (nil for
// a delete) by storage id, and fence sequences by tenant. Writers publish to the active one;
// a checkpoint freezes it, starts a new one, and drops the frozen one once the file holds it.
// Its records are never modified once published.
type memtable struct {
	recs   map[string]entry
	fences map[string]uint64
	// minExpiry is no later than the expiry of every record published to it (zero when none
	// was), so that a sweep can tell whether it holds one that has expired.
	minExpiry time.Time
}

// entry is a memtable's write of one storage id: the record, nil for a delete, and its
// encoding, which a checkpoint stores as it is (encoding each record again was 1.5% of the
// server's CPU in profiles of pairs). The encodings of a group's entries share one buffer (see
// publish); neither the record nor its encoding is ever modified.
type entry struct {
	rec *keys.Record
	enc []byte
}

func newMemtable() *memtable { return newMemtableFor(0) }

// newMemtableFor returns a memtable with room for about records: a map that grows as writes
// arrive rehashes all it holds at each doubling.
func newMemtableFor(records int) *memtable {
	return &memtable{recs: make(map[string]entry, records), fences: make(map[string]uint64)}
}

func (m *memtable) empty() bool { return len(m.recs) == 0 && len(m.fences) == 0 }

// apply adds a frame's writes.
func (m *memtable) apply(ops []walOp) error {
	for _, op := range ops {
		switch op.kind {
		case opPut:
			rec, err := keys.DecodeRecord(op.value)
			if err != nil {
				return fmt.Errorf("record %x: %w", op.id, err)
			}
			m.recs[string(op.id)] = entry{&rec, op.value[:len(op.value):len(op.value)]}
		case opDel:
			m.recs[string(op.id)] = entry{}
		case opFence:
			m.fences[string(op.id)] = max(m.fences[string(op.id)], binary.BigEndian.Uint64(op.value))
		}
	}
	return nil
}

// publish makes a durable group's writes visible to readers.
//
// The entries' encodings are copied into one buffer of their own first: those that wtx.put cut
// from the group's payload point into every array that append went through as the payload grew,
// and would keep them all, about five times the frame (an audit's find), until a checkpoint.
func (s *Store) publish(w *wtx) {
	if len(w.recs) == 0 && len(w.fences) == 0 {
		return
	}
	size := 0
	for _, e := range w.recs {
		size += len(e.enc)
	}
	encs := make([]byte, 0, size)
	s.memMu.Lock()
	m := s.active
	for id, e := range w.recs {
		if e.enc != nil {
			start := len(encs)
			encs = append(encs, e.enc...)
			e.enc = encs[start:len(encs):len(encs)]
		}
		m.recs[id] = e
		if rec := e.rec; rec != nil && (m.minExpiry.IsZero() || rec.ExpiresAt.Before(m.minExpiry)) {
			m.minExpiry = rec.ExpiresAt
		}
	}
	for tenant, seq := range w.fences {
		s.active.fences[tenant] = seq
	}
	s.memMu.Unlock()
	if s.wal.size >= s.checkpointBytes {
		select {
		case s.ckKick <- struct{}{}:
		default:
		}
	}
}

// anyDueInMemory reports whether a memtable may hold a record that has expired at now.
func (s *Store) anyDueInMemory(now time.Time) bool {
	s.memMu.RLock()
	defer s.memMu.RUnlock()
	due := func(m *memtable) bool { return m != nil && !m.minExpiry.IsZero() && !now.Before(m.minExpiry) }
	return due(s.active) || due(s.frozen)
}

// lookup returns what the memtables hold of id (nil for a delete); ok is false when neither
// holds a write of it. frozen may be nil.
func lookup(active, frozen *memtable, id []byte) (rec *keys.Record, ok bool) {
	e, ok := active.recs[string(id)]
	if !ok && frozen != nil {
		e, ok = frozen.recs[string(id)]
	}
	return e.rec, ok
}

// read returns the record of id, expired or not, or nil, for a reader outside the group commit;
// fromFile says it was read from the bbolt file, a copy of its own that the replay cache may
// keep (a memtable's record is shared, and the cache sets a Memo on what it keeps).
func (s *Store) read(id []byte) (rec *keys.Record, fromFile bool, err error) {
	if rec, ok := s.readMemory(id); ok {
		return rec, false, nil
	}
	rec, err = s.readFile(id)
	return rec, true, err
}

// readMemory returns what the memtables hold of id (see lookup).
func (s *Store) readMemory(id []byte) (rec *keys.Record, ok bool) {
	s.memMu.RLock()
	rec, ok = lookup(s.active, s.frozen, id)
	s.memMu.RUnlock()
	return rec, ok
}

// readFile returns the record of id that the file holds, or nil. Call it after readMemory: a
// checkpoint drops the frozen memtable only once the file holds it.
func (s *Store) readFile(id []byte) (rec *keys.Record, err error) {
	err = s.view(func(tx *bbolt.Tx) error {
		rec, err = getRecord(tx, id)
		return err
	})
	return rec, err
}

// checkpointer carries the log into the bbolt file every checkpointEvery, and sooner when the
// log has grown past checkpointBytes, until Close.
func (s *Store) checkpointer() {
	defer close(s.ckDone)
	t := time.NewTicker(s.checkpointEvery)
	defer t.Stop()
	for {
		select {
		case <-s.ckStop:
			return
		case <-t.C:
		case <-s.ckKick:
		}
		select {
		case job := <-s.sweepJobs: // a sweep's chunk rides along, sharing the sync
			job.err = s.checkpointWith(job.fn)
			close(job.done)
		default:
			_ = s.checkpoint() // counted in checkpointFailures; the next one tries again
		}
	}
}

// sweepJob is a chunk of a sweep that the checkpointer runs in its next checkpoint's transaction.
type sweepJob struct {
	fn   func(tx *bbolt.Tx, writes int) error
	err  error
	done chan struct{}
}

// checkpoint carries what the log holds into the bbolt file: it freezes the active memtable and
// starts a new segment of the log (a moment's pause for writers), writes the frozen memtable
// into the file in one transaction, synced, that also records the last segment it covers, then
// drops the frozen memtable and removes the segments the file now holds. When the transaction
// fails (a full disk), the frozen memtable stays, read by everyone, and the next checkpoint tries
// it again before it freezes anything else.
func (s *Store) checkpoint() error { return s.checkpointWith(nil) }

// checkpointWith is checkpoint with sw, a chunk of a sweep, run in the same transaction after the
// frozen memtable is written, so that the two share bbolt's syncs: sw is given how many records
// the checkpoint wrote, and sweeps beside writers as many (see Store.Sweep). It runs even when
// there is nothing to checkpoint, and when the checkpoint cannot be made (a full disk), alone,
// since what it removes may be the room the checkpoint needs.
func (s *Store) checkpointWith(sw func(tx *bbolt.Tx, writes int) error) error {
	s.ckMu.Lock()
	defer s.ckMu.Unlock()
	start := time.Now()
	s.memMu.RLock()
	frozen, through := s.frozen, s.frozenThrough
	empty := s.active.empty() // only a group publishes, and a group that published wrote to the log
	s.memMu.RUnlock()
	var cutErr error
	if frozen == nil && !empty {
		frozen, through, cutErr = s.cut()
		if cutErr != nil {
			s.checkpointFailures.Add(1)
		}
	}
	if frozen == nil && sw == nil {
		return cutErr
	}
	err := updateSafely(s.db, &s.damage, func(tx *bbolt.Tx) error {
		writes := 0
		if frozen != nil {
			if err := applyMemtable(tx, frozen, through); err != nil {
				return err
			}
			writes = len(frozen.recs)
		}
		if sw != nil {
			return sw(tx, writes)
		}
		return nil
	})
	if err != nil {
		_ = removeSpare(s.path) // a full disk, likely: the room the spare holds is the file's
		if frozen != nil {
			s.checkpointFailures.Add(1) // the next checkpoint tries the frozen memtable again
			if sw != nil {              // the sweep alone, which may free the room
				serr := updateSafely(s.db, &s.damage, func(tx *bbolt.Tx) error { return sw(tx, 0) })
				if serr == nil {
					return nil
				}
				err = errors.Join(err, serr)
			}
		}
		return fmt.Errorf("checkpoint: %w", translate(err))
	}
	if frozen == nil {
		return nil // only the sweep ran (sw != nil here); a failed cut is counted
	}
	s.memMu.Lock()
	s.frozen = nil
	s.memMu.Unlock()
	s.checkpoints.Add(1)
	s.checkpointNanos.Add(int64(time.Since(start)))
	return removeSegmentsThrough(s.path, through)
}

// cut freezes the active memtable and moves the log to a new segment; it returns the frozen
// memtable and the number of the last segment it covers. The caller holds ckMu.
func (s *Store) cut() (*memtable, uint64, error) {
	// The next segment is made, and synced, before the writers pause.
	next, err := s.wal.prepare()
	if err != nil {
		return nil, 0, fmt.Errorf("checkpoint: %w", err)
	}
	// So is the next memtable, with room for about as many writes as the one it follows: made
	// under the pause, a map of 64k entries took 445 µs (an audit's measure).
	s.memMu.RLock()
	hint := min(len(s.active.recs), 1<<16)
	s.memMu.RUnlock()
	fresh := newMemtableFor(hint)
	s.walMu.Lock()
	defer s.walMu.Unlock()
	num, err := s.wal.rotate(next)
	if err != nil {
		return nil, 0, fmt.Errorf("checkpoint: %w", err)
	}
	s.memMu.Lock()
	frozen := s.active
	s.frozen, s.frozenThrough, s.active = frozen, num, fresh
	s.memMu.Unlock()
	return frozen, num, nil
}

// inActive reports whether the active memtable holds a write of id: what a sweep in a
// checkpoint's transaction must leave (the frozen one is in the file by then).
func (s *Store) inActive(id []byte) bool {
	s.memMu.RLock()
	defer s.memMu.RUnlock()
	_, ok := s.active.recs[string(id)]
	return ok
}

// removeSegmentsThrough retires base's segments up to through: the last of them may be kept as
// the spare (see retireSegment), the others are removed.
func removeSegmentsThrough(base string, through uint64) error {
	nums, err := segments(base)
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range slices.Backward(nums) {
		if n <= through {
			errs = append(errs, retireSegment(base, n))
		}
	}
	return errors.Join(errs...)
}

// applyMemtable writes m into the file, in key order, and notes through as the last segment of
// the log that the file holds.
func applyMemtable(tx *bbolt.Tx, m *memtable, through uint64) error {
	ids := make([]string, 0, len(m.recs))
	for id := range m.recs {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	recs := tx.Bucket(bucketRecords)
	// One cursor for every lookup (see recordAt): each Seek starts at the root, so the puts and
	// deletes between them do not matter.
	c := recs.Cursor()
	var (
		a   keyScratch
		bid []byte // bbolt's Put copies a key, and Seek and Delete keep none
	)
	for _, id := range ids {
		bid = append(bid[:0], id...)
		var (
			oldExpiry time.Time
			found     bool
		)
		if v := valueAt(c, bid); v != nil {
			t, err := keys.DecodeExpiry(v)
			if err != nil {
				return fmt.Errorf("record %x: %w", bid, err)
			}
			oldExpiry, found = t, true
		}
		if e := m.recs[id]; e.rec != nil {
			if err := putRecord(tx, bid, e.enc, oldExpiry, found, e.rec.ExpiresAt, &a); err != nil {
				return err
			}
		} else if found {
			if err := deleteRecord(tx, bid, oldExpiry); err != nil {
				return err
			}
		}
	}
	fences := tx.Bucket(bucketFences)
	for tenant, seq := range m.fences {
		b := fences.Bucket([]byte(tenant))
		if b == nil {
			var err error
			if b, err = fences.CreateBucket([]byte(tenant)); err != nil {
				return err
			}
		}
		if seq > b.Sequence() {
			if err := b.SetSequence(seq); err != nil {
				return err
			}
		}
	}
	var v [8]byte
	binary.BigEndian.PutUint64(v[:], through)
	return tx.Bucket(bucketMeta).Put(metaWALThrough, v[:])
}

// recoverWAL carries the segments of the log that the file does not hold yet into it, in order,
// each in a transaction of its own, removes every segment, and returns the number for the next
// one. A missing or damaged segment stops it with ErrDamaged (see readSegment).
func recoverWAL(db *bbolt.DB, base string) (next uint64, err error) {
	var through uint64
	err = db.View(func(tx *bbolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(metaWALThrough); len(v) == 8 {
			through = binary.BigEndian.Uint64(v)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	nums, err := segments(base)
	if err != nil {
		return 0, err
	}
	// Read every segment first: a segment cut short (a frame that does not check, or an end with
	// a later one after it: see readSegment) is the end of the log, cut by a crash, only when no
	// later segment has a frame (a checkpoint makes the next segment before the writers move to
	// it, so an empty one may follow the segment a crash cut). Anywhere else it is damage, or a
	// write the disk lost, and records that were acknowledged would be lost.
	type segment struct {
		num    uint64
		frames [][]byte
	}
	var segs []segment
	tornAt := -1
	for i, n := range nums {
		if n <= through {
			if err := removeSegment(base, n); err != nil {
				return 0, err
			}
			continue
		}
		if want := through + 1 + uint64(len(segs)); n != want {
			return 0, fmt.Errorf("%w: segment %d of the write-ahead log is missing (%s holds up to %d)", ErrDamaged, want, base, through)
		}
		frames, torn, err := readSegment(base, n, i == len(nums)-1)
		if err != nil {
			return 0, err
		}
		if len(frames) > 0 && tornAt >= 0 {
			return 0, fmt.Errorf("%w: segment %d of the write-ahead log ends in a damaged frame or a lost write, and later segments have writes (acknowledged writes may be lost)", ErrDamaged, segs[tornAt].num)
		}
		if torn {
			tornAt = len(segs)
		}
		segs = append(segs, segment{n, frames})
	}
	for _, sg := range segs {
		n, frames := sg.num, sg.frames
		m := newMemtable()
		for _, f := range frames {
			ops, err := decodeOps(f)
			if err == nil {
				err = m.apply(ops)
			}
			if err != nil {
				return 0, fmt.Errorf("%w: segment %d of the write-ahead log: %w", ErrDamaged, n, err)
			}
		}
		if err := updateSafely(db, nil, func(tx *bbolt.Tx) error { return applyMemtable(tx, m, n) }); err != nil {
			return 0, err
		}
		if err := removeSegment(base, n); err != nil {
			return 0, err
		}
		through = n
	}
	return through + 1, nil
}
