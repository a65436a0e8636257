package linearizability

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	goredis "github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server/servertest"
	"github.com/idemsvc/idemsvc/internal/storage/redis"
)

// TestBolt: 64 clients on one server over the embedded bbolt store.
func TestBolt(t *testing.T) {
	srv := servertest.Start(t, servertest.Options{Logger: zap.NewNop()})
	prove(t, "bolt, 1 server", sized([]string{srv.URL}))
}

// TestRedisThreeReplicas: 64 clients spread over three servers, each with its own connection
// to one Redis and the same key prefix, as three replicas of a deployment.
func TestRedisThreeReplicas(t *testing.T) {
	url := redisURL(t)
	prefix := "idemsvc-proofs-lin-" + keys.NewToken()
	t.Cleanup(func() { cleanRedis(t, url, prefix) })
	var urls []string
	for range 3 {
		s, err := redis.Open(context.Background(), url, redis.Options{Prefix: prefix})
		if err != nil {
			t.Fatalf("open redis: %v", err)
		}
		t.Cleanup(func() { _ = s.Close() }) // runs after the server's own cleanup stopped it
		urls = append(urls, servertest.Start(t, servertest.Options{Store: s, Logger: zap.NewNop()}).URL)
	}
	prove(t, "redis, 3 replicas", sized(urls))
}

// prove records a history of w and requires it to be linearizable, to contain no answer outside
// the contract, and to have exercised the outcomes that matter.
func prove(t *testing.T, name string, w workload) {
	t.Helper()
	w.Seed = rand.Uint64()
	h := run(t, w)
	t.Logf("%s: seed %d, %d calls: %s", name, w.Seed, len(h.ops), h.summary())
	for i, u := range h.unexpected {
		if i == 10 {
			t.Errorf("... and %d more answers outside the contract", len(h.unexpected)-i)
			break
		}
		t.Errorf("answer outside the contract: %s", u)
	}

	dir, err := os.MkdirTemp("", "idemsvc-linearizability-")
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	res, path := check(t, h, dir)
	switch res {
	case porcupine.Ok:
		_ = os.RemoveAll(dir)
		t.Logf("linearizability: %s: %d clients x %d keys x %d servers: %d calls (%d unknown outcomes), 0 violations (checked in %s)",
			name, w.Clients, w.Keys, len(w.URLs), len(h.ops), h.unknowns(), time.Since(began).Round(time.Millisecond))
	case porcupine.Illegal:
		t.Errorf("linearizability: %s: the history of %d calls is NOT linearizable; see %s", name, len(h.ops), path)
	default:
		t.Errorf("linearizability: %s: the checker gave up (%s) on %d calls; see %s", name, res, len(h.ops), path)
	}

	// A run that never met a conflict proves little: require the outcomes that matter.
	for _, outcome := range []string{
		"begin 201", "begin 200 replay", "begin 409 in-progress", "begin 422 fingerprint-mismatch",
		"complete 200", "complete 409 lease-lost", "complete 409 already-completed", "complete 404 not-found",
		"renew 200", "renew 409 lease-lost", "release 204", "release 409 lease-lost",
		"get 200", "get 404 not-found", "delete 204",
	} {
		if h.counts[outcome] == 0 {
			t.Errorf("the run never saw %q: the workload does not exercise it", outcome)
		}
	}
}

// redisURL returns the URL of the Redis the tests use (IDEMSVC_TEST_REDIS_URL, default the
// local one) once it answers. When it does not, the test is skipped, or fails when
// IDEMSVC_TEST_REQUIRE_BACKENDS=1.
func redisURL(t *testing.T) string {
	t.Helper()
	url := os.Getenv("IDEMSVC_TEST_REDIS_URL")
	if url == "" {
		url = "redis://127.0.0.1:6379/0"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	err := func() error {
		s, err := redis.Open(ctx, url, redis.Options{Prefix: "idemsvc-proofs-ping"})
		if err != nil {
			return err
		}
		defer s.Close()
		return s.Ping(ctx)
	}()
	if err != nil {
		if os.Getenv("IDEMSVC_TEST_REQUIRE_BACKENDS") == "1" {
			t.Fatalf("Redis at %s does not answer and IDEMSVC_TEST_REQUIRE_BACKENDS=1: %v", url, err)
		}
		t.Skipf("skipping the Redis linearizability proof: Redis at %s does not answer (set IDEMSVC_TEST_REQUIRE_BACKENDS=1 to fail instead): %v", url, err)
	}
	return url
}

// cleanRedis removes every Redis key under prefix: records and fence counters would otherwise
// linger for up to a day.
func cleanRedis(t *testing.T, url, prefix string) {
	opts, err := goredis.ParseURL(url)
	if err != nil {
		t.Errorf("clean redis: %v", err)
		return
	}
	c := goredis.NewClient(opts)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	iter := c.Scan(ctx, 0, prefix+":*", 1000).Iterator()
	var batch []string
	flush := func() {
		if len(batch) > 0 {
			if err := c.Unlink(ctx, batch...).Err(); err != nil {
				t.Errorf("clean redis: %v", err)
			}
			batch = batch[:0]
		}
	}
	for iter.Next(ctx) {
		if batch = append(batch, iter.Val()); len(batch) == 1000 {
			flush()
		}
	}
	flush()
	if err := iter.Err(); err != nil {
		t.Errorf("clean redis: %v", fmt.Errorf("scan %s:*: %w", prefix, err))
	}
}
