package main

import (
	"bufio"
	"bytes"
	"os"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// lockedBuffer is what the logger's output reached, as a process killed at once would leave it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) Sync() error { return nil }

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestWarningsReachTheOutputAtOnce: a warning or an error is written out when it is logged,
// with the buffered lines before it (access lines, info), so that a process killed right after a
// problem keeps the line that says what it was; info lines alone stay buffered (about a second).
func TestWarningsReachTheOutputAtOnce(t *testing.T) {
	var out lockedBuffer
	logger, logOut, err := newLogger("info", &out)
	if err != nil {
		t.Fatal(err)
	}
	defer logger.Sync()
	_, _ = logOut.Write([]byte(`{"msg":"an access line"}` + "\n"))
	logger.Info("an info line")
	if got := out.String(); got != "" {
		t.Errorf("info lines were written at once (no buffer): %q", got)
	}
	logger.With(zapcore.Field{Key: "k", Type: zapcore.StringType, String: "v"}).Warn("a warning")
	got := out.String()
	for _, want := range []string{"an access line", "an info line", "a warning"} {
		if !strings.Contains(got, want) {
			t.Errorf("after a warning, the output lacks %q: %q", want, got)
		}
	}
	logger.Error("an error")
	if !strings.Contains(out.String(), "an error") {
		t.Errorf("an error was not written at once: %q", out.String())
	}
}

// TestLogToPipe: a warning to a pipe (stderr under a container runtime or systemd) is written
// without error. Flushing it used to fsync the pipe, which fails with EINVAL, and zap printed
// "write error: sync /dev/stderr: invalid argument", a line that is not JSON, after every warning.
func TestLogToPipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	logger, _, err := newLogger("info", w)
	if err != nil {
		t.Fatal(err)
	}
	if err := logger.Core().Write(zapcore.Entry{Level: zapcore.WarnLevel, Message: "to a pipe"}, nil); err != nil {
		t.Errorf("a warning to a pipe: %v", err)
	}
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil || !strings.Contains(line, `"msg":"to a pipe"`) {
		t.Errorf("the pipe got %q, %v; want the warning's JSON line", line, err)
	}
}

// TestWarnSingleP: a single P on the bbolt backend (GOMAXPROCS=1 in the environment) is warned
// of at start; two Ps, or the Redis backend, are not.
func TestWarnSingleP(t *testing.T) {
	for _, c := range []struct {
		procs   int
		backend string
		warn    bool
	}{{1, "bolt", true}, {2, "bolt", false}, {1, "redis", false}, {4, "bolt", false}} {
		core, logs := observer.New(zapcore.WarnLevel)
		warnSingleP(zap.New(core), c.procs, c.backend)
		if got := logs.FilterMessageSnippet("GOMAXPROCS=1").Len(); got != map[bool]int{true: 1, false: 0}[c.warn] {
			t.Errorf("%d P, %s: %d warnings, want warn=%v: %v", c.procs, c.backend, got, c.warn, logs.All())
		}
	}
}
