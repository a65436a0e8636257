// Package redistest gives tests a real Redis: the URL to use (skipping when none answers,
// failing instead when IDEMSVC_TEST_REQUIRE_BACKENDS=1), a fresh key prefix whose keys are
// removed when the test ends, and redis-servers of a test's own to stop and restart.
//
// It does not import the redis backend, so that the backend's own tests can use it too.
package redistest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/idemsvc/idemsvc/internal/keys"
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
	c, err := client(url)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Do(ctx, c.B().Ping().Build()).Error()
}

func client(url string) (rueidis.Client, error) {
	opt, err := rueidis.ParseURL(url)
	if err != nil {
		return nil, err
	}
	opt.DisableCache = true
	return rueidis.NewClient(opt)
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

// scrub deletes every key under prefix: on every node (SCAN answers for one node only, and on
// Redis Cluster the keys are spread over the masters), one key per UNLINK, pipelined (keys under
// a prefix hash to many slots, and a multi-key command must stay in one).
func scrub(t testing.TB, url, prefix string) {
	c, err := client(url)
	if err != nil {
		t.Errorf("scrub %s: %v", prefix, err)
		return
	}
	defer c.Close()
	ctx := context.Background()
	for _, n := range c.Nodes() {
		var cursor uint64
		for {
			e, err := n.Do(ctx, n.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
			if err != nil {
				t.Errorf("scrub %s: %v", prefix, err)
				return
			}
			cmds := make(rueidis.Commands, 0, len(e.Elements))
			for _, k := range e.Elements {
				cmds = append(cmds, c.B().Unlink().Key(k).Build())
			}
			for _, r := range c.DoMulti(ctx, cmds...) {
				if err := r.Error(); err != nil {
					t.Errorf("scrub %s: %v", prefix, err)
					return
				}
			}
			if cursor = e.Cursor; cursor == 0 {
				break
			}
		}
	}
}

// FreePort returns a TCP port on 127.0.0.1 that nothing listens on (at the time of the call).
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Server is a redis-server that a test started on a free port, to stop, freeze and restart at
// will; the shared Redis is never touched.
type Server struct {
	t    testing.TB
	port int
	args []string
	cmd  *exec.Cmd
	// conf is the configuration file of a Sentinel (StartSentinel); "" for a redis-server.
	conf string
}

// StartServer starts a redis-server (no persistence, plus args) on a free 127.0.0.1 port and
// kills it when the test ends. It skips when redis-server is not installed, or fails when
// IDEMSVC_TEST_REQUIRE_BACKENDS=1.
func StartServer(t testing.TB, args ...string) *Server {
	t.Helper()
	return startServer(t, "", args)
}

// StartSentinel starts a Redis Sentinel (redis-server --sentinel) on a free 127.0.0.1 port,
// with conf (sentinel monitor, ...) as its configuration file, written into a directory of its
// own (Sentinel rewrites its file), and kills it when the test ends. It skips as StartServer
// does.
func StartSentinel(t testing.TB, conf string) *Server {
	t.Helper()
	dir := t.TempDir()
	path := dir + "/sentinel.conf"
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return startServer(t, path, []string{"--dir", dir})
}

func startServer(t testing.TB, conf string, args []string) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		msg := "redis-server is not installed: this test needs a server of its own"
		if os.Getenv("IDEMSVC_TEST_REQUIRE_BACKENDS") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	if conf == "" {
		// A directory of its own: Redis loads dump.rdb from its directory at start, even with
		// --save '', so a file left in the package's directory by a test that saved (SAVE, DEBUG
		// RELOAD) made every later server start loading it.
		args = append([]string{"--dir", t.TempDir()}, args...)
	}
	s := &Server{t: t, port: FreePort(t), args: args, conf: conf}
	t.Cleanup(s.Stop)
	for range 5 {
		if s.start() {
			return s
		}
		// Another test's server took the port between FreePort and the bind.
		s.Stop()
		s.port = FreePort(t)
	}
	t.Fatal("redis-server found its port taken five times")
	return nil
}

// Port is the server's port.
func (s *Server) Port() int { return s.port }

// URL is the server's redis:// URL.
func (s *Server) URL() string { return fmt.Sprintf("redis://127.0.0.1:%d/0", s.port) }

// Start (re)starts the server on its port and waits until it accepts connections.
func (s *Server) Start() {
	s.t.Helper()
	if !s.start() {
		s.t.Fatalf("port %d is another redis-server's", s.port)
	}
}

// start starts the server and waits until it accepts connections; it returns false when the
// server that answers on its port is another one (FreePort only says the port was free when it
// asked: a test that ran in parallel got the same port, and its LOADING reached this test).
func (s *Server) start() bool {
	s.t.Helper()
	args := append([]string{"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"}, s.args...)
	if s.conf != "" { // a Sentinel: the file first, and no persistence options
		args = append([]string{s.conf, "--sentinel", "--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
			"--daemonize", "no", "--loglevel", "warning"}, s.args...)
	}
	s.cmd = exec.Command("redis-server", args...)
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", s.port), 100*time.Millisecond)
		if err == nil {
			pid := serverPID(c)
			_ = c.Close()
			return pid == s.cmd.Process.Pid || pid < 0
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("redis-server on port %d did not start: %v", s.port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// serverPID asks the Redis on c for its process id (INFO server, which Redis answers even while
// it loads), or returns 0, or -1 when the server answers an error (it wants a password first).
func serverPID(c net.Conn) int {
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")); err != nil {
		return 0
	}
	rd := bufio.NewReader(c)
	head, err := rd.ReadString('\n')
	if err == nil && strings.HasPrefix(head, "-") {
		return -1 // an error reply (a password first, with --requirepass): it cannot tell
	}
	if err != nil || len(head) < 2 || head[0] != '$' {
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSpace(head[1:]))
	if err != nil || n < 0 {
		return 0
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(rd, body); err != nil {
		return 0
	}
	for line := range strings.Lines(string(body)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "process_id:"); ok {
			pid, _ := strconv.Atoi(v)
			return pid
		}
	}
	return 0
}

// Stop kills the server (SIGKILL: its data is gone, as in a crash without persistence). It is
// safe to call on a stopped or frozen server.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGCONT) // in case it is frozen
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}

// UserURL is the server's redis:// URL for an ACL user.
func (s *Server) UserURL(user, password string) string {
	return fmt.Sprintf("redis://%s:%s@127.0.0.1:%d/0", user, password, s.port)
}

// Do runs a command on the server as its default user (CONFIG SET, ACL SETUSER, SCRIPT FLUSH,
// ...) and fails the test when Redis refuses it.
func (s *Server) Do(args ...string) {
	s.t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{
		InitAddress: []string{fmt.Sprintf("127.0.0.1:%d", s.port)}, DisableCache: true,
	})
	if err != nil {
		s.t.Fatal(err)
	}
	defer c.Close()
	// A minute: DEBUG POPULATE of 3M keys took over 5 s under make test's load (-race).
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.Do(ctx, c.B().Arbitrary(args...).Build()).Error(); err != nil {
		s.t.Fatalf("%v: %v", args, err)
	}
}

// Signal sends sig to the server (SIGSTOP freezes it, SIGCONT thaws it).
func (s *Server) Signal(sig syscall.Signal) {
	s.t.Helper()
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatal(err)
	}
}
