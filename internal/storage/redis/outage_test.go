package redis

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

// Outages. These tests run their own redis-server on a free port, which they stop, freeze and
// restart; they never touch the shared one.

// wantUnavailable checks that err wraps keys.ErrUnavailable and took at most limit.
func wantUnavailable(t *testing.T, what string, err error, took, limit time.Duration) {
	t.Helper()
	if !errors.Is(err, keys.ErrUnavailable) {
		t.Errorf("%s: %v, want ErrUnavailable", what, err)
	}
	if took > limit {
		t.Errorf("%s took %v, want at most %v", what, took, limit)
	}
}

// opResult is one call's error and how long it took.
type opResult struct {
	err  error
	took time.Duration
}

// allOps calls every operation once and returns their results by name.
func allOps(ctx context.Context, s *Store, token string) map[string]opResult {
	res := map[string]opResult{}
	run := func(name string, call func() error) {
		start := time.Now()
		err := call()
		res[name] = opResult{err, time.Since(start)}
	}
	run("Begin", func() error { _, err := s.Begin(ctx, "t", "key", testReq); return err })
	run("Complete", func() error {
		_, err := s.Complete(ctx, "t", "key", keys.CompleteRequest{Token: token, Response: testResp})
		return err
	})
	run("Renew", func() error {
		_, err := s.Renew(ctx, "t", "key", keys.RenewRequest{Token: token, Lease: time.Minute})
		return err
	})
	run("Release", func() error { return s.Release(ctx, "t", "key", token) })
	run("Get", func() error { _, err := s.Get(ctx, "t", "key"); return err })
	run("Delete", func() error { return s.Delete(ctx, "t", "key") })
	run("Ping", func() error { return s.Ping(ctx) })
	return res
}

func TestDeadPort(t *testing.T) {
	t.Parallel()
	url := fmt.Sprintf("redis://127.0.0.1:%d/0", redistest.FreePort(t))
	start := time.Now()
	s, err := Open(t.Context(), url, Options{Prefix: "dead"})
	if err != nil {
		t.Fatalf("Open(%s) = %v; want a store that reports ErrUnavailable", url, err)
	}
	defer s.Close()
	if took := time.Since(start); took > time.Second {
		t.Errorf("Open took %v", took)
	}
	for name, r := range allOps(t.Context(), s, "token") {
		wantUnavailable(t, name, r.err, r.took, 250*time.Millisecond)
	}
	changed, stop := s.Watch("t", "key") // must neither block long nor panic
	defer stop()
	_ = changed
}

// TestStopAndRestart: Redis goes away mid-run and comes back on the same port. Meanwhile every
// operation fails fast with ErrUnavailable, and afterwards the same store works again, with
// the record Redis kept.
func TestStopAndRestart(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	s := openOn(t, srv.URL(), Options{Prefix: "restart", Timeout: 500 * time.Millisecond})
	ctx := t.Context()
	held, err := s.Begin(ctx, "t", "key", testReq)
	if err != nil {
		t.Fatal(err)
	}
	changed, stop := s.Watch("t", "key")
	defer stop()

	srv.Stop()
	select { // a broken subscription wakes its watchers: what was published meanwhile is unknown
	case <-changed:
	case <-time.After(2 * time.Second):
		t.Error("the watcher was not woken when the connection broke")
	}
	for range 3 { // fast every time, not just the first
		for name, r := range allOps(ctx, s, held.Record.Lease.Token) {
			wantUnavailable(t, name+" while Redis is down", r.err, r.took, 250*time.Millisecond)
		}
	}

	srv.Start() // no persistence: an empty Redis, as after losing everything
	deadline := time.Now().Add(10 * time.Second)
	for s.Ping(ctx) != nil {
		if time.Now().After(deadline) {
			t.Fatal("the store did not recover within 10s of Redis coming back")
		}
		time.Sleep(50 * time.Millisecond)
	}
	res, err := s.Begin(ctx, "t", "key", testReq)
	if err != nil || res.Outcome != keys.Acquired {
		t.Fatalf("Begin after the restart = %v, %v; want acquired", res.Outcome, err)
	}
	// The counter went with the data; the clock floor still keeps the fence growing.
	if res.Record.Lease.Fence <= held.Record.Lease.Fence {
		t.Errorf("fence after losing the counter %d, want above %d", res.Record.Lease.Fence, held.Record.Lease.Fence)
	}
	// A pub/sub connection that broke soon after it opened (as the one above did, if Redis came
	// back within subRedialPause) is not dialled again for subRedialPause; waiters poll meanwhile.
	time.Sleep(subRedialPause)
	changed, stop2 := s.Watch("t", "key")
	defer stop2()
	if err := s.Release(ctx, "t", "key", res.Record.Lease.Token); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	case <-time.After(2 * time.Second):
		t.Error("watching did not recover after the restart")
	}
}

// TestFrozen: a Redis that accepts connections but never answers (SIGSTOP) makes operations
// fail with ErrUnavailable after the store's timeout, not hang; service resumes after SIGCONT.
func TestFrozen(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	const timeout = 300 * time.Millisecond
	s := openOn(t, srv.URL(), Options{Prefix: "frozen", Timeout: timeout})
	ctx := t.Context()
	if err := s.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	srv.Signal(syscall.SIGSTOP)
	start := time.Now()
	_, err := s.Begin(ctx, "t", "key", testReq)
	wantUnavailable(t, "Begin while frozen", err, time.Since(start), timeout+500*time.Millisecond)
	// A caller's shorter deadline wins, and its error shows through too.
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	start = time.Now()
	_, err = s.Get(short, "t", "key")
	wantUnavailable(t, "Get with a 50ms deadline", err, time.Since(start), 500*time.Millisecond)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Get with a 50ms deadline: %v, want it to wrap context.DeadlineExceeded", err)
	}
	srv.Signal(syscall.SIGCONT)
	deadline := time.Now().Add(10 * time.Second)
	for {
		res, err := s.Begin(ctx, "t", "key", testReq)
		if err == nil {
			if res.Outcome != keys.Acquired {
				t.Errorf("Begin after thawing: %v", res.Outcome)
			}
			break
		}
		// The begin sent while frozen may have run when Redis thawed: then the key is held.
		if errors.Is(err, keys.ErrInProgress) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery within 10s of SIGCONT: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestWrongPassword: credentials are configuration, so Open fails instead of waiting.
func TestWrongPassword(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t, "--requirepass", "s3cret")
	u := fmt.Sprintf("redis://:wrong@127.0.0.1:%d/0", srv.Port())
	if s, err := Open(t.Context(), u, Options{}); err == nil {
		s.Close()
		t.Fatal("Open with a wrong password succeeded")
	}
	u = fmt.Sprintf("redis://:s3cret@127.0.0.1:%d/3", srv.Port())
	s, err := Open(t.Context(), u, Options{})
	if err != nil {
		t.Fatalf("Open with the password: %v", err)
	}
	defer s.Close()
	if _, err := s.Begin(t.Context(), "t", "key", testReq); err != nil {
		t.Fatal(err)
	}
}

// lossyDriver runs writes on Redis and then loses their replies, as when a connection breaks
// after the request went out.
type lossyDriver struct {
	driver
	lose bool
}

func (d *lossyDriver) cas(ctx context.Context, keys [2]string, args []string) (reply, error) {
	return d.lost(d.driver.cas(ctx, keys, args))
}

func (d *lossyDriver) begin(ctx context.Context, keys [2]string, args []string) (reply, error) {
	return d.lost(d.driver.begin(ctx, keys, args))
}

func (d *lossyDriver) lost(r reply, err error) (reply, error) {
	if d.lose && err == nil {
		return reply{}, errors.New("read tcp: connection reset by peer")
	}
	return r, err
}

// TestLostReply: a write whose reply is lost is reported unavailable, never acquired or
// completed; what it did shows on the next call.
func TestLostReply(t *testing.T) {
	url := redistest.URL(t)
	s := openTest(t, url, redistest.Prefix(t), nil)
	lossy := &lossyDriver{driver: s.d, lose: true}
	s.d = lossy
	ctx := t.Context()

	res, err := s.Begin(ctx, "t", "key", testReq)
	if !errors.Is(err, keys.ErrUnavailable) {
		t.Fatalf("Begin with its reply lost = %v, %v; want ErrUnavailable", res.Outcome, err)
	}
	lossy.lose = false
	if _, err := s.Begin(ctx, "t", "key", testReq); !errors.Is(err, keys.ErrInProgress) {
		t.Fatalf("Begin after a lost acquire: %v, want ErrInProgress (the lease landed)", err)
	}

	held, err := s.Begin(ctx, "t", "other", testReq)
	if err != nil {
		t.Fatal(err)
	}
	lossy.lose = true
	req := keys.CompleteRequest{Token: held.Record.Lease.Token, Response: testResp}
	if _, err := s.Complete(ctx, "t", "other", req); !errors.Is(err, keys.ErrUnavailable) {
		t.Fatalf("Complete with its reply lost: %v, want ErrUnavailable", err)
	}
	lossy.lose = false
	rec, err := s.Complete(ctx, "t", "other", req) // the same complete again tells
	if err != nil || rec.State != keys.StateCompleted {
		t.Fatalf("Complete again = %v, %v; want the completed record", rec.State, err)
	}
}

// TestSilentServer: a server that accepts connections and never answers (a hung Redis, a
// black-holed proxy) costs each call at most about the store's timeout, from Open on.
func TestSilentServer(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close() // hold it open, read nothing, answer nothing
		}
	}()
	const timeout = 300 * time.Millisecond
	limit := timeout + 500*time.Millisecond
	start := time.Now()
	s, err := Open(t.Context(), "redis://"+l.Addr().String(), Options{Timeout: timeout})
	if err != nil {
		t.Fatalf("Open = %v; want a store that reports ErrUnavailable", err)
	}
	defer s.Close()
	if took := time.Since(start); took > limit {
		t.Errorf("Open took %v, want at most %v", took, limit)
	}
	for name, r := range allOps(t.Context(), s, "token") {
		wantUnavailable(t, name, r.err, r.took, limit)
	}
	start = time.Now()
	_, stop := s.Watch("t", "key")
	stop()
	if took := time.Since(start); took > limit {
		t.Errorf("Watch took %v, want at most %v", took, limit)
	}
}

// TestMisconf: a Redis that refuses writes because its last save failed (MISCONF, with
// stop-writes-on-bgsave-error, the default) is unavailable (503, retry), not an internal error.
// (Found by an audit: begins and deletes answered 500 while /readyz said 503.)
func TestMisconf(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	srv := redistest.StartServer(t, "--dir", dir, "--save", "3600 1")
	s := openOn(t, srv.URL(), Options{})
	if _, err := s.Begin(t.Context(), "t", "before", testReq); err != nil {
		t.Fatal(err)
	}
	failSave(t, srv, dir)
	_, err := s.Begin(t.Context(), "t", "after", testReq)
	wantUnavailable(t, "begin while Redis refuses writes", err, 0, 5*time.Second)
	wantUnavailable(t, "delete while Redis refuses writes", s.Delete(t.Context(), "t", "before"), 0, 5*time.Second)
}

// TestWaitWithoutPubSub: a waiting begin whose pub/sub connection cannot be opened (Redis at
// maxclients, while the replica's command connection lives on) polls; it used to dial and begin
// again in a tight loop, about 1,400 times a second for one waiter (an audit's find).
func TestWaitWithoutPubSub(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	holder := openOn(t, srv.URL(), Options{})
	waiter := openOn(t, srv.URL(), Options{})
	if _, err := holder.Begin(t.Context(), "t", "held", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	// Open every command connection the waiter's client uses (rueidis spreads calls over a few).
	var wg sync.WaitGroup
	for range 64 {
		wg.Go(func() { _, _ = waiter.Begin(t.Context(), "t", "held", testReq) })
	}
	wg.Wait()
	admin, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{fmt.Sprintf("127.0.0.1:%d", srv.Port())}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	info := func(section, field string) int {
		s, err := admin.Do(t.Context(), admin.B().Info().Section(section).Build()).ToString()
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.SplitSeq(s, "\r\n") {
			if v, ok := strings.CutPrefix(line, field+":"); ok {
				n, _ := strconv.Atoi(v)
				return n
			}
		}
		return 0
	}
	clients := info("clients", "connected_clients")
	if err := admin.Do(t.Context(), admin.B().ConfigSet().ParameterValue().ParameterValue("maxclients", strconv.Itoa(clients)).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	rejected := info("stats", "rejected_connections")
	start := time.Now()
	_, err = keys.BeginWaitUntil(t.Context(), waiter, time.Now, "t", "held", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}, 2*time.Second, nil)
	if !errors.Is(err, keys.ErrInProgress) {
		t.Fatalf("the wait ended with %v, want ErrInProgress", err)
	}
	took := time.Since(start)
	if dials := info("stats", "rejected_connections") - rejected; dials > 20 {
		t.Errorf("%d connections refused in a %v wait: the waiter dials in a loop (want a few: one per %v)", dials, took, subRedialPause)
	}
}

// failSave makes srv's save fail (its directory dir is gone) and waits until Redis refuses
// writes, and PING, with MISCONF.
func failSave(t *testing.T, srv *redistest.Server, dir string) {
	t.Helper()
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{fmt.Sprintf("127.0.0.1:%d", srv.Port())}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.Do(t.Context(), c.B().Bgsave().Build()).Error()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if err := c.Do(t.Context(), c.B().Ping().Build()).Error(); err != nil && strings.HasPrefix(err.Error(), "MISCONF") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("Redis did not start refusing writes (and PING) after a failed save")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMisconfWithWatchers: Redis refusing writes after a failed save (MISCONF) also refuses PING,
// and rueidis panicked, ending the process, when its keepalive PING got that answer on a
// connection in pub/sub mode: any replica with a waiting begin died. Now the pub/sub connection
// sends no keepalive PING (the kernel's TCP keepalive watches it), and the Store goes on
// answering 503 while watchers stay watched.
func TestMisconfWithWatchers(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	srv := redistest.StartServer(t, "--dir", dir, "--save", "3600 1")
	s := openOn(t, srv.URL(), Options{})
	if _, err := s.Begin(t.Context(), "t", "held", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	_, stop := s.Watch("t", "held")
	defer stop()
	failSave(t, srv, dir)
	// Several keepalive periods (rueidis's default is one second), then the last watcher leaves
	// and the channel lingers out (UNSUBSCRIBE was sent then, with a PING).
	time.Sleep(3 * time.Second)
	stop()
	time.Sleep(linger + 1500*time.Millisecond)
	_, err := s.Begin(t.Context(), "t", "after", testReq)
	wantUnavailable(t, "begin while Redis refuses writes", err, 0, 5*time.Second)
	_, stop2 := s.Watch("t", "other")
	stop2()
}

// TestIdleChannelsDropped: a channel without watchers for linger is dropped by closing the
// pub/sub connection (never by UNSUBSCRIBE; see watch.go) when no channel has a watcher, so that
// Redis forgets it; the next watcher gets a new connection and is woken by a change.
func TestIdleChannelsDropped(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	s := openOn(t, srv.URL(), Options{})
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{fmt.Sprintf("127.0.0.1:%d", srv.Port())}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	numsub := func(channel string) int64 {
		t.Helper()
		arr, err := c.Do(t.Context(), c.B().PubsubNumsub().Channel(channel).Build()).ToArray()
		if err != nil || len(arr) != 2 {
			t.Fatalf("PUBSUB NUMSUB: %v, %v", arr, err)
		}
		n, err := arr[1].AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	first := s.names("t", "first").channel
	_, stop := s.Watch("t", "first")
	if n := numsub(first); n != 1 {
		t.Fatalf("%d subscribers of a watched channel", n)
	}
	stop()
	s.hub.sweep(time.Now()) // as the janitor does once linger has passed
	deadline := time.Now().Add(5 * time.Second)
	for numsub(first) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("Redis still has the idle channel's subscriber")
		}
		time.Sleep(10 * time.Millisecond)
	}

	res, err := s.Begin(t.Context(), "t", "second", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	woken, stop2 := s.Watch("t", "second")
	defer stop2()
	time.Sleep(50 * time.Millisecond) // the closed connection's watchers are woken by then
	select {
	case <-woken:
		t.Fatal("the new watcher was woken before any change (by the old connection's close?)")
	default:
	}
	if err := s.Release(t.Context(), "t", "second", res.Record.Lease.Token); err != nil {
		t.Fatal(err)
	}
	select {
	case <-woken:
	case <-time.After(200 * time.Millisecond): // keys.BeginWait's poll is 250ms: this is pub/sub
		t.Fatal("a watcher on the new connection was not woken by a release")
	}
}
