// Package server turns HTTP API v1 (../shared/CONTRACT.md, api/openapi.yaml) into calls on a
// keys.Store and back: routing, authentication, decoding, the error table, request ids, access
// logs and Prometheus metrics. Handlers are thin: decode, call keys, encode.
package server

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/idemsvc/idemsvc/api"
	"github.com/idemsvc/idemsvc/internal/keys"
)

// Options configure a Server.
type Options struct {
	// Limits are the defaults and bounds of durations and stored responses.
	Limits keys.Limits
	// Tokens maps tenant names to bearer tokens. Empty runs the service open, as the single
	// tenant "default".
	Tokens map[string]string
	// Now is the clock used to time a wait's polls and Retry-After against the store's lease
	// expiries; nil is the store's own clock when it has one (keys.Clocked: Redis's), else
	// time.Now. The store decides leases with its own clock.
	Now func() time.Time
	// Logger receives the access log and errors; nil logs nothing.
	Logger *zap.Logger
	// AccessLog, when set, is the WriteSyncer of Logger's core, and access lines are written to
	// it directly, encoded as Logger's JSON encoder would with LogEncoderConfig (see
	// appendAccessLine), when Logger logs at info level. zap's field encoding was about a
	// tenth of a replay's CPU. When nil, access lines go through Logger.
	AccessLog zapcore.WriteSyncer
	// Registry receives the server's metrics; nil makes a new one (see Server.Registry).
	Registry *prometheus.Registry
	// MaxWaiters bounds the begins that wait for a holder at once (wait_ms), in all, and with
	// several tenants to half of it per tenant; a begin beyond either bound answers at once, as
	// with wait_ms 0. Zero means DefaultMaxWaiters.
	MaxWaiters int
	// BodyBuffer bounds the bytes of request bodies of 4 KiB or more that are read at once (at
	// least four of the largest requests); a request that finds no room within 5 s is answered
	// 503. Zero means DefaultBodyBuffer. Answers that carry a stored body of 64 KiB or more have
	// a budget of the same size (and room for four of the largest), with the same wait.
	BodyBuffer int64
	// BudgetWait is how long a request waits for room in either budget before its 503; zero
	// means 5 s. (Tests that must not depend on the machine's speed lengthen it.)
	BudgetWait time.Duration
	// ReadTimeout is the http.Server's, if it has one: Drain's grace for a body never takes
	// its read past it.
	ReadTimeout time.Duration
}

// DefaultTenant is the tenant of every request when no tokens are configured.
const DefaultTenant = "default"

// Server is the HTTP API of idemsvc. It is an http.Handler.
type Server struct {
	store  keys.Store
	limits keys.Limits
	now    func() time.Time
	logger *zap.Logger
	// accessLog is logger without the caller: every access line would name the same line of
	// observe, and finding it costs a stack walk per request (about 2% of a replay's CPU).
	accessLog *zap.Logger
	// accessOut, when set, takes the access lines instead of accessLog (Options.AccessLog).
	accessOut zapcore.WriteSyncer
	auth      *authenticator
	metrics   *metrics
	registry  *prometheus.Registry
	handler   http.Handler
	// completeBody is a complete's bodyLimit (handlers.go): its bytes bound every request body.
	completeBody bodyLimit
	waiters      *waiters
	bodies       bodyBudget
	answers      *budget // large answers being written (see Server.reserveAnswer)
	health       *storeHealth
	unready      atomic.Bool // see Unready
	// draining is cancelled when the server starts shutting down, so begins that wait for a
	// holder answer 409 at once instead of holding shutdown up.
	draining context.Context
	drain    context.CancelFunc
	// bodyReads are the bodies being read, which Drain cuts off.
	bodyReads bodyReads
}

// New returns a Server over store. The store is instrumented for metrics; closing it stays the
// caller's job.
func New(store keys.Store, opts Options) *Server {
	if opts.Now == nil {
		opts.Now = time.Now
		if c, ok := store.(keys.Clocked); ok { // Redis's clock, on which its leases are
			opts.Now = c.Now
		}
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.Registry == nil {
		opts.Registry = prometheus.NewRegistry()
	}
	s := &Server{
		limits:       opts.Limits,
		now:          opts.Now,
		logger:       opts.Logger.With(zap.String("component", "http")),
		accessLog:    opts.Logger.With(zap.String("component", "http")).WithOptions(zap.WithCaller(false)),
		auth:         newAuthenticator(opts.Tokens),
		metrics:      newMetrics(opts.Registry),
		registry:     opts.Registry,
		completeBody: completeBody(opts.Limits),
	}
	s.waiters = newWaiters(opts.MaxWaiters, len(opts.Tokens), s.metrics.waiting)
	s.bodies = newBodyBudget(opts.BodyBuffer, s.completeBody.bytes, len(opts.Tokens), s.metrics.bodyBytes)
	s.answers = newAnswerBudget(s.bodies, opts.Limits, len(opts.Tokens), s.metrics.answerBytes)
	s.bodyReads.readTimeout = opts.ReadTimeout
	if opts.BudgetWait > 0 {
		s.bodies.wait, s.answers.wait = opts.BudgetWait, opts.BudgetWait
	}
	if opts.AccessLog != nil && opts.Logger.Core().Enabled(zapcore.InfoLevel) {
		s.accessOut = opts.AccessLog
	}
	s.health = &storeHealth{logger: s.logger}
	s.store = instrument(store, s.metrics, s.health)
	s.draining, s.drain = context.WithCancel(context.Background())
	s.handler = s.routes()
	return s
}

// ServeHTTP serves one request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.handler.ServeHTTP(w, r) }

// Registry returns the registry that holds the server's metrics.
func (s *Server) Registry() *prometheus.Registry { return s.registry }

// Drain makes begins that are waiting for a holder answer 409 in-progress at once, and gives
// request bodies still arriving bodyGrace to arrive (never past Options.ReadTimeout; a second
// more for one whose read starts after that, having waited for room in the body budget): one
// that has not by then is answered 503 "Shutting down", and nothing runs for it. Call it when
// shutdown starts, before http.Server.Shutdown, with a grace well within the shutdown's
// timeout, so that neither holds shutdown up.
func (s *Server) Drain(bodyGrace time.Duration) {
	s.drain()
	s.bodyReads.drain(bodyGrace)
}

// Unready makes /readyz answer 503 ("Shutting down") from now on, while every other request is
// served as before: the start of a graceful stop, for load balancers to stop sending requests
// here before the listener closes.
func (s *Server) Unready() { s.unready.Store(true) }

// ObserveSweep records one sweeper pass in the metrics and the log.
func (s *Server) ObserveSweep(removed int, err error) {
	s.metrics.swept.Add(float64(removed))
	if err != nil {
		s.logger.Warn("sweep failed", zap.Int("removed", removed), zap.Error(err))
		return
	}
	if removed > 0 {
		s.logger.Debug("swept expired records", zap.Int("removed", removed))
	}
}

// maxRequestBytes bounds a request body: room for the largest valid complete, whose stored body
// comes in base64 and whose stored headers a client may send with every byte escaped as
// \u00XX (encoding/json escapes <, > and &), 6 bytes for one, plus 64 KiB for the rest.
func maxRequestBytes(l keys.Limits) int64 {
	return int64(l.MaxBodyBytes+2)/3*4 + 6*int64(l.MaxHeaderBytes) + 64<<10
}

// routes lists every route, in the order of api/openapi.yaml.
func (s *Server) routes() http.Handler {
	r := chi.NewRouter()
	r.Use(s.observe)
	r.NotFound(func(w http.ResponseWriter, r *http.Request) { s.writeError(w, r, errRouteNotFound) })
	r.MethodNotAllowed(func(w http.ResponseWriter, r *http.Request) { s.writeError(w, r, errMethodNotAllowed) })

	// Flat patterns, not r.Route("/v1/keys/{key}"): a sub-router's "/" also matches a trailing
	// slash, so GET /v1/keys/abc/ would have read the record "abc".
	r.Group(func(r chi.Router) {
		r.Use(s.authenticate)
		r.Post("/v1/keys/{key}/begin", s.handleBegin)
		r.Post("/v1/keys/{key}/complete", s.handleComplete)
		r.Post("/v1/keys/{key}/renew", s.handleRenew)
		r.Post("/v1/keys/{key}/release", s.handleRelease)
		get(r, "/v1/keys/{key}", s.handleGet)
		r.Delete("/v1/keys/{key}", s.handleDelete)
		// The empty key, which {key} does not match: 400 invalid-key, as on the actions
		// (/v1/keys//begin), not 404 for an unknown path.
		get(r, "/v1/keys/", s.handleGet)
		r.Delete("/v1/keys/", s.handleDelete)
	})

	get(r, "/healthz", s.handleHealthz)
	get(r, "/readyz", s.handleReadyz)
	get(r, "/metrics", promhttp.HandlerFor(s.registry, promhttp.HandlerOpts{}).ServeHTTP)
	get(r, "/openapi.yaml", handleSpec)
	return r
}

// get routes GET and HEAD on pattern to h: RFC 9110 asks every general-purpose server to answer
// HEAD as GET without the body (net/http drops what h writes), and monitors probe with it
// (curl -I, wget --spider).
func get(r chi.Router, pattern string, h http.HandlerFunc) {
	r.Get(pattern, h)
	r.Head(pattern, h)
}

// allowed is the Allow header of a 405 on r's path. It splits the path as the router does, on
// the escaped path: /v1/keys/begin is the record of the key "begin" (GET, HEAD, DELETE), and so
// is /v1/keys/x%2Fbegin; /v1/keys/x/begin is an action (POST).
func allowed(r *http.Request) string {
	rest, ok := strings.CutPrefix(r.URL.EscapedPath(), "/v1/keys/")
	switch {
	case !ok:
		return "GET, HEAD"
	case strings.Contains(rest, "/"):
		return "POST"
	default:
		return "GET, HEAD, DELETE"
	}
}

func handleSpec(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/yaml")
	_, _ = w.Write(api.Spec)
}

func (s *Server) handleHealthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write([]byte("ok\n"))
}

func (s *Server) handleReadyz(w http.ResponseWriter, r *http.Request) {
	if s.unready.Load() {
		s.writeError(w, r, errShuttingDown)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	start := time.Now()
	err := s.store.Ping(ctx)
	if err != nil {
		err = fmt.Errorf("not ready: %w: %w", keys.ErrUnavailable, err)
	}
	if s.health.observe(r.Context(), opRead, start, err); err != nil {
		s.writeError(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write([]byte("ok\n")) // api/openapi.yaml
}
