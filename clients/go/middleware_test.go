package idemclient

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// chargeApp is a handler that counts its runs and answers with the run number, a cookie and a
// JSON body echoing the request.
type chargeApp struct {
	runs   atomic.Int32
	delay  time.Duration
	status int
}

func (a *chargeApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := a.runs.Add(1)
	body, _ := io.ReadAll(r.Body)
	if a.delay > 0 {
		time.Sleep(a.delay)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Run", fmt.Sprint(n))
	w.Header().Add("X-Multi", "a")
	w.Header().Add("X-Multi", "b")
	http.SetCookie(w, &http.Cookie{Name: "session", Value: fmt.Sprint("s", n)})
	status := a.status
	if status == 0 {
		status = http.StatusCreated
	}
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"run":%d,"request":%s}`, n, body)
}

type harness struct {
	fake *fakeSvc
	app  *chargeApp
	srv  *httptest.Server
}

func newHarness(t *testing.T, app *chargeApp, opts ...MiddlewareOption) *harness {
	t.Helper()
	f, idem := newFake(t)
	c := newTestClient(t, idem.URL)
	srv := httptest.NewServer(Middleware(c, opts...)(app))
	t.Cleanup(srv.Close)
	return &harness{fake: f, app: app, srv: srv}
}

type answer struct {
	status int
	header http.Header
	body   []byte
}

func send(t *testing.T, method, url, key, body string) answer {
	t.Helper()
	return sendWith(t, method, url, key, body, nil)
}

// sendWith is send with extra request headers.
func sendWith(t *testing.T, method, url, key, body string, hdr map[string]string) answer {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set(KeyHeader, key)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return answer{resp.StatusCode, resp.Header, b}
}

func problemType(t *testing.T, a answer) string {
	t.Helper()
	if ct := a.header.Get("Content-Type"); ct != "application/problem+json" {
		t.Errorf("Content-Type = %q, want application/problem+json", ct)
	}
	var p problem
	if err := json.Unmarshal(a.body, &p); err != nil {
		t.Fatalf("problem body %q: %v", a.body, err)
	}
	if p.Status != a.status {
		t.Errorf("problem status %d, response status %d", p.Status, a.status)
	}
	return strings.TrimPrefix(p.Type, ProblemTypePrefix)
}

func TestMiddlewareReplays(t *testing.T) {
	t.Parallel()
	h := newHarness(t, &chargeApp{})
	url := h.srv.URL + "/charges"
	first := send(t, "POST", url, `"k-1"`, `{"amount":100,"currency":"eur"}`)
	if first.status != 201 || first.header.Get(ReplayedHeader) != "" || first.header.Get("Set-Cookie") == "" {
		t.Fatalf("first = %d %v %s", first.status, first.header, first.body)
	}
	// The same key, the JSON reordered and unquoted: the same request.
	second := send(t, "POST", url, `k-1`, `{ "currency": "eur", "amount": 100 }`)
	if second.status != 201 || second.header.Get(ReplayedHeader) != "true" {
		t.Fatalf("second = %d %v %s; want the replay", second.status, second.header, second.body)
	}
	if !bytes.Equal(second.body, first.body) {
		t.Errorf("replayed body %q, want %q", second.body, first.body)
	}
	for _, name := range []string{"Content-Type", "X-Run", "X-Multi"} {
		if got, want := second.header.Values(name), first.header.Values(name); strings.Join(got, "|") != strings.Join(want, "|") {
			t.Errorf("replayed %s = %q, want %q", name, got, want)
		}
	}
	if got := second.header.Get("Set-Cookie"); got != "" {
		t.Errorf("replay carries Set-Cookie %q; credential headers must never be stored", got)
	}
	if got := h.app.runs.Load(); got != 1 {
		t.Errorf("handler ran %d times, want 1", got)
	}

	changed := send(t, "POST", url, `"k-1"`, `{"amount":999,"currency":"eur"}`)
	if changed.status != 422 || problemType(t, changed) != "fingerprint-mismatch" {
		t.Errorf("changed body = %d %s, want 422 fingerprint-mismatch", changed.status, changed.body)
	}
	// The same key on another route is another key.
	other := send(t, "POST", h.srv.URL+"/refunds", `"k-1"`, `{"amount":100,"currency":"eur"}`)
	if other.status != 201 || other.header.Get(ReplayedHeader) != "" {
		t.Errorf("same key on another route = %d %v, want a fresh run", other.status, other.header)
	}
	if got := h.app.runs.Load(); got != 2 {
		t.Errorf("handler ran %d times, want 2", got)
	}
}

func TestMiddlewarePassesThrough(t *testing.T) {
	t.Parallel()
	h := newHarness(t, &chargeApp{})
	for _, a := range []answer{
		send(t, "GET", h.srv.URL+"/charges", `"k"`, ""), // not a protected method
		send(t, "GET", h.srv.URL+"/charges", `"k"`, ""),
		send(t, "POST", h.srv.URL+"/charges", "", `{}`), // no key, not required
		send(t, "POST", h.srv.URL+"/charges", "", `{}`),
	} {
		if a.status != 201 || a.header.Get(ReplayedHeader) != "" {
			t.Errorf("got %d %v, want the handler's own answer", a.status, a.header)
		}
	}
	if got := h.app.runs.Load(); got != 4 {
		t.Errorf("handler ran %d times, want 4", got)
	}
	if got := h.fake.count("begin"); got != 0 {
		t.Errorf("%d begins, want 0", got)
	}
}

func TestMiddlewareKeyErrors(t *testing.T) {
	t.Parallel()
	h := newHarness(t, &chargeApp{}, WithRequireKey(), WithMaxRequestBody(16))
	if a := send(t, "POST", h.srv.URL+"/charges", "", `{}`); a.status != 400 || problemType(t, a) != "missing-key" {
		t.Errorf("missing key = %d %s, want 400 missing-key", a.status, a.body)
	}
	if a := send(t, "POST", h.srv.URL+"/charges", `"unterminated`, `{}`); a.status != 400 || problemType(t, a) != "invalid-key" {
		t.Errorf("malformed key = %d %s, want 400 invalid-key", a.status, a.body)
	}
	if a := send(t, "POST", h.srv.URL+"/charges", `"k"`, strings.Repeat("x", 17)); a.status != 413 || problemType(t, a) != "payload-too-large" {
		t.Errorf("large body = %d %s, want 413", a.status, a.body)
	}
	if got := h.app.runs.Load(); got != 0 {
		t.Errorf("handler ran %d times, want 0", got)
	}
}

func TestMiddlewareInProgress(t *testing.T) {
	t.Parallel()
	h := newHarness(t, &chargeApp{delay: 300 * time.Millisecond}, WithLease(5*time.Second))
	url := h.srv.URL + "/charges"
	var first answer
	var wg sync.WaitGroup
	wg.Go(func() { first = send(t, "POST", url, `"k"`, `{}`) })
	time.Sleep(100 * time.Millisecond)
	a := send(t, "POST", url, `"k"`, `{}`)
	if a.status != 409 || problemType(t, a) != "in-progress" {
		t.Errorf("concurrent request = %d %s, want 409 in-progress", a.status, a.body)
	}
	if ra := a.header.Get("Retry-After"); ra != "1" {
		t.Errorf("Retry-After = %q, want 1", ra)
	}
	wg.Wait()
	if first.status != 201 {
		t.Errorf("first = %d", first.status)
	}
}

// TestMiddlewareLateBeginTakenOver: a begin whose answer came after its lease ran out, the key
// taken over meanwhile by another request, does not run the handler, and answers 409
// in-progress (the other request holds the key), not a 500.
func TestMiddlewareLateBeginTakenOver(t *testing.T) {
	t.Parallel()
	const lease = 300 * time.Millisecond
	_, c := lateBegin(t, lease)
	app := &chargeApp{}
	srv := httptest.NewServer(Middleware(c, WithLease(lease))(app))
	t.Cleanup(srv.Close)
	url := srv.URL + "/charges"
	var first answer
	var wg sync.WaitGroup
	wg.Go(func() { first = send(t, "POST", url, `"k"`, `{}`) })
	time.Sleep(3 * lease / 2) // the first lease has run out; its begin's answer is on the way
	if a := send(t, "POST", url, `"k"`, `{}`); a.status != 201 {
		t.Fatalf("the second request = %d %s, want 201", a.status, a.body)
	}
	wg.Wait()
	if first.status != 409 || problemType(t, first) != "in-progress" {
		t.Errorf("the late request = %d %s, want 409 in-progress", first.status, first.body)
	}
	if n := app.runs.Load(); n != 1 {
		t.Errorf("the handler ran %d times, want once", n)
	}
}

func TestMiddlewareWaits(t *testing.T) {
	t.Parallel()
	h := newHarness(t, &chargeApp{delay: 200 * time.Millisecond}, WithWait(5*time.Second))
	url := h.srv.URL + "/charges"
	answers := make([]answer, 8)
	var wg sync.WaitGroup
	for i := range answers {
		wg.Go(func() { answers[i] = send(t, "POST", url, `"k"`, `{"a":1}`) })
	}
	wg.Wait()
	for i, a := range answers {
		if a.status != 201 || !bytes.Equal(a.body, answers[0].body) {
			t.Errorf("answer %d = %d %s, want 201 %s", i, a.status, a.body, answers[0].body)
		}
	}
	if got := h.app.runs.Load(); got != 1 {
		t.Errorf("handler ran %d times, want 1", got)
	}
}

func TestMiddlewareReleasesOn5xx(t *testing.T) {
	t.Parallel()
	app := &chargeApp{status: 503}
	h := newHarness(t, app)
	url := h.srv.URL + "/charges"
	if a := send(t, "POST", url, `"k"`, `{}`); a.status != 503 || !strings.Contains(string(a.body), `"run":1`) {
		t.Fatalf("first = %d %s, want the handler's 503", a.status, a.body)
	}
	app.status = 201
	if a := send(t, "POST", url, `"k"`, `{}`); a.status != 201 || a.header.Get(ReplayedHeader) != "" {
		t.Fatalf("retry = %d %v, want a fresh run", a.status, a.header)
	}
	if got := app.runs.Load(); got != 2 {
		t.Errorf("handler ran %d times, want 2", got)
	}
	// 4xx is stored.
	app.status = 402
	if a := send(t, "POST", url, `"k2"`, `{}`); a.status != 402 {
		t.Fatal(a.status)
	}
	if a := send(t, "POST", url, `"k2"`, `{}`); a.status != 402 || a.header.Get(ReplayedHeader) != "true" {
		t.Fatalf("retry of a 402 = %d %v, want the replay", a.status, a.header)
	}
}

func TestMiddlewareLargeResponsePassesThrough(t *testing.T) {
	t.Parallel()
	var runs atomic.Int32
	big := strings.Repeat("x", 100)
	f, idem := newFake(t)
	c := newTestClient(t, idem.URL)
	srv := httptest.NewServer(Middleware(c, WithMaxResponseBody(64))(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		runs.Add(1)
		w.Header().Set("X-A", "1")
		io.WriteString(w, big[:50])
		io.WriteString(w, big[50:])
	})))
	defer srv.Close()
	for range 2 {
		a := send(t, "POST", srv.URL, `"k"`, "")
		if a.status != 200 || string(a.body) != big || a.header.Get("X-A") != "1" || a.header.Get(ReplayedHeader) != "" {
			t.Errorf("got %d %v %q, want the whole response, live", a.status, a.header, a.body)
		}
	}
	if got := runs.Load(); got != 2 {
		t.Errorf("handler ran %d times, want 2: an unstorable response is not protected", got)
	}
	if got := f.count("release"); got != 2 {
		t.Errorf("%d releases, want 2", got)
	}
}

func TestMiddlewareUnavailable(t *testing.T) {
	t.Parallel()
	down, err := New("http://"+closedAddr(t), WithRetry(RetryPolicy{MaxAttempts: 2, BaseDelay: time.Millisecond}))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		opts     []MiddlewareOption
		want     int
		wantRuns int32
	}{
		{"FailClosed", nil, 503, 0},
		{"FailOpen", []MiddlewareOption{WithFailOpen()}, 201, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			app := &chargeApp{}
			srv := httptest.NewServer(Middleware(down, tc.opts...)(app))
			defer srv.Close()
			a := send(t, "POST", srv.URL, `"k"`, `{"amount":1}`)
			if a.status != tc.want {
				t.Errorf("status = %d %s, want %d", a.status, a.body, tc.want)
			}
			if tc.want == 503 && problemType(t, a) != "unavailable" {
				t.Errorf("problem = %s", a.body)
			}
			if tc.want == 201 && !strings.Contains(string(a.body), `"request":{"amount":1}`) {
				t.Errorf("body = %s, want the handler to see the request body", a.body)
			}
			if got := app.runs.Load(); got != tc.wantRuns {
				t.Errorf("handler ran %d times, want %d", got, tc.wantRuns)
			}
		})
	}
}

func TestMiddlewareScopeAndMethods(t *testing.T) {
	t.Parallel()
	app := &chargeApp{}
	h := newHarness(t, app, WithMethods("PUT"), WithScope(func(r *http.Request) string { return "charges" }))
	if a := send(t, "PUT", h.srv.URL+"/charges/1", `"k"`, `{}`); a.status != 201 {
		t.Fatal(a.status)
	}
	// The scope ignores the path, the fingerprint does not: the same key for /charges/2 is a
	// different request under the same key.
	if a := send(t, "PUT", h.srv.URL+"/charges/2", `"k"`, `{}`); a.status != 422 {
		t.Errorf("same scope, other path = %d, want 422", a.status)
	}
	if a := send(t, "POST", h.srv.URL+"/charges/1", `"k"`, `{}`); a.status != 201 || a.header.Get(ReplayedHeader) != "" {
		t.Errorf("POST is not protected now: got %d %v", a.status, a.header)
	}
	if h.fake.record(ScopedKey("PUT", "charges", "k")) == nil {
		t.Errorf("no record under %q", ScopedKey("PUT", "charges", "k"))
	}
}

func TestMiddlewareEmptyAndSniffedResponses(t *testing.T) {
	t.Parallel()
	_, idem := newFake(t)
	c := newTestClient(t, idem.URL)
	srv := httptest.NewServer(Middleware(c)(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/html" {
			io.WriteString(w, "<html><body>hi</body></html>")
		}
		// /empty writes nothing: an implicit 200 with no body.
	})))
	defer srv.Close()
	for _, path := range []string{"/html", "/empty"} {
		first := send(t, "POST", srv.URL+path, `"k"`, "")
		second := send(t, "POST", srv.URL+path, `"k"`, "")
		if first.status != 200 || second.status != 200 || second.header.Get(ReplayedHeader) != "true" {
			t.Errorf("%s: statuses %d, %d (replayed %q)", path, first.status, second.status, second.header.Get(ReplayedHeader))
		}
		if !bytes.Equal(first.body, second.body) || first.header.Get("Content-Type") != second.header.Get("Content-Type") {
			t.Errorf("%s: first %q %q, replay %q %q", path, first.header.Get("Content-Type"), first.body, second.header.Get("Content-Type"), second.body)
		}
	}
}

// TestMiddlewareKeyScopeAgainstIdemsvc pins what the same Idempotency-Key does on the real
// idemsvc, as the Middleware docs and the README table say: with the same method and scope a
// different path, query or body is 422; another method or another scope is another record, and
// the handler runs for it.
func TestMiddlewareKeyScopeAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	c := newTestClient(t, startIdemsvc(t))
	type request struct {
		method, path, body string
		want               int
		replay             bool
	}
	for _, tc := range []struct {
		name string
		opts []MiddlewareOption
		reqs []request
		runs int32
	}{
		{"DefaultScope", nil, []request{
			{"POST", "/charges", `{"amount":1}`, 201, false},
			{"POST", "/charges?expand=1", `{"amount":1}`, 422, false}, // same method and scope, another query
			{"POST", "/charges", `{"amount":2}`, 422, false},          // another body
			{"PATCH", "/charges", `{"amount":1}`, 201, false},         // another method: another record
			{"POST", "/refunds", `{"amount":1}`, 201, false},          // another scope (path): another record
			{"POST", "/charges", `{"amount":1}`, 201, true},           // the same request: the replay
			{"PATCH", "/charges", `{"amount":2}`, 422, false},         // the PATCH record has its own request
		}, 3},
		{"CustomScope", []MiddlewareOption{WithScope(func(*http.Request) string { return "charges" })}, []request{
			{"POST", "/charges/1", `{}`, 201, false},
			{"POST", "/charges/2", `{}`, 422, false}, // same scope, another path
			{"PATCH", "/charges/2", `{}`, 201, false},
		}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			app := &chargeApp{}
			srv := httptest.NewServer(Middleware(c, tc.opts...)(app))
			defer srv.Close()
			key := `"scope-` + tc.name + `"`
			for i, r := range tc.reqs {
				a := send(t, r.method, srv.URL+r.path, key, r.body)
				if a.status != r.want || (a.header.Get(ReplayedHeader) == "true") != r.replay {
					t.Errorf("request %d, %s %s %s = %d (replayed %q) %s; want %d, replayed %v",
						i+1, r.method, r.path, r.body, a.status, a.header.Get(ReplayedHeader), a.body, r.want, r.replay)
				}
				if a.status == 422 && problemType(t, a) != "fingerprint-mismatch" {
					t.Errorf("request %d: problem %s, want fingerprint-mismatch", i+1, a.body)
				}
			}
			if got := app.runs.Load(); got != tc.runs {
				t.Errorf("handler ran %d times, want %d", got, tc.runs)
			}
		})
	}
}

// sendAs posts as a caller (its headers).
func sendAs(t *testing.T, url, key, body string, hdr map[string]string) answer {
	t.Helper()
	return sendWith(t, "POST", url, key, body, hdr)
}

// TestMiddlewareCallers: two callers who send the same Idempotency-Key never get each other's
// response. Without WithCaller their credentials keep them apart (the second gets 422); with it,
// each has its own record, and a caller's retry with a refreshed token is still a replay. A
// client audit found Bob replayed Alice's charge (her customer data) when both sent the same key
// and body.
func TestMiddlewareCallers(t *testing.T) {
	t.Parallel()
	alice := map[string]string{"Authorization": "Bearer alice-token-1", "X-User": "alice"}
	bob := map[string]string{"Authorization": "Bearer bob-token-1", "X-User": "bob"}
	aliceRefreshed := map[string]string{"Authorization": "Bearer alice-token-2", "X-User": "alice"}

	t.Run("Default", func(t *testing.T) {
		t.Parallel()
		app := &chargeApp{}
		h := newHarness(t, app)
		if a := sendAs(t, h.srv.URL+"/charges", `"k"`, `{"amount":1}`, alice); a.status != 201 {
			t.Fatalf("alice: %d %s", a.status, a.body)
		}
		a := sendAs(t, h.srv.URL+"/charges", `"k"`, `{"amount":1}`, bob)
		if a.status != 422 || problemType(t, a) != "fingerprint-mismatch" || strings.Contains(string(a.body), "run") {
			t.Errorf("bob with alice's key: %d %s, want 422 fingerprint-mismatch", a.status, a.body)
		}
		if a := sendAs(t, h.srv.URL+"/charges", `"k"`, `{"amount":1}`, alice); a.status != 201 || a.header.Get(ReplayedHeader) != "true" {
			t.Errorf("alice's retry: %d %v, want her replay", a.status, a.header)
		}
		if n := app.runs.Load(); n != 1 {
			t.Errorf("handler ran %d times, want 1", n)
		}
	})
	t.Run("WithCaller", func(t *testing.T) {
		t.Parallel()
		app := &chargeApp{}
		h := newHarness(t, app, WithCaller(func(r *http.Request) string { return r.Header.Get("X-User") }))
		first := sendAs(t, h.srv.URL+"/charges", `"k"`, `{"amount":1}`, alice)
		other := sendAs(t, h.srv.URL+"/charges", `"k"`, `{"amount":1}`, bob)
		if first.status != 201 || other.status != 201 || other.header.Get(ReplayedHeader) != "" || string(other.body) == string(first.body) {
			t.Errorf("alice %d %s, bob %d %s: want each their own run", first.status, first.body, other.status, other.body)
		}
		retry := sendAs(t, h.srv.URL+"/charges", `"k"`, `{"amount":1}`, aliceRefreshed)
		if retry.status != 201 || retry.header.Get(ReplayedHeader) != "true" || string(retry.body) != string(first.body) {
			t.Errorf("alice's retry with a refreshed token: %d %s, want her replay", retry.status, retry.body)
		}
		if n := app.runs.Load(); n != 2 {
			t.Errorf("handler ran %d times, want 2 (one per caller)", n)
		}
	})
}
