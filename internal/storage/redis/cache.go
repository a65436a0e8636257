package redis

import (
	"hash/maphash"
	"sync"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// valueCache remembers, per record key, the exact value this Store last wrote there for a lease
// (by begin or renew), so that the holder's complete, renew or release, when it comes to the same
// replica, can decide on it and write in one round trip: casScript compares the cached value
// with the stored one byte for byte and writes only when they are equal. An entry that is stale
// (another replica changed the record, it expired, the entry is simply old) therefore costs a
// round trip and never a wrong write; the decision is made on the decoding of the very bytes that
// are compared.
//
// Entries go when the lease ends here (complete, release, delete), when a fast path misses, and
// when the cache is full: each shard holds at most cacheShardSize entries and drops an arbitrary
// one (Go's map iteration starts at random) to make room. So memory stays bounded (about
// cacheShards×cacheShardSize values of in-progress records, a few hundred bytes each) however
// many leases are abandoned.
type valueCache struct {
	seed   maphash.Seed
	shards [cacheShards]cacheShard
}

const (
	cacheShards    = 64
	cacheShardSize = 1024 // 64k entries in all
)

type cacheShard struct {
	mu sync.Mutex
	m  map[string]string
}

func newValueCache() *valueCache {
	c := &valueCache{seed: maphash.MakeSeed()}
	for i := range c.shards {
		c.shards[i].m = make(map[string]string)
	}
	return c
}

func (c *valueCache) shard(key string) *cacheShard {
	return &c.shards[maphash.String(c.seed, key)%cacheShards]
}

func (c *valueCache) get(key string) (string, bool) {
	sh := c.shard(key)
	sh.mu.Lock()
	v, ok := sh.m[key]
	sh.mu.Unlock()
	return v, ok
}

func (c *valueCache) put(key, value string) {
	sh := c.shard(key)
	sh.mu.Lock()
	if _, ok := sh.m[key]; !ok && len(sh.m) >= cacheShardSize {
		for k := range sh.m {
			delete(sh.m, k)
			break
		}
	}
	sh.m[key] = value
	sh.mu.Unlock()
}

func (c *valueCache) drop(key string) {
	sh := c.shard(key)
	sh.mu.Lock()
	delete(sh.m, key)
	sh.mu.Unlock()
}

func (c *valueCache) len() int {
	n := 0
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		n += len(sh.m)
		sh.mu.Unlock()
	}
	return n
}

// decodedCache keeps, per record key, the decoding of a completed record's value as last read,
// so that a replay (the same value read again and again) is not decoded again. An entry serves
// only a value equal byte for byte to the one it decoded, so it is never stale: whatever another
// replica did, the decision is made on the decoding of the very bytes this read returned.
//
// Entries are shared and never modified (the rules return copies). Each shard holds at most
// decodedShardBytes of keys and values, so the cache holds at most cacheShards×decodedShardBytes
// of them whatever the bodies' sizes, plus their decodings (about as large again) and a few
// hundred bytes of bookkeeping per entry, and the server's encodings of those replayed (in
// keys.Record.Memo, about a third larger than a value); to make room it drops arbitrary entries.
type decodedCache struct {
	seed   maphash.Seed
	shards [cacheShards]decodedShard
}

const decodedShardBytes = 64 << 10 // 4 MiB of values in all

type decodedShard struct {
	mu    sync.Mutex
	m     map[string]decodedValue
	bytes int
}

type decodedValue struct {
	raw string
	rec *keys.Record
}

func newDecodedCache() *decodedCache {
	c := &decodedCache{seed: maphash.MakeSeed()}
	for i := range c.shards {
		c.shards[i].m = make(map[string]decodedValue)
	}
	return c
}

// get returns the decoding of raw, the value just read at key, if it is the one cached.
func (c *decodedCache) get(key, raw string) *keys.Record {
	sh := &c.shards[maphash.String(c.seed, key)%cacheShards]
	sh.mu.Lock()
	e, ok := sh.m[key]
	sh.mu.Unlock()
	if ok && e.raw == raw {
		return e.rec
	}
	return nil
}

// put caches rec, the decoding of raw read at key, if it is a completed record.
func (c *decodedCache) put(key, raw string, rec *keys.Record) {
	size := len(key) + len(raw)
	if rec.State != keys.StateCompleted || size > decodedShardBytes {
		return
	}
	sh := &c.shards[maphash.String(c.seed, key)%cacheShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if old, ok := sh.m[key]; ok {
		sh.bytes -= len(key) + len(old.raw)
		delete(sh.m, key)
	}
	for k, e := range sh.m {
		if sh.bytes+size <= decodedShardBytes {
			break
		}
		sh.bytes -= len(k) + len(e.raw)
		delete(sh.m, k)
	}
	if rec.Memo == nil {
		rec.Memo = new(keys.Memo) // for the server's encoding of it: see keys.Record.Memo
	}
	sh.m[key] = decodedValue{raw: raw, rec: rec}
	sh.bytes += size
}
