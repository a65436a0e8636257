package idemclient

import (
	"strings"
	"testing"
)

func TestCanonicalJSON(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, in, want string
	}{
		{"SortedKeys", `{"b":2,"a":1}`, `{"a":1,"b":2}`},
		{"Whitespace", " {\n\t\"a\" : [ 1 , 2 ] ,\r\n \"b\":{ } }\n", `{"a":[1,2],"b":{}}`},
		{"Nested", `{"z":{"y":1,"x":[{"b":true,"a":null}]},"a":"s"}`, `{"a":"s","z":{"x":[{"a":null,"b":true}],"y":1}}`},
		{"Scalars", `[true,false,null,"",[],{}]`, `[true,false,null,"",[],{}]`},
		{"TopLevelString", `"x"`, `"x"`},
		// RFC 8785 section 3.2.3: keys sort by UTF-16 code units, so U+1F600 (a surrogate pair,
		// D83D DE00) comes before U+FB33 although its code point is larger.
		{"UTF16Order", `{"\u20ac":1,"\r":2,"\ufb33":3,"1":4,"\ud83d\ude00":5,"\u0080":6,"\u00f6":7}`,
			"{\"\\r\":2,\"1\":4,\"\u0080\":6,\"\u00f6\":7,\"\u20ac\":1,\"\U0001F600\":5,\"\ufb33\":3}"},
		// RFC 8785 section 3.2.2.2: only '"', '\' and control characters are escaped; the short
		// forms where JSON has them, \u00xx in lower case otherwise; '/' and non-ASCII literal.
		{"StringEscapes", `"\u0041\/\"\\\b\f\n\r\t\u001F\u007f\u00e9\u2028<>&"`, "\"A/\\\"\\\\\\b\\f\\n\\r\\t\\u001f\u007f\u00e9\u2028<>&\""},
		{"RawNonASCII", `{"é":"ü"}`, `{"é":"ü"}`},
		{"Integer", `[0,-0,1,-1,100,1234567890]`, `[0,0,1,-1,100,1234567890]`},
		{"OneAndOnePointZero", `[1.0,1e0,1E+0,10e-1,0.1e1,1.000]`, `[1,1,1,1,1,1]`},
		{"Fractions", `[1.5,1.50,-0.25,0.001,0.000001,0.0000001,123.456]`, `[1.5,1.5,-0.25,0.001,0.000001,1e-7,123.456]`},
		{"Exponents", `[1e21,1e20,1.5e25,2e-3,4.50,1E30,0.000000000000000000000000001,-1e-7]`,
			`[1e+21,100000000000000000000,1.5e+25,0.002,4.5,1e+30,1e-27,-1e-7]`},
		// Beyond the precision of a double the exact value is kept (RFC 8785 would round both to
		// 12345678901234567000 and make two different requests one).
		{"BigIntegersStayExact", `[12345678901234567890,12345678901234567891]`, `[12345678901234567890,12345678901234567891]`},
		{"LongFraction", `0.1000000000000000055511151231257827021181583404541015625`, `0.1000000000000000055511151231257827021181583404541015625`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, ok := CanonicalJSON([]byte(tc.in))
			if !ok {
				t.Fatalf("CanonicalJSON(%s) not ok", tc.in)
			}
			if string(got) != tc.want {
				t.Errorf("CanonicalJSON(%s)\n got %s\nwant %s", tc.in, got, tc.want)
			}
			again, ok := CanonicalJSON(got)
			if !ok || string(again) != string(got) {
				t.Errorf("canonical form is not a fixed point: %s -> %s", got, again)
			}
		})
	}
}

func TestCanonicalJSONRefuses(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, in string }{
		{"Empty", ""},
		{"Text", "amount=5&currency=eur"},
		{"TrailingData", `{"a":1} x`},
		{"TwoValues", `{} {}`},
		{"TrailingComma", `[1,]`},
		{"DuplicateKey", `{"a":1,"a":2}`},
		{"DuplicateKeyByEscape", `{"a":1,"\u0061":2}`},
		{"LoneHighSurrogate", `"\ud800"`},
		{"LoneLowSurrogate", `"\udc00x"`},
		{"InvalidUTF8", "\"\xff\""},
		{"ControlCharInString", "\"a\nb\""},
		{"LeadingZero", `01`},
		{"BareDot", `1.`},
		{"BadExponent", `1e`},
		{"HugeExponent", `1e99999999999`},
		{"Plus", `+1`},
		{"NaN", `NaN`},
		{"SingleQuotes", `{'a':1}`},
		{"Unterminated", `{"a":[1,2`},
		{"TooDeep", strings.Repeat("[", 1002) + strings.Repeat("]", 1002)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got, ok := CanonicalJSON([]byte(tc.in)); ok {
				t.Errorf("CanonicalJSON(%q) = %q, want not ok", tc.in, got)
			}
		})
	}
}

func TestFingerprint(t *testing.T) {
	t.Parallel()
	base := Fingerprint("POST", "/charges", []byte(`{"amount":100,"currency":"eur"}`))
	if len(base) != 64 || strings.Trim(base, "0123456789abcdef") != "" {
		t.Fatalf("Fingerprint = %q, want 64 hex digits", base)
	}
	same := map[string][3]string{
		"ReorderedKeys":    {"POST", "/charges", `{"currency":"eur","amount":100}`},
		"Whitespace":       {"POST", "/charges", "{ \"amount\": 100,\n \"currency\": \"eur\" }\n"},
		"NumberSpellings":  {"POST", "/charges", `{"amount":1e2,"currency":"eur"}`},
		"EscapedSameChars": {"POST", "/charges", `{"amount":100,"currency":"\u0065ur"}`},
	}
	for name, in := range same {
		if got := Fingerprint(in[0], in[1], []byte(in[2])); got != base {
			t.Errorf("%s: Fingerprint differs from the original request's", name)
		}
	}
	different := map[string][3]string{
		"Method":          {"PATCH", "/charges", `{"amount":100,"currency":"eur"}`},
		"Path":            {"POST", "/charges/2", `{"amount":100,"currency":"eur"}`},
		"Query":           {"POST", "/charges?x=1", `{"amount":100,"currency":"eur"}`},
		"Amount":          {"POST", "/charges", `{"amount":101,"currency":"eur"}`},
		"NestedType":      {"POST", "/charges", `{"amount":"100","currency":"eur"}`},
		"ExtraField":      {"POST", "/charges", `{"amount":100,"currency":"eur","x":null}`},
		"NotJSONAnyMore":  {"POST", "/charges", `{"amount":100,"currency":"eur"`},
		"MovedSeparation": {"POST", "/charge", `s{"amount":100,"currency":"eur"}`},
	}
	for name, in := range different {
		if got := Fingerprint(in[0], in[1], []byte(in[2])); got == base {
			t.Errorf("%s: Fingerprint equals the original request's", name)
		}
	}
	// Framing: moving bytes between method and path, or path and body, changes the fingerprint.
	if Fingerprint("POST", "/ab", nil) == Fingerprint("POST/", "ab", nil) {
		t.Error("method/path boundary is ambiguous")
	}
	if Fingerprint("POST", "/a", []byte("b")) == Fingerprint("POST", "/ab", nil) {
		t.Error("path/body boundary is ambiguous")
	}
	// Raw bodies are hashed as they are.
	if Fingerprint("POST", "/", []byte("a=1&b=2")) == Fingerprint("POST", "/", []byte("b=2&a=1")) {
		t.Error("raw bodies with different bytes have the same fingerprint")
	}
	if Fingerprint("POST", "/", nil) != Fingerprint("POST", "/", []byte{}) {
		t.Error("nil and empty bodies differ")
	}
}

func BenchmarkFingerprint(b *testing.B) {
	body := []byte(`{"amount":1000,"currency":"eur","customer":{"id":"cus_123","email":"a@example.com"},"items":[{"sku":"x","qty":2},{"sku":"y","qty":1.5}],"metadata":{"order":"42","note":"first order"}}`)
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		Fingerprint("POST", "/charges", body)
	}
}
