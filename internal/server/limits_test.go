package server_test

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server"
	"github.com/idemsvc/idemsvc/internal/server/servertest"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// gauge returns the value of the server's metric name (a gauge or a counter without labels).
func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == name && len(f.Metric) == 1 {
			if g := f.Metric[0].GetGauge(); g != nil {
				return g.GetValue()
			}
			return f.Metric[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// eventually waits up to 10s for cond.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 10s: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestWaitersBounded: begins that wait for a holder are bounded in all (Options.MaxWaiters) and,
// with several tenants, to half of that per tenant; a begin beyond a bound answers 409 at once
// instead of waiting, and the waiting ones still get the replay when the holder completes.
func TestWaitersBounded(t *testing.T) {
	t.Parallel()
	toks := map[string]string{"a": "token-a-0123456789abcdef", "b": "token-b-0123456789abcdef"}
	e := newEnv(t, servertest.Options{Tokens: toks, MaxWaiters: 4})
	reg := e.srv.Handler.Registry()
	held := map[string]leased{}
	for tenant, tok := range toks {
		e.token = tok
		held[tenant] = e.begin("k", nil)
	}
	wait := func(tenant string) <-chan int { // a begin of k with wait_ms, as tenant
		ch := make(chan int, 1)
		go func() {
			req, _ := http.NewRequest("POST", e.srv.URL+"/v1/keys/k/begin", strings.NewReader(`{"wait_ms":20000}`))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Authorization", "Bearer "+toks[tenant])
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				ch <- -1
				return
			}
			resp.Body.Close()
			ch <- resp.StatusCode
		}()
		return ch
	}
	waiting := func(n float64) {
		t.Helper()
		eventually(t, fmt.Sprintf("%v begins waiting", n), func() bool { return gauge(t, reg, "idemsvc_begin_waiting") == n })
	}
	shedNow := func(tenant string) { // a waiting begin that finds no room answers at once
		t.Helper()
		select {
		case st := <-wait(tenant):
			if st != http.StatusConflict {
				t.Fatalf("a begin of tenant %s beyond the bound: %d, want 409", tenant, st)
			}
		case <-time.After(10 * time.Second): // it would wait until the complete below
			t.Fatalf("a begin of tenant %s beyond the bound waited", tenant)
		}
	}

	var answers []<-chan int
	answers = append(answers, wait("a"), wait("a"))
	waiting(2)
	shedNow("a") // tenant a has its half
	answers = append(answers, wait("b"))
	waiting(3)
	answers = append(answers, wait("b"))
	waiting(4)
	shedNow("b") // all four places are taken
	if n := gauge(t, reg, "idemsvc_begin_waits_shed_total"); n != 2 {
		t.Errorf("%v waits shed, want 2", n)
	}
	for tenant, l := range held {
		e.token = toks[tenant]
		wantStatus(t, e.do("POST", "/v1/keys/k/complete", completeBody(l.token, 200, "done")), 200, "")
	}
	for i, ch := range answers {
		select {
		case st := <-ch:
			if st != http.StatusOK {
				t.Errorf("waiter %d: %d, want the replay (200)", i, st)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("waiter %d was not answered after the complete", i)
		}
	}
	waiting(0)
}

// budgetEnv starts a server whose body budget is the least, four of the largest requests (with
// stored bodies of at most 64 KiB), and returns the size of the largest request and stall, which
// opens a connection that sends the headers of a complete of that size and a few bytes of its
// body, then nothing: it holds that much of the budget until it closes or is cut off. The
// connection is closed when the test ends.
func budgetEnv(t *testing.T, opts servertest.Options) (e *env, largest int, stall func() net.Conn) {
	t.Helper()
	opts.Limits = keys.DefaultLimits()
	opts.Limits.MaxBodyBytes = 64 << 10
	opts.BodyBuffer = 1
	e = newEnv(t, opts)
	largest = (opts.Limits.MaxBodyBytes+2)/3*4 + 6*opts.Limits.MaxHeaderBytes + 64<<10 // as the server counts
	host := strings.TrimPrefix(e.srv.URL, "http://")
	return e, largest, func() net.Conn {
		c, err := net.Dial("tcp", host)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		fmt.Fprintf(c, "POST /v1/keys/stalled/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{\"token\":\"", largest)
		return c
	}
}

// TestBodyBudget: request bodies of 4 KiB or more are read under a budget (Options.BodyBuffer,
// at least four of the largest requests): while clients that stalled mid-body hold all of it, a
// further large request is answered 503 after a few seconds instead of being buffered, small
// requests go on, and the budget is back once the stalled ones are gone.
func TestBodyBudget(t *testing.T) {
	t.Parallel()
	e, largest, stall := budgetEnv(t, servertest.Options{})
	limits := keys.DefaultLimits()
	limits.MaxBodyBytes = 64 << 10
	host := strings.TrimPrefix(e.srv.URL, "http://")
	var stalled []net.Conn
	for range 8 { // each takes the largest request's room: 4 fill the budget
		stalled = append(stalled, stall())
	}
	reg := e.srv.Handler.Registry()
	eventually(t, "the stalled clients holding the whole budget", func() bool {
		return gauge(t, reg, "idemsvc_request_body_bytes_held") == float64(4*largest)
	})
	// 64 KiB of base64: read under the budget.
	body := `{"token":"t","response":{"status":200,"body":"` + strings.Repeat("QUJD", 16<<10) + `"}}`
	r := e.do("POST", "/v1/keys/other/complete", body)
	wantStatus(t, r, http.StatusServiceUnavailable, "unavailable")
	// A body longer than the largest request is refused at once, as reading it would end (by
	// more than the 256 KiB net/http would wait to drain before answering).
	c, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /v1/keys/big/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{", largest+1<<20)
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second)) // less than the budget's wait
	if status, err := bufio.NewReader(c).ReadString('\n'); err != nil || !strings.Contains(status, " 413 ") {
		t.Errorf("a body longer than the largest request while the budget is full: %q, %v; want 413 at once", status, err)
	}
	wantStatus(t, e.do("POST", "/v1/keys/small/begin", nil), http.StatusCreated, "")
	for _, c := range stalled {
		c.Close()
	}
	eventually(t, "the budget back once the stalled clients are gone", func() bool {
		return e.do("POST", "/v1/keys/other/complete", body).status == http.StatusNotFound // read: no record
	})
}

// TestBodyBudgetShares: with several tenants, one tenant's bodies hold at most half of the body
// budget, and a tenant over its share waits on its own, so that another tenant's body is read at
// once while the first one's stalled clients hold all they may.
func TestBodyBudgetShares(t *testing.T) {
	t.Parallel()
	limits := keys.DefaultLimits()
	limits.MaxBodyBytes = 64 << 10
	tokens := map[string]string{"bob": "bob-token-0123456789", "alice": "alice-token-0123456789"}
	e := newEnv(t, servertest.Options{Limits: limits, BodyBuffer: 1, Tokens: tokens})
	largest := (limits.MaxBodyBytes+2)/3*4 + 6*limits.MaxHeaderBytes + 64<<10 // as the server counts
	host := strings.TrimPrefix(e.srv.URL, "http://")
	for range 8 { // the budget is four of the largest; bob's share two
		c, err := net.Dial("tcp", host)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "POST /v1/keys/stalled/complete HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"+
			"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n{\"token\":\"", tokens["bob"], largest)
	}
	reg := e.srv.Handler.Registry()
	eventually(t, "bob's stalled clients holding his share", func() bool {
		return gauge(t, reg, "idemsvc_request_body_bytes_held") == float64(2*largest)
	})
	body := `{"token":"t","response":{"status":200,"body":"` + strings.Repeat("QUJD", 16<<10) + `"}}`
	e.token = tokens["alice"]
	start := time.Now()
	wantStatus(t, e.do("POST", "/v1/keys/other/complete", body), http.StatusNotFound, "not-found") // read: no record
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("alice's complete took %s behind bob's stalled bodies; want it read at once", took)
	}
	e.token = tokens["bob"]
	wantStatus(t, e.do("POST", "/v1/keys/other/complete", body), http.StatusServiceUnavailable, "unavailable")
	if held := gauge(t, reg, "idemsvc_request_body_bytes_held"); held != float64(2*largest) {
		t.Errorf("held %v after the requests, want bob's share, %d", held, 2*largest)
	}
}

// TestSmallRequestCap: a begin, renew or release body is at most 16 KiB (every valid one is
// under 4 KiB), so none takes a complete's room in the body budget: a longer one is 413 at
// once, whether its length is told or not.
func TestSmallRequestCap(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{})
	pad := strings.Repeat(" ", 16<<10)
	for _, path := range []string{"/v1/keys/k/begin", "/v1/keys/k/renew", "/v1/keys/k/release"} {
		r := e.bad("POST", path, `{"token":"t"}`+pad)
		wantStatus(t, r, http.StatusRequestEntityTooLarge, "payload-too-large")
		// Within the cap, the same padding is only white space.
		if r := e.bad("POST", path, `{"token":"t"}`+pad[:8<<10]); r.status == http.StatusRequestEntityTooLarge {
			t.Errorf("%s with 8 KiB of white space: 413, want it read", path)
		}
	}
	wantStatus(t, e.do("POST", "/v1/keys/k2/begin", `{"fingerprint":"`+strings.Repeat("f", 512)+`"}`), http.StatusCreated, "")
}

// TestSlowBodyDetail: a body that stops arriving is a 400 whose detail says so without quoting
// the read's error, which names the server's own address ("read tcp 10.0.3.7:8080->...: i/o
// timeout"); a body cut off by its client says that.
func TestSlowBodyDetail(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{ReadTimeout: 300 * time.Millisecond})
	host := strings.TrimPrefix(e.srv.URL, "http://")
	c, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /v1/keys/slow/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20000\r\n\r\n{\"token\":\"%s", strings.Repeat("a", 9000))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "did not arrive in time") ||
		strings.Contains(string(body), "127.0.0.1") || strings.Contains(string(body), "tcp") {
		t.Errorf("a stalled body: %d %s, want 400 saying it did not arrive in time, without the address", resp.StatusCode, body)
	}

	for _, err := range []error{io.ErrUnexpectedEOF, &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}} {
		if got := server.ReadErrorForTest(err); !strings.Contains(got.Error(), "cut off") || strings.Contains(got.Error(), "tcp") {
			t.Errorf("read error %v: %v, want one saying the body was cut off", err, got)
		}
	}
}

// TestManyHeaderValues: a complete with more header values than the limit is 422
// invalid-response however many it has: counted before decoding when there are far too many
// (bodyLimit), by the limits after it otherwise.
func TestManyHeaderValues(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{})
	l := e.begin("k", nil)
	for _, n := range []int{101, 150, 5000} {
		names := make([]string, n)
		for i := range names {
			names[i] = fmt.Sprintf(`"X-%d":[]`, i)
		}
		body := `{"token":"` + l.token + `","response":{"status":200,"headers":{` + strings.Join(names, ",") + `}}}`
		r := e.bad("POST", "/v1/keys/k/complete", body)
		wantStatus(t, r, http.StatusUnprocessableEntity, "invalid-response")
		if !strings.Contains(string(r.body), "more than 100 header values") {
			t.Errorf("%d header names: %s", n, r.body)
		}
	}
}

// TestAnswerBudget: an answer that carries a large stored body (64 KiB or more) is written under
// a budget (the body budget's size, and four of the largest answers at least), one tenant
// holding at most half of it with several: a client that asks for a large record and reads
// nothing holds the record and its encoding until the write timeout. Beyond the budget a request
// waits, holding nothing, and is answered once there is room, or 503 after 5 s. Another
// tenant's answers go on meanwhile.
func TestAnswerBudget(t *testing.T) {
	t.Parallel()
	e, tokens, encoded := answerEnv(t, 0)
	for _, who := range []string{"bob", "alice"} {
		completeLarge(t, e, "big", tokens[who], encoded)
	}
	readers := stalledReaders(t, e.srv.URL, "/v1/keys/big", tokens["bob"], 3)
	reg := e.srv.Handler.Registry()
	n := largeBody
	cost := float64(n + (n+2)/3*4 + 16<<10) // as the server counts
	// The budget is four of these answers; bob's share two.
	eventually(t, "two of bob's stalled readers holding his share of the answer budget", func() bool {
		return gauge(t, reg, "idemsvc_answer_bytes_held") == 2*cost
	})
	if st, b := plainDo(t, e.srv.URL, "GET", "/v1/keys/big", tokens["alice"], ""); st != http.StatusOK || !strings.Contains(b, encoded) {
		t.Errorf("alice's GET while bob's readers hold his share: %d, %d bytes; want 200 with her record", st, len(b))
	}
	e.token = tokens["bob"]
	start := time.Now()
	if r := e.do("GET", "/v1/keys/big", nil); r.status != http.StatusServiceUnavailable || !strings.Contains(string(r.body), "Server busy") {
		t.Errorf("bob's GET beyond his share: %d, %.200s; want 503 Server busy", r.status, r.body)
	} else if took := time.Since(start); took < 4*time.Second {
		t.Errorf("bob's GET beyond his share was refused after %s, want it to wait 5 s for room", took)
	}
	if held := gauge(t, reg, "idemsvc_answer_bytes_held"); held != 2*cost {
		t.Errorf("held %v after the requests, want two answers' %v", held, 2*cost)
	}
	// A GET and a replay that wait are answered when room comes back (the replay by a second
	// begin, after the wait).
	got := make(chan string, 2)
	for _, req := range [][2]string{{"GET", "/v1/keys/big"}, {"POST", "/v1/keys/big/begin"}} {
		go func() {
			st, b := plainDo(t, e.srv.URL, req[0], req[1], tokens["bob"], "")
			got <- req[0] + " " + strconv.Itoa(st) + " " + strconv.FormatBool(strings.Contains(b, encoded))
		}()
	}
	time.Sleep(500 * time.Millisecond)
	for _, c := range readers {
		c.Close()
	}
	for range 2 {
		if g := <-got; !strings.HasSuffix(g, " 200 true") {
			t.Errorf("bob's request that waited while his readers went away: %s, want 200 with his record", g)
		}
	}
}

// TestAnswerLargerThanShare: a record whose answer costs more than a tenant's share of the answer
// budget (stored under a higher body limit than the one the server runs with now) takes the
// whole share, and is served at once, not refused for ever.
func TestAnswerLargerThanShare(t *testing.T) {
	t.Parallel()
	tokens := map[string]string{"bob": "bob-token-0123456789", "alice": "alice-token-0123456789"}
	store, err := bolt.OpenDir(t.TempDir(), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	large := keys.DefaultLimits()
	large.MaxBodyBytes = 4 << 20
	before := servertest.Start(t, servertest.Options{Store: store, Limits: large, Tokens: tokens})
	encoded := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("x", large.MaxBodyBytes)))
	st, b := plainDo(t, before.URL, "POST", "/v1/keys/big/begin", tokens["bob"], "")
	if st != http.StatusCreated {
		t.Fatalf("begin: %d %s", st, b)
	}
	var l struct{ Lease struct{ Token string } }
	if err := json.Unmarshal([]byte(b), &l); err != nil {
		t.Fatal(err)
	}
	complete := `{"token":"` + l.Lease.Token + `","response":{"status":200,"body":"` + encoded + `"}}`
	if st, b := plainDo(t, before.URL, "POST", "/v1/keys/big/complete", tokens["bob"], complete); st != http.StatusOK {
		t.Fatalf("complete: %d %.200s", st, b)
	}
	// The default limits and the least body budget: bob's share of the answer budget is two
	// answers of 1 MiB, about 4.9 MB; this one costs about 9.8 MB.
	// A wait for room of a minute: a GET that waited for room it can never have would take
	// that long, where one served at once takes a second or two even under -race on a loaded
	// machine (2 s, the bound before, was exceeded once there).
	now := servertest.Start(t, servertest.Options{Store: store, Tokens: tokens, BodyBuffer: 1, BudgetWait: time.Minute})
	for range 2 {
		start := time.Now()
		if st, b := plainDo(t, now.URL, "GET", "/v1/keys/big", tokens["bob"], ""); st != http.StatusOK || !strings.Contains(b, encoded) {
			t.Fatalf("GET of a record larger than the share: %d, %d bytes; want 200", st, len(b))
		}
		if took := time.Since(start); took > 30*time.Second {
			t.Errorf("GET of a record larger than the share took %s, want it at once, not after a wait for room", took)
		}
	}
}

// largeBody is the stored body of the answer budget's tests: an answer larger than a socket's
// send buffer can grow to (4 MiB here), so that a client that reads nothing holds it.
const largeBody = 8 << 20

// answerEnv is a server with two tenants, bob and alice, stored bodies of up to largeBody and the
// least budgets; and the base64 of a body of largeBody bytes.
func answerEnv(t *testing.T, wait time.Duration) (*env, map[string]string, string) {
	t.Helper()
	tokens := map[string]string{"bob": "bob-token-0123456789", "alice": "alice-token-0123456789"}
	limits := keys.DefaultLimits()
	limits.MaxBodyBytes = largeBody
	e := newEnv(t, servertest.Options{Limits: limits, BodyBuffer: 1, Tokens: tokens, BudgetWait: wait})
	return e, tokens, base64.StdEncoding.EncodeToString([]byte(strings.Repeat("x", largeBody)))
}

// completeLarge begins key as token's tenant and completes it with the body whose base64 is
// encoded.
func completeLarge(t *testing.T, e *env, key, token, encoded string) {
	t.Helper()
	e.token = token
	l := e.begin(key, nil)
	complete := `{"token":"` + l.token + `","response":{"status":200,"body":"` + encoded + `"}}`
	if st, b := plainDo(t, e.srv.URL, "POST", "/v1/keys/"+key+"/complete", token, complete); st != http.StatusOK {
		t.Fatalf("complete: %d %.200s", st, b)
	}
}

// plainDo sends a request without e.client's spec check, which takes seconds for megabytes of
// JSON, and returns the status and the body.
func plainDo(t *testing.T, base, method, path, token, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, base+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Error(err)
		return 0, ""
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Error(err)
	}
	return resp.StatusCode, string(b)
}

// stalledReaders opens n connections that each ask for path and read nothing, with a small
// receive window so that an answer cannot all go into socket buffers. They are closed when the
// test ends, if not before.
func stalledReaders(t *testing.T, base, path, token string, n int) []net.Conn {
	t.Helper()
	dialer := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	var conns []net.Conn
	for range n {
		c, err := dialer.Dial("tcp", strings.TrimPrefix(base, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", path, token)
		conns = append(conns, c)
	}
	return conns
}

// TestAnswerWaitThenBeginAgain: a replay that waited for room in the answer budget is decided by a
// second begin, which sees what happened meanwhile and keeps what is left of the caller's
// wait_ms: a key deleted meanwhile is acquired (201), and one deleted and taken by another
// holder is waited for and then replayed with that holder's response (it was 409 at once).
func TestAnswerWaitThenBeginAgain(t *testing.T) {
	t.Parallel()
	// The replays wait for room while the test deletes, begins and lets the readers go: on a
	// loaded machine (make test, -race) that took more than the default 5 s, and they got 503.
	e, tokens, encoded := answerEnv(t, time.Minute)
	for _, k := range []string{"big", "a", "b"} {
		completeLarge(t, e, k, tokens["bob"], encoded)
	}
	e.token = tokens["bob"]
	readers := stalledReaders(t, e.srv.URL, "/v1/keys/big", tokens["bob"], 2) // bob's whole share
	reg := e.srv.Handler.Registry()
	// Both readers hold their answer before the replays come: with one of them still on its
	// way, a replay found room, answered at once, and the test saw that (once, in CI).
	cost := float64(largeBody + (largeBody+2)/3*4 + 16<<10) // as the server counts
	eventually(t, "bob's share held", func() bool { return gauge(t, reg, "idemsvc_answer_bytes_held") == 2*cost })
	time.Sleep(200 * time.Millisecond)
	got := map[string]chan string{"a": make(chan string, 1), "b": make(chan string, 1)}
	for k, ch := range got {
		go func() {
			st, b := plainDo(t, e.srv.URL, "POST", "/v1/keys/"+k+"/begin", tokens["bob"], `{"wait_ms":20000}`)
			ch <- strconv.Itoa(st) + " " + b
		}()
	}
	time.Sleep(300 * time.Millisecond) // both replays wait for room, holding nothing
	wantStatus(t, e.do("DELETE", "/v1/keys/a", nil), http.StatusNoContent, "")
	wantStatus(t, e.do("DELETE", "/v1/keys/b", nil), http.StatusNoContent, "")
	holder := e.begin("b", nil)
	for _, c := range readers {
		c.Close()
	}
	if a := <-got["a"]; !strings.HasPrefix(a, "201 ") {
		t.Errorf("begin of a key deleted while its replay waited: %.200s, want 201", a)
	}
	time.Sleep(300 * time.Millisecond) // b's second begin waits for the holder
	wantStatus(t, e.do("POST", "/v1/keys/b/complete", completeBody(holder.token, 201, "the holder's")), http.StatusOK, "")
	if b := <-got["b"]; !strings.HasPrefix(b, "200 ") || !strings.Contains(b, base64.StdEncoding.EncodeToString([]byte("the holder's"))) {
		t.Errorf("begin (wait_ms 20000) of a key taken by another while its replay waited: %.200s, want the holder's response replayed", b)
	}
}

// TestDrainCutsArrivingBodies: a drain (shutdown) cuts off the body of a request that is still
// arriving, with 503 "Shutting down", and nothing runs for it. A client trickling its body used to hold the shutdown for the read timeout (30 s,
// past the default shutdown timeout), and the process then exited 1.
func TestDrainCutsArrivingBodies(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{})
	l := e.begin("slow", nil)
	host := strings.TrimPrefix(e.srv.URL, "http://")
	body := fmt.Sprintf(`{"token":%q,"response":{"status":201}}`, l.token)
	trickle, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	defer trickle.Close()
	fmt.Fprintf(trickle, "POST /v1/keys/slow/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body[:10])
	time.Sleep(100 * time.Millisecond) // the handler is in its body read
	e.srv.Handler.Drain(200 * time.Millisecond)
	start := time.Now()
	_ = trickle.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(trickle), nil)
	if err != nil {
		t.Fatalf("the trickling request after the drain: %v (after %s)", err, time.Since(start))
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 503 || !strings.Contains(string(b), "Shutting down") || time.Since(start) > 2*time.Second {
		t.Errorf("the trickling request after the drain: %d %s after %s, want 503 Shutting down after the 200ms grace", resp.StatusCode, b, time.Since(start))
	}
	if r := e.do("GET", "/v1/keys/slow", nil); r.status != 200 || r.json(t)["state"] != "in_progress" {
		t.Errorf("the cut-off complete ran: GET answers %d %s", r.status, r.body)
	}
}

// TestDrainKeepsArrivedBodies: a body that arrives within the drain's grace is read and served,
// also when its read starts after the drain began: here a complete waits for room in the body
// budget, which stalled uploads hold until the drain cuts them off. A drain that set the
// deadline of such reads to now failed the complete with 503, though its body had arrived with
// the result of work that had run (a review's find).
func TestDrainKeepsArrivedBodies(t *testing.T) {
	t.Parallel()
	e, largest, stall := budgetEnv(t, servertest.Options{})
	host := strings.TrimPrefix(e.srv.URL, "http://")
	for range 4 { // each takes the largest request's room: they fill the budget
		stall()
	}
	reg := e.srv.Handler.Registry()
	eventually(t, "the stalled uploads holding the whole budget", func() bool {
		return gauge(t, reg, "idemsvc_request_body_bytes_held") == float64(4*largest)
	})
	l := e.begin("k", nil)
	body := fmt.Sprintf(`{"token":%q,"response":{"status":201,"body":%q}}`, l.token,
		base64.StdEncoding.EncodeToString([]byte(strings.Repeat("x", 6000)))) // over 4 KiB: under the budget
	c, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /v1/keys/k/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	time.Sleep(200 * time.Millisecond) // the complete waits for room, its body in the socket
	e.srv.Handler.Drain(500 * time.Millisecond)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Errorf("a complete whose body had arrived, read after the drain began: %d %s, want 200", resp.StatusCode, b)
	}
}

// TestDrainWithinReadTimeout: the drain's grace never takes a body's read past the server's
// ReadTimeout, counted from its request's start: a grace longer than what was left of it used
// to lengthen the read (a review's find).
func TestDrainWithinReadTimeout(t *testing.T) {
	t.Parallel()
	e := newEnv(t, servertest.Options{ReadTimeout: time.Second})
	l := e.begin("slow", nil)
	body := fmt.Sprintf(`{"token":%q,"response":{"status":201}}`, l.token)
	c, err := net.Dial("tcp", strings.TrimPrefix(e.srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	fmt.Fprintf(c, "POST /v1/keys/slow/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body[:10])
	time.Sleep(300 * time.Millisecond)
	e.srv.Handler.Drain(5 * time.Second)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("the trickling complete: %v after %s", err, time.Since(start))
	}
	_ = resp.Body.Close()
	if took := time.Since(start); resp.StatusCode != 503 || took > 3*time.Second {
		t.Errorf("the trickling complete: %d after %s; want 503 at the 1 s read timeout, not after the drain's 5 s grace", resp.StatusCode, took)
	}
}

// TestDrainGraceNotDoubled: a body whose read starts after the drain's deadline (it waited for
// room in the body budget, which the bodies cut at that deadline gave back) gets a second more,
// not a whole grace again: the cut came at twice the grace, and with a shutdown timeout under
// 7.5 s past the timeout (a review's find).
func TestDrainGraceNotDoubled(t *testing.T) {
	t.Parallel()
	e, largest, stall := budgetEnv(t, servertest.Options{BudgetWait: time.Minute})
	for range 4 { // they fill the budget
		stall()
	}
	reg := e.srv.Handler.Registry()
	eventually(t, "the stalled uploads holding the whole budget", func() bool {
		return gauge(t, reg, "idemsvc_request_body_bytes_held") == float64(4*largest)
	})
	waiting := stall() // waits for room, then trickles too
	time.Sleep(200 * time.Millisecond)
	const grace = 3 * time.Second
	start := time.Now()
	e.srv.Handler.Drain(grace)
	_ = waiting.SetReadDeadline(time.Now().Add(15 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(waiting), nil)
	if err != nil {
		t.Fatalf("the upload that waited for room: %v after %s", err, time.Since(start))
	}
	_ = resp.Body.Close()
	if took := time.Since(start); resp.StatusCode != 503 || took > grace+1500*time.Millisecond {
		t.Errorf("the upload that waited for room: %d after %s; want 503 about a second after the %s grace", resp.StatusCode, took, grace)
	}
}
