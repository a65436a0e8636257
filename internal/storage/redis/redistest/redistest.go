// Package redistest gives tests outside the redis package a real Redis: the URL to use (skipping
// when none answers, failing instead when IDEMSVC_TEST_REQUIRE_BACKENDS=1) and stores on a fresh
// key prefix whose keys are removed when the test ends.
package redistest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis"
)

// URL returns the Redis the tests use: IDEMSVC_TEST_REDIS_URL, or redis://127.0.0.1:6379/0.
// When it does not answer the test is skipped, or fails when IDEMSVC_TEST_REQUIRE_BACKENDS=1.
func URL(t testing.TB) string {
	t.Helper()
	url := os.Getenv("IDEMSVC_TEST_REDIS_URL")
	if url == "" {
		url = "redis://127.0.0.1:6379/0"
	}
	reachable.once.Do(func() { reachable.err = ping(url) })
	if reachable.err != nil {
		msg := "no Redis answers at " + url + " (set IDEMSVC_TEST_REDIS_URL, or run redis-server): " + reachable.err.Error()
		if os.Getenv("IDEMSVC_TEST_REQUIRE_BACKENDS") == "1" {
			t.Fatal(msg + "; IDEMSVC_TEST_REQUIRE_BACKENDS=1 requires it")
		}
		t.Skip(msg)
	}
	return url
}

var reachable struct {
	once sync.Once
	err  error
}

func ping(url string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := redis.Open(ctx, url, redis.Options{Prefix: "idemtest-ping", Timeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer s.Close()
	return s.Ping(ctx)
}

// Prefix returns a fresh key prefix; every key under it (and under any prefix that extends it,
// such as prefix+"-1") is removed when the test ends.
func Prefix(t testing.TB) string {
	t.Helper()
	url := URL(t)
	prefix := "idemtest-" + keys.NewToken()
	t.Cleanup(func() { scrub(t, url, prefix) })
	return prefix
}

// Open opens a store on the test Redis and closes it when the test ends. opts.Prefix must be
// set (use Prefix; several stores on one prefix act as replicas of one service).
func Open(t testing.TB, opts redis.Options) *redis.Store {
	t.Helper()
	if opts.Prefix == "" {
		t.Fatal("redistest.Open: opts.Prefix is empty; use redistest.Prefix(t)")
	}
	s, err := redis.Open(context.Background(), URL(t), opts)
	if err != nil {
		t.Fatalf("redis.Open: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// scrub deletes every key under prefix.
func scrub(t testing.TB, url, prefix string) {
	opt, err := rueidis.ParseURL(url)
	if err != nil {
		t.Error(err)
		return
	}
	c, err := rueidis.NewClient(opt)
	if err != nil {
		t.Errorf("scrub %s: %v", prefix, err)
		return
	}
	defer c.Close()
	ctx := context.Background()
	var cursor uint64
	for {
		e, err := c.Do(ctx, c.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
		if err != nil {
			t.Errorf("scrub %s: %v", prefix, err)
			return
		}
		if len(e.Elements) > 0 {
			if err := c.Do(ctx, c.B().Unlink().Key(e.Elements...).Build()).Error(); err != nil {
				t.Errorf("scrub %s: %v", prefix, err)
				return
			}
		}
		if cursor = e.Cursor; cursor == 0 {
			return
		}
	}
}

// Server is a redis-server that a test started on a free port, to stop and restart at will; the
// shared Redis is never touched.
type Server struct {
	t    testing.TB
	port int
	cmd  *exec.Cmd
}

// StartServer starts a redis-server (no persistence) on a free 127.0.0.1 port and kills it when
// the test ends. It skips when redis-server is not installed, or fails when
// IDEMSVC_TEST_REQUIRE_BACKENDS=1.
func StartServer(t testing.TB) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		msg := "redis-server is not installed: this test needs a server of its own"
		if os.Getenv("IDEMSVC_TEST_REQUIRE_BACKENDS") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, port: l.Addr().(*net.TCPAddr).Port}
	_ = l.Close()
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

// URL is the server's redis:// URL.
func (s *Server) URL() string { return fmt.Sprintf("redis://127.0.0.1:%d/0", s.port) }

// Start (re)starts the server on its port and waits until it accepts connections.
func (s *Server) Start() {
	s.t.Helper()
	s.cmd = exec.Command("redis-server", "--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning")
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", s.port), 100*time.Millisecond)
		if err == nil {
			_ = c.Close()
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("redis-server on port %d did not start: %v", s.port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop kills the server (SIGKILL: its data is gone, as in a crash without persistence).
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}
