package server

import (
	"bytes"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// zapAccessLine is what zap writes for e at t, as the server's logger would through zap.
func zapAccessLine(t *testing.T, at time.Time, e *accessEntry) []byte {
	t.Helper()
	enc := zapcore.NewJSONEncoder(LogEncoderConfig())
	zap.String("component", "http").AddTo(enc) // what Logger.With does
	buf, err := enc.EncodeEntry(zapcore.Entry{Level: zapcore.InfoLevel, Time: at, Message: "request"}, []zapcore.Field{
		zap.String("method", e.method),
		zap.String("route", e.route),
		zap.Int("status", e.status),
		zap.Duration("duration", e.duration),
		zap.String("tenant", e.tenant),
		zap.String("key", e.key),
		zap.String("request_id", e.requestID),
		zap.String("problem", e.problem),
		zap.String("outcome", e.outcome),
		zap.String("remote", e.remote),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Free()
	return bytes.Clone(buf.Bytes())
}

// FuzzAccessLine holds appendAccessLine to zap's JSON encoder: the same bytes for any fields
// and time, escapes and invalid UTF-8 included.
//
//	go test -run '^$' -fuzz FuzzAccessLine ./internal/server/
func FuzzAccessLine(f *testing.F) {
	f.Add("POST", "/v1/keys/{key}/begin", 201, int64(1234567), "acme", "order-7", "rid-1", "", "acquired", int64(1767323045123456789), 0, "127.0.0.1:50354")
	f.Add("GET", "unmatched", 404, int64(0), "", `a"b\c`, "", "not-found", "", int64(0), 3600, "[::1]:8080")
	f.Add("BREW", "/x", 599, int64(1<<62), "t\x00\x1f\x7f", "\n\r\t\b\f", "<>&\u2028\u2029", "\xff\xfe", "é😀\xed\xa0\x80", int64(-1), -7200, "")
	f.Add("", "", -1, int64(-5), "\xc3", "\xe2\x82", "a\xf0\x9f\x98", "\u00e9\x80", "\"\\/", int64(1e18), 19800, "@\x00")
	f.Fuzz(func(t *testing.T, method, route string, status int, d int64, tenant, key, rid, problem, outcome string, nanos int64, offset int, remote string) {
		at := time.Unix(0, nanos).In(time.FixedZone("z", offset%86400))
		e := &accessEntry{method: method, route: route, status: status, duration: time.Duration(d),
			tenant: tenant, key: key, requestID: rid, problem: problem, outcome: outcome, remote: remote}
		got := appendAccessLine(nil, at, e)
		if want := zapAccessLine(t, at, e); !bytes.Equal(got, want) {
			t.Fatalf("access line differs from zap's:\n got %s\nwant %s", got, want)
		}
	})
}

// BenchmarkAccessLine compares the access line through zap with appendAccessLine.
//
//	go test -run '^$' -bench AccessLine -benchmem ./internal/server/
func BenchmarkAccessLine(b *testing.B) {
	e := &accessEntry{method: "POST", route: "/v1/keys/{key}/begin", status: 200, duration: 1234567,
		tenant: "bench", key: "R-abc123-1s-2k", requestID: "7f3a9c2e4b1d6a8f0c5e3b7a9d2f4c6e", outcome: "replayed", remote: "127.0.0.1:50354"}
	b.Run("zap", func(b *testing.B) {
		logger := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(LogEncoderConfig()), zapcore.AddSync(discard{}), zapcore.InfoLevel)).
			With(zap.String("component", "http"))
		b.ReportAllocs()
		for b.Loop() {
			if ce := logger.Check(zapcore.InfoLevel, "request"); ce != nil {
				ce.Write(zap.String("method", e.method), zap.String("route", e.route), zap.Int("status", e.status),
					zap.Duration("duration", e.duration), zap.String("tenant", e.tenant), zap.String("key", e.key),
					zap.String("request_id", e.requestID), zap.String("problem", e.problem), zap.String("outcome", e.outcome), zap.String("remote", e.remote))
			}
		}
	})
	b.Run("direct", func(b *testing.B) {
		s := &Server{accessOut: zapcore.AddSync(discard{})}
		b.ReportAllocs()
		for b.Loop() {
			s.writeAccessLine(time.Now(), e)
		}
	})
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
