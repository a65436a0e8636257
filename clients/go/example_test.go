package idemclient_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net/http"
	"os"
	"time"

	idemclient "github.com/idemsvc/idemsvc/clients/go"
)

// chargeCard stands for a call with a side effect that must happen at most once.
func chargeCard(ctx context.Context, cents int) (string, error) { return "ch_1", nil }

// Do runs the charge at most once per key: a retry of the same order, from this process or
// another, gets the stored result instead of charging again.
func ExampleClient_Do() {
	c, err := idemclient.New("http://127.0.0.1:8080", idemclient.WithToken(os.Getenv("IDEMCLIENT_TOKEN")))
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()
	body := []byte(`{"order":"42","cents":1000}`)
	fp := idemclient.Fingerprint(http.MethodPost, "/charges", body)

	res, err := c.Do(ctx, "order-42", fp, func(ctx context.Context) (idemclient.Response, error) {
		id, err := chargeCard(ctx, 1000)
		if err != nil {
			return idemclient.Response{}, err // the key is released: a retry may charge
		}
		return idemclient.Response{Status: http.StatusCreated, Body: []byte(id)}, nil
	}, idemclient.WithWait(5*time.Second)) // a concurrent duplicate waits for this result
	switch {
	case errors.Is(err, idemclient.ErrFingerprintMismatch):
		log.Fatal("order-42 was used for a different charge")
	case errors.Is(err, idemclient.ErrNotRecorded):
		log.Printf("charged %s, but the result was not recorded: %v", res.Response.Body, err)
	case err != nil:
		log.Fatal(err)
	}
	fmt.Printf("charge %s (replayed: %v)\n", res.Response.Body, res.Replayed)
}

// Three lines make a handler idempotent: make a client, wrap the handler, serve.
func ExampleMiddleware() {
	createCharge := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintln(w, `{"id":"ch_1"}`)
	})

	idem, err := idemclient.New("http://127.0.0.1:8080", idemclient.WithToken(os.Getenv("IDEMCLIENT_TOKEN")))
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST /charges", idemclient.Middleware(idem, idemclient.WithRequireKey())(createCharge))
	log.Fatal(http.ListenAndServe(":8000", mux))
}

// Reordered JSON keys, whitespace and 100 spelled 100.0 are the same request; another amount is
// not.
func ExampleFingerprint() {
	a := idemclient.Fingerprint("POST", "/charges", []byte(`{"amount":100,"currency":"eur"}`))
	b := idemclient.Fingerprint("POST", "/charges", []byte(`{ "currency": "eur", "amount": 100.0 }`))
	c := idemclient.Fingerprint("POST", "/charges", []byte(`{"amount":101,"currency":"eur"}`))
	fmt.Println(a == b, a == c)
	fmt.Println(a)
	// Output:
	// true false
	// 67d68c1695551a527ff72a4f955ec5f16ac98a0f886761f7ec03ccaab8f84d92
}

func ExampleCanonicalJSON() {
	out, ok := idemclient.CanonicalJSON([]byte(`{"b": [1.50, 1e2, -0], "a": "\u00e9", "c": {"y": null, "x": true}}`))
	fmt.Println(string(out), ok)
	// Output: {"a":"é","b":[1.5,100,0],"c":{"x":true,"y":null}} true
}

func ExampleParseKeyHeader() {
	for _, v := range []string{`"8e03978e-40d5"`, `"say \"hi\""`, `8e03978e-40d5`, `"unterminated`} {
		key, err := idemclient.ParseKeyHeader(v)
		fmt.Printf("%q %v\n", key, err != nil)
	}
	// Output:
	// "8e03978e-40d5" false
	// "say \"hi\"" false
	// "8e03978e-40d5" false
	// "" true
}

func ExampleScopedKey() {
	fmt.Println(idemclient.ScopedKey("POST", "/charges", "8e03978e-40d5"))
	// Output: POST:8:/charges:8e03978e-40d5
}
