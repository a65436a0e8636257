// Command payments shows the idemsvc middleware protecting a payments endpoint.
//
// It starts a small payments server on a random local port: POST /charges books a charge in an
// in-memory ledger, slowly (1.5s by default), behind idemclient.Middleware. Then it plays an
// impatient client: it posts a charge with an Idempotency-Key and a timeout shorter than the
// charge takes, and retries with the same key until it gets an answer. At the end it prints the
// ledger, which has exactly one charge, and exits 1 if it has not.
//
// Start idemsvc first (from the repository root: go run ./cmd/idemsvc), then, from clients/go:
//
//	go run ./examples/payments -idemsvc http://127.0.0.1:8080
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	idemclient "github.com/idemsvc/idemsvc/clients/go"
)

func main() {
	idemURL := flag.String("idemsvc", "http://127.0.0.1:8080", "base URL of idemsvc")
	// Not an IDEMSVC_* name: idemsvc refuses to start when an IDEMSVC_* variable it does not
	// know is set, and a token is often exported in the shell that starts idemsvc too.
	token := flag.String("token", os.Getenv("IDEMCLIENT_TOKEN"), "bearer token for idemsvc (default $IDEMCLIENT_TOKEN)")
	work := flag.Duration("work", 1500*time.Millisecond, "how long booking a charge takes")
	timeout := flag.Duration("timeout", 500*time.Millisecond, "the client's timeout per attempt")
	flag.Parse()
	log.SetFlags(0)
	if err := run(context.Background(), *idemURL, *token, *work, *timeout); err != nil {
		log.Fatal("payments: ", err)
	}
}

// ledger is the payments server's book of charges.
type ledger struct {
	mu      sync.Mutex
	charges []string
	work    time.Duration
}

func (l *ledger) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.charges)
}

// charge books a charge. Like a call to a card processor, it does not stop halfway when the
// client goes away: once started, the money moves.
func (l *ledger) charge(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, "unreadable body", http.StatusBadRequest)
		return
	}
	fmt.Printf("  server: charging %s (takes %v)\n", body, l.work)
	time.Sleep(l.work)
	l.mu.Lock()
	l.charges = append(l.charges, string(body))
	id := fmt.Sprintf("ch_%d", len(l.charges))
	l.mu.Unlock()
	fmt.Printf("  server: booked %s\n", id)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, `{"id":%q,"charge":%s}`+"\n", id, body)
}

func run(ctx context.Context, idemURL, token string, work, timeout time.Duration) error {
	idem, err := idemclient.New(idemURL, idemclient.WithToken(token))
	if err != nil {
		return err
	}
	if err := idem.Ready(ctx); err != nil {
		return fmt.Errorf("idemsvc at %s is not ready (start it with: go run ./cmd/idemsvc): %w", idemURL, err)
	}

	// The payments server: the handler made idempotent with one line.
	l := &ledger{work: work}
	mux := http.NewServeMux()
	mux.Handle("POST /charges", idemclient.Middleware(idem, idemclient.WithRequireKey())(http.HandlerFunc(l.charge)))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	url := "http://" + ln.Addr().String() + "/charges"
	fmt.Printf("payments server on %s, idemsvc at %s\n", url, idemURL)

	// The impatient client: one key for the charge, the same key on every retry.
	key := fmt.Sprintf("order-%d", time.Now().UnixNano())
	body := []byte(`{"amount":1000,"currency":"eur"}`)
	client := &http.Client{Timeout: timeout}
	fmt.Printf("client: POST /charges with Idempotency-Key %q and a %v timeout\n", key, timeout)
	for attempt := 1; ; attempt++ {
		if attempt > 20 {
			return errors.New("no answer after 20 attempts")
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set(idemclient.KeyHeader, strconv.Quote(key)) // a structured-field string
		resp, err := client.Do(req)
		if err != nil {
			fmt.Printf("client: attempt %d: no answer (%v); retrying with the same key\n", attempt, shortErr(err))
			time.Sleep(200 * time.Millisecond)
			continue
		}
		answer, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusConflict {
			wait, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
			fmt.Printf("client: attempt %d: 409, still in progress; retrying after Retry-After: %ds\n", attempt, wait)
			time.Sleep(time.Duration(max(wait, 1)) * time.Second)
			continue
		}
		fmt.Printf("client: attempt %d: %d %s", attempt, resp.StatusCode, answer)
		if resp.Header.Get(idemclient.ReplayedHeader) == "true" {
			fmt.Printf("        (%s: true: the stored response of the first attempt)\n", idemclient.ReplayedHeader)
		}
		if resp.StatusCode >= 300 {
			return fmt.Errorf("charge failed with %d", resp.StatusCode)
		}
		break
	}

	n := l.count()
	fmt.Printf("ledger: %d charge(s)\n", n)
	if n != 1 {
		return fmt.Errorf("the ledger has %d charges, want exactly 1", n)
	}
	return nil
}

func shortErr(err error) string {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "client timeout"
	}
	return err.Error()
}
