package server

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// problemJSON is the reference of the problem body: what json.Encoder writes for it is what
// appendProblem must write.
type problemJSON struct {
	Type     string `json:"type"`
	Title    string `json:"title"`
	Status   int    `json:"status"`
	Detail   string `json:"detail"`
	Instance string `json:"instance,omitempty"`
}

func encodeProblemJSON(t *testing.T, p problemType, detail, instance string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(problemJSON{
		Type:     "urn:idemsvc:problem:" + p.name,
		Title:    p.title,
		Status:   p.status,
		Detail:   detail,
		Instance: instance,
	}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestAppendProblemMatchesEncodingJSON(t *testing.T) {
	t.Parallel()
	weird := "a\"b\\c\n\r\t\b\f\x01\x1f<>&\u2028\u2029\xff\xc3é€😀"
	types := []problemType{internalProblem, {name: weird, status: 999, title: weird}}
	for _, p := range problems {
		types = append(types, p.problemType)
	}
	for _, p := range types {
		for _, detail := range []string{"", details[p.name], `invalid request: unknown field "<x>"`, weird} {
			for _, instance := range []string{"", "/v1/keys/k/begin", "/v1/keys/a%20b/begin", weird} {
				want := encodeProblemJSON(t, p, detail, instance)
				if got := appendProblem(nil, p, detail, instance); !bytes.Equal(got, want) {
					t.Errorf("%s %q %q:\n got %s\nwant %s", p.name, detail, instance, got, want)
				}
			}
		}
	}
}

func FuzzAppendProblem(f *testing.F) {
	f.Add("invalid-request", "Invalid request", 400, `invalid request: unknown field "x"`, "/v1/keys/k/begin")
	f.Add("x\u2028", "<&>", -1, "\xff\x00", "")
	f.Fuzz(func(t *testing.T, name, title string, status int, detail, instance string) {
		p := problemType{name: name, title: title, status: status}
		want := encodeProblemJSON(t, p, detail, instance)
		if got := appendProblem(nil, p, detail, instance); !bytes.Equal(got, want) {
			t.Fatalf("%q %q %d %q %q:\n got %s\nwant %s", name, title, status, detail, instance, got, want)
		}
	})
}

func BenchmarkWriteProblem(b *testing.B) {
	p := classify(errMissingToken)
	instance := "/v1/keys/" + strings.Repeat("k", 32) + "/complete"
	b.Run("append", func(b *testing.B) {
		b.ReportAllocs()
		buf := make([]byte, 0, 1024)
		for b.Loop() {
			buf = appendProblem(buf[:0], p, errMissingToken.Error(), instance)
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		b.ReportAllocs()
		var buf bytes.Buffer
		for b.Loop() {
			buf.Reset()
			_ = json.NewEncoder(&buf).Encode(problemJSON{Type: "urn:idemsvc:problem:" + p.name,
				Title: p.title, Status: p.status, Detail: errMissingToken.Error(), Instance: instance})
		}
	})
}
