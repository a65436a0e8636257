// Command idembench is a load generator for idemsvc that speaks its HTTP contract, and a no-op
// baseline server that answers the same routes with the same JSON sizes, so that the service can
// be measured against the HTTP ceiling of the machine it runs on.
//
// Usage:
//
//	idembench [flags]                      run a load (see -h)
//	idembench -serve-baseline ADDR         serve the no-op baseline until SIGINT or SIGTERM
//	idembench chart -in R.jsonl -out F.svg draw throughput and p99 against connections
//	idembench report -in R.jsonl ...       write the figures into docs/BENCHMARKS.md
//	idembench freeport                     print a free TCP port on 127.0.0.1
//	idembench wait -url U -timeout D       wait until U/healthz answers 200
//	idembench import-redis-benchmark       turn redis-benchmark --csv output into a result line
//	idembench import-gobench               turn the Redis store's go test -bench output into one
//
// Workers are closed loops: each owns one keep-alive connection and sends its next request when
// the previous answer is in. The default client writes and parses HTTP/1.1 by hand with no
// allocation per request, because on a small machine the generator competes with the server for
// CPU; -client std uses net/http instead. Latencies go to a per-worker log-linear histogram
// (under 0.8% error), merged at the end. Any status the scenario does not expect, or a transport
// error, stops the run and exits 1 with a sample of the body.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	code, err := dispatch(ctx, os.Args[1:], os.Stdout)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0) // -h: the flag package has printed the usage
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "idembench:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func dispatch(ctx context.Context, args []string, stdout io.Writer) (int, error) {
	if len(args) > 0 {
		switch args[0] {
		case "chart":
			return 0, chartMain(args[1:])
		case "report":
			return 0, reportMain(args[1:])
		case "freeport":
			return 0, freePort(stdout)
		case "wait":
			return 0, waitMain(ctx, args[1:])
		case "import-redis-benchmark":
			return 0, rbImportMain(args[1:], os.Stdin, stdout, os.Stderr)
		case "import-gobench":
			return 0, gobenchImportMain(args[1:], os.Stdin, stdout, os.Stderr)
		}
	}
	return loadMain(ctx, args, stdout)
}

func loadMain(ctx context.Context, args []string, stdout io.Writer) (int, error) {
	fs := flag.NewFlagSet("idembench", flag.ContinueOnError)
	rawURL := fs.String("url", "http://127.0.0.1:8080", "base URL of the server")
	token := fs.String("token", "", "bearer token (none: the server runs open)")
	scenario := fs.String("scenario", "pair", "pair | replay | contend | mixed")
	conns := fs.Int("c", 64, "connections: closed-loop workers, one keep-alive connection each")
	duration := fs.Duration("d", 10*time.Second, "measured duration (required, > 0: every run ends)")
	warmup := fs.Duration("warmup", time.Second, "load before measuring, not recorded")
	maxReqs := fs.Int64("n", 0, "stop after this many requests, warmup included (0: no limit but -d)")
	keys := fs.Int("keys", 8, "contend and mixed: number of contended keys")
	preload := fs.Int("preload", 10000, "replay and mixed: completed keys created before the run")
	bodyBytes := fs.Int("body-bytes", 200, "size of the stored response body")
	ttl := fs.Duration("ttl", 10*time.Minute, "ttl_ms sent with begin (records expire by themselves)")
	timeout := fs.Duration("timeout", 10*time.Second, "per-request timeout")
	clientKind := fs.String("client", "raw", "raw (hand-written HTTP/1.1, low overhead) | std (net/http)")
	jsonOut := fs.Bool("json", false, "print the result as one JSON line (and a one-line summary on stderr)")
	keyPrefix := fs.String("key-prefix", "ib", "start of every key's unique part (keys are KIND-PREFIX<random>-...)")
	serverPID := fs.Int("server-pid", 0, "PID of the server, to report its CPU time per request (Linux /proc)")
	redisAddr := fs.String("redis-addr", "", "host:port of a Redis to report its CPU time per request (INFO cpu)")
	label := fs.String("label", "", "label carried into the JSON result (e.g. bolt, redis, baseline)")
	serve := fs.String("serve-baseline", "", "serve the no-op baseline on this address instead of loading")
	if err := fs.Parse(args); err != nil {
		return 2, err
	}
	if fs.NArg() > 0 {
		return 2, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if *serve != "" {
		return 0, serveBaseline(ctx, *serve, *bodyBytes)
	}
	u, err := url.Parse(*rawURL)
	if err != nil || u.Host == "" {
		return 2, fmt.Errorf("bad -url %q", *rawURL)
	}
	switch {
	case *duration <= 0:
		return 2, errors.New("-d must be > 0")
	case *conns < 1:
		return 2, errors.New("-c must be >= 1")
	case *keys < 1 || *preload < 1:
		return 2, errors.New("-keys and -preload must be >= 1")
	case *bodyBytes < 0:
		return 2, errors.New("-body-bytes must be >= 0")
	case strings.Trim(*keyPrefix, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.") != "" || len(*keyPrefix) > 64:
		return 2, errors.New("-key-prefix must be at most 64 letters, digits, '_' or '.'")
	}
	cfg := config{
		url: u, token: *token, scenario: *scenario, conns: *conns, duration: *duration,
		warmup: *warmup, maxReqs: *maxReqs, keys: *keys, preload: *preload, bodyBytes: *bodyBytes,
		ttlMS: ttl.Milliseconds(), timeout: *timeout, clientKind: *clientKind, label: *label, keyPrefix: *keyPrefix,
		serverPID: *serverPID, redisAddr: *redisAddr,
	}
	res, err := load(cfg)
	if err != nil {
		return 1, err
	}
	res.Args = append([]string{"idembench"}, args...)
	if *jsonOut {
		b, _ := json.Marshal(res)
		fmt.Fprintf(stdout, "%s\n", b)
		fmt.Fprintf(os.Stderr, "  %-8s %-7s c=%-3d %9.0f req/s %9.0f pairs/s  p50 %s  p99 %s  p99.9 %s\n", res.Label, res.Scenario,
			res.Conns, res.RPS, res.PairsPerSec, ms(res.Latency.P50US), ms(res.Latency.P99US), ms(res.Latency.P999US))
	} else {
		printResult(stdout, res)
	}
	if res.Failed {
		return 1, errors.New(res.Failure)
	}
	return 0, nil
}

func ms(usec float64) string {
	switch {
	case usec >= 1e6:
		return fmt.Sprintf("%.2fs", usec/1e6)
	case usec >= 1e3:
		return fmt.Sprintf("%.2fms", usec/1e3)
	}
	return fmt.Sprintf("%.0fµs", usec)
}

func printResult(w io.Writer, r *result) {
	fmt.Fprintf(w, "scenario %s  c=%d  %.1fs measured  client=%s  %s\n", r.Scenario, r.Conns, r.Seconds, r.Client, r.URL)
	fmt.Fprintf(w, "requests  %10d  %10.0f/s\n", r.Requests, r.RPS)
	if r.Pairs > 0 {
		fmt.Fprintf(w, "pairs     %10d  %10.0f/s\n", r.Pairs, r.PairsPerSec)
	}
	if r.Replays > 0 {
		fmt.Fprintf(w, "replays   %10d  %10.0f/s\n", r.Replays, float64(r.Replays)/r.Seconds)
	}
	if c := r.CPU; c.ServerSec > 0 || c.GenSec > 0 {
		fmt.Fprintf(w, "cpu       generator %.1fµs/req", c.GenUSPerReq)
		if c.ServerSec > 0 {
			fmt.Fprintf(w, "  server %.1fµs/req", c.ServerUSPerReq)
		}
		if c.RedisSec > 0 {
			fmt.Fprintf(w, "  redis %.1fµs/req", c.RedisUSPerReq)
		}
		for i, b := range c.CoreBusy {
			fmt.Fprintf(w, "  core%d %.0f%% busy", i, b*100)
		}
		fmt.Fprintln(w)
	}
	if c := r.Commits; c != nil && c.WAL {
		waiting := ""
		if c.Gather {
			waiting = fmt.Sprintf("; waiting for more writes %.0f%% of the time", c.GatherFrac*100)
		}
		fmt.Fprintf(w, "commits   %.0f: %.1f writes, %.2f ms each (%.2f ms writing and syncing the log); committing %.0f%% of the time%s; checkpoints %.1f/s, %.1f ms each, %.2f pages per write\n",
			c.Commits, c.CallsPerCommit, c.CommitMS, c.WriteMS, c.CommitsBusyFrac*100, waiting, c.CheckpointsPerSec, c.CheckpointMS, c.PagesPerCommit/max(c.CallsPerCommit, 1e-9))
	} else if c != nil {
		fmt.Fprintf(w, "commits   %.0f: %.1f writes, %.1f pages, %.2f ms each (%.2f ms writing and syncing); committing %.0f%% of the time\n",
			c.Commits, c.CallsPerCommit, c.PagesPerCommit, c.CommitMS, c.WriteMS, c.CommitsBusyFrac*100)
	}
	l := r.Latency
	fmt.Fprintf(w, "latency   p50 %s  p90 %s  p99 %s  p99.9 %s  max %s  mean %s\n",
		ms(l.P50US), ms(l.P90US), ms(l.P99US), ms(l.P999US), ms(l.MaxUS), ms(l.MeanUS))
	for _, op := range opNames {
		if l, ok := r.PerOp[op]; ok {
			fmt.Fprintf(w, "  %-8s p50 %s  p99 %s  p99.9 %s\n", op, ms(l.P50US), ms(l.P99US), ms(l.P999US))
		}
	}
	names := make([]string, 0, len(r.Statuses))
	for k := range r.Statuses {
		names = append(names, k)
	}
	sort.Strings(names)
	var parts []string
	for _, k := range names {
		parts = append(parts, fmt.Sprintf("%s: %d", k, r.Statuses[k]))
	}
	fmt.Fprintf(w, "statuses  %s\n", strings.Join(parts, ", "))
	if r.Errors > 0 {
		fmt.Fprintf(w, "transport errors  %d\n", r.Errors)
	}
	if r.Failed {
		fmt.Fprintf(w, "FAILED: %s\n", r.Failure)
	}
}

// freePort prints a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(w io.Writer) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	_, err = fmt.Fprintln(w, ln.Addr().(*net.TCPAddr).Port)
	return err
}

// waitMain waits until -url's /healthz answers 200, or fails after -timeout.
func waitMain(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("wait", flag.ContinueOnError)
	rawURL := fs.String("url", "http://127.0.0.1:8080", "base URL of the server")
	path := fs.String("path", "/healthz", "path that must answer 200")
	timeout := fs.Duration("timeout", 15*time.Second, "how long to wait")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	hc := &http.Client{Timeout: time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", strings.TrimRight(*rawURL, "/")+*path, nil)
		if res, err := hc.Do(req); err == nil {
			res.Body.Close()
			if res.StatusCode == 200 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s%s did not answer 200 within %s", *rawURL, *path, *timeout)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
