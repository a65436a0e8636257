package idemclient

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestNew(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, url string
		ok        bool
	}{
		{"HTTP", "http://127.0.0.1:8080", true},
		{"HTTPSWithPrefix", "https://example.com/idem/", true},
		{"NoScheme", "127.0.0.1:8080", false},
		{"OtherScheme", "ftp://example.com", false},
		{"NoHost", "http://", false},
		{"Query", "http://example.com?a=1", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.url)
			if got, want := err == nil, tc.ok; got != want {
				t.Errorf("New(%q) error = %v, want ok %v", tc.url, err, want)
			}
		})
	}
}

// TestNewRefusesUnsendableHeaders: a token or User-Agent that net/http would not send is
// refused by New. Sent anyway, every call failed before reaching idemsvc and was reported as
// ErrUnavailable after the retries, and the middleware answered 503 (or, with WithFailOpen,
// ran the handler unprotected) for what is a mistake in the configuration.
func TestNewRefusesUnsendableHeaders(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opt  Option
		ok   bool
	}{
		{"Token", WithToken("shop-token-0123456789"), true},
		{"TokenEndsInNewline", WithToken("shop-token-0123456789\n"), false},
		{"TokenCRLF", WithToken("tok\r\nX-Injected: 1"), false},
		{"TokenWithSpace", WithToken("tok en"), false},
		{"TokenWithTab", WithToken("tok\ten"), false},
		{"TokenDEL", WithToken("tok\x7f"), false},
		{"NoToken", WithToken(""), true},
		{"UserAgentWithSpaces", WithUserAgent("shop/1.2 (linux)"), true},
		{"UserAgentWithNewline", WithUserAgent("shop/1.2\n"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New("http://127.0.0.1:8080", tc.opt)
			if got := err == nil; got != tc.ok {
				t.Errorf("New error = %v, want ok %v", err, tc.ok)
			}
		})
	}
	// What New refuses, net/http refuses to send: the check is not stricter than it for the
	// User-Agent (every value New accepts is sent).
	for b := range 256 {
		ua := "ua" + string(rune(b))[:1]
		if b >= 0x80 {
			ua = "ua" + string([]byte{byte(b)})
		}
		_, newErr := New("http://127.0.0.1:8080", WithUserAgent(ua))
		req, _ := http.NewRequest("GET", "http://127.0.0.1:1/", nil)
		req.Header.Set("User-Agent", ua)
		_, sendErr := http.DefaultTransport.RoundTrip(req)
		refused := sendErr != nil && strings.Contains(sendErr.Error(), "invalid header field value")
		if (newErr != nil) != refused {
			t.Errorf("byte %#x: New error %v, net/http's %v", b, newErr, sendErr)
		}
	}
}

func TestValidKey(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		key  string
		want bool
	}{
		{"a", true}, {"a/b", true}, {"~!%?#", true}, {strings.Repeat("k", 255), true},
		{"", false}, {".", false}, {"..", false}, {"...", true}, {"a b", false}, {"é", false},
		{strings.Repeat("k", 256), false}, {"a\x7f", false},
	} {
		if got := ValidKey(tc.key); got != tc.want {
			t.Errorf("ValidKey(%q) = %v, want %v", tc.key, got, tc.want)
		}
	}
}

// TestRequestShape checks what goes on the wire: the escaped key as one path segment, the
// bearer token, JSON bodies with durations in whole milliseconds.
func TestRequestShape(t *testing.T) {
	t.Parallel()
	type seen struct {
		method, rawPath, auth, ctype string
		body                         map[string]any
	}
	got := make(chan seen, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s := seen{method: r.Method, rawPath: r.URL.EscapedPath(), auth: r.Header.Get("Authorization"), ctype: r.Header.Get("Content-Type")}
		if b, _ := io.ReadAll(r.Body); len(b) > 0 {
			_ = json.Unmarshal(b, &s.body)
		}
		got <- s
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(201)
		_, _ = io.WriteString(w, `{"key":"k","state":"in_progress","fingerprint":"fp","lease":{"token":"t","fence":7,"expires_at":"2030-01-01T00:00:00.5Z"},"created_at":"2030-01-01T00:00:00Z","expires_at":"2030-01-02T00:00:00Z"}`)
	}))
	defer srv.Close()
	c := newTestClient(t, srv.URL+"/prefix/", WithToken("s3cret"))

	res, err := c.Begin(context.Background(), "orders/42 ?#%", BeginOptions{Fingerprint: "fp", Lease: 1500 * time.Microsecond, TTL: time.Hour, Wait: 2 * time.Second})
	if err == nil {
		t.Fatal("Begin with a space in the key: want ErrInvalidKey, got nil")
	}
	if !errors.Is(err, ErrInvalidKey) {
		t.Fatalf("Begin: got %v, want ErrInvalidKey", err)
	}

	res, err = c.Begin(context.Background(), "orders/42?#%", BeginOptions{Fingerprint: "fp", Lease: 1500 * time.Microsecond, TTL: time.Hour, Wait: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s := <-got
	if want := "/prefix/v1/keys/orders%2F42%3F%23%25/begin"; s.rawPath != want {
		t.Errorf("path = %q, want %q", s.rawPath, want)
	}
	if s.method != "POST" || s.auth != "Bearer s3cret" || s.ctype != "application/json" {
		t.Errorf("method, auth, content type = %q, %q, %q", s.method, s.auth, s.ctype)
	}
	wantBody := map[string]any{"fingerprint": "fp", "lease_ms": 2.0, "ttl_ms": 3600000.0, "wait_ms": 2000.0}
	if len(s.body) != len(wantBody) {
		t.Errorf("body = %v, want %v", s.body, wantBody)
	}
	for k, v := range wantBody {
		if s.body[k] != v {
			t.Errorf("body[%s] = %v, want %v", k, s.body[k], v)
		}
	}
	if !res.Acquired || res.Replayed || res.Lease.Token != "t" || res.Lease.Fence != 7 {
		t.Errorf("result = %+v, lease %+v", res, res.Lease)
	}
	if want := time.Date(2030, 1, 1, 0, 0, 0, 5e8, time.UTC); !res.Lease.ExpiresAt.Equal(want) {
		t.Errorf("lease expires at %v, want %v", res.Lease.ExpiresAt, want)
	}

	// Absent options are absent fields: an empty object.
	if _, err := c.Begin(context.Background(), "k", BeginOptions{}); err != nil {
		t.Fatal(err)
	}
	if s := <-got; len(s.body) != 0 {
		t.Errorf("begin with no options sent %v, want {}", s.body)
	}
}

func TestErrorDecoding(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		status      int
		ctype, body string
		header      map[string]string
		want        error
		wantType    string
		retryAfter  time.Duration
	}{
		{"InProgress", 409, "application/problem+json", `{"type":"urn:idemsvc:problem:in-progress","title":"In progress","status":409,"detail":"held"}`,
			map[string]string{"Retry-After": "3", "X-Request-Id": "r1"}, ErrInProgress, "in-progress", 3 * time.Second},
		{"FingerprintMismatch", 422, "application/problem+json", `{"type":"urn:idemsvc:problem:fingerprint-mismatch","status":422}`, nil, ErrFingerprintMismatch, "fingerprint-mismatch", 0},
		{"LeaseLost", 409, "application/problem+json", `{"type":"urn:idemsvc:problem:lease-lost","status":409}`, nil, ErrLeaseLost, "lease-lost", 0},
		{"AlreadyCompleted", 409, "application/problem+json", `{"type":"urn:idemsvc:problem:already-completed","status":409}`, nil, ErrAlreadyCompleted, "already-completed", 0},
		{"NotFound", 404, "application/problem+json", `{"type":"urn:idemsvc:problem:not-found","status":404}`, nil, ErrNotFound, "not-found", 0},
		{"Unauthorized", 401, "application/problem+json", `{"type":"urn:idemsvc:problem:unauthorized","status":401}`, nil, ErrUnauthorized, "unauthorized", 0},
		{"InvalidKey", 400, "application/problem+json", `{"type":"urn:idemsvc:problem:invalid-key","status":400}`, nil, ErrInvalidKey, "invalid-key", 0},
		{"InvalidRequest", 400, "application/problem+json; charset=utf-8", `{"type":"urn:idemsvc:problem:invalid-request","status":400}`, nil, ErrInvalidRequest, "invalid-request", 0},
		{"InvalidResponse", 422, "application/problem+json", `{"type":"urn:idemsvc:problem:invalid-response","status":422}`, nil, ErrInvalidResponse, "invalid-response", 0},
		{"PayloadTooLarge", 413, "application/problem+json", `{"type":"urn:idemsvc:problem:payload-too-large","status":413}`, nil, ErrPayloadTooLarge, "payload-too-large", 0},
		{"Unavailable", 503, "application/problem+json", `{"type":"urn:idemsvc:problem:unavailable","status":503}`, nil, ErrUnavailable, "unavailable", 0},
		{"Internal", 500, "application/problem+json", `{"type":"urn:idemsvc:problem:internal","status":500}`, nil, ErrInternal, "internal", 0},
		{"ProxyBadGateway", 502, "text/html", `<html>bad gateway</html>`, nil, ErrUnavailable, "", 0},
		{"ProxyInternal", 500, "text/html", `<html>oops</html>`, nil, ErrInternal, "", 0},
		{"TooManyRequests", 429, "text/plain", `slow down`, nil, ErrUnavailable, "", 0},
		{"ProxyNotFoundIsNotErrNotFound", 404, "text/plain", `404 page not found`, nil, nil, "", 0},
		{"HTTPDateRetryAfter", 409, "application/problem+json", `{"type":"urn:idemsvc:problem:in-progress","status":409}`,
			map[string]string{"Retry-After": "in 90s"}, ErrInProgress, "in-progress", 90 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				for k, v := range tc.header {
					if v == "in 90s" { // an HTTP date, made when the request arrives
						v = time.Now().Add(90 * time.Second).UTC().Format(http.TimeFormat)
					}
					w.Header().Set(k, v)
				}
				w.Header().Set("Content-Type", tc.ctype)
				w.WriteHeader(tc.status)
				_, _ = io.WriteString(w, tc.body)
			}))
			defer srv.Close()
			c := newTestClient(t, srv.URL, WithRetry(RetryPolicy{MaxAttempts: 1}))
			_, err := c.Get(context.Background(), "k")
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("Get: got %v (%T), want *Error", err, err)
			}
			if e.Status != tc.status || e.Type != tc.wantType {
				t.Errorf("status, type = %d, %q, want %d, %q", e.Status, e.Type, tc.status, tc.wantType)
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("errors.Is(%v, %v) = false", err, tc.want)
			}
			for _, s := range problemSentinels {
				if s != tc.want && errors.Is(err, s) {
					t.Errorf("errors.Is(%v, %v) = true, want false", err, s)
				}
			}
			if d := e.RetryAfter - tc.retryAfter; d > 0 || d < -3*time.Second || (tc.retryAfter == 0 && d != 0) {
				t.Errorf("RetryAfter = %v, want about %v", e.RetryAfter, tc.retryAfter)
			}
			if rid := tc.header["X-Request-Id"]; rid != "" && e.RequestID != rid {
				t.Errorf("RequestID = %q, want %q", e.RequestID, rid)
			}
			if e.Error() == "" {
				t.Error("empty Error()")
			}
		})
	}
}

// scripted answers the statuses of script in turn (the last one for ever after) and counts
// the requests.
func scripted(t *testing.T, script ...func(w http.ResponseWriter)) (*httptest.Server, *atomic.Int32) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := int(n.Add(1)) - 1
		script[min(i, len(script)-1)](w)
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

func problemAnswer(status int, name string, header ...string) func(w http.ResponseWriter) {
	return func(w http.ResponseWriter) {
		for i := 0; i+1 < len(header); i += 2 {
			w.Header().Set(header[i], header[i+1])
		}
		w.Header().Set("Content-Type", "application/problem+json")
		w.WriteHeader(status)
		_, _ = io.WriteString(w, `{"type":"urn:idemsvc:problem:`+name+`","status":0}`)
	}
}

func noContent(w http.ResponseWriter) { w.WriteHeader(204) }

func TestRetry(t *testing.T) {
	t.Parallel()
	fast := RetryPolicy{MaxAttempts: 4, BaseDelay: time.Millisecond, MaxDelay: 2 * time.Millisecond}

	t.Run("UnavailableThenOK", func(t *testing.T) {
		t.Parallel()
		srv, n := scripted(t, problemAnswer(503, "unavailable"), problemAnswer(502, "x"), noContent)
		c := newTestClient(t, srv.URL, WithRetry(fast))
		if err := c.Delete(context.Background(), "k"); err != nil {
			t.Fatal(err)
		}
		if got, want := n.Load(), int32(3); got != want {
			t.Errorf("attempts = %d, want %d", got, want)
		}
	})
	t.Run("GivesUpAfterMaxAttempts", func(t *testing.T) {
		t.Parallel()
		srv, n := scripted(t, problemAnswer(504, "x"))
		c := newTestClient(t, srv.URL, WithRetry(fast))
		err := c.Delete(context.Background(), "k")
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("got %v, want ErrUnavailable", err)
		}
		if got, want := n.Load(), int32(4); got != want {
			t.Errorf("attempts = %d, want %d", got, want)
		}
	})
	t.Run("CompleteRetriedOnInternal", func(t *testing.T) {
		t.Parallel()
		html500 := func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(500)
			_, _ = io.WriteString(w, "<html>oops</html>")
		}
		ok := func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"key":"k","state":"completed","fingerprint":"","response":{"status":200,"headers":{},"body":""},"created_at":"2026-11-27T00:00:00Z","completed_at":"2026-11-27T00:00:00Z","expires_at":"2026-11-28T00:00:00Z"}`)
		}
		srv, n := scripted(t, html500, problemAnswer(500, "internal"), ok)
		c := newTestClient(t, srv.URL, WithRetry(fast))
		if _, err := c.Complete(context.Background(), "k", CompleteRequest{Token: "tok", Response: Response{Status: 200}}); err != nil {
			t.Fatalf("complete after two 500s: %v", err)
		}
		if got := n.Load(); got != 3 {
			t.Errorf("attempts = %d, want 3", got)
		}
	})
	t.Run("NoRetryOfFinal4xx", func(t *testing.T) {
		t.Parallel()
		for _, name := range []string{"fingerprint-mismatch", "lease-lost", "invalid-request", "in-progress", "not-found", "internal"} {
			status := map[string]int{"fingerprint-mismatch": 422, "invalid-request": 400, "not-found": 404, "internal": 500}[name]
			if status == 0 {
				status = 409
			}
			srv, n := scripted(t, problemAnswer(status, name, "Retry-After", "1"))
			c := newTestClient(t, srv.URL, WithRetry(fast))
			if _, err := c.Begin(context.Background(), "k", BeginOptions{}); err == nil {
				t.Fatalf("%s: got nil error", name)
			}
			if got := n.Load(); got != 1 {
				t.Errorf("%s: attempts = %d, want 1", name, got)
			}
		}
	})
	t.Run("InProgressWhenAsked", func(t *testing.T) {
		t.Parallel()
		created := func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(201)
			_, _ = io.WriteString(w, `{"key":"k","state":"in_progress","fingerprint":"","lease":{"token":"t","fence":1,"expires_at":"2030-01-01T00:00:00Z"},"created_at":"2030-01-01T00:00:00Z","expires_at":"2030-01-01T00:00:00Z"}`)
		}
		srv, n := scripted(t, problemAnswer(409, "in-progress", "Retry-After", "1"), created)
		p := fast
		p.RetryInProgress = true
		c := newTestClient(t, srv.URL, WithRetry(p))
		start := time.Now()
		res, err := c.Begin(context.Background(), "k", BeginOptions{})
		if err != nil || !res.Acquired {
			t.Fatalf("Begin = %+v, %v; want acquired", res, err)
		}
		if got := n.Load(); got != 2 {
			t.Errorf("attempts = %d, want 2", got)
		}
		// Retry-After: 1 is honoured over the millisecond backoff.
		if elapsed := time.Since(start); elapsed < time.Second {
			t.Errorf("retried after %v, want at least the Retry-After of 1s", elapsed)
		}
	})
	t.Run("RetryAfterBeyondDeadlineGivesUpAtOnce", func(t *testing.T) {
		t.Parallel()
		srv, n := scripted(t, problemAnswer(503, "unavailable", "Retry-After", "30"))
		c := newTestClient(t, srv.URL, WithRetry(fast))
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		start := time.Now()
		err := c.Delete(ctx, "k")
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("got %v, want ErrUnavailable", err)
		}
		if elapsed := time.Since(start); elapsed > 500*time.Millisecond || n.Load() != 1 {
			t.Errorf("took %v and %d attempts, want an immediate give-up after 1", elapsed, n.Load())
		}
	})
	t.Run("TransportError", func(t *testing.T) {
		t.Parallel()
		addr := closedAddr(t)
		c := newTestClient(t, "http://"+addr, WithRetry(fast))
		err := c.Delete(context.Background(), "k")
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("got %v, want ErrUnavailable", err)
		}
		var opErr *net.OpError
		if !errors.As(err, &opErr) {
			t.Errorf("got %v, want it to wrap the *net.OpError", err)
		}
	})
	t.Run("DroppedConnectionThenOK", func(t *testing.T) {
		t.Parallel()
		srv, n := scripted(t, func(w http.ResponseWriter) { panic(http.ErrAbortHandler) }, noContent)
		c := newTestClient(t, srv.URL, WithRetry(fast))
		if err := c.Release(context.Background(), "k", "t"); err != nil {
			t.Fatal(err)
		}
		if got := n.Load(); got != 2 {
			t.Errorf("attempts = %d, want 2", got)
		}
	})
	t.Run("AttemptTimeout", func(t *testing.T) {
		t.Parallel()
		srv, n := scripted(t, func(w http.ResponseWriter) { time.Sleep(300 * time.Millisecond) }, noContent)
		p := fast
		p.AttemptTimeout = 50 * time.Millisecond
		c := newTestClient(t, srv.URL, WithRetry(p))
		if err := c.Delete(context.Background(), "k"); err != nil {
			t.Fatal(err)
		}
		if got := n.Load(); got != 2 {
			t.Errorf("attempts = %d, want 2", got)
		}
	})
	t.Run("CancelledWhileWaitingToRetry", func(t *testing.T) {
		t.Parallel()
		for _, header := range [][]string{{"Retry-After", "5"}, nil} {
			srv, n := scripted(t, problemAnswer(503, "unavailable", header...))
			p := fast
			p.BaseDelay, p.MaxDelay = time.Hour, time.Hour // the backoff waits long too (full jitter: below 100ms once in 36,000)
			c := newTestClient(t, srv.URL, WithRetry(p))
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(100*time.Millisecond, cancel)
			start := time.Now()
			err := c.Delete(ctx, "k")
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Retry-After %q: got %v, want context.Canceled", header, err)
			}
			var e *Error
			if !errors.Is(err, ErrUnavailable) || !errors.As(err, &e) || e.Status != 503 {
				t.Errorf("Retry-After %q: got %v, want it to carry the last error, the 503", header, err)
			}
			if elapsed := time.Since(start); elapsed > 2*time.Second || n.Load() != 1 {
				t.Errorf("Retry-After %q: took %v and %d attempts, want a return at the cancel, after 1", header, elapsed, n.Load())
			}
		}
	})
	t.Run("RetryAfterCapped", func(t *testing.T) {
		t.Parallel()
		// A proxy asks for a day; the context has no deadline.
		srv, n := scripted(t, problemAnswer(503, "x", "Retry-After", "86400"), noContent)
		p := fast
		p.MaxRetryAfter = 200 * time.Millisecond
		c := newTestClient(t, srv.URL, WithRetry(p))
		done := make(chan error, 1)
		start := time.Now()
		go func() { done <- c.Delete(context.Background(), "k") }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("still waiting after 10s: the Retry-After of a day is not capped by MaxRetryAfter")
		}
		if elapsed := time.Since(start); elapsed < p.MaxRetryAfter {
			t.Errorf("retried after %v, want MaxRetryAfter, %v", elapsed, p.MaxRetryAfter)
		}
		if got := n.Load(); got != 2 {
			t.Errorf("attempts = %d, want 2", got)
		}
	})
	t.Run("CancelledContextIsNotUnavailable", func(t *testing.T) {
		t.Parallel()
		srv, _ := scripted(t, func(w http.ResponseWriter) { time.Sleep(time.Second) })
		c := newTestClient(t, srv.URL, WithRetry(fast))
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		err := c.Delete(ctx, "k")
		if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrUnavailable) {
			t.Fatalf("got %v, want context.DeadlineExceeded and not ErrUnavailable", err)
		}
	})
}

func TestBackoff(t *testing.T) {
	t.Parallel()
	p := RetryPolicy{BaseDelay: 100 * time.Millisecond, MaxDelay: time.Second}.withDefaults()
	for attempt, ceiling := range map[int]time.Duration{1: 100 * time.Millisecond, 2: 200 * time.Millisecond, 3: 400 * time.Millisecond, 5: time.Second, 40: time.Second} {
		var maxSeen time.Duration
		for range 2000 {
			d := p.backoff(attempt)
			if d < 0 || d > ceiling {
				t.Fatalf("backoff(%d) = %v, outside [0, %v]", attempt, d, ceiling)
			}
			maxSeen = max(maxSeen, d)
		}
		if maxSeen < ceiling/2 {
			t.Errorf("backoff(%d) never above %v in 2000 draws; want full jitter up to %v", attempt, maxSeen, ceiling)
		}
	}
}

func TestRetryDelay(t *testing.T) {
	t.Parallel()
	if got, want := DefaultRetryPolicy().MaxRetryAfter, 30*time.Second; got != want {
		t.Errorf("DefaultRetryPolicy().MaxRetryAfter = %v, want %v", got, want)
	}
	for _, tc := range []struct {
		name       string
		p          RetryPolicy
		retryAfter time.Duration
		want       time.Duration
	}{
		{"Default", RetryPolicy{}, 24 * time.Hour, 30 * time.Second},
		{"DefaultShort", RetryPolicy{}, 3 * time.Second, 3 * time.Second},
		{"Set", RetryPolicy{MaxRetryAfter: time.Minute}, 24 * time.Hour, time.Minute},
		{"LongerThanTheBackoff", RetryPolicy{MaxDelay: time.Millisecond}, 3 * time.Second, 3 * time.Second},
	} {
		p := tc.p.withDefaults()
		if got := p.delay(1, tc.retryAfter); got != tc.want {
			t.Errorf("%s: delay with Retry-After %v = %v, want %v", tc.name, tc.retryAfter, got, tc.want)
		}
	}
}

// closedAddr returns the address of a port that nothing listens on.
func closedAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestEndpointsAgainstFake(t *testing.T) {
	t.Parallel()
	_, srv := newFake(t)
	c := newTestClient(t, srv.URL)
	ctx := context.Background()
	const key = "a/b"

	if _, err := c.Get(ctx, key); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get of a new key: got %v, want ErrNotFound", err)
	}
	b, err := c.Begin(ctx, key, BeginOptions{Fingerprint: "fp", Lease: time.Minute})
	if err != nil || !b.Acquired {
		t.Fatalf("Begin = %+v, %v", b, err)
	}
	if _, err := c.Begin(ctx, key, BeginOptions{Fingerprint: "fp"}); !errors.Is(err, ErrInProgress) {
		t.Fatalf("second Begin: got %v, want ErrInProgress", err)
	}
	if _, err := c.Begin(ctx, key, BeginOptions{Fingerprint: "other"}); !errors.Is(err, ErrFingerprintMismatch) {
		t.Fatalf("Begin with another fingerprint: got %v, want ErrFingerprintMismatch", err)
	}
	r, err := c.Renew(ctx, key, b.Lease.Token, 2*time.Minute)
	if err != nil || !r.Lease.ExpiresAt.After(b.Lease.ExpiresAt) {
		t.Fatalf("Renew = %+v, %v", r, err)
	}
	if _, err := c.Renew(ctx, key, "wrong", 0); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Renew with a wrong token: got %v, want ErrLeaseLost", err)
	}
	resp := Response{Status: 201, Header: http.Header{"Content-Type": {"application/json"}}, Body: []byte(`{"id":1}`)}
	rec, err := c.Complete(ctx, key, CompleteRequest{Token: b.Lease.Token, Response: resp})
	if err != nil || rec.State != StateCompleted {
		t.Fatalf("Complete = %+v, %v", rec, err)
	}
	if _, err := c.Complete(ctx, key, CompleteRequest{Token: b.Lease.Token, Response: resp}); err != nil {
		t.Fatalf("the same Complete again: %v", err)
	}
	resp2 := resp
	resp2.Status = 200
	if _, err := c.Complete(ctx, key, CompleteRequest{Token: b.Lease.Token, Response: resp2}); !errors.Is(err, ErrAlreadyCompleted) {
		t.Fatalf("another Complete: got %v, want ErrAlreadyCompleted", err)
	}
	again, err := c.Begin(ctx, key, BeginOptions{Fingerprint: "fp"})
	if err != nil || !again.Replayed || again.Record.Response.Status != 201 || string(again.Record.Response.Body) != `{"id":1}` {
		t.Fatalf("Begin after Complete = %+v, %v; want the replay", again, err)
	}
	if err := c.Release(ctx, key, b.Lease.Token); !errors.Is(err, ErrAlreadyCompleted) {
		t.Fatalf("Release of a completed key: got %v, want ErrAlreadyCompleted", err)
	}
	if err := c.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, key); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after Delete: got %v, want ErrNotFound", err)
	}
	if err := c.Release(ctx, key, "whatever"); err != nil {
		t.Fatalf("Release of an absent key: %v", err)
	}
}

func TestUnauthorized(t *testing.T) {
	t.Parallel()
	f, srv := newFake(t)
	f.token = "good"
	if _, err := newTestClient(t, srv.URL, WithToken("bad")).Get(context.Background(), "k"); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("got %v, want ErrUnauthorized", err)
	}
	if _, err := newTestClient(t, srv.URL, WithToken("good")).Get(context.Background(), "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("got %v, want ErrNotFound", err)
	}
}
