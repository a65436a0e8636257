package server

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// pathKey returns the request's idempotency key, percent-decoded from its one path segment.
// chi routes on the raw (still encoded) path when the request has one, so the segment is
// decoded here exactly once.
func pathKey(r *http.Request) (string, error) {
	key := chi.URLParam(r, "key")
	if r.URL.RawPath != "" {
		var err error
		if key, err = url.PathUnescape(key); err != nil {
			return "", keys.ErrInvalidKey
		}
	}
	if err := keys.ValidateKey(key); err != nil {
		return "", err
	}
	info(r.Context()).key = key
	return key, nil
}

// keyAndBody resolves the request's key and decodes its body into v (optional: an empty body
// leaves v as it is). When either fails it writes the error and returns false.
func (s *Server) keyAndBody(w http.ResponseWriter, r *http.Request, v any, optional bool) (string, bool) {
	key, err := pathKey(r)
	if err == nil {
		err = s.decodeBudgeted(w, r, v, optional)
	}
	if err != nil {
		s.writeError(w, r, err)
		return "", false
	}
	return key, true
}

// decodeBudgeted decodes r's body into v under the body budget (limits.go).
//
// A body still arriving when the drain (shutdown) starts has the drain's grace to arrive; one
// that does not is cut off, with 503 "Shutting down", and nothing runs for it. A client trickling
// its body held the shutdown for as long as the server's read timeout allows (30 s), past the
// default IDEMSVC_SHUTDOWN_TIMEOUT, and the process then exited 1.
func (s *Server) decodeBudgeted(w http.ResponseWriter, r *http.Request, v any, optional bool) (err error) {
	lim := s.bodyLimit(v)
	release, err := s.bodies.take(r, tenant(r.Context()), lim.bytes)
	if err != nil {
		return err
	}
	defer release()
	read := s.bodyReads.start(w, info(r.Context()).start)
	defer func() { // also when decode panics: the entry must not outlive the request
		if s.bodyReads.done(read, err) && errors.Is(err, errBodyTimeout) {
			err = errShuttingDown
		}
	}()
	return decode(r, lim, v, optional)
}

// bodyReads are the request bodies being read, which a drain cuts off (decodeBudgeted). Entries
// come from a pool and a map keeps them: no allocation per request.
type bodyReads struct {
	// readTimeout is the http.Server's ReadTimeout (Options.ReadTimeout; zero: unknown): the
	// drain's deadline never lengthens a read past it.
	readTimeout time.Duration

	mu       sync.Mutex
	draining bool
	cutAt    time.Time     // the drain's deadline: when it began, plus its grace
	grace    time.Duration // the drain's grace
	reading  map[*bodyRead]struct{}
	pool     sync.Pool
}

type bodyRead struct {
	w     http.ResponseWriter
	begun time.Time // when its request began
	cut   bool
}

// deadline is the drain's read deadline for a body whose request began at begun.
func (b *bodyReads) deadline(at time.Time, begun time.Time) time.Time {
	if b.readTimeout > 0 && !begun.IsZero() {
		if limit := begun.Add(b.readTimeout); limit.Before(at) {
			return limit
		}
	}
	return at
}

// start records that w's request, begun at begun, is reading its body. When the drain has
// begun, the read gets the drain's deadline, or a second more (at most the grace) when that
// has passed: such a request waited for room in the body budget, which the bodies cut at the
// deadline gave back, with its own body in the socket all along.
func (b *bodyReads) start(w http.ResponseWriter, begun time.Time) *bodyRead {
	e, _ := b.pool.Get().(*bodyRead)
	if e == nil {
		e = new(bodyRead)
	}
	e.w, e.begun, e.cut = w, begun, false
	b.mu.Lock()
	if b.draining {
		e.cut = true
		at := b.cutAt
		if late := time.Now().Add(min(b.grace, time.Second)); late.After(at) {
			at = late
		}
		_ = http.NewResponseController(w).SetReadDeadline(b.deadline(at, begun))
	} else {
		if b.reading == nil {
			b.reading = make(map[*bodyRead]struct{})
		}
		b.reading[e] = struct{}{}
	}
	b.mu.Unlock()
	return e
}

// done records that e's read ended with readErr, and reports whether it had the drain's
// deadline.
func (b *bodyReads) done(e *bodyRead, readErr error) (cut bool) {
	b.mu.Lock()
	delete(b.reading, e)
	cut = e.cut
	b.mu.Unlock()
	if cut && readErr == nil {
		// The body arrived in time. net/http then reads on in the background, to notice a
		// client that goes away; it clears the deadline when it starts that read at the
		// body's end, but a drain that set it after that moment would end the read and cancel
		// the request's context while its operation runs.
		_ = http.NewResponseController(e.w).SetReadDeadline(time.Time{})
	}
	e.w = nil
	b.pool.Put(e)
	return cut
}

// drain gives every body being read, and every one whose read starts from now on, grace to
// arrive: its read fails at that deadline. (Requests start only on connections already open:
// http.Server.Shutdown closes the listener, and ends each connection after its request.)
func (b *bodyReads) drain(grace time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.draining, b.grace = true, grace
	b.cutAt = time.Now().Add(grace)
	for e := range b.reading {
		e.cut = true
		_ = http.NewResponseController(e.w).SetReadDeadline(b.deadline(b.cutAt, e.begun))
	}
}

// maxSmallRequest bounds the body of a begin, renew or release: every valid one is under 4 KiB
// (a fingerprint of 512 bytes, each escaped as \u00XX, is 3 KiB). Only a complete carries a
// stored response, so only a complete may take a request's full size from the body budget.
const maxSmallRequest = 16 << 10

// maxSmallValues bounds the JSON values of a begin, renew or release body (see bodyLimit): it
// has at most four members, and no arrays.
const maxSmallValues = 32

// smallBody is the bodyLimit of a begin, renew or release.
var smallBody = bodyLimit{bytes: maxSmallRequest, values: maxSmallValues,
	tooMany: fmt.Errorf("%w: the body holds more JSON values than any valid request", keys.ErrInvalidRequest)}

// completeBody is the bodyLimit of a complete under limits: room for the largest stored
// response, and for its header values (a comma each, and a few for the other members).
func completeBody(l keys.Limits) bodyLimit {
	return bodyLimit{bytes: maxRequestBytes(l), values: l.MaxHeaders + maxSmallValues,
		tooMany: fmt.Errorf("%w: more than %d header values", keys.ErrInvalidResponse, l.MaxHeaders)}
}

// bodyLimit is what a body decoded into v may be.
func (s *Server) bodyLimit(v any) bodyLimit {
	if _, ok := v.(*completeRequest); ok {
		return s.completeBody
	}
	return smallBody
}

func (s *Server) handleBegin(w http.ResponseWriter, r *http.Request) {
	var in beginRequest
	key, ok := s.keyAndBody(w, r, &in, true)
	if !ok {
		return
	}
	req, wait, err := s.beginRequest(in)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	ctx := r.Context()
	if wait > 0 {
		if s.waiters.enter(tenant(ctx)) {
			defer s.waiters.leave(tenant(ctx))
		} else {
			wait = 0
			s.metrics.waitsShed.Inc()
		}
	}
	// A drain (shutdown) ends a wait early with 409; it never cuts a store call short.
	var start time.Time
	if wait > 0 {
		start = time.Now() // for what is left of the wait, should a replay wait for room
	}
	res, err := keys.BeginWaitUntil(ctx, s.store, s.now, tenant(ctx), key, req, wait, s.draining.Done())
	if err == nil && res.Outcome == keys.Replayed {
		var release func()
		var again bool
		if release, again, err = s.reserveAnswer(r, &res.Record); err == nil {
			defer release()
			if again {
				// A later begin: it replays again, or finds what happened meanwhile, and waits
				// for a holder what is left of wait_ms.
				var rest time.Duration
				if wait > 0 {
					rest = max(0, wait-time.Since(start))
				}
				res, err = keys.BeginWaitUntil(ctx, s.store, s.now, tenant(ctx), key, req, rest, s.draining.Done())
			}
		}
	}
	ri := info(r.Context())
	switch {
	case errors.Is(err, keys.ErrInProgress):
		ri.outcome = "in_progress"
		s.metrics.begin(ri.outcome)
		w.Header().Set("Retry-After", retryAfter(s.now(), res.Record.Lease.ExpiresAt))
		s.writeError(w, r, err)
	case errors.Is(err, keys.ErrFingerprintMismatch):
		ri.outcome = "mismatch"
		s.metrics.begin(ri.outcome)
		s.writeError(w, r, err)
	case err != nil:
		s.writeError(w, r, err)
	case res.Outcome == keys.Replayed:
		ri.outcome = res.Outcome.String()
		s.metrics.begin(ri.outcome)
		w.Header()["Idempotent-Replayed"] = headerTrue
		encodeRecord(w, http.StatusOK, res.Record, false)
	default:
		ri.outcome = res.Outcome.String()
		s.metrics.begin(ri.outcome)
		encodeRecord(w, http.StatusCreated, res.Record, true)
		sendEarly(w)
	}
}

// beginRequest resolves a decoded begin body into the domain request and the wait.
func (s *Server) beginRequest(in beginRequest) (keys.BeginRequest, time.Duration, error) {
	if err := keys.CheckFingerprint(in.Fingerprint); err != nil {
		return keys.BeginRequest{}, 0, err
	}
	lease, err := s.limits.LeaseDuration(in.LeaseMS)
	if err != nil {
		return keys.BeginRequest{}, 0, err
	}
	ttl, err := s.limits.TTLDuration(in.TTLMS)
	if err != nil {
		return keys.BeginRequest{}, 0, err
	}
	wait, err := s.limits.WaitDuration(in.WaitMS)
	if err != nil {
		return keys.BeginRequest{}, 0, err
	}
	return keys.BeginRequest{Fingerprint: in.Fingerprint, Lease: lease, TTL: ttl}, wait, nil
}

func (s *Server) handleComplete(w http.ResponseWriter, r *http.Request) {
	var in completeRequest
	key, ok := s.keyAndBody(w, r, &in, false)
	if !ok {
		return
	}
	req, err := s.completeRequest(in)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	rec, err := s.store.Complete(r.Context(), tenant(r.Context()), key, req)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	encodeRecord(w, http.StatusOK, rec, false)
	sendEarly(w)
}

func (s *Server) completeRequest(in completeRequest) (keys.CompleteRequest, error) {
	switch {
	case in.Token == "":
		return keys.CompleteRequest{}, errMissingToken
	case in.Response == nil:
		return keys.CompleteRequest{}, errMissingResponse
	case in.Response.Status == nil:
		return keys.CompleteRequest{}, errMissingStatus
	}
	ttl, err := s.limits.CompleteTTL(in.TTLMS)
	if err != nil {
		return keys.CompleteRequest{}, err
	}
	resp := keys.Response{Status: *in.Response.Status, Headers: in.Response.Headers, Body: in.Response.Body}
	if err := s.limits.CheckResponse(resp); err != nil {
		return keys.CompleteRequest{}, err
	}
	return keys.CompleteRequest{Token: in.Token, Response: resp, TTL: ttl}, nil
}

func (s *Server) handleRenew(w http.ResponseWriter, r *http.Request) {
	var in renewRequest
	key, ok := s.keyAndBody(w, r, &in, false)
	if !ok {
		return
	}
	if in.Token == "" {
		s.writeError(w, r, errMissingToken)
		return
	}
	lease, err := s.limits.LeaseDuration(in.LeaseMS)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	rec, err := s.store.Renew(r.Context(), tenant(r.Context()), key, keys.RenewRequest{Token: in.Token, Lease: lease})
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	encodeRecord(w, http.StatusOK, rec, true)
	sendEarly(w)
}

func (s *Server) handleRelease(w http.ResponseWriter, r *http.Request) {
	var in releaseRequest
	key, ok := s.keyAndBody(w, r, &in, false)
	if !ok {
		return
	}
	if in.Token == "" {
		s.writeError(w, r, errMissingToken)
		return
	}
	if err := s.store.Release(r.Context(), tenant(r.Context()), key, in.Token); err != nil {
		s.writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleGet(w http.ResponseWriter, r *http.Request) {
	key, err := pathKey(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	rec, err := s.store.Get(r.Context(), tenant(r.Context()), key)
	if err == nil {
		var release func()
		var again bool
		if release, again, err = s.reserveAnswer(r, &rec); err == nil {
			defer release()
			if again {
				rec, err = s.store.Get(r.Context(), tenant(r.Context()), key)
			}
		}
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	encodeRecord(w, http.StatusOK, rec, false)
}

// reserveAnswer takes room in the answer budget for rec, a record about to be answered to r by
// a GET or a replay, when it carries a stored body of largeAnswer or more: until its client has
// read it, the answer holds the record and its encoding, and a client that reads slowly (or not
// at all) holds them up to the write timeout (a security audit's find: 2,000 connections that
// asked for a record of 1 MiB and read nothing held 885 MB). A record with a memo costs
// nothing more: its encoding is shared by every replay of it. A record larger than the budget
// (or the tenant's share of it) takes all of it, so that it is never refused on an idle server.
//
// When there is no room at once, it drops *rec, so that a waiting request holds nothing of it,
// waits for room up to the budget's wait (bodyBudgetWait unless Options.BudgetWait says
// otherwise), and returns again: the caller reads the record anew and
// answers that under the room taken (a record that grew meanwhile goes over by the difference).
// Without room by then it is errBusyAnswering (503). The budget's queue is first come, first
// served: while one answer waits, the next ones wait behind it too, even with room free, each
// reading its record once more.
func (s *Server) reserveAnswer(r *http.Request, rec *keys.Record) (release func(), again bool, err error) {
	if rec.Response == nil || len(rec.Response.Body) < largeAnswer || rec.Memo != nil {
		return noRelease, false, nil
	}
	ctx := r.Context()
	n := min(answerCost(len(rec.Response.Body)), s.answers.capacity())
	if release, ok := s.answers.reserve(ctx, tenant(ctx), n, 0); ok {
		return release, false, nil
	}
	*rec = keys.Record{}
	release, ok := s.answers.reserve(ctx, tenant(ctx), n, s.answers.wait)
	if !ok {
		return nil, false, errBusyAnswering
	}
	return release, true, nil
}

func (s *Server) handleDelete(w http.ResponseWriter, r *http.Request) {
	key, err := pathKey(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if err := s.store.Delete(r.Context(), tenant(r.Context()), key); err != nil {
		s.writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
