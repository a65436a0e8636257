// Package apitest holds every server test to api/openapi.yaml: a Validator gives tests an
// *http.Client that checks each request it sends and each response it receives against the
// spec, and reports a mismatch as a test error.
//
// A test that sends a request the spec forbids on purpose (to see the server reject it) marks
// it with Malformed; its response is still checked.
package apitest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"github.com/idemsvc/idemsvc/api"
)

// ProblemTypePrefix starts the type URI of every problem.
const ProblemTypePrefix = "urn:idemsvc:problem:"

// Validator checks HTTP traffic against api/openapi.yaml. It is safe for concurrent use.
type Validator struct {
	doc    *openapi3.T
	router routers.Router
	// unrouted answers for requests that match no operation of the spec: 404 no-such-path,
	// 405 method-not-allowed, or any other problem.
	unrouted routers.Route
}

// load parses and lints the spec once per process; the result is never modified.
var load = sync.OnceValues(func() (*Validator, error) {
	ctx := context.Background()
	doc, err := openapi3.NewLoader().LoadFromData(api.Spec)
	if err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	if err := doc.Validate(ctx); err != nil {
		return nil, fmt.Errorf("validate: %w", err)
	}
	// The spec's only server is "/", so the router matches any scheme, host and port.
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		return nil, fmt.Errorf("router: %w", err)
	}
	responses := doc.Components.Responses
	for _, name := range []string{"NoSuchPath", "MethodNotAllowed", "Problem"} {
		if responses[name] == nil {
			return nil, fmt.Errorf("components.responses.%s is missing", name)
		}
	}
	return &Validator{
		doc:    doc,
		router: router,
		unrouted: routers.Route{
			Spec:     doc,
			PathItem: &openapi3.PathItem{},
			Operation: &openapi3.Operation{Responses: openapi3.NewResponses(
				openapi3.WithStatus(http.StatusNotFound, responses["NoSuchPath"]),
				openapi3.WithStatus(http.StatusMethodNotAllowed, responses["MethodNotAllowed"]),
				openapi3.WithName("default", responses["Problem"].Value),
			)},
		},
	}, nil
})

// NewValidator returns the Validator of api/openapi.yaml. The spec is loaded and linted once
// per process; if that fails, NewValidator calls t.Fatalf.
func NewValidator(t testing.TB) *Validator {
	t.Helper()
	v, err := load()
	if err != nil {
		t.Fatalf("apitest: api/openapi.yaml: %v", err)
	}
	return v
}

type malformedKey struct{}

// Malformed returns a shallow copy of req marked as deliberately invalid: a Validator's client
// sends it without checking it against the spec, and still checks the response.
func Malformed(req *http.Request) *http.Request {
	return req.WithContext(context.WithValue(req.Context(), malformedKey{}, true))
}

func isMalformed(req *http.Request) bool {
	b, _ := req.Context().Value(malformedKey{}).(bool)
	return b
}

// Client returns a client that sends requests through base (http.DefaultTransport when nil)
// and checks each exchange against the spec, reporting every mismatch with t.Errorf:
//   - a request that matches an operation is validated (parameters, auth header, body) unless
//     it is marked Malformed; the lease token and tenant are not checked (that is the server's
//     job), but an Authorization header that is not a bearer token is reported;
//   - every response is validated: its status must be documented, and its headers and body
//     must match; a response to a request that matches no operation must be a problem
//     (404 no-such-path and 405 method-not-allowed as documented, any other status a Problem).
//
// Request and response bodies are read whole before they are passed on (so a streamed request
// body is sent only once it ends); the caller reads the response body as usual. Transport
// errors are returned unchanged and not reported. t must outlive the client's requests.
func (v *Validator) Client(t testing.TB, base http.RoundTripper) *http.Client {
	if base == nil {
		base = http.DefaultTransport
	}
	return &http.Client{Transport: &transport{t: t, v: v, base: base}}
}

type transport struct {
	t    testing.TB
	v    *Validator
	base http.RoundTripper
}

func (tr *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	body, err := drain(req.Body)
	if err != nil {
		return nil, fmt.Errorf("apitest: read request body: %w", err)
	}
	// A HEAD is checked as the GET of its path, whose status and headers it must have
	// (RFC 9110 §9.3.2), with no body.
	head, asGet := req.Method == http.MethodHead, req
	if head {
		asGet = req.Clone(req.Context())
		asGet.Method = http.MethodGet
	}
	route, params, routeErr := tr.v.router.FindRoute(asGet)
	if routeErr == nil {
		params = unescape(params)
		if !isMalformed(req) {
			if err := tr.v.validateRequest(asGet, body, route, params); err != nil {
				tr.t.Errorf("apitest: %s %s: the request does not match api/openapi.yaml "+
					"(wrap a deliberately invalid request in apitest.Malformed): %v\nbody: %s",
					req.Method, req.URL.EscapedPath(), err, clip(body))
			}
		}
	} else {
		r := tr.v.unrouted
		r.Method = req.Method
		route, params = &r, nil
	}

	resp, err := tr.base.RoundTrip(withBody(req, body))
	if err != nil {
		return nil, err
	}
	data, err := drain(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("apitest: read response body: %w", err)
	}
	resp.Body = io.NopCloser(bytes.NewReader(data))
	if head && len(data) != 0 {
		tr.t.Errorf("apitest: HEAD %s -> %d: a body of %d bytes", req.URL.EscapedPath(), resp.StatusCode, len(data))
	}
	if err := tr.v.validateResponse(asGet, route, params, resp, data, head); err != nil {
		tr.t.Errorf("apitest: %s %s -> %d: the response does not match api/openapi.yaml: %v\nbody: %s",
			req.Method, req.URL.EscapedPath(), resp.StatusCode, err, clip(data))
	}
	return resp, nil
}

// CloseIdleConnections closes the idle connections of the base transport, so that
// (*http.Client).CloseIdleConnections works through a Validator's client.
func (tr *transport) CloseIdleConnections() {
	if c, ok := tr.base.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// clip shortens a body for a report.
func clip(b []byte) string {
	const limit = 1 << 10
	if len(b) > limit {
		return fmt.Sprintf("%s... (%d bytes)", b[:limit], len(b))
	}
	return string(b)
}

// drain reads and closes body; a nil body gives nil.
func drain(body io.ReadCloser) ([]byte, error) {
	if body == nil || body == http.NoBody {
		return nil, nil
	}
	defer body.Close()
	return io.ReadAll(body)
}

// withBody returns a copy of req that reads data, so that req itself is never changed.
func withBody(req *http.Request, data []byte) *http.Request {
	out := req.Clone(req.Context())
	if data != nil {
		out.Body = io.NopCloser(bytes.NewReader(data))
		out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil }
	}
	return out
}

// unescape decodes the path parameters, which the router returns as sent (percent-encoded):
// the spec constrains the decoded key, so a 255-byte key full of "/" is still valid.
func unescape(params map[string]string) map[string]string {
	out := make(map[string]string, len(params))
	for name, raw := range params {
		if s, err := url.PathUnescape(raw); err == nil {
			raw = s
		}
		out[name] = raw
	}
	return out
}

func (v *Validator) options() *openapi3filter.Options {
	return &openapi3filter.Options{
		IncludeResponseStatus: true, // an undocumented status is an error
		MultiError:            true,
		SkipSettingDefaults:   true, // never change what the test sends
		AuthenticationFunc:    bearer,
		// The schema and the value make a report unreadable; the report shows the body instead.
		SchemaValidationOptions: []openapi3.SchemaValidationOption{openapi3.DisableSchemaErrorDetails()},
	}
}

// bearer accepts a request without Authorization (an open service, or a test of 401) or with
// any bearer token: whether the token is known is for the server to decide.
func bearer(_ context.Context, in *openapi3filter.AuthenticationInput) error {
	h := in.RequestValidationInput.Request.Header.Get("Authorization")
	if h == "" {
		return nil
	}
	scheme, token, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(token) == "" {
		return in.NewError(errors.New("the Authorization header is not a bearer token"))
	}
	return nil
}

func (v *Validator) validateRequest(req *http.Request, body []byte, route *routers.Route, params map[string]string) error {
	return openapi3filter.ValidateRequest(req.Context(), &openapi3filter.RequestValidationInput{
		Request:    withBody(req, body),
		PathParams: params,
		Route:      route,
		Options:    v.options(),
	})
}

// validateResponse checks resp, the answer to req, against route's operation; for a HEAD
// (head), its status and headers only.
func (v *Validator) validateResponse(req *http.Request, route *routers.Route, params map[string]string, resp *http.Response, body []byte, head bool) error {
	in := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{
			Request: req, PathParams: params, Route: route,
		},
		Status:  resp.StatusCode,
		Header:  resp.Header,
		Options: v.options(),
	}
	in.SetBodyBytes(body)
	in.Options.ExcludeResponseBody = head
	if err := openapi3filter.ValidateResponse(req.Context(), in); err != nil {
		return err
	}
	if head {
		return nil
	}
	// The schema cannot say that a problem repeats the response's own status.
	if isProblem(resp.Header) {
		var p struct{ Status int }
		if err := json.Unmarshal(body, &p); err != nil {
			return fmt.Errorf("problem body: %w", err)
		}
		if p.Status != resp.StatusCode {
			return fmt.Errorf("the problem's status %d is not the response's", p.Status)
		}
	}
	return nil
}

func isProblem(h http.Header) bool {
	mt, _, _ := mime.ParseMediaType(h.Get("Content-Type"))
	return mt == "application/problem+json"
}

// CheckProblem checks that resp is the problem wantType with status wantStatus, and that its
// body is a valid Problem; it reports each mismatch with t.Errorf. wantType is a problem name
// ("in-progress") or its full type URI. body is resp's body; when it is nil, CheckProblem
// reads resp.Body and puts it back.
func (v *Validator) CheckProblem(t testing.TB, resp *http.Response, body []byte, wantStatus int, wantType string) {
	t.Helper()
	if !strings.HasPrefix(wantType, ProblemTypePrefix) {
		wantType = ProblemTypePrefix + wantType
	}
	if body == nil {
		var err error
		if body, err = drain(resp.Body); err != nil {
			t.Errorf("apitest: read response body: %v", err)
			return
		}
		resp.Body = io.NopCloser(bytes.NewReader(body))
	}
	if resp.StatusCode != wantStatus {
		t.Errorf("status = %d, want %d (body %s)", resp.StatusCode, wantStatus, body)
	}
	if !isProblem(resp.Header) {
		t.Errorf("Content-Type = %q, want application/problem+json", resp.Header.Get("Content-Type"))
	}
	var p map[string]any
	if err := json.Unmarshal(body, &p); err != nil {
		t.Errorf("problem body %q: %v", body, err)
		return
	}
	if err := v.doc.Components.Schemas["Problem"].Value.VisitJSON(p, openapi3.VisitAsResponse()); err != nil {
		t.Errorf("problem body %s is not a Problem: %v", body, err)
	}
	if p["type"] != wantType {
		t.Errorf("problem type = %v, want %s (detail %v)", p["type"], wantType, p["detail"])
	}
	if p["status"] != float64(wantStatus) {
		t.Errorf("problem status = %v, want %d", p["status"], wantStatus)
	}
}
