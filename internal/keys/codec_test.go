package keys

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

var codecT0 = time.Date(2030, time.January, 2, 3, 4, 5, 123456789, time.UTC)

// codecRecords are records that the codec must carry unchanged.
func codecRecords() []struct {
	name string
	rec  Record
} {
	return []struct {
		name string
		rec  Record
	}{
		{"InProgress", Record{
			Key: "order-42", State: StateInProgress, Fingerprint: "sha256:abc",
			Lease:     Lease{Token: NewToken(), Fence: 1 << 40, ExpiresAt: codecT0.Add(30 * time.Second)},
			CreatedAt: codecT0, ExpiresAt: codecT0.Add(24 * time.Hour), TTL: 24 * time.Hour,
		}},
		{"Completed", Record{
			Key: "k/with/slashes%2F", State: StateCompleted, Fingerprint: strings.Repeat("f", MaxFingerprintLen),
			Lease: Lease{Token: NewToken(), Fence: 7, ExpiresAt: codecT0.Add(time.Second)},
			Response: &Response{
				Status: 201,
				Headers: map[string][]string{
					"Content-Type": {"application/json"},
					"X-Multi":      {"one", "two", ""},
					"X-Empty":      {},
				},
				Body: []byte("{\"id\":42}\x00\xff\xfe"),
			},
			CreatedAt: codecT0, CompletedAt: codecT0.Add(time.Second), ExpiresAt: codecT0.Add(time.Hour),
			TTL: time.Hour,
		}},
		{"CompletedEmptyResponse", Record{
			Key: "k", State: StateCompleted, Response: &Response{Status: 204, Body: []byte{}},
			CreatedAt: codecT0, CompletedAt: codecT0, ExpiresAt: codecT0.Add(time.Millisecond), TTL: time.Millisecond,
		}},
		{"Zero", Record{State: StateInProgress}},
	}
}

func TestCodecRoundTrip(t *testing.T) {
	for _, c := range codecRecords() {
		t.Run(c.name, func(t *testing.T) {
			b := AppendRecord(nil, &c.rec)
			got, err := DecodeRecord(b)
			if err != nil {
				t.Fatalf("DecodeRecord: %v", err)
			}
			if !reflect.DeepEqual(got, c.rec) {
				t.Errorf("round trip:\n got %+v %+v\nwant %+v %+v", got, got.Response, c.rec, c.rec.Response)
			}
			// Appending to a non-empty slice keeps what was there.
			prefixed := AppendRecord([]byte("xyz"), &c.rec)
			if !bytes.Equal(prefixed[:3], []byte("xyz")) || !bytes.Equal(prefixed[3:], b) {
				t.Errorf("AppendRecord to a prefix wrote %q, want %q then %q", prefixed, "xyz", b)
			}
			// The encoding is deterministic (headers are sorted).
			if again := AppendRecord(nil, &c.rec); !bytes.Equal(again, b) {
				t.Errorf("two encodings of one record differ")
			}
		})
	}
}

func TestDecodeRecordNoAlias(t *testing.T) {
	rec := codecRecords()[1].rec
	b := AppendRecord(nil, &rec)
	got, err := DecodeRecord(b)
	if err != nil {
		t.Fatal(err)
	}
	for i := range b {
		b[i] = 0xAA // bbolt reuses the memory of a value once its transaction ends
	}
	if !reflect.DeepEqual(got, rec) {
		t.Errorf("the decoded record changed with its input")
	}
}

func TestDecodeRecordCorrupt(t *testing.T) {
	rec := codecRecords()[1].rec
	good := AppendRecord(nil, &rec)
	cases := map[string][]byte{
		"Empty":          nil,
		"Version":        append([]byte{codecVersion + 1}, good[1:]...),
		"Trailing":       append(append([]byte{}, good...), 0),
		"BadResponseTag": badResponseTag(),
	}
	for i := 1; i < len(good); i += 7 {
		cases[fmt.Sprintf("TruncatedAt%d", i)] = good[:i]
	}
	for name, b := range cases {
		if _, err := DecodeRecord(b); err == nil {
			t.Errorf("%s: DecodeRecord(%q) succeeded", name, b)
		}
	}
}

// badResponseTag is an encoding whose response tag is neither 0 (none) nor 1 (present).
func badResponseTag() []byte {
	b := AppendRecord(nil, &Record{Key: "k", State: StateInProgress})
	b[len(b)-1] = 2
	return b
}

func FuzzDecodeRecord(f *testing.F) {
	for _, c := range codecRecords() {
		f.Add(AppendRecord(nil, &c.rec))
	}
	f.Add([]byte{})
	f.Add([]byte{codecVersion})
	f.Add([]byte{codecVersion, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Add(badResponseTag())
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, err := DecodeRecord(b) // must not panic, nor allocate wildly
		want, wantErr := decodeRecordReference(b)
		if (err == nil) != (wantErr == nil) || !reflect.DeepEqual(rec, want) {
			t.Fatalf("DecodeRecord(%q) = %+v, %v; the reference decoder gives %+v, %v", b, rec, err, want, wantErr)
		}
		expires, xerr := DecodeExpiry(b) // must not panic either
		if err != nil {
			return
		}
		if xerr != nil || !expires.Equal(rec.ExpiresAt) {
			t.Fatalf("DecodeExpiry(%q) = %v, %v; DecodeRecord gives %v", b, expires, xerr, rec.ExpiresAt)
		}
		// What decodes encodes again to the same record.
		again, err := DecodeRecord(AppendRecord(nil, &rec))
		if err != nil {
			t.Fatalf("re-encoding of a decoded record does not decode: %v", err)
		}
		if !reflect.DeepEqual(again, rec) {
			t.Fatalf("re-encoding changed the record:\n got %+v\nwant %+v", again, rec)
		}
	})
}

// cloneCases are codecRecords and the same records as a store's clock makes them: times with a
// monotonic reading in a zone of their own, the Unix epoch, a state the codec does not know,
// and an empty header map, all of which the codec normalizes.
func cloneCases() []Record {
	zone := time.FixedZone("east", 5*3600)
	now := time.Now() // has a monotonic reading
	var recs []Record
	for _, c := range codecRecords() {
		recs = append(recs, c.rec)
		r := c.rec
		r.CreatedAt, r.ExpiresAt = now.In(zone), now.Add(time.Hour)
		r.Lease.ExpiresAt = time.Unix(0, 0)
		r.Memo = new(Memo)
		recs = append(recs, r)
	}
	odd := codecRecords()[0].rec
	odd.State = State("unknown")
	recs = append(recs, odd)
	empty := codecRecords()[1].rec
	empty.Response = &Response{Status: 200, Headers: map[string][]string{}, Body: nil}
	recs = append(recs, empty)
	return recs
}

// TestCloneRecordIsTheRoundTrip: a store keeps CloneRecord's copy in memory where it kept the
// record decoded from its encoding, and a record must read the same from memory as from the
// file.
func TestCloneRecordIsTheRoundTrip(t *testing.T) {
	for i, rec := range cloneCases() {
		checkClone(t, fmt.Sprint("case ", i), &rec)
	}
}

func checkClone(t *testing.T, name string, rec *Record) {
	t.Helper()
	want, err := DecodeRecord(AppendRecord(nil, rec))
	if err != nil {
		t.Fatalf("%s: DecodeRecord: %v", name, err)
	}
	got := CloneRecord(rec)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s: CloneRecord\n got %+v %+v\nwant %+v %+v", name, got, got.Response, want, want.Response)
	}
	if got.Response == nil {
		return
	}
	// Nothing the caller may change afterwards reaches the copy.
	for i := range rec.Response.Body {
		rec.Response.Body[i] ^= 0xFF
	}
	for _, values := range rec.Response.Headers {
		for i := range values {
			values[i] += "changed"
		}
	}
	rec.Response.Status++
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s: the copy changed with the caller's record", name)
	}
	// An append to one name's values does not write into another's.
	for name := range got.Response.Headers {
		got.Response.Headers[name] = append(got.Response.Headers[name], "appended")
	}
	for n, values := range got.Response.Headers {
		if w := append(append([]string{}, want.Response.Headers[n]...), "appended"); !reflect.DeepEqual(values, w) {
			t.Fatalf("%s: %s: got %q, want %q", name, n, values, w)
		}
	}
}

// FuzzCloneRecord: CloneRecord agrees with the codec's round trip on any record the codec
// decodes, with its times moved into another zone and given a monotonic reading.
func FuzzCloneRecord(f *testing.F) {
	for _, c := range codecRecords() {
		f.Add(AppendRecord(nil, &c.rec), int64(0))
	}
	f.Fuzz(func(t *testing.T, b []byte, shift int64) {
		rec, err := DecodeRecord(b)
		if err != nil {
			return
		}
		zone := time.FixedZone("z", int(shift%(14*3600)))
		for _, tm := range []*time.Time{&rec.CreatedAt, &rec.CompletedAt, &rec.ExpiresAt, &rec.Lease.ExpiresAt} {
			if !tm.IsZero() {
				*tm = tm.In(zone)
			}
		}
		if shift%2 == 1 {
			rec.CreatedAt = time.Now().Add(time.Duration(shift))
		}
		checkClone(t, "fuzz", &rec)
	})
}

// TestCodecSize records the codec's size against JSON of the same record: the reason the
// codec exists.
func TestCodecSize(t *testing.T) {
	rec := Record{ // a typical completed record: a SHA-256 fingerprint, a small JSON response
		Key: "order-2f6c1b7e", State: StateCompleted, Fingerprint: strings.Repeat("9f", 32),
		Lease:     Lease{Token: NewToken(), Fence: 123456, ExpiresAt: codecT0.Add(30 * time.Second)},
		Response:  &Response{Status: 201, Headers: map[string][]string{"Content-Type": {"application/json"}}, Body: []byte(`{"id":"ord_42","amount":1999,"currency":"EUR"}`)},
		CreatedAt: codecT0, CompletedAt: codecT0.Add(time.Second), ExpiresAt: codecT0.Add(24 * time.Hour), TTL: 24 * time.Hour,
	}
	bin := len(AppendRecord(nil, &rec))
	js, err := json.Marshal(rec)
	if err != nil {
		t.Fatal(err)
	}
	if bin >= len(js) {
		t.Errorf("codec %d bytes, JSON %d bytes: the codec should be smaller", bin, len(js))
	}
	t.Logf("codec %d bytes, JSON %d bytes", bin, len(js))
}

var sinkBytes []byte
var sinkRecord Record

// BenchmarkAppendRecord: into a buffer reused, and into none, as the stores call it.
func BenchmarkAppendRecord(b *testing.B) {
	rec := codecRecords()[1].rec
	b.Run("reused", func(b *testing.B) {
		buf := make([]byte, 0, 1024)
		b.ReportAllocs()
		for b.Loop() {
			buf = AppendRecord(buf[:0], &rec)
		}
		sinkBytes = buf
		b.SetBytes(int64(len(buf)))
	})
	b.Run("fresh", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			sinkBytes = AppendRecord(nil, &rec)
		}
		b.SetBytes(int64(len(sinkBytes)))
	})
}

func BenchmarkDecodeRecord(b *testing.B) {
	rec := codecRecords()[1].rec
	buf := AppendRecord(nil, &rec)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		r, err := DecodeRecord(buf)
		if err != nil {
			b.Fatal(err)
		}
		sinkRecord = r
	}
}

func BenchmarkJSONRecord(b *testing.B) {
	rec := codecRecords()[1].rec
	b.ReportAllocs()
	for b.Loop() {
		js, err := json.Marshal(rec)
		if err != nil {
			b.Fatal(err)
		}
		var r Record
		if err := json.Unmarshal(js, &r); err != nil {
			b.Fatal(err)
		}
		sinkRecord = r
	}
}

// decodeRecordReference is DecodeRecord as it was before its strings shared an allocation, word
// for word: FuzzDecodeRecord holds DecodeRecord to it.
func decodeRecordReference(b []byte) (Record, error) {
	d := refDecoder{b: b}
	var r Record
	if d.byte() != codecVersion {
		return Record{}, errCorrupt
	}
	r.Key = d.string()
	switch d.byte() {
	case 1:
		r.State = StateInProgress
	case 2:
		r.State = StateCompleted
	default:
		d.fail()
	}
	r.Fingerprint = d.string()
	r.Lease.Token = d.string()
	r.Lease.Fence = d.uvarint()
	r.Lease.ExpiresAt = d.time()
	r.CreatedAt = d.time()
	r.CompletedAt = d.time()
	r.ExpiresAt = d.time()
	r.TTL = time.Duration(d.varint())
	switch d.byte() {
	case 0: // no response
	case 1:
		resp := &Response{Status: int(d.uvarint())}
		if n := d.count(); n > 0 {
			resp.Headers = make(map[string][]string, n)
			for range n {
				name := d.string()
				values := make([]string, d.count())
				for i := range values {
					values[i] = d.string()
				}
				resp.Headers[name] = values
			}
		}
		resp.Body = []byte(d.string())
		r.Response = resp
	default: // a corrupt tag must not pass for "no response"
		d.fail()
	}
	if d.err != nil || len(d.b) != 0 {
		return Record{}, errCorrupt
	}
	return r, nil
}

// refDecoder is the decoder as it was, word for word.
type refDecoder struct {
	b   []byte
	err error
}

func (d *refDecoder) fail() { d.err, d.b = errCorrupt, nil }

func (d *refDecoder) byte() byte {
	if len(d.b) == 0 {
		d.fail()
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *refDecoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *refDecoder) varint() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *refDecoder) count() int {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail()
		return 0
	}
	return int(n)
}

func (d *refDecoder) string() string {
	n := d.count()
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

func (d *refDecoder) time() time.Time {
	n := d.varint()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

func BenchmarkDecodeRecordReference(b *testing.B) {
	rec := codecRecords()[1].rec
	buf := AppendRecord(nil, &rec)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		r, err := decodeRecordReference(buf)
		if err != nil {
			b.Fatal(err)
		}
		sinkRecord = r
	}
}

// TestDecodeRecordValuesDoNotShare: the header values of a decoded record share an
// allocation, but an append to one name's values must not overwrite another's.
func TestDecodeRecordValuesDoNotShare(t *testing.T) {
	rec := codecRecords()[1].rec
	got, err := DecodeRecord(AppendRecord(nil, &rec))
	if err != nil {
		t.Fatal(err)
	}
	for name := range got.Response.Headers {
		got.Response.Headers[name] = append(got.Response.Headers[name], "appended")
	}
	for name, values := range got.Response.Headers {
		want := append(append([]string{}, rec.Response.Headers[name]...), "appended")
		if !reflect.DeepEqual(values, want) {
			t.Errorf("%s: got %q, want %q", name, values, want)
		}
	}
}
