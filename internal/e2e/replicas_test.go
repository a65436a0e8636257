// Package e2e holds end-to-end tests of several idemsvc servers over real HTTP and a real Redis.
package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/server/servertest"
	"github.com/idemsvc/idemsvc/internal/storage/redis"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

type answer struct {
	status int
	header http.Header
	body   []byte
}

func post(t testing.TB, c *http.Client, url, body string) answer {
	t.Helper()
	req, err := http.NewRequest("POST", url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	return send(t, c, req)
}

func send(t testing.TB, c *http.Client, req *http.Request) answer {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		return answer{status: -1, body: []byte(err.Error())}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{status: resp.StatusCode, header: resp.Header, body: b}
}

// TestThreeReplicasOneRedis: three idemsvc servers share one Redis. For each of 200 keys, 64
// concurrent begins spread over the three give exactly one 201; after the winner completes,
// every replica replays the same bytes.
func TestThreeReplicasOneRedis(t *testing.T) {
	const nKeys, perKey = 200, 64
	prefix := redistest.Prefix(t)
	var urls []string
	for range 3 {
		store, err := redis.Open(context.Background(), redistest.URL(t), redis.Options{Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = store.Close() })
		s := servertest.Start(t, servertest.Options{Store: store})
		urls = append(urls, s.URL)
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: perKey}, Timeout: 30 * time.Second}

	type win struct {
		url, token string
	}
	winners := make([]win, nKeys)
	var mu sync.Mutex
	statuses := map[int]int{}
	for k := range nKeys {
		key := fmt.Sprintf("rep-%d", k)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range perKey {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				url := urls[i%3]
				a := post(t, client, url+"/v1/keys/"+key+"/begin", `{"fingerprint":"fp-`+key+`"}`)
				mu.Lock()
				defer mu.Unlock()
				statuses[a.status]++
				if a.status == http.StatusCreated {
					var rec struct {
						Lease struct{ Token string } `json:"lease"`
					}
					if err := json.Unmarshal(a.body, &rec); err != nil || rec.Lease.Token == "" {
						t.Errorf("%s: 201 without a token: %s", key, a.body)
					}
					if winners[k].token != "" {
						t.Errorf("%s: a second 201 (replica %s); the first came from %s", key, url, winners[k].url)
					}
					winners[k] = win{url: url, token: rec.Lease.Token}
				} else if a.status != http.StatusConflict {
					t.Errorf("%s: begin answered %d: %s", key, a.status, a.body)
				}
			}()
		}
		close(start)
		wg.Wait()
		if winners[k].token == "" {
			t.Fatalf("%s: no begin won", key)
		}
	}
	if statuses[201] != nKeys || statuses[409] != nKeys*(perKey-1) {
		t.Fatalf("statuses = %v, want exactly %d x 201 and %d x 409", statuses, nKeys, nKeys*(perKey-1))
	}

	// The winners complete; then every replica replays exactly the stored bytes.
	for k, w := range winners {
		key := fmt.Sprintf("rep-%d", k)
		body := base64.StdEncoding.EncodeToString([]byte(`{"charge":"` + key + `"}`))
		a := post(t, client, w.url+"/v1/keys/"+key+"/complete",
			`{"token":"`+w.token+`","response":{"status":201,"body":"`+body+`"}}`)
		if a.status != 200 {
			t.Fatalf("%s: complete = %d %s", key, a.status, a.body)
		}
		var first []byte
		for _, url := range urls {
			a := post(t, client, url+"/v1/keys/"+key+"/begin", `{"fingerprint":"fp-`+key+`"}`)
			if a.status != 200 || a.header.Get("Idempotent-Replayed") != "true" {
				t.Fatalf("%s on %s: replay = %d %s", key, url, a.status, a.body)
			}
			var rec struct {
				Response struct {
					Status int    `json:"status"`
					Body   string `json:"body"`
				} `json:"response"`
			}
			if err := json.Unmarshal(a.body, &rec); err != nil || rec.Response.Body != body || rec.Response.Status != 201 {
				t.Fatalf("%s on %s: replayed %s, want body %s", key, url, a.body, body)
			}
			if first == nil {
				first = a.body
			} else if string(first) != string(a.body) {
				t.Fatalf("%s: replicas replay different bytes:\n%s\n%s", key, first, a.body)
			}
		}
	}
	t.Logf("replicas: 3 servers, %d keys x %d begins: statuses %v", nKeys, perKey, statuses)
}

// TestRedisOutage stops the Redis under a running server mid-load: requests get 503
// unavailable problems (never another 5xx, never a false 201 or 200), /readyz turns 503, and
// service resumes by itself when Redis is back.
func TestRedisOutage(t *testing.T) {
	rs := redistest.StartServer(t)
	store, err := redis.Open(context.Background(), rs.URL(), redis.Options{Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	srv := servertest.Start(t, servertest.Options{Store: store})
	client := &http.Client{Timeout: 10 * time.Second}

	ready := func() int {
		req, _ := http.NewRequest("GET", srv.URL+"/readyz", nil)
		return send(t, client, req).status
	}
	if st := ready(); st != 200 {
		t.Fatalf("/readyz = %d before the outage", st)
	}

	// Load: workers begin and complete fresh keys; every 201/200 they saw must be real.
	var (
		mu        sync.Mutex
		acked     = map[string]string{} // key → body, for completes answered 200
		statuses  = map[int]int{}
		stop      = make(chan struct{})
		wg        sync.WaitGroup
		problemOK = true
	)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				key := fmt.Sprintf("out-%d-%d", w, i)
				a := post(t, client, srv.URL+"/v1/keys/"+key+"/begin", `{}`)
				mu.Lock()
				statuses[a.status]++
				if a.status == 503 && (a.header.Get("Content-Type") != "application/problem+json" ||
					!strings.Contains(string(a.body), "urn:idemsvc:problem:unavailable")) {
					problemOK = false
				}
				mu.Unlock()
				if a.status != 201 {
					if a.status != 503 {
						t.Errorf("begin during the run: %d %s", a.status, a.body)
					}
					time.Sleep(20 * time.Millisecond)
					continue
				}
				var rec struct {
					Lease struct{ Token string } `json:"lease"`
				}
				_ = json.Unmarshal(a.body, &rec)
				body := base64.StdEncoding.EncodeToString([]byte(key))
				c := post(t, client, srv.URL+"/v1/keys/"+key+"/complete",
					`{"token":"`+rec.Lease.Token+`","response":{"status":200,"body":"`+body+`"}}`)
				mu.Lock()
				statuses[c.status]++
				if c.status == 200 {
					acked[key] = body
				} else if c.status != 503 && c.status != 404 { // 404: begun on the Redis that died
					t.Errorf("complete during the run: %d %s", c.status, c.body)
				}
				mu.Unlock()
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	rs.Stop()
	time.Sleep(500 * time.Millisecond)
	if st := ready(); st != 503 {
		t.Errorf("/readyz = %d during the outage, want 503", st)
	}
	mu.Lock()
	before := statuses[503]
	mu.Unlock()
	time.Sleep(500 * time.Millisecond)
	mu.Lock()
	during := statuses[503] - before
	mu.Unlock()
	if during == 0 {
		t.Error("no 503 while Redis was down")
	}

	rs.Start() // a new, empty Redis: what was acknowledged before is gone with it (no persistence)
	deadline := time.Now().Add(10 * time.Second)
	for ready() != 200 {
		if time.Now().After(deadline) {
			t.Fatal("/readyz did not return to 200 after Redis came back")
		}
		time.Sleep(50 * time.Millisecond)
	}
	mu.Lock()
	acked = map[string]string{} // count only what is acknowledged after the restart
	mu.Unlock()
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()

	if len(acked) == 0 {
		t.Fatal("no complete succeeded after Redis came back")
	}
	for key, body := range acked {
		req, _ := http.NewRequest("GET", srv.URL+"/v1/keys/"+key, nil)
		a := send(t, client, req)
		if a.status != 200 || !strings.Contains(string(a.body), body) {
			t.Errorf("acknowledged %s: GET = %d %s", key, a.status, a.body)
		}
	}
	if !problemOK {
		t.Error("a 503 was not an unavailable problem")
	}
	for st := range statuses {
		if st >= 500 && st != 503 || st == -1 {
			t.Errorf("status %d seen %d times", st, statuses[st])
		}
	}
	t.Logf("outage: statuses %v; %d completes acknowledged after recovery, all read back", statuses, len(acked))
}
