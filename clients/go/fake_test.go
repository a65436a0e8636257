package idemclient

import (
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeSvc is a hand-written, in-memory idemsvc that follows CONTRACT.md closely enough to test
// Do and Middleware in this module. The tests against the real server are those named
// ...AgainstIdemsvc here (see idemsvc_test.go) and those in the root module (internal/clienttest).
type fakeSvc struct {
	t     testing.TB
	token string // required bearer token; "" is open mode

	mu      sync.Mutex
	recs    map[string]*fakeRec
	fence   uint64
	calls   map[string]int
	inject  func(op string) int // status to answer instead of handling; 0 handles
	maxBody int
	// leaseMS holds the lease_ms of every begin and renew, by op.
	leaseMS map[string][]*int64
}

type fakeRec struct {
	state    State
	fp       string
	token    string
	fence    uint64
	leaseExp time.Time
	resp     *wireResponse
	created  time.Time
	done     time.Time
	expires  time.Time
	ttl      time.Duration
}

func newFake(t testing.TB) (*fakeSvc, *httptest.Server) {
	f := &fakeSvc{t: t, recs: map[string]*fakeRec{}, calls: map[string]int{}, maxBody: 1 << 20, leaseMS: map[string][]*int64{}}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv
}

func (f *fakeSvc) count(op string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op]
}

func (f *fakeSvc) record(key string) *fakeRec {
	f.mu.Lock()
	defer f.mu.Unlock()
	r := f.recs[key]
	if r == nil || !time.Now().Before(r.expires) {
		return nil
	}
	c := *r
	return &c
}

func (f *fakeSvc) deleteKey(key string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.recs, key)
}

func (f *fakeSvc) problem(w http.ResponseWriter, status int, name string) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"type": ProblemTypePrefix + name, "title": name, "status": status, "detail": "fake: " + name})
}

func (f *fakeSvc) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Request-Id", "fake-req")
	if f.token != "" && r.Header.Get("Authorization") != "Bearer "+f.token {
		w.Header().Set("WWW-Authenticate", "Bearer")
		f.problem(w, 401, "unauthorized")
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.EscapedPath(), "/v1/keys/"), "/")
	key, err := url.PathUnescape(parts[0])
	if err != nil || !strings.HasPrefix(r.URL.EscapedPath(), "/v1/keys/") || len(parts) > 2 {
		f.problem(w, 404, "not-found")
		return
	}
	op := "get"
	if len(parts) == 2 {
		op = parts[1]
	} else if r.Method == http.MethodDelete {
		op = "delete"
	}
	f.mu.Lock()
	f.calls[op]++
	inject := f.inject
	f.mu.Unlock()
	if inject != nil {
		if status := inject(op); status != 0 {
			if status == -1 { // drop the connection
				panic(http.ErrAbortHandler)
			}
			f.problem(w, status, map[int]string{503: "unavailable", 500: "internal"}[status])
			return
		}
	}
	if !ValidKey(key) {
		f.problem(w, 400, "invalid-key")
		return
	}
	var body struct {
		Fingerprint string        `json:"fingerprint"`
		LeaseMS     *int64        `json:"lease_ms"`
		TTLMS       *int64        `json:"ttl_ms"`
		WaitMS      *int64        `json:"wait_ms"`
		Token       string        `json:"token"`
		Response    *wireResponse `json:"response"`
	}
	if r.ContentLength != 0 && r.Method == http.MethodPost {
		if ct := r.Header.Get("Content-Type"); ct != "application/json" {
			f.problem(w, 415, "unsupported-media-type")
			return
		}
		dec := json.NewDecoder(r.Body)
		dec.DisallowUnknownFields()
		if err := dec.Decode(&body); err != nil {
			f.problem(w, 400, "invalid-request")
			return
		}
	}
	ms := func(p *int64, def time.Duration) time.Duration {
		if p == nil {
			return def
		}
		return time.Duration(*p) * time.Millisecond
	}
	f.mu.Lock()
	if op == "begin" || op == "renew" {
		f.leaseMS[op] = append(f.leaseMS[op], body.LeaseMS)
	}
	f.mu.Unlock()
	switch op {
	case "begin":
		f.begin(w, key, body.Fingerprint, ms(body.LeaseMS, 30*time.Second), ms(body.TTLMS, time.Hour), ms(body.WaitMS, 0))
	case "complete":
		if body.Response == nil || body.Response.Status < 100 || body.Response.Status > 599 || len(body.Response.Body) > f.maxBody {
			f.problem(w, 422, "invalid-response")
			return
		}
		for name := range body.Response.Headers {
			switch http.CanonicalHeaderKey(name) {
			case "Set-Cookie", "Authorization", "Proxy-Authorization":
				f.problem(w, 422, "invalid-response")
				return
			}
		}
		f.complete(w, key, body.Token, body.Response, ms(body.TTLMS, 0))
	case "renew":
		f.renew(w, key, body.Token, ms(body.LeaseMS, 30*time.Second))
	case "release":
		f.release(w, key, body.Token)
	case "get":
		f.mu.Lock()
		defer f.mu.Unlock()
		rec := f.live(key)
		if rec == nil {
			f.problem(w, 404, "not-found")
			return
		}
		f.write(w, 200, key, rec, false)
	case "delete":
		f.mu.Lock()
		delete(f.recs, key)
		f.mu.Unlock()
		w.WriteHeader(204)
	default:
		f.problem(w, 404, "not-found")
	}
}

func (f *fakeSvc) live(key string) *fakeRec {
	r := f.recs[key]
	if r == nil || !time.Now().Before(r.expires) {
		return nil
	}
	return r
}

func (f *fakeSvc) write(w http.ResponseWriter, status int, key string, r *fakeRec, withToken bool) {
	rec := wireRecord{Key: key, State: r.state, Fingerprint: r.fp, CreatedAt: r.created, ExpiresAt: r.expires, Response: r.resp}
	if r.state == StateInProgress {
		rec.Lease = &wireLease{Fence: r.fence, ExpiresAt: r.leaseExp}
		if withToken {
			rec.Lease.Token = r.token
		}
	} else {
		rec.CompletedAt = &r.done
		if rec.Response.Headers == nil {
			rec.Response.Headers = map[string][]string{}
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if status == 200 && r.state == StateCompleted && !withToken {
		w.Header().Set(ReplayedHeader, "true")
	}
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(rec)
}

func (f *fakeSvc) begin(w http.ResponseWriter, key, fp string, lease, ttl, wait time.Duration) {
	deadline := time.Now().Add(wait)
	for {
		f.mu.Lock()
		now := time.Now()
		cur := f.live(key)
		if cur != nil && cur.fp != "" && cur.fp != fp {
			f.mu.Unlock()
			f.problem(w, 422, "fingerprint-mismatch")
			return
		}
		if cur != nil && cur.state == StateCompleted {
			defer f.mu.Unlock()
			f.write(w, 200, key, cur, false)
			return
		}
		if cur != nil && now.Before(cur.leaseExp) {
			left := cur.leaseExp.Sub(now)
			f.mu.Unlock()
			if now.Before(deadline) {
				time.Sleep(2 * time.Millisecond)
				continue
			}
			w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(left.Seconds()))))
			f.problem(w, 409, "in-progress")
			return
		}
		defer f.mu.Unlock()
		f.fence++
		created := now
		if cur != nil {
			created = cur.created
		}
		rec := &fakeRec{state: StateInProgress, fp: fp, token: fmt.Sprintf("tok-%d", f.fence), fence: f.fence,
			leaseExp: now.Add(lease), created: created, expires: now.Add(max(ttl, lease)), ttl: ttl}
		f.recs[key] = rec
		f.write(w, 201, key, rec, true)
		return
	}
}

func (f *fakeSvc) complete(w http.ResponseWriter, key, token string, resp *wireResponse, ttl time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cur := f.live(key)
	switch {
	case cur == nil:
		f.problem(w, 404, "not-found")
	case cur.state == StateCompleted:
		if cur.token == token && cur.resp.Status == resp.Status && string(cur.resp.Body) == string(resp.Body) &&
			maps.EqualFunc(cur.resp.Headers, resp.Headers, func(a, b []string) bool { return reflect.DeepEqual(a, b) }) {
			f.write(w, 200, key, cur, true)
			return
		}
		f.problem(w, 409, "already-completed")
	case cur.token != token:
		f.problem(w, 409, "lease-lost")
	default:
		if ttl == 0 {
			ttl = cur.ttl
		}
		cur.state, cur.resp, cur.done, cur.expires = StateCompleted, resp, time.Now(), time.Now().Add(ttl)
		f.write(w, 200, key, cur, true)
	}
}

func (f *fakeSvc) renew(w http.ResponseWriter, key, token string, lease time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cur := f.live(key)
	switch {
	case cur == nil:
		f.problem(w, 404, "not-found")
	case cur.state != StateInProgress || cur.token != token:
		f.problem(w, 409, "lease-lost")
	default:
		cur.leaseExp = time.Now().Add(lease)
		cur.expires = later(cur.expires, cur.leaseExp)
		f.write(w, 200, key, cur, true)
	}
}

func (f *fakeSvc) release(w http.ResponseWriter, key, token string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cur := f.live(key)
	switch {
	case cur == nil:
		w.WriteHeader(204)
	case cur.state == StateCompleted:
		f.problem(w, 409, "already-completed")
	case cur.token != token:
		f.problem(w, 409, "lease-lost")
	default:
		delete(f.recs, key)
		w.WriteHeader(204)
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// newTestClient returns a client of srv with fast retries.
func newTestClient(t testing.TB, baseURL string, opts ...Option) *Client {
	t.Helper()
	opts = append([]Option{WithRetry(RetryPolicy{MaxAttempts: 3, BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond, AttemptTimeout: 5 * time.Second})}, opts...)
	c, err := New(baseURL, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
