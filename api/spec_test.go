package api_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/idemsvc/idemsvc/api"
)

// problems are the problem names of CONTRACT.md and WIRE.md, with the status each uses.
var problems = map[string]int{
	"invalid-key":            400,
	"invalid-request":        400,
	"unauthorized":           401,
	"not-found":              404,
	"no-such-path":           404,
	"method-not-allowed":     405,
	"in-progress":            409,
	"lease-lost":             409,
	"already-completed":      409,
	"payload-too-large":      413,
	"unsupported-media-type": 415,
	"fingerprint-mismatch":   422,
	"invalid-response":       422,
	"internal":               500,
	"unavailable":            503,
}

// operations are the contract's paths and methods, with every status each may answer.
var operations = []struct {
	method, path string
	statuses     []int
}{
	{"POST", "/v1/keys/{key}/begin", []int{200, 201, 400, 401, 409, 413, 415, 422, 500, 503}},
	{"POST", "/v1/keys/{key}/complete", []int{200, 400, 401, 404, 409, 413, 415, 422, 500, 503}},
	{"POST", "/v1/keys/{key}/renew", []int{200, 400, 401, 404, 409, 413, 415, 500, 503}},
	{"POST", "/v1/keys/{key}/release", []int{204, 400, 401, 409, 413, 415, 500, 503}},
	{"GET", "/v1/keys/{key}", []int{200, 400, 401, 404, 500, 503}},
	{"DELETE", "/v1/keys/{key}", []int{204, 400, 401, 500, 503}},
	{"GET", "/healthz", []int{200, 500}},
	{"GET", "/readyz", []int{200, 500, 503}},
	{"GET", "/metrics", []int{200, 500}},
	{"GET", "/openapi.yaml", []int{200, 500}},
}

var loadOnce = sync.OnceValues(func() (*openapi3.T, error) {
	return openapi3.NewLoader().LoadFromData(api.Spec)
})

// load returns the loaded (not yet validated) document, shared by the tests: they only read it.
func load(t *testing.T) *openapi3.T {
	t.Helper()
	doc, err := loadOnce()
	if err != nil {
		t.Fatalf("load api/openapi.yaml: %v", err)
	}
	return doc
}

// TestValidate is the lint: the document is valid OpenAPI 3.0, its patterns compile and its
// examples and defaults match their schemas.
func TestValidate(t *testing.T) {
	doc := load(t)
	if got, want := doc.OpenAPI, "3.0.3"; got != want {
		t.Errorf("openapi = %q, want %q", got, want)
	}
	if err := doc.Validate(context.Background(), openapi3.EnableMultiError()); err != nil {
		t.Fatalf("Validate: %v", err)
	}
}

func TestOperations(t *testing.T) {
	doc := load(t)
	want := map[string]bool{}
	for _, op := range operations {
		want[op.method+" "+op.path] = true
		t.Run(op.method+" "+op.path, func(t *testing.T) {
			item := doc.Paths.Value(op.path)
			if item == nil {
				t.Fatalf("path %s is missing", op.path)
			}
			o := item.GetOperation(op.method)
			if o == nil {
				t.Fatalf("%s %s is missing", op.method, op.path)
			}
			if o.OperationID == "" || o.Summary == "" {
				t.Errorf("operationId %q, summary %q: both are required", o.OperationID, o.Summary)
			}
			checkSecurity(t, op.path, o)
			var got []int
			for code, ref := range o.Responses.Map() {
				n, err := strconv.Atoi(code)
				if err != nil {
					t.Errorf("response %q: only explicit statuses, no default or ranges", code)
					continue
				}
				got = append(got, n)
				checkResponse(t, n, ref.Value)
			}
			slices.Sort(got)
			if !slices.Equal(got, op.statuses) {
				t.Errorf("statuses = %v, want %v", got, op.statuses)
			}
			if op.method == "POST" {
				checkRequestBody(t, op.path, o.RequestBody)
			} else if o.RequestBody != nil {
				t.Errorf("a %s has no request body", op.method)
			}
		})
	}
	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			if !want[method+" "+path] {
				t.Errorf("%s %s is not in the contract", method, path)
			}
		}
	}
}

// checkSecurity checks that /v1 operations take the bearer token and operational ones none.
func checkSecurity(t *testing.T, path string, o *openapi3.Operation) {
	t.Helper()
	var got []string
	if o.Security != nil {
		for _, req := range *o.Security {
			got = slices.AppendSeq(got, maps.Keys(req))
		}
	}
	var want []string
	if strings.HasPrefix(path, "/v1/") {
		want = []string{"bearerAuth"}
	}
	if !slices.Equal(got, want) {
		t.Errorf("security = %v, want %v", got, want)
	}
}

// checkResponse checks the headers and media types every response of a status must have.
func checkResponse(t *testing.T, status int, r *openapi3.Response) {
	t.Helper()
	if h := r.Headers["X-Request-Id"]; h == nil || !h.Value.Required {
		t.Errorf("%d: X-Request-Id is not a required header", status)
	}
	wantHeader := map[int]string{401: "WWW-Authenticate", 405: "Allow"}[status]
	if wantHeader != "" && (r.Headers[wantHeader] == nil || !r.Headers[wantHeader].Value.Required) {
		t.Errorf("%d: %s is not a required header", status, wantHeader)
	}
	types := slices.Sorted(maps.Keys(r.Content))
	switch {
	case status == 204:
		if len(types) != 0 {
			t.Errorf("%d: content %v, want none", status, types)
		}
	case status >= 400:
		if !slices.Equal(types, []string{"application/problem+json"}) {
			t.Errorf("%d: content %v, want only application/problem+json", status, types)
			return
		}
		names := problemNames(t, r.Content["application/problem+json"].Schema.Value)
		if len(names) == 0 {
			t.Errorf("%d: the schema does not narrow the problem type", status)
		}
		for _, name := range names {
			if problems[name] != status {
				t.Errorf("%d: problem %s uses status %d", status, name, problems[name])
			}
		}
	case len(types) != 1:
		t.Errorf("%d: content %v, want one media type", status, types)
	}
}

// problemNames returns the problem names a response schema of the form
// allOf [Problem, {properties: {type: {enum}}}] allows.
func problemNames(t *testing.T, s *openapi3.Schema) []string {
	t.Helper()
	var names []string
	for _, sub := range s.AllOf {
		typ := sub.Value.Properties["type"]
		if sub.Ref != "" || typ == nil { // the Problem schema itself allows every name
			continue
		}
		for _, v := range typ.Value.Enum {
			names = append(names, strings.TrimPrefix(v.(string), "urn:idemsvc:problem:"))
		}
	}
	return names
}

func checkRequestBody(t *testing.T, path string, body *openapi3.RequestBodyRef) {
	t.Helper()
	if body == nil {
		t.Fatalf("no request body")
	}
	if got, want := body.Value.Required, !strings.HasSuffix(path, "/begin"); got != want {
		t.Errorf("requestBody.required = %v, want %v (only begin takes an empty body)", got, want)
	}
	mt := body.Value.Content["application/json"]
	if len(body.Value.Content) != 1 || mt == nil {
		t.Fatalf("request content: want only application/json")
	}
	if ap := mt.Schema.Value.AdditionalProperties.Has; ap == nil || *ap {
		t.Errorf("request schema allows additional properties")
	}
	if mt.Example == nil && len(mt.Examples) == 0 {
		t.Errorf("request has no example")
	}
}

// TestProblems checks that the Problem schema lists every problem name of the contract, and no
// other, and that its description gives each one's status.
func TestProblems(t *testing.T) {
	typ := load(t).Components.Schemas["Problem"].Value.Properties["type"].Value
	var got []string
	for _, v := range typ.Enum {
		got = append(got, v.(string))
	}
	var want []string
	for name, status := range problems {
		want = append(want, "urn:idemsvc:problem:"+name)
		if s := fmt.Sprintf("`%s` (%d)", name, status); !strings.Contains(typ.Description, s) {
			t.Errorf("the description of Problem.type does not say %s", s)
		}
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("Problem.type enum = %v, want %v", got, want)
	}
}

// TestKeyPattern checks the key's schema both with Go's regexp, which kin-openapi compiles
// patterns with (it only rewrites \uXXXX, which the pattern does not use), and through
// kin-openapi's own validation of the path parameter.
func TestKeyPattern(t *testing.T) {
	doc := load(t)
	param := doc.Components.Parameters["Key"].Value
	schema := param.Schema.Value
	re, err := regexp.Compile(schema.Pattern)
	if err != nil {
		t.Fatalf("compile %q: %v", schema.Pattern, err)
	}
	tests := []struct {
		name    string
		key     string
		pattern bool // the pattern alone accepts it
		valid   bool // the whole schema accepts it
	}{
		{"Simple", "order-1234", true, true},
		{"OneByte", "a", true, true},
		{"Slash", "a/b", true, true},
		{"Punctuation", `!"#$%&'()*+,-./:;<=>?@[\]^_{|}~`, true, true},
		{"Dots3", "...", true, true},
		{"DotPrefix", ".a", true, true},
		{"DotSuffix", "a..", true, true},
		{"DotsThenSlash", "../", true, true},
		{"Max", strings.Repeat("k", 255), true, true},
		{"Empty", "", false, false},
		{"Space", "a b", false, false},
		{"Tab", "a\tb", false, false},
		{"Newline", "a\n", false, false},
		{"DEL", "a\x7f", false, false},
		{"NonASCII", "clé", false, false},
		{"TooLong", strings.Repeat("k", 256), true, false},
		{"Dot", ".", false, false},
		{"DotDot", "..", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := re.MatchString(tt.key); got != tt.pattern {
				t.Errorf("pattern matches %q = %v, want %v", tt.key, got, tt.pattern)
			}
			err := schema.VisitJSON(tt.key)
			if got := err == nil; got != tt.valid {
				t.Errorf("schema accepts %q = %v (%v), want %v", tt.key, got, err, tt.valid)
			}
		})
	}
}

// TestRecordSchemas checks the rules of WIRE.md that the record schemas encode: which state
// carries a lease or a response, and who sees the lease token.
func TestRecordSchemas(t *testing.T) {
	const (
		leased    = `{"key":"k","state":"in_progress","fingerprint":"","lease":{"token":"t","fence":1,"expires_at":"2026-01-02T03:04:05Z"},"created_at":"2026-01-02T03:04:05Z","expires_at":"2026-01-02T03:04:05.123Z"}`
		public    = `{"key":"k","state":"in_progress","fingerprint":"","lease":{"fence":1,"expires_at":"2026-01-02T03:04:05Z"},"created_at":"2026-01-02T03:04:05Z","expires_at":"2026-01-02T03:04:05Z"}`
		completed = `{"key":"k","state":"completed","fingerprint":"f","response":{"status":201,"headers":{},"body":""},"created_at":"2026-01-02T03:04:05Z","completed_at":"2026-01-02T03:04:05Z","expires_at":"2026-01-02T03:04:05Z"}`
	)
	tests := []struct {
		name, schema, record string
		valid                bool
	}{
		{"LeasedOK", "LeasedRecord", leased, true},
		{"LeasedWithoutToken", "LeasedRecord", public, false},
		{"LeasedCompleted", "LeasedRecord", completed, false},
		{"CompletedOK", "CompletedRecord", completed, true},
		{"CompletedWithLease", "CompletedRecord", strings.Replace(completed, `"response"`, `"lease":{"fence":1,"expires_at":"2026-01-02T03:04:05Z"},"response"`, 1), false},
		{"CompletedWithoutResponse", "CompletedRecord", strings.Replace(completed, `"response":{"status":201,"headers":{},"body":""},`, "", 1), false},
		{"CompletedBodyMissing", "CompletedRecord", strings.Replace(completed, `,"body":""`, "", 1), false},
		{"CompletedBodyNotBase64", "CompletedRecord", strings.Replace(completed, `"body":""`, `"body":"a"`, 1), false},
		{"PublicInProgress", "PublicRecord", public, true},
		{"PublicCompleted", "PublicRecord", completed, true},
		{"PublicShowsToken", "PublicRecord", leased, false},
		{"PublicInProgressWithResponse", "PublicRecord", strings.Replace(public, `"created_at"`, `"response":{"status":201,"headers":{},"body":""},"created_at"`, 1), false},
		{"MissingState", "Record", strings.Replace(public, `"state":"in_progress",`, "", 1), false},
		{"MissingFingerprint", "Record", strings.Replace(public, `"fingerprint":"",`, "", 1), false},
		{"Null", "Record", strings.Replace(public, `"fingerprint":""`, `"fingerprint":null`, 1), false},
		{"UnknownField", "Record", strings.Replace(public, `"key"`, `"ttl":1,"key"`, 1), false},
		{"NotUTC", "Record", strings.Replace(public, `"created_at":"2026-01-02T03:04:05Z"`, `"created_at":"2026-01-02T04:04:05+01:00"`, 1), false},
		{"FenceZero", "Record", strings.Replace(public, `"fence":1`, `"fence":0`, 1), false},
	}
	doc := load(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var v any
			if err := json.Unmarshal([]byte(tt.record), &v); err != nil {
				t.Fatal(err)
			}
			err := doc.Components.Schemas[tt.schema].Value.VisitJSON(v, openapi3.VisitAsResponse())
			if got := err == nil; got != tt.valid {
				t.Errorf("%s accepts the record = %v (%v), want %v", tt.schema, got, err, tt.valid)
			}
		})
	}
}

// TestContractFile checks the tables of this file against CONTRACT.md itself, when the checkout
// has it next to the repository (../shared/CONTRACT.md), so the tables cannot drift from it.
func TestContractFile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "shared", "CONTRACT.md"))
	if errors.Is(err, fs.ErrNotExist) {
		t.Skip("../shared/CONTRACT.md is not in this checkout")
	}
	if err != nil {
		t.Fatal(err)
	}
	contract := string(b)

	want := map[string]bool{}
	for _, op := range operations {
		want[op.method+" "+op.path] = true
	}
	endpoint := regexp.MustCompile("(?m)^### (GET|POST|DELETE) (/\\S+)|`(GET) (/[a-z.]+)`")
	n := 0
	for _, m := range endpoint.FindAllStringSubmatch(contract, -1) {
		method, path := m[1]+m[3], m[2]+m[4]
		if !want[method+" "+path] {
			t.Errorf("CONTRACT.md has %s %s; the test's table does not", method, path)
		}
		n++
	}
	if n != len(operations) {
		t.Errorf("CONTRACT.md names %d endpoints, the test's table %d", n, len(operations))
	}

	_, names, ok := strings.Cut(contract, "### Problem names")
	if !ok {
		t.Fatal(`CONTRACT.md has no "### Problem names" section`)
	}
	names, _, _ = strings.Cut(names, "\n## ")
	problem := regexp.MustCompile("`([a-z-]+)` \\((\\d{3})")
	found := 0
	for _, m := range problem.FindAllStringSubmatch(names, -1) {
		if got, _ := strconv.Atoi(m[2]); problems[m[1]] != got {
			t.Errorf("CONTRACT.md: %s is %d; the test's table says %d", m[1], got, problems[m[1]])
		}
		found++
	}
	if found != 12 { // the contract's twelve; WIRE.md adds method-not-allowed and unsupported-media-type
		t.Errorf("found %d problem names in CONTRACT.md, want 12", found)
	}
}
