package idemclient

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// largestRecord returns the completed record of the largest size idemsvc can send, body aside
// (the body is one byte): every string at its longest and made of a character that JSON encodes
// in six bytes, as the server does (encoding/json's escaping: & is \u0026).
func largestRecord() wireRecord {
	header := map[string][]string{}
	const nameLen = 8
	valueLen := serverMaxHeaderBytes/serverMaxHeaderValues - nameLen
	for i := range serverMaxHeaderValues {
		header[fmt.Sprintf("&&&&%04d", i)] = []string{strings.Repeat("&", valueLen)}
	}
	t := time.Date(2030, 12, 31, 23, 59, 59, 999999999, time.FixedZone("", -11*3600))
	return wireRecord{
		Key:         strings.Repeat("&", serverMaxKeyBytes),
		State:       StateCompleted,
		Fingerprint: strings.Repeat("&", serverMaxFingerprintLen),
		Lease:       &wireLease{Token: strings.Repeat("t", 64), Fence: 1<<64 - 1, ExpiresAt: t},
		Response:    &wireResponse{Status: 599, Headers: header, Body: []byte{0}},
		CreatedAt:   t, CompletedAt: &t, ExpiresAt: t,
	}
}

// TestMaxResponseCoversLargestRecord: the cap on a response is at least the largest record the
// server can send: a body of the largest IDEMSVC_MAX_BODY_BYTES (64 MiB) in base64 plus the
// largest headers it accepts, escaped at worst, plus the rest of the record.
func TestMaxResponseCoversLargestRecord(t *testing.T) {
	t.Parallel()
	rest, err := json.Marshal(largestRecord())
	if err != nil {
		t.Fatal(err)
	}
	got := len(rest) + 1 - base64.StdEncoding.EncodedLen(1) + base64.StdEncoding.EncodedLen(64<<20) // + the newline
	if got > maxResponseBytes {
		t.Errorf("the largest record is %d bytes, over maxResponseBytes %d", got, maxResponseBytes)
	}
	if headers := 6 * serverMaxHeaderBytes; len(rest) < headers {
		t.Errorf("the record without its body is %d bytes, want at least %d: its headers are not the worst case", len(rest), headers)
	}
	if c, err := New("http://127.0.0.1:1"); err != nil || c.maxResponse != maxResponseBytes {
		t.Errorf("New: maxResponse = %d, %v; want maxResponseBytes", c.maxResponse, err)
	}
}

// TestResponseOverLimit: a 2xx answer longer than the limit is an explicit error, not a record
// cut short that fails to decode with "unexpected end of JSON input"; and it is not retried. An
// answer of exactly the limit is read whole.
func TestResponseOverLimit(t *testing.T) {
	t.Parallel()
	record := `{"key":"k","state":"completed","fingerprint":"","response":{"status":200,"headers":{},"body":"` +
		base64.StdEncoding.EncodeToString(bytes.Repeat([]byte("x"), 3000)) + `"},"created_at":"2030-01-01T00:00:00Z","expires_at":"2030-01-02T00:00:00Z"}`
	for _, tc := range []struct {
		name    string
		chunked bool // no Content-Length: the limit is found while reading
	}{{"ContentLength", false}, {"Chunked", true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, n := scripted(t, func(w http.ResponseWriter) {
				w.Header().Set("Content-Type", "application/json")
				if !tc.chunked {
					w.Header().Set("Content-Length", strconv.Itoa(len(record)))
				}
				w.WriteHeader(200)
				// In pieces, so that net/http does not add a Content-Length itself.
				for i := 0; i < len(record); i += 1000 {
					_, _ = io.WriteString(w, record[i:min(i+1000, len(record))])
					w.(http.Flusher).Flush()
				}
			})
			c := newTestClient(t, srv.URL)

			c.maxResponse = int64(len(record))
			rec, err := c.Get(context.Background(), "k")
			if err != nil || len(rec.Response.Body) != 3000 {
				t.Fatalf("Get of a record of exactly the limit = %+v, %v; want it whole", rec, err)
			}

			c.maxResponse = int64(len(record)) - 1
			n.Store(0)
			_, err = c.Get(context.Background(), "k")
			if !errors.Is(err, errResponseTooLarge) {
				t.Fatalf("Get of a record over the limit = %v, want errResponseTooLarge", err)
			}
			var se *json.SyntaxError
			if errors.As(err, &se) || strings.Contains(err.Error(), "JSON") || !strings.Contains(err.Error(), strconv.Itoa(len(record)-1)) {
				t.Errorf("error %q: want one that names the limit, not a JSON error", err)
			}
			if errors.Is(err, ErrUnavailable) {
				t.Errorf("error %q matches ErrUnavailable; a repeat would get the same answer", err)
			}
			if got := n.Load(); got != 1 {
				t.Errorf("%d attempts, want 1", got)
			}
		})
	}
}

// TestLargestRecordAgainstIdemsvc stores responses of the largest size the real idemsvc accepts
// (IDEMSVC_MAX_BODY_BYTES at its maximum, 64 MiB) and reads them back. With a cap of 64 MiB on
// an answer, every read of such a record failed with "unexpected end of JSON input", for ever,
// and Do said ErrNotRecorded although the record was stored.
func TestLargestRecordAgainstIdemsvc(t *testing.T) {
	if testing.Short() {
		t.Skip("moves a few hundred MB; skipped with -short")
	}
	t.Parallel()
	url := startIdemsvc(t, "IDEMSVC_MAX_BODY_BYTES="+strconv.Itoa(serverMaxBodyBytes))
	c, err := New(url, WithRetry(RetryPolicy{MaxAttempts: 1, AttemptTimeout: 2 * time.Minute}))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	body := bytes.Repeat([]byte{0xff, 0xfe, 0xfd}, serverMaxBodyBytes/3+1)[:serverMaxBodyBytes]
	check := func(t *testing.T, what string, r *Response, header map[string][]string) {
		t.Helper()
		if r == nil {
			t.Errorf("%s: no response", what)
			return
		}
		if r.Status != 200 || !bytes.Equal(r.Body, body) || len(r.Header) != len(header) {
			t.Errorf("%s: the stored response differs (status %d, %d body bytes, %d headers)", what, r.Status, len(r.Body), len(r.Header))
		}
	}
	// Each read of a record decodes some 85 MB of JSON, several seconds with -race: each kind of
	// answer is read once. Do reads the record in complete's answer, a replaying Do in begin's.
	replay := func(t *testing.T, key, fp string, header map[string][]string) {
		t.Helper()
		again, err := c.Do(ctx, key, fp, func(context.Context) (Response, error) {
			t.Error("fn ran again")
			return Response{}, nil
		})
		if err != nil || !again.Replayed {
			t.Fatalf("second Do = %v, replayed %v; want the replay", err, again.Replayed)
		}
		check(t, "replaying Do", &again.Response, header)
	}

	t.Run("Do", func(t *testing.T) {
		t.Parallel()
		// Do's complete is answered with the whole record.
		header := map[string][]string{"Content-Type": {"application/octet-stream"}}
		res, err := c.Do(ctx, "do", "fp", func(context.Context) (Response, error) {
			return Response{Status: 200, Header: header, Body: body}, nil
		}, WithCleanupTimeout(2*time.Minute))
		if err != nil {
			t.Fatalf("Do = %v; want the largest body recorded", err)
		}
		check(t, "Do's record", res.Record.Response, header)
		replay(t, "do", "fp", header)
	})

	t.Run("WorstCaseHeaders", func(t *testing.T) {
		t.Parallel()
		// The largest record idemsvc sends: the body, and headers, key and fingerprint at their
		// limits in characters that it escapes in 6 bytes. (This client escapes them in its
		// requests too, which makes such a complete too large for idemsvc's request limit; so
		// the complete is sent raw, as a client that does not escape them would.)
		largest := largestRecord()
		header := largest.Response.Headers
		b, err := c.Begin(ctx, largest.Key, BeginOptions{Fingerprint: largest.Fingerprint})
		if err != nil || !b.Acquired {
			t.Fatalf("Begin = %+v, %v", b, err)
		}
		var req bytes.Buffer
		enc := json.NewEncoder(&req)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(completeBody{Token: b.Lease.Token, Response: wireResponse{Status: 200, Headers: header, Body: body}}); err != nil {
			t.Fatal(err)
		}
		resp, err := http.Post(url+keyPath(largest.Key, "complete"), "application/json", &req)
		if err != nil {
			t.Fatal(err)
		}
		answer, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("raw complete = %d %.300s, %v", resp.StatusCode, answer, err)
		}
		if len(answer) < base64.StdEncoding.EncodedLen(len(body))+6*serverMaxHeaderBytes {
			t.Fatalf("the completed record is %d bytes; want the body in base64 and the headers escaped", len(answer))
		}
		t.Logf("the largest record is %d bytes; the client reads up to %d", len(answer), maxResponseBytes)
		rec, err := c.Get(ctx, largest.Key)
		if err != nil {
			t.Fatalf("Get = %v", err)
		}
		check(t, "Get", rec.Response, header)
	})
}
