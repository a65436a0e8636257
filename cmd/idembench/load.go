package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Operations, for status counts and per-operation latency.
const (
	opBegin = iota
	opComplete
	numOps
)

var opNames = [numOps]string{"begin", "complete"}

// fingerprint is sent with every begin: the shape of the Go client's SHA-256 in hex. One value
// for every key is enough; a fingerprint is compared per key.
const fingerprint = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

// config is one load run.
type config struct {
	url        *url.URL
	token      string
	scenario   string
	conns      int
	duration   time.Duration
	warmup     time.Duration
	maxReqs    int64
	keys       int // contend: number of contended keys
	preload    int // replay and mixed: completed keys created before the run
	bodyBytes  int
	ttlMS      int64
	timeout    time.Duration
	clientKind string
	label      string
	keyPrefix  string
	serverPID  int    // for CPU accounting; 0: none
	redisAddr  string // for CPU accounting (INFO cpu); "": none
}

// run is the shared state of one load run.
type run struct {
	cfg       config
	prefix    string // unique per run, so that runs never share keys
	beginBody []byte
	// complete body = completeHead + token + completeTail
	completeHead, completeTail []byte

	claimed   atomic.Int64 // requests claimed, against cfg.maxReqs
	stop      atomic.Bool
	recording atomic.Bool
	gens      []atomic.Uint64 // contend: the generation of each contended key

	failOnce sync.Once
	failure  string
}

// worker is one closed-loop client: it owns its connection, buffers, counters and histograms,
// so the hot path shares nothing but two atomics.
type worker struct {
	r        *run
	id       int
	cl       client
	rng      *rand.Rand
	resp     response
	path     []byte
	body     []byte
	token    []byte
	seq      uint64
	statuses [numOps][600]uint64
	hist     [numOps]hist
	reqs     uint64 // recorded (after warmup) requests
	pairs    uint64 // recorded begin(201)+complete(200)
	replays  uint64 // recorded begin(200 replayed)
	errors   uint64 // transport errors
}

func newRun(cfg config) *run {
	r := &run{cfg: cfg}
	var rb [4]byte
	for i := range rb {
		rb[i] = byte(rand.Uint32())
	}
	r.prefix = cfg.keyPrefix + strconv.FormatInt(time.Now().Unix()%1e6, 36) + fmt.Sprintf("%x", rb)
	r.beginBody = fmt.Appendf(nil, `{"fingerprint":%q,"ttl_ms":%d}`, fingerprint, cfg.ttlMS)
	r.completeHead = []byte(`{"token":"`)
	stored := bytes.Repeat([]byte("x"), cfg.bodyBytes)
	r.completeTail = fmt.Appendf(nil, `","response":{"status":201,"headers":{"Content-Type":["application/json"]},"body":%q}}`,
		base64.StdEncoding.EncodeToString(stored))
	r.gens = make([]atomic.Uint64, max(cfg.keys, 1))
	return r
}

// fail records the first failure and stops the run.
func (r *run) fail(format string, args ...any) {
	r.failOnce.Do(func() { r.failure = fmt.Sprintf(format, args...) })
	r.stop.Store(true)
}

// claim takes n requests from the -n budget; false means the budget or the time is spent.
func (r *run) claim(n int64) bool {
	if r.stop.Load() {
		return false
	}
	if r.cfg.maxReqs > 0 && r.claimed.Add(n) > r.cfg.maxReqs {
		r.stop.Store(true)
		return false
	}
	return true
}

// keyPath builds "/v1/keys/{kind}-{prefix}-{a}-{b}/{action}" into w.path.
// Keys of kind 'R' are replay keys: the baseline server answers begin on them as a replay.
func (w *worker) keyPath(kind byte, a, b uint64, action string) []byte {
	p := append(w.path[:0], "/v1/keys/"...)
	p = append(p, kind, '-')
	p = append(p, w.r.prefix...)
	p = append(p, '-')
	p = strconv.AppendUint(p, a, 36)
	p = append(p, '-')
	p = strconv.AppendUint(p, b, 36)
	p = append(p, '/')
	p = append(p, action...)
	w.path = p
	return p
}

// send does one request, counts its status and, while recording, its latency. It returns false
// when the run must stop (transport error).
func (w *worker) send(op int, method string, path, body []byte) bool {
	start := time.Now()
	err := w.cl.do(method, path, body, &w.resp)
	lat := time.Since(start)
	if err != nil {
		if w.r.stop.Load() {
			return false // the run is over; errors from its end do not count
		}
		w.errors++
		w.r.fail("transport error on %s %s: %v", method, path, err)
		return false
	}
	s := w.resp.status
	if s < 0 || s >= 600 {
		s = 0
	}
	w.statuses[op][s]++
	if w.r.recording.Load() {
		w.hist[op].record(lat)
		w.reqs++
	}
	return true
}

func (w *worker) unexpected(what string, path []byte) {
	body := w.resp.body
	if len(body) > 512 {
		body = body[:512]
	}
	w.r.fail("unexpected %s: status %d on %s, body: %s", what, w.resp.status, path, body)
}

// extractToken copies lease.token from a begin response into w.token.
func (w *worker) extractToken() bool {
	b := w.resp.body
	const marker = `"token":"`
	if i := bytes.Index(b, []byte(marker)); i >= 0 {
		rest := b[i+len(marker):]
		if j := bytes.IndexByte(rest, '"'); j > 0 {
			w.token = append(w.token[:0], rest[:j]...)
			return true
		}
	}
	var rec struct {
		Lease struct {
			Token string `json:"token"`
		} `json:"lease"`
	}
	if json.Unmarshal(b, &rec) != nil || rec.Lease.Token == "" {
		return false
	}
	w.token = append(w.token[:0], rec.Lease.Token...)
	return true
}

// pair does begin on a fresh key, expecting 201, then complete, expecting 200.
func (w *worker) pair(kind byte) bool {
	if !w.r.claim(2) {
		return false
	}
	w.seq++
	return w.beginComplete(kind, uint64(w.id), w.seq, nil)
}

// beginComplete does begin then complete on one key. Begin must answer 201, or, when onReplay is
// not nil, 200 replayed (a key created before), which ends the step with onReplay's answer.
func (w *worker) beginComplete(kind byte, a, b uint64, onReplay func() bool) bool {
	path := w.keyPath(kind, a, b, "begin")
	if !w.send(opBegin, "POST", path, w.r.beginBody) {
		return false
	}
	switch {
	case w.resp.status == 201:
	case w.resp.status == 200 && w.resp.replayed && onReplay != nil:
		return onReplay()
	default:
		w.unexpected("begin", path)
		return false
	}
	if !w.extractToken() {
		w.unexpected("begin body (no lease.token)", path)
		return false
	}
	w.body = append(w.body[:0], w.r.completeHead...)
	w.body = append(w.body, w.token...)
	w.body = append(w.body, w.r.completeTail...)
	path = w.keyPath(kind, a, b, "complete")
	if !w.send(opComplete, "POST", path, w.body) {
		return false
	}
	if w.resp.status != 200 {
		w.unexpected("complete", path)
		return false
	}
	if w.r.recording.Load() {
		w.pairs++
	}
	return true
}

// replay does begin on a completed key, expecting 200 with Idempotent-Replayed: true.
func (w *worker) replay() bool {
	if !w.r.claim(1) {
		return false
	}
	k := uint64(w.rng.IntN(w.r.cfg.preload))
	path := w.keyPath('R', k, 0, "begin")
	if !w.send(opBegin, "POST", path, w.r.beginBody) {
		return false
	}
	if w.resp.status != 200 || !w.resp.replayed {
		w.unexpected("replay (want 200 with Idempotent-Replayed: true)", path)
		return false
	}
	if w.r.recording.Load() {
		w.replays++
	}
	return true
}

// contend does begin on one of a few keys. Each key has a generation: the worker that acquires
// (201) completes it and moves the key to its next generation, so contention never ends.
// Others see 409 in-progress (the holder is between begin and complete) or 200 (completed,
// generation not yet moved). A closed loop: a 409 is not retried after Retry-After, the worker
// simply goes on.
func (w *worker) contend() bool {
	// Claim the complete too, so that a holder always completes (a lease left behind would
	// answer 409 for its whole lease time); a begin that does not acquire gives it back.
	if !w.r.claim(2) {
		return false
	}
	slot := w.rng.IntN(len(w.r.gens))
	gen := w.r.gens[slot].Load()
	path := w.keyPath('C', uint64(slot), gen, "begin")
	if !w.send(opBegin, "POST", path, w.r.beginBody) {
		return false
	}
	if w.resp.status != 201 {
		w.r.claimed.Add(-1)
	}
	switch w.resp.status {
	case 200:
		if !w.resp.replayed {
			w.unexpected("contend begin 200 without Idempotent-Replayed", path)
			return false
		}
		if w.r.recording.Load() {
			w.replays++
		}
		return true
	case 409:
		return true
	case 201:
	default:
		w.unexpected("contend begin", path)
		return false
	}
	if !w.extractToken() {
		w.unexpected("begin body (no lease.token)", path)
		return false
	}
	w.body = append(w.body[:0], w.r.completeHead...)
	w.body = append(w.body, w.token...)
	w.body = append(w.body, w.r.completeTail...)
	path = w.keyPath('C', uint64(slot), gen, "complete")
	if !w.send(opComplete, "POST", path, w.body) {
		return false
	}
	if w.resp.status != 200 {
		w.unexpected("contend complete", path)
		return false
	}
	w.r.gens[slot].CompareAndSwap(gen, gen+1)
	if w.r.recording.Load() {
		w.pairs++
	}
	return true
}

// mixed is a blend: 60% replays, 30% pairs on fresh keys, 10% contended begins.
func (w *worker) mixed() bool {
	switch x := w.rng.IntN(10); {
	case x < 6:
		return w.replay()
	case x < 9:
		return w.pair('P')
	default:
		return w.contend()
	}
}

// preload creates cfg.preload completed replay keys with cfg.conns workers. It is not measured
// and not counted against -n.
func (r *run) preload(newClient func() (client, error)) error {
	n := r.cfg.preload
	workers := min(r.cfg.conns, n, 64)
	var next atomic.Int64
	errs := make(chan error, workers)
	for i := range workers {
		go func() {
			cl, err := newClient()
			if err != nil {
				errs <- err
				return
			}
			defer cl.close()
			w := &worker{r: r, id: i, cl: cl}
			for {
				k := next.Add(1) - 1
				if k >= int64(n) || r.stop.Load() {
					break
				}
				if !w.beginComplete('R', uint64(k), 0, func() bool { return true }) {
					break
				}
			}
			errs <- nil
		}()
	}
	for range workers {
		if err := <-errs; err != nil {
			return err
		}
	}
	if r.failure != "" {
		return fmt.Errorf("preload: %s", r.failure)
	}
	return nil
}

// result is the outcome of one run, as printed by -json.
type result struct {
	Label       string             `json:"label,omitempty"`
	Scenario    string             `json:"scenario"`
	URL         string             `json:"url"`
	Client      string             `json:"client"`
	Conns       int                `json:"conns"`
	Seconds     float64            `json:"seconds"` // measured window, warmup excluded
	Requests    uint64             `json:"requests"`
	Pairs       uint64             `json:"pairs"`
	Replays     uint64             `json:"replays"`
	RPS         float64            `json:"rps"`
	PairsPerSec float64            `json:"pairs_per_sec"`
	Latency     latency            `json:"latency"`
	PerOp       map[string]latency `json:"per_op"`
	Statuses    map[string]uint64  `json:"statuses"` // "begin 201": count, warmup included
	CPU         cpuUse             `json:"cpu"`
	Commits     *commitUse         `json:"commits,omitempty"` // idemsvc on bbolt: its group commit
	Errors      uint64             `json:"errors"`
	Failed      bool               `json:"failed"`
	Failure     string             `json:"failure,omitempty"`
	Args        []string           `json:"args,omitempty"`
}

type latency struct {
	N      uint64  `json:"n"`
	MeanUS float64 `json:"mean_us"`
	P50US  float64 `json:"p50_us"`
	P90US  float64 `json:"p90_us"`
	P99US  float64 `json:"p99_us"`
	P999US float64 `json:"p999_us"`
	MaxUS  float64 `json:"max_us"`
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

func latencyOf(h *hist) latency {
	return latency{
		N: h.n, MeanUS: us(h.mean()),
		P50US: us(h.quantile(0.50)), P90US: us(h.quantile(0.90)),
		P99US: us(h.quantile(0.99)), P999US: us(h.quantile(0.999)),
		MaxUS: us(time.Duration(h.max)),
	}
}

// load runs one scenario and returns its result; the result's Failed says whether an unexpected
// status or a transport error ended it.
func load(cfg config) (*result, error) {
	r := newRun(cfg)
	mk := func() (client, error) { return newClient(cfg.clientKind, cfg.url, cfg.token, cfg.timeout) }
	var step func(w *worker) bool
	switch cfg.scenario {
	case "pair":
		step = func(w *worker) bool { return w.pair('P') }
	case "replay":
		step = (*worker).replay
	case "contend":
		step = (*worker).contend
	case "mixed":
		step = (*worker).mixed
	default:
		return nil, fmt.Errorf("unknown -scenario %q (want pair, replay, contend or mixed)", cfg.scenario)
	}
	if cfg.scenario == "replay" || cfg.scenario == "mixed" {
		if err := r.preload(mk); err != nil {
			// A result, not an error: a report lists it among the failed runs.
			return &result{
				Label: cfg.label, Scenario: cfg.scenario, URL: cfg.url.String(), Client: cfg.clientKind, Conns: cfg.conns,
				PerOp: map[string]latency{}, Statuses: map[string]uint64{}, Failed: true, Failure: err.Error(),
			}, nil
		}
	}

	workers := make([]*worker, cfg.conns)
	for i := range workers {
		cl, err := mk()
		if err != nil {
			return nil, err
		}
		workers[i] = &worker{r: r, id: i, cl: cl, rng: rand.New(rand.NewPCG(uint64(i), uint64(time.Now().UnixNano())))}
	}
	var wg sync.WaitGroup
	var cpu0 cpuSnap
	var commits0 commitSnap
	var measureStart time.Time
	startMeasuring := func() {
		commits0 = takeCommits(cfg.url)
		cpu0 = takeCPU(cfg.serverPID, cfg.redisAddr)
		measureStart = time.Now()
		r.recording.Store(true)
	}
	if cfg.warmup <= 0 {
		startMeasuring() // before the workers start, so that no request escapes the record
	}
	for _, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer w.cl.close()
			for step(w) {
			}
		}()
	}
	if cfg.warmup > 0 {
		sleepUnlessStopped(r, cfg.warmup)
		startMeasuring()
	}
	sleepUnlessStopped(r, cfg.duration)
	r.recording.Store(false)
	elapsed := time.Since(measureStart)
	cpu1 := takeCPU(cfg.serverPID, cfg.redisAddr)
	commits1 := takeCommits(cfg.url)
	r.stop.Store(true)
	wg.Wait()

	res := &result{
		Label: cfg.label, Scenario: cfg.scenario, URL: cfg.url.String(), Client: cfg.clientKind,
		Conns: cfg.conns, Seconds: elapsed.Seconds(),
		PerOp: map[string]latency{}, Statuses: map[string]uint64{},
	}
	var all hist
	var perOp [numOps]hist
	for _, w := range workers {
		res.Requests += w.reqs
		res.Pairs += w.pairs
		res.Replays += w.replays
		res.Errors += w.errors
		for op := range numOps {
			perOp[op].merge(&w.hist[op])
			all.merge(&w.hist[op])
			for s, c := range w.statuses[op] {
				if c > 0 {
					res.Statuses[opNames[op]+" "+strconv.Itoa(s)] += c
				}
			}
		}
	}
	res.CPU = cpuBetween(cpu0, cpu1, res.Requests)
	res.Commits = commitsBetween(commits0, commits1, elapsed.Seconds())
	res.Latency = latencyOf(&all)
	for op := range numOps {
		if perOp[op].n > 0 {
			res.PerOp[opNames[op]] = latencyOf(&perOp[op])
		}
	}
	res.RPS = float64(res.Requests) / elapsed.Seconds()
	res.PairsPerSec = float64(res.Pairs) / elapsed.Seconds()
	if r.failure != "" {
		res.Failed, res.Failure = true, r.failure
	}
	return res, nil
}

// sleepUnlessStopped sleeps for d, or less when the run stops (-n reached, or a failure).
func sleepUnlessStopped(r *run, d time.Duration) {
	deadline := time.Now().Add(d)
	for !r.stop.Load() {
		left := time.Until(deadline)
		if left <= 0 {
			return
		}
		time.Sleep(min(left, 20*time.Millisecond))
	}
}
