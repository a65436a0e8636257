package server_test

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// BenchmarkBeginHandler measures the begin path through the whole handler (routing, auth,
// decoding, the store, encoding, metrics; no network, no access log), on a bbolt store in a
// temp dir with fsync on:
//
//	go test -run '^$' -bench BeginHandler -benchmem ./internal/server/
func BenchmarkBeginHandler(b *testing.B) {
	s, err := bolt.OpenDir(b.TempDir(), bolt.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	h := server.New(s, server.Options{Limits: keys.DefaultLimits(),
		Tokens: map[string]string{"bench": "bench-token-0123456789"}})
	begin := func(key, body string) *httptest.ResponseRecorder {
		req := httptest.NewRequest("POST", "/v1/keys/"+key+"/begin", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer bench-token-0123456789")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		return w
	}
	const body = `{"fingerprint":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","ttl_ms":600000}`

	b.Run("Replay", func(b *testing.B) {
		w := begin("replayed", body)
		tok := w.Body.String()
		tok = tok[strings.Index(tok, `"token":"`)+9:]
		tok = tok[:strings.IndexByte(tok, '"')]
		req := httptest.NewRequest("POST", "/v1/keys/replayed/complete", strings.NewReader(
			`{"token":"`+tok+`","response":{"status":201,"body":"`+strings.Repeat("QUJD", 66)+`"}}`))
		req.Header.Set("Authorization", "Bearer bench-token-0123456789")
		cw := httptest.NewRecorder()
		h.ServeHTTP(cw, req)
		if cw.Code != http.StatusOK {
			b.Fatalf("complete: %d %s", cw.Code, cw.Body)
		}
		b.ReportAllocs()
		for b.Loop() {
			if w := begin("replayed", body); w.Code != http.StatusOK {
				b.Fatalf("replay: %d %s", w.Code, w.Body)
			}
		}
	})
	b.Run("Acquire", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			i++
			if w := begin("fresh-"+strconv.Itoa(i), body); w.Code != http.StatusCreated {
				b.Fatalf("begin: %d %s", w.Code, w.Body)
			}
		}
	})
}
