package bolt

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// FuzzReadSegment: whatever a crash or the disk does to a segment (bytes changed, the file cut
// short or grown with zeros), in a new file or in a spare written over (the bytes of an older
// segment after its end), readSegment never panics and never returns a frame that was not
// written: it returns a prefix of the frames written, or ErrDamaged.
//
//	go test -run '^$' -fuzz FuzzReadSegment -fuzztime 60s ./internal/storage/bolt/
func FuzzReadSegment(f *testing.F) {
	dir := f.TempDir()
	base := filepath.Join(dir, "seed.db")
	w, err := openWAL(base, 7)
	if err != nil {
		f.Fatal(err)
	}
	payloads := [][]byte{
		appendOp(nil, opDel, []byte("first"), nil),
		appendOp(nil, opPut, []byte("second"), bytes.Repeat([]byte{1, 0, 0, 0}, 300)),
		appendOp(nil, opDel, bytes.Repeat([]byte("third"), 900), nil),
	}
	for _, p := range payloads {
		if err := w.append(p); err != nil {
			f.Fatal(err)
		}
	}
	_ = w.close()
	written, err := os.ReadFile(segmentPath(base, 7))
	if err != nil {
		f.Fatal(err)
	}
	// An older segment, longer, whose file the spare was: its frames, with its own salt, after
	// the new segment's end.
	old, err := openWAL(filepath.Join(dir, "old.db"), 3)
	if err != nil {
		f.Fatal(err)
	}
	for i := range 40 {
		if err := old.append(payloads[i%len(payloads)]); err != nil {
			f.Fatal(err)
		}
	}
	_ = old.close()
	older, err := os.ReadFile(segmentPath(filepath.Join(dir, "old.db"), 3))
	if err != nil {
		f.Fatal(err)
	}
	over := append(bytes.Clone(written), older[len(written):]...)
	f.Add(uint32(40), byte(0xff), uint32(len(written)), uint16(0), false)
	f.Add(uint32(24), byte(0x10), uint32(len(written)), uint16(0), false) // the first length
	f.Add(uint32(5000), byte(0), uint32(5000), uint16(8192), false)       // cut in a frame, zeros after
	f.Add(uint32(len(written)-3), byte(1), uint32(len(written)), uint16(0), false)
	f.Add(uint32(len(written)-frameHeader+1), byte(1), uint32(len(over)), uint16(0), true) // the end, damaged
	f.Add(uint32(5000), byte(0x80), uint32(len(over)), uint16(0), true)
	f.Fuzz(func(t *testing.T, at uint32, xor byte, cut uint32, zeros uint16, spare bool) {
		b := bytes.Clone(written)
		if spare {
			b = bytes.Clone(over)
		}
		if int(at) < len(b) {
			b[at] ^= xor
		}
		if int(cut) < len(b) {
			b = b[:cut]
		}
		b = append(b, make([]byte, zeros)...)
		d := t.TempDir()
		p := filepath.Join(d, "x.db")
		if err := os.WriteFile(segmentPath(p, 7), b, 0o600); err != nil {
			t.Fatal(err)
		}
		frames, _, err := readSegment(p, 7, true)
		if err != nil {
			return // ErrDamaged, or a header that is not one
		}
		if len(frames) > len(payloads) {
			t.Fatalf("%d frames read, %d written", len(frames), len(payloads))
		}
		for i, fr := range frames {
			if !bytes.Equal(fr, payloads[i]) {
				t.Fatalf("frame %d read is not the one written", i)
			}
		}
	})
}
