// Command idemsvc is the idempotency-key service: an HTTP API (api/openapi.yaml) over an
// embedded bbolt file or a shared Redis. It is configured by IDEMSVC_* environment variables;
// `idemsvc -h` lists them.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/idemsvc/idemsvc/internal/server"
)

// defaultGCPercent is the GOGC that idemsvc runs with unless the environment sets one.
const defaultGCPercent = 400

// version is stamped at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

func main() {
	os.Exit(realMain(os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}

// realMain is main without the exit, so that it can be tested.
func realMain(args, environ []string, stdout, stderr io.Writer) int {
	cmd := ""
	if len(args) > 0 {
		cmd = args[0]
	}
	switch cmd {
	case "-h", "-help", "--help", "help":
		usage(stdout)
		return 0
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, "idemsvc", version)
		return 0
	case "healthcheck":
		return healthcheck(environ, stderr)
	case "", "serve":
	default:
		fmt.Fprintf(stderr, "idemsvc: unknown command %q\n\n", cmd)
		usage(stderr)
		return 2
	}

	cfg, err := loadConfig(environ)
	if err != nil {
		fmt.Fprintf(stderr, "idemsvc: configuration: %v\n", err)
		return 1
	}
	logger, logOut, err := newLogger(cfg.LogLevel, os.Stderr)
	if err != nil {
		fmt.Fprintf(stderr, "idemsvc: logger: %v\n", err)
		return 1
	}
	defer func() { _ = logger.Sync() }()

	// A bbolt commit blocks its thread in fdatasync, and a read of bbolt's mapped file can block
	// its thread in a page fault, where the scheduler cannot take the P back. With a single P (one
	// CPU, or a container limited to one) every other goroutine then waits: under load that cut
	// throughput by 4x and raised p99 from 23 ms to 690 ms, and in the ninth session's check a
	// round of pairs stalled at a p99 of 3 s (docs/BENCHMARKS.md). A second P serves meanwhile.
	if runtime.GOMAXPROCS(0) < 2 && os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(2)
	}
	warnSingleP(logger, runtime.GOMAXPROCS(0), cfg.Backend)
	// The live heap is small and bounded (nothing is cached; a request holds at most its own
	// body), so the default GOGC=100 collects every few MiB, thousands of times a minute under
	// load. 400 lets the heap grow to five times the live data between collections: replays on
	// one core went from about 70 to 55 µs of CPU per request (docs/BENCHMARKS.md). GOGC and
	// GOMEMLIMIT in the environment still win.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
	// The first signal starts the graceful stop. A second one ends the process at once, as an
	// operator who presses Ctrl-C twice expects (every acknowledged write is already on disk),
	// with the exit status of a process that the signal killed; but first the log's buffer is
	// written out, or the access lines of the last second were lost.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-sigs
		cancel()
		sig := <-sigs
		signal.Stop(sigs) // a third signal ends the process as Go does, whatever happens below
		flushed := make(chan struct{})
		go func() {
			logger.Warn("second signal: exiting at once", zap.String("signal", sig.String())) // flushes the buffer
			close(flushed)
		}()
		select {
		case <-flushed:
		case <-time.After(time.Second): // the log's destination blocks (a pipe nobody reads)
		}
		os.Exit(128 + int(sig.(syscall.Signal)))
	}()
	if err := run(ctx, cfg, logger, logOut); err != nil {
		// Without a stack trace: it would name only realMain, and be the last line of the log
		// where the plain message below should be.
		logger.WithOptions(zap.AddStacktrace(zapcore.FatalLevel)).Error("idemsvc stopped", zap.Error(err))
		fmt.Fprintf(stderr, "idemsvc: %v\n", err)
		return 1
	}
	return 0
}

// warnSingleP warns when the bbolt backend runs with a single P, which only GOMAXPROCS=1 in the
// environment leaves it (see run): every write then waits while a commit's fdatasync holds the
// P. Measured in the seventeenth session, bbolt pairs made 0.23 times as many a second as with
// two Ps, each at 2.4 times the CPU (docs/BENCHMARKS.md).
func warnSingleP(logger *zap.Logger, procs int, backend string) {
	if procs < 2 && backend == "bolt" {
		logger.Warn("GOMAXPROCS=1 with the bbolt backend: a commit's fdatasync holds the only P, "+
			"so every other request waits for it and writes are several times slower; "+
			"unset GOMAXPROCS and idemsvc runs with two", zap.Int("gomaxprocs", procs))
	}
}

// newLogger builds the JSON logger, and returns the WriteSyncer of its core too, for the
// server's access lines (server.Options.AccessLog). Its output is buffered (flushed every
// second, when 256 KiB are waiting, and at exit): one write syscall per access-log line was a
// measurable part of a request's cost under load. A line at warn level or above flushes it at
// once (flushingCore).
func newLogger(level string, w io.Writer) (*zap.Logger, zapcore.WriteSyncer, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, nil, err
	}
	out := &zapcore.BufferedWriteSyncer{WS: zapcore.Lock(flushOnly{w}), Size: 256 << 10, FlushInterval: time.Second}
	core := zapcore.NewCore(zapcore.NewJSONEncoder(server.LogEncoderConfig()), out, lvl) // every line, no sampling
	return zap.New(flushingCore{core, out}, zap.AddCaller(), zap.AddStacktrace(zapcore.ErrorLevel)), out, nil
}

// flushOnly is the log's destination: syncing the buffer writes it out, and asks nothing more of
// the destination. An *os.File's Sync is fsync, which a pipe or a socket (stderr under a container
// runtime or systemd) refuses with EINVAL: zap then printed "write error: sync /dev/stderr:
// invalid argument", a line that is not JSON, after every warning.
type flushOnly struct{ io.Writer }

func (flushOnly) Sync() error { return nil }

// flushingCore flushes the log's buffer after every line at warn level or above, so that a
// process killed right after a problem (kill -9, the OOM killer) does not lose the line that
// says what went wrong, nor the access lines written before it. Info lines (an access line per
// request) stay buffered, for at most a second.
type flushingCore struct {
	zapcore.Core
	out zapcore.WriteSyncer
}

func (c flushingCore) With(fields []zapcore.Field) zapcore.Core {
	return flushingCore{c.Core.With(fields), c.out}
}

func (c flushingCore) Check(ent zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(ent.Level) {
		return ce.AddCore(ent, c)
	}
	return ce
}

func (c flushingCore) Write(ent zapcore.Entry, fields []zapcore.Field) error {
	err := c.Core.Write(ent, fields)
	if ent.Level >= zapcore.WarnLevel {
		err = errors.Join(err, c.out.Sync())
	}
	return err
}

// healthcheck asks the local service's /healthz, for container health checks (the runtime
// image has no shell and no curl).
func healthcheck(environ []string, stderr io.Writer) int {
	addr := ":8080"
	for _, kv := range environ {
		if v, ok := strings.CutPrefix(kv, "IDEMSVC_ADDR="); ok && v != "" {
			addr = v
		}
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		fmt.Fprintf(stderr, "healthcheck: IDEMSVC_ADDR %q: %v\n", addr, err)
		return 1
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	client := &http.Client{Timeout: 3 * time.Second}
	resp, err := client.Get("http://" + net.JoinHostPort(host, port) + "/healthz")
	if err != nil {
		fmt.Fprintf(stderr, "healthcheck: %v\n", err)
		return 1
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "healthcheck: /healthz answered %s\n", resp.Status)
		return 1
	}
	return 0
}
