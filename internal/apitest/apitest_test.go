package apitest_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/idemsvc/idemsvc/api"
	"github.com/idemsvc/idemsvc/internal/apitest"
)

// recorder is a testing.TB that records Errorf instead of failing, so a test can assert that
// the validator reports what it must.
type recorder struct {
	testing.TB
	mu   sync.Mutex
	errs []string
}

func (r *recorder) Helper() {}

func (r *recorder) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

// Fatalf fails the real test: the validator's client must never stop a test.
func (r *recorder) Fatalf(format string, args ...any) {
	r.TB.Fatalf("unexpected Fatalf: "+format, args...)
}

const (
	leased = `{"key":"k","state":"in_progress","fingerprint":"","lease":{"token":"tok","fence":1,"expires_at":"2026-01-02T03:04:35Z"},"created_at":"2026-01-02T03:04:05Z","expires_at":"2026-01-03T03:04:05Z"}`
	public = `{"key":"k","state":"in_progress","fingerprint":"","lease":{"fence":1,"expires_at":"2026-01-02T03:04:35Z"},"created_at":"2026-01-02T03:04:05Z","expires_at":"2026-01-03T03:04:05Z"}`
)

func problem(name string, status int) string {
	return fmt.Sprintf(`{"type":"urn:idemsvc:problem:%s","title":"t","status":%d,"detail":"d"}`, name, status)
}

// reply is what the test server answers.
type reply struct {
	status int
	header map[string]string // "" deletes a header
	body   string
}

func TestClient(t *testing.T) {
	const beginPath = "/v1/keys/k/begin"
	jsonCT := map[string]string{"Content-Type": "application/json"}
	problemCT := map[string]string{"Content-Type": "application/problem+json"}
	tests := []struct {
		name      string
		method    string
		path      string
		body      string // sent as application/json when not empty
		header    map[string]string
		malformed bool
		reply     reply
		want      string // a substring of the one error the validator must report; "" for none
	}{
		{name: "BeginAcquired", method: "POST", path: beginPath, body: `{"lease_ms":1000}`,
			reply: reply{201, jsonCT, leased}},
		{name: "BeginEmptyBody", method: "POST", path: beginPath,
			reply: reply{201, jsonCT, leased}},
		{name: "RecordMissingState", method: "POST", path: beginPath,
			reply: reply{201, jsonCT, strings.Replace(leased, `"state":"in_progress",`, "", 1)}, want: `"state"`},
		{name: "ProblemWrongContentType", method: "POST", path: beginPath,
			reply: reply{409, map[string]string{"Content-Type": "application/json", "Retry-After": "3"}, problem("in-progress", 409)},
			want:  "application/json"},
		{name: "InProgressOK", method: "POST", path: beginPath,
			reply: reply{409, map[string]string{"Content-Type": "application/problem+json", "Retry-After": "3"}, problem("in-progress", 409)}},
		{name: "InProgressNoRetryAfter", method: "POST", path: beginPath,
			reply: reply{409, problemCT, problem("in-progress", 409)}, want: "Retry-After"},
		{name: "WrongProblemType", method: "POST", path: beginPath,
			reply: reply{409, map[string]string{"Content-Type": "application/problem+json", "Retry-After": "3"}, problem("lease-lost", 409)},
			want:  "lease-lost"},
		{name: "ProblemStatusDiffers", method: "GET", path: "/nope",
			reply: reply{404, problemCT, problem("no-such-path", 400)}, want: "status"},
		{name: "ProblemStatusDiffersUnrouted", method: "GET", path: "/nope",
			reply: reply{400, problemCT, problem("invalid-key", 404)}, want: "is not the response's"},
		{name: "UndocumentedStatus", method: "POST", path: beginPath,
			reply: reply{404, problemCT, problem("not-found", 404)}, want: "status is not supported"},
		{name: "NoRequestID", method: "POST", path: beginPath,
			reply: reply{201, map[string]string{"Content-Type": "application/json", "X-Request-Id": ""}, leased}, want: "X-Request-Id"},
		{name: "GetShowsToken", method: "GET", path: "/v1/keys/k",
			reply: reply{200, jsonCT, leased}, want: "PublicRecord"},
		{name: "GetOK", method: "GET", path: "/v1/keys/k",
			reply: reply{200, jsonCT, public}},
		{name: "EncodedKey", method: "GET", path: "/v1/keys/" + url.PathEscape(strings.Repeat("/%", 127)),
			reply: reply{200, jsonCT, public}},
		{name: "KeyWithSpace", method: "GET", path: "/v1/keys/a%20b",
			reply: reply{400, problemCT, problem("invalid-key", 400)}, want: "request does not match"},
		{name: "KeyWithSpaceMalformed", method: "GET", path: "/v1/keys/a%20b", malformed: true,
			reply: reply{400, problemCT, problem("invalid-key", 400)}},
		{name: "UnknownField", method: "POST", path: beginPath, body: `{"leas_ms":1000}`,
			reply: reply{400, problemCT, problem("invalid-request", 400)}, want: "request does not match"},
		{name: "UnknownFieldMalformed", method: "POST", path: beginPath, body: `{"leas_ms":1000}`, malformed: true,
			reply: reply{400, problemCT, problem("invalid-request", 400)}},
		{name: "MalformedStillChecksResponse", method: "POST", path: beginPath, body: `{"leas_ms":1000}`, malformed: true,
			reply: reply{400, jsonCT, problem("invalid-request", 400)}, want: "response does not match"},
		{name: "BasicAuth", method: "DELETE", path: "/v1/keys/k", header: map[string]string{"Authorization": "Basic eDp5"},
			reply: reply{401, map[string]string{"Content-Type": "application/problem+json", "WWW-Authenticate": "Bearer"}, problem("unauthorized", 401)},
			want:  "bearer"},
		{name: "UnauthorizedNoChallenge", method: "DELETE", path: "/v1/keys/k",
			reply: reply{401, problemCT, problem("unauthorized", 401)}, want: "WWW-Authenticate"},
		{name: "UnknownPathOK", method: "GET", path: "/nope",
			reply: reply{404, problemCT, problem("no-such-path", 404)}},
		{name: "UnknownPathAsNoRecord", method: "GET", path: "/nope",
			reply: reply{404, problemCT, problem("not-found", 404)}, want: "no-such-path"},
		{name: "UnknownPathPlainText", method: "GET", path: "/nope",
			reply: reply{404, map[string]string{"Content-Type": "text/plain; charset=utf-8"}, "404 page not found\n"}, want: "text/plain"},
		{name: "MethodNotAllowedOK", method: "PUT", path: "/v1/keys/k",
			reply: reply{405, map[string]string{"Content-Type": "application/problem+json", "Allow": "GET, HEAD, DELETE"}, problem("method-not-allowed", 405)}},
		{name: "MethodNotAllowedNoAllow", method: "PUT", path: "/v1/keys/k",
			reply: reply{405, problemCT, problem("method-not-allowed", 405)}, want: "Allow"},
		{name: "Healthz", method: "GET", path: "/healthz",
			reply: reply{200, map[string]string{"Content-Type": "text/plain; charset=utf-8"}, "ok\n"}},
		{name: "Metrics", method: "GET", path: "/metrics",
			reply: reply{200, map[string]string{"Content-Type": "text/plain; version=0.0.4; charset=utf-8; escaping=underscores"}, "# HELP x y\nx 1\n"}},
		{name: "OpenAPI", method: "GET", path: "/openapi.yaml",
			reply: reply{200, map[string]string{"Content-Type": "application/yaml"}, string(api.Spec)}},
		{name: "OpenAPINotYAML", method: "GET", path: "/openapi.yaml",
			reply: reply{200, map[string]string{"Content-Type": "application/yaml"}, "- a list\n"}, want: "must be an object"},
		{name: "Release", method: "POST", path: "/v1/keys/k/release", body: `{"token":"tok"}`,
			reply: reply{204, nil, ""}},
	}
	v := apitest.NewValidator(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			gotBody := make(chan string, 1)
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				b, _ := io.ReadAll(r.Body)
				gotBody <- string(b)
				w.Header().Set("X-Request-Id", "req-1")
				for k, val := range tt.reply.header {
					if val == "" {
						w.Header().Del(k)
					} else {
						w.Header().Set(k, val)
					}
				}
				w.WriteHeader(tt.reply.status)
				io.WriteString(w, tt.reply.body)
			}))
			defer srv.Close()

			rec := &recorder{TB: t}
			req, err := http.NewRequest(tt.method, srv.URL+tt.path, strings.NewReader(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			if tt.body != "" {
				req.Header.Set("Content-Type", "application/json")
			}
			req.Header.Set("Authorization", "Bearer secret")
			for k, val := range tt.header {
				req.Header.Set(k, val)
			}
			if tt.malformed {
				req = apitest.Malformed(req)
			}
			resp, err := v.Client(rec, nil).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}

			if got, want := string(body), tt.reply.body; got != want {
				t.Errorf("the caller read body %q, want %q", got, want)
			}
			if got, want := <-gotBody, tt.body; got != want {
				t.Errorf("the server read body %q, want %q", got, want)
			}
			switch {
			case tt.want == "" && len(rec.errs) != 0:
				t.Errorf("reported %q, want nothing", rec.errs)
			case tt.want != "" && len(rec.errs) != 1:
				t.Errorf("reported %q, want one error containing %q", rec.errs, tt.want)
			case tt.want != "" && !strings.Contains(rec.errs[0], tt.want):
				t.Errorf("reported %q, want it to contain %q", rec.errs[0], tt.want)
			}
			for _, e := range rec.errs {
				if !strings.Contains(e, tt.method+" ") || !strings.Contains(e, "/") {
					t.Errorf("report %q does not name the method and path", e)
				}
			}
		})
	}
}

func TestCheckProblem(t *testing.T) {
	v := apitest.NewValidator(t)
	resp := func(ct string) *http.Response {
		return &http.Response{StatusCode: 409, Header: http.Header{"Content-Type": {ct}},
			Body: io.NopCloser(strings.NewReader(problem("lease-lost", 409)))}
	}
	tests := []struct {
		name       string
		resp       *http.Response
		wantStatus int
		wantType   string
		wantErrs   int
	}{
		{"OK", resp("application/problem+json"), 409, "lease-lost", 0},
		{"FullURI", resp("application/problem+json"), 409, "urn:idemsvc:problem:lease-lost", 0},
		{"WrongType", resp("application/problem+json"), 409, "already-completed", 1},
		{"WrongStatus", resp("application/problem+json"), 404, "lease-lost", 2},
		{"WrongContentType", resp("application/json"), 409, "lease-lost", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := &recorder{TB: t}
			v.CheckProblem(rec, tt.resp, nil, tt.wantStatus, tt.wantType)
			if got := len(rec.errs); got != tt.wantErrs {
				t.Errorf("reported %q, want %d errors", rec.errs, tt.wantErrs)
			}
			if b, _ := io.ReadAll(tt.resp.Body); len(b) == 0 {
				t.Errorf("CheckProblem did not put the body back")
			}
		})
	}
}
