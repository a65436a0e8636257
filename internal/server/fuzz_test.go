package server_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/idemsvc/idemsvc/internal/apitest"
	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// The fuzz targets hold the whole handler (routing, auth, key decoding, body decoding, the
// rules, encoding) to three promises for any input: it never panics, it never answers a 5xx
// other than 503, and every answer matches api/openapi.yaml. Each target serves a real bbolt
// store in a temp dir, opened once per target (per fuzzing worker).
//
//	go test -run '^$' -fuzz '^FuzzHandler$' -fuzztime 60s ./internal/server/
//	go test -run '^$' -fuzz '^FuzzRequestBody$' -fuzztime 60s ./internal/server/
//
// Without -fuzz, go test runs the seed corpora in testdata/fuzz/ as ordinary tests.

const (
	fuzzTokenA = "fuzz-token-of-alpha-0123"
	fuzzTokenB = "fuzz-token-of-bravo-0123"
)

// fuzzMethods are the methods a fuzzed request uses: the API's, and others.
var fuzzMethods = []string{"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "PROPFIND"}

// fuzzTarget is one handler over one store, and the validator of its answers.
type fuzzTarget struct {
	handler http.Handler
	logs    *observer.ObservedLogs
	v       *apitest.Validator
}

func newFuzzTarget(f *testing.F) *fuzzTarget {
	f.Helper()
	store, err := bolt.OpenDir(f.TempDir(), bolt.Options{})
	if err != nil {
		f.Fatalf("open bolt: %v", err)
	}
	f.Cleanup(func() { _ = store.Close() })
	limits := keys.DefaultLimits()
	limits.MaxWait = 5 * time.Millisecond // a fuzzed wait_ms must not stall the fuzzer
	core, logs := observer.New(zapcore.ErrorLevel)
	h := server.New(store, server.Options{
		Limits: limits,
		Tokens: map[string]string{"alpha": fuzzTokenA, "bravo": fuzzTokenB},
		Logger: zap.New(core),
	})
	return &fuzzTarget{handler: h, logs: logs, v: apitest.NewValidator(f)}
}

// serve hands req to the handler as the real server would, and checks the answer: no 5xx but
// 503, no error logged, and (through the validator's client) a response that matches the spec.
func (ft *fuzzTarget) serve(t *testing.T, req *http.Request) {
	t.Helper()
	ft.logs.TakeAll()
	// The validator reads the body first; a body that fails to read (a broken chunked
	// encoding, say) is served directly, and only the status is checked.
	data, readErr := io.ReadAll(req.Body)
	var resp *http.Response
	if readErr != nil {
		req.Body = io.NopCloser(io.MultiReader(bytes.NewReader(data), errReader{readErr}))
		rec := httptest.NewRecorder()
		ft.handler.ServeHTTP(rec, req)
		resp = rec.Result()
	} else {
		req.Body = io.NopCloser(bytes.NewReader(data))
		req.URL.Scheme, req.URL.Host = "http", "idemsvc" // for the validator's router
		client := ft.v.Client(t, handlerTransport{ft.handler})
		var err error
		resp, err = client.Transport.RoundTrip(apitest.Malformed(req))
		if err != nil {
			t.Fatalf("round trip: %v", err)
		}
	}
	body, _ := io.ReadAll(resp.Body)
	t.Logf("%s %s -> %d", req.Method, req.URL.RequestURI(), resp.StatusCode)
	if resp.StatusCode >= 500 && resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("%s %s -> %d: %s%s", req.Method, req.URL.RequestURI(), resp.StatusCode, body, ft.logged())
	} else if logged := ft.logged(); logged != "" {
		t.Errorf("%s %s -> %d logged an error:%s", req.Method, req.URL.RequestURI(), resp.StatusCode, logged)
	}
}

// logged returns the errors the handler logged (a recovered panic logs its stack).
func (ft *fuzzTarget) logged() string {
	var b strings.Builder
	for _, e := range ft.logs.TakeAll() {
		fmt.Fprintf(&b, "\n  logged %q", e.Message)
		for k, v := range e.ContextMap() {
			fmt.Fprintf(&b, "\n    %s: %v", k, v)
		}
	}
	return b.String()
}

// handlerTransport serves a request in-process, through an httptest.ResponseRecorder.
type handlerTransport struct{ h http.Handler }

func (ht handlerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	rec := httptest.NewRecorder()
	ht.h.ServeHTTP(rec, req)
	resp := rec.Result()
	resp.Request = req
	return resp, nil
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

// FuzzHandler sends any method, a request target under /v1/keys/ built from fuzzed bytes, fuzzed
// header lines and a fuzzed body. The request is parsed from its wire form with http.ReadRequest
// and then checked the way net/http's server checks it before any handler runs; what the server
// itself would reject never reaches the handler, and is skipped here.
//
// mode picks the method (bits 0-2), the credential (bits 3-4: tenant alpha, tenant bravo, none,
// an unknown token) and whether a JSON Content-Type is added (bit 5).
func FuzzHandler(f *testing.F) {
	ft := newFuzzTarget(f)
	f.Fuzz(func(t *testing.T, mode uint8, target, headers string, body []byte) {
		var raw bytes.Buffer
		fmt.Fprintf(&raw, "%s /v1/keys/%s HTTP/1.1\r\nHost: idemsvc\r\n", fuzzMethods[mode&7], target)
		switch (mode >> 3) & 3 {
		case 0:
			raw.WriteString("Authorization: Bearer " + fuzzTokenA + "\r\n")
		case 1:
			raw.WriteString("Authorization: Bearer " + fuzzTokenB + "\r\n")
		case 3:
			raw.WriteString("Authorization: Bearer not-a-known-token\r\n")
		}
		if mode&32 == 0 && len(body) > 0 {
			raw.WriteString("Content-Type: application/json\r\n")
		}
		for _, line := range strings.Split(headers, "\n") {
			if line = strings.TrimRight(line, "\r"); line != "" {
				raw.WriteString(line + "\r\n")
			}
		}
		fmt.Fprintf(&raw, "Content-Length: %d\r\n\r\n", len(body))
		raw.Write(body)

		req, err := http.ReadRequest(bufio.NewReader(&raw))
		if err != nil || !acceptedByServer(req) {
			return // net/http's server answers 400 (or 417, 431) itself: no handler runs
		}
		ft.serve(t, req)
	})
}

// FuzzRequestBody posts a fuzzed JSON body to one of the four POST endpoints, as tenant alpha,
// on a key chosen by op (bits 2-3), so that the fuzzer spends its effort on the body decoder
// and the rules behind it.
func FuzzRequestBody(f *testing.F) {
	ft := newFuzzTarget(f)
	ops := []string{"begin", "complete", "renew", "release"}
	f.Fuzz(func(t *testing.T, op uint8, body []byte) {
		path := fmt.Sprintf("/v1/keys/body-%d/%s", (op>>2)&3, ops[op&3])
		req := httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+fuzzTokenA)
		req.Header.Set("Content-Type", "application/json")
		ft.serve(t, req)
	})
}

// acceptedByServer reports whether net/http's server would hand req to a handler: its own
// checks after parsing (conn.readRequest in net/http/server.go) are one Host header that is
// valid, valid header names and values, and no Expect other than 100-continue.
func acceptedByServer(req *http.Request) bool {
	if hosts := req.Header["Host"]; len(hosts) > 1 {
		return false
	}
	if !validHeaderValue(req.Host) || strings.ContainsAny(req.Host, " \t") {
		return false
	}
	for name, values := range req.Header {
		if !validHeaderName(name) {
			return false
		}
		for _, v := range values {
			if !validHeaderValue(v) {
				return false
			}
		}
	}
	if e := req.Header.Get("Expect"); e != "" {
		return false // 100-continue is the server's business; anything else is 417
	}
	delete(req.Header, "Host")
	req.RemoteAddr = "192.0.2.1:1234"
	return true
}

// validHeaderName: an RFC 9110 token.
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

// validHeaderValue: no control bytes other than tab.
func validHeaderValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}
