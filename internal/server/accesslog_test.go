package server_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/idemsvc/idemsvc/internal/server"
	"github.com/idemsvc/idemsvc/internal/server/servertest"
)

// syncBuffer is a WriteSyncer over a buffer, safe for the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Sync() error { return nil }

func (s *syncBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(s.b.Bytes()))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("log line is not JSON: %v: %s", err, sc.Bytes())
		}
		out = append(out, m)
	}
	return out
}

// TestAccessLogDirect: with Options.AccessLog (as cmd/idemsvc runs), each request writes one
// access line to the logger's output, with the same fields as through zap, and none when the
// logger is above info.
func TestAccessLogDirect(t *testing.T) {
	t.Parallel()
	for _, level := range []zapcore.Level{zapcore.InfoLevel, zapcore.WarnLevel} {
		t.Run(level.String(), func(t *testing.T) {
			t.Parallel()
			out := &syncBuffer{}
			logger := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(server.LogEncoderConfig()), out, level))
			e := newEnv(t, servertest.Options{
				Tokens: map[string]string{"acme": "token-0123456789abcdef"},
				Logger: logger, AccessLog: out,
			})
			e.token = "token-0123456789abcdef"
			wantStatus(t, e.do("POST", `/v1/keys/a%22b%5Cc/begin`, nil, "X-Request-Id", `rid-"1"`), 201, "")
			wantStatus(t, e.do("POST", `/v1/keys/a%22b%5Cc/begin`, nil), 409, "in-progress")
			var access []map[string]any
			for _, l := range out.lines(t) {
				if l["msg"] == "request" {
					access = append(access, l)
				}
			}
			if level > zapcore.InfoLevel {
				if len(access) != 0 {
					t.Fatalf("logger at %s wrote access lines: %v", level, access)
				}
				return
			}
			if len(access) != 2 {
				t.Fatalf("%d access lines for two requests: %v", len(access), access)
			}
			for k, want := range map[string]any{
				"level": "info", "component": "http", "method": "POST", "route": "/v1/keys/{key}/begin",
				"status": float64(201), "tenant": "acme", "key": `a"b\c`, "request_id": `rid-"1"`,
				"outcome": "acquired", "problem": "",
			} {
				if got := access[0][k]; got != want {
					t.Errorf("first access line %s = %v (%T), want %v", k, got, got, want)
				}
			}
			if got := access[1]["problem"]; got != "in-progress" {
				t.Errorf("second access line problem = %v, want in-progress", got)
			}
			if remote, _ := access[0]["remote"].(string); !strings.HasPrefix(remote, "127.0.0.1:") {
				t.Errorf("remote = %q, want the client's address", remote)
			}
			if d, ok := access[0]["duration"].(float64); !ok || d <= 0 {
				t.Errorf("duration = %v", access[0]["duration"])
			}
			if _, ok := access[0]["time"].(string); !ok {
				t.Errorf("time = %v", access[0]["time"])
			}
		})
	}
}

// TestAccessLogLongMethod: a made-up method (any token is one to net/http) is cut in the access
// line, so that a request cannot make the log grow by more than a bounded line.
func TestAccessLogLongMethod(t *testing.T) {
	t.Parallel()
	out := &syncBuffer{}
	logger := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(server.LogEncoderConfig()), out, zapcore.InfoLevel))
	e := newEnv(t, servertest.Options{Logger: logger, AccessLog: out})
	long := strings.Repeat("A", 60<<10)
	e.do(long, "/healthz", nil)
	for _, l := range out.lines(t) {
		if l["msg"] != "request" {
			continue
		}
		if m, _ := l["method"].(string); m != strings.Repeat("A", 32)+"..." {
			t.Errorf("access line method = %.40q (%d bytes), want it cut to 32 bytes", m, len(m))
		}
		return
	}
	t.Fatal("no access line")
}
