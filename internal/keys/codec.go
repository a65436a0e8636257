package keys

import (
	"encoding/binary"
	"errors"
	"slices"
	"strings"
	"time"
)

// The record codec: a compact, versioned binary encoding that backends store. Varints and
// length-prefixed strings; less than half the size of the JSON of the same record and no
// reflection on the hot path.

const codecVersion = 1

var errCorrupt = errors.New("keys: corrupt record encoding")

// AppendRecord appends the encoding of r to b and returns the extended slice. It grows b once,
// to about the encoding's size, before it writes.
func AppendRecord(b []byte, r *Record) []byte {
	var few [8]string
	names := few[:0]
	// At most 10 bytes for each of the 11 varints and 3 single bytes; a varint per string.
	size := 11*binary.MaxVarintLen64 + 3 + len(r.Key) + len(r.Fingerprint) + len(r.Lease.Token) + 3*binary.MaxVarintLen64
	if r.Response != nil {
		size += len(r.Response.Body) + binary.MaxVarintLen64
		for name, values := range r.Response.Headers {
			names = append(names, name)
			size += len(name) + 2*binary.MaxVarintLen64
			for _, v := range values {
				size += len(v) + binary.MaxVarintLen64
			}
		}
	}
	b = slices.Grow(b, size)
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
//
// It makes few allocations whatever the record holds: all its strings share one, the header
// values another, and the body a third.
func DecodeRecord(b []byte) (Record, error) {
	d := decoder{b: b}
	if size, values, ok := measure(b); ok {
		d.strs.Grow(size)
		d.values = make([]string, 0, values)
	}
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
				resp.Headers[name] = d.strings(d.count())
			}
		}
		resp.Body = d.bytes()
		r.Response = resp
	default: // a corrupt tag must not pass for "no response"
		d.fail()
	}
	if d.err != nil || d.i != len(d.b) {
		return Record{}, errCorrupt
	}
	return r, nil
}

// CloneRecord returns what DecodeRecord(AppendRecord(nil, r)) returns, without making the
// encoding and reading it back: a record that shares no memory its caller may change (the
// response's body and header values are copied; strings cannot change and are shared), with
// the codec's times (nanoseconds in UTC, no monotonic reading, and the zero time for the Unix
// epoch as for an unset time), its states (anything but completed is in progress), no Memo,
// and a nil header map when there are no headers. TestCloneRecordIsTheRoundTrip and
// FuzzCloneRecord hold it to that.
func CloneRecord(r *Record) Record {
	c := Record{
		Key:         r.Key,
		State:       StateInProgress,
		Fingerprint: r.Fingerprint,
		Lease: Lease{
			Token:     r.Lease.Token,
			Fence:     r.Lease.Fence,
			ExpiresAt: codecTime(r.Lease.ExpiresAt),
		},
		CreatedAt:   codecTime(r.CreatedAt),
		CompletedAt: codecTime(r.CompletedAt),
		ExpiresAt:   codecTime(r.ExpiresAt),
		TTL:         r.TTL,
	}
	if r.State == StateCompleted {
		c.State = StateCompleted
	}
	if r.Response == nil {
		return c
	}
	resp := &Response{Status: r.Response.Status, Body: append(make([]byte, 0, len(r.Response.Body)), r.Response.Body...)}
	if len(r.Response.Headers) > 0 {
		n := 0
		for _, values := range r.Response.Headers {
			n += len(values)
		}
		all := make([]string, 0, n) // one allocation for every name's values, as DecodeRecord
		resp.Headers = make(map[string][]string, len(r.Response.Headers))
		for name, values := range r.Response.Headers {
			start := len(all)
			all = append(all, values...)
			resp.Headers[name] = all[start:len(all):len(all)]
		}
	}
	c.Response = resp
	return c
}

// codecTime is t as the codec carries it: see appendTime and decoder.time.
func codecTime(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	n := t.UnixNano()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// DecodeExpiry reads only what a sweep needs of an encoding, the record's ExpiresAt, without
// copying anything. It checks less than DecodeRecord: an encoding it accepts may still be
// corrupt further on.
func DecodeExpiry(b []byte) (time.Time, error) {
	d := decoder{b: b}
	if d.byte() != codecVersion {
		return time.Time{}, errCorrupt
	}
	d.skip() // key
	if state := d.byte(); state != 1 && state != 2 {
		d.fail()
	}
	d.skip() // fingerprint
	d.skip() // token
	d.uvarint()
	d.varint() // lease expires_at
	d.varint() // created_at
	d.varint() // completed_at
	expires := d.time()
	if d.err != nil {
		return time.Time{}, d.err
	}
	return expires, nil
}

// measure walks an encoding as DecodeRecord does and returns the total length of its strings
// (the body is not one) and the number of its header values, so that DecodeRecord can allocate
// for them once. It reports false on an encoding that DecodeRecord would refuse, and may
// report true on some of those: DecodeRecord checks everything again.
func measure(b []byte) (size, values int, ok bool) {
	d := decoder{b: b}
	skip := func() {
		n := d.count()
		size += n
		d.i += n
	}
	d.byte() // version
	skip()   // key
	d.byte() // state
	skip()   // fingerprint
	skip()   // token
	d.uvarint()
	for range 5 { // four times and the TTL, all varints
		d.varint()
	}
	if d.byte() == 1 {
		d.uvarint() // status
		for n := d.count(); n > 0 && d.err == nil; n-- {
			skip() // name
			m := d.count()
			values += m
			for ; m > 0 && d.err == nil; m-- {
				skip()
			}
		}
	}
	return size, values, d.err == nil
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

// decoder reads b from i on. It moves i rather than b along: a write of an int needs no GC
// write barrier, and a decoder runs on every read of a record.
type decoder struct {
	b   []byte
	i   int
	err error

	// strs holds the bytes of every string decoded, so that they share one allocation: a
	// strings.Builder never changes what it has written, so each string stays as it was.
	strs strings.Builder
	// values is where the header values' slices are cut from.
	values []string
}

func (d *decoder) fail() { d.err, d.i = errCorrupt, len(d.b) }

// rest returns what is left to read.
func (d *decoder) rest() []byte { return d.b[d.i:] }

func (d *decoder) byte() byte {
	if d.i >= len(d.b) {
		d.fail()
		return 0
	}
	c := d.b[d.i]
	d.i++
	return c
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.rest())
	if n <= 0 {
		d.fail()
		return 0
	}
	d.i += n
	return v
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.rest())
	if n <= 0 {
		d.fail()
		return 0
	}
	d.i += n
	return v
}

// count reads a length that must fit in what is left of the input (each element takes a byte
// at least), so a corrupt length cannot make a huge allocation.
func (d *decoder) count() int {
	n := d.uvarint()
	if n > uint64(len(d.b)-d.i) {
		d.fail()
		return 0
	}
	return int(n)
}

func (d *decoder) string() string {
	n := d.count()
	if n == 0 {
		return ""
	}
	start := d.strs.Len()
	d.strs.Write(d.b[d.i : d.i+n])
	d.i += n
	return d.strs.String()[start:]
}

// skip passes over a string.
func (d *decoder) skip() { d.i += d.count() }

// strings reads n strings into a slice whose capacity is its length, so that an append to it
// does not write into its neighbour's values.
func (d *decoder) strings(n int) []string {
	if d.values == nil || len(d.values)+n > cap(d.values) {
		d.values = make([]string, 0, n) // measure was wrong; correct all the same
	}
	start := len(d.values)
	for range n {
		d.values = append(d.values, d.string())
	}
	return d.values[start:len(d.values):len(d.values)]
}

// bytes reads a byte string into a slice of its own: empty, not nil, when it is empty.
func (d *decoder) bytes() []byte {
	n := d.count()
	b := make([]byte, n)
	copy(b, d.rest())
	d.i += n
	return b
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
	return AppendStorageID(make([]byte, 0, 2+len(tenant)+len(key)), tenant, key)
}

// AppendStorageID appends StorageID(tenant, key) to b.
func AppendStorageID(b []byte, tenant, key string) []byte {
	b = appendString(b, tenant)
	return append(b, key...)
}
