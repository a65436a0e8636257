// Package servertest starts a real idemsvc HTTP server for tests: the real handler, a real
// store (bbolt in a temp dir unless another is given) and a real listener on 127.0.0.1:0.
package servertest

import (
	"context"
	"errors"
	"net"
	"net/http"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// Options configure Start. The zero value is a bbolt store in t.TempDir(), open mode, the
// default limits and the real clock.
type Options struct {
	// Store is the store to serve; nil opens bbolt in t.TempDir(). Start closes the store it
	// opened, never one given here.
	Store keys.Store
	// Tokens maps tenants to bearer tokens; empty runs open, as tenant "default".
	Tokens map[string]string
	// Limits; the zero value means keys.DefaultLimits().
	Limits keys.Limits
	// Now is the clock of the bbolt store Start opens and of the server; nil is time.Now.
	Now func() time.Time
	// Logger; nil logs to t at warn level and above.
	Logger *zap.Logger
	// AccessLog is server.Options.AccessLog.
	AccessLog zapcore.WriteSyncer
	// MaxWaiters and BodyBuffer are server.Options'.
	MaxWaiters int
	BodyBuffer int64
	// BudgetWait is server.Options'.
	BudgetWait time.Duration
	// ReadTimeout is the http.Server's (cmd/idemsvc sets 30s); zero is none.
	ReadTimeout time.Duration
}

// Server is a running test server.
type Server struct {
	// URL is the base URL, http://127.0.0.1:PORT.
	URL string
	// Store is the store being served.
	Store keys.Store
	// Handler is the server's handler.
	Handler *server.Server
	http    *http.Server
}

// Start starts a server and stops it (and closes a store it opened) when t ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.Limits == (keys.Limits{}) {
		opts.Limits = keys.DefaultLimits()
	}
	if opts.Logger == nil {
		opts.Logger = zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	}
	store := opts.Store
	if store == nil {
		s, err := bolt.OpenDir(t.TempDir(), bolt.Options{Now: opts.Now})
		if err != nil {
			t.Fatalf("servertest: open bolt: %v", err)
		}
		t.Cleanup(func() { _ = s.Close() })
		store = s
	}
	h := server.New(store, server.Options{
		Limits: opts.Limits, Tokens: opts.Tokens, Now: opts.Now, Logger: opts.Logger, AccessLog: opts.AccessLog,
		MaxWaiters: opts.MaxWaiters, BodyBuffer: opts.BodyBuffer, BudgetWait: opts.BudgetWait,
		ReadTimeout: opts.ReadTimeout,
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("servertest: listen: %v", err)
	}
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: opts.ReadTimeout}
	go func() {
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("servertest: serve: %v", err)
		}
	}()
	s := &Server{URL: "http://" + ln.Addr().String(), Store: store, Handler: h, http: hs}
	t.Cleanup(func() { s.Stop() })
	return s
}

// Stop shuts the server down (waiting briefly for in-flight requests). It is safe to call
// more than once; t's cleanup calls it too.
func (s *Server) Stop() {
	s.Handler.Drain(0)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = s.http.Shutdown(ctx)
}
