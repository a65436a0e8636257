package tenants

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/idemsvc/idemsvc/internal/apitest"
	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server/servertest"
	"github.com/idemsvc/idemsvc/internal/storage/redis"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

// The two tenants. Their names have the same length, so that the storage id of ("alpha", key)
// and ("bravo", key) differ only in the tenant's bytes.
const (
	tenantA, tokenA = "alpha", "token-of-alpha-0123456789"
	tenantB, tokenB = "bravo", "token-of-bravo-0123456789"
)

// The keys tenant A holds when tenant B probes: one in progress, one completed; and the key
// nobody ever used, which is what B must see in A's place.
const (
	keyInProgress = "k-prog"
	keyCompleted  = "k-done"
	keyAbsent     = "k-none"
	fpA           = "sha256:alpha-request"
)

var tokens = map[string]string{tenantA: tokenA, tenantB: tokenB}

func TestTenantsBolt(t *testing.T) {
	t.Parallel()
	runTenants(t, func(t *testing.T) *servertest.Server {
		clock := storagetest.NewClock(storagetest.Start) // stands still: answers compare exactly
		return servertest.Start(t, servertest.Options{Tokens: tokens, Now: clock.Now})
	})
}

func TestTenantsRedis(t *testing.T) {
	t.Parallel()
	url := redistest.URL(t)
	prefix := redistest.Prefix(t)
	runTenants(t, func(t *testing.T) *servertest.Server {
		clock := storagetest.NewClock(storagetest.Start)
		store, err := redis.Open(context.Background(), url, redis.Options{
			Now: clock.Now, Prefix: prefix + "-" + strings.ReplaceAll(t.Name(), "/", "-"),
		})
		if err != nil {
			t.Fatalf("open redis: %v", err)
		}
		t.Cleanup(func() { _ = store.Close() })
		return servertest.Start(t, servertest.Options{Store: store, Tokens: tokens, Now: clock.Now})
	})
}

// world is tenant A's records, as A saw them when it made them.
type world struct {
	tokInProgress string // A's lease on keyInProgress
	tokCompleted  string // the lease that completed keyCompleted
	respA         map[string]any
	getInProgress []byte // A's GET of keyInProgress
	getCompleted  []byte // A's GET of keyCompleted
}

// runTenants runs each proof on its own server, which start returns, where A has made its
// records and B has made none yet.
func runTenants(t *testing.T, start func(t *testing.T) *servertest.Server) {
	setUp := func(t *testing.T) (*api, *world) {
		t.Parallel()
		srv := start(t)
		c := &api{t: t, base: srv.URL, client: apitest.NewValidator(t).Client(t, nil)}
		return c, setUpA(t, c)
	}

	t.Run("ForeignKeysLookAbsent", func(t *testing.T) {
		c, w := setUp(t)
		want := c.probe(keyAbsent, w)
		for i, a := range want {
			t.Logf("step %2d: %s", i+1, a)
		}
		for _, key := range []string{keyInProgress, keyCompleted} {
			got := c.probe(key, w)
			if len(got) != len(want) {
				t.Fatalf("probe of %s: %d answers, want %d", key, len(got), len(want))
			}
			for i := range got {
				if got[i] != want[i] {
					t.Errorf("as %s on %s's %s, step %d answers\n  %s\nbut on a key nobody used\n  %s",
						tenantB, tenantA, key, i+1, got[i], want[i])
				}
			}
		}
		w.checkIntact(c)
	})

	t.Run("Unauthenticated", func(t *testing.T) {
		c, w := setUp(t)
		// Without a valid credential every endpoint is 401, the same on A's keys as on none.
		for _, token := range []string{"", "not-a-token", tokenA + "x", "Basic " + tokenA} {
			want := c.unauth(keyAbsent, token, w)
			for _, key := range []string{keyInProgress, keyCompleted} {
				got := c.unauth(key, token, w)
				for i := range got {
					if got[i] != want[i] {
						t.Errorf("token %q on %s, step %d answers\n  %s\nbut on a key nobody used\n  %s",
							token, key, i+1, got[i], want[i])
					}
				}
			}
		}
		w.checkIntact(c)
	})

	t.Run("OwnKeysIndependent", func(t *testing.T) {
		c, w := setUp(t)
		// B's record on a key A also uses, and on a key of its own.
		for _, key := range []string{keyInProgress, "b-own"} {
			r := c.do(tenantB, "POST", keyPath(key, "begin"), map[string]any{"fingerprint": "fp-b"})
			c.expect(r, 201, "")
			tokB := r.token(t)
			c.expect(c.do(tenantB, "POST", keyPath(key, "complete"), completeBody(tokB, respB)), 200, "")
			// A's calls with B's token, on B's key, change nothing of B's.
			status, problem := expectForA(key)
			c.expect(c.do(tenantA, "POST", keyPath(key, "complete"), completeBody(tokB, respB)), status, problem)
			c.expect(c.do(tenantA, "POST", keyPath(key, "renew"), map[string]any{"token": tokB}), status, problem)
			status, problem = expectReleaseForA(key)
			c.expect(c.do(tenantA, "POST", keyPath(key, "release"), map[string]any{"token": tokB}), status, problem)
			if key != keyInProgress { // A's delete of its own keyInProgress would remove A's record
				c.expect(c.do(tenantA, "DELETE", keyPath(key, ""), nil), 204, "")
			}
			r = c.do(tenantB, "POST", keyPath(key, "begin"), map[string]any{"fingerprint": "fp-b"})
			c.expect(r, 200, "")
			if got := r.json(t)["response"]; !equalJSON(got, respB) {
				t.Errorf("B's replay of %s = %v, want B's response %v", key, got, respB)
			}
		}
		w.checkIntact(c)
	})

	t.Run("NoTenantInBody", func(t *testing.T) {
		c, w := setUp(t)
		for _, field := range []string{"tenant", "Tenant", "TENANT", "tenant_id"} {
			for _, tc := range []struct {
				op   string
				body map[string]any
			}{
				{"begin", map[string]any{"fingerprint": fpA}},
				{"complete", completeBody(w.tokInProgress, w.respA)},
				{"renew", map[string]any{"token": w.tokInProgress}},
				{"release", map[string]any{"token": w.tokInProgress}},
			} {
				tc.body[field] = tenantA
				r := c.bad(tenantB, "POST", keyPath(keyInProgress, tc.op), tc.body)
				c.expect(r, 400, "invalid-request")
				if d, _ := r.json(t)["detail"].(string); !strings.Contains(d, "unknown field") {
					t.Errorf("%s with %q: detail %q does not name the unknown field", tc.op, field, d)
				}
			}
		}
		// Nested too: the stored response has no tenant either.
		body := completeBody(w.tokInProgress, w.respA)
		body["response"].(map[string]any)["tenant"] = tenantA
		c.expect(c.bad(tenantB, "POST", keyPath(keyInProgress, "complete"), body), 400, "invalid-request")
		w.checkIntact(c)
	})

	t.Run("NoTenantInPath", func(t *testing.T) {
		c, w := setUp(t)
		begun := map[string]bool{}
		for _, tc := range []struct {
			raw  string // the path segment(s) after /v1/keys/, sent as is
			key  string // the key B then names, or "" when the request names none
			want string // the problem of B's GET: not-found (no such record), no-such-path (no route) or invalid-key
		}{
			{"alpha:k-prog", "alpha:k-prog", "not-found"},
			{"alpha%3Ak-prog", "alpha:k-prog", "not-found"},
			{"alpha%3ak-prog", "alpha:k-prog", "not-found"},
			{"%61lpha:k-prog", "alpha:k-prog", "not-found"},
			{"alpha%2Fk-prog", "alpha/k-prog", "not-found"},
			{"alpha%2fk-prog", "alpha/k-prog", "not-found"},
			{"alpha%252Fk-prog", "alpha%2Fk-prog", "not-found"},
			{"..%2Falpha%2Fk-prog", "../alpha/k-prog", "not-found"},
			{"k-prog;tenant=alpha", "k-prog;tenant=alpha", "not-found"},
			{"k-prog%3Ftenant=alpha", "k-prog?tenant=alpha", "not-found"},
			{"k-prog?tenant=alpha", "k-prog", "not-found"}, // a query: still B's k-prog
			{"k-prog#alpha", "k-prog", "not-found"},        // a fragment is never sent
			{"%05alpha%00k-prog", "", "invalid-key"},
			{"alpha%20k-prog", "", "invalid-key"},
			{"%2E%2E", "", "invalid-key"},
			{"alpha/k-prog", "", "no-such-path"},     // two segments: no route
			{"k-prog/../k-prog", "", "no-such-path"}, // not cleaned: no route
		} {
			path := "/v1/keys/" + tc.raw
			withOp := func(op string) string {
				p, q, _ := strings.Cut(tc.raw, "?")
				p, _, _ = strings.Cut(p, "#")
				if q != "" {
					q = "?" + q
				}
				return "/v1/keys/" + p + "/" + op + q
			}
			if begun[tc.key] {
				// An earlier row began this very key as B: the path still names B's record.
				r := c.bad(tenantB, "GET", path, nil)
				c.expect(r, 200, "")
				if got := r.json(t)["key"]; got != tc.key {
					t.Errorf("B's GET %s: key %v, want %q", path, got, tc.key)
				}
				c.expect(c.bad(tenantB, "POST", withOp("complete"), completeBody(w.tokInProgress, w.respA)), 409, "lease-lost")
				continue
			}
			// B's GET, and A's own token used as B, find nothing: the path names B's key.
			c.expect(c.bad(tenantB, "GET", path, nil), problemStatus(tc.want), tc.want)
			c.expect(c.bad(tenantB, "POST", withOp("complete"), completeBody(w.tokInProgress, w.respA)), problemStatus(tc.want), tc.want)
			c.expect(c.bad(tenantB, "POST", withOp("renew"), map[string]any{"token": w.tokInProgress}), problemStatus(tc.want), tc.want)
			if tc.key == "" {
				continue
			}
			// B's begin makes B's own record, named literally, with B's own lease.
			r := c.bad(tenantB, "POST", withOp("begin"), map[string]any{"fingerprint": fpA})
			c.expect(r, 201, "")
			begun[tc.key] = true
			rec := r.json(t)
			if rec["key"] != tc.key {
				t.Errorf("B's begin on %s: key %v, want %q", path, rec["key"], tc.key)
			}
			if tok := r.token(t); tok == w.tokInProgress {
				t.Errorf("B's begin on %s got A's lease", path)
			}
			if tc.key != keyInProgress { // A still sees nothing under that name
				c.expect(c.bad(tenantA, "GET", keyPath(tc.key, ""), nil), 404, "not-found")
			}
		}
		w.checkIntact(c)
	})

	t.Run("NoTenantInHeaders", func(t *testing.T) {
		c, w := setUp(t)
		headers := []http.Header{
			{"X-Tenant": {tenantA}},
			{"X-Idemsvc-Tenant": {tenantA}},
			{"Idemsvc-Tenant": {tenantA}},
			{"Tenant": {tenantA}},
			{"X-Tenant-Id": {tenantA}},
			{"Forwarded": {"for=192.0.2.1;by=alpha;host=alpha;tenant=alpha"}},
			{"X-Forwarded-User": {tenantA}},
			{"X-Forwarded-Host": {tenantA}},
			{"X-Remote-User": {tenantA}},
			{"X-Auth-Request-User": {tenantA}},
			{"X-Original-Url": {"/v1/keys/k-prog"}},
			{"X-Rewrite-Url": {"/v1/keys/k-prog"}},
			{"X-Http-Method-Override": {"DELETE"}},
			{"Cookie": {"tenant=alpha"}},
			{"Proxy-Authorization": {"Bearer " + tokenA}},
		}
		all := http.Header{}
		for _, h := range headers {
			for k, v := range h {
				all[k] = v
			}
		}
		headers = append(headers, all)
		for i, h := range headers {
			name := fmt.Sprint(h)
			c.expect(c.send(tenantB, "GET", keyPath(keyInProgress, ""), nil, h, false), 404, "not-found")
			c.expect(c.send(tenantB, "POST", keyPath(keyCompleted, "complete"), completeBody(w.tokCompleted, w.respA), h, false), 404, "not-found")
			c.expect(c.send(tenantB, "POST", keyPath(keyInProgress, "renew"), map[string]any{"token": w.tokInProgress}, h, false), 404, "not-found")
			// B's begin on A's completed key acquires (never replays A's response); B then
			// releases, so the next header set starts from the same state.
			r := c.send(tenantB, "POST", keyPath(keyCompleted, "begin"), map[string]any{"fingerprint": "fp-b"}, h, false)
			c.expect(r, 201, "")
			if r.status == 201 {
				tokB := r.token(t)
				c.expect(c.send(tenantB, "POST", keyPath(keyCompleted, "release"), map[string]any{"token": tokB}, h, false), 204, "")
			}
			// A new key begun with the header lands in B's namespace, not A's.
			key := fmt.Sprintf("hdr-%d", i)
			c.expect(c.send(tenantB, "POST", keyPath(key, "begin"), nil, h, false), 201, "")
			c.expect(c.do(tenantA, "GET", keyPath(key, ""), nil), 404, "not-found")
			c.expect(c.do(tenantB, "GET", keyPath(key, ""), nil), 200, "")
			if t.Failed() {
				t.Fatalf("with header %s", name)
			}
		}
		w.checkIntact(c)
	})
}

// respA and respB are the responses the tenants store.
var (
	respA = map[string]any{"status": 201.0, "headers": map[string]any{"Content-Type": []any{"application/json"}},
		"body": base64.StdEncoding.EncodeToString([]byte(`{"owner":"alpha"}`))}
	respB = map[string]any{"status": 202.0, "headers": map[string]any{"X-Owner": []any{"bravo"}},
		"body": base64.StdEncoding.EncodeToString([]byte(`{"owner":"bravo"}`))}
)

func completeBody(token string, resp map[string]any) map[string]any {
	r := map[string]any{}
	for k, v := range resp {
		r[k] = v
	}
	return map[string]any{"token": token, "response": r}
}

// setUpA makes A's records: keyInProgress held by A, keyCompleted completed with respA.
func setUpA(t *testing.T, c *api) *world {
	w := &world{respA: respA}
	r := c.do(tenantA, "POST", keyPath(keyInProgress, "begin"), map[string]any{"fingerprint": fpA, "lease_ms": 600000})
	c.expect(r, 201, "")
	w.tokInProgress = r.token(t)

	r = c.do(tenantA, "POST", keyPath(keyCompleted, "begin"), map[string]any{"fingerprint": fpA})
	c.expect(r, 201, "")
	w.tokCompleted = r.token(t)
	c.expect(c.do(tenantA, "POST", keyPath(keyCompleted, "complete"), completeBody(w.tokCompleted, respA)), 200, "")

	w.getInProgress = c.do(tenantA, "GET", keyPath(keyInProgress, ""), nil).body
	w.getCompleted = c.do(tenantA, "GET", keyPath(keyCompleted, ""), nil).body
	if t.Failed() {
		t.FailNow()
	}
	return w
}

// checkIntact checks, as A, that A's records are exactly as A left them and still A's: the
// lease still completes and the completed record still replays A's response.
func (w *world) checkIntact(c *api) {
	c.t.Helper()
	if got := c.do(tenantA, "GET", keyPath(keyInProgress, ""), nil).body; !bytes.Equal(got, w.getInProgress) {
		c.t.Errorf("A's %s changed:\n  now  %s\n  was  %s", keyInProgress, got, w.getInProgress)
	}
	if got := c.do(tenantA, "GET", keyPath(keyCompleted, ""), nil).body; !bytes.Equal(got, w.getCompleted) {
		c.t.Errorf("A's %s changed:\n  now  %s\n  was  %s", keyCompleted, got, w.getCompleted)
	}
	r := c.do(tenantA, "POST", keyPath(keyCompleted, "begin"), map[string]any{"fingerprint": fpA})
	c.expect(r, 200, "")
	if got := r.json(c.t)["response"]; !equalJSON(got, w.respA) {
		c.t.Errorf("A's replay = %v, want %v", got, w.respA)
	}
	// A's lease is still A's: renew answers 200 (a complete would end the record's use here).
	c.expect(c.do(tenantA, "POST", keyPath(keyInProgress, "renew"), map[string]any{"token": w.tokInProgress, "lease_ms": 600000}), 200, "")
	w.getInProgress = c.do(tenantA, "GET", keyPath(keyInProgress, ""), nil).body
}

// probe calls every endpoint as B on key, as a tenant that tries to use, detect or disturb A's
// record would, then lives a whole record of its own on key, and returns the normalized
// answers. On A's keys they must equal the answers on a key nobody used.
func (c *api) probe(key string, w *world) []string {
	c.t.Helper()
	var out []string
	add := func(r reply) { out = append(out, normalize(r, key)) }
	op := func(op string) string { return keyPath(key, op) }

	add(c.do(tenantB, "GET", op(""), nil))
	add(c.do(tenantB, "POST", op("complete"), completeBody(w.tokInProgress, w.respA)))
	add(c.do(tenantB, "POST", op("complete"), completeBody(w.tokCompleted, w.respA))) // A's complete again
	add(c.do(tenantB, "POST", op("complete"), completeBody(keys.NewToken(), w.respA)))
	add(c.do(tenantB, "POST", op("renew"), map[string]any{"token": w.tokInProgress}))
	add(c.do(tenantB, "POST", op("renew"), map[string]any{"token": w.tokCompleted}))
	add(c.do(tenantB, "POST", op("release"), map[string]any{"token": w.tokInProgress}))
	add(c.do(tenantB, "POST", op("release"), map[string]any{"token": w.tokCompleted}))
	add(c.do(tenantB, "DELETE", op(""), nil))
	add(c.do(tenantB, "GET", op(""), nil))
	// B acquires its own lease on key: a new record, never A's lease, never A's response.
	r := c.do(tenantB, "POST", op("begin"), map[string]any{"fingerprint": "other", "wait_ms": 0})
	add(r)
	tokB := ""
	if r.status == 201 {
		tokB = r.token(c.t)
	}
	add(c.do(tenantB, "POST", op("begin"), map[string]any{"fingerprint": "other"}))
	add(c.do(tenantB, "GET", op(""), nil))
	add(c.do(tenantB, "POST", op("begin"), map[string]any{"fingerprint": fpA})) // mismatch with B's
	add(c.do(tenantB, "POST", op("complete"), completeBody(w.tokInProgress, w.respA)))
	add(c.do(tenantB, "POST", op("renew"), map[string]any{"token": w.tokInProgress}))
	add(c.do(tenantB, "POST", op("release"), map[string]any{"token": w.tokInProgress}))
	add(c.do(tenantB, "POST", op("release"), map[string]any{"token": w.tokCompleted}))
	add(c.do(tenantB, "POST", op("renew"), map[string]any{"token": tokB}))
	// B completes and replays its own record.
	add(c.do(tenantB, "POST", op("complete"), completeBody(tokB, respB)))
	add(c.do(tenantB, "POST", op("complete"), completeBody(tokB, respB)))
	add(c.do(tenantB, "POST", op("begin"), map[string]any{"fingerprint": "other"}))
	add(c.do(tenantB, "GET", op(""), nil))
	add(c.do(tenantB, "POST", op("complete"), completeBody(w.tokCompleted, w.respA)))
	add(c.do(tenantB, "POST", op("release"), map[string]any{"token": tokB}))
	return out
}

// unauth calls every endpoint on key with a bad credential (token "" sends none).
func (c *api) unauth(key, token string, w *world) []string {
	c.t.Helper()
	h := http.Header{}
	switch {
	case token == "":
	case strings.HasPrefix(token, "Basic "):
		h.Set("Authorization", token)
	default:
		h.Set("Authorization", "Bearer "+token)
	}
	var out []string
	for _, tc := range []struct {
		method, op string
		body       any
	}{
		{"GET", "", nil},
		{"DELETE", "", nil},
		{"POST", "begin", map[string]any{"fingerprint": fpA}},
		{"POST", "complete", completeBody(w.tokInProgress, w.respA)},
		{"POST", "renew", map[string]any{"token": w.tokInProgress}},
		{"POST", "release", map[string]any{"token": w.tokInProgress}},
	} {
		r := c.send("", tc.method, keyPath(key, tc.op), tc.body, h, strings.HasPrefix(token, "Basic "))
		c.expect(r, 401, "unauthorized")
		out = append(out, normalize(r, key))
	}
	return out
}

func expectForA(key string) (int, string) {
	if key == keyInProgress { // A's own record there: B's token is not its lease
		return 409, "lease-lost"
	}
	return 404, "not-found"
}

func expectReleaseForA(key string) (int, string) {
	if key == keyInProgress {
		return 409, "lease-lost"
	}
	return 204, ""
}

func problemStatus(name string) int {
	switch name {
	case "invalid-key":
		return 400
	case "not-found", "no-such-path":
		return 404
	}
	panic("no status for " + name)
}

func keyPath(key, op string) string {
	p := "/v1/keys/" + url.PathEscape(key)
	if op != "" {
		p += "/" + op
	}
	return p
}

// api sends requests as a tenant through the validating client.
type api struct {
	t      *testing.T
	base   string
	client *http.Client
}

type reply struct {
	status int
	header http.Header
	body   []byte
}

// token returns the lease token of a record answer, or fails t.
func (r reply) token(t testing.TB) string {
	t.Helper()
	var rec struct{ Lease struct{ Token string } }
	if err := json.Unmarshal(r.body, &rec); err != nil || rec.Lease.Token == "" {
		t.Fatalf("no lease token in %d %s", r.status, r.body)
	}
	return rec.Lease.Token
}

func (r reply) json(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatalf("body is not a JSON object: %v: %q", err, r.body)
	}
	return m
}

func (c *api) do(tenant, method, path string, body any) reply {
	c.t.Helper()
	return c.send(tenant, method, path, body, nil, false)
}

// bad sends a request the spec does not allow (on purpose); its answer is still checked.
func (c *api) bad(tenant, method, path string, body any) reply {
	c.t.Helper()
	return c.send(tenant, method, path, body, nil, true)
}

func (c *api) send(tenant, method, path string, body any, h http.Header, malformed bool) reply {
	c.t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			c.t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	// The path is set raw, so that every percent-encoding travels exactly as written.
	req, err := http.NewRequest(method, c.base+"/", rd)
	if err != nil {
		c.t.Fatal(err)
	}
	p, q, _ := strings.Cut(path, "?")
	p, _, _ = strings.Cut(p, "#")
	req.URL.Opaque = p // sent verbatim as the request target's path
	req.URL.RawQuery = q
	if unescaped, err := url.PathUnescape(p); err == nil { // for the validator's router
		req.URL.Path, req.URL.RawPath = unescaped, p
	}
	for k, v := range h {
		req.Header[k] = v
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	switch tenant {
	case tenantA:
		req.Header.Set("Authorization", "Bearer "+tokenA)
	case tenantB:
		req.Header.Set("Authorization", "Bearer "+tokenB)
	}
	if malformed {
		req = apitest.Malformed(req)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return reply{status: resp.StatusCode, header: resp.Header, body: data}
}

// expect checks the status and, for a problem, its type.
func (c *api) expect(r reply, status int, problem string) {
	c.t.Helper()
	if r.status != status {
		c.t.Errorf("status %d, want %d: %s", r.status, status, r.body)
		return
	}
	if problem == "" {
		return
	}
	var p struct{ Type string }
	_ = json.Unmarshal(r.body, &p)
	if want := apitest.ProblemTypePrefix + problem; p.Type != want {
		c.t.Errorf("problem %q, want %q: %s", p.Type, want, r.body)
	}
}

// normalize renders an answer for comparison across keys: status, the headers that carry
// meaning, and the body with the key's own name, lease tokens and fences masked. Times are
// compared as they are (the clock stands still), and so is every other field.
func normalize(r reply, key string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d", r.status)
	for _, h := range []string{"Content-Type", "Retry-After", "Idempotent-Replayed", "Www-Authenticate", "Allow"} {
		if v := r.header.Values(h); len(v) > 0 {
			fmt.Fprintf(&b, " %s=%q", h, v)
		}
	}
	if len(r.body) == 0 {
		return b.String()
	}
	var v any
	if err := json.Unmarshal(r.body, &v); err != nil {
		fmt.Fprintf(&b, " body %q", r.body)
		return b.String()
	}
	mask(v, key)
	j, _ := json.Marshal(v) // map keys sorted
	fmt.Fprintf(&b, " %s", j)
	return b.String()
}

func mask(v any, key string) {
	m, ok := v.(map[string]any)
	if !ok {
		return
	}
	for k, x := range m {
		switch {
		case k == "key" && x == key:
			m[k] = "*key*"
		case k == "instance":
			if s, ok := x.(string); ok {
				m[k] = strings.ReplaceAll(s, "/"+url.PathEscape(key), "/*key*")
			}
		case k == "token":
			m[k] = "*token*"
		case k == "fence":
			// Fences are numbers that grow; bolt draws them from one sequence of the whole
			// store, so their values differ between keys.
			m[k] = "*fence*"
		default:
			mask(x, key)
		}
	}
}

func equalJSON(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}
