package linearizability

import (
	"context"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"go.uber.org/zap"

	"github.com/idemsvc/idemsvc/internal/server/servertest"
	"github.com/idemsvc/idemsvc/internal/storage/redis"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

// TestBolt: 64 clients on one server over the embedded bbolt store.
func TestBolt(t *testing.T) {
	srv := servertest.Start(t, servertest.Options{Logger: zap.NewNop()})
	prove(t, "bolt, 1 server", sized([]string{srv.URL}))
}

// TestRedisThreeReplicas: 64 clients spread over three servers, each with its own connection
// to one Redis and the same key prefix, as three replicas of a deployment.
func TestRedisThreeReplicas(t *testing.T) {
	url := redistest.URL(t)
	prefix := redistest.Prefix(t)
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
