package idemclient

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Result is the outcome of Do.
type Result struct {
	// Response is the operation's response: the one fn returned, or the stored one on a replay.
	Response Response
	// Replayed is true when the key had already completed: fn was not called and Response is
	// the stored response.
	Replayed bool
	// Record is the completed record as idemsvc stores it; nil when Do returns an error.
	Record *Record
}

// DoOption configures Do. Every DoOption is also a MiddlewareOption, which the middleware passes
// on to the Do it runs for each request.
type DoOption interface {
	MiddlewareOption
	applyDo(*doConfig)
}

type doConfig struct {
	lease, ttl, wait time.Duration
	cleanupTimeout   time.Duration
	// err is the first option given a negative duration: Do fails with it, as Begin fails
	// for a negative Lease, TTL or Wait.
	err error
}

// negative records in c that option was given the negative duration d.
func (c *doConfig) negative(option string, d time.Duration) {
	if c.err == nil {
		c.err = fmt.Errorf("%w: %s: negative duration %v", ErrInvalidRequest, option, d)
	}
}

// DefaultLease is the lease Do asks for unless WithLease says otherwise (CONTRACT.md's default).
// Do always sends its lease, so that it knows the lease's length without reading it from the
// server's times: on a takeover the record keeps its first created_at, and the Date header may
// be missing, rewritten by a proxy, or on another clock than the record's (a Redis replica's),
// and an overestimated lease would let another caller take the key over while fn still runs. A
// server whose IDEMSVC_MAX_LEASE is below 30s refuses it (ErrInvalidRequest): then set WithLease
// within it.
const DefaultLease = 30 * time.Second

// DefaultCleanupTimeout bounds the complete or release that Do sends after fn has returned
// (see Do) unless WithCleanupTimeout says otherwise.
const DefaultCleanupTimeout = 5 * time.Second

func newDoConfig(opts []DoOption) doConfig {
	cfg := doConfig{lease: DefaultLease, cleanupTimeout: DefaultCleanupTimeout}
	for _, o := range opts {
		o.applyDo(&cfg)
	}
	return cfg
}

type doOption func(*doConfig)

func (o doOption) applyDo(c *doConfig)                 { o(c) }
func (o doOption) applyMiddleware(c *middlewareConfig) { c.doOpts = append(c.doOpts, o) }

// WithLease sets the lease Do asks for, at begin and at every renew (default DefaultLease). d
// must be within the server's IDEMSVC_MAX_LEASE (1h unless configured), or every Do fails with
// ErrInvalidRequest. Do renews the lease in the background every third of its length while fn
// runs, so a short lease does not limit how long fn may take: it limits how long a crashed holder
// blocks the key. Zero keeps DefaultLease; a negative d makes every Do fail with
// ErrInvalidRequest, as Begin does.
func WithLease(d time.Duration) DoOption {
	return doOption(func(c *doConfig) {
		switch {
		case d > 0:
			c.lease = d
		case d < 0:
			c.negative("WithLease", d)
		}
	})
}

// WithTTL sets how long idemsvc keeps the record, and so for how long retries are answered with
// the stored response (default, or zero: the server's, 24h unless configured). A negative d
// makes every Do fail with ErrInvalidRequest.
func WithTTL(d time.Duration) DoOption {
	return doOption(func(c *doConfig) {
		if c.ttl = max(d, 0); d < 0 {
			c.negative("WithTTL", d)
		}
	})
}

// WithWait makes a Do that meets a running holder wait up to d on the server for it to finish
// (then Do replays its response) or fail (then this Do runs fn), instead of failing at once with
// ErrInProgress. d must be within the server's IDEMSVC_MAX_WAIT (30s unless configured), or
// every Do fails with ErrInvalidRequest (idemsvc does not clamp it); the Middleware then answers
// every request that carries a key with 500 (see Middleware), and so does a negative d.
func WithWait(d time.Duration) DoOption {
	return doOption(func(c *doConfig) {
		if c.wait = max(d, 0); d < 0 {
			c.negative("WithWait", d)
		}
	})
}

// WithCleanupTimeout bounds the complete or release Do sends after fn returned, which runs even
// when ctx is cancelled by then, and is tried again while idemsvc is unavailable until this has
// passed (default, or zero: DefaultCleanupTimeout). A negative d makes every Do fail with
// ErrInvalidRequest.
func WithCleanupTimeout(d time.Duration) DoOption {
	return doOption(func(c *doConfig) {
		switch {
		case d > 0:
			c.cleanupTimeout = d
		case d < 0:
			c.negative("WithCleanupTimeout", d)
		}
	})
}

// Do runs fn at most once for key, as far as idemsvc can see.
//
// It begins key with fingerprint (see Fingerprint; "" for none). When the key has completed, Do
// returns the stored response with Result.Replayed set and does not call fn. When Do acquires the
// key, it calls fn with a context derived from ctx and, while fn runs, renews the lease every third
// of its length. When the begin's answer came with half the lease or more gone by the client's
// clock, Do renews first, and does not call fn unless the renew succeeds: it returns an error
// matching ErrLeaseLost when idemsvc answers that another caller took the key over (or it was
// deleted), and one matching ErrUnavailable when the renew gets no answer. When fn returns a
// Response and a nil error, Do stores the response (complete) and returns it; a later Do with the
// same key replays it. When fn returns an error, Do releases the key, so that a later Do runs fn
// again, and returns fn's error unchanged. Encode a failure that must not be retried (a declined
// card, say) as a Response instead.
//
// Do fails without calling fn with ErrInProgress when another caller holds the key (see
// WithWait), ErrFingerprintMismatch when the key was begun for a different request, and with the
// errors of Begin. When fn panics, Do releases the key and panics again.
//
// Losing the lease. If a renew answers that the lease is lost (the key was deleted, or the lease
// ran out and another caller took over), or if renewals keep failing until the lease has run out
// by the client's clock, Do cancels fn's context with a cause matching ErrLeaseLost
// (context.Cause tells fn) and waits for fn to return. It then returns an error matching
// ErrLeaseLost. If fn nevertheless returned a response, Do still tries to complete when no renew
// reported the loss outright (the holder may complete after its time ran out as long as nobody
// took over); if that fails, the error also matches ErrNotRecorded.
//
// Cancellation. ctx bounds the begin. Once fn runs, cancelling ctx cancels fn's context, and Do
// waits for fn to return: Do never returns while fn is running, and the lease is renewed until
// then. What fn returns decides what happens next, because only fn knows whether its side effect
// took place: if fn returns a Response and a nil error, Do completes with it, and if fn returns
// an error, Do releases the key. That complete or release runs detached from ctx's cancellation,
// bounded by the cleanup timeout (WithCleanupTimeout), so a side effect that happened is recorded
// even though the caller stopped waiting. Do then returns as it would have without the
// cancellation: the result and nil when the response was recorded.
//
// When fn returned a response that idemsvc did not record (it could not be reached, the lease was
// lost, or the response may not be stored: ErrInvalidResponse, in which case Do releases the key),
// Do returns fn's response in Result.Response together with an error that matches ErrNotRecorded
// and the cause. A retry with the same key may then run fn again.
func (c *Client) Do(ctx context.Context, key, fingerprint string, fn func(ctx context.Context) (Response, error), opts ...DoOption) (Result, error) {
	if fn == nil {
		return Result{}, errors.New("idemclient: Do with a nil fn")
	}
	cfg := newDoConfig(opts)
	if cfg.err != nil {
		return Result{}, cfg.err
	}
	start := time.Now()
	br, err := c.Begin(ctx, key, BeginOptions{Fingerprint: fingerprint, Lease: cfg.lease, TTL: cfg.ttl, Wait: cfg.wait})
	if err != nil {
		return Result{}, err
	}
	if br.Replayed {
		return Result{Response: *br.Record.Response, Replayed: true, Record: br.Record}, nil
	}
	return c.execute(ctx, key, br.Lease.Token, start, fn, cfg)
}

// execute runs fn under the lease token, acquired by a begin sent at start.
func (c *Client) execute(ctx context.Context, key, token string, start time.Time, fn func(context.Context) (Response, error), cfg doConfig) (Result, error) {
	if time.Until(start.Add(cfg.lease)) < cfg.lease/2 {
		// The begin's answer took half the lease or more (a slow path, a frozen server, a wait):
		// by the client's clock the lease may have run out, and another caller taken the key
		// over, before fn could start. Confirm it with a renew first; fn never runs on a lease
		// the client cannot vouch for (a chaos audit held a 201 for 3 s of a 2 s lease, and fn
		// ran twice).
		var err error
		if start, err = c.confirm(ctx, key, token, cfg); err != nil {
			return Result{}, err
		}
	}
	fnCtx, cancelFn := context.WithCancelCause(ctx)
	defer cancelFn(nil)
	k := c.keepAlive(ctx, key, token, cfg.lease, start, cancelFn)

	cleanupCtx := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.WithoutCancel(ctx), cfg.cleanupTimeout)
	}

	// A panic or runtime.Goexit in fn skips the assignment of returned: release the key then, so
	// that the next attempt does not wait for the lease to run out.
	returned := false
	defer func() {
		if !returned {
			k.stop()
			cctx, cancel := cleanupCtx()
			defer cancel()
			_ = c.Release(cctx, key, token)
		}
	}()
	resp, fnErr := fn(fnCtx)
	returned = true

	lost, definitive := k.stop()
	cctx, cancel := cleanupCtx()
	defer cancel()

	if fnErr != nil {
		if definitive {
			return Result{}, fmt.Errorf("%w; fn: %w", lost, fnErr)
		}
		if err := c.persist(cctx, nil, func(ctx context.Context) error { return c.Release(ctx, key, token) }); err != nil {
			return Result{}, fmt.Errorf("%w; release of %q: %w", fnErr, key, err)
		}
		if lost != nil { // by the client's clock: fn's error is likely the cancellation's
			return Result{}, fmt.Errorf("%w; fn: %w", lost, fnErr)
		}
		return Result{}, fnErr
	}

	if definitive {
		return Result{Response: resp}, fmt.Errorf("%w: %w", ErrNotRecorded, lost)
	}
	var rec *Record
	// While the lease lasts, an attempt gets half of what is left of it, so that one stuck on a
	// frozen replica leaves time for another before another caller may take the key over (a
	// chaos audit: a complete stuck past the lease's end, with healthy replicas, ran fn twice).
	per := func() time.Duration {
		if half := time.Until(k.expiry) / 2; half >= k.floor {
			return half
		}
		return 0 // the rest of the cleanup timeout: the complete lands unless another took over
	}
	err := c.persist(cctx, per, func(ctx context.Context) (err error) {
		rec, err = c.Complete(ctx, key, CompleteRequest{Token: token, Response: resp})
		return err
	})
	if err != nil {
		if errors.Is(err, ErrInvalidResponse) || errors.Is(err, ErrPayloadTooLarge) {
			// This response can never be stored; holding the key until the lease runs out would
			// only delay the retry, not prevent it.
			_ = c.Release(cctx, key, token)
		}
		if lost != nil {
			err = fmt.Errorf("%w (after %w)", err, lost)
		}
		return Result{Response: resp}, fmt.Errorf("%w: complete %q: %w", ErrNotRecorded, key, err)
	}
	return Result{Response: resp, Record: rec}, nil
}

// confirm renews a lease whose estimated end is near or past before fn runs, and returns when
// the renewed lease began at the latest (when the renew was sent). When the renew fails, fn must
// not run: Do returns an error matching ErrLeaseLost when idemsvc said the lease was gone, else
// one matching ErrUnavailable (or ctx's error) after releasing the key.
func (c *Client) confirm(ctx context.Context, key, token string, cfg doConfig) (time.Time, error) {
	sent := time.Now()
	rctx, cancel := context.WithTimeout(ctx, renewTime(cfg.lease))
	_, err := c.Renew(rctx, key, token, cfg.lease)
	cancel()
	if err == nil {
		return sent, nil
	}
	if errors.Is(err, ErrLeaseLost) || errors.Is(err, ErrNotFound) { // idemsvc's answer
		return time.Time{}, fmt.Errorf("idemclient: %q: %w: the begin's answer came with the lease half gone or more, and by then the key was taken over or deleted, so fn did not run: %w", key, ErrLeaseLost, err)
	}
	// No answer: the lease may hold still. Give it back (below), so that a retry need not wait
	// for it.
	if cerr := ctx.Err(); cerr != nil {
		err = fmt.Errorf("idemclient: %q: fn did not run: %w (the renew to confirm the lease: %w)", key, cerr, err)
	} else {
		if !errors.Is(err, ErrUnavailable) { // the renew's time ran out: idemsvc did not answer
			err = fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		err = fmt.Errorf("idemclient: %q: the begin's answer came with the lease half gone or more, and a renew to confirm it failed, so fn did not run: %w", key, err)
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.cleanupTimeout)
	defer cancel()
	_ = c.Release(cctx, key, token)
	return time.Time{}, err
}

// keeper renews a lease in the background until stopped.
type keeper struct {
	cancel     context.CancelFunc
	done       chan struct{}
	lost       error     // set before done is closed
	definitive bool      // idemsvc said so, as opposed to the lease running out by our clock
	expiry     time.Time // the estimate of the lease's end when it stopped; set before done is closed
	// floor is the least time a try (a renew, or the complete after fn while the lease lasts)
	// is given: minTry, or four of the last round trips when idemsvc answers slower; set before
	// done is closed.
	floor time.Duration
}

// keepAlive renews key's lease every third of lease, starting from start (when the begin was
// sent: the lease cannot have started earlier). When the lease is lost it calls onLost with an
// error matching ErrLeaseLost and stops.
func (c *Client) keepAlive(ctx context.Context, key, token string, lease time.Duration, start time.Time, onLost func(error)) *keeper {
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	k := &keeper{cancel: cancel, done: make(chan struct{})}
	go func() {
		expiry := start.Add(lease)
		floor := max(minTry, 4*time.Since(start)) // the begin's round trip (and any wait)
		defer func() {
			k.expiry, k.floor = expiry, floor
			close(k.done)
		}()
		// The lease ends, at the earliest, lease after the begin (or confirm's renew) was sent.
		// When less than half of it is left by then, confirm has renewed it before fn started;
		// should even that have taken long, the first renew goes out at once.
		wait := min(lease/3, max(time.Until(expiry)/2, 0))
		for {
			t := time.NewTimer(wait)
			select {
			case <-rctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			sent := time.Now()
			// A renew gets a third of what is left of the lease, at least floor (never less than
			// a few round trips), so that one that hangs (a frozen replica) leaves time for
			// several others, on new connections: with the whole of it, one hung renew lost the
			// lease while other replicas were healthy; with a third of the lease at least, two
			// in a row did; with half of what was left, and a pause between them, three did (a
			// chaos audit and its re-checks). One sent when the estimate of the lease's end is
			// past gets renewTime too: the lease holds on the server until another caller takes
			// the key over, and the renew then says so.
			d := max(expiry.Sub(sent)/3, floor)
			if !expiry.After(sent) {
				d = max(d, renewTime(lease))
			}
			deadline := sent.Add(d)
			actx, acancel := context.WithDeadline(rctx, deadline)
			_, err := c.Renew(actx, key, token, lease)
			acancel()
			if rctx.Err() != nil {
				return // stopped while renewing
			}
			switch {
			case err == nil:
				expiry = sent.Add(lease)
				wait = lease / 3
				floor = max(minTry, 4*time.Since(sent))
			case errors.Is(err, ErrLeaseLost):
				k.lost, k.definitive = fmt.Errorf("idemclient: renew %q: %w", key, err), true
			case errors.Is(err, ErrNotFound):
				k.lost, k.definitive = fmt.Errorf("idemclient: renew %q: %w: %w", key, ErrLeaseLost, err), true
			case !time.Now().Before(expiry):
				k.lost = fmt.Errorf("idemclient: renew %q: %w: the lease ran out before a renew succeeded: %w", key, ErrLeaseLost, err)
			default:
				// A transient failure the client's retries did not overcome: try again soon,
				// while the lease still holds; at once after one that used up its time (it
				// hung, and waiting would only shorten the next one's).
				wait = max(min(lease/10, time.Until(expiry)/2), time.Millisecond)
				if !time.Now().Before(deadline) {
					wait = time.Millisecond
				}
				continue
			}
			if k.lost != nil {
				onLost(k.lost)
				return
			}
		}
	}()
	return k
}

// minTry is the least time a renew, or a complete while the lease lasts, is given (see
// keeper.floor).
const minTry = 250 * time.Millisecond

// persist calls op, a complete or release after fn, again while it fails with ErrUnavailable,
// until ctx (the cleanup timeout) ends, spaced as the retry policy spaces attempts (a 503's
// Retry-After, else the backoff). The client's retry policy alone gave up within a second, and a
// restart of idemsvc takes longer: fn's side effect then went unrecorded, and a retry ran fn
// again (a chaos audit: 6 of 10 runs). Both are safe to repeat. per, when not nil, bounds each
// call of op (0: no bound but ctx's); a call it cut short counts as unavailable.
func (c *Client) persist(ctx context.Context, per func() time.Duration, op func(context.Context) error) error {
	var last error // the last unavailable answer
	for attempt := 1; ; attempt++ {
		actx, cancel := ctx, context.CancelFunc(func() {})
		if per != nil {
			if d := per(); d > 0 {
				actx, cancel = context.WithTimeout(ctx, d)
			}
		}
		err := op(actx)
		if err != nil && actx.Err() != nil && ctx.Err() == nil && !errors.Is(err, ErrUnavailable) {
			err = fmt.Errorf("%w: no answer within the attempt's time: %w", ErrUnavailable, err)
		}
		cancel()
		if err != nil && last != nil && ctx.Err() != nil && !errors.Is(err, ErrUnavailable) {
			// The cleanup timeout cut the last attempt short: what kept failing is the news.
			return fmt.Errorf("%w; then the cleanup timeout ended the next attempt: %w", last, err)
		}
		if err == nil || !errors.Is(err, ErrUnavailable) || ctx.Err() != nil {
			return err
		}
		last = err
		var retryAfter time.Duration // as asked by a 503's Retry-After, as every call honours it
		if apiErr := (*Error)(nil); errors.As(err, &apiErr) {
			retryAfter = apiErr.RetryAfter
		}
		t := time.NewTimer(c.retry.delay(attempt, retryAfter))
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// renewTime is the least time a renew is given, however close the estimate of the lease's end.
func renewTime(lease time.Duration) time.Duration { return max(lease/3, minTry) }

// stop ends the renewals, waits for the renewing goroutine to finish and reports whether the
// lease was lost.
func (k *keeper) stop() (lost error, definitive bool) {
	k.cancel()
	<-k.done
	return k.lost, k.definitive
}
