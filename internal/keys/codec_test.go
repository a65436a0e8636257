package keys

import (
	"bytes"
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
		if err != nil {
			return
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

func BenchmarkAppendRecord(b *testing.B) {
	rec := codecRecords()[1].rec
	buf := make([]byte, 0, 1024)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendRecord(buf[:0], &rec)
	}
	sinkBytes = buf
	b.SetBytes(int64(len(buf)))
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
