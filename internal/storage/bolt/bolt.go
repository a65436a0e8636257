// Package bolt is the embedded backend of idemsvc: a keys.Store in one bbolt file.
//
// Two buckets: "records" maps keys.StorageID(tenant, key) to keys.AppendRecord of the record,
// and "expiry" indexes the same records by (expires_at, storage id), so that a sweep reads only
// what has expired, oldest first, and never scans what is stored. Every checkpoint keeps both in
// sync in one transaction. Fences come from a sequence per tenant (a bucket per tenant under
// "fences"), which grows across all of the tenant's keys and survives release, delete and
// reopen; a per-tenant sequence, so that the gaps between a tenant's fences count only its own
// leases, never another tenant's.
//
// Writes go through a group commit onto a write-ahead log, synced before they are answered, and
// reach the bbolt file in checkpoints; see committer, wal.go and checkpoint.go.
// Watchers are notified in-process, which is enough because only one process can open the
// file at a time.
package bolt

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// FileName is the name of the data file that OpenDir opens inside its directory.
const FileName = "idemsvc.db"

// DefaultTimeout is how long Open waits for the data file's lock by default.
const DefaultTimeout = time.Second

// DefaultMaxBatchSize bounds how many writes one group carries (and so one fdatasync of the log
// covers), so that a group never holds the log long.
//
// Writes go through a group commit with no fixed delay (see committer; under load a group may
// wait up to 1 ms for more writers, gather). When each group was a
// bbolt transaction, measured with
// BenchmarkBeginComplete (begin then complete on fresh keys, fsync on, 2-core VM, about 0.6 ms
// per fdatasync), bbolt's DB.Batch at its defaults (1000 / 10 ms) gave about 40 ops/s with one
// writer and 2,100 with 64; tuned to 64 / 1 ms, about 180 and 7,500; the committer's figures
// are in docs/BENCHMARKS.md. The timer is what costs: a lone writer waits it out on every
// write, and a closed loop of N writers rarely fills a batch of exactly N.
const DefaultMaxBatchSize = 256

// DefaultSweepChunk and DefaultSweepChunkBusy size a sweep's transactions: see Store.Sweep.
const (
	DefaultSweepChunk     = 1000
	DefaultSweepChunkBusy = 128
)

// ErrLocked is returned by Open when another process holds the data file.
var ErrLocked = errors.New("the data file is locked by another process")

// errClosed is returned by every operation on a closed Store.
var errClosed = fmt.Errorf("%w: the bolt store is closed", keys.ErrUnavailable)

var (
	bucketRecords = []byte("records")
	bucketFences  = []byte("fences")
	bucketExpiry  = []byte("expiry")
)

// Options configure Open. The zero value is ready to use.
//
// There is deliberately no way to turn fsync off: an acknowledged complete must survive a
// crash.
type Options struct {
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Timeout is how long Open waits for another process to let go of the data file before it
	// fails with ErrLocked; zero means DefaultTimeout.
	Timeout time.Duration
	// MaxBatchSize is how many writes join one transaction at most; zero means
	// DefaultMaxBatchSize.
	MaxBatchSize int
	// CheckpointInterval is how often the writes in the write-ahead log are carried into the
	// bbolt file, and CheckpointBytes how large the log may grow before that happens sooner;
	// zero means DefaultCheckpointInterval and DefaultCheckpointBytes. Until then they are held
	// in memory too (a tenth of a second of writes, by default). While checkpoints fail (the
	// data file cannot be written), the log and that memory grow until the log holds
	// logLimitFactor times CheckpointBytes (at least minLogLimit) that the file lacks; writes
	// then fail with keys.ErrUnavailable (503) until a checkpoint succeeds, and reads go on.
	CheckpointInterval time.Duration
	CheckpointBytes    int64
	// SweepChunk and SweepChunkBusy are how many expired records one transaction of a sweep
	// removes at most, alone and alongside writers; zero means DefaultSweepChunk and
	// DefaultSweepChunkBusy.
	SweepChunk, SweepChunkBusy int
	// CacheBytes bounds the cache of completed records that replays read (see replayCache);
	// zero means DefaultCacheBytes, and a negative value turns the cache off.
	CacheBytes int
}

// Store is the bbolt keys.Store. It is safe for concurrent use.
type Store struct {
	db   *bbolt.DB
	path string
	now  func() time.Time
	// comm is the group commit onto the write-ahead log, wal.
	comm *committer
	wal  *wal
	// walMu is held by a group from its first read to its publication, and by a checkpoint
	// while it starts a new segment and freezes the active memtable.
	walMu sync.Mutex
	// memMu guards active, frozen and frozenThrough (see memtable).
	memMu         sync.RWMutex
	active        *memtable
	frozen        *memtable
	frozenThrough uint64
	// ckMu is held by a checkpoint; the checkpointer goroutine runs until ckStop is closed.
	ckMu                   sync.Mutex
	ckStop, ckDone, ckKick chan struct{}
	sweepJobs              chan *sweepJob // a sweep chunk for the next checkpoint (Store.Sweep)
	checkpointEvery        time.Duration
	checkpointBytes        int64
	logLimit               int64 // see Options.CheckpointBytes and errLogFull
	checkpoints            atomic.Uint64
	checkpointNanos        atomic.Int64
	checkpointFailures     atomic.Uint64

	sweepChunk, sweepChunkBusy int
	// cache holds completed records for replays; nil when turned off.
	cache *replayCache
	// damage is set once a write transaction found the file damaged; Ping reports it.
	damage damage

	// mu is held shared by every operation and exclusively by Close, so that Close lets the
	// pending operations finish and no operation starts on a closed database.
	mu     sync.RWMutex
	closed bool

	watch watchers
	// fresh scores whether begins mostly find no record: see learnFresh.
	fresh atomic.Int32
	// afterMemoryRead, when set (by tests), runs in begin between its reads of the memtables
	// and of the file.
	afterMemoryRead func()
}

var _ keys.Store = (*Store)(nil)

// Open opens, creating it if needed, the data file at path. It returns an error wrapping
// ErrLocked when another process holds the file for longer than opts.Timeout, and another
// error when the file cannot be opened or is not a bbolt file.
func Open(path string, opts Options) (*Store, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.MaxBatchSize <= 0 {
		opts.MaxBatchSize = DefaultMaxBatchSize
	}
	if opts.SweepChunk <= 0 {
		opts.SweepChunk = DefaultSweepChunk
	}
	if opts.SweepChunkBusy <= 0 {
		opts.SweepChunkBusy = DefaultSweepChunkBusy
	}
	if opts.CacheBytes == 0 {
		opts.CacheBytes = DefaultCacheBytes
	}
	if err := create(path, opts.Timeout); err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	db, err := openDB(path, &bbolt.Options{Timeout: opts.Timeout})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("open %s: %w (gave up after %s)", path, ErrLocked, opts.Timeout)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	err = updateSafely(db, nil, func(tx *bbolt.Tx) error {
		for _, name := range [][]byte{bucketRecords, bucketExpiry, bucketFences, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return nil
	})
	var next uint64
	if err == nil {
		next, err = recoverWAL(db, path)
	}
	var log *wal
	if err == nil {
		log, err = openWAL(path, next)
	}
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	ckBytes := cmp.Or(opts.CheckpointBytes, DefaultCheckpointBytes)
	st := &Store{
		db: db, path: path, now: opts.Now,
		sweepChunk: opts.SweepChunk, sweepChunkBusy: opts.SweepChunkBusy,
		cache:  newReplayCache(opts.CacheBytes),
		wal:    log,
		active: newMemtable(),
		ckStop: make(chan struct{}), ckDone: make(chan struct{}), ckKick: make(chan struct{}, 1),
		sweepJobs:       make(chan *sweepJob, 1),
		checkpointEvery: cmp.Or(opts.CheckpointInterval, DefaultCheckpointInterval),
		checkpointBytes: ckBytes,
		logLimit:        max(logLimitFactor*ckBytes, minLogLimit),
	}
	st.comm = newCommitter(st, opts.MaxBatchSize)
	go st.checkpointer()
	return st, nil
}

// create makes the data file at path when there is none, atomically: bbolt writes the new file's
// first pages, and the store its buckets, in a file of their own, which takes the name path only
// once complete and synced (a hard link, which never replaces a file another process made
// meanwhile; a rename where the file system has no hard links). A process killed, or a disk
// filled, during bbolt's first write used to leave an empty file at path, which Open refuses as
// damaged (an empty data file may be one that lost its records): the service then never started
// again until someone removed it. Files of earlier attempts that did not finish are removed
// first, even when path exists (one killed between the link and the removal is a second name of
// the data file).
func create(path string, timeout time.Duration) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	removeLeftovers(dir, base+".new-")
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		return nil // there is a file (or an error that opening it will report)
	}
	var nonce [4]byte
	_, _ = rand.Read(nonce[:])
	tmp := fmt.Sprintf("%s.new-%d-%x", path, os.Getpid(), nonce) // pid 1 in every container
	err := func() error {
		db, err := bbolt.Open(tmp, 0o600, &bbolt.Options{Timeout: timeout})
		if err != nil {
			return err
		}
		err = db.Update(func(tx *bbolt.Tx) error {
			for _, name := range [][]byte{bucketRecords, bucketExpiry, bucketFences, bucketMeta} {
				if _, err := tx.CreateBucketIfNotExists(name); err != nil {
					return err
				}
			}
			return nil
		})
		return errors.Join(err, db.Close())
	}()
	if err == nil {
		err = os.Link(tmp, path)
		switch {
		case errors.Is(err, fs.ErrExist):
			err = nil // another process made it first: open that one
		case err != nil:
			// No hard links here (vfat, some network and FUSE file systems): rename, which
			// replaces a file made meanwhile, so only when there still is none.
			if _, lerr := os.Lstat(path); errors.Is(lerr, fs.ErrNotExist) {
				err = os.Rename(tmp, path)
			}
		}
	}
	_ = os.Remove(tmp)
	if err != nil {
		return fmt.Errorf("creating the data file: %w", err)
	}
	return syncDir(dir) // the new name, durably
}

// removeLeftovers removes the files in dir whose names start with prefix.
func removeLeftovers(dir, prefix string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			_ = os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

// syncDir fsyncs the directory dir, so that a name made in it survives a crash. A file system
// that cannot sync a directory (EINVAL) is not an error: there is nothing more to do there.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOTSUP) {
		err = nil
	}
	return errors.Join(err, d.Close())
}

// OpenDir creates dir if needed and opens FileName in it; see Open.
func OpenDir(dir string, opts Options) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	return Open(filepath.Join(dir, FileName), opts)
}

// CommitStats are cumulative counts since Open, for metrics: together they tell how many writes
// share a commit, what a commit costs, and how much of that is the disk.
type CommitStats struct {
	// Commits is how many groups the group commit wrote to the log, and Calls how many calls
	// (writes, and reads that had to be ordered after writes) they carried.
	Commits, Calls uint64
	// CommitTime is the wall time of those groups, from their start to their sync's end.
	CommitTime time.Duration
	// WALBytes is what those groups appended to the log, and WALTime how long writing and
	// syncing it took.
	WALBytes uint64
	WALTime  time.Duration
	// Checkpoints is how many checkpoints carried the log into the bbolt file, and
	// CheckpointTime their wall time.
	Checkpoints    uint64
	CheckpointTime time.Duration
	// CheckpointFailures is how many checkpoints failed (a full disk, say); the writes stay in
	// the log and in memory, and the next checkpoint tries again.
	CheckpointFailures uint64
	// Pages is how many pages bbolt wrote (dirty pages, freelist and meta), and WriteTime how
	// long it spent writing them and in fdatasync, over every read-write transaction: the
	// checkpoints' and the sweeps'.
	Pages     int64
	WriteTime time.Duration
	// Gathers is how many times a group waited for more writes before it ran (under load; see
	// committer.gather), and GatherTime how long those waits took in all.
	Gathers    uint64
	GatherTime time.Duration
}

// CommitStats returns the store's commit counts so far.
func (s *Store) CommitStats() CommitStats {
	tx := s.db.Stats().TxStats
	return CommitStats{
		Commits: s.comm.commits.Load(), Calls: s.comm.calls.Load(),
		CommitTime: time.Duration(s.comm.commitNanos.Load()),
		WALBytes:   s.wal.bytes.Load(), WALTime: time.Duration(s.wal.nanos.Load()),
		Checkpoints: s.checkpoints.Load(), CheckpointTime: time.Duration(s.checkpointNanos.Load()),
		CheckpointFailures: s.checkpointFailures.Load(),
		Pages:              tx.GetWrite(), WriteTime: tx.GetWriteTime(),
		Gathers: s.comm.gathers.Load(), GatherTime: time.Duration(s.comm.gatherNanos.Load()),
	}
}

// Path returns the data file's path.
func (s *Store) Path() string { return s.path }

// DB returns the underlying bbolt database, for tests and tools that check its settings or
// consistency. Writing through it bypasses the store's rules, notifications and replay cache.
func (s *Store) DB() *bbolt.DB { return s.db }

// enter starts an operation; it returns errClosed after Close. A nil error must be followed
// by s.mu.RUnlock.
func (s *Store) enter(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		return errClosed
	}
	return nil
}

// Begin reserves (tenant, key) or reports its state; see keys.Store.
//
// It first decides on the cached record, when the key's completed record is in the replay
// cache, and else in a read transaction: a replay, an in-progress or a mismatch needs no write
// and no fsync. Only when the rule wants a write does it join a batch, where it decides again
// on what is stored then.
func (s *Store) Begin(ctx context.Context, tenant, key string, req keys.BeginRequest) (keys.BeginResult, error) {
	res, err := s.begin(ctx, tenant, key, req)
	if err != nil {
		return res, fmt.Errorf("begin %q: %w", key, err)
	}
	return res, nil
}

func (s *Store) begin(ctx context.Context, tenant, key string, req keys.BeginRequest) (keys.BeginResult, error) {
	if err := s.enter(ctx); err != nil {
		return keys.BeginResult{}, err
	}
	defer s.mu.RUnlock()
	id := keys.StorageID(tenant, key)
	if cached := s.cache.get(id); cached != nil {
		// Variables of its own: those below live on the heap, since transactions capture them.
		if res, w, rerr := keys.DecideBegin(cached, s.now(), key, req); w == keys.WriteNone {
			return res, rerr
		}
	}

	// What the group's function decides, in one variable: each variable it sets would be an
	// allocation of its own.
	var op struct {
		res           keys.BeginResult
		w             keys.Write
		rerr          error // the rule's outcome, never returned from a transaction function
		marked, found bool
	}
	// A key that the memtables do not hold is read from the file, and decided on, before the
	// group, so that a replay or a conflict does not wait for a commit; but not while most
	// begins find no record (fresh keys, the usual case): the group reads it then, and a
	// read before it would be a second one (a bbolt read transaction and a search of the tree:
	// in CPU profiles of pairs, old and new one after the other, a fresh begin's own CPU fell
	// from 13.4 to 3.4 µs, and a pair request's, the group's share included, by about 4.6 µs).
	//
	// The cache's generation is noted before the memtables are read, as every reader does (see
	// replayCache): a Delete that ran between the two reads would otherwise let a record read
	// from the file before the Delete's checkpoint into the cache after it (an audit's find).
	gen := s.cache.generation()
	cur, inMemory := s.readMemory(id)
	if s.afterMemoryRead != nil {
		s.afterMemoryRead()
	}
	skipped := !inMemory && s.fresh.Load() >= 0
	if !skipped {
		var err error
		if !inMemory {
			if cur, err = s.readFile(id); err != nil {
				return keys.BeginResult{}, translate(err)
			}
			s.learnFresh(cur == nil)
		}
		res, w, rerr := keys.DecideBegin(cur, s.now(), key, req)
		if res.Outcome == keys.Replayed && !inMemory {
			s.cache.add(id, cur, gen)
		}
		if w == keys.WriteNone {
			return res, rerr
		}
	}

	// Decided again in the group, on what is there then.
	err := s.comm.do(func(tx *wtx) error {
		op.res, op.w, op.rerr = keys.BeginResult{}, keys.WriteNone, nil
		cur, err := tx.get(id)
		if err != nil {
			return err
		}
		op.found = cur != nil
		op.res, op.w, op.rerr = keys.DecideBegin(cur, s.now(), key, req)
		if op.w != keys.WritePut {
			return nil
		}
		s.markReplaced(id, cur, &op.marked) // a completed one that expired, taken over
		op.res.Record.Lease.Fence = tx.nextFence(tenant)
		tx.put(id, &op.res.Record)
		return nil
	})
	if op.marked {
		s.cache.unmark(id)
	}
	if err != nil {
		return keys.BeginResult{}, translate(err)
	}
	if skipped {
		s.learnFresh(!op.found)
	}
	if op.w != keys.WriteNone {
		s.watch.notify(id)
	}
	return op.res, op.rerr
}

// How begin learns whether most keys are fresh: fresh rises by freshUp, to freshCap at most,
// for each begin that found no record (in the file, or, when the group read, wherever the group
// looked), and falls by freshDown, to -freshCap at least, for each that found one. A key the
// memtables hold before the group does not count. Below zero, begin reads the file before the group. So it
// reads in the group only while fewer than 1 begin in 9 finds a record there: a replay or a
// conflict that goes to the group waits for a commit (a few ms), where a read saves a few µs.
const (
	freshUp   = 1
	freshDown = 8
	freshCap  = 64
)

func (s *Store) learnFresh(absent bool) {
	keys.LearnFresh(&s.fresh, absent, freshUp, freshDown, freshCap)
}

// Complete stores the response of the current lease holder; see keys.Store. The returned
// record has no token, like Get's and like the same complete again.
func (s *Store) Complete(ctx context.Context, tenant, key string, req keys.CompleteRequest) (keys.Record, error) {
	rec, err := s.update(ctx, tenant, key, func(cur *keys.Record, now time.Time) (keys.Record, keys.Write, error) {
		return keys.DecideComplete(cur, now, req)
	})
	if err != nil {
		return keys.Record{}, fmt.Errorf("complete %q: %w", key, err)
	}
	return rec.Public(), nil
}

// Renew extends the current lease; see keys.Store. The returned record shows the token.
func (s *Store) Renew(ctx context.Context, tenant, key string, req keys.RenewRequest) (keys.Record, error) {
	rec, err := s.update(ctx, tenant, key, func(cur *keys.Record, now time.Time) (keys.Record, keys.Write, error) {
		return keys.DecideRenew(cur, now, req)
	})
	if err != nil {
		return keys.Record{}, fmt.Errorf("renew %q: %w", key, err)
	}
	return rec, nil
}

// Release removes an in-progress record held by token; see keys.Store.
func (s *Store) Release(ctx context.Context, tenant, key, token string) error {
	_, err := s.update(ctx, tenant, key, func(cur *keys.Record, now time.Time) (keys.Record, keys.Write, error) {
		w, err := keys.DecideRelease(cur, now, token)
		return keys.Record{}, w, err
	})
	if err != nil {
		return fmt.Errorf("release %q: %w", key, err)
	}
	return nil
}

// Delete removes the record, live or expired, whether or not it exists; see keys.Store.
func (s *Store) Delete(ctx context.Context, tenant, key string) error {
	_, err := s.update(ctx, tenant, key, func(cur *keys.Record, now time.Time) (keys.Record, keys.Write, error) {
		if cur == nil {
			return keys.Record{}, keys.WriteNone, nil
		}
		return keys.Record{}, keys.WriteDelete, nil
	})
	if err != nil {
		return fmt.Errorf("delete %q: %w", key, err)
	}
	return nil
}

// markReplaced marks id in the replay cache, once per operation (a transaction function may
// run more than once), when the write about to commit replaces or removes cur, a completed
// record that the cache may hold; the caller unmarks it after the commit.
func (s *Store) markReplaced(id []byte, cur *keys.Record, marked *bool) {
	if cur != nil && cur.State == keys.StateCompleted && !*marked {
		s.cache.mark(id)
		*marked = true
	}
}

// rule decides a write from the stored record (nil when none, expired ones included) and now.
type rule func(cur *keys.Record, now time.Time) (keys.Record, keys.Write, error)

// update runs decide and its write in one batched transaction, and notifies the key's
// watchers once the write has committed. decide's error is the operation's outcome; it is
// carried out of the transaction function, never returned from it, so that a business
// outcome does not make the group commit re-run the function alone.
func (s *Store) update(ctx context.Context, tenant, key string, decide rule) (keys.Record, error) {
	if err := s.enter(ctx); err != nil {
		return keys.Record{}, err
	}
	defer s.mu.RUnlock()
	id := keys.StorageID(tenant, key)

	var op struct { // one variable, one allocation: see begin
		rec    keys.Record
		w      keys.Write
		rerr   error
		marked bool
	}
	err := s.comm.do(func(tx *wtx) error {
		op.rec, op.w, op.rerr = keys.Record{}, keys.WriteNone, nil
		cur, err := tx.get(id)
		if err != nil {
			return err
		}
		op.rec, op.w, op.rerr = decide(cur, s.now())
		if op.w != keys.WriteNone {
			s.markReplaced(id, cur, &op.marked)
		}
		switch op.w {
		case keys.WritePut:
			tx.put(id, &op.rec)
		case keys.WriteDelete:
			tx.del(id)
		}
		return nil
	})
	if op.marked {
		s.cache.unmark(id)
	}
	if err != nil {
		return keys.Record{}, translate(err)
	}
	if op.w != keys.WriteNone {
		s.watch.notify(id)
	}
	return op.rec, op.rerr
}

// Get returns the live record without its token, or ErrNotFound; see keys.Store.
func (s *Store) Get(ctx context.Context, tenant, key string) (keys.Record, error) {
	rec, err := s.get(ctx, tenant, key)
	if err != nil {
		return keys.Record{}, fmt.Errorf("get %q: %w", key, err)
	}
	return rec, nil
}

func (s *Store) get(ctx context.Context, tenant, key string) (keys.Record, error) {
	if err := s.enter(ctx); err != nil {
		return keys.Record{}, err
	}
	defer s.mu.RUnlock()
	id := keys.StorageID(tenant, key)
	if cached := s.cache.get(id); cached != nil {
		if now := s.now(); cached.Live(now) {
			return keys.DecideGet(cached, now)
		}
	}
	var (
		rec     keys.Record
		rerr    error
		expired bool
	)
	gen := s.cache.generation()
	cur, fromFile, err := s.read(id)
	if err != nil {
		return keys.Record{}, translate(err)
	}
	now := s.now()
	rec, rerr = keys.DecideGet(cur, now)
	// Only an in-progress record can come back: a complete or renew decided before it
	// expired. An expired completed record stays gone whatever is queued (a takeover makes
	// a new record, which a get ordered before it rightly does not see).
	expired = cur != nil && !cur.Live(now) && cur.State == keys.StateInProgress
	if rerr == nil && fromFile {
		s.cache.add(id, cur, gen)
	}
	if !expired {
		return rec, rerr
	}
	// The record stored has expired. A writer may have decided on it before it expired (a
	// holder's complete, say) and be waiting for its commit: answering "gone" now, and that
	// write being acknowledged after, would be no order of the two. Decided in the group
	// commit instead, after every write queued so far, a get sees what they did.
	err = s.comm.do(func(tx *wtx) error {
		cur, err := tx.get(id)
		if err != nil {
			return err
		}
		rec, rerr = keys.DecideGet(cur, s.now())
		return nil
	})
	if err != nil {
		return keys.Record{}, translate(err)
	}
	return rec, rerr
}

// Watch returns a channel closed after the next committed write to (tenant, key); see
// keys.Store. After Close it returns a closed channel.
func (s *Store) Watch(tenant, key string) (<-chan struct{}, func()) {
	return s.watch.add(string(keys.StorageID(tenant, key)))
}

// Sweep removes at most limit expired records, oldest first, reading only the expired part of
// the expiry index; see keys.Store.
//
// It takes them in chunks, each in a checkpoint's transaction (see checkpointWith). A chunk is
// SweepChunk records when no writer has run for a while; beside writers it waits for the next
// periodic checkpoint, shares its syncs, and takes twice as many records as that checkpoint
// wrote (at least SweepChunkBusy), and never more than limit or SweepChunk. So a sweep of a
// large backlog adds little to any writer's latency. It does not keep pace with every load:
// beside writers one chunk a checkpoint is at most SweepChunk (and keys.SweepAll's
// keys.SweepBatch) records, 10,000 a second at the default interval, where a removal costs a
// page of its own (TestScale: 10,023 a second beside writers that made 28,997 records a second;
// without the bound, 43,154 a second, but the writers' p99 7.6 times as long). Records that
// expire faster than that for long wait until the writes ease.
func (s *Store) Sweep(ctx context.Context, limit int) (int, error) {
	if err := s.enter(ctx); err != nil {
		return 0, fmt.Errorf("sweep: %w", err)
	}
	defer s.mu.RUnlock()
	// A record that expired while in the log is swept once a checkpoint has carried it into
	// the file: now, when one may be there (the frozen memtable, then the active one).
	// A checkpoint that fails (a full disk) does not stop the sweep: what it removes from the
	// file may be the room the checkpoint needs, and inActive keeps what the log holds.
	for range 2 {
		if !s.anyDueInMemory(s.now()) || s.checkpoint() != nil {
			break
		}
	}
	// Most sweeps find nothing due: a read of the index's first entry says so, where a write
	// transaction would commit, and sync, a new meta page for nothing.
	if due, err := s.anyDue(); err != nil || !due {
		return 0, err
	}
	removed := 0
	for removed < limit {
		if err := ctx.Err(); err != nil {
			return removed, fmt.Errorf("sweep: %w", err)
		}
		var (
			n, seen, budget int
			gone, marked    [][]byte
		)
		fn := func(tx *bbolt.Tx, writes int) error {
			budget = s.sweepBudget(limit-removed, writes)
			var err error
			gone, seen, err = sweep(tx, s.now(), budget, s.inActive)
			n = len(gone)
			// Mark inside the transaction, as every writer does: a later call of the same
			// batch (a begin of a swept key) must not leave the old entry for a reader to
			// find after the commit, before the sweep gets to drop it.
			for _, id := range gone {
				s.cache.mark(id)
			}
			marked = append(marked, gone...) // every run's, however many runs there are
			return err
		}
		// Each chunk runs in a checkpoint's transaction, after the frozen memtable is written
		// (so only the active one can hold a newer write). Beside writers it waits for the next
		// periodic checkpoint and shares its syncs: in transactions of its own, back to back,
		// a sweep doubled the writers' p99 (TestScale). One chunk waits at a time.
		var err error
		job := &sweepJob{fn: fn, done: make(chan struct{})}
		queued := false
		if s.comm.busy() && s.checkpointEvery <= maxSweepWait {
			select {
			case s.sweepJobs <- job:
				queued = true
			default:
			}
		}
		if queued {
			<-job.done // the checkpointer runs until Close, which waits for this sweep
			err = job.err
		} else {
			err = s.checkpointWith(fn)
		}
		for _, id := range marked {
			s.cache.unmark(id)
		}
		if err != nil {
			return removed, fmt.Errorf("sweep: %w", translate(err))
		}
		removed += n
		if seen < budget { // the expired part of the index is empty now
			break
		}
	}
	return removed, nil
}

// sweepBudget is how many records the sweep's current transaction may remove, at most want and
// SweepChunk. It runs inside a checkpoint's transaction, which wrote writes records. When writers
// are about, it is at most twice that, and at least SweepChunkBusy: a light write load gets
// light sweeps, and a sweep adds to a checkpoint no more records than about twice the writers
// brought (each removal writes a page, where the writers' records share pages).
func (s *Store) sweepBudget(want, writes int) int {
	budget := min(want, s.sweepChunk)
	if s.comm.busy() {
		budget = min(budget, max(s.sweepChunkBusy, 2*writes))
	}
	return budget
}

// maxSweepWait is the longest checkpoint interval that a sweep's chunk waits for, beside writers;
// with a longer one it runs in a checkpoint of its own.
const maxSweepWait = time.Second

// anyDue reports whether the expiry index holds an entry that has expired.
func (s *Store) anyDue() (due bool, err error) {
	err = s.view(func(tx *bbolt.Tx) error {
		k, _ := tx.Bucket(bucketExpiry).Cursor().First()
		due = k != nil && (len(k) < 8 || binary.BigEndian.Uint64(k) <= expiryNanos(s.now()))
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("sweep: %w", translate(err))
	}
	return due, nil
}

// sweep removes up to max records that have expired at now, and returns the storage ids of
// those it removed (copies) and how many index entries it took. An index entry whose record is
// gone or live again (which a consistent index never has) is dropped without counting. So is
// one whose record was written again since, in the log (inLog says so): what the file holds of
// it is stale, and the checkpoint that carries the new write replaces it and its index entry.
func sweep(tx *bbolt.Tx, now time.Time, max int, inLog func(id []byte) bool) (removed [][]byte, seen int, err error) {
	limit := expiryNanos(now) // expired means expires_at <= now
	// Take the due entries off the front of the index: First after each Delete, because a
	// cursor's Next after a Delete can skip a key. First walks down the left edge only, with no
	// search.
	var due [][]byte
	c := tx.Bucket(bucketExpiry).Cursor()
	for k, _ := c.First(); k != nil && len(due) < max; k, _ = c.First() {
		if len(k) >= 8 && binary.BigEndian.Uint64(k) > limit {
			break
		}
		due = append(due, bytes.Clone(k)) // k lives only until the Delete
		if err := c.Delete(); err != nil {
			return nil, 0, err
		}
	}
	// Visit the records in key order, so that neighbours share the pages just read.
	slices.SortFunc(due, func(a, b []byte) int { return bytes.Compare(a[min(8, len(a)):], b[min(8, len(b)):]) })
	idx := tx.Bucket(bucketExpiry)
	recs := tx.Bucket(bucketRecords).Cursor()
	for _, k := range due {
		if len(k) <= 8 {
			continue
		}
		id := k[8:]
		if inLog(id) {
			continue
		}
		found, v := recs.Seek(id)
		if !bytes.Equal(found, id) {
			continue
		}
		expires, err := keys.DecodeExpiry(v)
		if err != nil {
			return nil, 0, fmt.Errorf("record %x: %w", id, err)
		}
		if now.Before(expires) { // live: its own index entry is elsewhere
			continue
		}
		if err := recs.Delete(); err != nil {
			return nil, 0, err
		}
		// The record's own index entry is the one just taken in a consistent index; drop any
		// other.
		if ek := expiryKey(expires, id); !bytes.Equal(ek, k) {
			if err := idx.Delete(ek); err != nil {
				return nil, 0, err
			}
		}
		removed = append(removed, id) // a copy: due's keys were cloned
	}
	return removed, len(due), nil
}

// Ping returns nil when the data file can be read, else an error; see keys.Store.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.enter(ctx); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	defer s.mu.RUnlock()
	if err := s.damage.get(); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	if err := s.wal.err(); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	err := s.view(func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketRecords) == nil || tx.Bucket(bucketExpiry) == nil || tx.Bucket(bucketFences) == nil {
			return errors.New("bolt: a bucket is missing")
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("ping: %w", translate(err))
	}
	return nil
}

// Close waits for pending operations, wakes every watcher and closes the data file. Later
// operations return an error wrapping keys.ErrUnavailable; a second Close returns nil.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.watch.closeAll()
	close(s.ckStop)
	<-s.ckDone
	// Carry the log into the file (a frozen memtable first, if a checkpoint left one), so that
	// the file alone holds every record.
	var errs []error
	for range 2 {
		if err := s.checkpoint(); err != nil {
			errs = append(errs, err)
			break
		}
	}
	if err := s.wal.close(); err != nil {
		errs = append(errs, err)
	}
	if len(errs) == 0 && s.frozen == nil && s.active.empty() {
		// The file holds every write, and the current segment none: it goes too, and the
		// spare, so that a clean stop leaves the data file alone, which an older release can
		// open (the releases with the log before this one refuse segments of its format).
		errs = append(errs, removeSegment(s.path, s.wal.num), removeSpare(s.path), syncDir(filepath.Dir(s.path)))
	}
	if err := s.db.Close(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close %s: %w", s.path, err)
	}
	return nil
}

// translate turns a bbolt error into a keys error where one fits; anything else is internal.
func translate(err error) error {
	switch {
	case errors.Is(err, berrors.ErrDatabaseNotOpen):
		return errClosed
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		// The disk is full: an outage of this replica, which clears when space is freed (the
		// transaction was rolled back), not a fault of the request. 503, and retry.
		return fmt.Errorf("%w: %w", keys.ErrUnavailable, err)
	}
	return err
}

// getRecord returns the stored record, expired or not, or nil when there is none.
func getRecord(tx *bbolt.Tx, id []byte) (*keys.Record, error) {
	return decodeStored(id, tx.Bucket(bucketRecords).Get(id))
}

// recordAt is getRecord through c, a cursor of the records bucket that the caller keeps for
// its transaction: bbolt's Get makes a cursor for each call, whose search stack is allocated
// anew each time, a level at a time (in allocation profiles of pairs, 5 allocations a request
// were bbolt's search stacks).
func recordAt(c *bbolt.Cursor, id []byte) (*keys.Record, error) {
	return decodeStored(id, valueAt(c, id))
}

// valueAt is Bucket.Get through c, a cursor of the bucket: the value of key, or nil.
func valueAt(c *bbolt.Cursor, key []byte) []byte {
	if k, v := c.Seek(key); bytes.Equal(k, key) {
		return v
	}
	return nil
}

// decodeStored decodes v, the stored value of id; nil when there is none.
func decodeStored(id, v []byte) (*keys.Record, error) {
	if v == nil {
		return nil, nil
	}
	rec, err := keys.DecodeRecord(v) // copies: v lives only as long as tx
	if err != nil {
		return nil, fmt.Errorf("record %x: %w", id, err)
	}
	return &rec, nil
}

// putRecord stores enc, the encoding of a record that expires at expiry, in place of the record
// that expires at oldExpiry (found: there is one), and moves its expiry index entry. enc must
// stay as it is until the transaction commits: bbolt keeps a value, not a copy.
func putRecord(tx *bbolt.Tx, id, enc []byte, oldExpiry time.Time, found bool, expiry time.Time, a *keyScratch) error {
	if err := tx.Bucket(bucketRecords).Put(id, enc); err != nil {
		return err
	}
	idx := tx.Bucket(bucketExpiry)
	// Expiry keys start with the time, so they mostly arrive in order: fill pages fuller than
	// the default half, which suits random inserts.
	idx.FillPercent = 0.9
	if found && !oldExpiry.Equal(expiry) {
		a.key = appendExpiryKey(a.key[:0], oldExpiry, id)
		if err := idx.Delete(a.key); err != nil {
			return err
		}
	}
	a.key = appendExpiryKey(a.key[:0], expiry, id) // Put copies its key
	return idx.Put(a.key, []byte{})
}

// keyScratch is scratch space for a transaction's index keys, which bbolt copies or does not keep.
type keyScratch struct{ key []byte }

// deleteRecord removes the stored record that expires at expiry, and its expiry index entry.
func deleteRecord(tx *bbolt.Tx, id []byte, expiry time.Time) error {
	if err := tx.Bucket(bucketRecords).Delete(id); err != nil {
		return err
	}
	return tx.Bucket(bucketExpiry).Delete(expiryKey(expiry, id))
}

// expiryKey is the index key of a record: expires_at as 8 big-endian bytes of Unix
// nanoseconds, so that byte order is time order, then the storage id.
func expiryKey(t time.Time, id []byte) []byte {
	return appendExpiryKey(make([]byte, 0, 8+len(id)), t, id)
}

// appendExpiryKey appends expiryKey(t, id) to b.
func appendExpiryKey(b []byte, t time.Time, id []byte) []byte {
	return append(binary.BigEndian.AppendUint64(b, expiryNanos(t)), id...)
}

// expiryNanos is t in Unix nanoseconds; times before 1970 (already expired) count as 0.
func expiryNanos(t time.Time) uint64 {
	if t.Unix() < 0 {
		return 0
	}
	return uint64(t.UnixNano())
}

// watchers hands out, per storage id, a channel that the next change closes. A channel is
// closed only by the one notify that removes it from the map, so never twice.
type watchers struct {
	mu     sync.Mutex
	closed bool
	m      map[string]*watch
}

type watch struct {
	ch   chan struct{}
	refs int
}

var closedChan = func() chan struct{} {
	ch := make(chan struct{})
	close(ch)
	return ch
}()

func (ws *watchers) add(id string) (<-chan struct{}, func()) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if ws.closed {
		return closedChan, func() {}
	}
	if ws.m == nil {
		ws.m = make(map[string]*watch)
	}
	w := ws.m[id]
	if w == nil {
		w = &watch{ch: make(chan struct{})}
		ws.m[id] = w
	}
	w.refs++
	var once sync.Once
	return w.ch, func() {
		once.Do(func() {
			ws.mu.Lock()
			defer ws.mu.Unlock()
			w.refs--
			if w.refs == 0 && ws.m[id] == w {
				delete(ws.m, id)
			}
		})
	}
}

func (ws *watchers) notify(id []byte) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if w := ws.m[string(id)]; w != nil {
		delete(ws.m, string(id))
		close(w.ch)
	}
}

func (ws *watchers) closeAll() {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	ws.closed = true
	for _, w := range ws.m {
		close(w.ch)
	}
	ws.m = nil
}
