package linearizability

import (
	"context"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server/servertest"
)

// TestCheckerCatchesCheckThenActBegin shows that the proof fails when its guarantee is broken:
// served over a store whose begin reads, decides and writes in three steps (check-then-act),
// eight concurrent begins of one key produce more than one 201, and porcupine must call the
// history illegal.
func TestCheckerCatchesCheckThenActBegin(t *testing.T) {
	store := &checkThenActStore{recs: map[string]keys.Record{}, together: 2}
	srv := servertest.Start(t, servertest.Options{Store: store})

	w := workload{Clients: 8, Keys: 1, URLs: []string{srv.URL}, Seed: rand.Uint64()}
	rec := &recorder{start: time.Now(), h: history{counts: map[string]int{}}}
	gate := make(chan struct{})
	var wg sync.WaitGroup
	for i := range w.Clients {
		c := &client{id: i, w: w, hc: &http.Client{}, rec: rec,
			rng:  rand.New(rand.NewPCG(w.Seed, uint64(i))),
			held: map[string]lease{}, past: map[string][]lease{}}
		wg.Go(func() {
			<-gate
			in := Input{Kind: Begin, Key: "k", Fingerprint: "fp", ID: int(rec.ids.Add(1))}
			if out, token := c.call(in, "POST", "k", "/begin", map[string]any{"fingerprint": "fp"}); out.Status == 201 {
				c.complete("k", lease{id: in.ID, token: token}, false)
			}
		})
	}
	close(gate)
	wg.Wait()
	h := rec.finish()
	t.Logf("broken store: %d calls: %s", len(h.ops), h.summary())
	if h.counts["begin 201"] < 2 {
		t.Fatalf("the broken store let only %d begins win; the race was not forced", h.counts["begin 201"])
	}

	dir := t.TempDir()
	res, path := check(t, h, dir)
	if res != porcupine.Illegal {
		t.Fatalf("porcupine says %s for a history with %d winners of one key; want %s",
			res, h.counts["begin 201"], porcupine.Illegal)
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() == 0 || filepath.Dir(path) != dir {
		t.Errorf("no visualization of the violation at %q: %v", path, err)
	}
	t.Logf("porcupine: %s, as it must be (%d winners of one key)", res, h.counts["begin 201"])
}

// checkThenActStore is a keys.Store in memory whose Begin is deliberately not atomic: it decides
// on one read and writes later, after waiting until `together` begins have decided to acquire
// (or a second has passed), so that the race is forced rather than hoped for. Everything else
// follows the rules of package keys atomically.
type checkThenActStore struct {
	mu       sync.Mutex
	recs     map[string]keys.Record
	fence    uint64
	together int
	arrived  int
	gen      chan struct{}
}

var _ keys.Store = (*checkThenActStore)(nil)

func (s *checkThenActStore) read(id string) *keys.Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r, ok := s.recs[id]; ok {
		return &r
	}
	return nil
}

// barrier returns when `together` callers have arrived, or after a second.
func (s *checkThenActStore) barrier() {
	s.mu.Lock()
	if s.gen == nil {
		s.gen = make(chan struct{})
	}
	ch := s.gen
	s.arrived++
	if s.arrived >= s.together {
		close(s.gen)
		s.gen, s.arrived = nil, 0
	}
	s.mu.Unlock()
	select {
	case <-ch:
	case <-time.After(time.Second):
	}
}

func (s *checkThenActStore) Begin(ctx context.Context, tenant, key string, req keys.BeginRequest) (keys.BeginResult, error) {
	id := string(keys.StorageID(tenant, key))
	res, w, err := keys.DecideBegin(s.read(id), time.Now(), key, req) // check ...
	if w != keys.WritePut {
		return res, err
	}
	s.barrier()
	s.mu.Lock() // ... then act, on what was read before
	defer s.mu.Unlock()
	s.fence++
	res.Record.Lease.Fence = s.fence
	s.recs[id] = res.Record
	return res, err
}

// update applies a rule atomically.
func (s *checkThenActStore) update(tenant, key string, decide func(cur *keys.Record, now time.Time) (keys.Record, keys.Write, error)) (keys.Record, error) {
	id := string(keys.StorageID(tenant, key))
	s.mu.Lock()
	defer s.mu.Unlock()
	var cur *keys.Record
	if r, ok := s.recs[id]; ok {
		cur = &r
	}
	rec, w, err := decide(cur, time.Now())
	switch w {
	case keys.WritePut:
		s.recs[id] = rec
	case keys.WriteDelete:
		delete(s.recs, id)
	}
	return rec, err
}

func (s *checkThenActStore) Complete(ctx context.Context, tenant, key string, req keys.CompleteRequest) (keys.Record, error) {
	rec, err := s.update(tenant, key, func(cur *keys.Record, now time.Time) (keys.Record, keys.Write, error) {
		return keys.DecideComplete(cur, now, req)
	})
	return rec.Public(), err
}

func (s *checkThenActStore) Renew(ctx context.Context, tenant, key string, req keys.RenewRequest) (keys.Record, error) {
	return s.update(tenant, key, func(cur *keys.Record, now time.Time) (keys.Record, keys.Write, error) {
		return keys.DecideRenew(cur, now, req)
	})
}

func (s *checkThenActStore) Release(ctx context.Context, tenant, key, token string) error {
	_, err := s.update(tenant, key, func(cur *keys.Record, now time.Time) (keys.Record, keys.Write, error) {
		w, err := keys.DecideRelease(cur, now, token)
		return keys.Record{}, w, err
	})
	return err
}

func (s *checkThenActStore) Get(ctx context.Context, tenant, key string) (keys.Record, error) {
	return keys.DecideGet(s.read(string(keys.StorageID(tenant, key))), time.Now())
}

func (s *checkThenActStore) Delete(ctx context.Context, tenant, key string) error {
	_, err := s.update(tenant, key, func(cur *keys.Record, now time.Time) (keys.Record, keys.Write, error) {
		return keys.Record{}, keys.WriteDelete, nil
	})
	return err
}

// Watch never signals: the broken-store test never waits.
func (s *checkThenActStore) Watch(tenant, key string) (<-chan struct{}, func()) {
	return make(chan struct{}), func() {}
}

func (s *checkThenActStore) Sweep(ctx context.Context, max int) (int, error) { return 0, nil }
func (s *checkThenActStore) Ping(ctx context.Context) error                  { return nil }
func (s *checkThenActStore) Close() error                                    { return nil }
