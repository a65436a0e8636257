package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// serveCapped serves h on 127.0.0.1 behind a connCap of n connections, with run's timeouts, and
// returns the cap and the address. The server is closed when the test ends.
func serveCapped(t *testing.T, n int, h http.Handler, logger *zap.Logger) (*connCap, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	capped := newConnCap(ln, n, logger)
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       60 * time.Second,
		ConnState:         capped.connState,
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(capped)
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-served
	})
	return capped, ln.Addr().String()
}

// rawConn is a client's keep-alive connection: it sends requests and reads their responses one
// at a time, and stays open until closed.
type rawConn struct {
	net.Conn
	br *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &rawConn{Conn: c, br: bufio.NewReader(c)}
}

func (c *rawConn) send(path string) error {
	_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: idemsvc\r\n\r\n")
	return err
}

// read reads a response within d, and returns its status and body.
func (c *rawConn) read(d time.Duration) (int, string, error) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func (c *rawConn) get(path string, d time.Duration) (int, string, error) {
	if err := c.send(path); err != nil {
		return 0, "", err
	}
	return c.read(d)
}

// closedByServer reports whether the server closed c (the client reads EOF or a reset) within d.
func (c *rawConn) closedByServer(d time.Duration) bool {
	_ = c.SetReadDeadline(time.Now().Add(d))
	_, err := c.br.ReadByte()
	return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

func okHandler(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok "+r.URL.Path) }

// fillIdle opens n keep-alive connections, each served once (GET path) and then left open and
// idle. With l, it waits after each request until l has the connection in its idle list, so that
// the list's order is the connections' (a client reads its answer before net/http reports the
// connection idle, and under load the next connection could go idle first).
func fillIdle(t *testing.T, l *connCap, addr, path string, n int) []*rawConn {
	t.Helper()
	conns := make([]*rawConn, n)
	for i := range conns {
		conns[i] = dialRaw(t, addr)
		if st, _, err := conns[i].get(path, 5*time.Second); err != nil || st != 200 {
			t.Fatalf("connection %d: %d, %v", i+1, st, err)
		}
		if l != nil {
			waitIdle(t, l, i+1)
		}
	}
	return conns
}

// waitIdle waits until l's idle list holds n connections.
func waitIdle(t *testing.T, l *connCap, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		l.mu.Lock()
		got := 0
		for e := l.idle.next; e != &l.idle; e = e.next {
			got++
		}
		l.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections idle, want %d", got, n)
		}
	}
}

// TestConnCapClosesIdleForNew: with every slot held by an idle keep-alive connection, a new
// connection is served at once, and only the connection idle longest is closed for it.
func TestConnCapClosesIdleForNew(t *testing.T) {
	const limit = 4
	capped, addr := serveCapped(t, limit, http.HandlerFunc(okHandler), nil)
	conns := fillIdle(t, capped, addr, "/first", limit)
	// Make the first connection the most recently idle: the second is now the oldest.
	if st, _, err := conns[0].get("/again", 5*time.Second); err != nil || st != 200 {
		t.Fatalf("second request on connection 1: %d, %v", st, err)
	}
	waitIdle(t, capped, limit)

	start := time.Now()
	extra := dialRaw(t, addr)
	st, body, err := extra.get("/healthz", time.Second)
	if err != nil || st != 200 || body != "ok /healthz" {
		t.Fatalf("new connection while %d idle ones held every slot: %d %q, %v after %v; want 200 within 1s",
			limit, st, body, err, time.Since(start))
	}
	if !conns[1].closedByServer(time.Second) {
		t.Error("the connection idle longest is still open")
	}
	for _, i := range []int{0, 2, 3} {
		if st, _, err := conns[i].get("/still", 5*time.Second); err != nil || st != 200 {
			t.Errorf("connection %d, not the oldest idle one: %d, %v; want it still served", i+1, st, err)
		}
	}
}

// TestRunHealthzWithIdleConnsAtLimit: through run, as deployed, with IDEMSVC_MAX_CONNS=4 and four
// idle keep-alive connections held open, /healthz and /readyz still answer within a second.
func TestRunHealthzWithIdleConnsAtLimit(t *testing.T) {
	const limit = 4
	t.Setenv("IDEMSVC_MAX_CONNS", strconv.Itoa(limit))
	base := serveRun(t)
	addr := strings.TrimPrefix(base, "http://")
	fillIdle(t, nil, addr, "/healthz", limit)
	for _, path := range []string{"/healthz", "/readyz"} {
		start := time.Now()
		st, _, err := dialRaw(t, addr).get(path, time.Second)
		if err != nil || st != 200 {
			t.Fatalf("%s while %d idle connections were held: %d, %v after %v; want 200 within 1s",
				path, limit, st, err, time.Since(start))
		}
	}
}

// TestConnCapKeepsActive: with every slot held by a connection in the middle of a request, a new
// connection waits, and no request in progress is cut; when one of them ends (its client keeps
// the connection open), the new connection is served.
func TestConnCapKeepsActive(t *testing.T) {
	const limit = 2
	started := make(chan struct{}, limit)
	release := make(chan struct{})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			started <- struct{}{}
			<-release
		}
		okHandler(w, r)
	})
	capped, addr := serveCapped(t, limit, h, nil)
	slow := make([]*rawConn, limit)
	for i := range slow {
		slow[i] = dialRaw(t, addr)
		if err := slow[i].send("/slow"); err != nil {
			t.Fatal(err)
		}
	}
	for range limit {
		select {
		case <-started:
		case <-time.After(5 * time.Second):
			t.Fatal("the slow requests did not start")
		}
	}

	extra := dialRaw(t, addr)
	if st, body, err := extra.get("/fast", 500*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("new connection while %d requests were in progress: %d %q, %v; want no answer", limit, st, body, err)
	}
	if n := capped.idleClosed(); n != 0 {
		t.Fatalf("%d connections closed while all were active", n)
	}

	// One request ends: its connection goes idle and makes room for the new one.
	release <- struct{}{}
	st, body, err := extra.read(2 * time.Second)
	if err != nil || st != 200 || body != "ok /fast" {
		t.Fatalf("new connection after one request ended: %d %q, %v; want 200", st, body, err)
	}
	close(release)
	for i, c := range slow {
		if st, body, err := c.read(5 * time.Second); err != nil || st != 200 || body != "ok /slow" {
			t.Errorf("slow request %d: %d %q, %v; want it answered in full", i+1, st, body, err)
		}
	}
	if n := capped.idleClosed(); n != 1 {
		t.Errorf("%d connections closed, want 1 (the one whose request ended)", n)
	}
}

// TestConnCapMetricsAndWarning: the metrics follow the connections, and reaching the limit is
// logged at once and then at most every minute.
func TestConnCapMetricsAndWarning(t *testing.T) {
	const limit = 2
	core, logs := observer.New(zapcore.WarnLevel)
	var clockOffset atomic.Int64
	capped, addr := serveCapped(t, limit, http.HandlerFunc(okHandler), zap.New(core))
	capped.mu.Lock()
	capped.now = func() time.Time { return time.Now().Add(time.Duration(clockOffset.Load())) }
	capped.mu.Unlock()
	reg := prometheus.NewRegistry()
	reg.MustRegister(capped.collectors()...)
	metric := func(name string) float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name {
				m := mf.GetMetric()[0]
				if m.GetGauge() != nil {
					return m.GetGauge().GetValue()
				}
				return m.GetCounter().GetValue()
			}
		}
		t.Fatalf("no metric %s", name)
		return 0
	}
	want := func(name string, v float64) {
		t.Helper()
		// The gauge moves when net/http reports a close, just after the client sees it.
		deadline := time.Now().Add(2 * time.Second)
		for metric(name) != v && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if got := metric(name); got != v {
			t.Errorf("%s = %v, want %v", name, got, v)
		}
	}
	warnings := func() int {
		n := 0
		for _, e := range logs.All() {
			if strings.Contains(e.Message, "connection limit reached") {
				n++
			}
		}
		return n
	}

	want("idemsvc_connections_max", limit)
	want("idemsvc_connections_open", 0)
	conns := fillIdle(t, capped, addr, "/first", limit)
	newConn := func() *rawConn {
		c := dialRaw(t, addr)
		conns = append(conns, c)
		return c
	}
	want("idemsvc_connections_open", limit)
	want("idemsvc_connections_limit_reached_total", 0)
	want("idemsvc_connections_idle_closed_total", 0)
	if n := warnings(); n != 0 {
		t.Fatalf("%d warnings before the limit was reached", n)
	}

	// The limit is reached: an idle connection makes room, and a warning says so.
	if st, _, err := newConn().get("/new", time.Second); err != nil || st != 200 {
		t.Fatalf("new connection at the limit: %d, %v", st, err)
	}
	want("idemsvc_connections_open", limit)
	want("idemsvc_connections_limit_reached_total", 1)
	want("idemsvc_connections_idle_closed_total", 1)
	entries := logs.All()
	if len(entries) != 1 || entries[0].Level != zapcore.WarnLevel ||
		!strings.Contains(entries[0].Message, "IDEMSVC_MAX_CONNS") ||
		entries[0].ContextMap()["max_conns"] != int64(limit) ||
		entries[0].ContextMap()["variable"] != "IDEMSVC_MAX_CONNS" {
		t.Fatalf("logs after the limit was reached: %+v; want one warning naming IDEMSVC_MAX_CONNS and %d", entries, limit)
	}

	// Reached again within the minute: counted, not logged; after a minute, logged again.
	if st, _, err := newConn().get("/new", time.Second); err != nil || st != 200 {
		t.Fatalf("second new connection at the limit: %d, %v", st, err)
	}
	want("idemsvc_connections_limit_reached_total", 2)
	want("idemsvc_connections_idle_closed_total", 2)
	if n := warnings(); n != 1 {
		t.Errorf("%d warnings after the limit was reached twice within a minute, want 1", n)
	}
	clockOffset.Store(int64(capWarnEvery + time.Second))
	if st, _, err := newConn().get("/new", time.Second); err != nil || st != 200 {
		t.Fatalf("third new connection at the limit: %d, %v", st, err)
	}
	if n := warnings(); n != 2 {
		t.Errorf("%d warnings after the limit was reached again a minute later, want 2", n)
	}
	want("idemsvc_connections_idle_closed_total", 3)

	// Every client closes: the gauge and the tracked states go back to nothing.
	for _, c := range conns {
		_ = c.Close()
	}
	want("idemsvc_connections_open", 0)
	capped.mu.Lock()
	defer capped.mu.Unlock()
	if len(capped.conns) != 0 || capped.idle.next != &capped.idle || capped.ending != nil {
		t.Errorf("after every connection closed: %d tracked, idle list empty %v, one being ended %v",
			len(capped.conns), capped.idle.next == &capped.idle, capped.ending != nil)
	}
}

// idleClosed returns how many idle connections l ended to make room.
func (l *connCap) idleClosed() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.evicted
}

// BenchmarkConnStateActiveIdle measures the hook's hot path: one request's StateActive and
// StateIdle, on one of n idle connections (op = both transitions).
func BenchmarkConnStateActiveIdle(b *testing.B) {
	for _, n := range []int{1, 10000} {
		setup := func() (*connCap, []net.Conn) {
			l := newConnCap(nil, n, nil)
			conns := make([]net.Conn, n)
			for i := range conns {
				conns[i] = new(net.TCPConn) // the type net/http hands the hook
				l.connState(conns[i], http.StateNew)
				l.connState(conns[i], http.StateActive)
				l.connState(conns[i], http.StateIdle)
			}
			return l, conns
		}
		b.Run(fmt.Sprintf("conns=%d", n), func(b *testing.B) {
			l, conns := setup()
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				c := conns[i]
				l.connState(c, http.StateActive)
				l.connState(c, http.StateIdle)
				if i++; i == len(conns) {
					i = 0
				}
			}
		})
		b.Run(fmt.Sprintf("conns=%d/parallel", n), func(b *testing.B) {
			l, conns := setup()
			var next atomic.Int64
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				i := int(next.Add(1))
				for pb.Next() {
					c := conns[i%len(conns)]
					l.connState(c, http.StateActive)
					l.connState(c, http.StateIdle)
					i += 7
				}
			})
		})
	}
}

// TestConnCapNeverDropsARequestItRan: keep-alive clients send request after request while new
// connections keep arriving at the limit. Every request the handler ran must be answered: a
// request may be refused (its connection ended before it was read), never run and lost. A
// review found the first version of the idle closing losing thousands in 8 s, begins that took
// their lease while their caller got no answer: it closed the connection idle the longest,
// which under load was a busy client's whose next request net/http had read but not yet
// reported active.
//   - busy: clients that send again at once are never cut off at all (the old code left 6,454
//     of 256,774 requests unanswered, 4,024 of them run);
//   - pausing: clients that pause about minIdleToEvict between requests are ended around the
//     time they send, and what they sent is then either refused or answered. (The microseconds in
//     which Close, instead of the past read deadline, would still lose a request are more than
//     this test can hit: it passes with Close too. It holds the ending path to the property.)
func TestConnCapNeverDropsARequestItRan(t *testing.T) {
	for _, tc := range []struct {
		name  string
		pause func(*rand.Rand) time.Duration
	}{
		{"busy", func(*rand.Rand) time.Duration { return 0 }},
		{"pausing", func(rng *rand.Rand) time.Duration {
			return minIdleToEvict - 10*time.Millisecond + time.Duration(rng.IntN(40))*time.Millisecond
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ran sync.Map // request id -> true
			h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				ran.Store(r.URL.Query().Get("id"), true)
				_, _ = io.WriteString(w, "ok")
			})
			capped, addr := serveCapped(t, 8, h, nil)
			var sent, unanswered, ranUnanswered atomic.Int64
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for c := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(c), 7))
					for n := 0; ; {
						conn, err := net.Dial("tcp", addr)
						if err != nil {
							return
						}
						br := bufio.NewReader(conn)
						for {
							select {
							case <-stop:
								conn.Close()
								return
							default:
							}
							n++
							id := fmt.Sprintf("%d-%d", c, n)
							sent.Add(1)
							_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
							_, err := io.WriteString(conn, "POST /x?id="+id+" HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}")
							var resp *http.Response
							if err == nil {
								resp, err = http.ReadResponse(br, nil)
							}
							if err != nil {
								unanswered.Add(1)
								time.Sleep(5 * time.Millisecond) // a handler that ran has stored its id by now
								if _, ok := ran.Load(id); ok {
									ranUnanswered.Add(1)
								}
								break
							}
							_, _ = io.Copy(io.Discard, resp.Body)
							resp.Body.Close()
							time.Sleep(tc.pause(rng))
						}
						conn.Close()
					}
				}()
			}
			end := time.Now().Add(3 * time.Second)
			for time.Now().Before(end) {
				if c, err := net.Dial("tcp", addr); err == nil {
					_ = c.SetDeadline(time.Now().Add(300 * time.Millisecond))
					_, _ = io.WriteString(c, "GET /x?id=new HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
					_, _ = io.Copy(io.Discard, c)
					c.Close()
				}
			}
			close(stop)
			wg.Wait()
			t.Logf("%d requests, %d unanswered (%d of them run), %d idle connections ended",
				sent.Load(), unanswered.Load(), ranUnanswered.Load(), capped.idleClosed())
			if n := ranUnanswered.Load(); n > 0 {
				t.Errorf("%d requests ran whose client got no answer", n)
			}
			switch {
			case tc.name == "busy" && unanswered.Load() > 0:
				t.Errorf("%d requests of busy clients unanswered, want none", unanswered.Load())
			case tc.name == "pausing" && capped.idleClosed() == 0:
				t.Error("no idle connection was ended: the test did not exercise the limit")
			}
		})
	}
}

// TestConnCapEndsSlowHeaders: with every slot held by connections that trickle in their first
// request's headers (none idle), a new connection is served once they have waited a second, well
// before the 5 s header timeout, and exactly one of them is ended for it (a review's find: net/http
// reports such a connection active before it closes it, and two or three were ended).
func TestConnCapEndsSlowHeaders(t *testing.T) {
	const limit = 4
	_, addr := serveCapped(t, limit, http.HandlerFunc(okHandler), nil)
	slow := make([]*rawConn, limit)
	for i := range slow {
		slow[i] = dialRaw(t, addr)
		if _, err := io.WriteString(slow[i], "GET /slow HTTP/1.1\r\nHost: idemsvc\r\n"); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(1200 * time.Millisecond) // every one of them past the second
	start := time.Now()
	extra := dialRaw(t, addr)
	st, body, err := extra.get("/healthz", 4*time.Second)
	if took := time.Since(start); err != nil || st != 200 || body != "ok /healthz" || took > 2*time.Second {
		t.Fatalf("new connection while %d slow-header ones held every slot: %d %q, %v after %v; want 200 at once",
			limit, st, body, err, took)
	}
	var ended, served int
	for i, c := range slow {
		if c.closedByServer(300 * time.Millisecond) {
			ended++
			continue
		}
		// The others still get their request served when they finish it.
		if _, err := io.WriteString(c, "\r\n"); err != nil {
			t.Fatal(err)
		}
		if st, body, err := c.read(2 * time.Second); err != nil || st != 200 || body != "ok /slow" {
			t.Errorf("slow-header connection %d, finished: %d %q, %v; want it served", i+1, st, body, err)
		} else {
			served++
		}
	}
	if ended != 1 || served != limit-1 {
		t.Errorf("%d slow-header connections ended and %d served for one new connection; want 1 and %d", ended, served, limit-1)
	}
}

// TestConnCapEndedNewThenServed: a new connection being ended whose headers arrived after all is
// served and goes idle (linked in the idle list then); when endWait passes, it is not linked a
// second time, which made a cycle of the list.
func TestConnCapEndedNewThenServed(t *testing.T) {
	l := newConnCap(nil, 4, nil)
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	l.slots <- struct{}{}
	l.connState(a, http.StateNew)
	now := time.Now()
	l.mu.Lock()
	l.endOldestIdle(now.Add(2 * minNewToEvict))
	ended := l.ending != nil
	l.mu.Unlock()
	if !ended {
		t.Fatal("the new connection was not ended")
	}
	l.connState(a, http.StateActive)
	l.connState(a, http.StateIdle)
	l.mu.Lock()
	defer l.mu.Unlock()
	// Past endWait the ending is dropped, and the connection, idle long enough by then, is the
	// one ended next: taken out of the idle list, which is then empty.
	l.endOldestIdle(now.Add(2*minNewToEvict + 2*endWait))
	if l.ending == nil || l.ending.conn != a {
		t.Fatalf("ending %v, want the idle connection", l.ending)
	}
	if l.idle.next != &l.idle || l.idle.prev != &l.idle {
		t.Error("the idle list is not empty after its one connection was taken out: it was linked twice")
	}
}

// TestConnCapTrickledNextRequest: a keep-alive connection that trickles its next request's
// headers is idle as far as the cap knows (net/http reports it active only once it has read
// them); ended, it is reported active (it had read bytes) and then closed. One new connection
// ends it alone (a review's find: "active" cleared the one being ended, and a second connection
// was ended for the same slot).
func TestConnCapTrickledNextRequest(t *testing.T) {
	const limit = 3
	capped, addr := serveCapped(t, limit, http.HandlerFunc(okHandler), nil)
	conns := fillIdle(t, capped, addr, "/first", limit) // the first is idle the longest
	if _, err := io.WriteString(conns[0], "GET /slow HTTP/1.1\r\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // two segments, read apart
	if _, err := io.WriteString(conns[0], "Host: idemsvc\r\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond) // every one idle for minIdleToEvict
	extra := dialRaw(t, addr)
	if st, _, err := extra.get("/healthz", 3*time.Second); err != nil || st != 200 {
		t.Fatalf("/healthz at the cap: %d, %v", st, err)
	}
	time.Sleep(300 * time.Millisecond)
	closed := 0
	for _, c := range conns {
		if c.closedByServer(200 * time.Millisecond) {
			closed++
		}
	}
	if n := capped.idleClosed(); n != 1 || closed != 1 {
		t.Errorf("%d connections ended (%d closed) for one new connection; want 1", n, closed)
	}
}
