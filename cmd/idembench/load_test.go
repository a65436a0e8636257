package main

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestRawClient(t *testing.T) {
	t.Parallel()
	big := strings.Repeat("y", 10000)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		switch r.URL.Path {
		case "/echo":
			w.Header().Set("Idempotent-Replayed", "true")
			w.WriteHeader(201)
			w.Write(body)
		case "/chunked":
			w.Write([]byte(big[:5000]))
			w.(http.Flusher).Flush()
			w.Write([]byte(big[5000:]))
		case "/empty":
			w.WriteHeader(204)
		case "/close":
			w.Header().Set("Connection", "close")
			w.Write([]byte("bye"))
		case "/auth":
			w.Write([]byte(r.Header.Get("Authorization") + " " + r.Header.Get("Content-Type")))
		}
	}))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	for _, kind := range []string{"raw", "std"} {
		t.Run(kind, func(t *testing.T) {
			c, err := newClient(kind, u, "s3cret", 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.close()
			var resp response
			tests := []struct {
				name, path   string
				body         []byte
				wantStatus   int
				wantBody     string
				wantReplayed bool
			}{
				{"ContentLength", "/echo", []byte(`{"a":1}`), 201, `{"a":1}`, true},
				{"Chunked", "/chunked", nil, 200, big, false},
				{"NoContent", "/empty", []byte(`{}`), 204, "", false},
				{"Close", "/close", nil, 200, "bye", false},
				{"AfterClose", "/echo", []byte("x"), 201, "x", true},
				{"Headers", "/auth", []byte("{}"), 200, "Bearer s3cret application/json", false},
			}
			for _, tt := range tests {
				if err := c.do("POST", []byte(tt.path), tt.body, &resp); err != nil {
					t.Fatalf("%s: %v", tt.name, err)
				}
				if resp.status != tt.wantStatus || string(resp.body) != tt.wantBody || resp.replayed != tt.wantReplayed {
					t.Errorf("%s: got %d %q replayed=%v, want %d %q replayed=%v", tt.name, resp.status,
						trunc(resp.body), resp.replayed, tt.wantStatus, trunc([]byte(tt.wantBody)), tt.wantReplayed)
				}
			}
		})
	}
}

func trunc(b []byte) []byte {
	if len(b) > 40 {
		return append(bytes.Clone(b[:40]), "..."...)
	}
	return b
}

// TestLoadBaseline drives every scenario against the baseline server, bounded by a request
// count (the duration is only a bound), and checks that each sees only its expected statuses.
func TestLoadBaseline(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(newBaseline(200).routes())
	t.Cleanup(srv.Close) // not defer: the parallel subtests run after this function returns
	u, _ := url.Parse(srv.URL)
	tests := []struct {
		scenario string
		want     []string
	}{
		{"pair", []string{"begin 201", "complete 200"}},
		{"replay", []string{"begin 200"}},
		{"contend", []string{"begin 201", "complete 200"}},
		{"mixed", []string{"begin 200", "begin 201", "complete 200"}},
	}
	for _, tt := range tests {
		t.Run(tt.scenario, func(t *testing.T) {
			t.Parallel()
			res, err := load(config{
				url: u, scenario: tt.scenario, conns: 4, duration: time.Minute, maxReqs: 400,
				keys: 2, preload: 20, bodyBytes: 200, ttlMS: 60000, timeout: 5 * time.Second, clientKind: "raw",
			})
			if err != nil {
				t.Fatal(err)
			}
			if res.Failed {
				t.Fatalf("run failed: %s", res.Failure)
			}
			for s := range res.Statuses {
				found := false
				for _, w := range tt.want {
					found = found || s == w
				}
				if !found {
					t.Errorf("status %q seen, want only %v", s, tt.want)
				}
			}
			if res.Requests == 0 || res.Requests > 400 {
				t.Errorf("requests = %d, want 1 to 400", res.Requests)
			}
		})
	}
}

// TestLoadUnexpectedStatus checks that a status the scenario does not expect fails the run.
func TestLoadUnexpectedStatus(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/problem+json")
		w.WriteHeader(503)
		io.WriteString(w, `{"type":"urn:idemsvc:problem:unavailable"}`)
	}))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	res, err := load(config{url: u, scenario: "pair", conns: 2, duration: time.Minute, maxReqs: 100,
		keys: 1, preload: 1, bodyBytes: 10, ttlMS: 1000, timeout: 5 * time.Second, clientKind: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Failed || !strings.Contains(res.Failure, "status 503") || !strings.Contains(res.Failure, "unavailable") {
		t.Errorf("Failed = %v, Failure = %q; want a failure naming status 503 with the body", res.Failed, res.Failure)
	}
}
