package server_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/apitest"
	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server"
	"github.com/idemsvc/idemsvc/internal/server/servertest"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// env is one test's server and a client whose every request and response is checked against
// api/openapi.yaml.
type env struct {
	t      *testing.T
	srv    *servertest.Server
	clock  *storagetest.Clock // fake: no test sleeps for a lease
	client *http.Client
	token  string // bearer token sent, if any
}

func newEnv(t *testing.T, opts servertest.Options) *env {
	t.Helper()
	c := storagetest.NewClock(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	if opts.Now == nil {
		opts.Now = c.Now
	}
	srv := servertest.Start(t, opts)
	v := apitest.NewValidator(t)
	return &env{t: t, srv: srv, clock: c, client: v.Client(t, nil)}
}

type reply struct {
	status int
	header http.Header
	body   []byte
}

func (r reply) json(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatalf("body is not a JSON object: %v: %s", err, r.body)
	}
	return m
}

// do sends a request; body may be nil, a string (sent as is) or a value (sent as JSON).
func (e *env) do(method, path string, body any, hdr ...string) reply {
	e.t.Helper()
	return e.send(false, method, path, body, hdr...)
}

// bad sends a deliberately malformed request: the spec check is skipped for the request, never
// for the response.
func (e *env) bad(method, path string, body any, hdr ...string) reply {
	e.t.Helper()
	return e.send(true, method, path, body, hdr...)
}

func (e *env) send(malformed bool, method, path string, body any, hdr ...string) reply {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, e.srv.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if e.token != "" {
		req.Header.Set("Authorization", "Bearer "+e.token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i+1] == "" {
			req.Header.Del(hdr[i])
		} else {
			req.Header.Set(hdr[i], hdr[i+1])
		}
	}
	if malformed {
		req = apitest.Malformed(req)
	}
	resp, err := e.client.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	if resp.StatusCode >= 500 && resp.StatusCode != http.StatusServiceUnavailable {
		e.t.Errorf("%s %s: %d: %s", method, path, resp.StatusCode, b)
	}
	return reply{status: resp.StatusCode, header: resp.Header, body: b}
}

// wantStatus fails the test unless r has status want; for errors it also checks the problem.
func wantStatus(t *testing.T, r reply, want int, problem string) {
	t.Helper()
	if r.status != want {
		t.Fatalf("status = %d, want %d; body %s", r.status, want, r.body)
	}
	if problem == "" {
		return
	}
	if ct := r.header.Get("Content-Type"); ct != "application/problem+json" {
		t.Errorf("Content-Type = %q, want application/problem+json", ct)
	}
	p := r.json(t)
	if got := p["type"]; got != "urn:idemsvc:problem:"+problem {
		t.Errorf("problem type = %v, want urn:idemsvc:problem:%s (%s)", got, problem, r.body)
	}
	if got := p["status"]; got != float64(want) {
		t.Errorf("problem status = %v, want %d", got, want)
	}
	if p["title"] == "" || p["detail"] == "" {
		t.Errorf("problem without title or detail: %s", r.body)
	}
}

type leased struct {
	token string
	fence float64
}

// begin begins key and requires a 201; it returns the lease.
func (e *env) begin(key string, body any) leased {
	e.t.Helper()
	r := e.do("POST", "/v1/keys/"+key+"/begin", body)
	wantStatus(e.t, r, http.StatusCreated, "")
	m := r.json(e.t)
	lease, _ := m["lease"].(map[string]any)
	tok, _ := lease["token"].(string)
	if m["state"] != "in_progress" || tok == "" {
		e.t.Fatalf("begin 201 without an in-progress lease: %s", r.body)
	}
	return leased{token: tok, fence: lease["fence"].(float64)}
}

func completeBody(token string, status int, body string) map[string]any {
	return map[string]any{
		"token": token,
		"response": map[string]any{
			"status":  status,
			"headers": map[string][]string{"Content-Type": {"application/json"}},
			"body":    base64.StdEncoding.EncodeToString([]byte(body)),
		},
	}
}

func TestBegin(t *testing.T) {
	t.Parallel()
	t.Run("Acquired", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, servertest.Options{})
		r := e.do("POST", "/v1/keys/order-1/begin", map[string]any{"fingerprint": "fp", "lease_ms": 5000, "ttl_ms": 60000})
		wantStatus(t, r, http.StatusCreated, "")
		m := r.json(t)
		lease := m["lease"].(map[string]any)
		if m["key"] != "order-1" || m["state"] != "in_progress" || m["fingerprint"] != "fp" {
			t.Errorf("record = %s", r.body)
		}
		if tok := lease["token"].(string); len(tok) < 22 {
			t.Errorf("token %q is shorter than 128 bits", tok)
		}
		wantExp := e.clock.Now().Add(5 * time.Second).Format(time.RFC3339Nano)
		if lease["expires_at"] != wantExp {
			t.Errorf("lease.expires_at = %v, want %s", lease["expires_at"], wantExp)
		}
		if m["expires_at"] != e.clock.Now().Add(time.Minute).Format(time.RFC3339Nano) {
			t.Errorf("expires_at = %v, want now+60s", m["expires_at"])
		}
	})
	t.Run("EmptyBody", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, servertest.Options{})
		r := e.do("POST", "/v1/keys/k/begin", nil)
		wantStatus(t, r, http.StatusCreated, "")
		if fp := r.json(t)["fingerprint"]; fp != "" {
			t.Errorf("fingerprint = %v, want empty string", fp)
		}
	})
	t.Run("Replayed", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, servertest.Options{})
		l := e.begin("k", map[string]any{"fingerprint": "fp"})
		wantStatus(t, e.do("POST", "/v1/keys/k/complete", completeBody(l.token, 201, `{"id":7}`)), 200, "")
		for range 2 {
			r := e.do("POST", "/v1/keys/k/begin", map[string]any{"fingerprint": "fp"})
			wantStatus(t, r, http.StatusOK, "")
			if r.header.Get("Idempotent-Replayed") != "true" {
				t.Errorf("Idempotent-Replayed = %q, want true", r.header.Get("Idempotent-Replayed"))
			}
			m := r.json(t)
			resp := m["response"].(map[string]any)
			if m["state"] != "completed" || resp["status"] != float64(201) ||
				resp["body"] != base64.StdEncoding.EncodeToString([]byte(`{"id":7}`)) {
				t.Errorf("replay = %s", r.body)
			}
			if m["lease"] != nil || strings.Contains(string(r.body), l.token) {
				t.Errorf("replay shows the lease: %s", r.body)
			}
		}
	})
	t.Run("InProgress", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, servertest.Options{})
		l := e.begin("k", map[string]any{"lease_ms": 2500})
		r := e.do("POST", "/v1/keys/k/begin", map[string]any{})
		wantStatus(t, r, http.StatusConflict, "in-progress")
		if ra := r.header.Get("Retry-After"); ra != "3" {
			t.Errorf("Retry-After = %q, want 3 (2.5 s rounded up)", ra)
		}
		if strings.Contains(string(r.body), l.token) {
			t.Errorf("409 shows the token: %s", r.body)
		}
		e.clock.Advance(2400 * time.Millisecond)
		r = e.do("POST", "/v1/keys/k/begin", map[string]any{})
		wantStatus(t, r, http.StatusConflict, "in-progress")
		if ra := r.header.Get("Retry-After"); ra != "1" {
			t.Errorf("Retry-After = %q, want at least 1", ra)
		}
	})
	t.Run("Takeover", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, servertest.Options{})
		old := e.begin("k", map[string]any{"lease_ms": 1000})
		e.clock.Advance(1001 * time.Millisecond)
		l := e.begin("k", map[string]any{"lease_ms": 1000})
		if l.fence <= old.fence || l.token == old.token {
			t.Errorf("takeover fence %v after %v, token reused %v", l.fence, old.fence, l.token == old.token)
		}
		// The stale holder can do nothing any more.
		wantStatus(t, e.do("POST", "/v1/keys/k/complete", completeBody(old.token, 200, "x")), 409, "lease-lost")
		wantStatus(t, e.do("POST", "/v1/keys/k/renew", map[string]any{"token": old.token}), 409, "lease-lost")
		wantStatus(t, e.do("POST", "/v1/keys/k/release", map[string]any{"token": old.token}), 409, "lease-lost")
	})
	t.Run("FingerprintMismatch", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, servertest.Options{})
		l := e.begin("k", map[string]any{"fingerprint": "a"})
		wantStatus(t, e.do("POST", "/v1/keys/k/begin", map[string]any{"fingerprint": "b"}), 422, "fingerprint-mismatch")
		wantStatus(t, e.do("POST", "/v1/keys/k/begin", map[string]any{}), 422, "fingerprint-mismatch")
		wantStatus(t, e.do("POST", "/v1/keys/k/complete", completeBody(l.token, 200, "secret")), 200, "")
		r := e.do("POST", "/v1/keys/k/begin", map[string]any{"fingerprint": "b"})
		wantStatus(t, r, 422, "fingerprint-mismatch")
		if strings.Contains(string(r.body), base64.StdEncoding.EncodeToString([]byte("secret"))) {
			t.Errorf("a mismatch shows the stored response: %s", r.body)
		}
	})
	t.Run("WaitCompleted", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, servertest.Options{})
		l := e.begin("k", nil)
		done := make(chan reply)
		go func() { done <- e.do("POST", "/v1/keys/k/begin", map[string]any{"wait_ms": 10000}) }()
		time.Sleep(50 * time.Millisecond) // let the waiter wait; correctness does not depend on it
		wantStatus(t, e.do("POST", "/v1/keys/k/complete", completeBody(l.token, 201, "ok")), 200, "")
		r := <-done
		wantStatus(t, r, http.StatusOK, "")
		if r.header.Get("Idempotent-Replayed") != "true" {
			t.Error("waiter's replay lacks Idempotent-Replayed")
		}
	})
	t.Run("WaitReleased", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, servertest.Options{})
		l := e.begin("k", nil)
		done := make(chan reply)
		go func() { done <- e.do("POST", "/v1/keys/k/begin", map[string]any{"wait_ms": 10000}) }()
		time.Sleep(50 * time.Millisecond)
		wantStatus(t, e.do("POST", "/v1/keys/k/release", map[string]any{"token": l.token}), 204, "")
		r := <-done
		wantStatus(t, r, http.StatusCreated, "")
		if f := r.json(t)["lease"].(map[string]any)["fence"].(float64); f <= l.fence {
			t.Errorf("waiter's fence %v is not above %v", f, l.fence)
		}
	})
	t.Run("WaitTimesOut", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, servertest.Options{})
		e.begin("k", nil)
		r := e.do("POST", "/v1/keys/k/begin", map[string]any{"wait_ms": 100})
		wantStatus(t, r, http.StatusConflict, "in-progress")
		if r.header.Get("Retry-After") == "" {
			t.Error("409 without Retry-After")
		}
	})
}

func TestComplete(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{})
	t.Run("OK", func(t *testing.T) {
		l := e.begin("c1", nil)
		body := completeBody(l.token, 201, `{"charged":true}`)
		body["ttl_ms"] = 120000
		r := e.do("POST", "/v1/keys/c1/complete", body)
		wantStatus(t, r, 200, "")
		m := r.json(t)
		if m["state"] != "completed" || m["completed_at"] == nil || m["lease"] != nil {
			t.Errorf("completed record = %s", r.body)
		}
		if m["expires_at"] != e.clock.Now().Add(2*time.Minute).Format(time.RFC3339Nano) {
			t.Errorf("expires_at = %v, want now + ttl_ms", m["expires_at"])
		}
		// The same complete again: safe to retry.
		wantStatus(t, e.do("POST", "/v1/keys/c1/complete", body), 200, "")
		// Another response: already completed.
		wantStatus(t, e.do("POST", "/v1/keys/c1/complete", completeBody(l.token, 500, "no")), 409, "already-completed")
		wantStatus(t, e.do("POST", "/v1/keys/c1/complete", completeBody("another-token", 201, `{"charged":true}`)), 409, "already-completed")
	})
	t.Run("AfterLeaseRanOut", func(t *testing.T) {
		l := e.begin("c2", map[string]any{"lease_ms": 10})
		e.clock.Advance(time.Second) // nobody took over
		wantStatus(t, e.do("POST", "/v1/keys/c2/complete", completeBody(l.token, 200, "late")), 200, "")
	})
	t.Run("LeaseLost", func(t *testing.T) {
		e.begin("c3", nil)
		wantStatus(t, e.do("POST", "/v1/keys/c3/complete", completeBody("not-the-token", 200, "")), 409, "lease-lost")
	})
	t.Run("NotFound", func(t *testing.T) {
		wantStatus(t, e.do("POST", "/v1/keys/nothing/complete", completeBody("tok", 200, "")), 404, "not-found")
	})
	t.Run("InvalidResponse", func(t *testing.T) {
		l := e.begin("c4", nil)
		cases := map[string]map[string]any{
			"status 99":           {"status": 99},
			"status 600":          {"status": 600},
			"Set-Cookie":          {"status": 200, "headers": map[string][]string{"Set-Cookie": {"a=b"}}},
			"authorization":       {"status": 200, "headers": map[string][]string{"authorization": {"Bearer x"}}},
			"Proxy-Authorization": {"status": 200, "headers": map[string][]string{"Proxy-Authorization": {"x"}}},
		}
		for name, resp := range cases {
			r := e.bad("POST", "/v1/keys/c4/complete", map[string]any{"token": l.token, "response": resp})
			if r.status != 422 {
				t.Errorf("%s: status %d, want 422: %s", name, r.status, r.body)
			}
			wantStatus(t, r, 422, "invalid-response")
		}
		// Nothing was stored: the holder can still complete properly.
		wantStatus(t, e.do("POST", "/v1/keys/c4/complete", completeBody(l.token, 200, "fine")), 200, "")
	})
}

func TestRenewReleaseGetDelete(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{})
	t.Run("Renew", func(t *testing.T) {
		l := e.begin("r1", map[string]any{"lease_ms": 1000})
		e.clock.Advance(900 * time.Millisecond)
		r := e.do("POST", "/v1/keys/r1/renew", map[string]any{"token": l.token, "lease_ms": 5000})
		wantStatus(t, r, 200, "")
		lease := r.json(t)["lease"].(map[string]any)
		if lease["expires_at"] != e.clock.Now().Add(5*time.Second).Format(time.RFC3339Nano) || lease["token"] != l.token {
			t.Errorf("renewed lease = %v", lease)
		}
		e.clock.Advance(2 * time.Second) // past the first lease, within the renewed one
		wantStatus(t, e.do("POST", "/v1/keys/r1/begin", nil), 409, "in-progress")
		wantStatus(t, e.do("POST", "/v1/keys/r1/renew", map[string]any{"token": "nope"}), 409, "lease-lost")
		wantStatus(t, e.do("POST", "/v1/keys/none/renew", map[string]any{"token": "nope"}), 404, "not-found")
	})
	t.Run("Release", func(t *testing.T) {
		l := e.begin("r2", nil)
		wantStatus(t, e.do("POST", "/v1/keys/r2/release", map[string]any{"token": "nope"}), 409, "lease-lost")
		wantStatus(t, e.do("POST", "/v1/keys/r2/release", map[string]any{"token": l.token}), 204, "")
		wantStatus(t, e.do("POST", "/v1/keys/r2/release", map[string]any{"token": l.token}), 204, "") // retried
		l2 := e.begin("r2", nil)
		if l2.fence <= l.fence {
			t.Errorf("fence after release %v, not above %v", l2.fence, l.fence)
		}
		wantStatus(t, e.do("POST", "/v1/keys/r2/complete", completeBody(l2.token, 200, "")), 200, "")
		wantStatus(t, e.do("POST", "/v1/keys/r2/release", map[string]any{"token": l2.token}), 409, "already-completed")
	})
	t.Run("Get", func(t *testing.T) {
		l := e.begin("g1", map[string]any{"fingerprint": "f"})
		r := e.do("GET", "/v1/keys/g1", nil)
		wantStatus(t, r, 200, "")
		m := r.json(t)
		lease := m["lease"].(map[string]any)
		if lease["token"] != nil || lease["fence"] != l.fence || lease["expires_at"] == nil || strings.Contains(string(r.body), l.token) {
			t.Errorf("GET of an in-progress record = %s", r.body)
		}
		wantStatus(t, e.do("GET", "/v1/keys/absent", nil), 404, "not-found")
	})
	t.Run("Delete", func(t *testing.T) {
		l := e.begin("d1", nil)
		wantStatus(t, e.do("DELETE", "/v1/keys/d1", nil), 204, "")
		wantStatus(t, e.do("DELETE", "/v1/keys/d1", nil), 204, "")
		wantStatus(t, e.do("GET", "/v1/keys/d1", nil), 404, "not-found")
		if l2 := e.begin("d1", nil); l2.fence <= l.fence {
			t.Errorf("fence after delete %v, not above %v", l2.fence, l.fence)
		}
	})
	t.Run("Expired", func(t *testing.T) {
		l := e.begin("x1", map[string]any{"ttl_ms": 1000, "lease_ms": 500})
		wantStatus(t, e.do("POST", "/v1/keys/x1/complete", completeBody(l.token, 200, "")), 200, "")
		e.clock.Advance(999 * time.Millisecond)
		wantStatus(t, e.do("GET", "/v1/keys/x1", nil), 200, "")
		e.clock.Advance(time.Millisecond) // at expires_at it no longer exists, sweeper or not
		wantStatus(t, e.do("GET", "/v1/keys/x1", nil), 404, "not-found")
		e.begin("x1", nil)
	})
}

func TestKeysInThePath(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{})
	for _, k := range []struct{ name, path, key string }{
		{"slash", "a%2Fb", "a/b"},
		{"percent", "100%25", "100%"},
		{"question", "what%3F", "what?"},
		{"dots inside", "a..b", "a..b"},
		{"max length", strings.Repeat("k", 255), strings.Repeat("k", 255)},
		{"punctuation", "!$&'()*+,;=:@~-_.", "!$&'()*+,;=:@~-_."},
	} {
		t.Run(k.name, func(t *testing.T) {
			e.begin(k.path, nil)
			r := e.do("GET", "/v1/keys/"+k.path, nil)
			wantStatus(t, r, 200, "")
			if got := r.json(t)["key"]; got != k.key {
				t.Errorf("key = %q, want %q", got, k.key)
			}
		})
	}
}

func TestAuth(t *testing.T) {
	t.Parallel()
	tokens := map[string]string{"alpha": "alpha-token-0123456789", "beta": "beta-token-0123456789"}
	e := newEnv(t, servertest.Options{Tokens: tokens})
	t.Run("Unauthorized", func(t *testing.T) {
		for _, auth := range []string{"", "Bearer", "Bearer wrong-token", "Basic YWxwaGE6eA==", "alpha-token-0123456789"} {
			r := e.bad("POST", "/v1/keys/k/begin", map[string]any{}, "Authorization", auth)
			wantStatus(t, r, 401, "unauthorized")
			if r.header.Get("WWW-Authenticate") != "Bearer" {
				t.Errorf("WWW-Authenticate = %q", r.header.Get("WWW-Authenticate"))
			}
		}
	})
	t.Run("TwoAuthorizationHeaders", func(t *testing.T) {
		// Either order, and even the same token twice: a proxy's header and the client's
		// cannot be told apart, so neither is taken.
		for _, pair := range [][2]string{
			{tokens["alpha"], tokens["beta"]}, {tokens["beta"], tokens["alpha"]}, {tokens["alpha"], tokens["alpha"]},
		} {
			req, err := http.NewRequest("GET", e.srv.URL+"/v1/keys/k", nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Add("Authorization", "Bearer "+pair[0])
			req.Header.Add("Authorization", "Bearer "+pair[1])
			resp, err := e.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 401 || !bytes.Contains(b, []byte("unauthorized")) {
				t.Errorf("two Authorization headers: %d %s, want 401 unauthorized", resp.StatusCode, b)
			}
		}
	})
	t.Run("TenantsIsolated", func(t *testing.T) {
		e.token = tokens["alpha"]
		l := e.begin("shared", map[string]any{"fingerprint": "fa"})
		wantStatus(t, e.do("POST", "/v1/keys/shared/complete", completeBody(l.token, 201, "alpha's")), 200, "")

		// Beta sees nothing of alpha's record: every endpoint answers as for an absent key.
		e.token = tokens["beta"]
		wantStatus(t, e.do("GET", "/v1/keys/shared", nil), 404, "not-found")
		wantStatus(t, e.do("POST", "/v1/keys/shared/complete", completeBody(l.token, 201, "x")), 404, "not-found")
		wantStatus(t, e.do("POST", "/v1/keys/shared/renew", map[string]any{"token": l.token}), 404, "not-found")
		wantStatus(t, e.do("POST", "/v1/keys/shared/release", map[string]any{"token": l.token}), 204, "")
		wantStatus(t, e.do("DELETE", "/v1/keys/shared", nil), 204, "")
		lb := e.begin("shared", map[string]any{"fingerprint": "fb"}) // no mismatch: its own key

		e.token = tokens["alpha"]
		r := e.do("POST", "/v1/keys/shared/begin", map[string]any{"fingerprint": "fa"})
		wantStatus(t, r, 200, "") // beta's delete did not touch alpha's record
		e.token = tokens["beta"]
		wantStatus(t, e.do("POST", "/v1/keys/shared/complete", completeBody(lb.token, 200, "beta's")), 200, "")
	})
}

func TestOperational(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{Tokens: map[string]string{"t": "token-0123456789abcdef"}})
	wantStatus(t, e.do("GET", "/healthz", nil), 200, "")
	if r := e.do("GET", "/readyz", nil); r.status != 200 || string(r.body) != "ok\n" {
		t.Errorf("/readyz = %d %q, want 200 \"ok\\n\" (api/openapi.yaml)", r.status, r.body)
	}
	r := e.do("GET", "/openapi.yaml", nil)
	wantStatus(t, r, 200, "")
	if !bytes.Contains(r.body, []byte("openapi:")) {
		t.Errorf("/openapi.yaml = %.80s", r.body)
	}
	e.token = "token-0123456789abcdef"
	e.begin("m", nil)
	e.do("POST", "/v1/keys/m/begin", nil)
	r = e.do("GET", "/metrics", nil)
	wantStatus(t, r, 200, "")
	for _, want := range []string{
		`idemsvc_begin_outcomes_total{outcome="acquired"} 1`,
		`idemsvc_begin_outcomes_total{outcome="in_progress"} 1`,
		`idemsvc_http_requests_total{method="POST",route="/v1/keys/{key}/begin",status="201"} 1`,
		`idemsvc_store_operation_duration_seconds_count{op="begin",result="ok"} 1`,
		"go_goroutines",
	} {
		if !bytes.Contains(r.body, []byte(want)) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if id := e.do("GET", "/healthz", nil, "X-Request-Id", "abc-123").header.Get("X-Request-Id"); id != "abc-123" {
		t.Errorf("X-Request-Id not echoed: %q", id)
	}
	if id := e.do("GET", "/healthz", nil).header.Get("X-Request-Id"); id == "" {
		t.Error("no X-Request-Id made")
	}
}

// TestAccessLog: one info line per request, naming what an operator looks for, and no caller
// (the access log is built without caller capture, which costs a stack walk per request).
func TestAccessLog(t *testing.T) {
	t.Parallel()
	core, logs := observer.New(zapcore.InfoLevel)
	e := newEnv(t, servertest.Options{
		Tokens: map[string]string{"acme": "token-0123456789abcdef"},
		Logger: zap.New(core, zap.AddCaller()), // as cmd/idemsvc builds it
	})
	e.token = "token-0123456789abcdef"
	e.do("POST", "/v1/keys/order-7/begin", nil, "X-Request-Id", "rid-1")
	lines := logs.FilterMessage("request").AllUntimed()
	if len(lines) != 1 {
		t.Fatalf("%d access lines for one request: %v", len(lines), lines)
	}
	l := lines[0]
	if l.Caller.Defined {
		t.Errorf("access line has a caller (%s): the stack walk is back on every request", l.Caller)
	}
	got := l.ContextMap()
	for k, want := range map[string]any{
		"method": "POST", "route": "/v1/keys/{key}/begin", "status": int64(201),
		"tenant": "acme", "key": "order-7", "request_id": "rid-1", "outcome": "acquired", "component": "http",
	} {
		if got[k] != want {
			t.Errorf("access line %s = %v (%T), want %v", k, got[k], got[k], want)
		}
	}
}

// TestBodiesAccepted: what the encoding rules allow. An empty begin under any media type is {}
// (some HTTP clients send a form type on every POST); a charset of UTF-8 is fine; and text that
// is Unicode, escaped or not, is kept as sent, so that two fingerprints differ when their text does.
func TestBodiesAccepted(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{})
	wantStatus(t, e.do("POST", "/v1/keys/form/begin", "", "Content-Type", "application/x-www-form-urlencoded"), 201, "")
	wantStatus(t, e.do("POST", "/v1/keys/none/begin", nil), 201, "")
	wantStatus(t, e.do("POST", "/v1/keys/cs/begin", `{"ttl_ms":60000}`, "Content-Type", "application/json; charset=UTF-8"), 201, "")
	for key, fp := range map[string]string{"pair": `\ud83d\ude00`, "raw": "😀", "accent": `caf\u00e9`} {
		r := e.do("POST", "/v1/keys/"+key+"/begin", `{"fingerprint":"`+fp+`"}`)
		wantStatus(t, r, 201, "")
		if got := r.json(t)["fingerprint"]; got != map[string]string{"pair": "😀", "raw": "😀", "accent": "café"}[key] {
			t.Errorf("%s: fingerprint stored as %q", key, got)
		}
	}
	// The same text is the same fingerprint, however it was escaped; other text is not.
	wantStatus(t, e.do("POST", "/v1/keys/pair/begin", `{"fingerprint":"😀"}`), 409, "in-progress")
	wantStatus(t, e.do("POST", "/v1/keys/pair/begin", `{"fingerprint":"\ud83d\ude01"}`), 422, "fingerprint-mismatch")
}

// TestLongestBounds: with the largest lease and retention the configuration allows (10 years),
// a record keeps its times and its holder. (Past 2262 the records' nanosecond times overflowed:
// a record vanished at once and a second caller won the key; cmd/idemsvc refuses such bounds.)
func TestLongestBounds(t *testing.T) {
	t.Parallel()
	limits := keys.DefaultLimits()
	limits.MaxLease, limits.MaxTTL = 87600*time.Hour, 87600*time.Hour
	e := newEnv(t, servertest.Options{Limits: limits})
	ms := (87600 * time.Hour).Milliseconds()
	l := e.begin("far", map[string]any{"lease_ms": ms, "ttl_ms": ms})
	e.clock.Advance(24 * time.Hour)
	wantStatus(t, e.do("GET", "/v1/keys/far", nil), 200, "")
	wantStatus(t, e.do("POST", "/v1/keys/far/begin", nil), 409, "in-progress")
	wantStatus(t, e.do("POST", "/v1/keys/far/complete", completeBody(l.token, 201, "done")), 200, "")
	r := e.do("GET", "/v1/keys/far", nil)
	if got, want := r.json(t)["expires_at"], e.clock.Now().Add(87600*time.Hour).UTC().Format(time.RFC3339Nano); got != want {
		t.Errorf("expires_at = %v, want %s", got, want)
	}
}

// TestAllow: a 405's Allow names the methods of the path the router matched, also for keys
// that look like an action's name.
func TestAllow(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{})
	for _, c := range []struct{ method, path, allow string }{
		{"PUT", "/v1/keys/k", "GET, HEAD, DELETE"},
		{"PUT", "/v1/keys/begin", "GET, HEAD, DELETE"},
		{"POST", "/v1/keys/begin", "GET, HEAD, DELETE"},
		{"PATCH", "/v1/keys/release", "GET, HEAD, DELETE"},
		{"PUT", "/v1/keys/x%2Fbegin", "GET, HEAD, DELETE"},
		{"GET", "/v1/keys/k/begin", "POST"},
		{"HEAD", "/v1/keys/k/begin", "POST"},
		{"DELETE", "/v1/keys/begin/complete", "POST"},
		{"POST", "/healthz", "GET, HEAD"},
		{"DELETE", "/metrics", "GET, HEAD"},
	} {
		r := e.bad(c.method, c.path, nil)
		if c.method == "HEAD" { // no body to read the problem from
			if r.status != 405 {
				t.Errorf("%s %s: status %d, want 405", c.method, c.path, r.status)
			}
		} else {
			wantStatus(t, r, 405, "method-not-allowed")
		}
		if got := r.header.Get("Allow"); got != c.allow {
			t.Errorf("%s %s: Allow %q, want %q", c.method, c.path, got, c.allow)
		}
	}
}

// TestLargestComplete: a complete at every limit at once (the largest stored body, and stored
// headers of the largest total size, each byte escaped by encoding/json as \u003c) is not too
// large a request.
func TestLargestComplete(t *testing.T) {
	t.Parallel()
	limits := keys.DefaultLimits()
	limits.MaxBodyBytes = 3000
	e := newEnv(t, servertest.Options{Limits: limits})
	l := e.begin("big", nil)
	headers := map[string][]string{}
	for i := range 8 { // 8 names of 4 bytes and values of 2,044: 16,384 bytes in all
		headers[fmt.Sprintf("X-A%d", i)] = []string{strings.Repeat("<", 2044)}
	}
	body := map[string]any{"token": l.token, "response": map[string]any{
		"status": 200, "headers": headers, "body": base64.StdEncoding.EncodeToString(make([]byte, 3000))}}
	wantStatus(t, e.do("POST", "/v1/keys/big/complete", body), 200, "")
}

// downStore is a store whose Ping fails, as a store that lost its Redis does.
type downStore struct{ keys.Store }

func (downStore) Ping(context.Context) error { return fmt.Errorf("ping: %w", keys.ErrUnavailable) }

// TestReadyzDown: a failing /readyz is a 503 problem and one log line, not two per probe.
func TestReadyzDown(t *testing.T) {
	t.Parallel()
	core, logs := observer.New(zapcore.WarnLevel)
	base := newEnv(t, servertest.Options{})
	e := newEnv(t, servertest.Options{Store: downStore{base.srv.Store}, Logger: zap.New(core)})
	wantStatus(t, e.do("GET", "/readyz", nil), 503, "unavailable")
	if n := logs.Len(); n != 1 {
		t.Errorf("%d log lines for one failing probe, want 1: %v", n, logs.All())
	}
}

// skewedStore is a store on a clock an hour ahead of the host's, as a Redis store is on Redis's
// clock when the replica's own clock lags it.
type skewedStore struct {
	keys.Store
	now func() time.Time
}

func (s skewedStore) Now() time.Time { return s.now() }

// TestRetryAfterOnTheStoresClock: Retry-After (and a wait's polls) are measured on the store's
// clock, on which its lease expiries are, not the host's. With an hour of skew the 409 said
// Retry-After: 3660 for a 60 s lease (an audit's find, on Redis).
func TestRetryAfterOnTheStoresClock(t *testing.T) {
	t.Parallel()
	ahead := func() time.Time { return time.Now().Add(time.Hour) }
	store, err := bolt.OpenDir(t.TempDir(), bolt.Options{Now: ahead})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	srv := servertest.Start(t, servertest.Options{Store: skewedStore{store, ahead}})
	e := &env{t: t, srv: srv, client: apitest.NewValidator(t).Client(t, nil)}
	e.begin("k", map[string]any{"lease_ms": 60000})
	r := e.do("POST", "/v1/keys/k/begin", nil)
	wantStatus(t, r, 409, "in-progress")
	if got := r.header.Get("Retry-After"); got != "60" && got != "59" {
		t.Errorf("Retry-After = %s for a 60 s lease, want 60", got)
	}
}

// TestMalformed sends 50 malformed requests; each must get its documented 4xx and a
// problem+json body, never a 5xx.
func TestMalformed(t *testing.T) {
	t.Parallel()
	limits := keys.DefaultLimits()
	limits.MaxBodyBytes = 1024
	e := newEnv(t, servertest.Options{Limits: limits})
	l := e.begin("held", nil)
	tok := l.token
	big := base64.StdEncoding.EncodeToString(make([]byte, 1025))
	manyHeaders := map[string][]string{}
	for i := range 101 {
		manyHeaders["X-H"+strconv.Itoa(i)] = []string{"v"}
	}
	resp := func(extra map[string]any) map[string]any {
		m := map[string]any{"token": tok, "response": map[string]any{"status": 200}}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	cases := []struct {
		name, method, path string
		body               any
		hdr                []string
		status             int
		problem            string
	}{
		// Keys.
		{"dot key", "POST", "/v1/keys/./begin", "{}", nil, 400, "invalid-key"},
		{"dotdot key", "POST", "/v1/keys/../begin", "{}", nil, 400, "invalid-key"},
		{"encoded dot", "POST", "/v1/keys/%2E/begin", "{}", nil, 400, "invalid-key"},
		{"space", "POST", "/v1/keys/a%20b/begin", "{}", nil, 400, "invalid-key"},
		{"tab", "POST", "/v1/keys/a%09b/begin", "{}", nil, 400, "invalid-key"},
		{"newline", "POST", "/v1/keys/a%0Ab/begin", "{}", nil, 400, "invalid-key"},
		{"nul", "POST", "/v1/keys/a%00b/begin", "{}", nil, 400, "invalid-key"},
		{"non-ascii", "POST", "/v1/keys/caf%C3%A9/begin", "{}", nil, 400, "invalid-key"},
		{"DEL", "GET", "/v1/keys/a%7F", nil, nil, 400, "invalid-key"},
		{"too long", "POST", "/v1/keys/" + strings.Repeat("k", 256) + "/begin", "{}", nil, 400, "invalid-key"},
		{"empty key", "POST", "/v1/keys//begin", "{}", nil, 400, "invalid-key"},
		{"empty key, get", "GET", "/v1/keys/", nil, nil, 400, "invalid-key"},
		{"empty key, delete", "DELETE", "/v1/keys/", nil, nil, 400, "invalid-key"},
		// JSON.
		{"not json", "POST", "/v1/keys/k/begin", "not json", nil, 400, "invalid-request"},
		{"truncated", "POST", "/v1/keys/k/begin", `{"lease_ms":`, nil, 400, "invalid-request"},
		{"array", "POST", "/v1/keys/k/begin", `[]`, nil, 400, "invalid-request"},
		{"string", "POST", "/v1/keys/k/begin", `"x"`, nil, 400, "invalid-request"},
		{"trailing data", "POST", "/v1/keys/k/begin", `{} {}`, nil, 400, "invalid-request"},
		{"unknown field", "POST", "/v1/keys/k/begin", `{"lease":5}`, nil, 400, "invalid-request"},
		{"unknown nested field", "POST", "/v1/keys/held/complete", `{"token":"` + tok + `","response":{"status":200,"code":1}}`, nil, 400, "invalid-request"},
		{"lease as string", "POST", "/v1/keys/k/begin", `{"lease_ms":"5"}`, nil, 400, "invalid-request"},
		{"lease as float", "POST", "/v1/keys/k/begin", `{"lease_ms":1.5}`, nil, 400, "invalid-request"},
		{"fingerprint as number", "POST", "/v1/keys/k/begin", `{"fingerprint":5}`, nil, 400, "invalid-request"},
		{"fingerprint too long", "POST", "/v1/keys/k/begin", map[string]any{"fingerprint": strings.Repeat("f", 513)}, nil, 400, "invalid-request"},
		{"status as string", "POST", "/v1/keys/held/complete", `{"token":"t","response":{"status":"200"}}`, nil, 400, "invalid-request"},
		{"body not base64", "POST", "/v1/keys/held/complete", `{"token":"t","response":{"status":200,"body":"%%%"}}`, nil, 400, "invalid-request"},
		{"headers not arrays", "POST", "/v1/keys/held/complete", `{"token":"t","response":{"status":200,"headers":{"A":"b"}}}`, nil, 400, "invalid-request"},
		// What encoding/json lets through and the API refuses.
		{"null body", "POST", "/v1/keys/k/begin", `null`, nil, 400, "invalid-request"},
		{"null member", "POST", "/v1/keys/k/begin", `{"lease_ms":null}`, nil, 400, "invalid-request"},
		{"null response", "POST", "/v1/keys/held/complete", `{"token":"` + tok + `","response":null}`, nil, 400, "invalid-request"},
		{"null header values", "POST", "/v1/keys/held/complete", `{"token":"` + tok + `","response":{"status":200,"headers":{"X":null}}}`, nil, 400, "invalid-request"},
		{"null in header values", "POST", "/v1/keys/held/complete", `{"token":"` + tok + `","response":{"status":200,"headers":{"X":["a",null]}}}`, nil, 400, "invalid-request"},
		{"member in other case", "POST", "/v1/keys/k/begin", `{"Lease_MS":1000}`, nil, 400, "invalid-request"},
		{"nested member in other case", "POST", "/v1/keys/held/complete", `{"token":"` + tok + `","Response":{"Status":200}}`, nil, 400, "invalid-request"},
		{"member twice", "POST", "/v1/keys/k/begin", `{"fingerprint":"a","fingerprint":"b"}`, nil, 400, "invalid-request"},
		{"member twice in other case", "POST", "/v1/keys/k/begin", `{"fingerprint":"a","FINGERPRINT":"b"}`, nil, 400, "invalid-request"},
		{"header given twice", "POST", "/v1/keys/held/complete", `{"token":"` + tok + `","response":{"status":200,"headers":{"A":["1"],"A":["2"]}}}`, nil, 400, "invalid-request"},
		{"header given twice in other case", "POST", "/v1/keys/held/complete", `{"token":"` + tok + `","response":{"status":200,"headers":{"x-a":["1"],"X-A":["2"]}}}`, nil, 422, "invalid-response"},
		{"base64 with a line break", "POST", "/v1/keys/held/complete", `{"token":"` + tok + `","response":{"status":200,"body":"YWJj\nZA=="}}`, nil, 400, "invalid-request"},
		{"base64 with CR LF", "POST", "/v1/keys/held/complete", `{"token":"` + tok + `","response":{"status":200,"body":"YWJj\r\nZA=="}}`, nil, 400, "invalid-request"},
		{"invalid UTF-8", "POST", "/v1/keys/k/begin", "{\"fingerprint\":\"\xff\"}", nil, 400, "invalid-request"},
		{"lone high surrogate", "POST", "/v1/keys/k/begin", `{"fingerprint":"\ud800"}`, nil, 400, "invalid-request"},
		{"lone low surrogate", "POST", "/v1/keys/k/begin", `{"fingerprint":"x\udfffy"}`, nil, 400, "invalid-request"},
		{"reversed surrogates", "POST", "/v1/keys/k/begin", `{"fingerprint":"\udc00\ud800"}`, nil, 400, "invalid-request"},
		{"lone surrogate in a header", "POST", "/v1/keys/held/complete", `{"token":"` + tok + `","response":{"status":200,"headers":{"X":["\ud83d"]}}}`, nil, 400, "invalid-request"},
		// Durations out of range.
		{"lease zero", "POST", "/v1/keys/k/begin", `{"lease_ms":0}`, nil, 400, "invalid-request"},
		{"lease negative", "POST", "/v1/keys/k/begin", `{"lease_ms":-1}`, nil, 400, "invalid-request"},
		{"lease above max", "POST", "/v1/keys/k/begin", `{"lease_ms":3600001}`, nil, 400, "invalid-request"},
		{"lease overflow", "POST", "/v1/keys/k/begin", `{"lease_ms":99999999999999999999}`, nil, 400, "invalid-request"},
		{"ttl zero", "POST", "/v1/keys/k/begin", `{"ttl_ms":0}`, nil, 400, "invalid-request"},
		{"ttl above max", "POST", "/v1/keys/k/begin", `{"ttl_ms":2592000001}`, nil, 400, "invalid-request"},
		{"wait negative", "POST", "/v1/keys/k/begin", `{"wait_ms":-5}`, nil, 400, "invalid-request"},
		{"wait above max", "POST", "/v1/keys/k/begin", `{"wait_ms":30001}`, nil, 400, "invalid-request"},
		{"renew lease above max", "POST", "/v1/keys/held/renew", map[string]any{"token": tok, "lease_ms": 3600001}, nil, 400, "invalid-request"},
		{"complete ttl above max", "POST", "/v1/keys/held/complete", resp(map[string]any{"ttl_ms": 2592000001}), nil, 400, "invalid-request"},
		// Required fields.
		{"complete without body", "POST", "/v1/keys/held/complete", nil, nil, 400, "invalid-request"},
		{"complete without token", "POST", "/v1/keys/held/complete", `{"response":{"status":200}}`, nil, 400, "invalid-request"},
		{"complete without response", "POST", "/v1/keys/held/complete", `{"token":"t"}`, nil, 400, "invalid-request"},
		{"complete without status", "POST", "/v1/keys/held/complete", `{"token":"t","response":{}}`, nil, 400, "invalid-request"},
		{"renew without token", "POST", "/v1/keys/held/renew", `{}`, nil, 400, "invalid-request"},
		{"release without token", "POST", "/v1/keys/held/release", `{"token":""}`, nil, 400, "invalid-request"},
		// Sizes.
		{"request body too large", "POST", "/v1/keys/k/begin", `{"fingerprint":"` + strings.Repeat("x", 200<<10) + `"}`, nil, 413, "payload-too-large"},
		{"stored body too large", "POST", "/v1/keys/held/complete", map[string]any{"token": tok, "response": map[string]any{"status": 200, "body": big}}, nil, 422, "invalid-response"},
		{"too many headers", "POST", "/v1/keys/held/complete", map[string]any{"token": tok, "response": map[string]any{"status": 200, "headers": manyHeaders}}, nil, 422, "invalid-response"},
		{"bad header name", "POST", "/v1/keys/held/complete", map[string]any{"token": tok, "response": map[string]any{"status": 200, "headers": map[string][]string{"Bad Name": {"v"}}}}, nil, 422, "invalid-response"},
		{"header value with newline", "POST", "/v1/keys/held/complete", map[string]any{"token": tok, "response": map[string]any{"status": 200, "headers": map[string][]string{"X": {"a\r\nSet-Cookie: x"}}}}, nil, 422, "invalid-response"},
		{"stored Set-Cookie", "POST", "/v1/keys/held/complete", map[string]any{"token": tok, "response": map[string]any{"status": 200, "headers": map[string][]string{"set-cookie": {"s=1"}}}}, nil, 422, "invalid-response"},
		// Methods, media types and routes.
		{"GET on begin", "GET", "/v1/keys/k/begin", nil, nil, 405, "method-not-allowed"},
		{"PUT on record", "PUT", "/v1/keys/k", "{}", nil, 405, "method-not-allowed"},
		{"form body", "POST", "/v1/keys/k/begin", "a=b", []string{"Content-Type", "application/x-www-form-urlencoded"}, 415, "unsupported-media-type"},
		{"text body", "POST", "/v1/keys/held/complete", "{}", []string{"Content-Type", "text/plain"}, 415, "unsupported-media-type"},
		{"body without a media type", "POST", "/v1/keys/k/begin", "{}", []string{"Content-Type", ""}, 415, "unsupported-media-type"},
		{"+json media type", "POST", "/v1/keys/k/begin", "{}", []string{"Content-Type", "application/merge-patch+json"}, 415, "unsupported-media-type"},
		{"charset not UTF-8", "POST", "/v1/keys/k/begin", "{}", []string{"Content-Type", "application/json; charset=latin1"}, 415, "unsupported-media-type"},
		{"complete with no body and a form type", "POST", "/v1/keys/held/complete", "", []string{"Content-Type", "application/x-www-form-urlencoded"}, 400, "invalid-request"},
		{"unknown route", "GET", "/v2/keys/k", nil, nil, 404, "no-such-path"},
		{"unknown action", "POST", "/v1/keys/k/explode", "{}", nil, 404, "no-such-path"},
		{"trailing slash GET", "GET", "/v1/keys/held/", nil, nil, 404, "no-such-path"},
		{"trailing slash DELETE", "DELETE", "/v1/keys/held/", nil, nil, 404, "no-such-path"},
	}
	if len(cases) < 50 {
		t.Fatalf("only %d malformed cases", len(cases))
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := e.bad(c.method, c.path, c.body, c.hdr...)
			wantStatus(t, r, c.status, c.problem)
		})
	}
	// An unknown path says so, not "No such record." (a review of the spec's find).
	if r := e.bad("GET", "/v2/keys/k", nil); !bytes.Contains(r.body, []byte("No such path")) {
		t.Errorf("unknown path: %s, want a detail saying no such path", r.body)
	}
	// None of it disturbed the held key.
	wantStatus(t, e.do("POST", "/v1/keys/held/complete", completeBody(tok, 200, "ok")), 200, "")
}

// cancelledStore answers every Begin with an error that wraps context.Canceled, as a store
// client may when a call of its own was cut short.
type cancelledStore struct{ keys.Store }

func (cancelledStore) Begin(context.Context, string, string, keys.BeginRequest) (keys.BeginResult, error) {
	return keys.BeginResult{}, fmt.Errorf("begin: %w: %w", keys.ErrUnavailable, context.Canceled)
}

// TestStoreCancellationIsNotInProgress: a store call that failed is 503, never 409: a 409 says
// another caller holds the key, which nobody may claim without the store's word.
func TestStoreCancellationIsNotInProgress(t *testing.T) {
	t.Parallel()
	s, err := bolt.OpenDir(t.TempDir(), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	e := newEnv(t, servertest.Options{Store: cancelledStore{s}})
	for _, body := range []any{nil, map[string]any{"wait_ms": 50}} {
		wantStatus(t, e.do("POST", "/v1/keys/k/begin", body), http.StatusServiceUnavailable, "unavailable")
	}
}

// switchStore fails every operation and Ping while down is set, as a store that lost its disk or
// its Redis does.
type switchStore struct {
	keys.Store
	down *atomic.Bool
}

func (s switchStore) Begin(ctx context.Context, tenant, key string, req keys.BeginRequest) (keys.BeginResult, error) {
	if s.down.Load() {
		return keys.BeginResult{}, fmt.Errorf("begin: %w: dial tcp: connection refused", keys.ErrUnavailable)
	}
	return s.Store.Begin(ctx, tenant, key, req)
}

func (s switchStore) Ping(ctx context.Context) error {
	if s.down.Load() {
		return fmt.Errorf("ping: %w: dial tcp: connection refused", keys.ErrUnavailable)
	}
	return s.Store.Ping(ctx)
}

// outageEnv is a server on wrap(a store), its log, and the store's health lines logged so far.
func outageEnv(t *testing.T, wrap func(keys.Store) keys.Store) (*env, *observer.ObservedLogs, func() []observer.LoggedEntry) {
	t.Helper()
	core, logs := observer.New(zapcore.InfoLevel)
	base := newEnv(t, servertest.Options{})
	e := newEnv(t, servertest.Options{Store: wrap(base.srv.Store), Logger: zap.New(core)})
	return e, logs, func() []observer.LoggedEntry {
		return logs.Filter(func(le observer.LoggedEntry) bool { return strings.HasPrefix(le.Message, "store ") }).All()
	}
}

// TestStoreOutageLogged: an outage is one warning when it starts and one line when it ends,
// however many requests and probes fail meanwhile (an audit saw a warning per request and per
// /readyz, and nothing when the store came back).
func TestStoreOutageLogged(t *testing.T) {
	t.Parallel()
	var down atomic.Bool
	e, logs, health := outageEnv(t, func(s keys.Store) keys.Store { return switchStore{s, &down} })
	down.Store(true)
	for i := range 20 {
		wantStatus(t, e.do("POST", "/v1/keys/k"+strconv.Itoa(i)+"/begin", nil), 503, "unavailable")
		wantStatus(t, e.do("GET", "/readyz", nil), 503, "unavailable")
	}
	if got := health(); len(got) != 1 || got[0].Level != zapcore.WarnLevel || !strings.Contains(got[0].ContextMap()["error"].(string), "connection refused") {
		t.Fatalf("40 failed requests logged %v, want one warning with the cause", got)
	}
	if n := logs.FilterMessage("request failed").Len(); n != 0 {
		t.Errorf("%d 'request failed' lines for the store's 503s, want none", n)
	}
	down.Store(false)
	wantStatus(t, e.do("POST", "/v1/keys/up/begin", nil), 201, "")
	wantStatus(t, e.do("POST", "/v1/keys/up2/begin", nil), 201, "")
	got := health()
	if len(got) != 2 || got[1].Message != "store available again" || got[1].ContextMap()["failed_requests"] != int64(40) {
		t.Errorf("after the store answered again: %v, want one 'store available again' with failed_requests 40", got)
	}
}

// fullStore refuses every write while full is set, as bbolt on a full disk or Redis at its
// maxmemory do, and still answers reads: a begin of a completed key replays.
type fullStore struct {
	keys.Store
	full *atomic.Bool
}

var errNoSpace = fmt.Errorf("%w: write: no space left on device", keys.ErrUnavailable)

func (s fullStore) Begin(ctx context.Context, tenant, key string, req keys.BeginRequest) (keys.BeginResult, error) {
	if s.full.Load() {
		if rec, err := s.Store.Get(ctx, tenant, key); err != nil || rec.State != keys.StateCompleted {
			return keys.BeginResult{}, errNoSpace
		}
	}
	return s.Store.Begin(ctx, tenant, key, req)
}

func (s fullStore) Complete(ctx context.Context, tenant, key string, req keys.CompleteRequest) (keys.Record, error) {
	if s.full.Load() {
		return keys.Record{}, errNoSpace
	}
	return s.Store.Complete(ctx, tenant, key, req)
}

// TestStoreOutageOfWrites: a store that answers reads but refuses writes is one outage until a
// write succeeds. Replays, GETs and /readyz (which a full disk does not fail) used to end it
// with "store available again" while every write still got 503, and the next write began
// another outage.
func TestStoreOutageOfWrites(t *testing.T) {
	t.Parallel()
	var full atomic.Bool
	e, _, health := outageEnv(t, func(s keys.Store) keys.Store { return fullStore{s, &full} })
	l := e.begin("done", nil)
	wantStatus(t, e.do("POST", "/v1/keys/done/complete", completeBody(l.token, 201, `{"id":1}`)), 200, "")
	full.Store(true)
	for i := range 10 {
		wantStatus(t, e.do("POST", "/v1/keys/new"+strconv.Itoa(i)+"/begin", nil), 503, "unavailable")
		wantStatus(t, e.do("POST", "/v1/keys/done/begin", nil), 200, "")
		wantStatus(t, e.do("GET", "/v1/keys/done", nil), 200, "")
		wantStatus(t, e.do("GET", "/v1/keys/absent", nil), 404, "not-found")
		wantStatus(t, e.do("GET", "/readyz", nil), 200, "")
	}
	if got := health(); len(got) != 1 || got[0].Level != zapcore.WarnLevel || !strings.Contains(got[0].ContextMap()["error"].(string), "no space") {
		t.Fatalf("writes failing while reads succeed logged %v, want one warning (the outage goes on)", got)
	}
	full.Store(false)
	wantStatus(t, e.do("POST", "/v1/keys/up/begin", nil), 201, "")
	got := health()
	if len(got) != 2 || got[1].Message != "store available again" || got[1].ContextMap()["failed_requests"] != int64(10) {
		t.Errorf("after a write succeeded: %v, want one 'store available again' with failed_requests 10", got)
	}
}

// hangingStore's Begin waits for its caller to go away, and then fails as the Redis store
// does: unavailable, wrapping the context's error.
type hangingStore struct {
	keys.Store
	started chan struct{}
}

func (s hangingStore) Begin(ctx context.Context, tenant, key string, req keys.BeginRequest) (keys.BeginResult, error) {
	s.started <- struct{}{}
	<-ctx.Done()
	return keys.BeginResult{}, fmt.Errorf("begin: %w: %w", keys.ErrUnavailable, ctx.Err())
}

// TestClientGoneIsNoOutage: a client that goes away while the store works is no store outage:
// no "store unavailable" line, and result="cancelled" in the store's metric, not "unavailable",
// which operators alert on (a chaos audit saw clients' timeouts raise both). But a client that
// waited more than healthPatience before it left was waiting on a store that hangs: that is an
// outage, logged and counted (a review: impatient clients hid a hung store).
func TestClientGoneIsNoOutage(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name     string
		after    time.Duration // before the client goes away
		result   string
		outage   bool
		notFound string
	}{
		{"AtOnce", 0, "cancelled", false, "unavailable"},
		{"AfterWaiting", 700 * time.Millisecond, "unavailable", true, "cancelled"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			started := make(chan struct{}, 1)
			e, _, health := outageEnv(t, func(s keys.Store) keys.Store { return hangingStore{s, started} })
			ctx, cancel := context.WithCancel(t.Context())
			req, err := http.NewRequestWithContext(ctx, "POST", e.srv.URL+"/v1/keys/gone/begin", nil)
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			go func() {
				defer close(done)
				if resp, err := http.DefaultClient.Do(req); err == nil {
					resp.Body.Close()
				}
			}()
			<-started
			time.Sleep(c.after)
			cancel()
			<-done
			var metrics string
			want := `op="begin",result="` + c.result + `"`
			for deadline := time.Now().Add(10 * time.Second); !strings.Contains(metrics, want); time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("no %s within 10 s:\n%s", want, metrics)
				}
				metrics = string(e.do("GET", "/metrics", nil).body)
			}
			if strings.Contains(metrics, `result="`+c.notFound+`"`) {
				t.Errorf("counted as %s too", c.notFound)
			}
			if got := health(); (len(got) != 0) != c.outage {
				t.Errorf("logged %v, want an outage: %v", got, c.outage)
			}
		})
	}
}

// TestStoreHealthFlapping: a store that fails every other request logs one outage per
// healthQuiet, not a pair of lines per request, and the next logged start counts the rest.
func TestStoreHealthFlapping(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	h := server.NewStoreHealthForTest(zap.New(core))
	for range 50 {
		h.Failure(errors.New("timeout"), "r")
		h.Success()
	}
	if n := logs.Len(); n != 2 {
		t.Fatalf("50 brief outages logged %d lines, want 2 (the first's start and end): %v", n, logs.All())
	}
	h.Age(11 * time.Second) // healthQuiet later
	h.Failure(errors.New("timeout"), "r")
	last := logs.All()[logs.Len()-1]
	if last.Message != "store unavailable: requests get 503 until it answers again" || last.ContextMap()["brief_outages_before"] != int64(49) {
		t.Errorf("the next start: %s %v, want one counting the 49 unlogged outages", last.Message, last.ContextMap())
	}
	h.Age(61 * time.Second) // healthReminder later, still down
	h.Failure(errors.New("timeout"), "r")
	if last := logs.All()[logs.Len()-1]; last.Message != "store still unavailable" {
		t.Errorf("a minute into an outage: %q, want a reminder", last.Message)
	}
}

// TestCompleteAgainInOtherCase: the same complete again, its header names spelled in another
// case, is the same response (HTTP names are case-insensitive): 200, not 409 already-completed
// (a contract audit's find).
func TestCompleteAgainInOtherCase(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{})
	r := e.do("POST", "/v1/keys/case/begin", nil)
	wantStatus(t, r, 201, "")
	tok := r.json(t)["lease"].(map[string]any)["token"].(string)
	complete := func(name string) reply {
		return e.do("POST", "/v1/keys/case/complete", `{"token":"`+tok+`","response":{"status":201,"headers":{"`+name+`":["application/json"]},"body":"e30="}}`)
	}
	wantStatus(t, complete("content-type"), 200, "")
	wantStatus(t, complete("Content-Type"), 200, "")
	wantStatus(t, complete("CONTENT-TYPE"), 200, "")
	wantStatus(t, complete("Content-Length"), 409, "already-completed") // another header
}

// TestHead: every GET path answers HEAD with what GET answers, status and headers, without the
// body (RFC 9110 §9.3.2); they were 405, which made monitors that probe with HEAD (curl -I,
// wget --spider) see a healthy service as failing.
func TestHead(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{})
	l := e.begin("done", nil)
	wantStatus(t, e.do("POST", "/v1/keys/done/complete", completeBody(l.token, 201, `{"id":1}`)), 200, "")
	for _, path := range []string{"/v1/keys/done", "/v1/keys/absent", "/v1/keys/", "/healthz", "/readyz", "/metrics", "/openapi.yaml"} {
		get, head := e.do("GET", path, nil), e.do("HEAD", path, nil)
		if head.status != get.status || head.status == 405 {
			t.Errorf("HEAD %s: %d, GET: %d", path, head.status, get.status)
		}
		if len(head.body) != 0 {
			t.Errorf("HEAD %s: a body of %d bytes", path, len(head.body))
		}
		for _, h := range []string{"Content-Type", "X-Request-Id"} {
			if head.header.Get(h) == "" || h == "Content-Type" && head.header.Get(h) != get.header.Get(h) {
				t.Errorf("HEAD %s: %s %q, GET's %q", path, h, head.header.Get(h), get.header.Get(h))
			}
		}
	}
	// HEAD of a record takes the token, as GET does, and sees only its tenant's records.
	tokens := map[string]string{"alpha": "alpha-token-0123456789", "beta": "beta-token-0123456789"}
	e = newEnv(t, servertest.Options{Tokens: tokens})
	e.token = tokens["alpha"]
	e.begin("mine", nil)
	for _, c := range []struct {
		token string
		want  int
	}{{tokens["alpha"], 200}, {tokens["beta"], 404}, {"", 401}, {"wrong", 401}} {
		e.token = c.token
		r := e.do("HEAD", "/v1/keys/mine", nil)
		if r.status != c.want || c.want == 401 && r.header.Get("WWW-Authenticate") != "Bearer" {
			t.Errorf("HEAD with token %q: %d (WWW-Authenticate %q), want %d", c.token, r.status, r.header.Get("WWW-Authenticate"), c.want)
		}
	}
}

// TestRequestIDsAreDistinct: ids the server makes are 24 lowercase hex digits, no two alike,
// from many goroutines at once, and they share the process's prefix.
func TestRequestIDsAreDistinct(t *testing.T) {
	const goroutines, each = 8, 20_000
	ids := make(chan []string, goroutines)
	for range goroutines {
		go func() {
			mine := make([]string, each)
			for i := range mine {
				mine[i] = server.NewRequestID()
			}
			ids <- mine
		}()
	}
	seen := make(map[string]bool, goroutines*each)
	prefix := ""
	for range goroutines {
		for _, id := range <-ids {
			if len(id) != 24 || strings.Trim(id, "0123456789abcdef") != "" {
				t.Fatalf("request id %q is not 24 lowercase hex digits", id)
			}
			if seen[id] {
				t.Fatalf("request id %q made twice", id)
			}
			seen[id] = true
			if prefix == "" {
				prefix = id[:8]
			} else if id[:8] != prefix {
				t.Fatalf("request id %q lacks the process's prefix %s", id, prefix)
			}
		}
	}
}

// TestWriteAnswersSentEarly: the answers to writes (a begin that acquires, a renew, a complete),
// which observe flushes as soon as they are logged (sendEarly), keep their Content-Length (an
// answer flushed before its length is known goes out in chunks), and each is logged before its
// client has it.
func TestWriteAnswersSentEarly(t *testing.T) {
	t.Parallel()
	core, logs := observer.New(zapcore.InfoLevel)
	e := newEnv(t, servertest.Options{Logger: zap.New(core)})
	check := func(what string, r reply, want int) {
		t.Helper()
		wantStatus(t, r, want, "")
		if got := r.header.Get("Content-Length"); got != strconv.Itoa(len(r.body)) {
			t.Errorf("%s: Content-Length %q for a body of %d bytes (Transfer-Encoding chunked?)", what, got, len(r.body))
		}
		if n := len(logs.FilterMessage("request").AllUntimed()); n != 1 {
			t.Errorf("%s: %d access lines when the client had its answer, want 1", what, n)
		}
		logs.TakeAll()
	}
	r := e.do("POST", "/v1/keys/early/begin", nil)
	check("begin", r, http.StatusCreated)
	tok := r.json(t)["lease"].(map[string]any)["token"].(string)
	check("renew", e.do("POST", "/v1/keys/early/renew", map[string]any{"token": tok, "lease_ms": 5000}), http.StatusOK)
	check("complete", e.do("POST", "/v1/keys/early/complete", completeBody(tok, 201, `{"id":7}`)), http.StatusOK)
	check("replay", e.do("POST", "/v1/keys/early/begin", nil), http.StatusOK)
}
