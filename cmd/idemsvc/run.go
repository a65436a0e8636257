package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
	"github.com/idemsvc/idemsvc/internal/storage/redis"
)

// readTimeout bounds the reading of a request, its body included.
const readTimeout = 30 * time.Second

// run serves until ctx ends, then shuts down gracefully: it stops accepting, lets in-flight
// requests finish within cfg.ShutdownTimeout, stops the sweeper and closes the store. It
// returns nil after a clean shutdown.
func run(ctx context.Context, cfg Config, logger *zap.Logger, accessLog zapcore.WriteSyncer) error {
	tokens, err := cfg.tokens()
	if err != nil {
		return err
	}
	logger.Info("starting idemsvc", zap.String("version", version), zap.Any("config", cfg.masked()))
	if cfg.Backend != "redis" && (cfg.RedisURL != "" || cfg.RedisAllowEviction) {
		logger.Warn("IDEMSVC_REDIS_URL and IDEMSVC_REDIS_ALLOW_EVICTION are ignored unless IDEMSVC_BACKEND=redis")
	}
	if len(tokens) == 0 {
		logger.Warn("no IDEMSVC_TOKENS configured: the service runs OPEN, every caller is tenant \"default\"")
	}

	maxConns, nofile, err := connLimit(cfg.MaxConns)
	if err != nil {
		return err
	}

	// Listen first, so that a taken port fails at once.
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("IDEMSVC_ADDR %s: listen: %w", cfg.Addr, err)
	}
	// At most maxConns connections at once, below RLIMIT_NOFILE: a client holding thousands of
	// idle connections used to take every descriptor, and then no one was served and the store
	// could open nothing. At the limit, the connection idle the longest is closed to make room;
	// while none is idle, a new connection waits until one is, or closes. (Per-client limits
	// belong in a proxy in front.)
	capped := newConnCap(ln, maxConns, logger)
	ln = capped
	// A waiting begin holds its connection: at most half of them may wait, so that the holder's
	// complete (and everyone else) still gets one.
	maxWaiters := min(cfg.MaxWaiters, max(1, maxConns/2))
	if maxWaiters < cfg.MaxWaiters {
		logger.Warn("IDEMSVC_MAX_WAITERS lowered to half of the connection limit: each waiting begin holds a connection",
			zap.Int("max_waiters", cfg.MaxWaiters), zap.Int("effective", maxWaiters), zap.Int("max_conns", maxConns))
	}
	logger.Info("connection limit", zap.Int("max_conns", maxConns), zap.Uint64("rlimit_nofile", nofile),
		zap.Bool("default", cfg.MaxConns == 0), zap.Int("max_waiters", maxWaiters))
	dataLoss := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "idemsvc_redis_data_loss_total",
		Help: "Times this replica found that Redis lost idemsvc's data (its data marker gone or replaced).",
	})
	store, err := openStore(ctx, cfg, logger, dataLoss)
	if err != nil {
		_ = ln.Close()
		return err
	}
	closeStore := sync.OnceFunc(func() {
		if err := store.Close(); err != nil {
			logger.Error("closing the store", zap.Error(err))
		}
	})
	defer closeStore()

	srv := server.New(store, server.Options{
		Limits:      cfg.limits(),
		Tokens:      tokens,
		Logger:      logger,
		AccessLog:   accessLog,
		MaxWaiters:  maxWaiters,
		ReadTimeout: readTimeout,
	})
	switch st := store.(type) {
	case *bolt.Store:
		srv.Registry().MustRegister(boltCollector{st})
	case *redis.Store:
		srv.Registry().MustRegister(dataLoss)
	}
	srv.Registry().MustRegister(capped.collectors()...)
	httpServer := &http.Server{
		Handler:           srv,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       readTimeout,
		WriteTimeout:      cfg.MaxWait + 30*time.Second, // a begin may wait up to MaxWait
		// An idle keep-alive connection holds a descriptor and one of the maxConns slots: 60s
		// frees an abandoned one twice as soon as 2 min did, is far above the gap between the
		// calls of any client that reuses its connections, and is below Go's clients' own 90s
		// (a request sent as the server closes an idle connection is retried by net/http).
		IdleTimeout:    60 * time.Second,
		MaxHeaderBytes: 64 << 10,
		// OPTIONS * goes to the handler too (a problem+json 404 with X-Request-Id), not to
		// net/http's own answer without either.
		DisableGeneralOptionsHandler: true,
		ConnState:                    capped.connState,
		ErrorLog:                     zap.NewStdLog(logger.With(zap.String("component", "net/http"))),
	}

	sweepCtx, stopSweeper := context.WithCancel(context.Background())
	defer stopSweeper()
	g, gctx := errgroup.WithContext(ctx)
	serveDone := make(chan struct{})
	g.Go(func() error {
		defer close(serveDone)
		if err := httpServer.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		return keys.RunSweeper(sweepCtx, store, cfg.SweepInterval, srv.ObserveSweep)
	})
	g.Go(func() error {
		<-gctx.Done() // a signal, or Serve failed
		if ctx.Err() != nil && cfg.DrainDelay > 0 {
			// A load balancer learns from /readyz that this replica is going, while the
			// requests it still sends here are served (a second signal ends the process).
			srv.Unready()
			logger.Info("draining: /readyz answers 503, requests are still served", zap.Duration("for", cfg.DrainDelay))
			t := time.NewTimer(cfg.DrainDelay)
			select {
			case <-t.C:
			case <-serveDone:
				t.Stop()
			}
		}
		logger.Info("shutting down", zap.Duration("timeout", cfg.ShutdownTimeout))
		// A body still arriving gets a third of the timeout: one that comes at any sensible
		// rate arrives, and a client trickling its body does not hold the shutdown past it.
		srv.Drain(cfg.ShutdownTimeout / 3)
		shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
		defer cancel()
		err := httpServer.Shutdown(shutdownCtx)
		stopSweeper()
		if err != nil {
			_ = httpServer.Close()
			return fmt.Errorf("in-flight requests did not finish within %s: %w", cfg.ShutdownTimeout, err)
		}
		return nil
	})
	logger.Info("listening", zap.String("addr", ln.Addr().String()))
	_ = logger.Sync() // whoever waits for this line sees it now, not at the next flush
	if cfg.Ready != nil {
		cfg.Ready(ln.Addr().String())
	}
	if err := g.Wait(); err != nil {
		return err
	}
	closeStore() // before the last line: closing a store whose Redis hangs takes seconds
	logger.Info("stopped cleanly")
	_ = logger.Sync()
	return nil
}

// openStore opens the configured backend.
func openStore(ctx context.Context, cfg Config, logger *zap.Logger, dataLoss prometheus.Counter) (keys.Store, error) {
	switch cfg.Backend {
	case "redis":
		if redis.SkipsVerify(cfg.RedisURL) {
			logger.Warn("IDEMSVC_REDIS_URL has skip_verify: Redis's certificate is not verified, so anyone on the path " +
				"can pose as Redis and read the password and every record; give its CA in IDEMSVC_REDIS_TLS_CA_FILE instead")
		}
		s, err := redis.Open(ctx, cfg.RedisURL, redis.Options{
			AllowEviction: cfg.RedisAllowEviction,
			MinReplicas:   cfg.RedisMinReplicas,
			TLS:           redis.TLSFiles{CAFile: cfg.RedisTlsCaFile, CertFile: cfg.RedisTlsCertFile, KeyFile: cfg.RedisTlsKeyFile},
			Sentinel:      redis.SentinelAuth{Username: cfg.RedisSentinelUsername, Password: cfg.RedisSentinelPassword},
			OnDataLoss: func(found string) {
				dataLoss.Inc()
				logger.WithOptions(zap.AddStacktrace(zapcore.FatalLevel)).Error("Redis lost data", zap.String("found", found))
			},
			// Without AllowEviction an evicting policy fails Open, or Ping (/readyz, which logs why).
			OnEvictionPolicy: func(policy string) {
				if cfg.RedisAllowEviction && policy != "" && policy != "noeviction" {
					logger.Warn("Redis may evict idemsvc's records (IDEMSVC_REDIS_ALLOW_EVICTION is set): "+
						"a retry of an evicted key runs the operation again; set maxmemory-policy noeviction",
						zap.String("maxmemory_policy", policy))
				}
			},
		})
		if err != nil {
			return nil, fmt.Errorf("IDEMSVC_REDIS_URL: open redis store: %w", err)
		}
		pingCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if err := s.Ping(pingCtx); err != nil {
			// Serve anyway: requests get 503 and /readyz says so until Redis answers.
			logger.Warn("redis does not answer yet; serving 503 until it does", zap.Error(err))
		} else {
			logger.Info("opened redis store")
		}
		return s, nil
	default:
		s, err := bolt.OpenDir(cfg.DataDir, bolt.Options{Timeout: 2 * time.Second, CheckpointInterval: cfg.BoltCheckpointInterval})
		if err != nil {
			return nil, fmt.Errorf("IDEMSVC_DATA_DIR %s: open bolt store: %w", cfg.DataDir, err)
		}
		logger.Info("opened bolt store", zap.String("data_dir", cfg.DataDir))
		return s, nil
	}
}
