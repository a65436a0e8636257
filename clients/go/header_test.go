package idemclient

import (
	"strings"
	"testing"
)

func TestParseKeyHeader(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in, want string
		ok             bool
	}{
		{"SFString", `"8e03978e-40d5-43e8-bc93-6894a57f9324"`, "8e03978e-40d5-43e8-bc93-6894a57f9324", true},
		{"SFStringEscapes", `"a\"b\\c"`, `a"b\c`, true},
		{"SFStringWithSpace", `"order 42"`, "order 42", true},
		{"SFStringParameters", `"abc";v=1`, "abc", true},
		{"SFStringOWS", " \t\"abc\" ", "abc", true},
		{"Bare", "8e03978e-40d5", "8e03978e-40d5", true},
		{"BareOWS", "  abc\t", "abc", true},
		{"BareSlash", "orders/42", "orders/42", true},
		{"Empty", "", "", false},
		{"EmptySFString", `""`, "", false},
		{"Unterminated", `"abc`, "", false},
		{"BadEscape", `"a\nb"`, "", false},
		{"TrailingJunk", `"abc"def`, "", false},
		{"NonASCII", `"é"`, "", false},
		{"BareWithSpace", "a b", "", false},
		{"BareWithQuote", `a"b`, "", false},
		{"TooLong", strings.Repeat("k", 256), "", false},
		{"LongestOK", strings.Repeat("k", 255), strings.Repeat("k", 255), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := ParseKeyHeader(tc.in)
			if (err == nil) != tc.ok || got != tc.want {
				t.Errorf("ParseKeyHeader(%q) = %q, %v; want %q, ok %v", tc.in, got, err, tc.want, tc.ok)
			}
		})
	}
}

func TestScopedKey(t *testing.T) {
	t.Parallel()
	if got, want := ScopedKey("POST", "/charges", "abc"), "POST:8:/charges:abc"; got != want {
		t.Errorf("ScopedKey = %q, want %q", got, want)
	}
	distinct := map[string]string{}
	for _, in := range [][3]string{
		{"POST", "/charges", "abc"},
		{"PATCH", "/charges", "abc"},
		{"POST", "/refunds", "abc"},
		{"POST", "/a:b", "c"}, // scope and key boundaries cannot be moved
		{"POST", "/a", "b:c"},
		{"POST", "/charges", "a key with spaces"},      // hashed
		{"POST", "/charges", strings.Repeat("k", 255)}, // too long: hashed
		{"POST", "/chärges", "abc"},                    // non-ASCII scope: hashed
	} {
		k := ScopedKey(in[0], in[1], in[2])
		if !ValidKey(k) {
			t.Errorf("ScopedKey(%q) = %q, not a valid key", in, k)
		}
		if prev, dup := distinct[k]; dup {
			t.Errorf("ScopedKey(%q) = ScopedKey(%s) = %q", in, prev, k)
		}
		distinct[k] = strings.Join(in[:], "|")
	}
	if k := ScopedKey("POST", "/charges", "a key"); !strings.HasPrefix(k, "sha256:") || len(k) != 7+64 {
		t.Errorf("hashed ScopedKey = %q", k)
	}
}
