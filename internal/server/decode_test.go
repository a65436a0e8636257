package server

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// decodeReference is decode without its fast path: the media type checked as decode does, then
// the whole body through encoding/json and checkStrict (decodeJSON, the code every body took
// before the fast path). FuzzDecodeFast holds decode to it.
func decodeReference(r *http.Request, lim bodyLimit, v any, optional bool) error {
	if !jsonMediaType(r.Header.Values("Content-Type")) {
		return emptyOrUnsupported(r.Body, lim.bytes, optional)
	}
	return decodeJSON(r.Body, lim, v, optional)
}

// errBroken is a body that fails to read, as a broken chunked encoding does.
var errBroken = errors.New("broken body")

// bodyReader yields b in reads of at most chunk bytes (0: all at once), then end.
type bodyReader struct {
	b     []byte
	chunk int
	end   error
}

func (br *bodyReader) Read(p []byte) (int, error) {
	if len(br.b) == 0 {
		return 0, br.end
	}
	n := len(br.b)
	if br.chunk > 0 {
		n = min(n, br.chunk)
	}
	n = copy(p, br.b[:n])
	br.b = br.b[n:]
	if len(br.b) == 0 && br.chunk == 0 {
		return n, br.end // data and the end in one read, as a strings.Reader does not
	}
	return n, nil
}

// decodeCase is one way to send a body: which request it is, and how the body arrives.
type decodeCase struct {
	kind          int   // 0 begin, 1 complete, 2 renew, 3 release
	optional      bool  // an empty body is allowed (begin's is)
	chunk         int   // bytes per read; 0: all at once
	broken        bool  // the body ends in a read error instead of io.EOF
	maxBytes      int64 // the request body limit
	contentLength int64 // the declared length; -1: unknown (chunked)
	contentType   string
	expect        bool // Expect: 100-continue
	values        int  // bodyLimit.values; 0: no bound
}

// errTestTooMany is the bodyLimit.tooMany of decode cases.
var errTestTooMany = fmt.Errorf("%w: too many values", keys.ErrInvalidRequest)

func (c decodeCase) limit() bodyLimit {
	return bodyLimit{bytes: c.maxBytes, values: c.values, tooMany: errTestTooMany}
}

func newDecodeCase(mode uint16, contentType string, body []byte) decodeCase {
	c := decodeCase{
		kind:          int(mode & 3),
		optional:      mode&4 != 0,
		chunk:         []int{0, 1, 7, 512}[(mode>>3)&3],
		broken:        mode&32 != 0,
		maxBytes:      []int64{1 << 20, 16, 100, maxFastBody + 10}[(mode>>6)&3],
		contentLength: int64(len(body)),
		contentType:   contentType,
	}
	if mode&256 != 0 {
		c.contentLength = -1
	}
	if mode&512 != 0 {
		c.contentLength = int64(len(body)) / 2 // a length that lies: the reads go on all the same
	}
	c.expect = mode&1024 != 0
	if mode&2048 != 0 {
		c.values = 8
	}
	return c
}

func (c decodeCase) request(body []byte) *http.Request {
	end := io.EOF
	if c.broken {
		end = errBroken
	}
	r := &http.Request{Method: "POST", Header: http.Header{},
		Body: io.NopCloser(&bodyReader{b: body, chunk: c.chunk, end: end}), ContentLength: c.contentLength}
	if c.contentType != "" {
		r.Header.Set("Content-Type", c.contentType)
	}
	if c.expect {
		r.Header.Set("Expect", "100-continue")
	}
	return r
}

// newBody returns a pointer to a zero request body of kind.
func newBody(kind int) any {
	return [...]func() any{
		func() any { return new(beginRequest) },
		func() any { return new(completeRequest) },
		func() any { return new(renewRequest) },
		func() any { return new(releaseRequest) },
	}[kind]()
}

// exported returns what encoding/json fills in v: v without the fast decoder's storage, with
// pointers that point to copies (reflect.DeepEqual compares what pointers point to).
func exported(v any) any {
	cp := func(p *int64) *int64 {
		if p == nil {
			return nil
		}
		n := *p
		return &n
	}
	switch v := v.(type) {
	case *beginRequest:
		return beginRequest{Fingerprint: v.Fingerprint, LeaseMS: cp(v.LeaseMS), TTLMS: cp(v.TTLMS), WaitMS: cp(v.WaitMS)}
	case *completeRequest:
		out := completeRequest{Token: v.Token, TTLMS: cp(v.TTLMS)}
		if r := v.Response; r != nil {
			out.Response = &storedResponse{Headers: r.Headers, Body: r.Body}
			if r.Status != nil {
				s := *r.Status
				out.Response.Status = &s
			}
		}
		return out
	case *renewRequest:
		return renewRequest{Token: v.Token, LeaseMS: cp(v.LeaseMS)}
	case *releaseRequest:
		return *v
	}
	panic(fmt.Sprintf("no request body %T", v))
}

// checkDecode decodes body as c says with decode and with decodeReference, and fails unless
// both give the same value, or errors of the same text and the same problem.
func checkDecode(t *testing.T, c decodeCase, body []byte) {
	t.Helper()
	got, want := newBody(c.kind), newBody(c.kind)
	gotErr := decode(c.request(body), c.limit(), got, c.optional)
	wantErr := decodeReference(c.request(body), c.limit(), want, c.optional)
	switch {
	case (gotErr == nil) != (wantErr == nil):
		t.Fatalf("%+v %q:\n got error %v\nwant error %v", c, body, gotErr, wantErr)
	case gotErr != nil:
		if gotErr.Error() != wantErr.Error() || classify(gotErr) != classify(wantErr) {
			t.Fatalf("%+v %q:\n got error %q (%s)\nwant error %q (%s)", c, body,
				gotErr, classify(gotErr).name, wantErr, classify(wantErr).name)
		}
	default:
		if g, w := exported(got), exported(want); !reflect.DeepEqual(g, w) {
			t.Fatalf("%+v %q:\n got %#v\nwant %#v", c, body, g, w)
		}
	}
}

// decodeSeeds are bodies of every shape the fast decoder knows, its near misses, and the JSON
// cases of TestMalformed.
var decodeSeeds = []string{
	``, ` `, " \t\r\n", `{}`, ` { } `, `{"fingerprint":"fp"}`,
	`{"fingerprint":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","ttl_ms":600000}`,
	`{"fingerprint":"fp","lease_ms":30000,"ttl_ms":86400000,"wait_ms":0}`,
	`{ "fingerprint" : "fp" , "wait_ms" : -0 }`,
	`{"token":"abc","response":{"status":201,"headers":{"Content-Type":["application/json"],"X-Multi":["a","b"],"X-Empty":[]},"body":"QUJD"},"ttl_ms":60000}`,
	`{"token":"abc","response":{"status":200,"headers":{},"body":""}}`,
	`{"token":"abc","response":{}}`, `{"token":"abc","lease_ms":1000}`, `{"token":"abc"}`,
	// Near misses: case, escapes, duplicates, null, numbers, non-ASCII, base64.
	`{"Fingerprint":"fp"}`, `{"FINGERPRINT":"fp"}`, `{"fingerprint":"f\"p"}`, `{"fingerprint":"f\u0070"}`,
	`{"fingerprint":"a","fingerprint":"b"}`, `{"lease_ms":1,"lease_ms":2}`, `{"lease_ms":null}`,
	`{"fingerprint":null}`, `{"lease_ms":01}`, `{"lease_ms":1e3}`, `{"lease_ms":1.0}`, `{"lease_ms":-}`,
	`{"lease_ms":123456789012345678}`, `{"lease_ms":1234567890123456789}`, `{"lease_ms":9223372036854775808}`,
	`{"fingerprint":"café"}`, "{\"fingerprint\":\"\xff\"}", "{\"fingerprint\":\"a\tb\"}",
	`{"fingerprint":"\ud800"}`, `{"fingerprint":"\udfff\ud800"}`, `{"fingerprint":"\ud83d\ude00"}`, `{"fingerprint":"\\ud800"}`,
	`null`, ` null `, `{"fingerprint":"a","FINGERPRINT":"b"}`, `{"token":"t","response":{"status":200,"headers":{"X":["a",null]}}}`,
	`{"token":"t","response":{"status":200,"body":"QUJ"}}`, `{"token":"t","response":{"status":200,"body":"QU\nJD"}}`,
	`{"token":"t","response":{"status":200,"headers":{"A":["1"],"A":["2"]}}}`,
	`{"token":"t","response":{"status":200},"response":{"body":""}}`,
	`{"token":"t","response":{"status":200,"headers":{"A":null}}}`,
	`{"token":"t","response":{"status":1234567890}}`, `{"token":"t","response":{"status":-5}}`,
	`{"token":"t","response":null}`, `{"token":"t","response":[]}`,
	`{"fingerprint":"fp"}{}`, `{"fingerprint":"fp"} x`, `{"fingerprint":"fp",}`, `{,}`, `{"a"}`,
	// TestMalformed.
	`not json`, `{"lease_ms":`, `[]`, `"x"`, `{} {}`, `{"lease":5}`,
	`{"token":"t","response":{"status":200,"code":1}}`, `{"lease_ms":"5"}`, `{"lease_ms":1.5}`,
	`{"fingerprint":5}`, `{"token":"t","response":{"status":"200"}}`,
	`{"token":"t","response":{"status":200,"body":"%%%"}}`,
	`{"token":"t","response":{"status":200,"headers":{"A":"b"}}}`, `{"lease_ms":0}`, `{"lease_ms":-1}`,
	`{"lease_ms":3600001}`, `{"lease_ms":99999999999999999999}`, `{"ttl_ms":0}`, `{"ttl_ms":2592000001}`,
	`{"wait_ms":-5}`, `{"wait_ms":30001}`, `{"response":{"status":200}}`, `{"token":"t"}`,
	`{"token":"t","response":{}}`, `{}`, `{"token":""}`, `a=b`,
	`{"token":"t","response":{"status":200,"headers":{"Bad Name":["v"]}}}`,
	`{"token":"t","response":{"status":200,"headers":{"X":["a\r\nSet-Cookie: x"]}}}`,
	`{"token":"t","response":{"status":200,"headers":{"set-cookie":["s=1"]}}}`,
}

// FuzzDecodeFast holds decode (with its fast path) to decodeReference (encoding/json only):
// for any body, sent as any request, in any chunks, with any limit and content type, both give
// the same value or the same error.
//
//	go test -run '^$' -fuzz '^FuzzDecodeFast$' -fuzztime 60s ./internal/server/
func FuzzDecodeFast(f *testing.F) {
	for i, body := range decodeSeeds {
		for kind := range uint16(4) {
			f.Add(kind|uint16(i%8)<<3|4, "application/json", []byte(body))
		}
	}
	f.Add(uint16(0), "", []byte(`{"fingerprint":"fp"}`))
	f.Add(uint16(1), "application/json; charset=utf-8", []byte(`{"token":"t"}`))
	f.Add(uint16(2), "application/merge-patch+json", []byte(`{"token":"t"}`))
	f.Add(uint16(3), "text/plain", []byte(`{"token":"t"}`))
	f.Add(uint16(3), "application/json;", []byte(`{"token":"t"}`))
	f.Fuzz(func(t *testing.T, mode uint16, contentType string, body []byte) {
		checkDecode(t, newDecodeCase(mode, contentType, body), body)
	})
}

// TestDecodeFastLimits runs bodies around maxFastBody and the request limit, which the fuzzer's
// small inputs do not reach.
func TestDecodeFastLimits(t *testing.T) {
	t.Parallel()
	pad := func(body string, n int) []byte { // body, then white space up to n bytes
		return append([]byte(body), bytes.Repeat([]byte(" "), n-len(body))...)
	}
	valid := `{"token":"t","response":{"status":200,"body":"QUJD"}}`
	invalid := `{"token":"t","response":{"status":200,"body":"QUJD"},"x":1}`
	for _, n := range []int{maxFastBody - 1, maxFastBody, maxFastBody + 1, maxFastBody + 2, 3 * maxFastBody} {
		for _, body := range [][]byte{pad(valid, n), pad(invalid, n), pad("", n)} {
			for mode := range uint16(1024) {
				// Complete and begin bodies; reads of 7 and 1 bytes take long here and differ in
				// nothing that the fuzzer does not try on small bodies.
				if c := newDecodeCase(mode, "application/json", body); c.kind < 2 && (c.chunk == 0 || c.chunk == 512) {
					checkDecode(t, c, body)
				}
			}
		}
	}
	// A large stored body, as complete sends it: past maxFastBody, so decoded by encoding/json.
	big := []byte(`{"token":"t","response":{"status":200,"body":"` + strings.Repeat("QUJD", maxFastBody/3) + `"}}`)
	checkDecode(t, decodeCase{kind: 1, maxBytes: 1 << 20, contentLength: int64(len(big))}, big)
	checkDecode(t, decodeCase{kind: 1, maxBytes: 1 << 20, contentLength: -1}, big)
}

// TestDecodeFastPath checks that the bodies the hot paths send take the fast path: the
// differential tests alone would pass if it were never taken.
func TestDecodeFastPath(t *testing.T) { // not parallel: AllocsPerRun
	bodies := []struct {
		v    fastDecoder
		body string
	}{
		{new(beginRequest), `{"fingerprint":"fp","lease_ms":30000,"ttl_ms":600000,"wait_ms":100}`},
		{new(completeRequest), `{"token":"t","response":{"status":201,"headers":{"Content-Type":["application/json"]},"body":"QUJD"},"ttl_ms":5}`},
		{new(renewRequest), `{"token":"t","lease_ms":30000}`},
		{new(releaseRequest), `{"token":"t"}`},
	}
	for _, b := range bodies {
		if !b.v.decodeFast([]byte(b.body)) {
			t.Errorf("%T: the fast decoder refused %s", b.v, b.body)
		}
	}
	body := []byte(bodies[0].body)
	if allocs := testing.AllocsPerRun(100, func() {
		var in beginRequest // on the heap: its pointers point into it
		if !in.decodeFast(body) {
			t.Fatal("refused")
		}
	}); allocs > 2 { // the struct and the fingerprint
		t.Errorf("decoding a begin body allocates %v times, want 2", allocs)
	}
	// And decode takes the fast path for such a body (encoding/json allocates a dozen times).
	c := decodeCase{maxBytes: 1 << 20, contentLength: int64(len(body)), contentType: "application/json"}
	r := c.request(body)
	br := &bodyReader{end: io.EOF}
	r.Body = io.NopCloser(br)
	if allocs := testing.AllocsPerRun(100, func() {
		br.b = body
		if err := decode(r, c.limit(), new(beginRequest), false); err != nil {
			t.Fatal(err)
		}
	}); allocs > 4 { // 2, and the buffer pool's misses (the race detector makes some)
		t.Errorf("decode of a begin body allocates %v times, want 2", allocs)
	}
}

func BenchmarkDecode(b *testing.B) {
	bodies := []struct {
		name string
		kind int
		body string
	}{
		{"Begin", 0, `{"fingerprint":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","ttl_ms":600000}`},
		{"Complete", 1, `{"token":"AAAAAAAAAAAAAAAAAAAAAA","response":{"status":201,"headers":{"Content-Type":["application/json"]},"body":"` +
			strings.Repeat("QUJD", 66) + `"}}`},
	}
	for _, bb := range bodies {
		for _, impl := range []struct {
			name   string
			decode func(*http.Request, bodyLimit, any, bool) error
		}{{"fast", decode}, {"encoding-json", decodeReference}} {
			b.Run(bb.name+"/"+impl.name, func(b *testing.B) {
				c := decodeCase{kind: bb.kind, maxBytes: 1 << 20, contentLength: int64(len(bb.body)), contentType: "application/json"}
				body := []byte(bb.body)
				r := c.request(body)
				br := &bodyReader{end: io.EOF}
				r.Body = io.NopCloser(br)
				b.ReportAllocs()
				for b.Loop() {
					br.b = body
					if err := impl.decode(r, c.limit(), newBody(bb.kind), false); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// checkStrictReference is checkStrict with the walk through encoding/json's tokens.
func checkStrictReference(raw []byte, t reflect.Type) error {
	if !utf8.Valid(raw) {
		return errors.New("not UTF-8")
	}
	if loneSurrogate(raw) >= 0 {
		return errors.New("lone surrogate")
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	return strictValueReference(dec, t, "")
}

// strictValueReference is the first checkStrict's walk, through encoding/json's tokens (which
// copies every string, a stored body of megabytes included): FuzzCheckStrict holds the scanner
// that replaced it to the same verdicts.
func strictValueReference(dec *json.Decoder, t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("%w: %s", keys.ErrInvalidRequest, err)
	}
	switch tok {
	case nil:
		if path == "" {
			return fmt.Errorf("%w: the body must be a JSON object, not null", keys.ErrInvalidRequest)
		}
		return fmt.Errorf("%w: %s must not be null (leave it out instead)", keys.ErrInvalidRequest, path)
	case json.Delim('{'):
		seen := map[string]bool{}
		for dec.More() {
			nt, err := dec.Token()
			if err != nil {
				return fmt.Errorf("%w: %s", keys.ErrInvalidRequest, err)
			}
			name, _ := nt.(string)
			member := name
			if path != "" {
				member = path + "." + name
			}
			if seen[name] {
				return fmt.Errorf("%w: %s is given twice", keys.ErrInvalidRequest, member)
			}
			seen[name] = true
			var ft reflect.Type
			switch t.Kind() {
			case reflect.Struct:
				if ft = jsonField(t, name); ft == nil {
					return fmt.Errorf("%w: unknown field %q", keys.ErrInvalidRequest, name)
				}
			case reflect.Map:
				ft = t.Elem()
			default:
				return fmt.Errorf("%w: %s must not be an object", keys.ErrInvalidRequest, path)
			}
			if err := strictValueReference(dec, ft, member); err != nil {
				return err
			}
		}
		_, err = dec.Token()
	case json.Delim('['):
		if t.Kind() != reflect.Slice || t.Elem().Kind() == reflect.Uint8 {
			return fmt.Errorf("%w: %s must not be an array", keys.ErrInvalidRequest, path)
		}
		for i := 0; dec.More(); i++ {
			if err := strictValueReference(dec, t.Elem(), path+"["+strconv.Itoa(i)+"]"); err != nil {
				return err
			}
		}
		_, err = dec.Token()
	default:
		// Base64 (a []byte): encoding/json skips line breaks in it; the spec's pattern has none.
		if str, ok := tok.(string); ok && t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.Uint8 &&
			strings.ContainsAny(str, "\r\n") {
			return fmt.Errorf("%w: %s must be base64 without line breaks", keys.ErrInvalidRequest, path)
		}
	}
	if err != nil {
		return fmt.Errorf("%w: %s", keys.ErrInvalidRequest, err)
	}
	return nil
}

// FuzzCheckStrict: on every body that encoding/json decodes into a request type with nothing
// after it, checkStrict (a scanner over the bytes) and checkStrictReference (a walk through
// encoding/json's tokens) agree on whether the body is refused.
//
//	go test -run '^$' -fuzz '^FuzzCheckStrict$' -fuzztime 60s ./internal/server/
func FuzzCheckStrict(f *testing.F) {
	for _, body := range decodeSeeds {
		for kind := range uint8(4) {
			f.Add(kind, []byte(body))
		}
	}
	f.Fuzz(func(t *testing.T, kind uint8, body []byte) {
		v := newBody(int(kind % 4))
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		if dec.Decode(v) != nil {
			return
		}
		if _, err := dec.Token(); err != io.EOF {
			return
		}
		typ := reflect.TypeOf(v)
		got, want := checkStrict(body, typ), checkStrictReference(body, typ)
		if (got == nil) != (want == nil) {
			t.Fatalf("%q as %v: checkStrict %v, reference %v", body, typ, got, want)
		}
	})
}

// BenchmarkDecodeLarge: a complete with an 8 MiB stored body, which takes the slow path
// (encoding/json, then checkStrict).
//
//	go test -run '^$' -bench DecodeLarge -benchmem ./internal/server/
func BenchmarkDecodeLarge(b *testing.B) {
	body := []byte(`{"token":"t","response":{"status":200,"headers":{"Content-Type":["application/json"]},"body":"` +
		strings.Repeat("QUJD", 8<<20/3) + `"}}`)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		r, _ := http.NewRequest("POST", "/", bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		var v completeRequest
		if err := decode(r, bodyLimit{bytes: 64 << 20}, &v, false); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeManyMembers decodes a complete whose headers have n distinct names (refused
// later, past 100 values, but decoded and checked first): the time per member must not grow
// with n. With a linear search for duplicates it did, and 142,719 members took 23 s.
//
//	go test -run '^$' -bench DecodeManyMembers ./internal/server/
func BenchmarkDecodeManyMembers(b *testing.B) {
	for _, n := range []int{1_000, 10_000, 100_000} {
		b.Run(fmt.Sprintf("members=%d", n), func(b *testing.B) {
			var body bytes.Buffer
			body.WriteString(`{"token":"t","response":{"status":200,"headers":{`)
			for i := range n {
				if i > 0 {
					body.WriteByte(',')
				}
				fmt.Fprintf(&body, `"h%d":[]`, i)
			}
			body.WriteString(`}}}`)
			b.ReportAllocs()
			for b.Loop() {
				r, _ := http.NewRequest("POST", "/", bytes.NewReader(body.Bytes()))
				r.Header.Set("Content-Type", "application/json")
				var v completeRequest
				if err := decode(r, bodyLimit{bytes: 64 << 20}, &v, false); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/member")
		})
	}
}

// TestCheckStrictManyMembers: among many members, the strict check finds a member given twice
// wherever the first one stands.
func TestCheckStrictManyMembers(t *testing.T) {
	t.Parallel()
	headers := func(n int, dupOf int) string {
		var b strings.Builder
		b.WriteString(`{"token":"t","response":{"status":200,"headers":{`)
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `"h%d":[]`, i)
		}
		if dupOf >= 0 {
			fmt.Fprintf(&b, `,"h%d":[]`, dupOf)
		}
		b.WriteString(`}}}`)
		return b.String()
	}
	typ := reflect.TypeFor[completeRequest]()
	const n = 64
	if err := checkStrict([]byte(headers(n, -1)), typ); err != nil {
		t.Fatalf("distinct members: %v", err)
	}
	for _, dupOf := range []int{0, 15, 16, 48, n - 1} {
		err := checkStrict([]byte(headers(n, dupOf)), typ)
		if !errors.Is(err, keys.ErrInvalidRequest) || !strings.Contains(err.Error(), fmt.Sprintf("h%d is given twice", dupOf)) {
			t.Errorf("h%d given twice among %d members: %v", dupOf, n, err)
		}
	}
}

// TestTooManyValues: bodyLimit counts the commas outside strings, so commas, escaped quotes and
// runs of backslashes inside strings do not count, and a body no longer than countedBody is not
// scanned.
func TestTooManyValues(t *testing.T) {
	pad := `"` + strings.Repeat("x", countedBody) + `"`
	for _, c := range []struct {
		body string
		want bool // over 3 values
	}{
		{`{"a":1,"b":2,"c":3,"d":` + pad + `}`, false},
		{`{"a":1,"b":2,"c":3,"d":4,"e":` + pad + `}`, true},
		{`{"a":",,,,,,","b":` + pad + `}`, false},
		{`{"a":"\",,,,,\"","b":` + pad + `}`, false},             // escaped quotes
		{`{"a":"\\\\","b":1,"c":2,"d":3,"e":` + pad + `}`, true}, // the quote after two backslashes closes
		{`{"a":"\\\",,,,,,","b":` + pad + `}`, false},            // the one after three does not
		{`{"a":[1,2,3,4,5,6]}`, false},                           // short: not scanned
	} {
		lim := bodyLimit{values: 3}
		if got := lim.tooManyValues([]byte(c.body)); got != c.want {
			t.Errorf("%.40q...: tooManyValues = %v, want %v", c.body, got, c.want)
		}
	}
}

// TestDecodeAllocatesAboutItsSize: a complete of the largest size, made of header names or
// values with nothing in them, is refused before it is decoded, allocating about what reading
// it does (the bounds leave room for -race, which allocates more). (Before the count,
// encoding/json turned 1.5 MB of {"0":[],...} into 45 MB of maps and strings.)
func TestDecodeAllocatesAboutItsSize(t *testing.T) {
	limits := keys.DefaultLimits()
	lim := completeBody(limits)
	fill := func(item func(i int) string) string {
		var b strings.Builder
		b.WriteString(`{"token":"t","response":{"status":200,"headers":{`)
		for i := 0; b.Len() < int(lim.bytes)-64; i++ {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(item(i))
		}
		b.WriteString(`}}}`)
		return b.String()
	}
	bodies := map[string]string{
		"names":  fill(func(i int) string { return `"` + strconv.Itoa(i) + `":[]` }),
		"values": `{"token":"t","response":{"status":200,"headers":{"X":[` + strings.Repeat(`"",`, int(lim.bytes)/3-40) + `""]}}}`,
		"valid": `{"token":"t","response":{"status":200,"headers":{"Content-Type":["application/json"]},"body":"` +
			base64.StdEncoding.EncodeToString(make([]byte, limits.MaxBodyBytes)) + `"}}`,
	}
	for name, body := range bodies {
		r := &http.Request{Method: "POST", Header: http.Header{"Content-Type": {"application/json"}},
			Body: io.NopCloser(strings.NewReader(body)), ContentLength: int64(len(body))}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		err := decode(r, lim, new(completeRequest), false)
		runtime.ReadMemStats(&after)
		if (err == nil) != (name == "valid") || (err != nil && !errors.Is(err, keys.ErrInvalidResponse)) {
			t.Errorf("%s: %v", name, err)
		}
		// Reading it, io.ReadAll's buffer as it grows: about 2 (4 with -race); without the
		// count, 38 and 46.
		want := 10.0
		if name == "valid" {
			want = 16 // and encoding/json's buffer, the string unquoted, the bytes decoded: 6 (8 with -race)
		}
		if ratio := float64(after.TotalAlloc-before.TotalAlloc) / float64(len(body)); ratio > want {
			t.Errorf("%s (%d bytes): allocated %.1f times its size, want at most %.0f", name, len(body), ratio, want)
		} else {
			t.Logf("%s (%d bytes): allocated %.1f times its size", name, len(body), ratio)
		}
	}
}
