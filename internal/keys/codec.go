package keys

import (
	"encoding/binary"
	"errors"
	"slices"
	"time"
)

// The record codec: a compact, versioned binary encoding that backends store. Varints and
// length-prefixed strings; less than half the size of the JSON of the same record and no
// reflection on the hot path.

const codecVersion = 1

var errCorrupt = errors.New("keys: corrupt record encoding")

// AppendRecord appends the encoding of r to b and returns the extended slice.
func AppendRecord(b []byte, r *Record) []byte {
	b = append(b, codecVersion)
	b = appendString(b, r.Key)
	state := byte(1)
	if r.State == StateCompleted {
		state = 2
	}
	b = append(b, state)
	b = appendString(b, r.Fingerprint)
	b = appendString(b, r.Lease.Token)
	b = binary.AppendUvarint(b, r.Lease.Fence)
	b = appendTime(b, r.Lease.ExpiresAt)
	b = appendTime(b, r.CreatedAt)
	b = appendTime(b, r.CompletedAt)
	b = appendTime(b, r.ExpiresAt)
	b = binary.AppendVarint(b, int64(r.TTL))
	if r.Response == nil {
		return append(b, 0)
	}
	b = append(b, 1)
	b = binary.AppendUvarint(b, uint64(r.Response.Status))
	names := make([]string, 0, len(r.Response.Headers))
	for name := range r.Response.Headers {
		names = append(names, name)
	}
	slices.Sort(names)
	b = binary.AppendUvarint(b, uint64(len(names)))
	for _, name := range names {
		b = appendString(b, name)
		values := r.Response.Headers[name]
		b = binary.AppendUvarint(b, uint64(len(values)))
		for _, v := range values {
			b = appendString(b, v)
		}
	}
	return appendBytes(b, r.Response.Body)
}

// DecodeRecord decodes what AppendRecord wrote. The record does not alias b.
func DecodeRecord(b []byte) (Record, error) {
	d := decoder{b: b}
	var r Record
	if d.byte() != codecVersion {
		return Record{}, errCorrupt
	}
	r.Key = d.string()
	switch d.byte() {
	case 1:
		r.State = StateInProgress
	case 2:
		r.State = StateCompleted
	default:
		d.fail()
	}
	r.Fingerprint = d.string()
	r.Lease.Token = d.string()
	r.Lease.Fence = d.uvarint()
	r.Lease.ExpiresAt = d.time()
	r.CreatedAt = d.time()
	r.CompletedAt = d.time()
	r.ExpiresAt = d.time()
	r.TTL = time.Duration(d.varint())
	switch d.byte() {
	case 0: // no response
	case 1:
		resp := &Response{Status: int(d.uvarint())}
		if n := d.count(); n > 0 {
			resp.Headers = make(map[string][]string, n)
			for range n {
				name := d.string()
				values := make([]string, d.count())
				for i := range values {
					values[i] = d.string()
				}
				resp.Headers[name] = values
			}
		}
		resp.Body = []byte(d.string())
		r.Response = resp
	default: // a corrupt tag must not pass for "no response"
		d.fail()
	}
	if d.err != nil || len(d.b) != 0 {
		return Record{}, errCorrupt
	}
	return r, nil
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendBytes(b, s []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// appendTime writes nanoseconds since the Unix epoch; the zero time is written as 0.
func appendTime(b []byte, t time.Time) []byte {
	if t.IsZero() {
		return binary.AppendVarint(b, 0)
	}
	return binary.AppendVarint(b, t.UnixNano())
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() { d.err, d.b = errCorrupt, nil }

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.fail()
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

// count reads a length that must fit in what is left of the input (each element takes a byte
// at least), so a corrupt length cannot make a huge allocation.
func (d *decoder) count() int {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail()
		return 0
	}
	return int(n)
}

func (d *decoder) string() string {
	n := d.count()
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

func (d *decoder) time() time.Time {
	n := d.varint()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// StorageID returns the unambiguous storage key of (tenant, key): the tenant's length as a
// uvarint, the tenant, then the key. Tenant "a" with key "bc" and tenant "ab" with key "c" can
// never collide.
func StorageID(tenant, key string) []byte {
	b := make([]byte, 0, 2+len(tenant)+len(key))
	b = appendString(b, tenant)
	return append(b, key...)
}
