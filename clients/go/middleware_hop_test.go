package idemclient

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The tests here pin that Content-Length and the hop-by-hop headers (RFC 9110 section 7.6.1)
// are neither stored nor replayed. A security audit found that idemsvc lets a complete store
// them, and that a replay copied them onto the live response: a stored Content-Length that did
// not match the body, or a stored Connection or Transfer-Encoding, reached the end user as a
// truncated or hung response or a closed connection.

// connectionHeaderNames are the names, canonical, that must never be stored or replayed: the
// hop-by-hop headers, Content-Length, and the X-Foo and X-Hop that the tests' Connection
// headers name.
var connectionHeaderNames = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Te",
	"Transfer-Encoding", "Upgrade", "Trailer", "Content-Length", "X-Foo", "X-Hop"}

// connectionHeadersIn returns the names in h, in any case, that are connectionHeaderNames.
func connectionHeadersIn(h map[string][]string) []string {
	var found []string
	for name := range h {
		for _, hop := range connectionHeaderNames {
			if strings.EqualFold(name, hop) {
				found = append(found, name)
			}
		}
	}
	return found
}

// TestMiddlewareReplayDropsConnectionHeaders: a stored response that has a wrong Content-Length,
// Connection (with a header it names), Transfer-Encoding, Upgrade, Keep-Alive and the other
// hop-by-hop headers, as another client or an older version may have stored it, is replayed to
// a real client with its whole body, the right length, none of those headers and its other
// headers intact, in whatever case the stored names are spelled.
func TestMiddlewareReplayDropsConnectionHeaders(t *testing.T) {
	t.Parallel()
	const body = `{"charge":"ch_1","amount":100}`
	for _, tc := range []struct {
		name   string
		header http.Header
	}{
		{"Canonical", http.Header{
			"Content-Length":    {"99999"},
			"Connection":        {"close", "X-Foo"},
			"X-Foo":             {"1"},
			"Transfer-Encoding": {"chunked"},
			"Upgrade":           {"websocket"},
			"Keep-Alive":        {"timeout=5, max=100"},
			"Proxy-Connection":  {"keep-alive"},
			"Te":                {"trailers"},
			"Trailer":           {"X-Checksum"},
		}},
		// The audit's case: a Content-Length over the body's length, alone.
		{"ContentLength", http.Header{"Content-Length": {"99999"}}},
		// Names as a client in another language may spell them; the Connection header's list
		// names X-Foo in yet another case.
		{"AnyCase", http.Header{
			"content-length":    {"99999"},
			"CONNECTION":        {"Close , x-FOO"},
			"x-foo":             {"1"},
			"transfer-encoding": {"chunked"},
			"UPGRADE":           {"h2c"},
			"keep-alive":        {"timeout=5"},
			"proxy-connection":  {"close"},
			"TE":                {"trailers"},
			"trailer":           {"X-Checksum"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f, idem := newFake(t)
			c := newTestClient(t, idem.URL)
			url, runs, log := serveIdem(t, c, nil, func(w http.ResponseWriter, r *http.Request) {
				t.Error("the handler ran; want the stored response replayed")
			})

			// Another client stores the response under the key and fingerprint the middleware
			// uses for the request below.
			key := ScopedKey("POST", "/charges", "hop-"+tc.name)
			ctx := context.Background()
			br, err := c.Begin(ctx, key, BeginOptions{Fingerprint: Fingerprint("POST", "/charges", []byte(`{}`))})
			if err != nil || !br.Acquired {
				t.Fatalf("begin = %+v, %v", br, err)
			}
			stored := tc.header.Clone()
			stored["Content-Type"] = []string{"application/json"}
			stored["X-Request-Id"] = []string{"req-42"}
			stored["X-Multi"] = []string{"a", "b"}
			if _, err := c.Complete(ctx, key, CompleteRequest{Token: br.Lease.Token,
				Response: Response{Status: http.StatusCreated, Header: stored, Body: []byte(body)}}); err != nil {
				t.Fatal(err)
			}
			if got := connectionHeadersIn(f.record(key).resp.Headers); len(got) != len(tc.header) {
				t.Fatalf("the fake stored %q of the connection headers, want all %d", got, len(tc.header))
			}

			req, err := http.NewRequest("POST", url+"/charges", strings.NewReader(`{}`))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set(KeyHeader, `"hop-`+tc.name+`"`)
			client := &http.Client{Timeout: 10 * time.Second} // a replay with a wrong length could hang
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			got, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatalf("reading the replayed body: %v (got %q so far)", err, got)
			}
			if resp.StatusCode != http.StatusCreated || resp.Header.Get(ReplayedHeader) != "true" || string(got) != body {
				t.Fatalf("replay = %d %q %q, want the stored 201 and body", resp.StatusCode, resp.Header, got)
			}
			if resp.ContentLength != int64(len(body)) || resp.Header.Get("Content-Length") != strconv.Itoa(len(body)) {
				t.Errorf("replay length %d (Content-Length %q), want %d", resp.ContentLength, resp.Header.Get("Content-Length"), len(body))
			}
			if resp.TransferEncoding != nil || resp.Close {
				t.Errorf("replay Transfer-Encoding %q, Close %v: want the replay's own framing, and the connection kept", resp.TransferEncoding, resp.Close)
			}
			for _, name := range connectionHeaderNames {
				if name == "Content-Length" {
					continue // net/http's own, checked above
				}
				if v, ok := resp.Header[name]; ok {
					t.Errorf("replay has %s %q, want it left out", name, v)
				}
			}
			for name, want := range map[string]string{"Content-Type": "application/json", "X-Request-Id": "req-42", "X-Multi": "a|b"} {
				if v := strings.Join(resp.Header.Values(name), "|"); v != want {
					t.Errorf("replayed %s = %q, want %q", name, v, want)
				}
			}
			if n := runs.Load(); n != 0 {
				t.Errorf("handler ran %d times, want 0", n)
			}
			if l := log.String(); strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") {
				t.Errorf("middleware log:\n%s", l)
			}
		})
	}
}

// TestMiddlewareDoesNotStoreConnectionHeaders: a handler's explicit Content-Length, Connection,
// the header Connection names and Keep-Alive (in a non-canonical spelling) reach the first
// client but not the complete the middleware sends, nor its retry, which stays byte-identical
// to the first (idemsvc accepts a repeated complete only with the same response). The replay
// then gets net/http's framing and the handler's other headers, without a warning in the log.
func TestMiddlewareDoesNotStoreConnectionHeaders(t *testing.T) {
	t.Parallel()
	f, _ := newFake(t)
	// In front of the fake: record every complete, and lose the answer to the first one after
	// the fake applied it, so that the client sends the complete again.
	var mu sync.Mutex
	var completes [][]byte
	idem := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/complete") {
			b, err := io.ReadAll(r.Body)
			if err != nil {
				t.Error(err)
			}
			r.Body = io.NopCloser(bytes.NewReader(b))
			mu.Lock()
			completes = append(completes, b)
			n := len(completes)
			mu.Unlock()
			if n == 1 {
				f.ServeHTTP(httptest.NewRecorder(), r)
				panic(http.ErrAbortHandler) // drops the connection
			}
		}
		f.ServeHTTP(w, r)
	}))
	t.Cleanup(idem.Close)
	c := newTestClient(t, idem.URL)

	const body = `{"charged":true}`
	url, runs, log := serveIdem(t, c, nil, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Header().Set("Connection", "close, X-Hop")
		w.Header().Set("X-Hop", "1")
		w.Header()["keep-alive"] = []string{"timeout=5"}
		w.Header().Set("X-Request-Id", "req-7")
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, body)
	})

	first := send(t, "POST", url+"/charges", `"hop-store"`, `{}`)
	if first.status != 201 || string(first.body) != body || first.header.Get("X-Hop") != "1" {
		t.Fatalf("first = %d %q %q, want the handler's response as it set it", first.status, first.header, first.body)
	}

	mu.Lock()
	sent := completes
	mu.Unlock()
	if len(sent) != 2 {
		t.Fatalf("%d completes sent, want 2 (the first one's answer was lost)", len(sent))
	}
	if !bytes.Equal(sent[0], sent[1]) {
		t.Errorf("the retried complete differs from the first:\n%s\n%s", sent[0], sent[1])
	}
	for i, b := range sent {
		var cb completeBody
		if err := json.Unmarshal(b, &cb); err != nil {
			t.Fatalf("complete %d: %v: %s", i+1, err, b)
		}
		if got := connectionHeadersIn(cb.Response.Headers); len(got) > 0 {
			t.Errorf("complete %d stores %q, want none of them: %s", i+1, got, b)
		}
		for name, want := range map[string]string{"Content-Type": "application/json", "X-Request-Id": "req-7"} {
			if v := strings.Join(cb.Response.Headers[name], "|"); v != want {
				t.Errorf("complete %d stores %s %q, want %q", i+1, name, v, want)
			}
		}
	}

	replay := send(t, "POST", url+"/charges", `"hop-store"`, `{}`)
	checkReplay(t, first, replay, "Connection", "X-Hop", "Keep-Alive")
	for _, name := range []string{"Connection", "X-Hop", "Keep-Alive"} {
		if v, ok := replay.header[name]; ok {
			t.Errorf("replay has %s %q, want it left out", name, v)
		}
	}
	if n := runs.Load(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
	if l := log.String(); strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") {
		t.Errorf("middleware log:\n%s\nwant no warning: a replay misses none of the headers left out", l)
	}
}
