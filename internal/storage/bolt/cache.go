package bolt

import (
	"hash/maphash"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// DefaultCacheBytes bounds the replay cache by default; see Options.CacheBytes.
const DefaultCacheBytes = 16 << 20

// replayCache keeps completed records that were read, so that a replay (a begin or get of a
// completed key, the common retry) is decided without a bbolt read transaction or a decoding.
//
// A completed record changes only when it is written again (a takeover once it has expired, or
// a delete) or swept; so the cache holds only completed records, and the store keeps it coherent
// with these rules:
//   - A writer that is about to change a completed record marks its id inside the transaction,
//     before the commit: the entry goes, and no reader may add one for that id until the writer
//     unmarks it after the commit. So once the new value can be read anywhere, the old one can
//     no longer be served from here.
//   - A reader notes the generation before its read transaction and adds what it read only if
//     no mark or unmark happened since (every mark and unmark moves the generation): a value
//     read before a commit can never be added after it.
//   - A sweep is such a writer: it marks the ids it removes inside its transaction. An expired
//     entry alone would be harmless (the rules check the expiry on every use), but a later
//     call of the same transaction may write that id anew (a begin that finds it gone), and
//     the old entry must not outlive that commit.
//
// Entries are shared and never modified: the rules return copies (Record.Public), and a
// Response is never written to once stored.
//
// The cache is filled by reads, not by completes: most completed records are never retried,
// and a retry's second read finds the first one's entry. Each shard evicts in insertion order
// to stay within its share of the byte budget.
type replayCache struct {
	seed   maphash.Seed
	gen    atomic.Uint64
	shards [cacheShards]cacheShard
}

const cacheShards = 16

type cacheShard struct {
	mu      sync.Mutex
	m       map[string]*keys.Record
	pending map[string]int // marks of writers in flight, per id
	fifo    []string       // ids in insertion order, from head; may name ids gone since
	head    int
	bytes   int
	max     int
}

// newReplayCache returns a cache of about maxBytes in all, or nil (no cache) when maxBytes < 0.
func newReplayCache(maxBytes int) *replayCache {
	if maxBytes < 0 {
		return nil
	}
	c := &replayCache{seed: maphash.MakeSeed()}
	for i := range c.shards {
		c.shards[i].m = make(map[string]*keys.Record)
		c.shards[i].pending = make(map[string]int)
		c.shards[i].max = maxBytes / cacheShards
	}
	return c
}

func (c *replayCache) shard(id []byte) *cacheShard {
	return &c.shards[maphash.Bytes(c.seed, id)%cacheShards]
}

// get returns the cached completed record of id, or nil.
func (c *replayCache) get(id []byte) *keys.Record {
	if c == nil {
		return nil
	}
	sh := c.shard(id)
	sh.mu.Lock()
	rec := sh.m[string(id)]
	sh.mu.Unlock()
	return rec
}

// generation is what a reader notes before its read transaction, for add.
func (c *replayCache) generation() uint64 {
	if c == nil {
		return 0
	}
	return c.gen.Load()
}

// add caches rec, read for id in a transaction that began after generation returned gen,
// unless it is not a completed record or a writer has marked or unmarked anything since.
func (c *replayCache) add(id []byte, rec *keys.Record, gen uint64) {
	if c == nil || rec == nil || rec.State != keys.StateCompleted {
		return
	}
	size := recordSize(id, rec)
	sh := c.shard(id)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if size > sh.max || c.gen.Load() != gen || sh.pending[string(id)] > 0 {
		return
	}
	if _, ok := sh.m[string(id)]; ok {
		return
	}
	for sh.bytes+size > sh.max && sh.head < len(sh.fifo) {
		old := sh.fifo[sh.head]
		sh.fifo[sh.head] = ""
		sh.head++
		if r, ok := sh.m[old]; ok {
			sh.bytes -= recordSize([]byte(old), r)
			delete(sh.m, old)
		}
	}
	if sh.head > len(sh.fifo)/2 { // compact the queue now and then
		sh.fifo = append(sh.fifo[:0], sh.fifo[sh.head:]...)
		sh.head = 0
	}
	k := string(id)
	if rec.Memo == nil {
		rec.Memo = new(keys.Memo) // for the server's encoding of it: see keys.Record.Memo
	}
	sh.m[k] = rec
	sh.fifo = append(sh.fifo, k)
	sh.bytes += size
	if len(sh.fifo)-sh.head > 2*len(sh.m)+64 {
		sh.rebuildQueue()
	}
}

// rebuildQueue drops from the queue the ids whose entries are gone (a mark or a sweep dropped
// them) and the older copies of ids added again since, so that the queue stays within a few
// times the entries however many are dropped without being evicted.
func (sh *cacheShard) rebuildQueue() {
	seen := make(map[string]struct{}, len(sh.m))
	keep := make([]string, 0, len(sh.m))
	for i := len(sh.fifo) - 1; i >= sh.head; i-- { // newest first: keep each id's latest place
		k := sh.fifo[i]
		if _, ok := sh.m[k]; !ok {
			continue
		}
		if _, dup := seen[k]; dup {
			continue
		}
		seen[k] = struct{}{}
		keep = append(keep, k)
	}
	slices.Reverse(keep)
	sh.fifo, sh.head = keep, 0
}

// mark drops id's entry and keeps readers from adding one until unmark; a writer calls it
// inside its transaction, before the commit, when it changes a completed record.
func (c *replayCache) mark(id []byte) {
	if c == nil {
		return
	}
	sh := c.shard(id)
	sh.mu.Lock()
	sh.dropLocked(string(id))
	sh.pending[string(id)]++
	c.gen.Add(1)
	sh.mu.Unlock()
}

// unmark ends a mark, after the writer's commit (or its failure).
func (c *replayCache) unmark(id []byte) {
	if c == nil {
		return
	}
	sh := c.shard(id)
	sh.mu.Lock()
	if sh.pending[string(id)]--; sh.pending[string(id)] <= 0 {
		delete(sh.pending, string(id))
	}
	c.gen.Add(1)
	sh.mu.Unlock()
}

func (sh *cacheShard) dropLocked(id string) {
	if r, ok := sh.m[id]; ok {
		sh.bytes -= recordSize([]byte(id), r)
		delete(sh.m, id)
	}
}

// recordSize is about what an entry holds on the heap: the record and, in its Memo, the
// server's encoding of it (JSON with the body in base64).
func recordSize(id []byte, r *keys.Record) int {
	n := 2*len(id) + 2*(len(r.Key)+len(r.Fingerprint)) + len(r.Lease.Token) + 512
	if r.Response != nil {
		n += len(r.Response.Body) + (len(r.Response.Body)+2)/3*4
		for k, vs := range r.Response.Headers {
			n += 2*len(k) + 24
			for _, v := range vs {
				n += 2*len(v) + 24
			}
		}
	}
	return n
}
