package keys_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/idemsvc/idemsvc/api"
	"github.com/idemsvc/idemsvc/internal/keys"
)

// Fuzz targets for key validation and storage ids; seed corpora in testdata/fuzz/.
//
//	go test -run '^$' -fuzz '^FuzzValidateKey$' -fuzztime 60s ./internal/keys/
//	go test -run '^$' -fuzz '^FuzzStorageID$' -fuzztime 60s ./internal/keys/

// specKey is the Key schema of api/openapi.yaml, loaded once.
var specKey = sync.OnceValues(func() (*openapi3.Schema, error) {
	doc, err := openapi3.NewLoader().LoadFromData(api.Spec)
	if err != nil {
		return nil, err
	}
	ref := doc.Components.Schemas["Key"]
	if ref == nil || ref.Value == nil {
		return nil, errors.New("components.schemas.Key is missing")
	}
	return ref.Value, nil
})

// FuzzValidateKey holds keys.ValidateKey to CONTRACT.md's definition of a key (written out again
// here, independently) and to the Key schema of api/openapi.yaml, and checks that a valid key
// travels as one URL path segment and comes back unchanged.
func FuzzValidateKey(f *testing.F) {
	schema, err := specKey()
	if err != nil {
		f.Fatalf("api/openapi.yaml: %v", err)
	}
	f.Fuzz(func(t *testing.T, key string) {
		err := keys.ValidateKey(key)
		valid := err == nil
		if err != nil && !errors.Is(err, keys.ErrInvalidKey) {
			t.Fatalf("ValidateKey(%q) = %v, want nil or ErrInvalidKey", key, err)
		}
		if want := contractKey(key); valid != want {
			t.Fatalf("ValidateKey(%q) accepts = %v, but CONTRACT.md says %v", key, valid, want)
		}
		if specErr := schema.VisitJSON(key); (specErr == nil) != valid {
			t.Fatalf("ValidateKey(%q) accepts = %v, but the spec's Key schema says %v (%v)", key, valid, specErr == nil, specErr)
		}
		if !valid {
			return
		}
		seg := url.PathEscape(key)
		if strings.ContainsAny(seg, "/?#") || seg == "." || seg == ".." {
			t.Fatalf("key %q escapes to %q, which is not one path segment", key, seg)
		}
		if back, err := url.PathUnescape(seg); err != nil || back != key {
			t.Fatalf("key %q escapes to %q, which unescapes to %q (%v)", key, seg, back, err)
		}
	})
}

// contractKey is CONTRACT.md's key: 1 to 255 bytes of visible ASCII (0x21 to 0x7E), except
// "." and "..".
func contractKey(key string) bool {
	if len(key) < 1 || len(key) > 255 || key == "." || key == ".." {
		return false
	}
	for _, c := range []byte(key) {
		if c < 0x21 || c > 0x7e {
			return false
		}
	}
	return true
}

// FuzzStorageID checks that keys.StorageID is injective: it decodes back to the one (tenant,
// key) that made it, so two different pairs never share an id ("a"+"bc" and "ab"+"c" included).
// It also checks that one tenant's ids never start with another tenant's prefix, so that no
// prefix scan of a tenant can ever meet another tenant's records.
func FuzzStorageID(f *testing.F) {
	f.Fuzz(func(t *testing.T, tenant1, key1, tenant2, key2 string) {
		id1 := keys.StorageID(tenant1, key1)
		id2 := keys.StorageID(tenant2, key2)
		for _, c := range []struct {
			tenant, key string
			id          []byte
		}{{tenant1, key1, id1}, {tenant2, key2, id2}} {
			gotTenant, gotKey, ok := decodeID(c.id)
			if !ok || gotTenant != c.tenant || gotKey != c.key {
				t.Fatalf("StorageID(%q, %q) = %q decodes to (%q, %q, %v)", c.tenant, c.key, c.id, gotTenant, gotKey, ok)
			}
		}
		same := tenant1 == tenant2 && key1 == key2
		if bytes.Equal(id1, id2) != same {
			t.Fatalf("StorageID(%q, %q) = %q and StorageID(%q, %q) = %q", tenant1, key1, id1, tenant2, key2, id2)
		}
		if tenant1 != tenant2 && bytes.HasPrefix(id1, keys.StorageID(tenant2, "")) {
			t.Fatalf("StorageID(%q, %q) = %q starts with tenant %q's prefix", tenant1, key1, id1, tenant2)
		}
	})
}

// decodeID reads a storage id as its documentation describes it: the tenant's length as a
// uvarint, the tenant, then the key.
func decodeID(id []byte) (tenant, key string, ok bool) {
	n, w := binary.Uvarint(id)
	if w <= 0 || n > uint64(len(id)-w) {
		return "", "", false
	}
	return string(id[w : w+int(n)]), string(id[w+int(n):]), true
}
