package idemclient

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Tests of Do against a healthy idemsvc that answers slowly (100 ms round trips), written by a
// review of the per-try bounds on renews and completes: with tries cut at 50 ms, such an idemsvc
// lost leases and, in TestDoSlowComplete, ran fn twice. Every try gets a few round trips at
// least (keeper.floor).

// slow delays every answer by d: a healthy idemsvc behind a 100 ms round trip.
func slow(h http.Handler, d time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { time.Sleep(d); h.ServeHTTP(w, r) })
}

func runFn(d time.Duration) func(ctx context.Context) (Response, error) {
	return func(ctx context.Context) (Response, error) {
		select {
		case <-ctx.Done():
			return Response{}, context.Cause(ctx)
		case <-time.After(d):
			return okResponse("x"), nil
		}
	}
}

// TestDoSlowSteady: no failures at all, 100 ms round trips, a 400 ms lease.
func TestDoSlowSteady(t *testing.T) {
	t.Parallel()
	f, _ := newFake(t)
	srv := httptest.NewServer(slow(f, 100*time.Millisecond))
	t.Cleanup(srv.Close)
	c := newTestClient(t, srv.URL)
	res, err := c.Do(t.Context(), "k", "", runFn(1200*time.Millisecond), WithLease(400*time.Millisecond))
	t.Logf("Do = %v, record=%v renews=%d", err, res.Record != nil, f.count("renew"))
	if err != nil {
		t.Fatal(err)
	}
}

// TestDoSlowOutageEnds: a 1 s lease, 100 ms round trips; renews answer 503 until 830 ms after the begin arrived,
// well before the lease's end; then idemsvc is healthy again.
func TestDoSlowOutageEnds(t *testing.T) {
	t.Parallel()
	f, _ := newFake(t)
	var t0 atomic.Int64
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		now := time.Now()
		if strings.HasSuffix(r.URL.Path, "/begin") {
			t0.CompareAndSwap(0, now.UnixNano())
		}
		time.Sleep(100 * time.Millisecond)
		if strings.HasSuffix(r.URL.Path, "/renew") && now.Sub(time.Unix(0, t0.Load())) < 830*time.Millisecond {
			t.Logf("renew at %v: 503", now.Sub(time.Unix(0, t0.Load())))
			w.WriteHeader(503)
			return
		}
		if strings.HasSuffix(r.URL.Path, "/renew") {
			t.Logf("renew at %v: handled", now.Sub(time.Unix(0, t0.Load())))
		}
		f.ServeHTTP(w, r)
	})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	c := newTestClient(t, srv.URL)
	res, err := c.Do(t.Context(), "k", "", runFn(1500*time.Millisecond), WithLease(time.Second))
	t.Logf("Do = %v, record=%v renews=%d", err, res.Record != nil, f.count("renew"))
	if err != nil {
		t.Fatal(err)
	}
}

// TestDoSlowComplete: 100 ms round trips; the renews hang (a frozen replica) so fn returns with 150 ms of a 1 s
// lease left; a second caller begins just after the lease's end.
func TestDoSlowComplete(t *testing.T) {
	t.Parallel()
	f, _ := newFake(t)
	t0 := time.Now()
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		at := time.Since(t0)
		defer func() {
			t.Logf("%s at %v: done at %v (client gone: %v)", r.URL.Path, at, time.Since(t0), r.Context().Err() != nil)
		}()
		if strings.HasSuffix(r.URL.Path, "/renew") {
			time.Sleep(3 * time.Second)
		}
		b, _ := io.ReadAll(r.Body) // as idemsvc does before its store call
		r.Body = io.NopCloser(bytes.NewReader(b))
		select { // a slow server that abandons a request whose client left (as idemsvc's store calls do)
		case <-time.After(100 * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		f.ServeHTTP(w, r)
	})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	c := newTestClient(t, srv.URL)
	var runs atomic.Int32
	const lease = time.Second
	first := make(chan error, 1)
	go func() {
		_, err := c.Do(t.Context(), "k", "", func(context.Context) (Response, error) {
			runs.Add(1)
			time.Sleep(lease - 250*time.Millisecond) // returns with ~150 ms of the lease left
			return okResponse("x"), nil
		}, WithLease(lease))
		first <- err
	}()
	time.Sleep(lease + 10*time.Millisecond)
	res, err := c.Do(t.Context(), "k", "", func(context.Context) (Response, error) { runs.Add(1); return okResponse("y"), nil }, WithLease(lease))
	t.Logf("second Do: replayed=%v err=%v", res.Replayed, err)
	t.Logf("first Do: %v", <-first)
	if n := runs.Load(); n != 1 {
		t.Errorf("fn ran %d times", n)
	}
}

// TestDoConfirmCancelledDuringRelease: the confirming renew times out (idemsvc frozen); the caller cancels while Do releases.
func TestDoConfirmCancelledDuringRelease(t *testing.T) {
	t.Parallel()
	const lease = 300 * time.Millisecond
	f, c := lateBegin(t, lease)
	f.inject = func(op string) int {
		switch op {
		case "renew":
			time.Sleep(time.Second)
		case "release":
			time.Sleep(300 * time.Millisecond)
		}
		return 0
	}
	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(2*lease+350*time.Millisecond, cancel) // after the renew's 250 ms, during the release
	_, err := c.Do(ctx, "k", "", func(context.Context) (Response, error) { return okResponse("x"), nil }, WithLease(lease))
	t.Logf("ctx.Err()=%v; Do = %v", ctx.Err(), err)
	if !errors.Is(err, context.Canceled) && !errors.Is(err, ErrUnavailable) {
		t.Errorf("matches neither context.Canceled nor ErrUnavailable")
	}
}
