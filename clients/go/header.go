package idemclient

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"strconv"
	"strings"
)

// KeyHeader is the request header that carries an idempotency key (draft-ietf-httpapi-idempotency-key-header).
const KeyHeader = "Idempotency-Key"

// ReplayedHeader marks a replayed response.
const ReplayedHeader = "Idempotent-Replayed"

// MaxHeaderKeyLen is the longest idempotency key the middleware accepts from a request, in bytes.
const MaxHeaderKeyLen = 255

var errBadKeyHeader = errors.New("idemclient: malformed Idempotency-Key header")

// ParseKeyHeader returns the key carried by an Idempotency-Key header value. It accepts the
// draft's form, an RFC 8941 structured-field string ("8e03978e-40d5", with \" and \\ as the only
// escapes, any parameters after it ignored), and, for clients that send it unquoted, a bare key
// of visible ASCII without '"'. It returns an error for an empty key, a key longer than
// MaxHeaderKeyLen bytes, or a malformed value.
func ParseKeyHeader(v string) (string, error) {
	v = strings.Trim(v, " \t")
	var key string
	if strings.HasPrefix(v, `"`) {
		var b strings.Builder
		i := 1
		for ; i < len(v); i++ {
			c := v[i]
			if c == '"' {
				break
			}
			if c == '\\' {
				i++
				if i >= len(v) || (v[i] != '"' && v[i] != '\\') {
					return "", errBadKeyHeader
				}
				c = v[i]
			} else if c < 0x20 || c > 0x7e {
				return "", errBadKeyHeader
			}
			b.WriteByte(c)
		}
		if i >= len(v) {
			return "", errBadKeyHeader // unterminated
		}
		if rest := v[i+1:]; rest != "" && !validParams(rest) {
			return "", errBadKeyHeader
		}
		key = b.String()
	} else {
		for i := 0; i < len(v); i++ {
			if c := v[i]; c < 0x21 || c > 0x7e || c == '"' {
				return "", errBadKeyHeader
			}
		}
		key = v
	}
	if key == "" || len(key) > MaxHeaderKeyLen {
		return "", errBadKeyHeader
	}
	return key, nil
}

// validParams reports whether s is a plausible RFC 8941 parameter list (";a=1;b"). The values
// are not interpreted, so only their alphabet is checked.
func validParams(s string) bool {
	if s[0] != ';' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < 0x20 || c > 0x7e) && c != '\t' {
			return false
		}
	}
	return true
}

// ScopedKey returns the idemsvc key the middleware uses for an idempotency key sent to method
// and scope (the route), so that the same key sent to two endpoints names two records. It is
// "METHOD:len(scope):scope:key" when that is a valid idemsvc key (see ValidKey), and otherwise
// (too long, or with bytes an idemsvc key cannot hold) "sha256:" and the hex SHA-256 of the three
// parts, length-prefixed.
func ScopedKey(method, scope, key string) string {
	k := method + ":" + strconv.Itoa(len(scope)) + ":" + scope + ":" + key
	if ValidKey(k) {
		return k
	}
	h := sha256.New()
	for _, part := range []string{method, scope, key} {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(part)))
		h.Write(n[:])
		h.Write([]byte(part))
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}
