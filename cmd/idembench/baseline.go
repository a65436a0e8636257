package main

import (
	"context"
	"encoding/base64"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
)

// baseline is a no-op server on the contract's routes: it reads each request body in full and
// answers with a record-shaped JSON of the size idemsvc would send (201 for begin, 200 for
// complete and for a replay), but keeps nothing. What it sustains is the HTTP ceiling of this
// machine for this generator: the cost of chi, net/http and loopback TCP, without JSON decoding
// or storage.
//
// Having no storage, it cannot know which keys are completed: it answers begin on a key that
// starts with "R" (idembench's replay keys) as a replay, and every other begin as an acquire.
type baseline struct {
	storedB64 string // base64 of the stored response body, as a completed record shows it
	seq       atomic.Uint64
	bufs      sync.Pool
}

func newBaseline(bodyBytes int) *baseline {
	b := &baseline{storedB64: base64.StdEncoding.EncodeToString(make([]byte, bodyBytes))}
	b.bufs.New = func() any { s := make([]byte, 0, 4096); return &s }
	return b
}

func (b *baseline) routes() http.Handler {
	r := chi.NewRouter()
	r.Get("/healthz", b.handleOK)
	r.Get("/readyz", b.handleOK)
	r.Route("/v1/keys/{key}", func(r chi.Router) {
		r.Post("/begin", b.handleBegin)
		r.Post("/complete", b.handleComplete)
		r.Post("/renew", b.handleRenew)
		r.Post("/release", b.handleNoContent)
		r.Get("/", b.handleGet)
		r.Delete("/", b.handleNoContent)
	})
	return r
}

// serveBaseline serves until ctx is cancelled.
func serveBaseline(ctx context.Context, addr string, bodyBytes int) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           newBaseline(bodyBytes).routes(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	log.Printf("idembench baseline: serving on %s (no storage)", ln.Addr())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

func (b *baseline) handleOK(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	io.WriteString(w, "ok\n")
}

func (b *baseline) handleNoContent(w http.ResponseWriter, r *http.Request) {
	b.drain(r)
	b.headers(w, 0)
	w.WriteHeader(http.StatusNoContent)
}

func (b *baseline) handleBegin(w http.ResponseWriter, r *http.Request) {
	b.drain(r)
	key := chi.URLParam(r, "key")
	if len(key) > 0 && key[0] == 'R' {
		b.writeCompleted(w, key, true)
		return
	}
	b.writeInProgress(w, key, http.StatusCreated, true)
}

func (b *baseline) handleComplete(w http.ResponseWriter, r *http.Request) {
	b.drain(r)
	b.writeCompleted(w, chi.URLParam(r, "key"), false)
}

func (b *baseline) handleRenew(w http.ResponseWriter, r *http.Request) {
	b.drain(r)
	b.writeInProgress(w, chi.URLParam(r, "key"), http.StatusOK, true)
}

func (b *baseline) handleGet(w http.ResponseWriter, r *http.Request) {
	b.writeInProgress(w, chi.URLParam(r, "key"), http.StatusOK, false)
}

// drain reads the request body in full, as a real server must before answering.
func (b *baseline) drain(r *http.Request) {
	p := b.bufs.Get().(*[]byte)
	buf := (*p)[:cap(*p)]
	for {
		if _, err := r.Body.Read(buf); err != nil {
			break
		}
	}
	b.bufs.Put(p)
}

func (b *baseline) headers(w http.ResponseWriter, n int) {
	h := w.Header()
	var id [24]byte
	h["X-Request-Id"] = []string{string(strconv.AppendUint(append(id[:0], "bl-"...), b.seq.Add(1), 36))}
	if n > 0 {
		h["Content-Type"] = []string{"application/json"}
		h["Content-Length"] = []string{strconv.Itoa(n)}
	}
}

func appendTime(p []byte, t time.Time) []byte {
	p = append(p, '"')
	p = t.AppendFormat(p, time.RFC3339Nano)
	return append(p, '"')
}

func (b *baseline) writeInProgress(w http.ResponseWriter, key string, status int, withToken bool) {
	now := time.Now().UTC()
	p := b.bufs.Get().(*[]byte)
	out := append((*p)[:0], `{"key":`...)
	out = strconv.AppendQuote(out, key)
	out = append(out, `,"state":"in_progress","fingerprint":"`+fingerprint+`","lease":{`...)
	if withToken {
		// 22 characters, like a 128-bit base64url token.
		out = append(out, `"token":"tok`...)
		n := len(out)
		out = strconv.AppendUint(out, b.seq.Add(1)|1<<62, 36)
		for len(out)-n < 19 {
			out = append(out, '0')
		}
		out = append(out, `",`...)
	}
	out = append(out, `"fence":1,"expires_at":`...)
	out = appendTime(out, now.Add(30*time.Second))
	out = append(out, `},"created_at":`...)
	out = appendTime(out, now)
	out = append(out, `,"expires_at":`...)
	out = appendTime(out, now.Add(24*time.Hour))
	out = append(out, "}\n"...)
	b.headers(w, len(out))
	w.WriteHeader(status)
	w.Write(out)
	*p = out
	b.bufs.Put(p)
}

func (b *baseline) writeCompleted(w http.ResponseWriter, key string, replayed bool) {
	now := time.Now().UTC()
	p := b.bufs.Get().(*[]byte)
	out := append((*p)[:0], `{"key":`...)
	out = strconv.AppendQuote(out, key)
	out = append(out, `,"state":"completed","fingerprint":"`+fingerprint+`","response":{"status":201,"headers":{"Content-Type":["application/json"]},"body":"`...)
	out = append(out, b.storedB64...)
	out = append(out, `"},"created_at":`...)
	out = appendTime(out, now)
	out = append(out, `,"completed_at":`...)
	out = appendTime(out, now)
	out = append(out, `,"expires_at":`...)
	out = appendTime(out, now.Add(24*time.Hour))
	out = append(out, "}\n"...)
	b.headers(w, len(out))
	if replayed {
		w.Header()["Idempotent-Replayed"] = []string{"true"}
	}
	w.WriteHeader(http.StatusOK)
	w.Write(out)
	*p = out
	b.bufs.Put(p)
}
