package linearizability

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// workload describes one recorded run.
type workload struct {
	// Clients is how many concurrent clients send calls, each one call at a time.
	Clients int
	// Keys is how many keys the clients share; half of the calls go to the hottest 16.
	Keys int
	// The clients send calls for at least Duration and until MinOps calls were sent, but for
	// no longer than MaxDuration and no more than MaxOps calls (0: no bound), so that a slow
	// machine (-race, a busy CI runner) still records enough calls to exercise every outcome.
	Duration, MaxDuration time.Duration
	MinOps, MaxOps        int
	// URLs are the servers; each call goes to one of them at random.
	URLs []string
	// Seed makes the clients' choices reproducible (the timing never is).
	Seed uint64
	// Fuses: one call in 50 gets a timeout of 0 to 3 ms, so that the client gives up while the
	// server may still act, and the history has unknown outcomes.
	Fuses bool
}

// sized returns the workload of the CI run, or the longer one of IDEMSVC_PROOFS=long.
func sized(urls []string) workload {
	w := workload{Clients: 64, Keys: 200, URLs: urls, Fuses: true,
		Duration: 2 * time.Second, MaxDuration: 15 * time.Second, MinOps: 3000, MaxOps: 40000}
	if os.Getenv("IDEMSVC_PROOFS") == "long" {
		w.Keys, w.Duration, w.MaxDuration, w.MinOps, w.MaxOps = 500, 60*time.Second, 10*time.Minute, 100000, 0
	}
	return w
}

// history is what a run recorded.
type history struct {
	ops []porcupine.Operation
	// unexpected lists answers outside the contract (a 400, a body that does not parse); the
	// model rejects them too, but a list names them plainly.
	unexpected []string
	// counts of outcomes, "begin 201", "complete 409 lease-lost", "get unknown", ...
	counts map[string]int
}

// recorder collects operations from all clients.
type recorder struct {
	start time.Time
	mu    sync.Mutex
	h     history
	ids   atomic.Int64
}

func (r *recorder) now() int64 { return int64(time.Since(r.start)) }

func (r *recorder) add(client int, in Input, call int64, out Output, ret int64, unexpected string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.h.ops = append(r.h.ops, porcupine.Operation{ClientId: client, Input: in, Call: call, Output: out, Return: ret})
	outcome := "unknown"
	if out.Unknown && out.Status != 0 {
		outcome = fmt.Sprintf("unknown %d", out.Status)
	}
	if !out.Unknown {
		outcome = fmt.Sprint(out.Status)
		if out.Problem != "" {
			outcome += " " + out.Problem
		} else if in.Kind == Begin && out.Status == 200 {
			outcome += " replay"
		}
	}
	r.h.counts[in.Kind.String()+" "+outcome]++
	if unexpected != "" {
		r.h.unexpected = append(r.h.unexpected, unexpected)
	}
}

// finish gives every unknown outcome a return time after the end of the history: it may have
// taken effect at any moment after it was called.
func (r *recorder) finish() history {
	r.mu.Lock()
	defer r.mu.Unlock()
	end := r.now() + 1
	for i := range r.h.ops {
		if r.h.ops[i].Output.(Output).Unknown {
			r.h.ops[i].Return = end
		}
	}
	return r.h
}

// run drives w's clients until the duration ends and returns the history.
func run(t *testing.T, w workload) history {
	t.Helper()
	tr := &http.Transport{MaxIdleConns: 4 * w.Clients, MaxIdleConnsPerHost: 2 * w.Clients, IdleConnTimeout: time.Minute}
	t.Cleanup(tr.CloseIdleConnections)
	hc := &http.Client{Transport: tr}
	// Calls with a short fuse go through connections of their own. Go's Transport returns a
	// connection to its pool as soon as it has read a response without a body (a DELETE's 204),
	// before the caller has it; a fuse that cancels the next call on that connection closes it,
	// and the first caller then waited for its answer until its own 10 s deadline. Seen three
	// times as "a DELETE without an answer": the server's side, recorded, had written the whole
	// 204 within 1.3 ms (golang/go#41600 is a race of the same family).
	ftr := &http.Transport{MaxIdleConns: w.Clients, MaxIdleConnsPerHost: w.Clients, IdleConnTimeout: time.Minute}
	t.Cleanup(ftr.CloseIdleConnections)
	fuseHC := &http.Client{Transport: ftr}
	rec := &recorder{start: time.Now(), h: history{counts: map[string]int{}}}
	minEnd, maxEnd := rec.start.Add(w.Duration), rec.start.Add(w.MaxDuration)
	var sent atomic.Int64
	more := func() bool {
		n, now := sent.Add(1), time.Now()
		switch {
		case now.After(maxEnd), w.MaxOps > 0 && n > int64(w.MaxOps):
			return false
		}
		return now.Before(minEnd) || n <= int64(w.MinOps)
	}
	var wg sync.WaitGroup
	for i := range w.Clients {
		c := &client{
			id: i, w: w, hc: hc, fuseHC: fuseHC, rec: rec,
			rng:  rand.New(rand.NewPCG(w.Seed, uint64(i))),
			held: map[string]lease{}, past: map[string][]lease{},
		}
		wg.Go(func() {
			for more() {
				c.next()
			}
		})
	}
	wg.Wait()
	return rec.finish()
}

// lease is a lease a client acquired: the ID of its begin and the token.
type lease struct {
	id    int
	token string
	// resp is the response of a complete whose outcome is unknown: the client retries the
	// same complete, as a real one would.
	resp *wireResponse
}

// client is one sequential client. It remembers the leases it holds and the ones it held
// before, so that it can also send stale tokens.
type client struct {
	id int
	w  workload
	hc *http.Client
	// fuseHC sends the calls with a short fuse (see run).
	fuseHC *http.Client
	rec    *recorder
	rng    *rand.Rand
	held   map[string]lease
	past   map[string][]lease
}

func (c *client) key() string {
	if c.rng.IntN(2) == 0 {
		return fmt.Sprintf("hot-%d", c.rng.IntN(min(16, c.w.Keys)))
	}
	return fmt.Sprintf("key-%d", c.rng.IntN(c.w.Keys))
}

// next sends one call.
func (c *client) next() {
	// A client that holds leases mostly works on them, as a real caller executes and completes.
	if len(c.held) > 0 && c.rng.IntN(10) < 6 {
		held := make([]string, 0, len(c.held))
		for k := range c.held {
			held = append(held, k)
		}
		sort.Strings(held)
		key := held[c.rng.IntN(len(held))]
		l := c.held[key]
		switch r := c.rng.IntN(100); {
		case r < 70:
			c.complete(key, l, false)
		case r < 80:
			c.renew(key, l)
		case r < 95:
			c.release(key, l)
		default:
			c.get(key)
		}
		return
	}
	key := c.key()
	if l, ok := c.held[key]; ok {
		c.complete(key, l, false)
		return
	}
	switch r := c.rng.IntN(100); {
	case r < 50:
		c.begin(key)
	case r < 68:
		c.get(key)
	case r < 92:
		// A token that is not (or no longer) the holder's: one this client held before on this
		// key, or one that no begin ever issued.
		l := lease{id: NoLease, token: "not-a-lease-" + fmt.Sprint(c.rng.Uint64())}
		if past := c.past[key]; len(past) > 0 && c.rng.IntN(4) > 0 {
			l = past[c.rng.IntN(len(past))]
		}
		switch c.rng.IntN(3) {
		case 0:
			c.complete(key, l, true)
		case 1:
			c.renew(key, l)
		default:
			c.release(key, l)
		}
	default:
		c.del(key)
	}
}

func (c *client) retire(key string, l lease) {
	delete(c.held, key)
	l.resp = nil
	past := append(c.past[key], l)
	if len(past) > 8 {
		past = past[1:]
	}
	c.past[key] = past
}

func (c *client) fingerprint(key string) string {
	switch r := c.rng.IntN(100); {
	case r < 85:
		return "fp-" + key
	case r < 95:
		return "fp-other"
	}
	return ""
}

func (c *client) begin(key string) {
	in := Input{Kind: Begin, Key: key, Fingerprint: c.fingerprint(key)}
	body := map[string]any{"fingerprint": in.Fingerprint, "lease_ms": 3_600_000, "ttl_ms": 3_600_000}
	if c.rng.IntN(10) == 0 {
		in.WaitMS = 20
		body["wait_ms"] = in.WaitMS
	}
	in.ID = int(c.rec.ids.Add(1))
	out, token := c.call(in, http.MethodPost, key, "/begin", body)
	if out.Status == 201 && token != "" {
		c.held[key] = lease{id: in.ID, token: token}
	}
}

// complete completes l. A stale complete may resend a response this lease completed with
// (then it must be 200 again when that complete landed) or send a new one.
func (c *client) complete(key string, l lease, stale bool) {
	resp := l.resp
	if stale && c.rng.IntN(2) == 0 {
		resp = nil // not the response this lease completed with
	}
	if resp == nil {
		resp = c.response()
	}
	in := Input{Kind: Complete, Key: key, Lease: l.id, Response: resp.canonical(), ID: int(c.rec.ids.Add(1))}
	out, _ := c.call(in, http.MethodPost, key, "/complete", map[string]any{"token": l.token, "response": resp})
	if stale {
		return
	}
	if out.Unknown {
		l.resp = resp
		c.held[key] = l
		return
	}
	c.retire(key, l)
	if out.Status == 200 {
		// Remember the response, so that a later stale complete can repeat it.
		p := c.past[key]
		p[len(p)-1].resp = resp
	}
}

func (c *client) renew(key string, l lease) {
	in := Input{Kind: Renew, Key: key, Lease: l.id, ID: int(c.rec.ids.Add(1))}
	out, _ := c.call(in, http.MethodPost, key, "/renew", map[string]any{"token": l.token, "lease_ms": 3_600_000})
	if _, held := c.held[key]; held && !out.Unknown && out.Status != 200 {
		c.retire(key, l)
	}
}

func (c *client) release(key string, l lease) {
	in := Input{Kind: Release, Key: key, Lease: l.id, ID: int(c.rec.ids.Add(1))}
	out, _ := c.call(in, http.MethodPost, key, "/release", map[string]any{"token": l.token})
	if _, held := c.held[key]; held && !out.Unknown {
		c.retire(key, l)
	}
}

func (c *client) get(key string) {
	c.call(Input{Kind: Get, Key: key, ID: int(c.rec.ids.Add(1))}, http.MethodGet, key, "", nil)
}

func (c *client) del(key string) {
	c.call(Input{Kind: Delete, Key: key, ID: int(c.rec.ids.Add(1))}, http.MethodDelete, key, "", nil)
}

// wireResponse is a stored response as complete sends it.
type wireResponse struct {
	Status  int                 `json:"status"`
	Headers map[string][]string `json:"headers,omitempty"`
	Body    []byte              `json:"body"`
}

func (r *wireResponse) canonical() string { return CanonicalResponse(r.Status, r.Headers, r.Body) }

// response makes a response with random bytes, so that a replay of the wrong one shows.
func (c *client) response() *wireResponse {
	statuses := []int{200, 201, 202, 400, 409, 500}
	r := &wireResponse{Status: statuses[c.rng.IntN(len(statuses))], Body: make([]byte, c.rng.IntN(48))}
	for i := range r.Body {
		r.Body[i] = byte(c.rng.Uint32())
	}
	if c.rng.IntN(2) == 0 {
		r.Headers = map[string][]string{"Content-Type": {"application/octet-stream"}}
		if c.rng.IntN(2) == 0 {
			r.Headers["X-Attempt"] = []string{fmt.Sprint(c.rng.IntN(5)), "x"}
		}
	}
	return r
}

// call sends one call, records it and returns what was observed and, for a record body, the
// lease token it showed.
func (c *client) call(in Input, method, key, suffix string, body any) (Output, string) {
	base := c.w.URLs[c.rng.IntN(len(c.w.URLs))]
	u := base + "/v1/keys/" + url.PathEscape(key) + suffix
	timeout, fuse := 10*time.Second, false
	if c.w.Fuses && c.rng.IntN(50) == 0 {
		fuse = true
		timeout = time.Duration(c.rng.IntN(3000)) * time.Microsecond
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			panic(err)
		}
		rd = bytes.NewReader(b)
	}
	// Where a call without an answer spent its time (a connection dialled or reused, the request
	// written or not), for the report: such a call once waited 10 s on a server that bounds its
	// store calls at 2 s, in a run on an overloaded machine.
	var trace callTrace
	ctx = httptrace.WithClientTrace(ctx, trace.hooks(time.Now()))
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		panic(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	callAt := c.rec.now()
	hc := c.hc
	if fuse {
		hc = c.fuseHC
	}
	out, token, unexpected := c.send(hc, req)
	retAt := c.rec.now()
	if out.Unknown && out.Status == 0 && !fuse {
		// Only a short fuse may cut a call off in a healthy run.
		unexpected = "no answer (" + trace.String() + "): " + unexpected
	} else if out.Unknown && out.Status == 0 {
		unexpected = ""
	}
	if unexpected != "" {
		unexpected = fmt.Sprintf("%s %s: %s", describe(in, out), u, unexpected)
	}
	c.rec.add(c.id, in, callAt, out, retAt, unexpected)
	return out, token
}

func (c *client) send(hc *http.Client, req *http.Request) (Output, string, string) {
	resp, err := hc.Do(req)
	if err != nil {
		return Output{Unknown: true}, "", err.Error()
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return Output{Unknown: true}, "", err.Error()
	}
	switch {
	case resp.StatusCode == http.StatusServiceUnavailable:
		// The store could not be reached or gave up (a short fuse ran out): unknown outcome.
		return Output{Unknown: true, Status: resp.StatusCode}, "", ""
	case resp.StatusCode >= 500:
		// Still an unknown outcome for the model, but an internal error is a bug.
		return Output{Unknown: true, Status: resp.StatusCode}, "", fmt.Sprintf("status %d: %q", resp.StatusCode, raw)
	}
	out := Output{Status: resp.StatusCode}
	switch resp.StatusCode {
	case 200, 201:
		var r struct {
			Key         string `json:"key"`
			State       string `json:"state"`
			Fingerprint string `json:"fingerprint"`
			Lease       *struct {
				Token string `json:"token"`
				Fence uint64 `json:"fence"`
			} `json:"lease"`
			Response *wireResponse `json:"response"`
		}
		if err := json.Unmarshal(raw, &r); err != nil {
			return out, "", fmt.Sprintf("record body does not parse: %v: %q", err, raw)
		}
		out.Key, out.State, out.Fingerprint = r.Key, r.State, r.Fingerprint
		token := ""
		if r.Lease != nil {
			out.Fence, token, out.TokenShown = r.Lease.Fence, r.Lease.Token, r.Lease.Token != ""
		}
		if r.Response != nil {
			out.HasResponse, out.Response = true, r.Response.canonical()
		}
		return out, token, ""
	case 204:
		return out, "", ""
	}
	var p struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(raw, &p); err != nil || !strings.HasPrefix(p.Type, "urn:idemsvc:problem:") {
		return out, "", fmt.Sprintf("problem body does not parse: %q", raw)
	}
	out.Problem = strings.TrimPrefix(p.Type, "urn:idemsvc:problem:")
	switch out.Status {
	case 404, 409, 422:
		return out, "", ""
	}
	return out, "", fmt.Sprintf("status %d is not an outcome of these calls: %q", out.Status, raw)
}

// check checks h with porcupine and returns the result; on a violation it writes the
// visualization to dir and returns its path.
func check(t *testing.T, h history, dir string) (porcupine.CheckResult, string) {
	t.Helper()
	res, info := porcupine.CheckOperationsVerbose(Model, h.ops, 5*time.Minute)
	if res == porcupine.Ok {
		return res, ""
	}
	path := filepath.Join(dir, "linearizability.html")
	if err := porcupine.VisualizePath(Model, info, path); err != nil {
		t.Errorf("visualize: %v", err)
		return res, ""
	}
	return res, path
}

// summary is a one-line account of a history's outcomes, most frequent first.
func (h history) summary() string {
	type kv struct {
		k string
		v int
	}
	var all []kv
	for k, v := range h.counts {
		all = append(all, kv{k, v})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].v > all[j].v || all[i].v == all[j].v && all[i].k < all[j].k })
	parts := make([]string, len(all))
	for i, e := range all {
		parts[i] = fmt.Sprintf("%s=%d", e.k, e.v)
	}
	return strings.Join(parts, ", ")
}

// unknowns counts the calls whose outcome is unknown.
func (h history) unknowns() int {
	n := 0
	for _, op := range h.ops {
		if op.Output.(Output).Unknown {
			n++
		}
	}
	return n
}

// callTrace records when a call reached each step of its exchange, as offsets from its start.
type callTrace struct {
	mu                                         sync.Mutex
	start                                      time.Time
	reused                                     bool
	local                                      string
	gotConn, dialStart, dialDone, wrote, first time.Duration
	dialErr, writeErr                          error
}

func (c *callTrace) hooks(start time.Time) *httptrace.ClientTrace {
	c.start = start
	at := func(d *time.Duration) {
		c.mu.Lock()
		*d = time.Since(c.start)
		c.mu.Unlock()
	}
	return &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) {
			at(&c.gotConn)
			c.mu.Lock()
			c.reused = i.Reused
			c.local = i.Conn.LocalAddr().String()
			c.mu.Unlock()
		},
		ConnectStart: func(string, string) { at(&c.dialStart) },
		ConnectDone: func(_, _ string, err error) {
			at(&c.dialDone)
			c.mu.Lock()
			c.dialErr = err
			c.mu.Unlock()
		},
		WroteRequest: func(i httptrace.WroteRequestInfo) {
			at(&c.wrote)
			c.mu.Lock()
			c.writeErr = i.Err
			c.mu.Unlock()
		},
		GotFirstResponseByte: func() { at(&c.first) },
	}
}

// String says which steps the call reached, and when (0: not reached).
func (c *callTrace) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return fmt.Sprintf("connection %s reused %v at %v, dial %v to %v (%v), request written at %v (%v), first byte at %v",
		c.local, c.reused, c.gotConn, c.dialStart, c.dialDone, c.dialErr, c.wrote, c.writeErr, c.first)
}
