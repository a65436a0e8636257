package hostile

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// The bounds the proofs hold the service to. cmd/idemsvc/run.go sets ReadHeaderTimeout to 5 s
// and MaxHeaderBytes to 64 KiB; a request body is at most 1 MiB x 4/3 + 64 KiB.
const (
	// probeBound is the slowest a well-behaved call may be while the abuse runs. Calls take
	// milliseconds; the bound is generous for a loaded CI machine, and far below the seconds a
	// blocked server would take.
	probeBound = 2 * time.Second
	// headerTimeout is cmd/idemsvc's ReadHeaderTimeout; closeBound is when a connection that
	// has not finished its headers must be closed at the latest.
	headerTimeout = 5 * time.Second
	closeBound    = headerTimeout + 5*time.Second
)

// TestSlowHeaders: clients that dribble their headers a byte at a time are cut off when the
// header timeout runs out, and meanwhile everyone else is served promptly.
func TestSlowHeaders(t *testing.T) {
	t.Parallel()
	s := startService(t)
	base := s.fds()
	const n = 64
	var (
		mu     sync.Mutex
		closed []time.Duration
		got    []string // what the server said before closing, if anything
	)
	p := withProbe(s, "slow", func() {
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d, said := dribble(t, s.addr, i)
				mu.Lock()
				closed = append(closed, d)
				if said != "" {
					got = append(got, said)
				}
				mu.Unlock()
			}()
		}
		wg.Wait()
	})
	p.check(t, probeBound)
	first, last := closed[0], closed[0]
	for _, d := range closed {
		first, last = min(first, d), max(last, d)
	}
	t.Logf("slow headers: %d connections closed by the server after %s to %s; it said %q",
		len(closed), first.Round(time.Millisecond), last.Round(time.Millisecond), unique(got))
	if first < headerTimeout-500*time.Millisecond {
		t.Errorf("a slow connection was closed after %s, before the header timeout %s", first, headerTimeout)
	}
	if fds := s.waitFDs(base+2, 3*time.Second); fds > base+2 {
		t.Errorf("the server holds %d descriptors after the slow clients left, %d before", fds, base)
	}
}

// dribble sends a request line and then header bytes, one every 100 ms, and never finishes the
// headers. It returns how long the server kept the connection open, and what it wrote.
func dribble(t *testing.T, addr string, i int) (time.Duration, string) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Errorf("dial: %v", err)
		return 0, ""
	}
	defer conn.Close()
	start := time.Now()
	readDone := make(chan string, 1)
	go func() {
		_ = conn.SetReadDeadline(time.Now().Add(closeBound + 5*time.Second))
		b, _ := io.ReadAll(conn) // until the server closes (or the deadline, a failure below)
		readDone <- string(b)
	}()
	msg := fmt.Sprintf("POST /v1/keys/slow-%d/begin HTTP/1.1\r\nHost: idemsvc\r\nAuthorization: Bearer %s\r\nX-Slow: ", i, token)
	if _, err := io.WriteString(conn, msg); err != nil {
		t.Errorf("write: %v", err)
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case said := <-readDone:
			d := time.Since(start)
			if d > closeBound {
				t.Errorf("slow connection %d stayed open %s, more than %s", i, d, closeBound)
			}
			return d, firstLine(said)
		case <-tick.C:
			_, _ = conn.Write([]byte{'a'}) // fails once the server closed: the read ends then
		}
	}
}

// TestIdleConnections: a thousand connections that never send a byte do not stop the service,
// and the server closes them when the header timeout runs out, so they cannot pile up.
func TestIdleConnections(t *testing.T) {
	t.Parallel()
	s := startService(t)
	base := s.fds()
	const n = 1000
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	var peak int
	var closedAt []time.Duration
	p := withProbe(s, "idle", func() {
		start := time.Now()
		for range n {
			c, err := net.Dial("tcp", s.addr)
			if err != nil {
				t.Errorf("dial: %v", err)
				break
			}
			conns = append(conns, c)
		}
		time.Sleep(time.Second) // the probe runs while all of them are open
		peak = s.fds()
		// Each must be closed by the server: a read returns EOF.
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, c := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_ = c.SetReadDeadline(start.Add(closeBound + 5*time.Second))
				_, err := c.Read(make([]byte, 1))
				mu.Lock()
				defer mu.Unlock()
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					return // counted as not closed below
				}
				closedAt = append(closedAt, time.Since(start))
			}()
		}
		wg.Wait()
	})
	p.check(t, probeBound)
	last := time.Duration(0)
	for _, d := range closedAt {
		last = max(last, d)
	}
	after := s.waitFDs(base+2, 3*time.Second)
	t.Logf("idle connections: %d opened, server descriptors %d -> %d -> %d; %d closed by the server, the last after %s",
		n, base, peak, after, len(closedAt), last.Round(time.Millisecond))
	if peak < base+n/2 {
		t.Errorf("the server held only %d descriptors with %d connections open: did they connect?", peak, n)
	}
	if len(closedAt) != n {
		t.Errorf("the server closed %d of %d idle connections within %s", len(closedAt), n, closeBound)
	}
	if last > closeBound {
		t.Errorf("the last idle connection was closed after %s, more than %s", last, closeBound)
	}
	if after > base+2 {
		t.Errorf("the server holds %d descriptors after the idle connections went, %d before", after, base)
	}
}

// TestHugeBodies: bodies of 50 MB, with a Content-Length or chunked, are cut off with 413 at the
// request limit (about 1.4 MB), several at once, and the server's memory does not grow with them.
func TestHugeBodies(t *testing.T) {
	t.Parallel()
	s := startService(t)
	const size = 50 << 20
	rssBefore, hwmBefore := s.rssMiB(), s.hwmMiB()
	type result struct {
		name   string
		status string
		sent   int64
	}
	var results []result
	p := withProbe(s, "huge", func() {
		var mu sync.Mutex
		var wg sync.WaitGroup
		for i, tc := range []struct {
			op      string
			chunked bool
			prefix  string
		}{
			{"complete", false, `{"token":"x","response":{"status":200,"body":"`},
			{"complete", true, `{"token":"x","response":{"status":200,"body":"`},
			{"begin", false, `{"fingerprint":"`},
			{"begin", true, `{"fingerprint":"`},
			{"renew", false, `{"token":"`},
			{"complete", false, `{"token":"x","response":{"status":200,"body":"`},
			{"complete", true, `{"token":"x","response":{"status":200,"body":"`},
			{"release", true, `{"token":"`},
		} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				status, sent := streamBody(t, s.addr, fmt.Sprintf("/v1/keys/huge-%d/%s", i, tc.op), tc.prefix, size, tc.chunked)
				mu.Lock()
				defer mu.Unlock()
				name := tc.op
				if tc.chunked {
					name += " (chunked)"
				}
				results = append(results, result{name, status, sent})
			}()
		}
		wg.Wait()
	})
	p.check(t, probeBound)
	for _, r := range results {
		t.Logf("huge body: %s: %q after %.1f MiB sent", r.name, r.status, float64(r.sent)/(1<<20))
		if want := "413 application/problem+json urn:idemsvc:problem:payload-too-large"; r.status != want {
			t.Errorf("a %d MiB body to %s got %q, want %q", size>>20, r.name, r.status, want)
		}
	}
	rssAfter, hwmAfter := s.rssMiB(), s.hwmMiB()
	t.Logf("huge bodies: %d x %d MiB; server RSS %.1f -> %.1f MiB, peak %.1f -> %.1f MiB",
		len(results), size>>20, rssBefore, rssAfter, hwmBefore, hwmAfter)
	// Buffering the bodies would take len(results) x 50 MB; the limit keeps each under 2 MB.
	if grow := hwmAfter - rssBefore; grow > 128 {
		t.Errorf("the server's peak memory grew by %.1f MiB while it refused the bodies", grow)
	}
}

// readAnswer reads one HTTP response from conn and sums it up as "status content-type
// problem-type".
func readAnswer(conn net.Conn) string {
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return "no answer: " + err.Error()
	}
	defer resp.Body.Close()
	var p struct{ Type string }
	_ = json.NewDecoder(resp.Body).Decode(&p)
	return strings.TrimSpace(fmt.Sprintf("%d %s %s", resp.StatusCode, resp.Header.Get("Content-Type"), p.Type))
}

// streamBody sends a POST whose body is prefix and then 'A's up to size bytes, and reads the
// answer while it writes. It returns the status line and how many body bytes it wrote.
func streamBody(t *testing.T, addr, path, prefix string, size int, chunked bool) (string, int64) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Errorf("dial: %v", err)
		return "", 0
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	head := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: idemsvc\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n", path, token)
	if chunked {
		head += "Transfer-Encoding: chunked\r\n\r\n"
	} else {
		head += fmt.Sprintf("Content-Length: %d\r\n\r\n", size)
	}
	status := make(chan string, 1)
	go func() { status <- readAnswer(conn) }()
	if _, err := io.WriteString(conn, head); err != nil {
		return <-status, 0
	}
	chunk := []byte(strings.Repeat("A", 64<<10))
	var sent int64
	for sent < int64(size) {
		select {
		case line := <-status:
			return line, sent
		default:
		}
		b := chunk
		if sent == 0 {
			b = append([]byte(prefix), chunk[len(prefix):]...)
		}
		if chunked {
			b = append([]byte(fmt.Sprintf("%x\r\n", len(b))), append(b, "\r\n"...)...)
		}
		if _, err := conn.Write(b); err != nil {
			break // the server closed: its answer, if any, is already in the socket
		}
		sent += int64(len(chunk))
	}
	return <-status, sent
}

// TestManyHeaders: ten thousand headers, or one header of 100 KiB, are refused with 431 at the
// 64 KiB limit; a thousand small headers (under the limit) are served as usual.
func TestManyHeaders(t *testing.T) {
	t.Parallel()
	s := startService(t)
	var many, huge, fine strings.Builder
	for i := range 10000 {
		fmt.Fprintf(&many, "X-H-%d: v\r\n", i)
	}
	fmt.Fprintf(&huge, "X-Huge: %s\r\n", strings.Repeat("h", 100<<10))
	for i := range 1000 {
		fmt.Fprintf(&fine, "X-H-%d: v\r\n", i)
	}
	p := withProbe(s, "headers", func() {
		for _, tc := range []struct {
			name, headers, want string
		}{
			{"10000 headers", many.String(), "HTTP/1.1 431 "},
			{"a 100 KiB header", huge.String(), "HTTP/1.1 431 "},
			{"1000 headers", fine.String(), "HTTP/1.1 201 "},
		} {
			for i := range 5 {
				start := time.Now()
				got := sendRaw(t, s.addr, fmt.Sprintf("POST /v1/keys/hdr-%d-%d/begin HTTP/1.1\r\nHost: idemsvc\r\n"+
					"Authorization: Bearer %s\r\nContent-Length: 0\r\n%s\r\n", len(tc.name), i, token, tc.headers))
				if !strings.HasPrefix(got, tc.want) {
					t.Errorf("%s: got %q, want %q", tc.name, got, tc.want)
				}
				if d := time.Since(start); d > probeBound {
					t.Errorf("%s: answered after %s", tc.name, d)
				}
				if i == 0 {
					t.Logf("many headers: %s (%d KiB): %q in %s", tc.name, len(tc.headers)>>10, got, time.Since(start).Round(time.Millisecond))
				}
			}
		}
	})
	p.check(t, probeBound)
}

// sendRaw writes msg on a new connection and returns the status line of the answer.
func sendRaw(t *testing.T, addr, msg string) string {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Errorf("dial: %v", err)
		return ""
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	status := make(chan string, 1)
	go func() {
		line, _ := readStatusLine(conn)
		status <- line
	}()
	_, _ = io.WriteString(conn, msg) // may fail when the server refuses early; the answer counts
	return <-status
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return strings.TrimSpace(line)
}

func unique(ss []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range ss {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}
