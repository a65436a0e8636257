package crash

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// TestMain runs this test binary as a deliberately broken server when the harness asks for one
// (see childEnv); otherwise it runs the tests.
func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		os.Exit(runChild(mode, os.Getenv(childDirEnv)))
	}
	os.Exit(m.Run())
}

// TestKill9 is the proof: the real binary, killed with SIGKILL under load again and again,
// never loses an acknowledged begin or complete, and its file passes bbolt's check after every
// kill and after a clean stop.
func TestKill9(t *testing.T) {
	cfg := config{cycles: 10, workers: 16, minLoad: 50 * time.Millisecond, maxLoad: 300 * time.Millisecond}
	if os.Getenv("IDEMSVC_PROOFS") == "long" {
		cfg.cycles = 200
	}
	bin := buildServer(t)
	dir := t.TempDir()
	starts := 0
	cfg.command = func() *exec.Cmd {
		cmd := exec.Command(bin)
		// Every other start carries the write-ahead log into the bbolt file every 5 ms, so that
		// kills land during checkpoints more often than at the default, 100 ms.
		interval := "100ms"
		if starts++; starts%2 == 0 {
			interval = "5ms"
		}
		// Only what the service reads: an unknown IDEMSVC_* variable (IDEMSVC_TEST_*, say)
		// would stop it at start.
		cmd.Env = []string{
			"IDEMSVC_ADDR=127.0.0.1:0",
			"IDEMSVC_BACKEND=bolt",
			"IDEMSVC_DATA_DIR=" + dir,
			"IDEMSVC_LOG_LEVEL=info", // the "listening" line is at info
			"IDEMSVC_BOLT_CHECKPOINT_INTERVAL=" + interval,
		}
		return cmd
	}
	cfg.dbPath = filepath.Join(dir, bolt.FileName)

	began := time.Now()
	r := runCycles(t, cfg)
	t.Logf("crash: cycles=%d acknowledged=%d in_doubt=%d lost=%d check_errors=%d (kills that caught writes in flight: %d; %s)",
		r.cycles, r.acknowledged, r.inDoubt, r.lost, r.checkErrors, r.killsInFlight, time.Since(began).Round(time.Millisecond))
	if r.lost > 0 || r.checkErrors > 0 {
		t.Errorf("crash: %d acknowledged writes lost, %d consistency errors", r.lost, r.checkErrors)
	}
	if r.acknowledged == 0 || r.killsInFlight == 0 {
		t.Errorf("crash: %d acknowledged, %d kills during writes: the run proves nothing", r.acknowledged, r.killsInFlight)
	}
}

// TestHarnessCatchesEarlyAck shows that the proof fails when its guarantee is broken: a server
// that answers complete 200 before its write is committed (it writes 100 ms later) must be
// caught losing acknowledged completes when it is killed.
func TestHarnessCatchesEarlyAck(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := config{
		cycles: 3, workers: 8, minLoad: 200 * time.Millisecond, maxLoad: 300 * time.Millisecond,
		dbPath: filepath.Join(dir, bolt.FileName),
		command: func() *exec.Cmd {
			cmd := exec.Command(self)
			cmd.Env = []string{childEnv + "=" + childEarlyAck, childDirEnv + "=" + dir}
			return cmd
		},
		expectLoss: true,
	}
	r := runCycles(t, cfg)
	t.Logf("crash (broken on purpose: complete acknowledged before it is written): cycles=%d acknowledged=%d lost=%d check_errors=%d",
		r.cycles, r.acknowledged, r.lost, r.checkErrors)
	if r.lost == 0 {
		t.Errorf("the harness did not notice a server that acknowledges completes before writing them")
	}
}

// config is one run of the harness.
type config struct {
	cycles  int
	workers int
	// The load runs for a random time in [minLoad, maxLoad) before the kill.
	minLoad, maxLoad time.Duration
	// command returns a new command that serves the data directory; it must log a JSON line
	// {"msg":"listening","addr":"HOST:PORT"} on stdout or stderr.
	command func() *exec.Cmd
	// dbPath is the bbolt file, checked after every kill.
	dbPath string
	// expectLoss: the server is broken on purpose; losses are counted, not reported one by one.
	expectLoss bool
}

type result struct {
	cycles, acknowledged, inDoubt, lost, checkErrors, killsInFlight int
}

// entry is a key a worker wrote: its begin was answered 201, and its complete either 200
// (acked) or not at all (in doubt: the process died first).
type entry struct {
	key   string
	resp  wireResponse
	acked bool
}

// runCycles runs cfg: cycles of start (verifying what earlier cycles acknowledged), load and
// SIGKILL, each followed by bbolt's check; then a last start that verifies everything, a clean
// stop and a last check.
func runCycles(t *testing.T, cfg config) result {
	t.Helper()
	seed := rand.Uint64()
	rng := rand.New(rand.NewPCG(seed, 0))
	t.Logf("seed %d", seed)
	var (
		r       result
		all     []entry // every entry so far
		pending []entry // entries of the last cycle
		lost    = map[string]bool{}
	)
	verifyEach := func(p *proc, entries []entry) {
		for _, l := range verify(p.url, entries) {
			if lost[l.key] {
				continue
			}
			lost[l.key] = true
			if r.lost++; !cfg.expectLoss && r.lost <= 20 {
				t.Errorf("lost: %s", l.problem)
			}
		}
	}
	for cycle := range cfg.cycles {
		p := start(t, cfg.command())
		// Every key is read back after every kill while there are few; then the last cycle's
		// keys and a sample of the older ones. Every key is read back at the end.
		if len(all) <= 5000 {
			verifyEach(p, all)
		} else {
			sample := slices.Clone(pending)
			for range 1000 {
				sample = append(sample, all[rng.IntN(len(all))])
			}
			verifyEach(p, sample)
		}
		load := cfg.minLoad + time.Duration(rng.Int64N(int64(cfg.maxLoad-cfg.minLoad)))
		entries := drive(t, p, cycle, cfg.workers, load, rng.Uint64())
		p.kill(t)
		pending = entries
		all = append(all, entries...)
		inDoubt := 0
		for _, e := range entries {
			if e.acked {
				r.acknowledged++
			} else {
				inDoubt++
			}
		}
		r.inDoubt += inDoubt
		if inDoubt > 0 {
			r.killsInFlight++
		}
		r.cycles++
		r.checkErrors += checkFile(t, cfg.dbPath)
		if r.cycles%50 == 0 {
			t.Logf("after %d kills: %d acknowledged, %d lost", r.cycles, r.acknowledged, r.lost)
		}
	}
	p := start(t, cfg.command())
	verifyEach(p, all)
	p.stop(t, cfg.expectLoss)
	r.checkErrors += checkFile(t, cfg.dbPath)
	return r
}

// drive runs workers that begin and complete fresh keys for the load time, then returns what
// they wrote. The caller kills the server right after, while requests are in flight.
func drive(t *testing.T, p *proc, cycle, workers int, load time.Duration, seed uint64) []entry {
	var (
		mu      sync.Mutex
		entries []entry
		wg      sync.WaitGroup
	)
	stop := make(chan struct{})
	for w := range workers {
		rng := rand.New(rand.NewPCG(seed, uint64(w)))
		wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				key := fmt.Sprintf("c%03d-w%02d-%06d/%x", cycle, w, n, rng.Uint32())
				status, _, err := p.post(key, "/begin", map[string]any{"fingerprint": "fp-" + key})
				if err != nil {
					return // the server is gone
				}
				if status != http.StatusCreated {
					t.Errorf("begin %s: status %d, want 201", key, status)
					return
				}
				e := entry{key: key, resp: randomResponse(rng)}
				status, body, err := p.post(key, "/complete", map[string]any{"token": p.lastToken(key), "response": e.resp})
				e.acked = err == nil && status == http.StatusOK
				if err == nil && status != http.StatusOK {
					t.Errorf("complete %s: status %d, want 200: %s", key, status, body)
					return
				}
				mu.Lock()
				entries = append(entries, e)
				mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
	// The kill comes at a random moment while the workers run; a pending complete is in doubt.
	time.Sleep(load)
	p.killNow()
	close(stop)
	wg.Wait()
	return entries
}

// verify reads every entry back and returns a description of each that is not as acknowledged:
// an acked complete must be completed with exactly its response; an in-doubt one (its begin was
// acknowledged) must exist, in progress or completed with exactly its response.
func verify(base string, entries []entry) []loss {
	var (
		mu       sync.Mutex
		problems []loss
		wg       sync.WaitGroup
	)
	work := make(chan entry)
	hc := &http.Client{Timeout: 10 * time.Second}
	for range 16 {
		wg.Go(func() {
			for e := range work {
				if problem := verifyOne(hc, base, e); problem != "" {
					mu.Lock()
					problems = append(problems, loss{e.key, problem})
					mu.Unlock()
				}
			}
		})
	}
	for _, e := range entries {
		work <- e
	}
	close(work)
	wg.Wait()
	hc.CloseIdleConnections()
	slices.SortFunc(problems, func(a, b loss) int { return strings.Compare(a.key, b.key) })
	return problems
}

// loss is an entry that is not as it was acknowledged.
type loss struct{ key, problem string }

func verifyOne(hc *http.Client, base string, e entry) string {
	what := "in-doubt complete (acknowledged begin)"
	if e.acked {
		what = "acknowledged complete"
	}
	resp, err := hc.Get(base + "/v1/keys/" + url.PathEscape(e.key))
	if err != nil {
		return fmt.Sprintf("%s %s: GET: %v", what, e.key, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Sprintf("%s %s: GET answered %d: %s", what, e.key, resp.StatusCode, raw)
	}
	var rec struct {
		State    string        `json:"state"`
		Response *wireResponse `json:"response"`
	}
	if err := json.Unmarshal(raw, &rec); err != nil {
		return fmt.Sprintf("%s %s: GET body: %v", what, e.key, err)
	}
	switch {
	case rec.State == "completed" && rec.Response != nil && rec.Response.equal(e.resp):
		return ""
	case rec.State == "in_progress" && !e.acked:
		return ""
	}
	return fmt.Sprintf("%s %s: stored %s, want completed with %d %v %q", what, e.key, raw, e.resp.Status, e.resp.Headers, e.resp.Body)
}

// checkFile runs bbolt's consistency check on the file, opened read-only as the crash left it,
// reports every error and returns how many there were.
func checkFile(t *testing.T, path string) int {
	t.Helper()
	errs := consistencyErrors(path)
	for _, err := range errs {
		t.Errorf("bbolt check: %s: %v", path, err)
	}
	return len(errs)
}

// consistencyErrors opens the bbolt file at path read-only and returns what tx.Check finds
// (or why the file cannot be opened).
func consistencyErrors(path string) []error {
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		return []error{fmt.Errorf("open: %w", err)}
	}
	defer db.Close()
	var errs []error
	err = db.View(func(tx *bbolt.Tx) error {
		for err := range tx.Check() {
			errs = append(errs, err)
		}
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	return errs
}

// wireResponse is a stored response as complete sends it and get shows it.
type wireResponse struct {
	Status  int                 `json:"status"`
	Headers map[string][]string `json:"headers,omitempty"`
	Body    []byte              `json:"body"`
}

func (r wireResponse) equal(o wireResponse) bool {
	return r.Status == o.Status && bytes.Equal(r.Body, o.Body) &&
		maps.EqualFunc(r.Headers, o.Headers, slices.Equal[[]string])
}

func randomResponse(rng *rand.Rand) wireResponse {
	r := wireResponse{Status: 200 + rng.IntN(3), Body: make([]byte, 1+rng.IntN(512))}
	for i := range r.Body {
		r.Body[i] = byte(rng.Uint32())
	}
	if rng.IntN(2) == 0 {
		r.Headers = map[string][]string{"Content-Type": {"application/octet-stream"}, "X-Order": {fmt.Sprint(rng.Uint32())}}
	}
	return r
}

// buildServer builds the real idemsvc binary into a temporary directory.
func buildServer(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "idemsvc")
	goTool, err := exec.LookPath("go") // go test puts its own go first on PATH
	if err != nil {
		t.Fatalf("build idemsvc: %v", err)
	}
	cmd := exec.Command(goTool, "build", "-o", bin, "github.com/idemsvc/idemsvc/cmd/idemsvc")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build idemsvc: %v\n%s", err, out)
	}
	return bin
}

// proc is a running server process.
type proc struct {
	cmd    *exec.Cmd
	url    string
	hc     *http.Client
	exited chan struct{}
	log    *tail

	mu     sync.Mutex
	tokens map[string]string // key -> token of the begin that acquired it
}

// start starts cmd and waits until it logs its listening address.
func start(t *testing.T, cmd *exec.Cmd) *proc {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = w, w
	dieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	_ = w.Close()
	p := &proc{cmd: cmd, exited: make(chan struct{}), log: &tail{}, tokens: map[string]string{}}
	t.Cleanup(func() { p.killNow(); <-p.exited })
	addr := make(chan string, 1)
	go func() {
		defer r.Close()
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		found := false
		for sc.Scan() {
			line := sc.Bytes()
			p.log.add(string(line))
			if found || !bytes.Contains(line, []byte(`"listening"`)) {
				continue
			}
			var l struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			if json.Unmarshal(line, &l) == nil && l.Msg == "listening" && l.Addr != "" {
				found = true
				addr <- l.Addr
			}
		}
		_, _ = io.Copy(io.Discard, r)
	}()
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()
	select {
	case a := <-addr:
		p.url = "http://" + a
	case <-p.exited:
		t.Fatalf("server exited before listening (%v):\n%s", cmd.ProcessState, p.log)
	case <-time.After(30 * time.Second):
		t.Fatalf("server did not log its address within 30s:\n%s", p.log)
	}
	p.hc = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	return p
}

// killNow sends SIGKILL; it is safe to call more than once.
func (p *proc) killNow() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
}

// kill sends SIGKILL and waits for the process to be gone.
func (p *proc) kill(t *testing.T) {
	t.Helper()
	p.killNow()
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("server did not die of SIGKILL within 30s")
	}
	p.hc.CloseIdleConnections()
}

// stop sends SIGTERM and waits for a clean exit.
func (p *proc) stop(t *testing.T, broken bool) {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("server did not stop within 30s of SIGTERM:\n%s", p.log)
	}
	p.hc.CloseIdleConnections()
	if st := p.cmd.ProcessState; !broken && !st.Success() {
		t.Errorf("server did not exit cleanly on SIGTERM (%v):\n%s", st, p.log)
	}
}

// post sends a JSON POST to /v1/keys/{key}{suffix} and returns the status and body; err is set
// only when no answer arrived. A begin's token is kept for lastToken.
func (p *proc) post(key, suffix string, body any) (int, []byte, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return 0, nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.url+"/v1/keys/"+url.PathEscape(key)+suffix, bytes.NewReader(b))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := p.hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil && resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusCreated {
		return 0, nil, err
	}
	// The status line arrived: the server decided, and for 200 and 201 committed, before it
	// answered. A body cut short by the kill does not undo that.
	if suffix == "/begin" && resp.StatusCode == http.StatusCreated {
		var rec struct {
			Lease struct {
				Token string `json:"token"`
			} `json:"lease"`
		}
		if err := json.Unmarshal(raw, &rec); err != nil {
			return 0, nil, fmt.Errorf("begin %s: 201 without a readable record (%v): the token is unknown", key, err)
		}
		p.mu.Lock()
		p.tokens[key] = rec.Lease.Token
		p.mu.Unlock()
	}
	return resp.StatusCode, raw, nil
}

func (p *proc) lastToken(key string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tokens[key]
}

// tail keeps the last lines a process wrote, for failure messages.
type tail struct {
	mu    sync.Mutex
	lines []string
}

func (l *tail) add(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lines = append(l.lines, s); len(l.lines) > 40 {
		l.lines = l.lines[1:]
	}
}

func (l *tail) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}
