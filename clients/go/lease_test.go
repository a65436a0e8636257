package idemclient

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"
)

// TestDoLeaseAgainstIdemsvc runs Do against the real idemsvc configured with leases shorter than
// 30s (IDEMSVC_MAX_LEASE=10s, IDEMSVC_DEFAULT_LEASE=5s). Without WithLease, Do asks for no
// lease: the server's default applies, and Do renews it in time, judging its length from the
// begin's answer. Before, Do always asked for 30s, and every Do failed with 400.
func TestDoLeaseAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	url := startIdemsvc(t, "IDEMSVC_MAX_LEASE=10s", "IDEMSVC_DEFAULT_LEASE=5s")
	c := newTestClient(t, url)
	ctx := context.Background()

	// renewedInTime checks, from inside fn, that key's lease has the length want and is renewed
	// before it runs out.
	renewedInTime := func(t *testing.T, key string, want time.Duration, takeover bool) {
		t.Helper()
		rec, err := c.Get(ctx, key)
		if err != nil || rec.Lease == nil {
			t.Fatalf("Get in fn = %+v, %v", rec, err)
		}
		first := rec.Lease.ExpiresAt
		if !takeover {
			if got := first.Sub(rec.CreatedAt); got < want-50*time.Millisecond || got > want+50*time.Millisecond {
				t.Errorf("lease of %v, want %v", got, want)
			}
		}
		for {
			time.Sleep(50 * time.Millisecond)
			rec, err := c.Get(ctx, key)
			if err != nil {
				t.Fatalf("Get in fn = %+v, %v", rec, err)
			}
			if rec.Lease.ExpiresAt.After(first) {
				if left := time.Until(first); left < want/4 {
					t.Errorf("renewed %v before the lease ran out, want about two thirds of %v", left, want)
				}
				return
			}
			if time.Until(first) < 0 {
				t.Fatalf("the lease ran out at %v without a renew", first)
			}
		}
	}

	t.Run("DefaultOverTheMaximum", func(t *testing.T) {
		t.Parallel()
		// Do asks for DefaultLease (30s), which this server refuses: a clear error, fn not run.
		_, err := c.Do(ctx, "default", "", func(context.Context) (Response, error) {
			t.Error("fn ran")
			return Response{}, nil
		})
		if !errors.Is(err, ErrInvalidRequest) {
			t.Fatalf("Do with DefaultLease over IDEMSVC_MAX_LEASE = %v, want ErrInvalidRequest", err)
		}
	})
	t.Run("TakeOver", func(t *testing.T) {
		t.Parallel()
		// A holder that crashed: its 300ms lease runs out, Do takes over with the lease it asks
		// for, whose length it knows whatever the record's created_at or the answer's Date.
		if _, err := c.Begin(ctx, "takeover", BeginOptions{Lease: 300 * time.Millisecond}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(400 * time.Millisecond)
		res, err := c.Do(ctx, "takeover", "", func(context.Context) (Response, error) {
			renewedInTime(t, "takeover", 5*time.Second, true)
			return okResponse("ok"), nil
		}, WithLease(5*time.Second))
		if err != nil || res.Record == nil {
			t.Fatalf("Do = %+v, %v; want it recorded", res, err)
		}
	})
	t.Run("WithLease", func(t *testing.T) {
		t.Parallel()
		res, err := c.Do(ctx, "explicit", "", func(context.Context) (Response, error) {
			renewedInTime(t, "explicit", 2*time.Second, false)
			return okResponse("ok"), nil
		}, WithLease(2*time.Second))
		if err != nil || res.Record == nil {
			t.Fatalf("Do = %+v, %v; want it recorded", res, err)
		}
	})
	t.Run("WithLeaseOverTheMaximum", func(t *testing.T) {
		t.Parallel()
		_, err := c.Do(ctx, "too-long", "", func(context.Context) (Response, error) {
			t.Error("fn ran")
			return Response{}, nil
		}, WithLease(20*time.Second))
		if !errors.Is(err, ErrInvalidRequest) {
			t.Fatalf("Do with a lease over IDEMSVC_MAX_LEASE = %v, want ErrInvalidRequest", err)
		}
	})
	t.Run("Middleware", func(t *testing.T) {
		t.Parallel()
		app := &chargeApp{}
		srv := httptest.NewServer(Middleware(c, WithLease(5*time.Second))(app))
		defer srv.Close()
		for i, want := range []string{"", "true"} {
			a := send(t, "POST", srv.URL+"/charges", `"mw"`, `{"amount":1}`)
			if a.status != http.StatusCreated || a.header.Get(ReplayedHeader) != want {
				t.Errorf("request %d = %d %s %v, want 201 (replayed %q)", i+1, a.status, a.body, a.header, want)
			}
		}
		if got := app.runs.Load(); got != 1 {
			t.Errorf("handler ran %d times, want 1", got)
		}
	})
}

// TestDoAlwaysSendsItsLease: the begin and the renews of Do carry lease_ms, DefaultLease or
// WithLease's, so that Do knows the length of the lease it renews. Without it, a takeover (the
// record keeps its first created_at) read the lease's length from the answer's Date, which a
// proxy may drop or rewrite, or which is on another clock than the record's: the lease was
// overestimated, and another caller took over while fn still ran (found in review).
func TestDoAlwaysSendsItsLease(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		opts   []DoOption
		want   int64
		renews bool
	}{{"Default", nil, DefaultLease.Milliseconds(), false}, {"WithLease", []DoOption{WithLease(240 * time.Millisecond)}, 240, true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f, idem := newFake(t)
			c := newTestClient(t, idem.URL)
			_, err := c.Do(context.Background(), "k", "", func(ctx context.Context) (Response, error) {
				time.Sleep(400 * time.Millisecond) // more than WithLease's lease: Do must renew
				return okResponse("ok"), nil
			}, tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if len(f.leaseMS["begin"]) != 1 || tc.renews && len(f.leaseMS["renew"]) < 2 {
				t.Fatalf("lease_ms of begins and renews: %v; want 1 begin, and renews every third of the lease", f.leaseMS)
			}
			for op, sent := range f.leaseMS {
				for _, ms := range sent {
					if ms == nil || *ms != tc.want {
						t.Errorf("%s sent lease_ms %v, want %d", op, ptrString(ms), tc.want)
					}
				}
			}
		})
	}
}

func ptrString(p *int64) string {
	if p == nil {
		return "none"
	}
	return strconv.FormatInt(*p, 10)
}

// TestDoNilHeaderAgainstIdemsvc: a Response whose header has an entry with no values (nil, as
// net/http code writes to suppress a header) is stored without it. idemsvc refuses null, and Do
// kept the key until its lease ran out, and then fn ran again.
func TestDoNilHeaderAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	c := newTestClient(t, startIdemsvc(t))
	runs := 0
	fn := func(context.Context) (Response, error) {
		runs++
		return Response{Status: 201, Header: http.Header{"Date": nil, "X-Empty": {}, "X-Kept": {"1"}}, Body: []byte("charged")}, nil
	}
	for range 2 {
		if _, err := c.Do(context.Background(), "nil-header", "", fn); err != nil {
			t.Fatalf("Do: %v", err)
		}
	}
	rec, err := c.Get(context.Background(), "nil-header")
	if err != nil {
		t.Fatal(err)
	}
	if runs != 1 || rec.Response == nil || len(rec.Response.Header) != 1 || rec.Response.Header.Get("X-Kept") != "1" {
		t.Errorf("fn ran %d times; stored %+v", runs, rec.Response)
	}
}

// TestDoAfterWaitingRenewsAgainstIdemsvc: a Do whose begin waited for a crashed holder's lease to
// run out (WithWait) acquires the key long after it sent the begin, so its estimate of its own
// lease's end (sent + lease) is near or past when fn starts. It must renew at once rather than
// give the lease up unasked: the first renew used to be due lease/3 after fn started, past the
// estimate, and went out with a deadline already passed; fn was cancelled with ErrLeaseLost while
// the server still held the lease for it (a client audit's find; a payment handler that saved
// under its context charged twice).
func TestDoAfterWaitingRenewsAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	url := startIdemsvc(t)
	c := newTestClient(t, url)
	ctx := context.Background()
	const lease = 1500 * time.Millisecond
	// The crashed holder: it began with a 1s lease and never completes.
	if _, err := c.Begin(ctx, "waited", BeginOptions{Lease: time.Second}); err != nil {
		t.Fatal(err)
	}
	ran := false
	res, err := c.Do(ctx, "waited", "", func(fctx context.Context) (Response, error) {
		ran = true
		select { // longer than the lease: it needs renews
		case <-time.After(2 * lease):
		case <-fctx.Done():
			return Response{}, context.Cause(fctx)
		}
		return Response{Status: 201, Body: []byte("done")}, nil
	}, WithLease(lease), WithWait(3*time.Second))
	if err != nil || !ran || string(res.Response.Body) != "done" {
		t.Fatalf("Do after waiting out a crashed holder: %+v, ran %v, %v; want fn's response", res, ran, err)
	}
}
