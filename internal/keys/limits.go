package keys

import (
	"fmt"
	"net/http"
	"time"
)

// Limits are the configured defaults and bounds that turn what a client asked for into a valid
// request. Out-of-range values are errors, never silently clamped.
type Limits struct {
	DefaultLease time.Duration
	MaxLease     time.Duration
	DefaultTTL   time.Duration
	MaxTTL       time.Duration
	MaxWait      time.Duration
	// MaxBodyBytes bounds a stored response body.
	MaxBodyBytes int
	// MaxHeaders bounds the number of header values, and MaxHeaderBytes the total size of the
	// names and values, of a stored response.
	MaxHeaders     int
	MaxHeaderBytes int
}

// DefaultLimits returns the defaults of CONTRACT.md.
func DefaultLimits() Limits {
	return Limits{
		DefaultLease:   30 * time.Second,
		MaxLease:       time.Hour,
		DefaultTTL:     24 * time.Hour,
		MaxTTL:         720 * time.Hour,
		MaxWait:        30 * time.Second,
		MaxBodyBytes:   1 << 20,
		MaxHeaders:     100,
		MaxHeaderBytes: 16 << 10,
	}
}

// Duration resolves an optional millisecond value: nil gives def; a value below min or above
// max gives an error wrapping ErrInvalidRequest that names the field.
func Duration(field string, ms *int64, def, min, max time.Duration) (time.Duration, error) {
	if ms == nil {
		return def, nil
	}
	if *ms > int64(max/time.Millisecond) || *ms < int64(min/time.Millisecond) {
		return 0, fmt.Errorf("%w: %s must be between %d and %d", ErrInvalidRequest, field,
			min.Milliseconds(), max.Milliseconds())
	}
	return time.Duration(*ms) * time.Millisecond, nil
}

// LeaseDuration resolves begin's or renew's lease_ms (1 ms to MaxLease).
func (l Limits) LeaseDuration(ms *int64) (time.Duration, error) {
	return Duration("lease_ms", ms, l.DefaultLease, time.Millisecond, l.MaxLease)
}

// TTLDuration resolves begin's ttl_ms (1 ms to MaxTTL).
func (l Limits) TTLDuration(ms *int64) (time.Duration, error) {
	return Duration("ttl_ms", ms, l.DefaultTTL, time.Millisecond, l.MaxTTL)
}

// CompleteTTL resolves complete's ttl_ms: absent is zero, which keeps the begin's TTL.
func (l Limits) CompleteTTL(ms *int64) (time.Duration, error) {
	return Duration("ttl_ms", ms, 0, time.Millisecond, l.MaxTTL)
}

// WaitDuration resolves begin's wait_ms (0 to MaxWait; absent is 0).
func (l Limits) WaitDuration(ms *int64) (time.Duration, error) {
	return Duration("wait_ms", ms, 0, 0, l.MaxWait)
}

// CheckFingerprint returns an error wrapping ErrInvalidRequest when fp is longer than
// MaxFingerprintLen bytes.
func CheckFingerprint(fp string) error {
	if len(fp) > MaxFingerprintLen {
		return fmt.Errorf("%w: fingerprint is longer than %d bytes", ErrInvalidRequest, MaxFingerprintLen)
	}
	return nil
}

// credentialHeaders may never be stored: replaying them would hand one caller's credentials to
// another.
var credentialHeaders = map[string]bool{
	"Set-Cookie":          true,
	"Authorization":       true,
	"Proxy-Authorization": true,
}

// CheckResponse returns an error wrapping ErrInvalidResponse when resp may not be stored: a
// status outside 100 to 599, a credential header, an invalid header name, too many or too large
// headers, or a body over MaxBodyBytes.
func (l Limits) CheckResponse(resp Response) error {
	if resp.Status < 100 || resp.Status > 599 {
		return fmt.Errorf("%w: status %d is outside 100 to 599", ErrInvalidResponse, resp.Status)
	}
	if len(resp.Body) > l.MaxBodyBytes {
		return fmt.Errorf("%w: body is larger than %d bytes", ErrInvalidResponse, l.MaxBodyBytes)
	}
	n, size := 0, 0
	for name, values := range resp.Headers {
		if !validHeaderName(name) {
			return fmt.Errorf("%w: header name %q is not a valid token", ErrInvalidResponse, name)
		}
		if credentialHeaders[http.CanonicalHeaderKey(name)] {
			return fmt.Errorf("%w: credential header %s may not be stored", ErrInvalidResponse,
				http.CanonicalHeaderKey(name))
		}
		for _, v := range values {
			if !validHeaderValue(v) {
				return fmt.Errorf("%w: header %s has an invalid value", ErrInvalidResponse, name)
			}
			n++
			size += len(name) + len(v)
		}
		if len(values) == 0 {
			n++
			size += len(name)
		}
	}
	if n > l.MaxHeaders {
		return fmt.Errorf("%w: more than %d header values", ErrInvalidResponse, l.MaxHeaders)
	}
	if name := sameNameTwice(resp.Headers); name != "" {
		return fmt.Errorf("%w: header %s is given twice, in different case", ErrInvalidResponse, http.CanonicalHeaderKey(name))
	}
	if size > l.MaxHeaderBytes {
		return fmt.Errorf("%w: headers are larger than %d bytes", ErrInvalidResponse, l.MaxHeaderBytes)
	}
	return nil
}

// sameNameTwice returns a header name that h holds twice in different case ("x-a" and "X-A"),
// or "". HTTP names are case-insensitive: both would be replayed as one header, in an order the
// map does not keep, and a retried complete could not be recognised as the same response.
func sameNameTwice(h map[string][]string) string {
	if len(h) < 2 {
		return ""
	}
	seen := make(map[string]bool, len(h))
	for name := range h {
		c := http.CanonicalHeaderKey(name)
		if seen[c] {
			return name
		}
		seen[c] = true
	}
	return ""
}

// validHeaderName reports whether s is an RFC 9110 token.
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c < 0x80 && c > 0x20 && !isSeparator(c):
		default:
			return false
		}
	}
	return true
}

func isSeparator(c byte) bool {
	switch c {
	case '(', ')', '<', '>', '@', ',', ';', ':', '\\', '"', '/', '[', ']', '?', '=', '{', '}', 0x7f:
		return true
	}
	return false
}

// validHeaderValue reports whether v has no control characters other than tab.
func validHeaderValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}
