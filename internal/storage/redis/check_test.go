package redis

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

// The checks of the server (check.go), and the scripts' behaviour under a denied PUBLISH. Each
// test runs its own redis-server: they change its policy and ACL users.

// openOn opens a Store on url, closed when the test ends.
func openOn(t *testing.T, url string, opts Options) *Store {
	t.Helper()
	s, err := Open(t.Context(), url, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// makeDue makes the next Ping read the policy and the data marker, as one a second after the
// last that did.
func makeDue(s *Store) {
	s.policyAt.Store(time.Since(s.clock.epoch).Nanoseconds() - int64(policyRecheck))
}

// wantMisconfigured checks that err wraps ErrMisconfigured and says every one of words.
func wantMisconfigured(t *testing.T, what string, err error, words ...string) {
	t.Helper()
	if !errors.Is(err, ErrMisconfigured) {
		t.Errorf("%s: %v, want ErrMisconfigured", what, err)
		return
	}
	for _, w := range words {
		if !strings.Contains(strings.ToLower(err.Error()), strings.ToLower(w)) {
			t.Errorf("%s: %v, want it to say %q", what, err, w)
		}
	}
}

// TestEvictionPolicyAtOpen: a Redis that may evict records and leases stops the start, unless
// AllowEviction, which the caller can then see to warn. (An audit's find: with allkeys-lru,
// Redis evicted completed records and the next begin executed again.)
func TestEvictionPolicyAtOpen(t *testing.T) {
	t.Parallel()
	for _, policy := range []string{"allkeys-lru", "volatile-lru"} {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			srv := redistest.StartServer(t, "--maxmemory-policy", policy)
			s, err := Open(t.Context(), srv.URL(), Options{})
			if err == nil {
				s.Close()
				t.Fatalf("Open on maxmemory-policy %s succeeded", policy)
			}
			wantMisconfigured(t, "Open", err, policy, "maxmemory-policy noeviction", "AllowEviction")

			var mu sync.Mutex
			var told []string
			s, err = Open(t.Context(), srv.URL(), Options{AllowEviction: true, OnEvictionPolicy: func(p string) {
				mu.Lock()
				defer mu.Unlock()
				told = append(told, p)
			}})
			if err != nil {
				t.Fatalf("Open with AllowEviction: %v", err)
			}
			defer s.Close()
			if p, ev := s.EvictionPolicy(); p != policy || !ev {
				t.Errorf("EvictionPolicy() = %q, %v; want %q, true", p, ev, policy)
			}
			mu.Lock()
			if len(told) != 1 || told[0] != policy {
				t.Errorf("OnEvictionPolicy was told %q, want [%s]", told, policy)
			}
			mu.Unlock()
			if err := s.Ping(t.Context()); err != nil {
				t.Errorf("Ping with AllowEviction: %v", err)
			}
			if _, err := s.Begin(t.Context(), "t", "key", testReq); err != nil {
				t.Errorf("Begin with AllowEviction: %v", err)
			}
		})
	}
}

// TestEvictionPolicyAtRuntime: CONFIG SET maxmemory-policy to an evicting one makes Ping (and so
// /readyz) fail within about a second, and setting noeviction back makes it pass again.
func TestEvictionPolicyAtRuntime(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	s := openOn(t, srv.URL(), Options{})
	if p, ev := s.EvictionPolicy(); p != "noeviction" || ev {
		t.Errorf("EvictionPolicy() = %q, %v; want noeviction, false", p, ev)
	}
	if err := s.Ping(t.Context()); err != nil {
		t.Fatal(err)
	}
	srv.Do("CONFIG", "SET", "maxmemory-policy", "allkeys-lfu")
	var err2 error
	deadline := time.Now().Add(3 * policyRecheck)
	for err2 = s.Ping(t.Context()); err2 == nil && time.Now().Before(deadline); err2 = s.Ping(t.Context()) {
		time.Sleep(50 * time.Millisecond)
	}
	wantMisconfigured(t, "Ping under allkeys-lfu", err2, "allkeys-lfu", "noeviction")
	if !errors.Is(err2, keys.ErrUnavailable) {
		t.Errorf("Ping under allkeys-lfu: %v, want ErrUnavailable too", err2)
	}
	srv.Do("CONFIG", "SET", "maxmemory-policy", "noeviction")
	deadline = time.Now().Add(3 * policyRecheck)
	for err2 = s.Ping(t.Context()); err2 != nil && time.Now().Before(deadline); err2 = s.Ping(t.Context()) {
		time.Sleep(50 * time.Millisecond)
	}
	if err2 != nil {
		t.Errorf("Ping after noeviction is back: %v", err2)
	}
}

// TestChecksAtFirstContact: when Redis cannot be reached at Open, the checks run when it first
// answers, and until they pass operations and Ping fail (they used to be skipped for good).
func TestChecksAtFirstContact(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t, "--maxmemory-policy", "allkeys-lru")
	srv.Stop()
	s, err := Open(t.Context(), srv.URL(), Options{Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatalf("Open with Redis down: %v", err)
	}
	defer s.Close()
	if _, err := s.Begin(t.Context(), "t", "key", testReq); !errors.Is(err, keys.ErrUnavailable) {
		t.Fatalf("Begin with Redis down: %v, want ErrUnavailable", err)
	}
	srv.Start()
	var err2 error
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err2 = s.Begin(t.Context(), "t", "key", testReq)
		if errors.Is(err2, ErrMisconfigured) || err2 == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	wantMisconfigured(t, "Begin on a Redis that came up with allkeys-lru", err2, "allkeys-lru")
	if !errors.Is(err2, keys.ErrUnavailable) {
		t.Errorf("Begin: %v, want ErrUnavailable too (503, not 500)", err2)
	}
	wantMisconfigured(t, "Ping", s.Ping(t.Context()), "allkeys-lru")
	wantMisconfigured(t, "Get", func() error { _, err := s.Get(t.Context(), "t", "key"); return err }(), "allkeys-lru")

	srv.Do("CONFIG", "SET", "maxmemory-policy", "noeviction")
	deadline = time.Now().Add(3 * checkPause)
	for {
		_, err2 = s.Begin(t.Context(), "t", "key", testReq)
		if err2 == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err2 != nil {
		t.Fatalf("Begin once the policy is noeviction: %v", err2)
	}
	if err := s.Ping(t.Context()); err != nil {
		t.Errorf("Ping: %v", err)
	}
}

// aclUser creates user with password "pw" and rules on srv and returns its URL.
func aclUser(srv *redistest.Server, user string, rules ...string) string {
	srv.Do(append([]string{"ACL", "SETUSER", user, "reset", "on", ">pw"}, rules...)...)
	return srv.UserURL(user, "pw")
}

// TestPublishDenied: when Redis refuses the PUBLISH of a write (an ACL without +publish or the
// channel), the write fails and leaves nothing written. (An audit's find: the scripts published
// after writing, and Redis does not undo a script's writes, so complete answered 500 with the
// response stored and delete answered 500 with the key gone.)
func TestPublishDenied(t *testing.T) {
	t.Parallel()
	// Each rule taken away, and the command the checks then name: PUBLISH inside a script (the
	// command, or its channel), or EVALSHA itself, which Redis refuses with NOPERM.
	for deny, named := range map[string]string{"-publish": "PUBLISH", "resetchannels": "PUBLISH", "-evalsha": "evalsha"} {
		t.Run(deny, func(t *testing.T) {
			t.Parallel()
			srv := redistest.StartServer(t)
			rules := strings.Fields(ACL(""))
			url := aclUser(srv, "idem", rules...)
			s, err := Open(t.Context(), url, Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			ctx := t.Context()
			held, err := s.Begin(ctx, "t", "held", testReq)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.Begin(ctx, "t", "other", testReq); err != nil {
				t.Fatal(err)
			}
			srv.Do("ACL", "SETUSER", "idem", deny)

			// The permission was taken away while the Store ran: every write that publishes
			// fails as unavailable (503, not a 500 per request), and from then on the Store runs
			// its checks again, so that Ping, which /readyz asks, says what is missing until the
			// ACL is fixed (an audit's find: /readyz stayed 200 while every complete was a 500).
			token := held.Record.Lease.Token
			if _, err := s.Complete(ctx, "t", "held", keys.CompleteRequest{Token: token, Response: testResp}); !errors.Is(err, keys.ErrUnavailable) {
				t.Errorf("Complete without PUBLISH: %v, want it to wrap keys.ErrUnavailable", err)
			}
			if err := s.Release(ctx, "t", "held", token); !errors.Is(err, keys.ErrUnavailable) {
				t.Errorf("Release without PUBLISH: %v, want it to wrap keys.ErrUnavailable", err)
			}
			if err := s.Delete(ctx, "t", "other"); !errors.Is(err, keys.ErrUnavailable) {
				t.Errorf("Delete without PUBLISH: %v, want it to wrap keys.ErrUnavailable", err)
			}
			err = s.Ping(ctx)
			if !errors.Is(err, keys.ErrUnavailable) || !errors.Is(err, ErrMisconfigured) || !strings.Contains(err.Error(), named) {
				t.Errorf("Ping after the ACL took %s away: %v, want it misconfigured, naming %s", deny, err, named)
			}

			srv.Do(append([]string{"ACL", "SETUSER", "idem"}, rules...)...)
			deadline := time.Now().Add(5 * time.Second)
			for s.Ping(ctx) != nil && time.Now().Before(deadline) {
				time.Sleep(50 * time.Millisecond)
			}
			if err := s.Ping(ctx); err != nil {
				t.Fatalf("Ping after the ACL was fixed: %v", err)
			}
			// The failed writes left nothing written.
			for _, key := range []string{"held", "other"} {
				if rec, err := s.Get(ctx, "t", key); err != nil || rec.State != keys.StateInProgress {
					t.Errorf("%s after a failed Complete, Release or Delete: %v, %v; want it still held", key, rec.State, err)
				}
			}
			if _, err := s.Complete(ctx, "t", "held", keys.CompleteRequest{Token: token, Response: testResp}); err != nil {
				t.Errorf("Complete after the ACL was fixed: %v", err)
			}
		})
	}
}

// TestDataLossWhileDenied: Redis loses its data while the checks are failing after the ACL took
// a permission away; when they pass again, the loss is reported, not adopted with a new data
// marker (a review's find: the checks put a marker without comparing it).
func TestDataLossWhileDenied(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	rules := strings.Fields(ACL(""))
	url := aclUser(srv, "idem", rules...)
	var mu sync.Mutex
	var found []string
	s, err := Open(t.Context(), url, Options{OnDataLoss: func(f string) { mu.Lock(); found = append(found, f); mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := t.Context()
	if _, err := s.Begin(ctx, "t", "held", testReq); err != nil {
		t.Fatal(err)
	}
	srv.Do("ACL", "SETUSER", "idem", "-publish")
	if err := s.Delete(ctx, "t", "held"); !errors.Is(err, keys.ErrUnavailable) {
		t.Fatalf("Delete without PUBLISH: %v, want it unavailable", err)
	}
	srv.Do("FLUSHALL") // as a restart without persistence would
	srv.Do(append([]string{"ACL", "SETUSER", "idem"}, rules...)...)
	deadline := time.Now().Add(5 * time.Second)
	for s.Ping(ctx) != nil && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	s.policyAt.Store(math.MinInt64 / 2) // Ping compares the marker too: due at once
	if err := s.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(found) != 1 {
		t.Errorf("losses reported: %q, want the FLUSHALL once", found)
	}
}

// TestPingWhileLoading: while Redis loads its data at a start it answers INFO but refuses
// everything else with LOADING, so Ping fails throughout, also when it reads the policy with
// INFO (an audit's find: /readyz answered 200 once a second while every request got 503).
func TestPingWhileLoading(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t, "--enable-debug-command", "yes")
	s, err := Open(t.Context(), srv.URL(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := t.Context()
	srv.Do("DEBUG", "POPULATE", "3000000")
	srv.Do("SAVE")
	srv.Stop()
	srv.Start() // loads the 3,000,000 keys, answering LOADING meanwhile
	// A plain connection: a client library's handshake fails while Redis loads.
	raw, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", srv.Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	replies := bufio.NewReader(raw)
	loading := func() bool {
		_ = raw.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := raw.Write([]byte("*2\r\n$3\r\nGET\r\n$1\r\nx\r\n")); err != nil {
			t.Fatal(err)
		}
		reply, err := replies.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(reply, "$") && reply != "$-1\r\n" {
			t.Fatalf("GET x: %q", reply)
		}
		return strings.HasPrefix(reply, "-LOADING")
	}
	var pings, whileLoading int
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		before := loading()
		if !before && pings > 0 {
			break // loaded
		}
		s.policyAt.Store(math.MinInt64 / 2) // the policy due: INFO memory, every time
		err := s.Ping(ctx)
		pings++
		if before && loading() {
			whileLoading++
			if err == nil {
				t.Fatal("Ping answered nil while Redis was loading")
			}
		}
	}
	if whileLoading == 0 {
		t.Skipf("never saw Redis loading in %d pings: the load was too fast to tell", pings)
	}
	t.Logf("%d pings, %d of them while Redis was loading", pings, whileLoading)
	if err := s.Ping(ctx); err != nil {
		t.Errorf("Ping once loaded: %v", err)
	}
}

// TestACL: the ACL of the package doc (ACL) is enough for everything the Store does, and Open
// fails on a user that lacks any one of its rules, naming what is missing. (An audit's find: a
// user without them started, /readyz said 200, and requests failed with 503 or 500.)
func TestACL(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	prefix := "idemacl"
	rules := strings.Fields(ACL(prefix))
	url := aclUser(srv, "idem", rules...)

	t.Run("Enough", func(t *testing.T) { aclEnough(t, srv, url, prefix) })
	// Without HELLO rueidis speaks RESP2 (AUTH, and pub/sub on a connection of its own).
	t.Run("EnoughWithoutHello", func(t *testing.T) {
		aclEnough(t, srv, aclUser(srv, "idem-resp2", slices.DeleteFunc(slices.Clone(rules), func(r string) bool { return r == "+hello" })...), prefix)
	})

	t.Run("Database", func(t *testing.T) {
		db1 := strings.TrimSuffix(url, "/0") + "/1"
		s, err := Open(t.Context(), db1, Options{Prefix: prefix})
		if err == nil {
			s.Close()
			t.Fatal("Open on database 1 without +select succeeded")
		}
		if !strings.Contains(err.Error(), "select") || !strings.Contains(err.Error(), ` +select"`) {
			t.Errorf("Open on database 1 without +select: %v, want it to name select, and +select in the ACL it gives", err)
		}
		srv.Do("ACL", "SETUSER", "idem", "+select")
		defer srv.Do("ACL", "SETUSER", "idem", "-select")
		if s, err = Open(t.Context(), db1, Options{Prefix: prefix}); err != nil {
			t.Fatalf("Open on database 1 with +select: %v", err)
		}
		s.Close()
	})

	// What each rule, taken away, must make Open say.
	say := map[string][]string{
		"~" + prefix + "*": {"key"},
		"&" + prefix + "*": {"channel"},
	}
	for i, rule := range rules {
		t.Run("Without"+rule, func(t *testing.T) {
			user := "idem" + string(rune('a'+i))
			rest := append(append([]string{}, rules[:i]...), rules[i+1:]...)
			s, err := Open(t.Context(), aclUser(srv, user, rest...), Options{Prefix: prefix})
			if rule == "+hello" {
				// rueidis falls back to RESP2 (AUTH, and a connection of its own for pub/sub).
				if err != nil {
					t.Fatalf("Open without +hello: %v", err)
				}
				s.Close()
				return
			}
			if err == nil {
				s.Close()
				t.Fatalf("Open without %s succeeded", rule)
			}
			t.Log(err)
			words, ok := say[rule]
			if !ok {
				words = []string{strings.TrimPrefix(rule, "+")}
			}
			wantMisconfigured(t, "Open", err, words...)
		})
	}
}

// aclEnough runs every operation through two stores on url, before and after SCRIPT FLUSH.
func aclEnough(t *testing.T, srv *redistest.Server, url, prefix string) {
	a, err := Open(t.Context(), url, Options{Prefix: prefix})
	if err != nil {
		t.Fatalf("Open with the documented ACL: %v", err)
	}
	defer a.Close()
	b, err := Open(t.Context(), url, Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := t.Context()
	for round := range 2 {
		if round == 1 {
			srv.Do("SCRIPT", "FLUSH") // the scripts are sent again: EVAL, EVAL_RO
		}
		key := "key" + string(rune('a'+round))
		held, err := a.Begin(ctx, "t", key, testReq)
		if err != nil {
			t.Fatal(err)
		}
		changed, stop := b.Watch("t", key)
		token := held.Record.Lease.Token
		if _, err := a.Renew(ctx, "t", key, keys.RenewRequest{Token: token, Lease: time.Minute}); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Complete(ctx, "t", key, keys.CompleteRequest{Token: token, Response: testResp}); err != nil {
			t.Fatal(err)
		}
		select {
		case <-changed:
		case <-time.After(2 * time.Second):
			t.Error("the watcher on the other store was not woken by the complete")
		}
		stop()
		if r, err := b.Begin(ctx, "t", key, testReq); err != nil || r.Outcome != keys.Replayed {
			t.Errorf("Begin after Complete = %v, %v; want a replay", r.Outcome, err)
		}
		if _, err := a.Get(ctx, "t", key); err != nil {
			t.Error(err)
		}
		other, err := b.Begin(ctx, "t", key+"-released", testReq)
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Release(ctx, "t", key+"-released", other.Record.Lease.Token); err != nil {
			t.Error(err)
		}
		if err := a.Delete(ctx, "t", key); err != nil {
			t.Error(err)
		}
		if err := a.Ping(ctx); err != nil {
			t.Error(err)
		}
	}
}

// TestDocsGiveTheACL: the README and the package doc give the ACL that ACL returns (and that
// TestACL proves enough), so that operators copy the one that works.
func TestDocsGiveTheACL(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if want := "ACL SETUSER idemsvc on >PASSWORD " + ACL(""); !strings.Contains(string(readme), want) {
		t.Errorf("README.md does not give the ACL %q", want)
	}
	src, err := os.ReadFile("redis.go")
	if err != nil {
		t.Fatal(err)
	}
	doc := strings.Join(strings.Fields(strings.ReplaceAll(string(src), "//", " ")), " ")
	if want := "ACL SETUSER idemsvc on >PASSWORD " + ACL(""); !strings.Contains(doc, want) {
		t.Errorf("the package doc does not give the ACL %q", want)
	}
}

// TestDataLossNoticed: a Redis that lost its data (FLUSHDB here; a restart without persistence
// looks the same) is noticed by the next Ping that reads the policy, on every replica: the first
// finds the data marker gone, the others find another one. Nothing is reported while the data
// stays.
func TestDataLossNoticed(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	var mu sync.Mutex
	found := map[string][]string{}
	open := func(name string) *Store {
		s, err := Open(t.Context(), srv.URL(), Options{OnDataLoss: func(f string) {
			mu.Lock()
			defer mu.Unlock()
			found[name] = append(found[name], f)
		}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	}
	a, b := open("a"), open("b")
	ping := func(s *Store) { // as a Ping a second after the last one that read the policy
		t.Helper()
		makeDue(s)
		if err := s.Ping(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	reports := func(name string) []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(found[name])
	}
	if _, err := a.Begin(t.Context(), "t", "k", testReq); err != nil {
		t.Fatal(err)
	}
	ping(a)
	ping(b)
	if len(reports("a"))+len(reports("b")) != 0 {
		t.Fatalf("data loss reported while Redis kept its data: %v", found)
	}
	srv.Do("FLUSHDB")
	ping(a)
	if r := reports("a"); len(r) != 1 || !strings.Contains(r[0], "was gone") {
		t.Fatalf("after FLUSHDB, replica a reported %q", r)
	}
	ping(b)
	if r := reports("b"); len(r) != 1 || !strings.Contains(r[0], "was replaced") {
		t.Fatalf("after FLUSHDB, replica b reported %q", r)
	}
	ping(a)
	ping(b)
	if len(reports("a")) != 1 || len(reports("b")) != 1 {
		t.Errorf("one loss reported more than once: %v", found)
	}
}

// TestFullRedis: a Redis out of memory under noeviction is not a misconfiguration. The service
// starts (the probe counts a command refused for memory as permitted: Redis checks the ACL
// first), reads are served, writes fail with keys.ErrUnavailable (503), and Ping passes, the
// data marker's check included (it only reads while the marker is there).
func TestFullRedis(t *testing.T) {
	t.Parallel()
	srv := redistest.StartServer(t)
	s := openOn(t, srv.URL(), Options{})
	res, err := s.Begin(t.Context(), "t", "before", testReq)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Complete(t.Context(), "t", "before", keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200}}); err != nil {
		t.Fatal(err)
	}
	srv.Do("CONFIG", "SET", "maxmemory", "1") // everything beyond now is out of memory

	s2, err := Open(t.Context(), srv.URL(), Options{})
	if err != nil {
		t.Fatalf("Open on a full Redis: %v", err)
	}
	defer s2.Close()
	for _, st := range []*Store{s, s2} {
		makeDue(st)
		if err := st.Ping(t.Context()); err != nil {
			t.Errorf("Ping on a full Redis: %v", err)
		}
		if rec, err := st.Get(t.Context(), "t", "before"); err != nil || rec.State != keys.StateCompleted {
			t.Errorf("Get on a full Redis: %v, %v", rec.State, err)
		}
		if _, err := st.Begin(t.Context(), "t", "after", testReq); !errors.Is(err, keys.ErrUnavailable) || errors.Is(err, ErrMisconfigured) {
			t.Errorf("Begin on a full Redis: %v, want keys.ErrUnavailable", err)
		}
	}
}
