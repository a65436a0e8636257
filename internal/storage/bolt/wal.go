package bolt

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// The write-ahead log. A write is acknowledged once it is in the log and the log is synced:
// one append and one fdatasync per group of writes, where a bbolt commit writes every page the
// group touched and syncs twice. The records reach the bbolt file later, in a checkpoint that
// carries the writes of the last interval (100 ms by default) in one transaction (see Store.checkpoint); until then
// they are read from memory (see memtable).
//
// The log is a run of segment files beside the data file, named after it: "idemsvc.db.wal-"
// and the segment's number in 16 hex digits. A segment starts with walMagic, its number (8
// bytes, big-endian) and 8 random bytes, its salt; then frames: the payload's length and its
// checksum (4 bytes each, little-endian) and the salt, then the payload, the encoded writes of
// one group. The checksum is the CRC-32C of the segment's header followed by the payload, so
// that only a frame written to this segment checks in it: not one that a response body carries
// (its bytes are a tenant's to choose), nor one left by an earlier segment. After the last frame
// (after the header, in a segment with none) comes the end: a length of zero, the CRC-32C of the
// header followed by the end's offset (8 bytes, little-endian), and the salt. Each append writes
// its frame over the end and a new end after it, in one write, synced once.
//
// The end is what lets a segment be a file used before (see spareName): a retired segment is
// kept, given a new header and a new salt, and written over, so that a commit's sync writes data
// in place and does not also journal the file's new size (on ext4, an append's fdatasync
// commits a journal transaction). What the file held before ends nowhere: its frames and ends do
// not check with the new header, and its bytes do not carry the new salt.
//
// The bbolt file remembers (bucketMeta, metaWALThrough) the last segment whose writes it holds;
// Open applies the later ones, in order, and removes the rest.
//
// A frame is synced before the next one is written, so only the last frame of the log can be
// cut short by a crash: it was never acknowledged, and Open drops it. It does not check, and no
// frame after it does (where a crash left its end, or bytes from before, or zeros where a file
// system noted the new size before the data); or its header's sector was not written, and the
// end it was written over is back, with the frame's own end after it. A frame that does not
// check with a frame after it that does (a damaged length that runs past the end, or damaged
// bytes), an end with a frame after it that checks (the disk lost the write of the frame over
// it), or a segment that is not one, stops Open with ErrDamaged: records that were acknowledged
// would be lost. So does a segment cut short, in any of these ways, with a later segment that
// has writes (recoverWAL): only the log's very last write can be cut, and a lost write of a
// segment's last frame shows so.
//
// Segments of the two earlier formats are read as before: walMagicV2 (frames without the salt,
// no end: the log ends where the file does, or in zeros, or at a frame that does not check with
// none after it that does) and walMagicV1 (no salt at all, the CRC-32C of the payload alone).

const (
	walMagic      = "IDEMWAL3"
	walHeaderSize = len(walMagic) + 8 + 8
	walMagicV2    = "IDEMWAL2" // the same header; frames of frameHeaderV2, no end
	walMagicV1    = "IDEMWAL1"
	walHeaderV1   = len(walMagicV1) + 8
	saltSize      = 8
	frameHeader   = 8 + saltSize // length, checksum, salt; an end is as long
	frameHeaderV2 = 8
	// maxFrame bounds a frame's payload: a group is at most MaxBatchSize writes of records of
	// at most about a megabyte each.
	maxFrame = 1 << 30
)

// Kinds of write in a frame's payload.
const (
	opPut   = 1 // id, then the record's encoding (keys.AppendRecord)
	opDel   = 2 // id
	opFence = 3 // tenant, then the tenant's fence sequence (8 bytes, big-endian)
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// errWALBroken wraps the error that made the log unusable: a failed sync leaves what is on
// disk unknown, and no later sync can be trusted to say otherwise (the kernel may have dropped
// the pages it could not write), so the store takes no more writes until it is opened again.
var errWALBroken = fmt.Errorf("%w: bolt: the write-ahead log failed; restart to recover from it", keys.ErrUnavailable)

// syncLog is fdatasync, for the log; tests replace it to make a sync fail.
var syncLog = fdatasync

// writeFrame writes a frame and the end after it into the log; tests replace it to make the
// write fail part-way.
var writeFrame = (*os.File).WriteAt

// wal appends frames to the current segment. append (the committer) and rotate (a checkpoint)
// run under Store.walMu, one at a time; prepare may run beside append.
type wal struct {
	base string // the data file's path; segments are base + ".wal-" + number
	f    *os.File
	num  uint64 // the current segment's number
	seed uint32 // the CRC-32C of the current segment's header, where each frame's checksum starts
	salt [saltSize]byte
	size int64 // bytes of the current segment's header and frames, all synced; its end is here
	buf  []byte

	broken atomic.Pointer[error]

	// Cumulative, for CommitStats.
	bytes atomic.Uint64
	nanos atomic.Int64
}

// segmentHeader is the first walHeaderSize bytes of segment num, with salt.
func segmentHeader(num uint64, salt [8]byte) []byte {
	return append(segmentPrefix(walMagic, num), salt[:]...)
}

// segmentPrefix is magic and num, as a segment's header starts.
func segmentPrefix(magic string, num uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(magic), num)
}

// segment is a segment file open for appends, the seed of its frames' checksums, and its salt.
type segment struct {
	f    *os.File
	seed uint32
	salt [saltSize]byte
}

// appendEnd appends the end of a segment at off, whose header's CRC-32C is seed.
func appendEnd(b []byte, seed uint32, salt [saltSize]byte, off int64) []byte {
	b = binary.LittleEndian.AppendUint32(b, 0)
	b = binary.LittleEndian.AppendUint32(b, endCheck(seed, off))
	return append(b, salt[:]...)
}

// endCheck is the checksum of a segment's end at off.
func endCheck(seed uint32, off int64) uint32 {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(off))
	return crc32.Update(seed, castagnoli, b[:])
}

// spareName is where a segment that a checkpoint retired waits to be the next one (createSegment
// takes it): one file at most, of at most maxSpare bytes. See retireSegment.
func spareName(base string) string { return base + ".wal-spare" }

// maxSpare bounds the size of a spare segment: a larger one (a burst of writes, or checkpoints
// that failed for a while) is removed, not kept.
const maxSpare = 32 << 20

func segmentPath(base string, num uint64) string {
	return fmt.Sprintf("%s.wal-%016x", base, num)
}

// segments lists the numbers of base's segments, in order.
func segments(base string) ([]uint64, error) {
	dir, name := filepath.Split(base)
	if dir == "" {
		dir = "."
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var nums []uint64
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), name+".wal-")
		if !ok || len(rest) != 16 {
			continue
		}
		n, err := strconv.ParseUint(rest, 16, 64)
		if err != nil {
			continue
		}
		nums = append(nums, n)
	}
	slices.Sort(nums)
	return nums, nil
}

// createSegment makes segment num of base, with its header, a new salt and its end, synced,
// and its name synced in the directory. It takes the spare segment when there is one: the new
// header and end are written, and synced, before the file takes the segment's name, so a crash
// never leaves a segment of that name with the header of another.
func createSegment(base string, num uint64) (segment, error) {
	var salt [saltSize]byte
	if _, err := rand.Read(salt[:]); err != nil {
		return segment{}, err
	}
	head := segmentHeader(num, salt)
	seed := crc32.Checksum(head, castagnoli)
	head = appendEnd(head, seed, salt, int64(walHeaderSize))
	path := segmentPath(base, num)
	spare := spareName(base)
	f, err := os.OpenFile(spare, os.O_RDWR, 0)
	if err == nil {
		if _, err = f.WriteAt(head, 0); err == nil {
			err = fdatasync(f)
		}
		if err == nil {
			err = os.Rename(spare, path)
		}
		_ = f.Close()
		if err == nil { // opened again by its name, which errors then give
			f, err = os.OpenFile(path, os.O_RDWR, 0)
		}
	}
	if err != nil {
		// No spare, or one of no use: the segment is made anew.
		if !errors.Is(err, fs.ErrNotExist) {
			_ = os.Remove(spare)
		}
		if f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600); err != nil {
			return segment{}, err
		}
		if _, err := f.WriteAt(head, 0); err != nil {
			_ = f.Close()
			_ = os.Remove(path)
			return segment{}, err
		}
		if err := fdatasync(f); err != nil {
			_ = f.Close()
			_ = os.Remove(path)
			return segment{}, err
		}
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		_ = f.Close()
		return segment{}, err
	}
	return segment{f: f, seed: seed, salt: salt}, nil
}

// retireSegment removes segment num of base, which the bbolt file holds, or keeps it as the
// spare when there is none and it is not too large (see spareName). The directory is not
// synced: after a crash the segment's name may be back, holding the header of a later segment,
// and that is harmless, as Open removes the segments that the file holds without reading them.
func retireSegment(base string, num uint64) error {
	path := segmentPath(base, num)
	if fi, err := os.Stat(path); err == nil && fi.Size() <= maxSpare {
		if _, err := os.Lstat(spareName(base)); errors.Is(err, fs.ErrNotExist) {
			if os.Rename(path, spareName(base)) == nil {
				return nil
			}
		}
	}
	return removeSegment(base, num)
}

// openWAL starts a new segment, num, for appends.
func openWAL(base string, num uint64) (*wal, error) {
	sg, err := createSegment(base, num)
	if err != nil {
		return nil, fmt.Errorf("write-ahead log: %w", err)
	}
	return &wal{base: base, f: sg.f, seed: sg.seed, salt: sg.salt, num: num, size: int64(walHeaderSize)}, nil
}

func (w *wal) err() error {
	if p := w.broken.Load(); p != nil {
		return *p
	}
	return nil
}

// append writes payload as a frame, over the segment's end and with a new end after it, and
// syncs it. When the write fails (a full disk), the end is written back and synced (see
// restoreEnd), the spare is removed, to give its room to a checkpoint, and the log goes on; when
// the sync fails, or the end cannot be restored, the log is broken.
func (w *wal) append(payload []byte) error {
	if err := w.err(); err != nil {
		return err
	}
	if len(payload) > maxFrame {
		return fmt.Errorf("bolt: a group of writes of %d bytes is too large for the log", len(payload))
	}
	start := time.Now()
	w.buf = slices.Grow(w.buf[:0], 2*frameHeader+len(payload))
	w.buf = binary.LittleEndian.AppendUint32(w.buf, uint32(len(payload)))
	w.buf = binary.LittleEndian.AppendUint32(w.buf, crc32.Update(w.seed, castagnoli, payload))
	w.buf = append(w.buf, w.salt[:]...)
	w.buf = append(w.buf, payload...)
	frame := len(w.buf)
	w.buf = appendEnd(w.buf, w.seed, w.salt, w.size+int64(frame))
	if _, err := writeFrame(w.f, w.buf, w.size); err != nil {
		if rerr := w.restoreEnd(); rerr != nil {
			w.fail(fmt.Errorf("writing the log: %w; writing its end back: %w", err, rerr))
		}
		_ = removeSpare(w.base)
		// Not written, so not acknowledged: the caller may try again (503).
		return fmt.Errorf("%w: writing the log: %w", keys.ErrUnavailable, err)
	}
	if err := syncLog(w.f); err != nil {
		w.fail(fmt.Errorf("syncing the log: %w", err))
		return w.err()
	}
	w.size += int64(frame)
	w.bytes.Add(uint64(len(w.buf)))
	w.nanos.Add(int64(time.Since(start)))
	if cap(w.buf) > 1<<20 {
		w.buf = nil
	}
	return nil
}

// restoreEnd writes the current segment's end back at w.size, after a write that failed, and
// syncs it: the write may have put part of its frame over the end, and a segment without its
// end reads as cut short by a crash, which stops Open (ErrDamaged) once a later segment holds
// writes. The end's blocks were written before, so a full disk still takes it on a file system
// that writes in place (ext4, xfs); one that writes every block anew (btrfs, ZFS) may refuse it,
// and the log then breaks. The file is then cut after the end, to give back what the failed
// write took (and a spare's unused tail with it). That needs no sync: the end is as long as a
// frame's header and covers the failed frame's, and a failed write never wrote its own end, so
// what may stay after it never checks.
func (w *wal) restoreEnd() error {
	end := appendEnd(nil, w.seed, w.salt, w.size)
	if _, err := w.f.WriteAt(end, w.size); err != nil {
		return err
	}
	if err := syncLog(w.f); err != nil {
		return err
	}
	_ = w.f.Truncate(w.size + int64(len(end)))
	return nil
}

func (w *wal) fail(err error) {
	err = fmt.Errorf("%w: %w", errWALBroken, err)
	w.broken.CompareAndSwap(nil, &err)
}

// prepare makes the next segment, for rotate; it may run beside append (only rotate changes
// num).
func (w *wal) prepare() (segment, error) {
	sg, err := createSegment(w.base, w.num+1)
	if err != nil {
		return segment{}, fmt.Errorf("write-ahead log: %w", err)
	}
	return sg, nil
}

// rotate continues in next, the segment that prepare made, and returns the number of the
// segment it closed.
func (w *wal) rotate(next segment) (uint64, error) {
	if err := w.err(); err != nil {
		_ = next.f.Close()
		return 0, err
	}
	old := w.num
	_ = w.f.Close()
	w.f, w.seed, w.salt, w.num, w.size = next.f, next.seed, next.salt, w.num+1, int64(walHeaderSize)
	return old, nil
}

func (w *wal) close() error { return w.f.Close() }

// readSegment returns the payloads of segment num's frames, up to its end or one cut short by a
// crash (torn says there is one; whether that may be is recoverWAL's to say): a frame that does
// not check and runs to the segment's end, or zeros to the end, or (in a salted segment) any
// frame that does not check with none after it that does, or (in this format) an end with a
// later end of the segment after it. A frame that does not check with a frame after it that does
// (in the first format: with anything after it but zeros), or an end with one after it that
// checks, is damage. last says whether it is the last segment, whose header may be cut short or
// zero too (the process died making it).
func readSegment(base string, num uint64, last bool) (frames [][]byte, torn bool, err error) {
	path := segmentPath(base, num)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, false, err
	}
	var (
		start  int    // where the frames start
		seed   uint32 // where their checksums start
		salted bool   // the second format or this one, not the first
		salt   []byte // this format's: in every frame and end
		fh     int    // the size of a frame's header
	)
	switch prefix, v2, v1 := segmentPrefix(walMagic, num), segmentPrefix(walMagicV2, num), segmentPrefix(walMagicV1, num); {
	case len(b) >= walHeaderSize && bytes.HasPrefix(b, prefix):
		start, seed, salted, fh = walHeaderSize, crc32.Checksum(b[:walHeaderSize], castagnoli), true, frameHeader
		salt = b[walHeaderSize-saltSize : walHeaderSize]
	case len(b) >= walHeaderSize && bytes.HasPrefix(b, v2):
		start, seed, salted, fh = walHeaderSize, crc32.Checksum(b[:walHeaderSize], castagnoli), true, frameHeaderV2
	case bytes.HasPrefix(b, v1):
		start, fh = walHeaderV1, frameHeaderV2 // the first format: the payload's CRC-32C alone, from seed 0
	case last && (allZero(b) || len(b) < walHeaderSize && bytes.HasPrefix(prefix, b[:min(len(b), len(prefix))]) ||
		len(b) < walHeaderSize && bytes.HasPrefix(v2, b[:min(len(b), len(v2))]) ||
		len(b) < walHeaderV1 && bytes.HasPrefix(v1, b)):
		// A header is synced before any frame is written: a last segment whose header is cut
		// short, or zeros, was being made as the process died, and holds nothing.
		return nil, false, nil
	default:
		return nil, false, fmt.Errorf("%w: %s is not a segment of the write-ahead log", ErrDamaged, path)
	}
	for off := start; off < len(b); {
		rest := len(b) - off
		n := 0
		if rest >= fh {
			n = int(binary.LittleEndian.Uint32(b[off:]))
		}
		if salt != nil && endAt(b, off, seed, salt) {
			// The end: what follows is from before, if anything, and never checks. Unless the
			// write that put a frame over this end did not reach the disk (a sector that reads as
			// it was): then the frames written after it follow, and check, and damage is what
			// that is; or only the end that the write put after its frame, which a crash in an
			// append never acknowledged leaves too: the end of the log, cut short, which is
			// damage if a later segment has writes (recoverWAL).
			at, end := scanSalted(b, off+fh, seed, salt)
			if at >= 0 {
				return nil, false, fmt.Errorf("%w: %s has an end at byte %d that a frame was written over, and a frame at byte %d after it that checks (acknowledged writes may be lost)", ErrDamaged, path, off, at)
			}
			return frames, end, nil
		}
		complete := rest >= fh && n > 0 && n <= maxFrame && rest-fh >= n && (salt == nil || bytes.Equal(b[off+8:off+fh], salt))
		if !complete || crc32.Update(seed, castagnoli, b[off+fh:off+fh+n]) != binary.LittleEndian.Uint32(b[off+4:]) {
			zeroLength := rest >= fh && n == 0
			if allZero(b[off:]) || complete && off+fh+n == len(b) {
				return frames, true, nil // cut short, or zeros: the size was noted before the data
			}
			if salted {
				// Only this segment's frames check with its seed. A frame that does not, with no
				// frame after it that does, is the end of the log, cut short by a crash however
				// the pages of that last write reached the disk (its header lost, or split
				// across two pages, one of them lost). With one after it, it is damage: a
				// damaged length that runs past the end, or damaged bytes.
				at, exhausted := -1, false
				if salt != nil {
					at, _ = scanSalted(b, off+fh, seed, salt)
				} else {
					at, exhausted = nextFrame(b, off+fh, seed)
				}
				switch {
				case at >= 0:
					return nil, false, fmt.Errorf("%w: %s has a frame at byte %d that does not check, and one at byte %d after it that does (acknowledged writes may be lost)", ErrDamaged, path, off, at)
				case !exhausted:
					return frames, true, nil
				}
				// The search ran out of its budget: decide as for the first format.
			}
			// The first format has no seed, and a response body could carry a frame that checks:
			// a length past the end is a frame cut short, and anything else damage.
			if !complete && !zeroLength {
				return frames, true, nil
			}
			return nil, false, fmt.Errorf("%w: %s has a damaged frame at byte %d, with more after it (acknowledged writes may be lost)", ErrDamaged, path, off)
		}
		frames = append(frames, b[off+fh:off+fh+n])
		off += fh + n
	}
	return frames, false, nil
}

// nextFrameBudget bounds the bytes that nextFrame checksums in a segment of the second format: a
// frame cut short that holds random bytes (a binary response body) offers a plausible length at
// about one offset in 2^32/len(b).
const nextFrameBudget = 256 << 20

// nextFrame returns the offset of the first frame at or after from in b, a segment of the second
// format, that checks with seed, or -1 when there is none; exhausted says the search checksummed
// nextFrameBudget bytes and gave up. Bytes that were never a frame of this segment check with a
// chance of 2^-32 for each offset tried.
func nextFrame(b []byte, from int, seed uint32) (at int, exhausted bool) {
	budget := nextFrameBudget
	for o := from; len(b)-o > frameHeaderV2; o++ {
		n := int(binary.LittleEndian.Uint32(b[o:]))
		if n == 0 || n > len(b)-o-frameHeaderV2 {
			continue
		}
		if budget -= n; budget < 0 {
			return -1, true
		}
		if crc32.Update(seed, castagnoli, b[o+frameHeaderV2:o+frameHeaderV2+n]) == binary.LittleEndian.Uint32(b[o+4:]) {
			return o, false
		}
	}
	return -1, false
}

// scanSalted looks at or after from in b, a segment of this format whose header's CRC-32C is
// seed, at what carries its salt: it returns the offset of the first frame that checks, or -1,
// and whether an end that checks at its own offset came before it. Only the offsets where the
// salt follows a length and a checksum are tried: bytes from before the file was this segment
// (a spare's) carry another salt, and a tenant's body does not know this one, so the scan
// checksums next to nothing.
func scanSalted(b []byte, from int, seed uint32, salt []byte) (frameAt int, end bool) {
	for o := from; len(b)-o >= frameHeader; o++ {
		i := bytes.Index(b[o+8:], salt)
		if i < 0 {
			break
		}
		o += i // the salt is whole at o+8: a header's 16 bytes are there
		n := int(binary.LittleEndian.Uint32(b[o:]))
		switch {
		case n == 0:
			end = end || endAt(b, o, seed, salt)
		case n <= len(b)-o-frameHeader && crc32.Update(seed, castagnoli, b[o+frameHeader:o+frameHeader+n]) == binary.LittleEndian.Uint32(b[o+4:]):
			return o, end
		}
	}
	return -1, end
}

// endAt reports whether b holds at off the end of the segment whose header's CRC-32C is seed
// and whose salt is salt.
func endAt(b []byte, off int, seed uint32, salt []byte) bool {
	return len(b)-off >= frameHeader && binary.LittleEndian.Uint32(b[off:]) == 0 &&
		bytes.Equal(b[off+8:off+frameHeader], salt) && binary.LittleEndian.Uint32(b[off+4:]) == endCheck(seed, int64(off))
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// walOp is one write of a frame, as decodeOps returns it.
type walOp struct {
	kind  byte
	id    []byte // storage id, or tenant for opFence
	value []byte // the record's encoding, or the fence sequence
}

func appendOp(b []byte, kind byte, id, value []byte) []byte {
	b = append(b, kind)
	b = binary.AppendUvarint(b, uint64(len(id)))
	b = append(b, id...)
	if kind != opDel {
		b = binary.AppendUvarint(b, uint64(len(value)))
		b = append(b, value...)
	}
	return b
}

func decodeOps(p []byte) ([]walOp, error) {
	var ops []walOp
	next := func() ([]byte, error) {
		n, k := binary.Uvarint(p)
		if k <= 0 || uint64(len(p)-k) < n {
			return nil, io.ErrUnexpectedEOF
		}
		v := p[k : k+int(n)]
		p = p[k+int(n):]
		return v, nil
	}
	for len(p) > 0 {
		op := walOp{kind: p[0]}
		p = p[1:]
		var err error
		if op.id, err = next(); err != nil {
			return nil, err
		}
		switch op.kind {
		case opPut, opFence:
			if op.value, err = next(); err != nil {
				return nil, err
			}
			if op.kind == opFence && len(op.value) != 8 {
				return nil, errors.New("a fence of the wrong size")
			}
		case opDel:
		default:
			return nil, fmt.Errorf("an unknown kind of write, %d", op.kind)
		}
		ops = append(ops, op)
	}
	return ops, nil
}

// removeSpare removes base's spare segment, if there is one.
func removeSpare(base string) error {
	err := os.Remove(spareName(base))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// removeSegment removes segment num of base; a segment already gone is not an error.
func removeSegment(base string, num uint64) error {
	err := os.Remove(segmentPath(base, num))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}
