package clienttest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	idemclient "github.com/idemsvc/idemsvc/clients/go"
)

// ledger is a payments handler: every run books a charge.
type ledger struct {
	mu      sync.Mutex
	charges []string
	delay   time.Duration
	status  int
}

func (l *ledger) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.charges)
}

func (l *ledger) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	time.Sleep(l.delay) // a slow processor that does not stop when the client goes away
	l.mu.Lock()
	l.charges = append(l.charges, string(body))
	n := len(l.charges)
	l.mu.Unlock()
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Location", fmt.Sprintf("/charges/ch_%d", n))
	h.Add("X-Multi", "one")
	h.Add("X-Multi", "two")
	h.Set("Cache-Control", "no-store")
	http.SetCookie(w, &http.Cookie{Name: "session", Value: fmt.Sprint("s", n)})
	status := l.status
	if status == 0 {
		status = http.StatusCreated
	}
	w.WriteHeader(status)
	fmt.Fprintf(w, "{\"id\":\"ch_%d\",\"request\":%s,\"bytes\":\"\xff\x00\"}\n", n, body)
}

// payments serves the ledger at POST /charges behind the middleware with client c.
func payments(t *testing.T, c *idemclient.Client, l *ledger, opts ...idemclient.MiddlewareOption) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle("POST /charges", idemclient.Middleware(c, opts...)(l))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL + "/charges"
}

type reply struct {
	status int
	header http.Header
	body   []byte
}

func post(t *testing.T, url, key, body string) reply {
	t.Helper()
	r, err := postErr(&http.Client{}, url, key, body)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func postErr(hc *http.Client, url, key, body string) (reply, error) {
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return reply{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return reply{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, resp.Header, b}, err
}

func problemName(t *testing.T, r reply) string {
	t.Helper()
	if ct := r.header.Get("Content-Type"); ct != "application/problem+json" {
		t.Errorf("Content-Type = %q, want application/problem+json", ct)
	}
	var p struct {
		Type   string `json:"type"`
		Status int    `json:"status"`
	}
	if err := json.Unmarshal(r.body, &p); err != nil {
		t.Fatalf("problem %q: %v", r.body, err)
	}
	if p.Status != r.status {
		t.Errorf("problem status %d in a %d response", p.Status, r.status)
	}
	return strings.TrimPrefix(p.Type, idemclient.ProblemTypePrefix)
}

// TestMiddlewareReplaysByteIdentical: a retry gets the same status, headers and body bytes,
// with Idempotent-Replayed: true, and the handler runs once. Set-Cookie reaches the first client
// only.
func TestMiddlewareReplaysByteIdentical(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	l := &ledger{}
	url := payments(t, c, l)

	first := post(t, url, `"8e03978e-40d5-43e8-bc93-6894a57f9324"`, `{"amount":100,"currency":"eur"}`)
	second := post(t, url, `"8e03978e-40d5-43e8-bc93-6894a57f9324"`, `{"amount":100,"currency":"eur"}`)
	if first.status != 201 || first.header.Get("Idempotent-Replayed") != "" {
		t.Fatalf("first = %d %v", first.status, first.header)
	}
	if second.status != first.status || second.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("second = %d %v; want %d with Idempotent-Replayed: true", second.status, second.header, first.status)
	}
	if !bytes.Equal(second.body, first.body) {
		t.Errorf("replayed body %q, want byte-identical %q", second.body, first.body)
	}
	if first.header.Get("Set-Cookie") == "" {
		t.Error("the live response lost its Set-Cookie")
	}
	if got := second.header.Values("Set-Cookie"); len(got) != 0 {
		t.Errorf("replay carries Set-Cookie %q; it must never be stored", got)
	}
	// Every header but the per-response ones is identical.
	for name, want := range first.header {
		switch name {
		case "Date", "Set-Cookie":
			continue
		}
		if got := second.header.Values(name); !slices.Equal(got, want) {
			t.Errorf("replayed %s = %q, want %q", name, got, want)
		}
	}
	for name := range second.header {
		if _, ok := first.header[name]; !ok && name != "Idempotent-Replayed" {
			t.Errorf("replay has header %s that the original had not", name)
		}
	}
	if got := l.count(); got != 1 {
		t.Errorf("ledger has %d charges, want 1", got)
	}
}

// TestMiddlewareReorderedJSON: the same key with the same JSON, keys reordered and spaced
// differently, is the same request: replayed.
func TestMiddlewareReorderedJSON(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	l := &ledger{}
	url := payments(t, c, l)
	first := post(t, url, `"k"`, `{"a":1,"b":2}`)
	second := post(t, url, `"k"`, `{ "b": 2, "a": 1.0 }`)
	if first.status != 201 || second.header.Get("Idempotent-Replayed") != "true" || !bytes.Equal(first.body, second.body) {
		t.Fatalf("second = %d %v %s; want the replay of %s", second.status, second.header, second.body, first.body)
	}
	if got := l.count(); got != 1 {
		t.Errorf("ledger has %d charges, want 1", got)
	}
}

// TestMiddlewareChangedBody: the same key with a different body is refused with 422, without
// running the handler or showing the stored response.
func TestMiddlewareChangedBody(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	l := &ledger{}
	url := payments(t, c, l)
	post(t, url, `"k"`, `{"amount":100}`)
	r := post(t, url, `"k"`, `{"amount":1000}`)
	if r.status != 422 || problemName(t, r) != "fingerprint-mismatch" {
		t.Fatalf("changed body = %d %s, want 422 fingerprint-mismatch", r.status, r.body)
	}
	if bytes.Contains(r.body, []byte("ch_1")) {
		t.Errorf("422 shows the stored response: %s", r.body)
	}
	if got := l.count(); got != 1 {
		t.Errorf("ledger has %d charges, want 1", got)
	}
}

// TestMiddlewareSlowHandler: a handler that runs for four lease periods keeps its lease; a retry
// meanwhile gets 409 with Retry-After, and one after it the replay.
func TestMiddlewareSlowHandler(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	l := &ledger{delay: 1200 * time.Millisecond}
	url := payments(t, c, l, idemclient.WithLease(300*time.Millisecond))
	var first reply
	var wg sync.WaitGroup
	wg.Go(func() { first = post(t, url, `"slow"`, `{"amount":5}`) })
	time.Sleep(700 * time.Millisecond) // two lease periods in
	during := post(t, url, `"slow"`, `{"amount":5}`)
	if during.status != 409 || problemName(t, during) != "in-progress" || during.header.Get("Retry-After") == "" {
		t.Errorf("retry during the handler = %d %v %s, want 409 in-progress with Retry-After", during.status, during.header, during.body)
	}
	wg.Wait()
	after := post(t, url, `"slow"`, `{"amount":5}`)
	if first.status != 201 || after.header.Get("Idempotent-Replayed") != "true" || !bytes.Equal(after.body, first.body) {
		t.Errorf("first = %d %s, after = %d %v %s; want the replay", first.status, first.body, after.status, after.header, after.body)
	}
	if got := l.count(); got != 1 {
		t.Errorf("ledger has %d charges, want 1", got)
	}
}

// TestMiddlewareClientTimesOut: the client gives up before the handler finishes and retries with
// the same key; the charge is booked once and the retry gets its response.
func TestMiddlewareClientTimesOut(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	l := &ledger{delay: 500 * time.Millisecond}
	url := payments(t, c, l, idemclient.WithWait(5*time.Second))
	impatient := &http.Client{Timeout: 100 * time.Millisecond}
	if _, err := postErr(impatient, url, `"order-7"`, `{"amount":7}`); err == nil {
		t.Fatal("the impatient client got an answer; want a timeout")
	}
	r := post(t, url, `"order-7"`, `{"amount":7}`) // waits on idemsvc for the first to finish
	if r.status != 201 || r.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("retry = %d %v %s, want the replayed 201", r.status, r.header, r.body)
	}
	if got := l.count(); got != 1 {
		t.Errorf("ledger has %d charges, want 1", got)
	}
}

// TestMiddleware5xxReleased: a 5xx is not stored; the retry runs the handler again.
func TestMiddleware5xxReleased(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	l := &ledger{status: http.StatusBadGateway}
	url := payments(t, c, l)
	if r := post(t, url, `"k"`, `{}`); r.status != 502 {
		t.Fatalf("first = %d", r.status)
	}
	if r := post(t, url, `"k"`, `{}`); r.status != 502 || r.header.Get("Idempotent-Replayed") != "" {
		t.Fatalf("retry = %d %v, want a fresh run", r.status, r.header)
	}
	if got := l.count(); got != 2 {
		t.Errorf("handler ran %d times, want 2", got)
	}
}

// TestMiddlewareIdemsvcDown: with idemsvc unreachable the middleware fails closed with 503 by
// default, and runs the handler unprotected with WithFailOpen.
func TestMiddlewareIdemsvcDown(t *testing.T) {
	t.Parallel()
	down := newClient(t, "http://"+closedAddr(t))
	t.Run("FailClosed", func(t *testing.T) {
		t.Parallel()
		l := &ledger{}
		r := post(t, payments(t, down, l), `"k"`, `{}`)
		if r.status != 503 || problemName(t, r) != "unavailable" {
			t.Errorf("got %d %s, want 503 unavailable", r.status, r.body)
		}
		if got := l.count(); got != 0 {
			t.Errorf("handler ran %d times, want 0", got)
		}
	})
	t.Run("FailOpen", func(t *testing.T) {
		t.Parallel()
		l := &ledger{}
		r := post(t, payments(t, down, l, idemclient.WithFailOpen()), `"k"`, `{"amount":3}`)
		if r.status != 201 || !bytes.Contains(r.body, []byte(`"request":{"amount":3}`)) {
			t.Errorf("got %d %s, want the handler's 201 with the request body", r.status, r.body)
		}
		if got := l.count(); got != 1 {
			t.Errorf("handler ran %d times, want 1", got)
		}
	})
	t.Run("StopsMidway", func(t *testing.T) {
		t.Parallel()
		srv, c := start(t)
		l := &ledger{}
		url := payments(t, c, l)
		if r := post(t, url, `"k"`, `{}`); r.status != 201 {
			t.Fatal(r.status)
		}
		srv.Stop()
		if r := post(t, url, `"k"`, `{}`); r.status != 503 {
			t.Errorf("after idemsvc stopped: %d %s, want 503", r.status, r.body)
		}
		if _, err := c.Get(context.Background(), "k"); !errors.Is(err, idemclient.ErrUnavailable) {
			t.Errorf("Get after stop = %v, want ErrUnavailable", err)
		}
	})
}

// TestMiddlewareConcurrentRetries: many identical requests at once run the handler once.
func TestMiddlewareConcurrentRetries(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	l := &ledger{delay: 100 * time.Millisecond}
	url := payments(t, c, l, idemclient.WithWait(10*time.Second))
	var wg sync.WaitGroup
	var ok atomic.Int32
	for range 16 {
		wg.Go(func() {
			if r := post(t, url, `"burst"`, `{"amount":1}`); r.status == 201 {
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	if got := ok.Load(); got != 16 {
		t.Errorf("%d of 16 requests got 201", got)
	}
	if got := l.count(); got != 1 {
		t.Errorf("ledger has %d charges, want 1", got)
	}
}
