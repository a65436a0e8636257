package redis

import (
	"hash/maphash"
	"sync"
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
