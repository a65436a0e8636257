package server

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// The Date header is set by the status writer, from one value a second, byte for byte what
// net/http would write (it then writes that one and formats none).
func TestDateHeader(t *testing.T) {
	now := time.Date(2026, 11, 28, 7, 8, 9, 500_000_000, time.FixedZone("CET", 3600))
	got := dateHeader(now)
	if want := now.UTC().Format(http.TimeFormat); len(got) != 1 || got[0] != want {
		t.Fatalf("dateHeader(%v) = %q, want [%q]", now, got, want)
	}
	if again := dateHeader(now.Add(400 * time.Millisecond)); &again[0] != &got[0] {
		t.Errorf("a second time within the same second made a new value: %q", again)
	}
	if next := dateHeader(now.Add(time.Second)); next[0] != now.Add(time.Second).UTC().Format(http.TimeFormat) {
		t.Errorf("the next second's value is %q", next)
	}

	for _, write := range []struct {
		name string
		do   func(w http.ResponseWriter)
	}{
		{"WriteHeader", func(w http.ResponseWriter) { w.WriteHeader(http.StatusCreated) }},
		{"Write", func(w http.ResponseWriter) { _, _ = w.Write([]byte("{}")) }},
	} {
		rec := httptest.NewRecorder() // a recorder adds no Date of its own
		before := time.Now().Truncate(time.Second)
		write.do(&statusWriter{ResponseWriter: rec})
		after := time.Now()
		d := rec.Result().Header.Values("Date")
		if len(d) != 1 {
			t.Fatalf("%s: Date header %q, want one value", write.name, d)
		}
		at, err := http.ParseTime(d[0])
		if err != nil || at.Before(before) || at.After(after) {
			t.Errorf("%s: Date %q (%v, %v) is not the time of the response (%v to %v)", write.name, d[0], at, err, before, after)
		}
	}

	// A Date the handler set is kept.
	rec := httptest.NewRecorder()
	rec.Header()["Date"] = []string{"Thu, 01 Jan 2026 00:00:00 GMT"}
	(&statusWriter{ResponseWriter: rec}).WriteHeader(http.StatusOK)
	if d := rec.Result().Header.Values("Date"); len(d) != 1 || d[0] != "Thu, 01 Jan 2026 00:00:00 GMT" {
		t.Errorf("the handler's Date became %q", d)
	}
}
