package idemclient

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The tests here run the middleware against the real idemsvc (see idemsvc_test.go): what it
// stores must be what idemsvc accepts and what net/http sent, or the handler runs again.

// syncLog is a concurrency-safe log sink for the middleware's logger.
type syncLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// serveIdem serves h behind Middleware(c, opts...) (and around by outer, when not nil) and
// returns the server's URL, the counter of the handler's runs and the middleware's log.
func serveIdem(t *testing.T, c *Client, outer func(http.Handler) http.Handler, h http.HandlerFunc, opts ...MiddlewareOption) (string, *atomic.Int32, *syncLog) {
	t.Helper()
	var runs atomic.Int32
	log := &syncLog{}
	opts = append([]MiddlewareOption{WithLogger(slog.New(slog.NewTextHandler(log, nil)))}, opts...)
	var handler http.Handler = Middleware(c, opts...)(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		runs.Add(1)
		h(w, r)
	}))
	if outer != nil {
		handler = outer(handler)
	}
	srv := httptest.NewServer(handler)
	t.Cleanup(srv.Close)
	return srv.URL, &runs, log
}

// checkReplay checks that replay is the replay of first: the same status and body, and the same
// headers but for Date (net/http's, of each response), Idempotent-Replayed and the names in
// notStored.
func checkReplay(t *testing.T, first, replay answer, notStored ...string) {
	t.Helper()
	if replay.header.Get(ReplayedHeader) != "true" {
		t.Fatalf("second response = %d %s %s, want a replay", replay.status, short(replay.header), short(replay.body))
	}
	if first.status != replay.status {
		t.Errorf("replayed status %d, first %d", replay.status, first.status)
	}
	if !bytes.Equal(first.body, replay.body) {
		t.Errorf("replayed body %q, first %q", replay.body, first.body)
	}
	skip := map[string]bool{"Date": true, ReplayedHeader: true}
	for _, name := range notStored {
		skip[http.CanonicalHeaderKey(name)] = true
	}
	for _, h := range []http.Header{first.header, replay.header} {
		for name := range h {
			if skip[name] {
				continue
			}
			if got, want := replay.header[name], first.header[name]; strings.Join(got, "\x00") != strings.Join(want, "\x00") || len(got) != len(want) {
				t.Errorf("replayed %s = %s, first %s", name, short(got), short(want))
			}
		}
	}
}

// short formats v with %q, cut to 300 bytes.
func short(v any) string {
	s := fmt.Sprintf("%q", v)
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}

// TestMiddlewareNilHeadersAgainstIdemsvc: a header set to nil (net/http's way to suppress an
// automatic header) or to no values is not stored (idemsvc refused the null, the key stayed held
// and a retry after the lease ran the handler again); a suppressed Content-Type stays suppressed
// on the replay.
func TestMiddlewareNilHeadersAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	c := newTestClient(t, startIdemsvc(t))
	url, runs, log := serveIdem(t, c, nil, func(w http.ResponseWriter, r *http.Request) {
		w.Header()["Date"] = nil
		w.Header()["Content-Type"] = nil
		w.Header()["X-Empty"] = []string{}
		w.Header()["x-nil"] = nil
		w.Header().Set("X-Kept", "1")
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "<html><body>charged</body></html>")
	}, WithLease(2*time.Second))
	first := send(t, "POST", url, `"nil-headers"`, `{}`)
	if first.status != 201 || first.header.Get("X-Kept") != "1" {
		t.Fatalf("first = %d %q %q", first.status, first.header, first.body)
	}
	for _, name := range []string{"Date", "Content-Type", "X-Empty", "X-Nil"} {
		if v, ok := first.header[name]; ok {
			t.Errorf("first response has %s %q, want it suppressed", name, v)
		}
	}
	replay := send(t, "POST", url, `"nil-headers"`, `{}`)
	checkReplay(t, first, replay)
	if got := runs.Load(); got != 1 {
		t.Errorf("handler ran %d times, want 1", got)
	}
	if strings.Contains(log.String(), "level=WARN") {
		t.Errorf("middleware warned:\n%s", log)
	}
}

// TestMiddlewareCredentialSpellingsAgainstIdemsvc: credential headers in any spelling are sent
// to the first client and never stored (a non-canonical one made idemsvc refuse the response,
// and the retry ran the handler again); names that canonicalize alike are merged as net/http
// sends them.
func TestMiddlewareCredentialSpellingsAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	c := newTestClient(t, startIdemsvc(t))
	url, runs, log := serveIdem(t, c, nil, func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h["set-cookie"] = []string{"session=s1"}
		h["authorization"] = []string{"Bearer t1"}
		h["PROXY-AUTHORIZATION"] = []string{"Basic eDp5"}
		h["x-lower"] = []string{"1", "2"}
		h["X-Lower"] = []string{"0"}
		h.Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, `{"charged":true}`)
	})
	first := send(t, "POST", url, `"credentials"`, `{}`)
	if first.status != 201 {
		t.Fatalf("first = %d %q %q", first.status, first.header, first.body)
	}
	for _, name := range []string{"Set-Cookie", "Authorization", "Proxy-Authorization"} {
		if first.header.Get(name) == "" {
			t.Errorf("first response has no %s: credential headers go to the first client", name)
		}
	}
	if got := strings.Join(first.header["X-Lower"], ","); got != "0,1,2" {
		t.Errorf("first X-Lower = %q, want 0,1,2", got)
	}
	replay := send(t, "POST", url, `"credentials"`, `{}`)
	checkReplay(t, first, replay, "Set-Cookie", "Authorization", "Proxy-Authorization")
	for _, name := range []string{"Set-Cookie", "Authorization", "Proxy-Authorization"} {
		if v := replay.header.Values(name); len(v) > 0 {
			t.Errorf("replay has %s %q: credential headers must never be stored", name, v)
		}
	}
	if got := runs.Load(); got != 1 {
		t.Errorf("handler ran %d times, want 1", got)
	}
	if strings.Contains(log.String(), "level=WARN") {
		t.Errorf("middleware warned:\n%s", log)
	}
}

// TestMiddlewareUnstorableHeadersAgainstIdemsvc: responses that net/http sends but idemsvc would
// refuse as they are are stored as net/http sent them, or with headers dropped (and a warning),
// so that a retry never runs the handler again; a status idemsvc cannot store releases the key.
func TestMiddlewareUnstorableHeadersAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	c := newTestClient(t, startIdemsvc(t))
	many := make([]string, 150)
	for i := range many {
		many[i] = fmt.Sprint("v", i)
	}
	for _, tc := range []struct {
		name      string
		header    map[string][]string
		stored    http.Header // the stored headers, as idemsvc has them
		raw       bool        // read the first response raw: Go's client refuses it
		notStored []string    // sent, not stored
		warn      string      // in the warning that names what was dropped
	}{
		{name: "Newline", header: map[string][]string{"X-Nl": {"a\nb", " c\r\nd ", "e\r"}},
			stored: http.Header{"X-Nl": {"a b", "c  d", "e"}}},
		{name: "InvalidName", header: map[string][]string{"X Foo": {"1"}, "X-Ok": {"1"}}},
		{name: "ControlCharacter", header: map[string][]string{"X-Ctl": {"a\x01b"}, "X-Ok": {"1"}},
			raw: true, notStored: []string{"X-Ctl"}, warn: "X-Ctl (a control character in a value)"},
		{name: "TooManyValues", header: map[string][]string{"X-Many": many, "X-Few": many[:60], "X-Ok": {"1"}},
			notStored: []string{"X-Many"}, warn: "X-Many (over idemsvc's 100 header values)"},
		// Largest first: dropping X-Big2 is enough.
		{name: "TooLarge", header: map[string][]string{
			"X-Big1": {strings.Repeat("a", 9<<10)}, "X-Big2": {strings.Repeat("b", 10<<10)}, "X-Ok": {"1"}},
			notStored: []string{"X-Big2"}, warn: "X-Big2 (over idemsvc's 16384 bytes of headers)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			url, runs, log := serveIdem(t, c, nil, func(w http.ResponseWriter, r *http.Request) {
				for name, values := range tc.header {
					w.Header()[name] = values
				}
				w.Header().Set("Content-Type", "text/plain")
				w.WriteHeader(http.StatusCreated)
				io.WriteString(w, "charged")
			})
			key := `"unstorable-` + tc.name + `"`
			var first answer
			if tc.raw {
				raw := rawPost(t, url, key)
				if !bytes.HasPrefix(raw, []byte("HTTP/1.1 201 ")) || !bytes.Contains(raw, []byte("\r\nX-Ctl: a\x01b\r\n")) {
					t.Fatalf("first response = %s", short(raw))
				}
			} else {
				first = send(t, "POST", url, key, `{}`)
				if first.status != 201 {
					t.Fatalf("first = %d %s %s", first.status, short(first.header), short(first.body))
				}
			}
			replay := send(t, "POST", url, key, `{}`)
			if tc.raw {
				if replay.status != 201 || replay.header.Get(ReplayedHeader) != "true" || string(replay.body) != "charged" {
					t.Fatalf("replay = %d %s %s", replay.status, short(replay.header), short(replay.body))
				}
			} else {
				checkReplay(t, first, replay, tc.notStored...)
			}
			if tc.stored != nil {
				rec, err := c.Get(context.Background(), ScopedKey("POST", "/", strings.Trim(key, `"`)))
				if err != nil {
					t.Fatal(err)
				}
				for name, want := range tc.stored {
					if got := rec.Response.Header[name]; strings.Join(got, "|") != strings.Join(want, "|") {
						t.Errorf("stored %s = %q, want %q (as net/http sent it)", name, got, want)
					}
				}
			}
			for _, name := range tc.notStored {
				if v, ok := replay.header[name]; ok {
					t.Errorf("replay has %s %s, want it dropped from the stored copy", name, short(v))
				}
			}
			if got := runs.Load(); got != 1 {
				t.Errorf("handler ran %d times, want 1", got)
			}
			if l := log.String(); tc.warn == "" && strings.Contains(l, "level=WARN") || tc.warn != "" && !strings.Contains(l, tc.warn) {
				t.Errorf("middleware log:\n%s\nwant a warning with %q", l, tc.warn)
			}
		})
	}

	t.Run("Status700", func(t *testing.T) {
		t.Parallel()
		url, runs, log := serveIdem(t, c, nil, func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(700)
			io.WriteString(w, "odd")
		})
		for i := range 2 {
			a := send(t, "POST", url, `"status-700"`, `{}`)
			if a.status != 700 || a.header.Get(ReplayedHeader) != "" || string(a.body) != "odd" {
				t.Errorf("request %d = %d %q %q, want the handler's live 700", i+1, a.status, a.header, a.body)
			}
		}
		if got := runs.Load(); got != 2 {
			t.Errorf("handler ran %d times, want 2: a status outside 100-599 releases the key", got)
		}
		l := log.String()
		if !strings.Contains(l, "status outside 100-599 cannot be stored") || strings.Contains(l, "not recorded") {
			t.Errorf("middleware log:\n%s\nwant the release without a complete", l)
		}
	})
}

// rawPost posts an empty body with key over a fresh connection and returns the raw response.
func rawPost(t *testing.T, url, key string) []byte {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(conn, "POST / HTTP/1.1\r\nHost: test\r\n%s: %s\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", KeyHeader, key)
	b, err := io.ReadAll(conn)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestMiddlewareInvalidUTF8AgainstIdemsvc pins what the docs say: header values are stored as
// UTF-8 text; invalid bytes come back as U+FFFD.
func TestMiddlewareInvalidUTF8AgainstIdemsvc(t *testing.T) {
	t.Parallel()
	c := newTestClient(t, startIdemsvc(t))
	url, runs, _ := serveIdem(t, c, nil, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Bin", "a\xffb")
		w.Header().Set("X-Utf8", "é€")
		io.WriteString(w, "ok")
	})
	first := send(t, "POST", url, `"utf8"`, `{}`)
	replay := send(t, "POST", url, `"utf8"`, `{}`)
	checkReplay(t, first, replay, "X-Bin")
	if got := first.header.Get("X-Bin"); got != "a\xffb" {
		t.Errorf("first X-Bin = %q", got)
	}
	if got := replay.header.Get("X-Bin"); got != "a\uFFFDb" {
		t.Errorf("replayed X-Bin = %q, want %q", got, "a\uFFFDb")
	}
	if got := runs.Load(); got != 1 {
		t.Errorf("handler ran %d times, want 1", got)
	}
}

// TestMiddlewareHijackAgainstIdemsvc: a handler cannot hijack the connection through
// http.ResponseController (its bytes would bypass the response the middleware stores and
// replays); the deadlines and Flush still work.
func TestMiddlewareHijackAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	c := newTestClient(t, startIdemsvc(t))
	var hijackErr, deadlineErr, flushErr atomic.Value
	url, runs, _ := serveIdem(t, c, nil, func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		deadlineErr.Store(fmt.Sprint(rc.SetWriteDeadline(time.Now().Add(time.Minute)), rc.SetReadDeadline(time.Now().Add(time.Minute))))
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "charged ")
		flushErr.Store(fmt.Sprint(rc.Flush()))
		conn, bufrw, err := rc.Hijack()
		hijackErr.Store(fmt.Sprint(err, errors.Is(err, http.ErrNotSupported)))
		if err == nil {
			bufrw.WriteString("HTTP/1.1 202 Accepted\r\nContent-Length: 8\r\nConnection: close\r\n\r\nhijacked")
			bufrw.Flush()
			conn.Close()
			return
		}
		io.WriteString(w, "once")
	})
	first := send(t, "POST", url, `"hijack"`, `{}`)
	if got := hijackErr.Load(); got != fmt.Sprint(fmt.Errorf("%w", http.ErrNotSupported), true) {
		t.Errorf("Hijack through ResponseController: %v, want http.ErrNotSupported", got)
	}
	if got := deadlineErr.Load(); got != "<nil> <nil>" {
		t.Errorf("SetWriteDeadline, SetReadDeadline: %v, want nil", got)
	}
	if got := flushErr.Load(); got != "<nil>" {
		t.Errorf("Flush: %v, want nil", got)
	}
	if first.status != 201 || string(first.body) != "charged once" {
		t.Fatalf("first = %d %q", first.status, first.body)
	}
	replay := send(t, "POST", url, `"hijack"`, `{}`)
	checkReplay(t, first, replay)
	if got := runs.Load(); got != 1 {
		t.Errorf("handler ran %d times, want 1", got)
	}
}

// TestMiddlewareOuterContentTypeAgainstIdemsvc: a Content-Type set by outer middleware is not
// replaced by a sniffed one, on the first response or on a replay; the handler's own still
// wins over it.
func TestMiddlewareOuterContentTypeAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	c := newTestClient(t, startIdemsvc(t))
	const outerType = "application/vnd.outer+json"
	outer := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", outerType)
			next.ServeHTTP(w, r)
		})
	}
	url, runs, _ := serveIdem(t, c, outer, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/own" {
			w.Header().Set("Content-Type", "text/csv")
		}
		io.WriteString(w, "<html><body>charged</body></html>")
	})
	for _, tc := range []struct{ path, want string }{{"/outer", outerType}, {"/own", "text/csv"}} {
		first := send(t, "POST", url+tc.path, `"outer-type"`, `{}`)
		replay := send(t, "POST", url+tc.path, `"outer-type"`, `{}`)
		if got := first.header.Get("Content-Type"); got != tc.want {
			t.Errorf("%s: first Content-Type = %q, want %q", tc.path, got, tc.want)
		}
		if got := replay.header.Get("Content-Type"); got != tc.want {
			t.Errorf("%s: replayed Content-Type = %q, want %q", tc.path, got, tc.want)
		}
		checkReplay(t, first, replay)
	}
	if got := runs.Load(); got != 2 {
		t.Errorf("handler ran %d times, want 2 (once per path)", got)
	}
}

// TestMiddlewareWaitOverMaxAgainstIdemsvc: WithWait above the server's IDEMSVC_MAX_WAIT is a
// configuration error: every keyed request gets 500 with a detail that names the cause, and the
// handler does not run.
func TestMiddlewareWaitOverMaxAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	c := newTestClient(t, startIdemsvc(t)) // IDEMSVC_MAX_WAIT: 30s
	url, runs, log := serveIdem(t, c, nil, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
	}, WithWait(time.Minute))
	a := send(t, "POST", url, `"wait"`, `{}`)
	if a.status != 500 || problemType(t, a) != "internal" {
		t.Fatalf("got %d %s, want 500 internal", a.status, a.body)
	}
	var p problem
	_ = json.Unmarshal(a.body, &p)
	for _, want := range []string{"misconfigured", "wait_ms must be between 0 and 30000", "WithWait", "IDEMSVC_MAX_WAIT"} {
		if !strings.Contains(p.Detail, want) {
			t.Errorf("detail %q does not say %q", p.Detail, want)
		}
	}
	if !strings.Contains(log.String(), "level=ERROR") {
		t.Errorf("middleware log:\n%s\nwant an error", log)
	}
	if got := runs.Load(); got != 0 {
		t.Errorf("handler ran %d times, want 0", got)
	}
	// Within the limit it works.
	url, runs, _ = serveIdem(t, c, nil, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
	}, WithWait(30*time.Second))
	if a := send(t, "POST", url, `"wait"`, `{}`); a.status != 201 || runs.Load() != 1 {
		t.Errorf("WithWait(30s): %d %s, %d runs", a.status, a.body, runs.Load())
	}
}

// TestMiddlewareInvalidUTF8SizeAgainstIdemsvc: header values that are not UTF-8 count at the size
// idemsvc stores (each invalid byte becomes U+FFFD, three bytes) when the stored copy is fitted
// into its 16 KiB: 6,000 such bytes are 18,000 stored, so the header is left out and the response
// stored, instead of refused with the handler run again (found in review).
func TestMiddlewareInvalidUTF8SizeAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	c := newTestClient(t, startIdemsvc(t))
	var runs atomic.Int32
	srv := httptest.NewServer(Middleware(c)(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		runs.Add(1)
		w.Header().Set("X-Bin", strings.Repeat("\xff", 6000))
		w.WriteHeader(201)
		_, _ = w.Write([]byte("charged"))
	})))
	defer srv.Close()
	for i, want := range []string{"", "true"} {
		a := send(t, "POST", srv.URL+"/charge", `"utf8"`, `{}`)
		if a.status != 201 || a.header.Get(ReplayedHeader) != want {
			t.Errorf("request %d = %d, replayed %q, want 201, %q", i+1, a.status, a.header.Get(ReplayedHeader), want)
		}
	}
	if got := runs.Load(); got != 1 {
		t.Errorf("handler ran %d times, want 1", got)
	}
}

// TestMiddlewareLogsToDefault: without WithLogger the middleware logs to slog.Default(), so that a
// misconfiguration (here WithWait above the server's maximum) is not silent. Not parallel: it
// replaces the default logger.
func TestMiddlewareLogsToDefault(t *testing.T) {
	log := &syncLog{}
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(log, nil)))
	defer slog.SetDefault(old)
	c := newTestClient(t, startIdemsvc(t)) // IDEMSVC_MAX_WAIT: 30s
	srv := httptest.NewServer(Middleware(c, WithWait(time.Minute))(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
	})))
	defer srv.Close()
	if a := send(t, "POST", srv.URL, `"wait"`, `{}`); a.status != 500 {
		t.Fatalf("got %d %s, want 500", a.status, a.body)
	}
	if !strings.Contains(log.String(), "level=ERROR") {
		t.Errorf("default log:\n%s\nwant the misconfiguration as an error", log)
	}
}
