package idemclient

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client calls one idemsvc. It is safe for concurrent use.
type Client struct {
	base      string // scheme://host[/prefix], no trailing slash
	token     string
	hc        *http.Client
	retry     RetryPolicy
	userAgent string
	// maxResponse bounds a 2xx response body: maxResponseBytes (a field so that tests can lower it).
	maxResponse int64
}

// Option configures a Client.
type Option func(*Client)

// WithToken sends token as the bearer credential. idemsvc decides the tenant from it. New
// refuses a token with a space or a control character in it (a token read from a file often
// ends in a newline), which net/http would refuse to send.
func WithToken(token string) Option { return func(c *Client) { c.token = token } }

// WithHTTPClient makes the client send its requests through hc (for its transport, proxies,
// TLS). A timeout on hc bounds each attempt, including a begin's wait.
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.hc = hc } }

// WithRetry replaces the default retry policy; zero fields take their defaults.
func WithRetry(p RetryPolicy) Option { return func(c *Client) { c.retry = p.withDefaults() } }

// WithUserAgent sets the User-Agent header. New refuses one with a control character in it.
func WithUserAgent(ua string) Option { return func(c *Client) { c.userAgent = ua } }

// New returns a client of the idemsvc at baseURL ("http://127.0.0.1:8080", or with a path
// prefix when idemsvc is mounted under one). It returns an error when baseURL is not an
// absolute http or https URL, or when an option's token or User-Agent cannot be sent.
func New(baseURL string, opts ...Option) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil {
		return nil, fmt.Errorf("idemclient: base URL: %w", err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("idemclient: base URL %q is not an absolute http or https URL", baseURL)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("idemclient: base URL %q has a query or fragment", baseURL)
	}
	c := &Client{
		base:        strings.TrimRight(u.String(), "/"),
		hc:          &http.Client{},
		retry:       DefaultRetryPolicy(),
		userAgent:   "idemclient-go/1",
		maxResponse: maxResponseBytes,
	}
	for _, o := range opts {
		o(c)
	}
	if c.hc == nil {
		c.hc = &http.Client{}
	}
	if err := checkHeaderValue("WithToken", c.token, true); err != nil {
		return nil, err
	}
	if err := checkHeaderValue("WithUserAgent", c.userAgent, false); err != nil {
		return nil, err
	}
	return c, nil
}

// checkHeaderValue refuses a value that net/http would refuse to send as a header's (a control
// character other than a tab), and, for a token, a space or tab: a bearer token has none. Sent
// anyway, every request would fail before reaching idemsvc, and count as an outage
// (ErrUnavailable, which WithFailOpen turns into running the work unprotected) instead of the
// mistake in the configuration that it is.
func checkHeaderValue(option, v string, token bool) error {
	for i := 0; i < len(v); i++ {
		b := v[i]
		if b < 0x20 && b != '\t' || b == 0x7f || token && (b == ' ' || b == '\t') {
			what := "a control character"
			if b == ' ' || b == '\t' {
				what = "a space"
			}
			return fmt.Errorf("idemclient: %s: byte %d of the value is %s (%q); a value read from a file may end in a newline", option, i, what, b)
		}
	}
	return nil
}

// ValidKey reports whether key is a valid idemsvc key: 1 to 255 bytes of visible ASCII
// (0x21 to 0x7E), neither "." nor "..".
func ValidKey(key string) bool {
	if len(key) == 0 || len(key) > 255 || key == "." || key == ".." {
		return false
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c < 0x21 || c > 0x7e {
			return false
		}
	}
	return true
}

// keyPath returns the escaped path of key's endpoint: the key is one path segment, so a '/' in
// it is sent as %2F.
func keyPath(key, action string) string {
	p := "/v1/keys/" + url.PathEscape(key)
	if action != "" {
		p += "/" + action
	}
	return p
}

func checkDurations(ds ...time.Duration) error {
	for _, d := range ds {
		if d < 0 {
			return fmt.Errorf("%w: negative duration %v", ErrInvalidRequest, d)
		}
	}
	return nil
}

// Begin reserves key or reports its state. On success exactly one of the result's Acquired
// (the caller must execute, then Complete or Release) and Replayed (the stored response is in
// Record.Response) is true. It fails with ErrInProgress (see the *Error's RetryAfter) while
// another caller holds the key, ErrFingerprintMismatch when the key was begun with another
// fingerprint, ErrInvalidKey for a malformed key, and with the other errors of the package.
func (c *Client) Begin(ctx context.Context, key string, opts BeginOptions) (*BeginResult, error) {
	if !ValidKey(key) {
		return nil, invalidKeyError(key)
	}
	if err := checkDurations(opts.Lease, opts.TTL, opts.Wait); err != nil {
		return nil, err
	}
	body := beginBody{Fingerprint: opts.Fingerprint, LeaseMS: millis(opts.Lease), TTLMS: millis(opts.TTL), WaitMS: millis(opts.Wait)}
	var rec wireRecord
	status, err := c.call(ctx, call{
		op: "begin", method: http.MethodPost, path: keyPath(key, "begin"), body: body,
		out: &rec, extraTimeout: opts.Wait, retryInProgress: c.retry.RetryInProgress,
	})
	if err != nil {
		return nil, err
	}
	r := rec.record()
	switch {
	case status == http.StatusCreated && r.Lease != nil && r.Lease.Token != "":
		return &BeginResult{Acquired: true, Lease: r.Lease, Record: r}, nil
	case status == http.StatusOK && r.State == StateCompleted && r.Response != nil:
		return &BeginResult{Replayed: true, Record: r}, nil
	}
	return nil, fmt.Errorf("idemclient: begin %q: unexpected answer: status %d, state %q", key, status, r.State)
}

// Complete stores req.Response as the result of key's operation and returns the completed
// record. Repeating the same Complete (same token, same response) succeeds again. It fails with
// ErrLeaseLost when req.Token is not the current lease, ErrAlreadyCompleted when the key was
// completed by another lease or with another response, ErrNotFound when the record is gone, and
// ErrInvalidResponse when the response may not be stored.
func (c *Client) Complete(ctx context.Context, key string, req CompleteRequest) (*Record, error) {
	if !ValidKey(key) {
		return nil, invalidKeyError(key)
	}
	if err := checkDurations(req.TTL); err != nil {
		return nil, err
	}
	body := completeBody{Token: req.Token, Response: toWireResponse(req.Response), TTLMS: millis(req.TTL)}
	var rec wireRecord
	if _, err := c.call(ctx, call{op: "complete", method: http.MethodPost, path: keyPath(key, "complete"), body: body, out: &rec}); err != nil {
		return nil, err
	}
	return rec.record(), nil
}

// Renew extends the lease held by token to lease from now (zero: the server's default lease)
// and returns the record with the new Lease.ExpiresAt. It fails with ErrLeaseLost when token is
// not the current lease and ErrNotFound when the record is gone.
func (c *Client) Renew(ctx context.Context, key, token string, lease time.Duration) (*Record, error) {
	if !ValidKey(key) {
		return nil, invalidKeyError(key)
	}
	if err := checkDurations(lease); err != nil {
		return nil, err
	}
	var rec wireRecord
	if _, err := c.call(ctx, call{op: "renew", method: http.MethodPost, path: keyPath(key, "renew"), body: renewBody{Token: token, LeaseMS: millis(lease)}, out: &rec}); err != nil {
		return nil, err
	}
	return rec.record(), nil
}

// Release gives up the lease held by token without storing a result, so that the next begin
// acquires: the failed attempt is not cached. Releasing a key that has no record succeeds. It
// fails with ErrLeaseLost when another lease holds the key and ErrAlreadyCompleted when it is
// completed.
func (c *Client) Release(ctx context.Context, key, token string) error {
	if !ValidKey(key) {
		return invalidKeyError(key)
	}
	_, err := c.call(ctx, call{op: "release", method: http.MethodPost, path: keyPath(key, "release"), body: releaseBody{Token: token}})
	return err
}

// Get returns key's live record; an in-progress record's lease has no token. It fails with
// ErrNotFound when there is none.
func (c *Client) Get(ctx context.Context, key string) (*Record, error) {
	if !ValidKey(key) {
		return nil, invalidKeyError(key)
	}
	var rec wireRecord
	if _, err := c.call(ctx, call{op: "get", method: http.MethodGet, path: keyPath(key, ""), out: &rec}); err != nil {
		return nil, err
	}
	return rec.record(), nil
}

// Delete removes key's record, whether or not it exists, so that the next begin acquires. A
// holder of the deleted lease gets ErrLeaseLost or ErrNotFound at its next renew or complete.
func (c *Client) Delete(ctx context.Context, key string) error {
	if !ValidKey(key) {
		return invalidKeyError(key)
	}
	_, err := c.call(ctx, call{op: "delete", method: http.MethodDelete, path: keyPath(key, "")})
	return err
}

// Healthz returns nil when the idemsvc process serves (GET /healthz), else an error.
func (c *Client) Healthz(ctx context.Context) error {
	_, err := c.call(ctx, call{op: "healthz", method: http.MethodGet, path: "/healthz", noRetry: true})
	return err
}

// Ready returns nil when idemsvc can reach its store (GET /readyz), else an error matching
// ErrUnavailable.
func (c *Client) Ready(ctx context.Context) error {
	_, err := c.call(ctx, call{op: "ready", method: http.MethodGet, path: "/readyz", noRetry: true})
	return err
}

// call describes one API call.
type call struct {
	op, method, path string
	body             any // JSON-encoded when not nil
	out              any // decoded from a 2xx body when not nil
	extraTimeout     time.Duration
	retryInProgress  bool
	noRetry          bool
}

// The limits of idemsvc that bound the size of a record it sends (internal/keys and
// cmd/idemsvc/config.go of the server). A client cannot read them from the server, so these are
// the largest values the server accepts in any configuration.
const (
	serverMaxBodyBytes      = 64 << 20 // the largest IDEMSVC_MAX_BODY_BYTES
	serverMaxHeaderBytes    = 16 << 10 // keys.Limits.MaxHeaderBytes: names and values of a stored response
	serverMaxHeaderValues   = 100      // keys.Limits.MaxHeaders: header values (a name without values counts one)
	serverMaxKeyBytes       = 255      // keys.MaxKeyLen
	serverMaxFingerprintLen = 512      // keys.MaxFingerprintLen
)

// maxResponseBytes is the most the client reads of a 2xx response: the JSON of the largest
// record idemsvc can send. Its parts:
//
//   - the stored body in standard base64 with padding: 4 bytes for every 3, rounded up;
//   - the header names and values, each byte escaped by the server as encoding/json does, at
//     worst 6 bytes ("<", ">" and "&" become \u003c, \u003e and \u0026, a byte of invalid UTF-8
//     becomes \ufffd; control characters other than tab are refused);
//   - per header value its quotes and comma, per name its quotes, colon, brackets and comma;
//   - the rest of the record: key and fingerprint, escaped at worst 6 bytes a byte, the lease
//     token, five timestamps, the member names and the trailing newline, with room to spare.
//
// A larger answer is not an idemsvc record; reading it whole would only cost memory, so the
// client stops at this size and reports errResponseTooLarge.
const maxResponseBytes = (serverMaxBodyBytes+2)/3*4 +
	6*serverMaxHeaderBytes +
	serverMaxHeaderValues*(3+6) +
	6*(serverMaxKeyBytes+serverMaxFingerprintLen) + 16<<10

// errResponseTooLarge is the error of a response over the client's limit.
var errResponseTooLarge = errors.New("response body is larger than the largest record idemsvc sends")

// call performs c with the client's retry policy and returns the final status.
func (c *Client) call(ctx context.Context, cl call) (int, error) {
	var payload []byte
	if cl.body != nil {
		var err error
		if payload, err = json.Marshal(cl.body); err != nil {
			return 0, fmt.Errorf("idemclient: %s: encode request: %w", cl.op, err)
		}
	}
	p := c.retry
	for attempt := 1; ; attempt++ {
		status, header, body, err := c.attempt(ctx, cl, payload)
		if errors.Is(err, errResponseTooLarge) {
			// Not a transport error: the same request would get the same answer.
			return status, fmt.Errorf("idemclient: %s: %d response: %w", cl.op, status, err)
		}
		if err == nil && status >= 200 && status < 300 {
			if cl.out != nil && status != http.StatusNoContent {
				if err := json.Unmarshal(body, cl.out); err != nil {
					return status, fmt.Errorf("idemclient: %s: decode %d response: %w", cl.op, status, err)
				}
			}
			return status, nil
		}
		var retryAfter time.Duration
		retryable := false
		if err != nil {
			if ctx.Err() != nil {
				return 0, fmt.Errorf("idemclient: %s: %w", cl.op, err)
			}
			err = &transportError{op: cl.op, err: err}
			retryable = true
		} else {
			apiErr := decodeError(status, header, body)
			err, retryAfter = apiErr, apiErr.RetryAfter
			switch {
			case status == http.StatusTooManyRequests, errors.Is(apiErr, ErrUnavailable):
				retryable = true
			case cl.retryInProgress && errors.Is(apiErr, ErrInProgress):
				retryable = true
			case cl.op == "complete" && errors.Is(apiErr, ErrInternal):
				// Complete is safe to repeat, and a response not recorded makes the work run
				// again once the lease runs out.
				retryable = true
			}
		}
		if !retryable || cl.noRetry || attempt >= p.MaxAttempts {
			return status, err
		}
		wait := p.delay(attempt, retryAfter)
		if dl, ok := ctx.Deadline(); ok && time.Now().Add(wait).After(dl) {
			return status, err // the wait would outlive the context: give up now
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			// The caller gave up: say so first, so that errors.Is(err, context.Canceled) holds,
			// and keep the error that the retry was waiting to overcome.
			return status, fmt.Errorf("idemclient: %s: %w while waiting to retry after: %w", cl.op, ctx.Err(), err)
		case <-t.C:
		}
	}
}

// attempt sends one request. A non-nil error means no HTTP response was received.
func (c *Client) attempt(ctx context.Context, cl call, payload []byte) (int, http.Header, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, c.retry.AttemptTimeout+cl.extraTimeout)
	defer cancel()
	var body io.Reader
	if payload != nil {
		body = bytes.NewReader(payload)
	}
	req, err := http.NewRequestWithContext(ctx, cl.method, c.base+cl.path, body)
	if err != nil {
		return 0, nil, nil, err
	}
	if payload != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json, application/problem+json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	if c.userAgent != "" {
		req.Header.Set("User-Agent", c.userAgent)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		// An error body only informs (decodeError); a long one (a proxy's error page, say) is
		// cut, not refused.
		data, err := io.ReadAll(io.LimitReader(resp.Body, maxProblemBytes))
		if err != nil {
			return 0, nil, nil, fmt.Errorf("read response: %w", err)
		}
		return resp.StatusCode, resp.Header, data, nil
	}
	data, err := readLimited(resp.Body, resp.ContentLength, c.maxResponse)
	if errors.Is(err, errResponseTooLarge) {
		return resp.StatusCode, nil, nil, err
	}
	if err != nil {
		return 0, nil, nil, err
	}
	return resp.StatusCode, resp.Header, data, nil
}

// readLimited reads a whole body of at most limit bytes, whose length is contentLength (-1 when
// unknown). A longer body is an error matching errResponseTooLarge, never a cut one: a record cut
// short would only fail to decode, with a JSON syntax error that hides the cause.
func readLimited(r io.Reader, contentLength, limit int64) ([]byte, error) {
	if contentLength > limit {
		return nil, fmt.Errorf("%w: Content-Length %d is over the limit of %d bytes", errResponseTooLarge, contentLength, limit)
	}
	// Room for the announced length and one byte more, so that the read that finds the end does
	// not grow (and so copy) a buffer that may be tens of megabytes.
	size := int64(512)
	if contentLength >= 0 {
		size = contentLength + 1
	}
	buf := make([]byte, 0, size)
	lr := io.LimitReader(r, limit+1)
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := lr.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read response: %w", err)
		}
	}
	if int64(len(buf)) > limit {
		return nil, fmt.Errorf("%w: more than the limit of %d bytes", errResponseTooLarge, limit)
	}
	return buf, nil
}
