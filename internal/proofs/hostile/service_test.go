package hostile

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// binary is the idemsvc binary that TestMain builds once for the package.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "idemsvc-hostile-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "hostile:", err)
		os.Exit(1)
	}
	code := func() int {
		defer os.RemoveAll(dir)
		binary = filepath.Join(dir, "idemsvc")
		start := time.Now()
		cmd := exec.Command(goTool(), "build", "-o", binary, "github.com/idemsvc/idemsvc/cmd/idemsvc")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "hostile: go build ./cmd/idemsvc: %v\n%s", err, out)
			return 1
		}
		fmt.Fprintf(os.Stderr, "hostile: built cmd/idemsvc in %s\n", time.Since(start).Round(time.Millisecond))
		return m.Run()
	}()
	os.Exit(code)
}

// goTool returns the go command. go test puts its own GOROOT/bin first in the PATH of the
// test, so this is the toolchain that runs the tests.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(os.Getenv("GOROOT"), "bin", "go")
}

const (
	tenant = "alpha"
	token  = "hostile-token-of-alpha-0123"
)

// service is one running idemsvc process.
type service struct {
	t    *testing.T
	cmd  *exec.Cmd
	addr string // host:port
	url  string

	mu   sync.Mutex
	tail []string // the last lines of its log
	done chan struct{}
}

// startService runs the binary on 127.0.0.1:0 with a fresh data dir. Its environment is built
// from scratch: the binary refuses unknown IDEMSVC_* variables, such as the tests' own.
func startService(t *testing.T) *service {
	t.Helper()
	env := []string{
		"IDEMSVC_ADDR=127.0.0.1:0",
		"IDEMSVC_DATA_DIR=" + t.TempDir(),
		"IDEMSVC_TOKENS=" + tenant + ":" + token,
		"IDEMSVC_LOG_LEVEL=info", // the address is in the "listening" line
		"IDEMSVC_SHUTDOWN_TIMEOUT=5s",
	}
	cmd := exec.Command(binary)
	cmd.Env = env
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatalf("start idemsvc: %v", err)
	}
	s := &service{t: t, cmd: cmd, done: make(chan struct{})}
	addr := make(chan string, 1)
	go func() { // read the whole log, always, so the process never blocks on a full pipe
		defer close(s.done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			s.mu.Lock()
			if s.tail = append(s.tail, line); len(s.tail) > 50 {
				s.tail = s.tail[1:]
			}
			s.mu.Unlock()
			var entry struct{ Msg, Addr string }
			if json.Unmarshal([]byte(line), &entry) == nil && entry.Msg == "listening" {
				addr <- entry.Addr
			}
		}
	}()
	t.Cleanup(s.stop)
	select {
	case s.addr = <-addr:
	case <-s.done:
		t.Fatalf("idemsvc exited before listening:\n%s", s.logTail())
	case <-time.After(20 * time.Second):
		t.Fatalf("idemsvc did not listen within 20s:\n%s", s.logTail())
	}
	s.url = "http://" + s.addr
	return s
}

// stop sends SIGTERM and expects a clean exit (status 0) within the shutdown timeout.
func (s *service) stop() {
	if s.cmd.ProcessState != nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	exited := make(chan error, 1)
	go func() { <-s.done; exited <- s.cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			s.t.Errorf("idemsvc did not exit cleanly on SIGTERM: %v\n%s", err, s.logTail())
		}
	case <-time.After(15 * time.Second):
		_ = s.cmd.Process.Kill()
		<-exited
		s.t.Errorf("idemsvc did not exit within 15s of SIGTERM\n%s", s.logTail())
	}
}

func (s *service) logTail() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.tail, "\n")
}

// rssMiB and hwmMiB are the process's resident memory now and at its peak.
func (s *service) rssMiB() float64 { return s.status("VmRSS") }
func (s *service) hwmMiB() float64 { return s.status("VmHWM") }

func (s *service) status(field string) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		s.t.Fatalf("read /proc status: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	s.t.Fatalf("no %s in /proc status", field)
	return 0
}

// fds is the number of the process's open file descriptors.
func (s *service) fds() int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", s.cmd.Process.Pid))
	if err != nil {
		s.t.Fatalf("read /proc fd: %v", err)
	}
	return len(ents)
}

// waitFDs waits up to d for the process's descriptors to come down to at most n, and returns
// the last count.
func (s *service) waitFDs(n int, d time.Duration) int {
	deadline := time.Now().Add(d)
	for {
		got := s.fds()
		if got <= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// probe is a well-behaved client that keeps using the service while the abuse runs: begin,
// complete and replay on fresh keys, one after another, and remembers the slowest answer.
type probe struct {
	calls, failures int
	slowest         time.Duration
	firstFailure    string
}

// runProbe runs the probe until ctx ends.
func runProbe(ctx context.Context, s *service, name string) *probe {
	p := &probe{}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	call := func(path, body string, want int) ([]byte, bool) {
		req, _ := http.NewRequest("POST", s.url+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		start := time.Now()
		resp, err := client.Do(req)
		var status int
		var got []byte
		if err == nil {
			got, err = io.ReadAll(resp.Body)
			resp.Body.Close()
			status = resp.StatusCode
		}
		p.calls++
		p.slowest = max(p.slowest, time.Since(start))
		if err != nil || status != want {
			p.failures++
			if p.firstFailure == "" {
				p.firstFailure = fmt.Sprintf("POST %s: %d %v %s", path, status, err, got)
			}
			return nil, false
		}
		return got, true
	}
	for i := 0; ctx.Err() == nil; i++ {
		key := fmt.Sprintf("/v1/keys/probe-%s-%d/", name, i)
		got, ok := call(key+"begin", `{}`, 201)
		var rec struct{ Lease struct{ Token string } }
		if !ok || json.Unmarshal(got, &rec) != nil {
			continue
		}
		if _, ok := call(key+"complete", `{"token":"`+rec.Lease.Token+`","response":{"status":200,"body":"b2s="}}`, 200); ok {
			call(key+"begin", `{}`, 200) // the replay
		}
		select {
		case <-ctx.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
	return p
}

// check fails t unless the probe was served throughout, each call within bound.
func (p *probe) check(t *testing.T, bound time.Duration) {
	t.Helper()
	t.Logf("probe: %d calls, %d failures, slowest %s", p.calls, p.failures, p.slowest.Round(time.Millisecond))
	if p.calls < 5 {
		t.Errorf("the probe made only %d calls while the abuse ran", p.calls)
	}
	if p.failures > 0 {
		t.Errorf("the probe failed %d times; first: %s", p.failures, p.firstFailure)
	}
	if p.slowest > bound {
		t.Errorf("the probe's slowest call took %s, more than %s", p.slowest, bound)
	}
}

// withProbe runs abuse while a probe uses the service, and returns the probe's record.
func withProbe(s *service, name string, abuse func()) *probe {
	ctx, cancel := context.WithCancel(context.Background())
	res := make(chan *probe, 1)
	go func() { res <- runProbe(ctx, s, name) }()
	start := time.Now()
	abuse()
	time.Sleep(time.Second - time.Since(start)) // at least a second of probing
	cancel()
	return <-res
}

// readStatusLine reads the first line of an HTTP response from r.
func readStatusLine(r io.Reader) (string, error) {
	line, err := bufio.NewReader(r).ReadString('\n')
	return strings.TrimSpace(line), err
}
