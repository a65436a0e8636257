package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kelseyhightower/envconfig"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
)

func TestConfig(t *testing.T) {
	for _, c := range []struct {
		name    string
		env     []string
		wantErr string // "" means valid
	}{
		{"Defaults", nil, ""},
		{"Full", []string{"IDEMSVC_ADDR=127.0.0.1:9", "IDEMSVC_TOKENS=a:0123456789abcdef,b:fedcba9876543210", "IDEMSVC_MAX_LEASE=2h"}, ""},
		{"UnknownVariable", []string{"IDEMSVC_LEASE=5s"}, "IDEMSVC_LEASE"},
		{"BadDuration", []string{"IDEMSVC_MAX_TTL=forever"}, "MAX_TTL"},
		{"BadInt", []string{"IDEMSVC_MAX_BODY_BYTES=lots"}, "MAX_BODY_BYTES"},
		{"BadBackend", []string{"IDEMSVC_BACKEND=mysql"}, "IDEMSVC_BACKEND"},
		{"RedisWithoutURL", []string{"IDEMSVC_BACKEND=redis"}, "IDEMSVC_REDIS_URL"},
		{"DefaultAboveMax", []string{"IDEMSVC_DEFAULT_LEASE=2h"}, "IDEMSVC_DEFAULT_LEASE"},
		{"BadTokens", []string{"IDEMSVC_TOKENS=justatoken"}, "IDEMSVC_TOKENS"},
		{"ShortToken", []string{"IDEMSVC_TOKENS=a:short"}, "IDEMSVC_TOKENS"},
		{"SharedToken", []string{"IDEMSVC_TOKENS=a:0123456789abcdef,b:0123456789abcdef"}, "IDEMSVC_TOKENS"},
		{"BadLogLevel", []string{"IDEMSVC_LOG_LEVEL=loud"}, "IDEMSVC_LOG_LEVEL"},
		{"ZeroSweep", []string{"IDEMSVC_SWEEP_INTERVAL=0s"}, "IDEMSVC_SWEEP_INTERVAL"},
		{"LongestBounds", []string{"IDEMSVC_MAX_TTL=87600h", "IDEMSVC_MAX_LEASE=87600h", "IDEMSVC_MAX_WAIT=87600h"}, ""},
		{"TTLPast2262", []string{"IDEMSVC_MAX_TTL=2500000h"}, "IDEMSVC_MAX_TTL"},
		{"LeaseTooLong", []string{"IDEMSVC_MAX_LEASE=87601h"}, "IDEMSVC_MAX_LEASE"},
		{"WaitTooLong", []string{"IDEMSVC_MAX_WAIT=87601h"}, "IDEMSVC_MAX_WAIT"},
		// Set but naming no token is a slip (a template's empty value), not open mode.
		{"TokensOnlySpaces", []string{"IDEMSVC_TOKENS= "}, "IDEMSVC_TOKENS"},
		{"TokensSetEmpty", []string{"IDEMSVC_TOKENS="}, "IDEMSVC_TOKENS"},
		{"TokensOnlyWhitespace", []string{"IDEMSVC_TOKENS= \t\n "}, "IDEMSVC_TOKENS"},
		{"TokensOnlyComma", []string{"IDEMSVC_TOKENS= , "}, "IDEMSVC_TOKENS"},
		{"SpacedTokens", []string{"IDEMSVC_TOKENS= a : 0123456789abcdef , b:\tfedcba9876543210\n"}, ""},
		{"ShortTokenAfterTrim", []string{"IDEMSVC_TOKENS=a:  short          "}, "IDEMSVC_TOKENS"},
		{"EmptyTokenAfterTrim", []string{"IDEMSVC_TOKENS=a:   "}, "IDEMSVC_TOKENS"},
		{"SameTenantAfterTrim", []string{"IDEMSVC_TOKENS=a:0123456789abcdef, a :fedcba9876543210"}, "IDEMSVC_TOKENS"},
		{"SharedTokenAfterTrim", []string{"IDEMSVC_TOKENS=a:0123456789abcdef,b: 0123456789abcdef"}, "IDEMSVC_TOKENS"},
		{"TokenWithControl", []string{"IDEMSVC_TOKENS=a:01234567\x0189abcdef"}, "IDEMSVC_TOKENS"},
		// A ';' for a ',' made one tenant "a" whose token was "0123456789abcdef;b:fedcba9876543210".
		{"SemicolonForComma", []string{"IDEMSVC_TOKENS=a:0123456789abcdef;b:fedcba9876543210"}, "IDEMSVC_TOKENS"},
		{"TokenWithSpace", []string{"IDEMSVC_TOKENS=a:01234567 89abcdef"}, "IDEMSVC_TOKENS"},
		{"TokenBase64", []string{"IDEMSVC_TOKENS=a:q3H+/x9_Zk-a.b~c0123==,b:fedcba9876543210"}, ""},
		// What password generators make, and worked: kept.
		{"TokenWithSymbols", []string{"IDEMSVC_TOKENS=a:Secr3t!Passw0rd#2024"}, ""},
		{"TokenWithColon", []string{"IDEMSVC_TOKENS=a:abcdef0123456789:xyz"}, ""},
		{"TokenWithSemicolon", []string{"IDEMSVC_TOKENS=a:abcdef0123;456789"}, ""},
		{"TokenWithTab", []string{"IDEMSVC_TOKENS=a:01234567\t89abcdef"}, "IDEMSVC_TOKENS"},
		{"EmptyAddr", []string{"IDEMSVC_ADDR="}, "IDEMSVC_ADDR"},
		{"AddrWithoutPort", []string{"IDEMSVC_ADDR=8080"}, "IDEMSVC_ADDR"},
		{"AddrBadPort", []string{"IDEMSVC_ADDR=127.0.0.1:99999"}, "IDEMSVC_ADDR"},
		{"AddrNamedPort", []string{"IDEMSVC_ADDR=:http"}, "IDEMSVC_ADDR"},
		{"AddrAnyPort", []string{"IDEMSVC_ADDR=127.0.0.1:0"}, ""},
		{"AddrIPv6", []string{"IDEMSVC_ADDR=[::1]:8080"}, ""},
		{"EmptyLogLevel", []string{"IDEMSVC_LOG_LEVEL="}, "IDEMSVC_LOG_LEVEL"},
		{"FatalLogLevel", []string{"IDEMSVC_LOG_LEVEL=fatal"}, "IDEMSVC_LOG_LEVEL"},
		{"DPanicLogLevel", []string{"IDEMSVC_LOG_LEVEL=dpanic"}, "IDEMSVC_LOG_LEVEL"},
		{"WarnLogLevel", []string{"IDEMSVC_LOG_LEVEL=warn"}, ""},
		{"UpperCaseLogLevel", []string{"IDEMSVC_LOG_LEVEL=INFO"}, ""}, // zap's spellings worked, and still do
		{"WarningLogLevel", []string{"IDEMSVC_LOG_LEVEL=warning"}, ""},
		{"PanicLogLevel", []string{"IDEMSVC_LOG_LEVEL=panic"}, "IDEMSVC_LOG_LEVEL"},
		{"MaxConns", []string{"IDEMSVC_MAX_CONNS=8"}, ""},
		{"NegativeMaxConns", []string{"IDEMSVC_MAX_CONNS=-1"}, "IDEMSVC_MAX_CONNS"},
		{"BadMaxConns", []string{"IDEMSVC_MAX_CONNS=many"}, "MAX_CONNS"},
		{"TinyMaxConns", []string{"IDEMSVC_MAX_CONNS=2"}, "IDEMSVC_MAX_CONNS"},
		{"MaxWaiters", []string{"IDEMSVC_MAX_WAITERS=10"}, ""},
		{"NoWaiters", []string{"IDEMSVC_MAX_WAITERS=0"}, "IDEMSVC_MAX_WAITERS"},
		{"RedisMinReplicas", []string{"IDEMSVC_REDIS_MIN_REPLICAS=1"}, ""},
		{"RedisMinReplicasNegative", []string{"IDEMSVC_REDIS_MIN_REPLICAS=-1"}, "IDEMSVC_REDIS_MIN_REPLICAS"},
		// A private CA and a client certificate (tls-auth-clients yes) could not be given at all.
		{"RedisTLSFiles", []string{"IDEMSVC_BACKEND=redis", "IDEMSVC_REDIS_URL=rediss://redis.internal:6380/0",
			"IDEMSVC_REDIS_TLS_CA_FILE=/run/ca.pem", "IDEMSVC_REDIS_TLS_CERT_FILE=/run/c.pem", "IDEMSVC_REDIS_TLS_KEY_FILE=/run/k.pem"}, ""},
		// Sentinels that require a password could not be reached at all.
		{"RedisSentinel", []string{"IDEMSVC_BACKEND=redis", "IDEMSVC_REDIS_URL=redis://s1:26379/0?master_set=m&addr=s2:26379",
			"IDEMSVC_REDIS_SENTINEL_USERNAME=idem", "IDEMSVC_REDIS_SENTINEL_PASSWORD=pw"}, ""},
		{"RedisSentinelPasswordNoMasterSet", []string{"IDEMSVC_BACKEND=redis", "IDEMSVC_REDIS_URL=redis://s1:6379/0",
			"IDEMSVC_REDIS_SENTINEL_PASSWORD=pw"}, "IDEMSVC_REDIS_URL"},
		{"RedisTLSFilesPlainURL", []string{"IDEMSVC_BACKEND=redis", "IDEMSVC_REDIS_URL=redis://redis.internal:6379/0",
			"IDEMSVC_REDIS_TLS_CA_FILE=/run/ca.pem"}, "IDEMSVC_REDIS_URL"},
		{"RedisTLSCertNoKey", []string{"IDEMSVC_BACKEND=redis", "IDEMSVC_REDIS_URL=rediss://redis.internal:6380/0",
			"IDEMSVC_REDIS_TLS_CERT_FILE=/run/c.pem"}, "IDEMSVC_REDIS_TLS_CERT_FILE"},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, kv := range c.env {
				k, v, _ := strings.Cut(kv, "=")
				t.Setenv(k, v)
			}
			_, err := loadConfig(c.env)
			switch {
			case c.wantErr == "" && err != nil:
				t.Fatalf("loadConfig: %v", err)
			case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
				t.Fatalf("loadConfig error = %v, want one naming %s", err, c.wantErr)
			}
		})
	}
}

// TestConfigReadsOnlyPrefixedNames: every setting comes from its IDEMSVC_ variable and never
// from the bare name, which envconfig reads as a fallback for a field with an envconfig tag.
func TestConfigReadsOnlyPrefixedNames(t *testing.T) {
	bare := map[string]string{
		"ADDR": "127.0.0.1:1", "BACKEND": "redis", "DATA_DIR": "/elsewhere", "REDIS_URL": "redis://x:1",
		"TOKENS": "a:0123456789abcdef", "DEFAULT_LEASE": "2s", "MAX_LEASE": "3s", "DEFAULT_TTL": "2h",
		"MAX_TTL": "3h", "MAX_WAIT": "1s", "MAX_BODY_BYTES": "7", "SWEEP_INTERVAL": "9s",
		"LOG_LEVEL": "error", "SHUTDOWN_TIMEOUT": "1s", "REDIS_ALLOW_EVICTION": "true", "REDIS_MIN_REPLICAS": "1", "MAX_CONNS": "5",
		"MAX_WAITERS": "3", "DRAIN_DELAY": "4s",
		"REDIS_TLS_CA_FILE": "/x/ca.pem", "REDIS_TLS_CERT_FILE": "/x/c.pem", "REDIS_TLS_KEY_FILE": "/x/k.pem",
		"REDIS_SENTINEL_USERNAME": "u", "REDIS_SENTINEL_PASSWORD": "p", "BOLT_CHECKPOINT_INTERVAL": "5s",
	}
	if len(bare) != len(knownVars()) {
		t.Fatalf("%d bare names for %d variables", len(bare), len(knownVars()))
	}
	def := defaultConfig(t) // before any bare name is set
	for name, v := range bare {
		t.Setenv(name, v)
	}
	cfg, err := loadConfig(nil)
	if err != nil {
		t.Fatalf("loadConfig with only bare names set: %v", err)
	}
	if !reflect.DeepEqual(cfg, def) {
		t.Errorf("bare names were read:\n got %+v\nwant %+v", cfg, def)
	}
	// And each prefixed name is read.
	env := []string{}
	for name, v := range bare {
		t.Setenv("IDEMSVC_"+name, v)
		env = append(env, "IDEMSVC_"+name+"="+v)
	}
	cfg, _ = loadConfig(env) // invalid as a whole (7-byte bodies); only the values matter
	if cfg.Addr != "127.0.0.1:1" || cfg.DataDir != "/elsewhere" || cfg.RedisURL != "redis://x:1" ||
		cfg.Tokens != "a:0123456789abcdef" || cfg.DefaultLease != 2*time.Second || cfg.MaxLease != 3*time.Second ||
		cfg.DefaultTTL != 2*time.Hour || cfg.MaxTTL != 3*time.Hour || cfg.MaxWait != time.Second ||
		cfg.MaxBodyBytes != 7 || cfg.SweepInterval != 9*time.Second || cfg.LogLevel != "error" ||
		cfg.ShutdownTimeout != time.Second || cfg.Backend != "redis" || cfg.MaxConns != 5 || cfg.MaxWaiters != 3 {
		t.Errorf("prefixed names not all read: %+v", cfg)
	}
}

// defaultConfig is the configuration of the environment without IDEMSVC_ variables.
func defaultConfig(t *testing.T) Config {
	t.Helper()
	var cfg Config
	if err := envconfig.Process("IDEMSVC_UNUSED_PREFIX_FOR_DEFAULTS", &cfg); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestKnownVarsMatchConfig: the list of known variables (which loadConfig uses to refuse an
// unknown one) names exactly the Config fields envconfig reads.
func TestKnownVarsMatchConfig(t *testing.T) {
	var fromFields []string
	ct := reflect.TypeFor[Config]()
	for i := range ct.NumField() {
		f := ct.Field(i)
		if f.Tag.Get("ignored") == "true" {
			continue
		}
		name := regexp.MustCompile(`([a-z0-9])([A-Z])`).ReplaceAllString(f.Name, "${1}_${2}")
		fromFields = append(fromFields, envPrefix+"_"+strings.ToUpper(name))
	}
	known := knownVars()
	slices.Sort(fromFields)
	slices.Sort(known)
	if !slices.Equal(fromFields, known) {
		t.Errorf("Config's variables %v, knownVars %v", fromFields, known)
	}
}

func TestUsageListsEveryVariable(t *testing.T) {
	var out bytes.Buffer
	if code := realMain([]string{"-h"}, nil, &out, io.Discard); code != 0 {
		t.Fatalf("-h exited %d", code)
	}
	for _, v := range knownVars() {
		if !strings.Contains(out.String(), v) {
			t.Errorf("-h does not mention %s:\n%s", v, out.String())
		}
	}
	var stderr bytes.Buffer
	if code := realMain(nil, []string{"IDEMSVC_NOPE=1"}, io.Discard, &stderr); code != 1 || !strings.Contains(stderr.String(), "IDEMSVC_NOPE") {
		t.Errorf("an unknown variable: exit %d, stderr %q", code, stderr.String())
	}
	// The project's own test variables, which the README names, do not stop the service; a
	// near miss of one does.
	for _, env := range [][]string{
		{"IDEMSVC_PROOFS=long"}, {"IDEMSVC_TEST_REQUIRE_BACKENDS=1"}, {"IDEMSVC_TEST_REDIS_URL=redis://x:1/9"},
		{"IDEMSVC_SOAK_DURATION=5m"}, {"IDEMSVC_SCALE=1"}, {"IDEMSVC_SCALE_RECORDS=1000"},
	} {
		if _, err := loadConfig(env); err != nil {
			t.Errorf("%s: %v, want it ignored", env[0], err)
		}
	}
	if _, err := loadConfig([]string{"IDEMSVC_PROOF=long"}); err == nil {
		t.Error("IDEMSVC_PROOF (not a test variable) was accepted")
	}
}

// startRun runs the service as main does, on 127.0.0.1:0 in dir, and returns its base URL and
// a stop function that cancels it and returns run's error.
func startRun(t *testing.T, dir string) (string, func() error) {
	t.Helper()
	base, cancel, done := startRunSignal(t, dir)
	return base, func() error { cancel(); return <-done }
}

// serveRun is startRun in a fresh data dir, stopped when the test ends (an error of the stop
// fails it).
func serveRun(t *testing.T) string {
	t.Helper()
	base, stop := startRun(t, t.TempDir())
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	})
	return base
}

// startRunSignal is startRun with the stop in two parts: cancel (the signal) returns at once,
// and done yields run's error when it has returned.
func startRunSignal(t *testing.T, dir string) (string, context.CancelFunc, <-chan error) {
	t.Helper()
	t.Setenv("IDEMSVC_ADDR", "127.0.0.1:0")
	t.Setenv("IDEMSVC_DATA_DIR", dir)
	t.Setenv("IDEMSVC_SHUTDOWN_TIMEOUT", "5s")
	cfg, err := loadConfig([]string{"IDEMSVC_ADDR=127.0.0.1:0", "IDEMSVC_DATA_DIR=" + dir})
	if err != nil {
		t.Fatal(err)
	}
	addr := make(chan string, 1)
	cfg.Ready = func(a string) { addr <- a }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg, zaptest.NewLogger(t), nil) }()
	select {
	case a := <-addr:
		return "http://" + a, cancel, done
	case err := <-done:
		cancel()
		t.Fatalf("run: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("run did not become ready")
	}
	return "", nil, nil
}

func call(t *testing.T, method, url string, body string) (int, map[string]any, http.Header) {
	t.Helper()
	req, _ := http.NewRequest(method, url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	var m map[string]any
	b, _ := io.ReadAll(resp.Body)
	_ = json.Unmarshal(b, &m)
	return resp.StatusCode, m, resp.Header
}

// TestRunEndToEnd walks the contract through run's real listener, shuts down, restarts on the
// same data dir and finds the data; a second run on a locked dir fails fast.
func TestRunEndToEnd(t *testing.T) {
	dir := t.TempDir()
	base, stop := startRun(t, dir)
	k := base + "/v1/keys/e2e%2F1"

	st, rec, _ := call(t, "POST", k+"/begin", `{"fingerprint":"fp"}`)
	if st != 201 {
		t.Fatalf("begin = %d %v", st, rec)
	}
	token := rec["lease"].(map[string]any)["token"].(string)
	if st, _, _ := call(t, "POST", k+"/begin", `{"fingerprint":"fp"}`); st != 409 {
		t.Errorf("second begin = %d, want 409", st)
	}
	if st, _, _ := call(t, "POST", k+"/begin", `{"fingerprint":"other"}`); st != 422 {
		t.Errorf("mismatched begin = %d, want 422", st)
	}
	if st, _, _ := call(t, "POST", k+"/renew", `{"token":"`+token+`"}`); st != 200 {
		t.Errorf("renew = %d, want 200", st)
	}
	complete := `{"token":"` + token + `","response":{"status":201,"headers":{"Content-Type":["application/json"]},"body":"eyJpZCI6MX0="}}`
	if st, _, _ := call(t, "POST", k+"/complete", complete); st != 200 {
		t.Fatalf("complete = %d", st)
	}
	if st, _, _ := call(t, "POST", k+"/complete", complete); st != 200 {
		t.Errorf("complete again = %d, want 200", st)
	}
	if st, _, h := call(t, "POST", k+"/begin", `{"fingerprint":"fp"}`); st != 200 || h.Get("Idempotent-Replayed") != "true" {
		t.Errorf("replay = %d %v", st, h)
	}
	if st, _, _ := call(t, "POST", k+"/release", `{"token":"`+token+`"}`); st != 409 {
		t.Errorf("release of completed = %d, want 409", st)
	}
	st, rec, _ = call(t, "POST", base+"/v1/keys/gone/begin", `{}`)
	if st != 201 {
		t.Fatalf("begin gone = %d", st)
	}
	if st, _, _ := call(t, "POST", base+"/v1/keys/gone/release", `{"token":"`+rec["lease"].(map[string]any)["token"].(string)+`"}`); st != 204 {
		t.Errorf("release = %d, want 204", st)
	}
	if st, _, _ := call(t, "DELETE", base+"/v1/keys/never", ``); st != 204 {
		t.Errorf("delete = %d, want 204", st)
	}
	// The bbolt store's commits are on /metrics.
	mresp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metricsText, _ := io.ReadAll(mresp.Body)
	mresp.Body.Close()
	for name, least := range map[string]float64{
		"idemsvc_bolt_commits_total": 1, "idemsvc_bolt_commit_calls_total": 5, "idemsvc_bolt_wal_bytes_total": 100,
		"idemsvc_bolt_commit_seconds_total": 1e-9, "idemsvc_bolt_wal_seconds_total": 1e-9,
		"idemsvc_bolt_checkpoints_total": 0, "idemsvc_bolt_pages_written_total": 0, "idemsvc_bolt_write_seconds_total": 0,
		"idemsvc_bolt_commit_gathers_total": 0, "idemsvc_bolt_commit_gather_seconds_total": 0,
	} {
		m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindSubmatch(metricsText)
		if m == nil {
			t.Errorf("/metrics has no %s", name)
			continue
		}
		if v, err := strconv.ParseFloat(string(m[1]), 64); err != nil || v < least {
			t.Errorf("%s = %s, want at least %g", name, m[1], least)
		}
	}

	// OPTIONS * is answered by the API, like any other request: problem+json, X-Request-Id.
	u, _ := url.Parse(base)
	u.Opaque = "*"
	resp, err := http.DefaultClient.Do(&http.Request{Method: "OPTIONS", URL: u, Host: u.Host, Header: http.Header{}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 || resp.Header.Get("Content-Type") != "application/problem+json" || resp.Header.Get("X-Request-Id") == "" {
		t.Errorf("OPTIONS * = %d %v, want a 404 problem with X-Request-Id", resp.StatusCode, resp.Header)
	}

	// A second service on the same data dir fails fast, saying why.
	t.Run("Locked", func(t *testing.T) {
		cfg, _ := loadConfig(nil)
		cfg.Addr, cfg.DataDir = "127.0.0.1:0", dir
		start := time.Now()
		err := run(context.Background(), cfg, zaptest.NewLogger(t), nil)
		if err == nil || !strings.Contains(err.Error(), "locked") {
			t.Errorf("second run on the same dir: %v, want an error saying the file is locked", err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("second run took %s to fail", d)
		}
	})

	if err := stop(); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	base, stop = startRun(t, dir)
	defer func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	}()
	st, rec, _ = call(t, "GET", base+"/v1/keys/e2e%2F1", "")
	if st != 200 || rec["state"] != "completed" || rec["response"].(map[string]any)["body"] != "eyJpZCI6MX0=" {
		t.Fatalf("after restart: %d %v", st, rec)
	}
	if st, _, _ := call(t, "GET", base+"/v1/keys/gone", ""); st != 404 {
		t.Errorf("released key after restart = %d, want 404", st)
	}
}

// TestShutdownFinishesInFlight: a begin waiting for a holder when shutdown starts is answered
// (409, drained) and run returns nil.
func TestShutdownFinishesInFlight(t *testing.T) {
	base, stop := startRun(t, t.TempDir())
	if st, _, _ := call(t, "POST", base+"/v1/keys/w/begin", `{}`); st != 201 {
		t.Fatal(st)
	}
	got := make(chan int, 1)
	go func() {
		st, _, _ := call(t, "POST", base+"/v1/keys/w/begin", `{"wait_ms":20000}`)
		got <- st
	}()
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	if err := stop(); err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("run returned %v", err)
	}
	if st := <-got; st != 409 {
		t.Errorf("waiting begin during shutdown = %d, want 409", st)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("shutdown took %s", d)
	}
}

// TestShutdownCutsTricklingBody: a client trickling a complete's body when shutdown starts is
// answered 503 at once, and run returns nil well within the shutdown timeout. It used to hold
// the shutdown for the whole timeout (its read timeout, 30 s, is longer), and run then failed.
func TestShutdownCutsTricklingBody(t *testing.T) {
	base, stop := startRun(t, t.TempDir()) // IDEMSVC_SHUTDOWN_TIMEOUT=5s
	st, rec, _ := call(t, "POST", base+"/v1/keys/t/begin", `{}`)
	if st != 201 {
		t.Fatal(st)
	}
	body := fmt.Sprintf(`{"token":%q,"response":{"status":201}}`, rec["lease"].(map[string]any)["token"])
	c, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /v1/keys/t/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body[:5])
	time.Sleep(100 * time.Millisecond) // the handler is reading the body
	start := time.Now()
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("the trickling complete: %v after %s", err, time.Since(start))
	}
	_ = resp.Body.Close()
	if resp.StatusCode != 503 {
		t.Errorf("the trickling complete: %d, want 503", resp.StatusCode)
	}
	if err := <-stopped; err != nil {
		t.Errorf("run returned %v after %s", err, time.Since(start))
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("shutdown took %s with a trickling client (timeout 5s)", d)
	}
}

// TestRedisPasswordNeverLogged: the start line's masked configuration shows no password, also
// one that holds an @ (the password ends at the last), and neither does the error of a URL that
// does not parse (url.Parse's error quotes the URL whole).
func TestRedisPasswordNeverLogged(t *testing.T) {
	for _, raw := range []string{
		"redis://:p@ssw0rd-secret@127.0.0.1:6379/0",
		"redis://user:s3cretpassw0rd@127.0.0.1:6379/0",
		"redis://:s3cretpassw0rd@127.0.0.1:port/0",
		"redis:s3cretpassw0rd@127.0.0.1:6379", // no "//": url.Parse reads it as opaque
		"redis:user:s3cretpassw0rd@127.0.0.1:6379/0",
		"redis://127.0.0.1:6379/0?password=s3cretpassw0rd",
		"redis://127.0.0.1:6379/0?db=1&auth=s3cretpassw0rd&auth=ssw0rd",
		// Unencoded '/', '#' or '?' in a password: the rest of it is the path, the fragment or a
		// parameter's name (and digits before it the port of a host named as the user).
		"rediss://idem:123/s3cretpassw0rd@127.0.0.1:6379/0",
		"rediss://idem:4242#s3cretpassw0rd@127.0.0.1:6379/0",
		"rediss://idem:42?s3cretpassw0rd@127.0.0.1:6379/0",
		"rediss://idem:42?db=1&s3cretpassw0rd@127.0.0.1:6379/0",
	} {
		if shown := fmt.Sprint(Config{RedisURL: raw}.masked()); strings.Contains(shown, "ssw0rd") {
			t.Errorf("masked config shows the password of %s: %s", raw, shown)
		}
	}
	// The Sentinels' password (IDEMSVC_REDIS_SENTINEL_PASSWORD) is logged as set, never shown.
	sc := Config{RedisURL: "redis://127.0.0.1:26379/0?master_set=m", RedisSentinelPassword: "s3cretpassw0rd"}
	if shown := fmt.Sprint(sc.masked()); strings.Contains(shown, "ssw0rd") || !strings.Contains(shown, "master_set=m") {
		t.Errorf("masked config of a Sentinel URL and password: %s", shown)
	}
	// A URL that names no server is refused, without its password: rueidis would take it for
	// localhost:6379, database 0 (some other Redis), and connect.
	for _, raw := range []string{"redis:s3cretpassw0rd@127.0.0.1:6379", "redis:///0", "unix://",
		// Unencoded reserved characters in a password: url.Parse's and rueidis's errors quoted a
		// piece of it (":ssw0rd" as a port, "%ssw0rd" as an escape, the path), and with '#' the
		// URL named the server "idem", port 4242, and started.
		"rediss://idem:s3cretpa/ssw0rd@127.0.0.1:6379/0", "rediss://idem:s3cretpa?ssw0rd@127.0.0.1:6379/0",
		"rediss://idem:s3cretpa#ssw0rd@127.0.0.1:6379/0", "rediss://idem:%ssw0rd@127.0.0.1:6379/0",
		"rediss://idem:123/s3cretpassw0rd@127.0.0.1:6379/0", "rediss://idem:4242#s3cretpassw0rd@127.0.0.1:6379/0",
		// unix://var/run/redis.sock is the socket /run/redis.sock of a host var.
		"unix://tmp/redis.sock",
	} {
		_, err := openStore(context.Background(), Config{Backend: "redis", RedisURL: raw}, zaptest.NewLogger(t), prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}))
		if err == nil || strings.Contains(err.Error(), "ssw0rd") || strings.Contains(err.Error(), "s3cret") || !strings.Contains(err.Error(), "IDEMSVC_REDIS_URL") {
			t.Errorf("opening %s: %v, want an error naming IDEMSVC_REDIS_URL, without the password", raw, err)
		}
	}
	_, err := openStore(context.Background(), Config{Backend: "redis", RedisURL: "redis://:s3cretpassw0rd@127.0.0.1:port/0"}, zaptest.NewLogger(t), prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}))
	if err == nil || strings.Contains(err.Error(), "ssw0rd") {
		t.Errorf("opening a URL with an invalid port: %v, want an error without the password", err)
	}
	// A URL that can never work is refused at start, not answered 503 for ever: a port out of
	// range, a parameter the store does not read (a password among them, not shown).
	for _, c := range []struct{ url, want string }{
		{"redis://127.0.0.1:99999/0", "port"},
		{"redis://127.0.0.1:0/0", "port"},
		{"redis://127.0.0.1:6379/0?password=s3cretpassw0rd", "password"},
		{"redis://127.0.0.1:6379/0?dial_timeout=1s", "dial_timeout"},
		{"redis://127.0.0.1:6379/0?addr=127.0.0.1:6380", "addr"},
		{"redis://127.0.0.1:6379/0?s3cretpassw0rd", "a parameter"},
		{"redis://127.0.0.1:6379/0?skip_verify=true", "skip_verify"},
	} {
		_, err := openStore(context.Background(), Config{Backend: "redis", RedisURL: c.url}, zaptest.NewLogger(t), prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}))
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "ssw0rd") {
			t.Errorf("opening %s: %v, want an error naming %s, without the password", c.url, err, c.want)
		}
	}
}

// TestTokensTrimmed: spaces around a tenant or a token are not part of it, so that
// "acme: <token>" lets acme in with <token> (its token used to keep the space, and acme got 401
// whatever it sent); unset IDEMSVC_TOKENS is still open mode.
func TestTokensTrimmed(t *testing.T) {
	const acme, beta = "acme-token-0123456789", "beta-token-0123456789"
	t.Setenv("IDEMSVC_TOKENS", "acme: "+acme+" , beta:\t"+beta+"\n")
	base := serveRun(t)
	for _, c := range []struct {
		auth string
		want int
	}{
		{"Bearer " + acme, 404}, {"Bearer " + beta, 404},
		{"Bearer  " + acme + " ", 404}, // the server trims the request's token too
		{"", 401}, {"Bearer  " + acme[1:], 401}, {"Bearer wrong-token-0123456789", 401},
	} {
		req, _ := http.NewRequest("GET", base+"/v1/keys/k", nil)
		if c.auth != "" {
			req.Header.Set("Authorization", c.auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("GET with Authorization %q = %d, want %d", c.auth, resp.StatusCode, c.want)
		}
	}

	cfg, err := loadConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	toks, err := cfg.tokens()
	if want := map[string]string{"acme": acme, "beta": beta}; err != nil || !maps.Equal(toks, want) {
		t.Errorf("tokens() = %q, %v; want %q", toks, err, want)
	}

	// Unset: open mode (with a warning at start), as documented.
	os.Unsetenv("IDEMSVC_TOKENS") // t.Setenv above restores it at the end
	cfg, err = loadConfig(nil)
	if err != nil {
		t.Fatalf("IDEMSVC_TOKENS unset: %v", err)
	}
	if toks, err := cfg.tokens(); err != nil || len(toks) != 0 {
		t.Errorf("IDEMSVC_TOKENS unset: tokens() = %q, %v; want open mode", toks, err)
	}
}

func TestConnLimitFor(t *testing.T) {
	for _, c := range []struct {
		maxConns int
		nofile   uint64
		want     int    // when wantErr is ""
		wantErr  string // a part of the error
	}{
		{0, 0, 10000, ""},          // RLIMIT_NOFILE unknown
		{0, 1024, 768, ""},         // a common soft limit: 256 left
		{0, 1 << 20, 10000, ""},    // a common container limit: capped
		{0, ^uint64(0), 10000, ""}, // RLIM_INFINITY
		{0, 10256, 10000, ""},
		{0, 512, 256, ""}, // small limits: half
		{0, 100, 50, ""},
		{8, 1024, 8, ""},
		{768, 1024, 768, ""},
		{769, 1024, 0, "at most 768"}, // fewer than 256 left
		{60, 100, 0, "IDEMSVC_MAX_CONNS 60"},
		{50000, 1 << 20, 50000, ""},
		{50000, 0, 50000, ""}, // unknown: as set
	} {
		got, err := connLimitFor(c.maxConns, c.nofile)
		switch {
		case c.wantErr == "" && (err != nil || got != c.want):
			t.Errorf("connLimitFor(%d, %d) = %d, %v; want %d", c.maxConns, c.nofile, got, err, c.want)
		case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
			t.Errorf("connLimitFor(%d, %d) = %d, %v; want an error saying %q", c.maxConns, c.nofile, got, err, c.wantErr)
		}
	}
	// This process's own limit.
	limit, nofile, err := connLimit(0)
	if err != nil || limit < 1 || (nofile > 0 && uint64(limit) >= nofile) || limit > 10000 {
		t.Errorf("connLimit(0) = %d, %d, %v", limit, nofile, err)
	}
}

// TestConnectionLimit: with IDEMSVC_MAX_CONNS=8, eight idle keep-alive connections take every
// slot: a ninth is not served while they stay open, and is as soon as one closes; afterwards the
// service serves new connections as before. (Without the limit, a client holding enough idle
// connections took every file descriptor of the process.)
func TestConnectionLimit(t *testing.T) {
	const limit = 8
	t.Setenv("IDEMSVC_MAX_CONNS", strconv.Itoa(limit))
	base := serveRun(t)
	addr := strings.TrimPrefix(base, "http://")
	get := func(conn net.Conn, br *bufio.Reader) (int, error) {
		if _, err := io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: idemsvc\r\n\r\n"); err != nil {
			return 0, err
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return 0, err
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, err
	}

	// Fill every slot with a connection that was served once and is now idle (keep-alive).
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range limit {
		conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, conn)
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		if st, err := get(conn, bufio.NewReader(conn)); err != nil || st != 200 {
			t.Fatalf("connection %d: %d, %v", i+1, st, err)
		}
		_ = conn.SetDeadline(time.Time{})
	}

	// A ninth connection: the oldest idle one is closed to make room for it, and it is served
	// at once (it used to wait until a client closed one, so that a few idle keep-alive
	// connections locked everyone out, /healthz included). The others stay open.
	extra, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	_ = extra.SetDeadline(time.Now().Add(2 * time.Second))
	if st, err := get(extra, bufio.NewReader(extra)); err != nil || st != 200 {
		t.Fatalf("connection %d while %d idle ones were open: %d, %v; want 200 at once", limit+1, limit, st, err)
	}
	// One idle connection was closed, the one idle the longest: which one that is, the server
	// decides from when each went idle, which it notes after the client has read its answer,
	// so that under load the second can go idle first (conns_test.go holds the order exactly).
	// Each of the others is still served.
	closed := 0
	for i, c := range conns {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		st, err := get(c, bufio.NewReader(c))
		switch {
		case err != nil && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)):
			closed++
		case err != nil || st != 200:
			t.Errorf("idle connection %d after the ninth: %d, %v; want it served, or closed by the server", i+1, st, err)
		}
	}
	if closed != 1 {
		t.Errorf("%d idle connections closed for the ninth, want 1", closed)
	}

	// All closed: the service serves new connections, more of them than the limit one after
	// the other (each slot is given back), and is healthy.
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	extra.Close()
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for i := range 3 * limit {
		resp, err := client.Get(base + "/healthz")
		if err != nil {
			t.Fatalf("request %d after the connections closed: %v", i+1, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request %d after the connections closed: %d", i+1, resp.StatusCode)
		}
	}
	if st, _, _ := call(t, "POST", base+"/v1/keys/after-limit/begin", `{}`); st != 201 {
		t.Errorf("begin after the connections closed = %d, want 201", st)
	}
}

// TestDrainDelay: with IDEMSVC_DRAIN_DELAY, a stop first turns /readyz to 503 for that long while
// every other request is served (a load balancer stops sending here before the listener
// closes), then shuts down as before. Without it /readyz answered 200 until the listener closed.
func TestDrainDelay(t *testing.T) {
	t.Setenv("IDEMSVC_DRAIN_DELAY", "1500ms")
	base, cancel, done := startRunSignal(t, t.TempDir())
	if st, _, _ := call(t, "GET", base+"/readyz", ""); st != 200 {
		t.Fatalf("/readyz before the stop: %d", st)
	}
	stopped := time.Now()
	cancel()
	time.Sleep(200 * time.Millisecond)
	st, body, _ := call(t, "GET", base+"/readyz", "")
	if st != 503 || body["title"] != "Shutting down" {
		t.Errorf("/readyz while draining: %d %v, want 503 Shutting down", st, body)
	}
	if st, _, _ := call(t, "GET", base+"/healthz", ""); st != 200 {
		t.Errorf("/healthz while draining: %d, want 200", st)
	}
	if st, _, _ := call(t, "POST", base+"/v1/keys/drain/begin", "{}"); st != 201 {
		t.Errorf("a begin while draining: %d, want 201", st)
	}
	if err := <-done; err != nil {
		t.Fatalf("run after the drain: %v", err)
	}
	if d := time.Since(stopped); d < 1500*time.Millisecond || d > 5*time.Second {
		t.Errorf("run ended %v after the stop, want after the 1.5s drain and soon after", d)
	}
}

// TestMain runs the service itself, as main does, in a test binary started by a test with
// IDEMSVC_TEST_MAIN=1 (a test of what only a whole process shows: signals, the exit status).
func TestMain(m *testing.M) {
	if os.Getenv("IDEMSVC_TEST_MAIN") == "1" {
		os.Exit(realMain(nil, os.Environ(), os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// TestSecondSignalFlushesLog: a second signal ends the process at once, with the status of a
// process the signal killed, and the access lines still in the log's buffer are written first.
// They were lost: Go's default handling of the second signal ended the process with up to a
// second of lines in the buffer.
func TestSecondSignalFlushesLog(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "IDEMSVC_TEST_MAIN=1", "IDEMSVC_ADDR=127.0.0.1:0",
		"IDEMSVC_DATA_DIR="+t.TempDir(), "IDEMSVC_DRAIN_DELAY=1m")
	var logs lockedBuffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	var addr string
	eventuallyMain(t, "the listening line", func() bool {
		for _, line := range strings.Split(logs.String(), "\n") {
			var l struct{ Msg, Addr string }
			if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "listening" {
				addr = l.Addr
			}
		}
		return addr != ""
	})
	_ = cmd.Process.Signal(syscall.SIGTERM) // drains for a minute, serving requests
	eventuallyMain(t, "the draining line", func() bool { return strings.Contains(logs.String(), "draining") })
	const n = 5
	for i := range n { // their access lines wait in the log's buffer (written out every second)
		if st, _, _ := call(t, "POST", fmt.Sprintf("http://%s/v1/keys/k%d/begin", addr, i), "{}"); st != 201 {
			t.Fatalf("begin: %d", st)
		}
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	err := cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 128+int(syscall.SIGTERM) {
		t.Errorf("exit after a second SIGTERM: %v, want status %d", err, 128+int(syscall.SIGTERM))
	}
	if got := strings.Count(logs.String(), `"msg":"request"`); got != n {
		t.Errorf("%d access lines in the log, want %d:\n%s", got, n, logs.String())
	}
	if !strings.Contains(logs.String(), "second signal") {
		t.Errorf("no line says why the process ended:\n%s", logs.String())
	}
}

// eventuallyMain waits up to 10 s for cond.
func eventuallyMain(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 10s", what)
		}
	}
}

// TestSecondSignalWithBlockedLog: a second signal ends the process even when the log's
// destination blocks (a pipe nobody reads, full): it waits at most a second for the log. The
// first version waited for the log's lock for ever (a review's find).
func TestSecondSignalWithBlockedLog(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	pr, pw, err := os.Pipe() // read by nobody: once its 64 KiB fill, every log write blocks
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "IDEMSVC_TEST_MAIN=1", "IDEMSVC_ADDR="+addr,
		"IDEMSVC_DATA_DIR="+t.TempDir(), "IDEMSVC_DRAIN_DELAY=1m")
	cmd.Stderr = pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	client := &http.Client{Timeout: time.Second}
	eventuallyMain(t, "the service answering", func() bool {
		resp, err := client.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	})
	blocked := false
	for i := 0; i < 5000 && !blocked; i++ { // access lines until the pipe is full
		resp, err := client.Post(fmt.Sprintf("http://%s/v1/keys/k%d/begin", addr, i), "application/json", strings.NewReader("{}"))
		if err != nil {
			blocked = true
			break
		}
		resp.Body.Close()
	}
	if !blocked {
		t.Fatal("the log never blocked the service")
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 128+int(syscall.SIGTERM) {
			t.Errorf("exit after a second SIGTERM with the log blocked: %v, want status %d", err, 128+int(syscall.SIGTERM))
		}
		if took := time.Since(start); took > 3*time.Second {
			t.Errorf("the process ended %s after the second signal", took)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the process still runs 10 s after a second SIGTERM with its log blocked")
	}
}

// TestSkipVerifyWarns: skip_verify (in any form rueidis reads as true) makes TLS pointless
// against anyone on the path, and was taken silently.
func TestSkipVerifyWarns(t *testing.T) {
	for _, c := range []struct {
		url  string
		warn bool
	}{
		{"rediss://127.0.0.1:1/0?skip_verify=true", true}, {"rediss://127.0.0.1:1/0?skip_verify", true},
		{"rediss://127.0.0.1:1/0?skip_verify=1", true}, {"rediss://127.0.0.1:1/0?skip_verify=false", false},
		{"rediss://127.0.0.1:1/0", false},
	} {
		core, logs := observer.New(zapcore.WarnLevel)
		s, err := openStore(context.Background(), Config{Backend: "redis", RedisURL: c.url}, zap.New(core),
			prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}))
		if err != nil {
			t.Fatalf("%s: %v", c.url, err)
		}
		s.Close()
		if got := logs.FilterMessageSnippet("skip_verify").Len() > 0; got != c.warn {
			t.Errorf("%s: warned %v, want %v", c.url, got, c.warn)
		}
	}
}
