package bolt

import (
	"encoding/binary"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// committer is a group commit onto the write-ahead log. A write joins the pending queue; when no
// group is running, a committer goroutine starts and runs everything pending as one group (at
// most max writes), then everything that queued up meanwhile, and so on until the queue is
// empty. A lone writer therefore never waits for others, and under load each fdatasync is
// shared by all the writes that arrived during the previous one, and, behind a large group, by
// the writers that group answered as they come back (gather, which waits on their arrival and
// is bounded by half a group's time and by 1 ms). (bbolt's DB.Batch, by contrast, holds every
// batch open for MaxBatchDelay unless MaxBatchSize writes arrive first, which a closed loop of
// N writers rarely fills exactly.)
//
// A group's calls run one after the other on a wtx: they read what the memtables and the bbolt
// file hold, and what the calls before them in the group wrote. Their writes are appended to the
// log as one frame and synced; only then are they published to the active memtable, where
// readers find them, and the callers answered. A call whose function fails (or panics) leaves
// nothing of itself in the group: its writes are undone, and its error is its own caller's.
type committer struct {
	s   *Store
	max int

	mu      sync.Mutex
	pending []*call
	running bool

	// lastForeground is when the committer last ran a group (Unix nanoseconds), for the sweep's
	// sizing (busy).
	lastForeground atomic.Int64

	// For gather, read and written by the committer goroutine only (one runs at a time, and the
	// next starts in do after the last one's running = false, both under mu): the size and time
	// of the group that ran last, the timer of a wait, and its bound.
	lastSize  int
	lastTook  time.Duration
	timer     *time.Timer
	maxGather time.Duration
	// want, when not zero, is the queue's length that gather waits for, under mu; the write
	// that reaches it sends on enough (buffered: one signal per wait).
	want   int
	enough chan struct{}

	// Cumulative counts of groups that wrote, for CommitStats.
	commits, calls atomic.Uint64
	commitNanos    atomic.Int64
	// Cumulative count and time of gather's waits.
	gathers     atomic.Uint64
	gatherNanos atomic.Int64
}

// newCommitter returns the committer of s's writes, max calls a group at most.
func newCommitter(s *Store, max int) *committer {
	return &committer{s: s, max: max, maxGather: maxGather, enough: make(chan struct{}, 1)}
}

// quietAfter is how long after the last writer the store counts as idle for background
// work: a closed loop of writers resubmits within microseconds of its answer, so a sweep that
// finds no group running right after one must not take that for idleness.
const quietAfter = 10 * time.Millisecond

type call struct {
	fn   func(*wtx) error
	done chan error
	err  error
}

// do runs fn in a group and returns fn's error, or the group's when its writes could not be
// made durable. fn runs once.
func (c *committer) do(fn func(*wtx) error) error {
	cl := callPool.Get().(*call)
	cl.fn, cl.err = fn, nil
	c.mu.Lock()
	c.enqueueLocked(cl)
	if !c.running {
		c.running = true
		go c.loop()
	}
	c.mu.Unlock()
	err := <-cl.done // the committer's last touch of cl is this send
	cl.fn = nil
	callPool.Put(cl)
	return err
}

// enqueueLocked adds cl to the queue, under mu, and ends gather's wait when the queue reaches
// the length it waits for.
func (c *committer) enqueueLocked(cl *call) {
	c.pending = append(c.pending, cl)
	if c.want > 0 && len(c.pending) >= c.want {
		c.want = 0
		c.enough <- struct{}{}
	}
}

// callPool keeps calls, with their channels, for the next do: two allocations a write less.
var callPool = sync.Pool{New: func() any { return &call{done: make(chan error, 1)} }}

// busy reports whether writers are about: a group ran within quietAfter.
func (c *committer) busy() bool {
	return time.Since(time.Unix(0, c.lastForeground.Load())) < quietAfter
}

func (c *committer) loop() {
	for {
		c.mu.Lock()
		if len(c.pending) == 0 {
			c.running = false
			c.lastSize = 0 // the load is gone: the next writer does not wait for it
			c.mu.Unlock()
			return
		}
		c.gather()
		n := min(len(c.pending), c.max)
		batch := c.pending[:n:n]
		c.pending = append([]*call(nil), c.pending[n:]...)
		c.mu.Unlock()
		start := time.Now()
		c.lastForeground.Store(start.UnixNano())
		c.commit(batch)
		c.lastSize, c.lastTook = n, time.Since(start)
	}
}

// gather lets the next group wait a moment for the writers on their way back, when many are
// about. It is called with mu held, and releases it while it waits.
//
// Why: on a busy server each fdatasync costs the CPU as well as the disk its time (about 50 µs
// of CPU a sync on this project's VM, beside the request work that the core also runs), so
// fewer, larger groups leave more of the core to the requests. Without a wait, a group is
// whoever queued during the last one's sync (about 25 writes at 64 connections), while the
// writers that the last group answered are still on their way back.
//
// So behind a group of at least gatherMinGroup calls, the next one waits until as many writes
// as the last group had have joined those that queued during it, or for half the last group's
// time (at most maxGather), whichever comes first. A load that never makes a group of 8 never
// waits (a lone writer, or a few), nor do writers that queued a full group; the first group
// after the queue emptied does not wait either. Behind a large group, a write that no others
// follow (the last of a burst, or clients that do not come back at once) waits the bound. The
// write that reaches the mark ends the wait (do signals it); the timer only bounds it, because
// Go's timers under a millisecond fire late when the process is otherwise idle.
func (c *committer) gather() {
	arrived := len(c.pending) // during the last group
	// lastSize is set with lastTook: a group of gatherMinGroup ran and took its time.
	if c.lastSize < gatherMinGroup || arrived >= c.max {
		return
	}
	c.want = min(arrived+c.lastSize, c.max)
	c.mu.Unlock()
	start := time.Now()
	if c.timer == nil {
		c.timer = time.NewTimer(min(c.lastTook/2, c.maxGather))
	} else {
		// Go 1.23's timers drop a tick that fired unread when stopped; under
		// GODEBUG=asynctimerchan=1 it stays, and would end every later wait at once.
		if !c.timer.Stop() {
			select {
			case <-c.timer.C:
			default:
			}
		}
		c.timer.Reset(min(c.lastTook/2, c.maxGather))
	}
	select {
	case <-c.enough:
		c.timer.Stop()
	case <-c.timer.C:
	}
	c.gathers.Add(1)
	c.gatherNanos.Add(int64(time.Since(start)))
	c.mu.Lock()
	c.want = 0
	select { // the signal of a write that reached the mark as the timer fired
	case <-c.enough:
	default:
	}
}

// gatherMinGroup is the smallest group behind which gather waits, and maxGather the longest
// wait.
const (
	gatherMinGroup = 8
	maxGather      = time.Millisecond
)

func (c *committer) commit(batch []*call) {
	s := c.s
	start := time.Now()
	s.walMu.Lock()
	w := s.newWtx(len(batch))
	for _, cl := range batch {
		w.run(cl)
	}
	if w.rtx != nil {
		_ = w.rtx.Rollback()
	}
	err := w.err
	if err == nil && len(w.ops) > 0 {
		if s.wal.size >= s.logLimit {
			err = errLogFull
		} else {
			err = s.wal.append(w.ops)
		}
	}
	if err == nil {
		s.publish(w)
	}
	s.walMu.Unlock()
	if err == nil && len(w.ops) > 0 {
		c.commits.Add(1)
		c.calls.Add(uint64(len(batch)))
		c.commitNanos.Add(int64(time.Since(start)))
	}
	for _, cl := range batch {
		if cl.err == nil {
			cl.err = err
		}
		cl.done <- cl.err
	}
}

// wtx is what a group's calls decide on and write to: the calls' writes so far (recs, fences),
// then the active memtable, the frozen one and the bbolt file as they were when the group
// started.
type wtx struct {
	s              *Store
	active, frozen *memtable
	rtx            *bbolt.Tx
	cur            *bbolt.Cursor // of rtx's records bucket, made by the first get that reads the file
	err            error         // the bbolt file could not be read at all

	recs   map[string]entry // the group's writes
	fences map[string]uint64
	ops    []byte // the frame's payload: the entries' encodings are parts of it
	enc    []byte // scratch for a record's encoding

	// undo holds, for the running call, what its writes replaced, to restore if it fails.
	undo []undoEntry
}

type undoEntry struct {
	fence   bool
	id      string
	rec     entry
	seq     uint64
	present bool
}

// newWtx returns a wtx for a group of calls (a hint: they write about as many records).
func (s *Store) newWtx(calls int) *wtx {
	w := &wtx{s: s, recs: make(map[string]entry, min(calls, DefaultMaxBatchSize)), fences: make(map[string]uint64)}
	// The frozen memtable is taken before the read transaction starts: a checkpoint drops it
	// only once the bbolt file holds it, so what this group does not find in it, the file has.
	s.memMu.RLock()
	w.active, w.frozen = s.active, s.frozen
	s.memMu.RUnlock()
	var err error
	if w.rtx, err = s.db.Begin(false); err != nil {
		w.err = translate(err)
	}
	return w
}

// run runs cl's function on w; when it fails or panics, its writes are undone.
func (w *wtx) run(cl *call) {
	if w.err != nil {
		cl.err = w.err
		return
	}
	w.undo = w.undo[:0]
	opsLen := len(w.ops)
	cl.err = w.safely(cl.fn)
	if cl.err == nil {
		return
	}
	w.ops = w.ops[:opsLen]
	for i := len(w.undo) - 1; i >= 0; i-- {
		u := w.undo[i]
		switch {
		case u.fence && u.present:
			w.fences[u.id] = u.seq
		case u.fence:
			delete(w.fences, u.id)
		case u.present:
			w.recs[u.id] = u.rec
		default:
			delete(w.recs, u.id)
		}
	}
}

// safely runs fn with a panic or a memory fault (a damaged page of the file) turned into an
// error wrapping ErrDamaged, recorded for Ping.
func (w *wtx) safely(fn func(*wtx) error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("%w: a write failed: %v", ErrDamaged, v)
			w.s.damage.set(err)
		}
	}()
	return fn(w)
}

// get returns the record of id, expired or not, or nil when there is none.
func (w *wtx) get(id []byte) (*keys.Record, error) {
	if e, ok := w.recs[string(id)]; ok {
		return e.rec, nil
	}
	if rec, ok := lookup(w.active, w.frozen, id); ok {
		return rec, nil
	}
	if w.cur == nil {
		w.cur = w.rtx.Bucket(bucketRecords).Cursor()
	}
	return recordAt(w.cur, id)
}

// put stores (a copy of) rec as the record of id.
func (w *wtx) put(id []byte, rec *keys.Record) {
	w.note(id)
	w.enc = keys.AppendRecord(w.enc[:0], rec)
	w.ops = appendOp(w.ops, opPut, id, w.enc)
	// The encoding as the frame holds it: a group's payload is never written over (each group
	// has its own, and an undone call's part is cut off with its entries); publish copies it out.
	enc := w.ops[len(w.ops)-len(w.enc) : len(w.ops) : len(w.ops)]

	// What the memtable keeps is a copy that shares nothing with the caller's (whose response
	// body may be a buffer it reuses), equal to what the file will give back (CloneRecord is the
	// codec's round trip, without the decoding: in CPU profiles of pairs, decoding the encoding
	// again was 2.6% of the server's time). It has no Memo: it does not go into the replay cache,
	// whose byte budget bounds what replays' encodings keep (see read).
	kept := keys.CloneRecord(rec)
	w.recs[string(id)] = entry{&kept, enc}
}

// del removes the record of id.
func (w *wtx) del(id []byte) {
	w.note(id)
	w.recs[string(id)] = entry{}
	w.ops = appendOp(w.ops, opDel, id, nil)
}

func (w *wtx) note(id []byte) {
	prev, ok := w.recs[string(id)]
	w.undo = append(w.undo, undoEntry{id: string(id), rec: prev, present: ok})
}

// nextFence returns the next fence of tenant: larger than every fence the tenant's keys had.
// A tenant's sequence starts where the records bucket's stands, the store-wide sequence that
// files written before the per-tenant ones used, so fences never go back.
func (w *wtx) nextFence(tenant string) uint64 {
	seq, ok := w.fences[tenant]
	w.undo = append(w.undo, undoEntry{fence: true, id: tenant, seq: seq, present: ok})
	if !ok {
		seq = w.storedFence(tenant)
	}
	seq++
	w.fences[tenant] = seq
	var v [8]byte
	binary.BigEndian.PutUint64(v[:], seq)
	w.ops = appendOp(w.ops, opFence, []byte(tenant), v[:])
	return seq
}

func (w *wtx) storedFence(tenant string) uint64 {
	if seq, ok := w.active.fences[tenant]; ok {
		return seq
	}
	if w.frozen != nil {
		if seq, ok := w.frozen.fences[tenant]; ok {
			return seq
		}
	}
	return boltFence(w.rtx, tenant)
}

// boltFence is tenant's fence sequence in the bbolt file.
func boltFence(tx *bbolt.Tx, tenant string) uint64 {
	if b := tx.Bucket(bucketFences).Bucket([]byte(tenant)); b != nil {
		return b.Sequence()
	}
	return tx.Bucket(bucketRecords).Sequence()
}
