package server

import (
	"encoding/json"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// The reference of the record's JSON: what encoding/json writes for these structs is what
// appendRecord must write.

type leaseJSON struct {
	Token     string    `json:"token,omitempty"`
	Fence     uint64    `json:"fence"`
	ExpiresAt time.Time `json:"expires_at"`
}

type responseJSON struct {
	Status  int                 `json:"status"`
	Headers map[string][]string `json:"headers"`
	Body    []byte              `json:"body"`
}

type recordJSON struct {
	Key         string        `json:"key"`
	State       keys.State    `json:"state"`
	Fingerprint string        `json:"fingerprint"`
	Lease       *leaseJSON    `json:"lease,omitempty"`
	Response    *responseJSON `json:"response,omitempty"`
	CreatedAt   time.Time     `json:"created_at"`
	CompletedAt *time.Time    `json:"completed_at,omitempty"`
	ExpiresAt   time.Time     `json:"expires_at"`
}

// toJSON renders a record. The token is shown only when withToken (begin's 201, renew's 200).
func toJSON(r keys.Record, withToken bool) recordJSON {
	out := recordJSON{
		Key:         r.Key,
		State:       r.State,
		Fingerprint: r.Fingerprint,
		CreatedAt:   r.CreatedAt.UTC(),
		ExpiresAt:   r.ExpiresAt.UTC(),
	}
	if r.State == keys.StateInProgress {
		out.Lease = &leaseJSON{Fence: r.Lease.Fence, ExpiresAt: r.Lease.ExpiresAt.UTC()}
		if withToken {
			out.Lease.Token = r.Lease.Token
		}
	}
	if r.Response != nil {
		h := map[string][]string{}
		for name, values := range r.Response.Headers {
			if values == nil {
				values = []string{}
			}
			h[name] = values
		}
		body := r.Response.Body
		if body == nil {
			body = []byte{}
		}
		out.Response = &responseJSON{Status: r.Response.Status, Headers: h, Body: body}
	}
	if !r.CompletedAt.IsZero() {
		t := r.CompletedAt.UTC()
		out.CompletedAt = &t
	}
	return out
}

func TestAppendRecordMatchesEncodingJSON(t *testing.T) {
	t0 := time.Date(2026, 11, 27, 4, 5, 6, 789000000, time.UTC)
	weird := "a\"b\\c\n\r\t\b\f\x01\x1f<>&\u2028\u2029\xff\xc3é€😀" + strings.Repeat("z", 3)
	records := map[string]keys.Record{
		"in progress": {Key: "k/1", State: keys.StateInProgress, Fingerprint: "fp",
			Lease:     keys.Lease{Token: "tok", Fence: 1 << 60, ExpiresAt: t0.Add(time.Second)},
			CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)},
		"in progress, local times": {Key: "k", State: keys.StateInProgress,
			Lease:     keys.Lease{Token: "tok", Fence: 7, ExpiresAt: t0.In(time.FixedZone("X", 3600))},
			CreatedAt: t0.Add(time.Nanosecond), ExpiresAt: t0.Add(time.Hour).In(time.FixedZone("Y", -7200))},
		"completed": {Key: "k", State: keys.StateCompleted, Fingerprint: weird,
			Lease: keys.Lease{Token: "tok", Fence: 3},
			Response: &keys.Response{Status: 201,
				Headers: map[string][]string{"Content-Type": {"application/json"}, "X-Weird": {weird, ""}, "A-Empty": nil, "B": {}},
				Body:    []byte("\x00\x01binary\xff")},
			CreatedAt: t0, CompletedAt: t0.Add(time.Minute), ExpiresAt: t0.Add(24 * time.Hour)},
		"completed, no headers, no body": {Key: weird, State: keys.StateCompleted,
			Response: &keys.Response{Status: 204}, CreatedAt: t0, CompletedAt: t0, ExpiresAt: t0},
	}
	for name, r := range records {
		for _, withToken := range []bool{false, true} {
			want, err := json.Marshal(toJSON(r, withToken))
			if err != nil {
				t.Fatal(err)
			}
			if got := appendRecord(nil, r, withToken); string(got) != string(want) {
				t.Errorf("%s (token %v):\n got %s\nwant %s", name, withToken, got, want)
			}
		}
	}
}

// TestEncodeRecordMemo: a cached completed record's encoding is kept in its Memo and written
// again on the next replay; a Memo that reaches a record with other contents, or a response with
// the token, is never served from.
func TestEncodeRecordMemo(t *testing.T) {
	t0 := time.Date(2026, 11, 27, 4, 5, 6, 0, time.UTC)
	rec := keys.Record{Key: "k", State: keys.StateCompleted, Fingerprint: "fp",
		Lease:     keys.Lease{Token: "secret", Fence: 3},
		Response:  &keys.Response{Status: 201, Headers: map[string][]string{"A": {"b"}}, Body: []byte("first")},
		CreatedAt: t0, CompletedAt: t0, ExpiresAt: t0.Add(time.Hour), Memo: new(keys.Memo)}
	encode := func(r keys.Record, withToken bool) (string, string) {
		w := httptest.NewRecorder()
		encodeRecord(w, 200, r, withToken)
		return w.Body.String(), w.Header().Get("Content-Length")
	}
	want := func(r keys.Record, withToken bool) string {
		return string(appendRecord(nil, r, withToken)) + "\n"
	}

	got, _ := encode(rec, false)
	if got != want(rec, false) {
		t.Fatalf("first replay: %s, want %s", got, want(rec, false))
	}
	e, ok := rec.Memo.Load().(*encoded)
	if !ok {
		t.Fatal("the first replay kept no encoding in the Memo")
	}
	e.body = []byte("from the memo\n") // so that a second encoding from it shows
	e.length = []string{"14"}
	if got, n := encode(rec.Public(), false); got != "from the memo\n" || n != "14" {
		t.Errorf("a replay of a copy: %q (Content-Length %s), want the memo's bytes", got, n)
	}

	// Records with other contents that carry the same Memo are encoded for themselves.
	other := rec
	other.Response = &keys.Response{Status: 200, Body: []byte("second")}
	later := rec
	later.ExpiresAt = later.ExpiresAt.Add(time.Minute)
	inProgress := rec
	inProgress.State, inProgress.Response = keys.StateInProgress, nil
	otherKey := rec
	otherKey.Key = "k2"
	otherFingerprint := rec
	otherFingerprint.Fingerprint = "fp-new"
	otherTimes := rec
	otherTimes.CreatedAt, otherTimes.CompletedAt = t0.Add(time.Second), t0.Add(2*time.Second)
	for name, r := range map[string]keys.Record{"other response": other, "other expiry": later, "in progress": inProgress,
		"other key": otherKey, "other fingerprint": otherFingerprint, "other times": otherTimes} {
		if got, n := encode(r, false); got != want(r, false) || n != strconv.Itoa(len(got)) {
			t.Errorf("%s: %s (Content-Length %s), want %s", name, got, n, want(r, false))
		}
	}
	// A response with the token (begin's 201, renew's 200) neither uses nor fills the Memo.
	rec.Memo = new(keys.Memo)
	if got, _ := encode(rec, true); got != want(rec, true) {
		t.Errorf("with token: %s, want %s", got, want(rec, true))
	}
	if rec.Memo.Load() != nil {
		t.Error("an encoding with the token was kept in the Memo")
	}
}

func BenchmarkEncodeRecord(b *testing.B) {
	t0 := time.Now()
	r := keys.Record{Key: "order-42", State: keys.StateCompleted, Fingerprint: strings.Repeat("f", 64),
		Response:  &keys.Response{Status: 201, Headers: map[string][]string{"Content-Type": {"application/json"}}, Body: make([]byte, 200)},
		CreatedAt: t0, CompletedAt: t0, ExpiresAt: t0}
	b.Run("append", func(b *testing.B) {
		b.ReportAllocs()
		buf := make([]byte, 0, 1024)
		for b.Loop() {
			buf = appendRecord(buf[:0], r, false)
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = json.Marshal(toJSON(r, false))
		}
	})
}
