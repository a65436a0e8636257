package idemclient

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"slices"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// Fingerprint returns the fingerprint of a request: the hex SHA-256 of its method, its path (with
// the query, if the fingerprint should cover it) and its body, each length-prefixed so that no
// two different triples hash the same bytes. Precisely, the hash is over "idemsvc-fingerprint-v1\n"
// followed by three parts, each a tag byte, the length as an 8-byte big-endian integer, and the
// bytes: 'm' and the method, 'p' and the path, then 'j' and the canonical JSON of the body, or
// 'r' and the raw body when it is not canonicalisable JSON. (ExampleFingerprint pins a value, for
// clients in other languages.)
//
// A body that is JSON is canonicalised first, in the style of RFC 8785 (JCS): object members
// sorted by key (by UTF-16 code units), no insignificant whitespace, strings with the minimal
// escaping of RFC 8785. So {"a":1,"b":2} and { "b": 2, "a": 1 } have the same fingerprint.
//
// Numbers depart from RFC 8785 on purpose. RFC 8785 rounds every number to an IEEE 754 double,
// so 12345678901234567890 and 12345678901234567891 would become the same request, and a changed
// amount or id would be answered with the response of the original one. Here a number keeps its
// exact decimal value and is written the way RFC 8785 writes a double with those digits: 1, 1.0,
// 1e0 and 10E-1 are all "1"; 1.50 is "1.5"; 1e21 is "1e+21"; 0.0000001 is "1e-7". For every
// number a double holds exactly, the result is RFC 8785's.
//
// A body that is not valid UTF-8 JSON, or that has duplicate object keys, lone surrogate escapes
// or nesting deeper than 1000, is hashed as it is. An empty body is hashed as empty.
func Fingerprint(method, path string, body []byte) string { return fingerprint(method, path, body, "") }

// fingerprint is Fingerprint, and also of credential when it is not empty (the middleware's
// caller's Authorization, hashed first), framed 'a' after the body: without one, the result is
// Fingerprint's.
func fingerprint(method, path string, body []byte, credential string) string {
	h := sha256.New()
	frame := func(kind byte, b []byte) {
		var n [9]byte
		n[0] = kind
		binary.BigEndian.PutUint64(n[1:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	h.Write([]byte("idemsvc-fingerprint-v1\n"))
	frame('m', []byte(method))
	frame('p', []byte(path))
	if c, ok := CanonicalJSON(body); ok {
		frame('j', c)
	} else {
		frame('r', body)
	}
	if credential != "" {
		c := sha256.Sum256([]byte(credential))
		frame('a', c[:])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// CanonicalJSON returns the canonical form of a JSON text as Fingerprint defines it, and false
// when body is not canonicalisable JSON (see Fingerprint).
func CanonicalJSON(body []byte) ([]byte, bool) {
	if len(body) == 0 || !utf8.Valid(body) {
		return nil, false
	}
	p := &jsonParser{in: body}
	p.skipSpace()
	out, err := p.value(nil, 0)
	if err != nil {
		return nil, false
	}
	p.skipSpace()
	if p.pos != len(p.in) {
		return nil, false
	}
	return out, true
}

var errNotCanonical = errors.New("not canonicalisable JSON")

const maxJSONDepth = 1000

type jsonParser struct {
	in  []byte
	pos int
}

func (p *jsonParser) skipSpace() {
	for p.pos < len(p.in) {
		switch p.in[p.pos] {
		case ' ', '\t', '\n', '\r':
			p.pos++
		default:
			return
		}
	}
}

func (p *jsonParser) literal(out []byte, lit string) ([]byte, error) {
	if !strings.HasPrefix(string(p.in[p.pos:]), lit) {
		return nil, errNotCanonical
	}
	p.pos += len(lit)
	return append(out, lit...), nil
}

// value appends the canonical form of the value at p.pos to out.
func (p *jsonParser) value(out []byte, depth int) ([]byte, error) {
	if depth > maxJSONDepth || p.pos >= len(p.in) {
		return nil, errNotCanonical
	}
	switch c := p.in[p.pos]; {
	case c == '{':
		return p.object(out, depth)
	case c == '[':
		return p.array(out, depth)
	case c == '"':
		s, err := p.string()
		if err != nil {
			return nil, err
		}
		return appendJCSString(out, s), nil
	case c == 't':
		return p.literal(out, "true")
	case c == 'f':
		return p.literal(out, "false")
	case c == 'n':
		return p.literal(out, "null")
	case c == '-' || (c >= '0' && c <= '9'):
		return p.number(out)
	}
	return nil, errNotCanonical
}

func (p *jsonParser) array(out []byte, depth int) ([]byte, error) {
	p.pos++ // [
	out = append(out, '[')
	p.skipSpace()
	if p.pos < len(p.in) && p.in[p.pos] == ']' {
		p.pos++
		return append(out, ']'), nil
	}
	for {
		var err error
		p.skipSpace()
		if out, err = p.value(out, depth+1); err != nil {
			return nil, err
		}
		p.skipSpace()
		if p.pos >= len(p.in) {
			return nil, errNotCanonical
		}
		switch p.in[p.pos] {
		case ',':
			p.pos++
			out = append(out, ',')
		case ']':
			p.pos++
			return append(out, ']'), nil
		default:
			return nil, errNotCanonical
		}
	}
}

type member struct {
	key   string
	key16 []uint16
	value []byte
}

func (p *jsonParser) object(out []byte, depth int) ([]byte, error) {
	p.pos++ // {
	var members []member
	p.skipSpace()
	if p.pos < len(p.in) && p.in[p.pos] == '}' {
		p.pos++
		return append(out, '{', '}'), nil
	}
	for {
		p.skipSpace()
		if p.pos >= len(p.in) || p.in[p.pos] != '"' {
			return nil, errNotCanonical
		}
		key, err := p.string()
		if err != nil {
			return nil, err
		}
		p.skipSpace()
		if p.pos >= len(p.in) || p.in[p.pos] != ':' {
			return nil, errNotCanonical
		}
		p.pos++
		p.skipSpace()
		v, err := p.value(nil, depth+1)
		if err != nil {
			return nil, err
		}
		members = append(members, member{key: key, key16: utf16.Encode([]rune(key)), value: v})
		p.skipSpace()
		if p.pos >= len(p.in) {
			return nil, errNotCanonical
		}
		if p.in[p.pos] == ',' {
			p.pos++
			continue
		}
		if p.in[p.pos] != '}' {
			return nil, errNotCanonical
		}
		p.pos++
		break
	}
	// RFC 8785 section 3.2.3: sort by the keys' UTF-16 code units.
	slices.SortFunc(members, func(a, b member) int { return slices.Compare(a.key16, b.key16) })
	out = append(out, '{')
	for i, m := range members {
		if i > 0 {
			if m.key == members[i-1].key {
				return nil, errNotCanonical // duplicate keys have no canonical form
			}
			out = append(out, ',')
		}
		out = appendJCSString(out, m.key)
		out = append(out, ':')
		out = append(out, m.value...)
	}
	return append(out, '}'), nil
}

// string decodes the JSON string at p.pos. Lone surrogate escapes are refused: they would all
// decode to U+FFFD and make different bodies equal.
func (p *jsonParser) string() (string, error) {
	p.pos++ // "
	var b strings.Builder
	for {
		if p.pos >= len(p.in) {
			return "", errNotCanonical
		}
		c := p.in[p.pos]
		switch {
		case c == '"':
			p.pos++
			return b.String(), nil
		case c < 0x20:
			return "", errNotCanonical
		case c != '\\':
			b.WriteByte(c) // the input is valid UTF-8, so bytes can be copied as they are
			p.pos++
			continue
		}
		if p.pos+1 >= len(p.in) {
			return "", errNotCanonical
		}
		esc := p.in[p.pos+1]
		p.pos += 2
		switch esc {
		case '"', '\\', '/':
			b.WriteByte(esc)
		case 'b':
			b.WriteByte('\b')
		case 'f':
			b.WriteByte('\f')
		case 'n':
			b.WriteByte('\n')
		case 'r':
			b.WriteByte('\r')
		case 't':
			b.WriteByte('\t')
		case 'u':
			r, ok := p.hex4()
			if !ok {
				return "", errNotCanonical
			}
			if utf16.IsSurrogate(r) {
				if r >= 0xdc00 || p.pos+1 >= len(p.in) || p.in[p.pos] != '\\' || p.in[p.pos+1] != 'u' {
					return "", errNotCanonical
				}
				p.pos += 2
				lo, ok := p.hex4()
				if !ok {
					return "", errNotCanonical
				}
				if r = utf16.DecodeRune(r, lo); r == utf8.RuneError {
					return "", errNotCanonical
				}
			}
			b.WriteRune(r)
		default:
			return "", errNotCanonical
		}
	}
}

func (p *jsonParser) hex4() (rune, bool) {
	if p.pos+4 > len(p.in) {
		return 0, false
	}
	n, err := strconv.ParseUint(string(p.in[p.pos:p.pos+4]), 16, 32)
	if err != nil {
		return 0, false
	}
	p.pos += 4
	return rune(n), true
}

// appendJCSString appends s as RFC 8785 writes a string: only '"', '\\' and control characters
// are escaped, with the short forms where JSON has them and \u00xx (lower case) otherwise.
func appendJCSString(out []byte, s string) []byte {
	const hexDigits = "0123456789abcdef"
	out = append(out, '"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"', c == '\\':
			out = append(out, '\\', c)
		case c == '\b':
			out = append(out, '\\', 'b')
		case c == '\f':
			out = append(out, '\\', 'f')
		case c == '\n':
			out = append(out, '\\', 'n')
		case c == '\r':
			out = append(out, '\\', 'r')
		case c == '\t':
			out = append(out, '\\', 't')
		case c < 0x20:
			out = append(out, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
		default:
			out = append(out, c)
		}
	}
	return append(out, '"')
}

// number parses the JSON number at p.pos and appends its canonical form (see Fingerprint).
func (p *jsonParser) number(out []byte) ([]byte, error) {
	in, i := p.in, p.pos
	neg := false
	if in[i] == '-' {
		neg = true
		i++
	}
	digitsFrom := func(j int) int {
		for j < len(in) && in[j] >= '0' && in[j] <= '9' {
			j++
		}
		return j
	}
	// Integer part: 0 or [1-9][0-9]*.
	intStart := i
	if i >= len(in) || in[i] < '0' || in[i] > '9' {
		return nil, errNotCanonical
	}
	if in[i] == '0' {
		i++
	} else {
		i = digitsFrom(i)
	}
	intPart := in[intStart:i]
	var fracPart []byte
	if i < len(in) && in[i] == '.' {
		j := digitsFrom(i + 1)
		if j == i+1 {
			return nil, errNotCanonical
		}
		fracPart = in[i+1 : j]
		i = j
	}
	exp := int64(0)
	if i < len(in) && (in[i] == 'e' || in[i] == 'E') {
		j := i + 1
		if j < len(in) && (in[j] == '+' || in[j] == '-') {
			j++
		}
		k := digitsFrom(j)
		if k == j {
			return nil, errNotCanonical
		}
		e, err := strconv.ParseInt(string(in[i+1:k]), 10, 32)
		if err != nil {
			return nil, errNotCanonical // an exponent this large has no sensible canonical form
		}
		exp, i = e, k
	}
	p.pos = i

	// value = digits * 10^e
	digits := make([]byte, 0, len(intPart)+len(fracPart))
	digits = append(digits, intPart...)
	digits = append(digits, fracPart...)
	e := exp - int64(len(fracPart))
	for len(digits) > 0 && digits[0] == '0' {
		digits = digits[1:]
	}
	if len(digits) == 0 {
		return append(out, '0'), nil // -0 and 0 are the same number, as in RFC 8785
	}
	for digits[len(digits)-1] == '0' {
		digits = digits[:len(digits)-1]
		e++
	}
	if neg {
		out = append(out, '-')
	}
	// ECMAScript Number::toString with k digits and point position n (value = 0.digits * 10^n).
	k := int64(len(digits))
	n := k + e
	switch {
	case k <= n && n <= 21:
		out = append(out, digits...)
		for range n - k {
			out = append(out, '0')
		}
	case 0 < n && n <= 21:
		out = append(out, digits[:n]...)
		out = append(out, '.')
		out = append(out, digits[n:]...)
	case -6 < n && n <= 0:
		out = append(out, '0', '.')
		for range -n {
			out = append(out, '0')
		}
		out = append(out, digits...)
	default:
		out = append(out, digits[0])
		if k > 1 {
			out = append(out, '.')
			out = append(out, digits[1:]...)
		}
		out = append(out, 'e')
		if n-1 >= 0 {
			out = append(out, '+')
		}
		out = strconv.AppendInt(out, n-1, 10)
	}
	return out, nil
}
