package idemclient

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func okResponse(body string) Response {
	return Response{Status: 201, Header: http.Header{"Content-Type": {"application/json"}}, Body: []byte(body)}
}

func TestDoRunsOnceThenReplays(t *testing.T) {
	t.Parallel()
	_, srv := newFake(t)
	c := newTestClient(t, srv.URL)
	var calls atomic.Int32
	fn := func(ctx context.Context) (Response, error) {
		calls.Add(1)
		return okResponse(`{"id":"ch_1"}`), nil
	}
	first, err := c.Do(context.Background(), "k", "fp", fn)
	if err != nil || first.Replayed || string(first.Response.Body) != `{"id":"ch_1"}` || first.Record == nil {
		t.Fatalf("first Do = %+v, %v", first, err)
	}
	second, err := c.Do(context.Background(), "k", "fp", fn)
	if err != nil || !second.Replayed {
		t.Fatalf("second Do = %+v, %v; want a replay", second, err)
	}
	if got, want := calls.Load(), int32(1); got != want {
		t.Errorf("fn ran %d times, want %d", got, want)
	}
	if second.Response.Status != 201 || string(second.Response.Body) != `{"id":"ch_1"}` || second.Response.Header.Get("Content-Type") != "application/json" {
		t.Errorf("replayed response = %+v", second.Response)
	}
	if _, err := c.Do(context.Background(), "k", "other", fn); !errors.Is(err, ErrFingerprintMismatch) {
		t.Errorf("Do with another fingerprint: got %v, want ErrFingerprintMismatch", err)
	}
}

func TestDoConcurrent(t *testing.T) {
	t.Parallel()
	_, srv := newFake(t)
	c := newTestClient(t, srv.URL)
	var calls atomic.Int32
	const n = 16
	results := make([]Result, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			results[i], errs[i] = c.Do(context.Background(), "k", "fp", func(ctx context.Context) (Response, error) {
				calls.Add(1)
				time.Sleep(50 * time.Millisecond)
				return okResponse("once"), nil
			}, WithWait(5*time.Second))
		})
	}
	wg.Wait()
	if got := calls.Load(); got != 1 {
		t.Fatalf("fn ran %d times, want 1", got)
	}
	replays := 0
	for i := range n {
		if errs[i] != nil || string(results[i].Response.Body) != "once" {
			t.Errorf("Do %d = %+v, %v", i, results[i], errs[i])
		}
		if results[i].Replayed {
			replays++
		}
	}
	if replays != n-1 {
		t.Errorf("%d replays, want %d", replays, n-1)
	}
}

func TestDoInProgress(t *testing.T) {
	t.Parallel()
	_, srv := newFake(t)
	c := newTestClient(t, srv.URL)
	if _, err := c.Begin(context.Background(), "k", BeginOptions{Lease: 10 * time.Second}); err != nil {
		t.Fatal(err)
	}
	_, err := c.Do(context.Background(), "k", "", func(ctx context.Context) (Response, error) {
		t.Error("fn ran while another holder has the key")
		return Response{}, nil
	})
	var e *Error
	if !errors.Is(err, ErrInProgress) || !errors.As(err, &e) || e.RetryAfter < 9*time.Second {
		t.Fatalf("got %v, want ErrInProgress with a Retry-After of about 10s", err)
	}
}

func TestDoErrorReleases(t *testing.T) {
	t.Parallel()
	_, srv := newFake(t)
	c := newTestClient(t, srv.URL)
	boom := errors.New("card processor timed out")
	_, err := c.Do(context.Background(), "k", "fp", func(ctx context.Context) (Response, error) {
		return Response{}, boom
	})
	if err != boom {
		t.Fatalf("Do = %v, want fn's error unchanged", err)
	}
	if _, err := c.Get(context.Background(), "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after a failed fn: got %v, want ErrNotFound (released)", err)
	}
	res, err := c.Do(context.Background(), "k", "fp", func(ctx context.Context) (Response, error) {
		return okResponse("second try"), nil
	})
	if err != nil || res.Replayed || string(res.Response.Body) != "second try" {
		t.Fatalf("retry Do = %+v, %v; want fn to run", res, err)
	}
}

func TestDoRenewsLease(t *testing.T) {
	t.Parallel()
	f, srv := newFake(t)
	c := newTestClient(t, srv.URL)
	const lease = 150 * time.Millisecond
	probe := make(chan error, 1)
	res, err := c.Do(context.Background(), "k", "", func(ctx context.Context) (Response, error) {
		// After several lease periods, the key must still be held.
		time.Sleep(4 * lease)
		_, err := c.Begin(ctx, "k", BeginOptions{})
		probe <- err
		time.Sleep(lease)
		return okResponse("slow"), ctx.Err()
	}, WithLease(lease))
	if err != nil || string(res.Response.Body) != "slow" {
		t.Fatalf("Do = %+v, %v", res, err)
	}
	if err := <-probe; !errors.Is(err, ErrInProgress) {
		t.Errorf("Begin by another caller during fn: got %v, want ErrInProgress", err)
	}
	if got := f.count("renew"); got < 8 {
		t.Errorf("%d renews in 5 lease periods, want about 15 (every third of the lease)", got)
	}
}

func TestDoLeaseLost(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		fnResponds  bool
		wantNotRecd bool
	}{
		{"FnReturnsError", false, false},
		{"FnReturnsResponse", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f, srv := newFake(t)
			c := newTestClient(t, srv.URL)
			var cause error
			res, err := c.Do(context.Background(), "k", "", func(ctx context.Context) (Response, error) {
				f.deleteKey("k") // an operator deletes the key: the next renew finds no record
				select {
				case <-ctx.Done():
				case <-time.After(5 * time.Second):
					t.Error("fn's context was not cancelled after the lease was lost")
				}
				cause = context.Cause(ctx)
				if tc.fnResponds {
					return okResponse("late"), nil
				}
				return Response{}, ctx.Err()
			}, WithLease(90*time.Millisecond))
			if !errors.Is(cause, ErrLeaseLost) {
				t.Errorf("context.Cause in fn = %v, want ErrLeaseLost", cause)
			}
			if !errors.Is(err, ErrLeaseLost) {
				t.Fatalf("Do = %v, want ErrLeaseLost", err)
			}
			if got := errors.Is(err, ErrNotRecorded); got != tc.wantNotRecd {
				t.Errorf("errors.Is(err, ErrNotRecorded) = %v, want %v", got, tc.wantNotRecd)
			}
			if tc.fnResponds && string(res.Response.Body) != "late" {
				t.Errorf("Result.Response = %+v, want fn's response", res.Response)
			}
			if got := f.count("complete"); got != 0 {
				t.Errorf("%d completes after the lease was reported lost, want 0", got)
			}
		})
	}
}

// TestDoRenewsFail: renewals fail until the lease runs out by the client's clock, and fn is told
// (ErrLeaseLost cause).
//   - FnResponds: since nobody took over, fn's response can still be recorded, and Do succeeds.
//   - FnGivesUp: fn returns its context's error; Do releases the key and returns an error
//     matching ErrLeaseLost, as documented, and fn's error too (it used to return only fn's
//     error, context canceled, which said nothing of the lease: seen under load in
//     TestDoLeaseLost).
func TestDoRenewsFail(t *testing.T) {
	t.Parallel()
	run := func(t *testing.T, respond bool) (*fakeSvc, Result, error) {
		f, srv := newFake(t)
		f.inject = func(op string) int {
			if op == "renew" {
				return 503
			}
			return 0
		}
		c := newTestClient(t, srv.URL)
		res, err := c.Do(context.Background(), "k", "", func(ctx context.Context) (Response, error) {
			<-ctx.Done()
			if cause := context.Cause(ctx); !errors.Is(cause, ErrLeaseLost) {
				t.Errorf("context.Cause in fn = %v, want ErrLeaseLost", cause)
			}
			if respond {
				return okResponse("done anyway"), nil
			}
			return Response{}, ctx.Err()
		}, WithLease(100*time.Millisecond))
		return f, res, err
	}
	t.Run("FnResponds", func(t *testing.T) {
		t.Parallel()
		if _, res, err := run(t, true); err != nil || res.Record == nil || res.Record.State != StateCompleted {
			t.Fatalf("Do = %+v, %v; want the response recorded", res, err)
		}
	})
	t.Run("FnGivesUp", func(t *testing.T) {
		t.Parallel()
		f, _, err := run(t, false)
		if !errors.Is(err, ErrLeaseLost) || !errors.Is(err, context.Canceled) {
			t.Fatalf("Do = %v, want an error matching ErrLeaseLost and context.Canceled", err)
		}
		if got := f.count("release"); got != 1 {
			t.Errorf("%d releases, want 1", got)
		}
	})
}

func TestDoContextCancelled(t *testing.T) {
	t.Parallel()
	t.Run("FnFinishesItsWork", func(t *testing.T) {
		t.Parallel()
		_, srv := newFake(t)
		c := newTestClient(t, srv.URL)
		ctx, cancel := context.WithCancel(context.Background())
		res, err := c.Do(ctx, "k", "", func(fctx context.Context) (Response, error) {
			cancel()
			<-fctx.Done() // fn sees the cancellation ...
			time.Sleep(20 * time.Millisecond)
			return okResponse("charged"), nil // ... but its side effect had already happened
		})
		if err != nil || string(res.Response.Body) != "charged" {
			t.Fatalf("Do = %+v, %v; want the result, recorded", res, err)
		}
		rec, err := c.Get(context.Background(), "k")
		if err != nil || rec.State != StateCompleted {
			t.Fatalf("Get = %+v, %v; want completed", rec, err)
		}
		again, err := c.Do(context.Background(), "k", "", func(context.Context) (Response, error) {
			t.Error("fn ran again after a recorded completion")
			return Response{}, nil
		})
		if err != nil || !again.Replayed || string(again.Response.Body) != "charged" {
			t.Fatalf("second Do = %+v, %v; want the replay", again, err)
		}
	})
	t.Run("FnGivesUp", func(t *testing.T) {
		t.Parallel()
		_, srv := newFake(t)
		c := newTestClient(t, srv.URL)
		ctx, cancel := context.WithCancel(context.Background())
		_, err := c.Do(ctx, "k", "", func(fctx context.Context) (Response, error) {
			cancel()
			<-fctx.Done()
			return Response{}, fctx.Err()
		})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Do = %v, want context.Canceled", err)
		}
		if _, err := c.Get(context.Background(), "k"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get = %v, want ErrNotFound: the key is released", err)
		}
	})
	t.Run("BeforeBegin", func(t *testing.T) {
		t.Parallel()
		_, srv := newFake(t)
		c := newTestClient(t, srv.URL)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := c.Do(ctx, "k", "", func(context.Context) (Response, error) {
			t.Error("fn ran with a cancelled context")
			return Response{}, nil
		})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Do = %v, want context.Canceled", err)
		}
	})
	t.Run("DeadlineDuringFnStillRecords", func(t *testing.T) {
		t.Parallel()
		_, srv := newFake(t)
		c := newTestClient(t, srv.URL)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		res, err := c.Do(ctx, "k", "", func(fctx context.Context) (Response, error) {
			time.Sleep(100 * time.Millisecond) // ignores its context
			return okResponse("late"), nil
		})
		if err != nil || res.Record == nil {
			t.Fatalf("Do = %+v, %v; want the result recorded after the deadline", res, err)
		}
	})
}

func TestDoPanicReleases(t *testing.T) {
	t.Parallel()
	_, srv := newFake(t)
	c := newTestClient(t, srv.URL)
	func() {
		defer func() {
			if p := recover(); p != "boom" {
				t.Errorf("recovered %v, want the panic of fn", p)
			}
		}()
		_, _ = c.Do(context.Background(), "k", "", func(context.Context) (Response, error) { panic("boom") })
	}()
	if _, err := c.Get(context.Background(), "k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after a panic = %v, want ErrNotFound: released", err)
	}
}

func TestDoNotRecorded(t *testing.T) {
	t.Parallel()
	t.Run("InvalidResponseReleases", func(t *testing.T) {
		t.Parallel()
		_, srv := newFake(t)
		c := newTestClient(t, srv.URL)
		resp := Response{Status: 200, Header: http.Header{"Set-Cookie": {"session=1"}}, Body: []byte("x")}
		res, err := c.Do(context.Background(), "k", "", func(context.Context) (Response, error) { return resp, nil })
		if !errors.Is(err, ErrNotRecorded) || !errors.Is(err, ErrInvalidResponse) {
			t.Fatalf("Do = %v, want ErrNotRecorded and ErrInvalidResponse", err)
		}
		if string(res.Response.Body) != "x" {
			t.Errorf("Result.Response = %+v, want fn's response", res.Response)
		}
		if _, err := c.Get(context.Background(), "k"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get = %v, want ErrNotFound: released", err)
		}
	})
	t.Run("UnavailableKeepsTheLease", func(t *testing.T) {
		t.Parallel()
		f, srv := newFake(t)
		c := newTestClient(t, srv.URL)
		f.inject = func(op string) int {
			if op == "complete" {
				return 503
			}
			return 0
		}
		start := time.Now()
		res, err := c.Do(context.Background(), "k", "", func(context.Context) (Response, error) { return okResponse("x"), nil },
			WithCleanupTimeout(300*time.Millisecond))
		if !errors.Is(err, ErrNotRecorded) || !errors.Is(err, ErrUnavailable) || string(res.Response.Body) != "x" {
			t.Fatalf("Do = %+v, %v; want fn's response with ErrNotRecorded and ErrUnavailable", res, err)
		}
		if took := time.Since(start); took < 300*time.Millisecond || took > 5*time.Second {
			t.Errorf("Do took %s, want the cleanup timeout (300ms) and little more", took)
		}
		if got := f.count("complete"); got <= 3 {
			t.Errorf("%d complete attempts, want more than the retry policy's 3: completes go on for the cleanup timeout", got)
		}
		if rec := f.record("k"); rec == nil || rec.state != StateInProgress {
			t.Errorf("record = %+v, want still in progress: releasing would invite a second run at once", rec)
		}
	})
}

// TestDoNegativeDurations: a negative duration in a Do option fails Do with ErrInvalidRequest
// before anything is sent, as Begin fails for a negative Lease, TTL or Wait; it used to be
// taken silently for the default.
func TestDoNegativeDurations(t *testing.T) {
	t.Parallel()
	c, err := New("http://127.0.0.1:1", WithRetry(RetryPolicy{MaxAttempts: 1}))
	if err != nil {
		t.Fatal(err)
	}
	for _, opt := range []DoOption{WithLease(-time.Second), WithTTL(-1), WithWait(-time.Millisecond), WithCleanupTimeout(-time.Second)} {
		called := false
		_, err := c.Do(t.Context(), "k", "", func(context.Context) (Response, error) {
			called = true
			return Response{Status: 200}, nil
		}, opt)
		if !errors.Is(err, ErrInvalidRequest) || called {
			t.Errorf("Do with a negative duration: error %v (want ErrInvalidRequest, nothing sent), fn called %v", err, called)
		}
	}
	// Zero keeps the defaults: the Do goes out (and finds nobody listening).
	_, err = c.Do(t.Context(), "k", "", func(context.Context) (Response, error) { return Response{Status: 200}, nil },
		WithLease(0), WithTTL(0), WithWait(0), WithCleanupTimeout(0))
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("Do with zero durations: %v, want ErrUnavailable (the request was sent)", err)
	}
}

// TestDoCompleteOutlastsARestart: the complete after fn goes on for the cleanup timeout, past
// the retry policy's attempts, so that a response is recorded across a restart of idemsvc. The
// policy alone gave up within a second, and a chaos audit's retries then ran fn a second time
// in 6 of 10 restarts.
func TestDoCompleteOutlastsARestart(t *testing.T) {
	t.Parallel()
	f, srv := newFake(t)
	c := newTestClient(t, srv.URL)
	var down atomic.Int32
	down.Store(7) // more than two rounds of the policy's 3 attempts
	f.inject = func(op string) int {
		if op == "complete" && down.Add(-1) >= 0 {
			return -1 // the connection drops, as at a restart
		}
		return 0
	}
	res, err := c.Do(t.Context(), "k", "", func(context.Context) (Response, error) { return okResponse("x"), nil })
	if err != nil || res.Record == nil || res.Record.State != StateCompleted {
		t.Fatalf("Do = %+v, %v; want the response recorded", res, err)
	}
}

// TestDoCompleteHonoursRetryAfter: between its rounds, the complete after fn waits as long as
// idemsvc's 503 asks (Retry-After), as every single call does, not the retry policy's millisecond
// backoff: a server that is starting or overloaded asked for a second and got a retry at once.
func TestDoCompleteHonoursRetryAfter(t *testing.T) {
	t.Parallel()
	f, _ := newFake(t)
	var mu sync.Mutex
	var completes []time.Time
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/complete") {
			mu.Lock()
			completes = append(completes, time.Now())
			first := len(completes) == 1
			mu.Unlock()
			if first {
				w.Header().Set("Retry-After", "1")
				f.problem(w, http.StatusServiceUnavailable, "unavailable")
				return
			}
		}
		f.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	// One attempt per call: each of persist's rounds is one request.
	c := newTestClient(t, srv.URL, WithRetry(RetryPolicy{MaxAttempts: 1, BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond, AttemptTimeout: 5 * time.Second}))
	res, err := c.Do(t.Context(), "k", "", func(context.Context) (Response, error) { return okResponse("x"), nil })
	if err != nil || res.Record == nil || res.Record.State != StateCompleted {
		t.Fatalf("Do = %+v, %v; want the response recorded", res, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(completes) != 2 {
		t.Fatalf("%d completes; want 2", len(completes))
	}
	if gap := completes[1].Sub(completes[0]); gap < 900*time.Millisecond {
		t.Errorf("the complete was sent again %v after a 503 with Retry-After: 1", gap)
	}
}

// delayBegin wraps f so that a begin's answer, once decided, reaches the client delay late (a
// slow path, or a server frozen while writing it) while armed is set.
func delayBegin(f *fakeSvc, delay time.Duration, armed *atomic.Bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.ServeHTTP(w, r) // the answer waits in net/http's buffer until this returns
		if strings.HasSuffix(r.URL.Path, "/begin") && armed.CompareAndSwap(true, false) {
			time.Sleep(delay)
		}
	})
}

// lateBegin is a fake idemsvc whose first begin's answer arrives twice the lease late, and a
// client of it.
func lateBegin(t *testing.T, lease time.Duration) (*fakeSvc, *Client) {
	t.Helper()
	f, _ := newFake(t)
	var armed atomic.Bool
	armed.Store(true)
	srv := httptest.NewServer(delayBegin(f, 2*lease, &armed))
	t.Cleanup(srv.Close)
	return f, newTestClient(t, srv.URL)
}

// TestDoConfirmsALateLease: when the begin's answer arrives with the lease past its end by the
// client's clock, Do confirms the lease with a renew before fn runs. fn ran twice: a chaos
// audit held a 201 for 3 s of a 2 s lease, another caller took the key over meanwhile, and the
// first caller's fn ran too.
func TestDoConfirmsALateLease(t *testing.T) {
	t.Parallel()
	const lease = 300 * time.Millisecond
	for _, takenOver := range []bool{true, false} {
		t.Run(map[bool]string{true: "TakenOver", false: "StillHeld"}[takenOver], func(t *testing.T) {
			t.Parallel()
			_, c := lateBegin(t, lease)
			var runs atomic.Int32
			fn := func(context.Context) (Response, error) { runs.Add(1); return okResponse("x"), nil }
			first := make(chan error, 1)
			go func() {
				_, err := c.Do(t.Context(), "k", "", fn, WithLease(lease))
				first <- err
			}()
			if takenOver {
				time.Sleep(3 * lease / 2) // the first lease has run out; its answer is still on the way
				if _, err := c.Do(t.Context(), "k", "", fn, WithLease(lease)); err != nil {
					t.Fatalf("the second caller's Do = %v", err)
				}
			}
			err := <-first
			switch {
			case takenOver && !errors.Is(err, ErrLeaseLost):
				t.Errorf("the late caller's Do = %v, want ErrLeaseLost without running fn", err)
			case !takenOver && err != nil:
				t.Errorf("the late caller's Do = %v, want fn run once the renew confirmed the lease", err)
			}
			if got := runs.Load(); got != 1 {
				t.Errorf("fn ran %d times, want once", got)
			}
		})
	}
}

// TestDoLateLeaseUnconfirmed: when the renew that would confirm a late lease gets no answer (a
// frozen idemsvc), fn does not run and Do's error says idemsvc was unavailable, not that the
// lease was lost (which the middleware would answer as another request in progress).
func TestDoLateLeaseUnconfirmed(t *testing.T) {
	t.Parallel()
	const lease = 300 * time.Millisecond
	f, c := lateBegin(t, lease)
	f.inject = func(op string) int {
		if op == "renew" {
			time.Sleep(time.Second)
		}
		return 0
	}
	var runs atomic.Int32
	_, err := c.Do(t.Context(), "k", "", func(context.Context) (Response, error) { runs.Add(1); return okResponse("x"), nil }, WithLease(lease))
	if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrLeaseLost) {
		t.Errorf("Do = %v, want ErrUnavailable and not ErrLeaseLost", err)
	}
	if n := runs.Load(); n != 0 {
		t.Errorf("fn ran %d times, want never", n)
	}
}

// TestDoRenewOutlastsAHungOne: a renew that hangs (a frozen replica behind a load balancer) gets
// half of what is left of the lease, and the next one, on a new connection, keeps the lease.
// It got all of it, and the lease was lost while other replicas were healthy (a chaos audit).
func TestDoRenewOutlastsAHungOne(t *testing.T) {
	t.Parallel()
	f, srv := newFake(t)
	c := newTestClient(t, srv.URL)
	var hung atomic.Bool
	f.inject = func(op string) int {
		if op == "renew" && hung.CompareAndSwap(false, true) {
			time.Sleep(2 * time.Second)
		}
		return 0
	}
	const lease = 600 * time.Millisecond
	res, err := c.Do(t.Context(), "k", "", func(ctx context.Context) (Response, error) {
		select {
		case <-ctx.Done():
			return Response{}, context.Cause(ctx)
		case <-time.After(2 * lease):
			return okResponse("x"), nil
		}
	}, WithLease(lease))
	if err != nil || res.Record == nil {
		t.Fatalf("Do = %+v, %v; want fn's response recorded: a second renew keeps the lease", res, err)
	}
	if got := f.count("renew"); got < 2 {
		t.Errorf("%d renews, want a second after the hung one", got)
	}
}

// stuckFirst makes the first n calls of op hang for d (a frozen replica behind a load balancer;
// the client's next connection reaches a healthy one).
func stuckFirst(op string, n int32, d time.Duration) func(string) int {
	var seen atomic.Int32
	return func(o string) int {
		if o == op && seen.Add(1) <= n {
			time.Sleep(d)
		}
		return 0
	}
}

// TestDoCompleteOutlastsAHungOne: a complete stuck on a frozen replica is given up while the
// lease lasts and sent again, so that it lands before another caller can take the key over. It
// waited past the lease's end, and a chaos audit's second caller took over and ran fn again.
func TestDoCompleteOutlastsAHungOne(t *testing.T) {
	t.Parallel()
	f, srv := newFake(t)
	f.inject = stuckFirst("complete", 1, 3*time.Second)
	c := newTestClient(t, srv.URL)
	const lease = 1200 * time.Millisecond
	var runs atomic.Int32
	fn := func(context.Context) (Response, error) {
		runs.Add(1)
		time.Sleep(100 * time.Millisecond)
		return okResponse("x"), nil
	}
	first := make(chan error, 1)
	go func() {
		_, err := c.Do(t.Context(), "k", "", fn, WithLease(lease))
		first <- err
	}()
	time.Sleep(lease + 100*time.Millisecond) // past the first lease's end
	res, err := c.Do(t.Context(), "k", "", fn, WithLease(lease))
	if err != nil || !res.Replayed {
		t.Errorf("the second caller's Do = %+v, %v; want the first's response replayed", res, err)
	}
	if err := <-first; err != nil {
		t.Errorf("the first caller's Do = %v, want its response recorded", err)
	}
	if n := runs.Load(); n != 1 {
		t.Errorf("fn ran %d times, want once", n)
	}
}

// TestDoRenewOutlastsThreeHungOnes: three renews in a row stuck on a frozen replica still leave
// time for a fourth within the lease. Each was given at least a third of the lease, and two in
// a row lost it; then half of what was left, with a pause after each, and three did (a chaos
// audit and its re-checks, with one of three replicas frozen).
func TestDoRenewOutlastsThreeHungOnes(t *testing.T) {
	t.Parallel()
	f, srv := newFake(t)
	f.inject = stuckFirst("renew", 3, 5*time.Second)
	c := newTestClient(t, srv.URL)
	const lease = 3 * time.Second
	res, err := c.Do(t.Context(), "k", "", func(ctx context.Context) (Response, error) {
		select {
		case <-ctx.Done():
			return Response{}, context.Cause(ctx)
		case <-time.After(4 * time.Second):
			return okResponse("x"), nil
		}
	}, WithLease(lease))
	if err != nil || res.Record == nil {
		t.Fatalf("Do = %+v, %v; want fn's response recorded: a fourth renew keeps the lease", res, err)
	}
}
