package bolt

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// FuzzReadSegment: whatever a crash or the disk does to a segment (bytes changed, the file cut
// short or grown with zeros), readSegment never panics and never returns a frame that was not
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
	f.Add(uint32(40), byte(0xff), uint32(len(written)), uint16(0))
	f.Add(uint32(24), byte(0x10), uint32(len(written)), uint16(0)) // the first length
	f.Add(uint32(5000), byte(0), uint32(5000), uint16(8192))       // cut in a frame, zeros after
	f.Add(uint32(len(written)-3), byte(1), uint32(len(written)), uint16(0))
	f.Fuzz(func(t *testing.T, at uint32, xor byte, cut uint32, zeros uint16) {
		b := bytes.Clone(written)
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
