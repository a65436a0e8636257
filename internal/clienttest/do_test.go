// Package clienttest holds the tests of the Go client (clients/go) against the real idemsvc
// server, started in-process on 127.0.0.1:0 with a bbolt store in a temp dir. It has test files
// only: clients/go is its own module and cannot import the server, so the tests that need both
// live here, in the root module.
package clienttest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	idemclient "github.com/idemsvc/idemsvc/clients/go"
	"github.com/idemsvc/idemsvc/internal/server/servertest"
)

// start starts a real idemsvc and returns a client of it with quick retries.
func start(t *testing.T, opts ...idemclient.Option) (*servertest.Server, *idemclient.Client) {
	t.Helper()
	srv := servertest.Start(t, servertest.Options{})
	return srv, newClient(t, srv.URL, opts...)
}

func newClient(t *testing.T, url string, opts ...idemclient.Option) *idemclient.Client {
	t.Helper()
	opts = append([]idemclient.Option{idemclient.WithRetry(idemclient.RetryPolicy{
		MaxAttempts: 3, BaseDelay: 5 * time.Millisecond, MaxDelay: 50 * time.Millisecond,
	})}, opts...)
	c, err := idemclient.New(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func response(body string) idemclient.Response {
	return idemclient.Response{Status: http.StatusCreated, Header: http.Header{"Content-Type": {"application/json"}}, Body: []byte(body)}
}

func TestEndpoints(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	ctx := context.Background()
	const key = "orders/42?x=#1%"

	b, err := c.Begin(ctx, key, idemclient.BeginOptions{Fingerprint: "fp", Lease: time.Minute, TTL: time.Hour})
	if err != nil || !b.Acquired || b.Lease.Token == "" || b.Record.Key != key {
		t.Fatalf("Begin = %+v, %v", b, err)
	}
	got, err := c.Get(ctx, key)
	if err != nil || got.State != idemclient.StateInProgress || got.Lease == nil || got.Lease.Token != "" || got.Lease.Fence != b.Lease.Fence {
		t.Fatalf("Get = %+v, %v; want in progress, the fence, no token", got, err)
	}
	_, err = c.Begin(ctx, key, idemclient.BeginOptions{Fingerprint: "fp"})
	var e *idemclient.Error
	if !errors.Is(err, idemclient.ErrInProgress) || !errors.As(err, &e) || e.RetryAfter < time.Second || e.RequestID == "" {
		t.Fatalf("second Begin = %v; want ErrInProgress with Retry-After and a request id", err)
	}
	if _, err := c.Begin(ctx, key, idemclient.BeginOptions{Fingerprint: "other"}); !errors.Is(err, idemclient.ErrFingerprintMismatch) {
		t.Fatalf("Begin with another fingerprint = %v, want ErrFingerprintMismatch", err)
	}
	r, err := c.Renew(ctx, key, b.Lease.Token, 2*time.Minute)
	if err != nil || !r.Lease.ExpiresAt.After(b.Lease.ExpiresAt) {
		t.Fatalf("Renew = %+v, %v", r, err)
	}
	if _, err := c.Renew(ctx, key, "not-the-token", 0); !errors.Is(err, idemclient.ErrLeaseLost) {
		t.Fatalf("Renew with another token = %v, want ErrLeaseLost", err)
	}
	resp := idemclient.Response{Status: 201, Header: http.Header{"Content-Type": {"application/json"}, "X-Multi": {"a", "b"}}, Body: []byte{0, 1, 2, 0xff}}
	done, err := c.Complete(ctx, key, idemclient.CompleteRequest{Token: b.Lease.Token, Response: resp})
	if err != nil || done.State != idemclient.StateCompleted || done.CompletedAt.IsZero() {
		t.Fatalf("Complete = %+v, %v", done, err)
	}
	if _, err := c.Complete(ctx, key, idemclient.CompleteRequest{Token: b.Lease.Token, Response: resp}); err != nil {
		t.Fatalf("the same Complete again = %v, want success", err)
	}
	other := resp
	other.Status = 200
	if _, err := c.Complete(ctx, key, idemclient.CompleteRequest{Token: b.Lease.Token, Response: other}); !errors.Is(err, idemclient.ErrAlreadyCompleted) {
		t.Fatalf("Complete with another response = %v, want ErrAlreadyCompleted", err)
	}
	replay, err := c.Begin(ctx, key, idemclient.BeginOptions{Fingerprint: "fp"})
	if err != nil || !replay.Replayed {
		t.Fatalf("Begin after Complete = %+v, %v; want a replay", replay, err)
	}
	if rr := replay.Record.Response; rr.Status != 201 || string(rr.Body) != string(resp.Body) || fmt.Sprint(rr.Header["X-Multi"]) != "[a b]" {
		t.Errorf("replayed response = %+v, want %+v", rr, resp)
	}
	if err := c.Release(ctx, key, b.Lease.Token); !errors.Is(err, idemclient.ErrAlreadyCompleted) {
		t.Fatalf("Release of a completed key = %v, want ErrAlreadyCompleted", err)
	}
	if err := c.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, key); !errors.Is(err, idemclient.ErrNotFound) {
		t.Fatalf("Get after Delete = %v, want ErrNotFound", err)
	}
	if err := c.Release(ctx, key, b.Lease.Token); err != nil {
		t.Fatalf("Release of an absent key = %v, want nil", err)
	}
	if err := c.Healthz(ctx); err != nil {
		t.Errorf("Healthz = %v", err)
	}
	if err := c.Ready(ctx); err != nil {
		t.Errorf("Ready = %v", err)
	}
}

func TestTenants(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t, servertest.Options{Tokens: map[string]string{"acme": "tok-acme", "globex": "tok-globex"}})
	acme := newClient(t, srv.URL, idemclient.WithToken("tok-acme"))
	globex := newClient(t, srv.URL, idemclient.WithToken("tok-globex"))
	ctx := context.Background()

	if _, err := newClient(t, srv.URL, idemclient.WithToken("wrong")).Get(ctx, "k"); !errors.Is(err, idemclient.ErrUnauthorized) {
		t.Fatalf("unknown token: %v, want ErrUnauthorized", err)
	}
	if _, err := newClient(t, srv.URL).Get(ctx, "k"); !errors.Is(err, idemclient.ErrUnauthorized) {
		t.Fatalf("no token: %v, want ErrUnauthorized", err)
	}
	var runs atomic.Int32
	fn := func(context.Context) (idemclient.Response, error) {
		runs.Add(1)
		return response(`{}`), nil
	}
	for _, c := range []*idemclient.Client{acme, globex} {
		if res, err := c.Do(ctx, "shared-key", "fp", fn); err != nil || res.Replayed {
			t.Fatalf("Do = %+v, %v; want a fresh run per tenant", res, err)
		}
	}
	if got := runs.Load(); got != 2 {
		t.Errorf("fn ran %d times, want once per tenant", got)
	}
}

// TestDoConcurrent: 32 concurrent Do calls with one key run fn exactly once, and all return its
// result.
func TestDoConcurrent(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	const n = 32
	var runs atomic.Int32
	results := make([]idemclient.Result, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	ready := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-ready
			results[i], errs[i] = c.Do(context.Background(), "charge-1", "fp", func(ctx context.Context) (idemclient.Response, error) {
				k := runs.Add(1)
				time.Sleep(100 * time.Millisecond)
				return response(fmt.Sprintf(`{"charge":%d}`, k)), nil
			}, idemclient.WithWait(10*time.Second))
		})
	}
	close(ready)
	wg.Wait()
	if got := runs.Load(); got != 1 {
		t.Fatalf("fn ran %d times, want exactly 1", got)
	}
	fresh := 0
	for i := range n {
		if errs[i] != nil {
			t.Errorf("Do %d: %v", i, errs[i])
			continue
		}
		if got := string(results[i].Response.Body); got != `{"charge":1}` || results[i].Response.Status != 201 {
			t.Errorf("Do %d = %d %s, want 201 {\"charge\":1}", i, results[i].Response.Status, got)
		}
		if !results[i].Replayed {
			fresh++
		}
	}
	if fresh != 1 {
		t.Errorf("%d results not replayed, want 1", fresh)
	}
}

// TestDoFailureFreesKey: a failing fn leaves the key free, so the retry runs fn.
func TestDoFailureFreesKey(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	ctx := context.Background()
	errDeclined := errors.New("processor unavailable")
	var runs atomic.Int32
	_, err := c.Do(ctx, "k", "fp", func(context.Context) (idemclient.Response, error) {
		runs.Add(1)
		return idemclient.Response{}, errDeclined
	})
	if !errors.Is(err, errDeclined) {
		t.Fatalf("Do = %v, want fn's error", err)
	}
	if _, err := c.Get(ctx, "k"); !errors.Is(err, idemclient.ErrNotFound) {
		t.Fatalf("Get = %v, want ErrNotFound: the key is released", err)
	}
	res, err := c.Do(ctx, "k", "fp", func(context.Context) (idemclient.Response, error) {
		runs.Add(1)
		return response(`{"ok":true}`), nil
	})
	if err != nil || res.Replayed || string(res.Response.Body) != `{"ok":true}` {
		t.Fatalf("retry = %+v, %v; want fn to run", res, err)
	}
	if got := runs.Load(); got != 2 {
		t.Errorf("fn ran %d times, want 2", got)
	}
}

// TestDoSlowFnRenews: fn runs for four lease periods; renewals keep the key held (another
// caller gets ErrInProgress, not a takeover) and fn's result is recorded.
func TestDoSlowFnRenews(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	ctx := context.Background()
	const lease = 300 * time.Millisecond
	var probeErr error
	var fence uint64
	res, err := c.Do(ctx, "slow", "fp", func(fctx context.Context) (idemclient.Response, error) {
		rec, err := c.Get(ctx, "slow")
		if err != nil {
			return idemclient.Response{}, err
		}
		fence = rec.Lease.Fence
		time.Sleep(900 * time.Millisecond) // three lease periods
		_, probeErr = c.Begin(ctx, "slow", idemclient.BeginOptions{Fingerprint: "fp"})
		time.Sleep(300 * time.Millisecond)
		if err := context.Cause(fctx); err != nil {
			return idemclient.Response{}, err
		}
		return response(`{"slow":true}`), nil
	}, idemclient.WithLease(lease))
	if err != nil || res.Record == nil || res.Record.State != idemclient.StateCompleted {
		t.Fatalf("Do = %+v, %v; want completed", res, err)
	}
	if !errors.Is(probeErr, idemclient.ErrInProgress) {
		t.Errorf("Begin by another caller after 3 lease periods = %v, want ErrInProgress (the lease was renewed)", probeErr)
	}
	if fence == 0 {
		t.Error("no fence seen")
	}
	again, err := c.Do(ctx, "slow", "fp", func(context.Context) (idemclient.Response, error) {
		t.Error("fn ran again")
		return idemclient.Response{}, nil
	})
	if err != nil || !again.Replayed || string(again.Response.Body) != `{"slow":true}` {
		t.Errorf("second Do = %+v, %v; want the replay", again, err)
	}
}

// TestDoLeaseLost: the key is deleted while fn runs; the next renew finds out, fn's context is
// cancelled with ErrLeaseLost as the cause, and Do reports ErrLeaseLost.
func TestDoLeaseLost(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	ctx := context.Background()
	var cause error
	_, err := c.Do(ctx, "k", "", func(fctx context.Context) (idemclient.Response, error) {
		if err := c.Delete(ctx, "k"); err != nil {
			return idemclient.Response{}, err
		}
		select {
		case <-fctx.Done():
		case <-time.After(5 * time.Second):
			t.Error("fn's context not cancelled within 5s of losing the lease")
		}
		cause = context.Cause(fctx)
		return idemclient.Response{}, fctx.Err()
	}, idemclient.WithLease(300*time.Millisecond))
	if !errors.Is(err, idemclient.ErrLeaseLost) {
		t.Fatalf("Do = %v, want ErrLeaseLost", err)
	}
	if !errors.Is(cause, idemclient.ErrLeaseLost) {
		t.Errorf("context.Cause in fn = %v, want ErrLeaseLost", cause)
	}
}

// TestDoContextCancelled checks the documented semantics: cancelling ctx while fn runs cancels
// fn's context; if fn still returns a response, it is recorded (detached from ctx); if fn returns
// an error, the key is released.
func TestDoContextCancelled(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	t.Run("FnReturnsResponse", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(context.Background())
		res, err := c.Do(ctx, "cancel-respond", "fp", func(fctx context.Context) (idemclient.Response, error) {
			cancel()
			<-fctx.Done()
			return response(`{"charged":true}`), nil // the side effect had happened
		})
		if err != nil || res.Record == nil {
			t.Fatalf("Do = %+v, %v; want the result recorded", res, err)
		}
		rec, err := c.Get(context.Background(), "cancel-respond")
		if err != nil || rec.State != idemclient.StateCompleted || string(rec.Response.Body) != `{"charged":true}` {
			t.Fatalf("Get = %+v, %v; want completed with fn's response", rec, err)
		}
	})
	t.Run("FnReturnsError", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(context.Background())
		_, err := c.Do(ctx, "cancel-error", "fp", func(fctx context.Context) (idemclient.Response, error) {
			cancel()
			<-fctx.Done()
			return idemclient.Response{}, fctx.Err()
		})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Do = %v, want context.Canceled", err)
		}
		if _, err := c.Get(context.Background(), "cancel-error"); !errors.Is(err, idemclient.ErrNotFound) {
			t.Fatalf("Get = %v, want ErrNotFound: released", err)
		}
	})
	t.Run("DeadlinePassesWhileFnRuns", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		res, err := c.Do(ctx, "cancel-deadline", "fp", func(context.Context) (idemclient.Response, error) {
			time.Sleep(300 * time.Millisecond) // does not watch its context
			return response(`{"late":true}`), nil
		})
		if err != nil || res.Record == nil {
			t.Fatalf("Do = %+v, %v; want the late result recorded", res, err)
		}
	})
}

// TestDoInvalidResponse: a response idemsvc refuses to store (a credential header) is returned
// with ErrNotRecorded, and the key is released.
func TestDoInvalidResponse(t *testing.T) {
	t.Parallel()
	_, c := start(t)
	res, err := c.Do(context.Background(), "k", "", func(context.Context) (idemclient.Response, error) {
		return idemclient.Response{Status: 200, Header: http.Header{"Set-Cookie": {"s=1"}}, Body: []byte("x")}, nil
	})
	if !errors.Is(err, idemclient.ErrNotRecorded) || !errors.Is(err, idemclient.ErrInvalidResponse) || string(res.Response.Body) != "x" {
		t.Fatalf("Do = %+v, %v; want fn's response with ErrNotRecorded and ErrInvalidResponse", res, err)
	}
	if _, err := c.Get(context.Background(), "k"); !errors.Is(err, idemclient.ErrNotFound) {
		t.Fatalf("Get = %v, want ErrNotFound: released", err)
	}
}

func TestUnreachable(t *testing.T) {
	t.Parallel()
	c := newClient(t, "http://"+closedAddr(t))
	_, err := c.Do(context.Background(), "k", "", func(context.Context) (idemclient.Response, error) {
		t.Error("fn ran without idemsvc")
		return idemclient.Response{}, nil
	})
	if !errors.Is(err, idemclient.ErrUnavailable) {
		t.Fatalf("Do = %v, want ErrUnavailable", err)
	}
}

// closedAddr returns an address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// TestWrongBaseURL: a client whose base URL names a path the service does not have gets errors
// that are not ErrNotFound, so that code reading ErrNotFound as "no record" (a job deciding to
// run the work again) is not misled. The service answered an unknown path with not-found, which
// the client reported as ErrNotFound (a new user's audit).
func TestWrongBaseURL(t *testing.T) {
	t.Parallel()
	srv, good := start(t)
	if _, err := good.Do(context.Background(), "k", "", func(context.Context) (idemclient.Response, error) {
		return response(`{"ok":true}`), nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := good.Get(context.Background(), "absent"); !errors.Is(err, idemclient.ErrNotFound) {
		t.Fatalf("Get of an absent key = %v, want ErrNotFound", err)
	}
	wrong := newClient(t, srv.URL+"/idem")
	_, err := wrong.Get(context.Background(), "k")
	var apiErr *idemclient.Error
	if err == nil || errors.Is(err, idemclient.ErrNotFound) || !errors.As(err, &apiErr) || apiErr.Status != 404 || apiErr.Type != "no-such-path" {
		t.Errorf("Get through a wrong base URL = %v, want a 404 no-such-path that is not ErrNotFound", err)
	}
	if _, err := wrong.Do(context.Background(), "k2", "", func(context.Context) (idemclient.Response, error) {
		t.Error("fn ran through a wrong base URL")
		return response(`{}`), nil
	}); err == nil || errors.Is(err, idemclient.ErrNotFound) {
		t.Errorf("Do through a wrong base URL = %v, want an error that is not ErrNotFound", err)
	}
}
