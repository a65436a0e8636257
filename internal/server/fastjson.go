package server

import (
	"encoding/base64"
	"io"
)

// The fast path of decode: a small decoder for the bodies that clients actually send, so that
// the hot paths skip encoding/json's reflection and its allocations. It accepts only a strict
// subset of JSON, on which encoding/json would succeed with the same value:
//
//   - one object, white space around and between its tokens, nothing after it;
//   - member names spelled exactly as the struct tags (encoding/json also matches them without
//     regard to case), each at most once per object (encoding/json merges or overwrites);
//   - strings of printable ASCII without escapes;
//   - integers of at most 18 digits (9 for the stored status), without fraction or exponent;
//   - no null.
//
// Anything else, every error included, is left to encoding/json (decodeJSON), which reads the
// same bytes again: so an error, its problem and its detail text come from the same code as
// before. FuzzDecodeFast holds the two paths to the same results.

// fastDecoder is a request body that has a fast decoder.
type fastDecoder interface {
	// decodeFast decodes b, a whole body, into the receiver, which must be zero, and reports
	// whether b was in the subset it knows. When it reports false the receiver is zero.
	decodeFast(b []byte) bool
}

// maxFastBody is the largest body that decode reads whole before decoding it. Reading a body
// whole changes nothing that a client sees: net/http reads what a handler left unread of a
// body before it answers, up to 256 KiB, so the answer never comes sooner, and the connection
// is kept alive or closed alike. Two kinds of body are left to the streaming decoder, because
// there it could differ: one of unknown length (chunked), which may be longer than that, and
// one sent with Expect: 100-continue, whose unread rest net/http does not read but closes the
// connection instead.
const maxFastBody = 64 << 10

// readBody appends what r yields to b until r reports an error or b holds more than limit
// bytes. It returns the error, io.EOF included, or nil when it stopped past the limit; with
// io.EOF too b may hold limit+1 bytes, when the last read brought both.
func readBody(r io.Reader, b []byte, limit int) ([]byte, error) {
	for len(b) <= limit {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := r.Read(b[len(b):min(cap(b), limit+1)])
		b = b[:len(b)+n]
		if err != nil {
			return b, err
		}
	}
	return b, nil
}

// replayReader yields buf, then err, or when err is nil what r yields: the body as a reader
// that had not been read would have.
type replayReader struct {
	buf []byte
	err error
	r   io.Reader
}

func (rr *replayReader) Read(p []byte) (int, error) {
	if len(rr.buf) > 0 {
		n := copy(p, rr.buf)
		rr.buf = rr.buf[n:]
		return n, nil
	}
	if rr.err != nil {
		return 0, rr.err
	}
	return rr.r.Read(p)
}

// isJSONSpace reports whether b is white space to JSON (and to encoding/json) only.
func isJSONSpace(b []byte) bool {
	for _, c := range b {
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return false
		}
	}
	return true
}

// scanner reads the subset of JSON described above from b.
type scanner struct {
	b []byte
	i int
}

func (s *scanner) space() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// consume skips white space and then c, if c is next.
func (s *scanner) consume(c byte) bool {
	s.space()
	if s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

// end reports whether only white space is left.
func (s *scanner) end() bool {
	s.space()
	return s.i == len(s.b)
}

// plain holds the bytes that a string of the subset may hold: printable ASCII but the quote
// and the backslash.
var plain = func() (t [256]bool) {
	for c := 0x20; c <= 0x7e; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// str reads a string of printable ASCII without escapes and returns its content, which
// aliases b.
func (s *scanner) str() ([]byte, bool) {
	if !s.consume('"') {
		return nil, false
	}
	j := s.i
	for j < len(s.b) && plain[s.b[j]] {
		j++
	}
	if j == len(s.b) || s.b[j] != '"' {
		return nil, false
	}
	v := s.b[s.i:j]
	s.i = j + 1
	return v, true
}

// int reads an integer of 1 to maxDigits digits, in JSON's syntax (no leading zero). What
// follows it is left to the caller, which accepts only ',' or '}' (no fraction, no exponent).
func (s *scanner) int(maxDigits int) (int64, bool) {
	s.space()
	neg := s.i < len(s.b) && s.b[s.i] == '-'
	if neg {
		s.i++
	}
	start := s.i
	var n int64
	for s.i < len(s.b) && s.b[s.i] >= '0' && s.b[s.i] <= '9' {
		n = n*10 + int64(s.b[s.i]-'0')
		s.i++
	}
	if d := s.i - start; d == 0 || d > maxDigits || (d > 1 && s.b[start] == '0') {
		return 0, false
	}
	if neg {
		n = -n
	}
	return n, true
}

// object reads an object: member calls it with each member's name, with the scanner at the
// member's value, and reports whether it read the value.
func (s *scanner) object(member func(name []byte) bool) bool {
	if !s.consume('{') {
		return false
	}
	if s.consume('}') {
		return true
	}
	for {
		name, ok := s.str()
		if !ok || !s.consume(':') || !member(name) {
			return false
		}
		if !s.consume(',') {
			return s.consume('}')
		}
	}
}

// strings reads an array of strings: empty, not nil, when the array is (as encoding/json).
func (s *scanner) strings() ([]string, bool) {
	if !s.consume('[') {
		return nil, false
	}
	vs := []string{}
	if s.consume(']') {
		return vs, true
	}
	for {
		v, ok := s.str()
		if !ok {
			return nil, false
		}
		vs = append(vs, string(v))
		if !s.consume(',') {
			return vs, s.consume(']')
		}
	}
}

// once reports whether bit is not yet set in seen, and sets it: a member that comes twice is
// left to encoding/json.
func once(seen *uint8, bit uint8) bool {
	if *seen&bit != 0 {
		return false
	}
	*seen |= bit
	return true
}

// strOnce reads a string member into dst; false when it is not in the subset or its name came
// before (bit in seen).
func (s *scanner) strOnce(seen *uint8, bit uint8, dst *string) bool {
	v, ok := s.str()
	if !ok || !once(seen, bit) {
		return false
	}
	*dst = string(v)
	return true
}

// intOnce reads an integer member into *slot and points *ptr at it, as encoding/json would
// allocate and point; false when it is not in the subset or its name came before.
func (s *scanner) intOnce(seen *uint8, bit uint8, slot *int64, ptr **int64) bool {
	n, ok := s.int(18)
	if !ok || !once(seen, bit) {
		return false
	}
	*slot, *ptr = n, slot
	return true
}

func (in *beginRequest) decodeFast(b []byte) bool {
	s := scanner{b: b}
	var seen uint8
	ok := s.object(func(name []byte) bool {
		switch string(name) {
		case "fingerprint":
			return s.strOnce(&seen, 1, &in.Fingerprint)
		case "lease_ms":
			return s.intOnce(&seen, 2, &in.ms[0], &in.LeaseMS)
		case "ttl_ms":
			return s.intOnce(&seen, 4, &in.ms[1], &in.TTLMS)
		case "wait_ms":
			return s.intOnce(&seen, 8, &in.ms[2], &in.WaitMS)
		}
		return false
	})
	if !ok || !s.end() {
		*in = beginRequest{}
		return false
	}
	return true
}

func (in *completeRequest) decodeFast(b []byte) bool {
	s := scanner{b: b}
	var seen uint8
	ok := s.object(func(name []byte) bool {
		switch string(name) {
		case "token":
			return s.strOnce(&seen, 1, &in.Token)
		case "ttl_ms":
			return s.intOnce(&seen, 2, &in.ttlMS, &in.TTLMS)
		case "response":
			if !once(&seen, 4) || !in.resp.decodeFast(&s) {
				return false
			}
			in.Response = &in.resp
			return true
		}
		return false
	})
	if !ok || !s.end() {
		*in = completeRequest{}
		return false
	}
	return true
}

// decodeFast reads the response object of a complete at s.
func (r *storedResponse) decodeFast(s *scanner) bool {
	var seen uint8
	return s.object(func(name []byte) bool {
		switch string(name) {
		case "status":
			n, ok := s.int(9)
			if !ok || !once(&seen, 1) {
				return false
			}
			r.status = int(n)
			r.Status = &r.status
			return true
		case "headers":
			if !once(&seen, 2) {
				return false
			}
			h := map[string][]string{}
			ok := s.object(func(name []byte) bool {
				if _, dup := h[string(name)]; dup {
					return false
				}
				vs, ok := s.strings()
				h[string(name)] = vs
				return ok
			})
			r.Headers = h
			return ok
		case "body":
			v, ok := s.str()
			if !ok || !once(&seen, 4) {
				return false
			}
			// As encoding/json decodes a []byte: standard base64, into a slice that is empty, not
			// nil, for "".
			body := make([]byte, base64.StdEncoding.DecodedLen(len(v)))
			n, err := base64.StdEncoding.Decode(body, v)
			r.Body = body[:n]
			return err == nil
		}
		return false
	})
}

func (in *renewRequest) decodeFast(b []byte) bool {
	s := scanner{b: b}
	var seen uint8
	ok := s.object(func(name []byte) bool {
		switch string(name) {
		case "token":
			return s.strOnce(&seen, 1, &in.Token)
		case "lease_ms":
			return s.intOnce(&seen, 2, &in.leaseMS, &in.LeaseMS)
		}
		return false
	})
	if !ok || !s.end() {
		*in = renewRequest{}
		return false
	}
	return true
}

func (in *releaseRequest) decodeFast(b []byte) bool {
	s := scanner{b: b}
	var seen uint8
	ok := s.object(func(name []byte) bool {
		return string(name) == "token" && s.strOnce(&seen, 1, &in.Token)
	})
	if !ok || !s.end() {
		*in = releaseRequest{}
		return false
	}
	return true
}
