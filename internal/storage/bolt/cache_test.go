package bolt

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

// pairOf begins and completes (tenant, key) with body, and fails the test otherwise.
func pairOf(t *testing.T, s *Store, tenant, key, body string, ttl time.Duration) {
	t.Helper()
	ctx := context.Background()
	res, err := s.Begin(ctx, tenant, key, keys.BeginRequest{Fingerprint: "f", Lease: time.Minute, TTL: ttl})
	if err != nil || (res.Outcome != keys.Acquired && res.Outcome != keys.TakenOver) {
		t.Fatalf("begin %s/%s: %v, %v", tenant, key, res.Outcome, err)
	}
	_, err = s.Complete(ctx, tenant, key, keys.CompleteRequest{
		Token: res.Record.Lease.Token, Response: keys.Response{Status: 200, Body: []byte(body)},
	})
	if err != nil {
		t.Fatalf("complete %s/%s: %v", tenant, key, err)
	}
}

func bodyOf(t *testing.T, s *Store, tenant, key string) string {
	t.Helper()
	rec, err := s.Get(context.Background(), tenant, key)
	if errors.Is(err, keys.ErrNotFound) {
		return "<none>"
	}
	if err != nil {
		t.Fatalf("get %s/%s: %v", tenant, key, err)
	}
	if rec.Response == nil {
		return "<in progress>"
	}
	return string(rec.Response.Body)
}

// TestReplayCacheFollowsWrites: replays are served from the cache once read, and every write
// that changes a completed record (a delete, a takeover once it expired, a sweep) is seen by the
// next read; tenants never share an entry.
func TestReplayCacheFollowsWrites(t *testing.T) {
	clock := storagetest.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	s := open(t, filepath.Join(t.TempDir(), FileName), clock)
	ctx := context.Background()

	pairOf(t, s, "a", "k", "one", time.Hour)
	flush(t, s)
	pairOf(t, s, "b", "k", "other tenant", time.Hour)
	flush(t, s)
	if s.cache.get(keys.StorageID("a", "k")) != nil {
		t.Fatal("a complete filled the cache; only reads should")
	}
	if got := bodyOf(t, s, "a", "k"); got != "one" {
		t.Fatalf("get a/k = %q, want one", got)
	}
	if s.cache.get(keys.StorageID("a", "k")) == nil {
		t.Fatal("a get of a completed record in the file did not fill the cache")
	}
	res, err := s.Begin(ctx, "a", "k", keys.BeginRequest{Fingerprint: "f", Lease: time.Minute, TTL: time.Hour})
	if err != nil || res.Outcome != keys.Replayed || string(res.Record.Response.Body) != "one" {
		t.Fatalf("replay a/k: %v %v", res.Outcome, err)
	}
	if got := bodyOf(t, s, "b", "k"); got != "other tenant" {
		t.Fatalf("get b/k = %q", got)
	}
	// A different fingerprint is a mismatch, decided on the cached record too.
	if _, err := s.Begin(ctx, "a", "k", keys.BeginRequest{Fingerprint: "x", Lease: time.Minute, TTL: time.Hour}); !errors.Is(err, keys.ErrFingerprintMismatch) {
		t.Fatalf("begin with another fingerprint: %v", err)
	}

	// Delete: gone at once, and the key can be won again.
	if err := s.Delete(ctx, "a", "k"); err != nil {
		t.Fatal(err)
	}
	if got := bodyOf(t, s, "a", "k"); got != "<none>" {
		t.Fatalf("get after delete = %q", got)
	}
	pairOf(t, s, "a", "k", "two", time.Hour)
	flush(t, s)
	if got := bodyOf(t, s, "a", "k"); got != "two" {
		t.Fatalf("get after the second pair = %q", got)
	}

	// Expiry, then a takeover by begin: the cached record is expired and no longer served.
	bodyOf(t, s, "a", "k")
	clock.Advance(2 * time.Hour)
	if got := bodyOf(t, s, "a", "k"); got != "<none>" {
		t.Fatalf("get after expiry = %q", got)
	}
	res, err = s.Begin(ctx, "a", "k", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
	if err != nil || res.Outcome != keys.Acquired {
		t.Fatalf("begin after expiry: %v %v", res.Outcome, err)
	}
	if got := bodyOf(t, s, "a", "k"); got != "<in progress>" {
		t.Fatalf("get after the takeover = %q", got)
	}

	// A sweep drops the entries of what it removed.
	pairOf(t, s, "a", "s", "swept", time.Minute)
	flush(t, s)
	bodyOf(t, s, "a", "s")
	clock.Advance(2 * time.Minute)
	if n, err := s.Sweep(ctx, 100); err != nil || n == 0 {
		t.Fatalf("sweep: %d, %v", n, err)
	}
	if s.cache.get(keys.StorageID("a", "s")) != nil {
		t.Fatal("the sweep left the entry of a record it removed")
	}
}

// TestReplayCacheRejectsStaleAdds: a value read before or during a writer's mark is never added.
func TestReplayCacheRejectsStaleAdds(t *testing.T) {
	c := newReplayCache(1 << 20)
	id := keys.StorageID("t", "k")
	rec := &keys.Record{Key: "k", State: keys.StateCompleted, Response: &keys.Response{Status: 200}}

	g := c.generation()
	c.mark(id)
	c.add(id, rec, g) // read before the mark
	if c.get(id) != nil {
		t.Fatal("added a value read before a writer's mark")
	}
	c.add(id, rec, c.generation()) // read during the mark
	if c.get(id) != nil {
		t.Fatal("added a value while a writer is in flight")
	}
	during := c.generation()
	c.unmark(id)
	c.add(id, rec, during) // read during the mark, added after the commit
	if c.get(id) != nil {
		t.Fatal("added a value read before the writer's commit")
	}
	c.add(id, &keys.Record{State: keys.StateInProgress}, c.generation())
	if c.get(id) != nil {
		t.Fatal("added an in-progress record")
	}
	c.add(id, rec, c.generation())
	if c.get(id) != rec {
		t.Fatal("did not add a value read after the writer's commit")
	}
	c.mark(id)
	if c.get(id) != nil {
		t.Fatal("a mark left the entry")
	}
}

// TestReplayCacheBounded: the cache stays within its budget and evicts the oldest entries.
func TestReplayCacheBounded(t *testing.T) {
	c := newReplayCache(cacheShards * 64 << 10) // 64 KiB a shard
	body := make([]byte, 1000)
	for i := range 10000 {
		id := keys.StorageID("t", strconv.Itoa(i))
		c.add(id, &keys.Record{State: keys.StateCompleted, Response: &keys.Response{Body: body}}, c.generation())
	}
	total, entries := 0, 0
	for i := range c.shards {
		sh := &c.shards[i]
		if sh.bytes > sh.max {
			t.Errorf("shard %d holds %d bytes, more than its %d", i, sh.bytes, sh.max)
		}
		if len(sh.fifo)-sh.head > 2*len(sh.m)+8 {
			t.Errorf("shard %d queues %d ids for %d entries", i, len(sh.fifo)-sh.head, len(sh.m))
		}
		total += sh.bytes
		entries += len(sh.m)
	}
	if entries == 0 || entries > 1200 {
		t.Errorf("%d entries (%d bytes) for a 1 MiB budget of ~1.3 KiB entries", entries, total)
	}
	if c.get(keys.StorageID("t", "9999")) == nil || c.get(keys.StorageID("t", "0")) != nil {
		t.Error("eviction did not keep the newest and drop the oldest")
	}
}

// TestReplayCacheQueueBounded: entries dropped by writers, not evicted, do not pile up in the
// eviction queue: a key read and deleted again and again keeps it short.
func TestReplayCacheQueueBounded(t *testing.T) {
	c := newReplayCache(1 << 20)
	rec := &keys.Record{State: keys.StateCompleted, Response: &keys.Response{Status: 200}}
	ids := [][]byte{keys.StorageID("t", "a"), keys.StorageID("t", "b")}
	for range 10_000 {
		for _, id := range ids {
			c.add(id, rec, c.generation())
			c.mark(id)
			c.unmark(id)
		}
	}
	c.add(ids[0], rec, c.generation())
	queued := 0
	for i := range c.shards {
		queued += len(c.shards[i].fifo) - c.shards[i].head
	}
	if queued > 2*(64+2)*2 {
		t.Errorf("%d ids queued for 1 entry after 20,000 adds and drops", queued)
	}
	if c.get(ids[0]) != rec || c.get(ids[1]) != nil {
		t.Error("the cache lost its entry, or kept a dropped one")
	}
}

// TestReplayCacheUnderDeletes: readers (gets) racing a writer that deletes and re-creates one key never
// see a version after its delete returned. A reader notes the last deleted version before each
// read, so a stale cache entry (one not dropped before the delete's commit, or added from a read
// that preceded it) is a violation.
func TestReplayCacheUnderDeletes(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), FileName), storagetest.NewClock(time.Now()))
	ctx := context.Background()
	var (
		deleted atomic.Int64 // versions up to this one have been deleted
		stop    atomic.Bool
		wg      sync.WaitGroup
		bad     atomic.Int64
		hits    atomic.Int64
	)
	for range 4 { // readers only get: a begin would win the key between versions
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				d := deleted.Load()
				rec, err := s.Get(ctx, "t", "k")
				if err != nil || rec.Response == nil {
					continue
				}
				body := string(rec.Response.Body)
				v, _ := strconv.ParseInt(body, 10, 64)
				if v <= d {
					bad.Add(1)
				} else {
					hits.Add(1)
				}
			}
		}()
	}
	for v := int64(1); v <= 300; v++ {
		res, err := s.Begin(ctx, "t", "k", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
		if err != nil {
			t.Fatalf("begin v%d: %v", v, err)
		}
		if res.Outcome == keys.Replayed {
			t.Fatalf("v%d: the key was replayed after its delete", v)
		}
		if _, err := s.Complete(ctx, "t", "k", keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200, Body: []byte(fmt.Sprint(v))}}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Microsecond) // let readers fill the cache
		if err := s.Delete(ctx, "t", "k"); err != nil {
			t.Fatal(err)
		}
		deleted.Store(v)
	}
	stop.Store(true)
	wg.Wait()
	if bad.Load() > 0 {
		t.Errorf("%d reads saw a version deleted before they began (%d good reads)", bad.Load(), hits.Load())
	}
	if hits.Load() == 0 {
		t.Error("no read saw a completed record: the test exercised nothing")
	}
	t.Logf("%d reads of live versions, %d stale", hits.Load(), bad.Load())
}

// flush carries what the log holds into the file, so that reads come from there (and may fill
// the replay cache).
func flush(t *testing.T, s *Store) {
	t.Helper()
	for range 2 {
		if err := s.checkpoint(); err != nil {
			t.Fatal(err)
		}
	}
}
