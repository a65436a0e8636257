package server_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// The handler benchmarks drive the whole handler (routing, auth, decoding, the store, encoding,
// metrics; no network, no access log) on the three hot paths: a begin that replays a completed
// key, a begin on a fresh key, and a complete.
//
//	go test -run '^$' -bench Handler -benchmem ./internal/server/
//
// BenchmarkBeginHandler serves a bbolt store in a temp dir with fsync on (Acquire and Complete
// are dominated by the fsync); BenchmarkHandlerNoStore serves a store that answers at once
// from memory, so that it measures what the server itself costs per request.

const (
	benchToken       = "bench-token-0123456789"
	benchBeginBody   = `{"fingerprint":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","ttl_ms":600000}`
	benchStoredBody  = "QUJD" // 66 times: a 198-byte stored body
	benchStoredTimes = 66
)

// benchRun makes keys unique across the runs of one benchmark (-count, the b.N ramp-up).
var benchRun atomic.Int64

// benchRequest is a request as the benchmarks send it: JSON, with a bearer token. The body is
// a fresh reader each time, as a real request's is.
type benchRequest struct {
	h http.Handler
	r http.Request
	b strings.Reader
}

func newBenchRequest(h http.Handler, method, path string) *benchRequest {
	br := &benchRequest{h: h}
	br.r = *httptest.NewRequest(method, path, nil)
	br.r.Header.Set("Content-Type", "application/json")
	br.r.Header.Set("Authorization", "Bearer "+benchToken)
	return br
}

// serve sends the request with body and returns the recorded answer.
func (br *benchRequest) serve(path, body string) *httptest.ResponseRecorder {
	req := br.r // the handler may keep a pointer, so each request is its own copy
	if path != "" {
		u := *br.r.URL
		u.Path = path
		req.URL = &u
		req.RequestURI = path
	}
	br.b.Reset(body)
	req.Body = io.NopCloser(&br.b)
	req.ContentLength = int64(len(body))
	w := httptest.NewRecorder()
	br.h.ServeHTTP(w, &req)
	return w
}

func benchCompleteBody(token string) string {
	return `{"token":"` + token + `","response":{"status":201,"headers":{"Content-Type":["application/json"]},"body":"` +
		strings.Repeat(benchStoredBody, benchStoredTimes) + `"}}`
}

func leaseToken(b *testing.B, w *httptest.ResponseRecorder) string {
	b.Helper()
	s := w.Body.String()
	i := strings.Index(s, `"token":"`)
	if i < 0 {
		b.Fatalf("no token in %d %s", w.Code, s)
	}
	s = s[i+9:]
	return s[:strings.IndexByte(s, '"')]
}

// benchHotPaths runs the three hot paths on h.
func benchHotPaths(b *testing.B, h http.Handler) {
	b.Run("Replay", func(b *testing.B) {
		key := "replayed-" + strconv.FormatInt(benchRun.Add(1), 10)
		begin := newBenchRequest(h, "POST", "/v1/keys/"+key+"/begin")
		w := begin.serve("", benchBeginBody)
		complete := newBenchRequest(h, "POST", "/v1/keys/"+key+"/complete")
		if cw := complete.serve("", benchCompleteBody(leaseToken(b, w))); cw.Code != http.StatusOK {
			b.Fatalf("complete: %d %s", cw.Code, cw.Body)
		}
		b.ReportAllocs()
		for b.Loop() {
			if w := begin.serve("", benchBeginBody); w.Code != http.StatusOK {
				b.Fatalf("replay: %d %s", w.Code, w.Body)
			}
		}
	})
	b.Run("Acquire", func(b *testing.B) {
		prefix := "/v1/keys/fresh-" + strconv.FormatInt(benchRun.Add(1), 10) + "-"
		begin := newBenchRequest(h, "POST", prefix+"0/begin")
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			i++
			if w := begin.serve(prefix+strconv.Itoa(i)+"/begin", benchBeginBody); w.Code != http.StatusCreated {
				b.Fatalf("begin: %d %s", w.Code, w.Body)
			}
		}
	})
	b.Run("Complete", func(b *testing.B) {
		// Each iteration completes a key that was begun before the timer started (a begin
		// per iteration, in batches, outside the timed part).
		prefix := "/v1/keys/completed-" + strconv.FormatInt(benchRun.Add(1), 10) + "-"
		begin := newBenchRequest(h, "POST", prefix+"0/begin")
		complete := newBenchRequest(h, "POST", prefix+"0/complete")
		var bodies []string
		i, next := 0, 0
		b.ReportAllocs()
		for b.Loop() {
			if next == len(bodies) {
				b.StopTimer()
				bodies, next = bodies[:0], 0
				for range 256 {
					i++
					w := begin.serve(prefix+strconv.Itoa(i)+"/begin", benchBeginBody)
					if w.Code != http.StatusCreated {
						b.Fatalf("begin: %d %s", w.Code, w.Body)
					}
					bodies = append(bodies, benchCompleteBody(leaseToken(b, w)))
				}
				b.StartTimer()
			}
			n := i - len(bodies) + next + 1
			if w := complete.serve(prefix+strconv.Itoa(n)+"/complete", bodies[next]); w.Code != http.StatusOK {
				b.Fatalf("complete: %d %s", w.Code, w.Body)
			}
			next++
		}
	})
}

func BenchmarkBeginHandler(b *testing.B) {
	s, err := bolt.OpenDir(b.TempDir(), bolt.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	benchHotPaths(b, server.New(s, server.Options{Limits: keys.DefaultLimits(),
		Tokens: map[string]string{"bench": benchToken}}))
}

func BenchmarkHandlerNoStore(b *testing.B) {
	benchHotPaths(b, server.New(newMemStore(), server.Options{Limits: keys.DefaultLimits(),
		Tokens: map[string]string{"bench": benchToken}}))
}

// memStore is the cheapest store that keeps the hot paths honest: it remembers records in a
// map and applies only what the benchmarks need (acquire, replay, complete by token).
type memStore struct {
	recs map[string]keys.Record
	now  func() time.Time
}

var _ keys.Store = (*memStore)(nil)

func newMemStore() *memStore { return &memStore{recs: map[string]keys.Record{}, now: time.Now} }

func (m *memStore) Begin(_ context.Context, tenant, key string, req keys.BeginRequest) (keys.BeginResult, error) {
	id := string(keys.StorageID(tenant, key))
	if r, ok := m.recs[id]; ok {
		if r.State == keys.StateCompleted {
			return keys.BeginResult{Outcome: keys.Replayed, Record: r}, nil
		}
		r.Lease.Token = ""
		return keys.BeginResult{Record: r}, keys.ErrInProgress
	}
	now := m.now()
	r := keys.Record{Key: key, State: keys.StateInProgress, Fingerprint: req.Fingerprint,
		Lease:     keys.Lease{Token: keys.NewToken(), Fence: 1, ExpiresAt: now.Add(req.Lease)},
		CreatedAt: now, ExpiresAt: now.Add(req.TTL), TTL: req.TTL}
	m.recs[id] = r
	return keys.BeginResult{Outcome: keys.Acquired, Record: r}, nil
}

func (m *memStore) Complete(_ context.Context, tenant, key string, req keys.CompleteRequest) (keys.Record, error) {
	id := string(keys.StorageID(tenant, key))
	r, ok := m.recs[id]
	if !ok {
		return keys.Record{}, keys.ErrNotFound
	}
	if r.State != keys.StateInProgress || r.Lease.Token != req.Token {
		return keys.Record{}, keys.ErrLeaseLost
	}
	now := m.now()
	resp := req.Response
	r.State, r.Response, r.CompletedAt, r.Lease = keys.StateCompleted, &resp, now, keys.Lease{Fence: r.Lease.Fence}
	m.recs[id] = r
	return r, nil
}

func (m *memStore) Renew(context.Context, string, string, keys.RenewRequest) (keys.Record, error) {
	return keys.Record{}, keys.ErrNotFound
}

func (m *memStore) Release(context.Context, string, string, string) error { return nil }

func (m *memStore) Get(_ context.Context, tenant, key string) (keys.Record, error) {
	r, ok := m.recs[string(keys.StorageID(tenant, key))]
	if !ok {
		return keys.Record{}, keys.ErrNotFound
	}
	r.Lease.Token = ""
	return r, nil
}

func (m *memStore) Delete(_ context.Context, tenant, key string) error {
	delete(m.recs, string(keys.StorageID(tenant, key)))
	return nil
}

func (m *memStore) Watch(string, string) (<-chan struct{}, func()) { return nil, func() {} }
func (m *memStore) Sweep(context.Context, int) (int, error)        { return 0, nil }
func (m *memStore) Ping(context.Context) error                     { return nil }
func (m *memStore) Close() error                                   { return nil }
