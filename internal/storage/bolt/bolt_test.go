package bolt

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

func TestConformance(t *testing.T) {
	conformance(t, Options{})
}

// TestConformanceSmallSweepChunks runs the suite with sweeps of one or two records per
// transaction, so that every sweep in it spans several transactions of the group commit.
func TestConformanceSmallSweepChunks(t *testing.T) {
	conformance(t, Options{SweepChunk: 2, SweepChunkBusy: 1})
}

// TestConformanceFrequentCheckpoints runs the suite with the log carried into the file every
// millisecond, so that its operations meet checkpoints in every state.
func TestConformanceFrequentCheckpoints(t *testing.T) {
	conformance(t, Options{CheckpointInterval: time.Millisecond})
}

// TestConformanceCrashReopen runs the suite with every reopen made from a copy of the files as a
// kill -9 leaves them, without Close: what the reopened store knows comes from the log.
func TestConformanceCrashReopen(t *testing.T) {
	opts := Options{CheckpointInterval: time.Hour}
	storagetest.Run(t, storagetest.Factory{
		Open: func(t *testing.T, clock *storagetest.Clock) keys.Store {
			return openWith(t, filepath.Join(t.TempDir(), FileName), clock, opts)
		},
		Reopen: func(t *testing.T, s keys.Store, clock *storagetest.Clock) keys.Store {
			path := crashCopy(t, s.(*Store))
			checkAndClose(t, s.(*Store))
			return openWith(t, path, clock, opts)
		},
	})
}

func conformance(t *testing.T, opts Options) {
	storagetest.Run(t, storagetest.Factory{
		Open: func(t *testing.T, clock *storagetest.Clock) keys.Store {
			return openWith(t, filepath.Join(t.TempDir(), FileName), clock, opts)
		},
		Reopen: func(t *testing.T, s keys.Store, clock *storagetest.Clock) keys.Store {
			path := s.(*Store).Path()
			checkAndClose(t, s.(*Store))
			return openWith(t, path, clock, opts)
		},
	})
}

// open opens the store at path and, at the end of the test, checks and closes it.
func open(t *testing.T, path string, clock *storagetest.Clock) *Store {
	t.Helper()
	return openWith(t, path, clock, Options{})
}

func openWith(t *testing.T, path string, clock *storagetest.Clock, opts Options) *Store {
	t.Helper()
	opts.Now = clock.Now
	s, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { checkAndClose(t, s) })
	return s
}

// checkAndClose closes s, unless it is closed already, and runs bbolt's consistency check and
// checkIndex on the file it leaves (Close carries the log into it). Run on the open store, the
// check would race with the checkpoints, which write beside readers.
func checkAndClose(t *testing.T, s *Store) {
	t.Helper()
	s.mu.RLock()
	closed := s.closed
	s.mu.RUnlock()
	if closed {
		return
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
		return
	}
	db, err := bbolt.Open(s.path, 0o600, &bbolt.Options{ReadOnly: true})
	if err != nil {
		t.Errorf("consistency check of %s: %v", s.path, err)
		return
	}
	defer db.Close()
	err = db.View(func(tx *bbolt.Tx) error {
		var errs []error
		for err := range tx.Check() {
			errs = append(errs, err)
		}
		return errors.Join(append(errs, checkIndex(tx))...)
	})
	if err != nil {
		t.Errorf("consistency check of %s: %v", s.path, err)
	}
}

func TestOpenLocked(t *testing.T) {
	dir := t.TempDir()
	first, err := OpenDir(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()

	start := time.Now()
	second, err := OpenDir(dir, Options{}) // flock conflicts between two opens in one process too
	took := time.Since(start)
	if err == nil {
		second.Close()
		t.Fatal("a second Open of the same file succeeded")
	}
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "locked by another process") {
		t.Errorf("second Open: %v, want ErrLocked saying the file is locked by another process", err)
	}
	if took > 2*time.Second {
		t.Errorf("second Open took %s to fail, want about %s", took, DefaultTimeout)
	}
	if !strings.Contains(err.Error(), filepath.Join(dir, FileName)) {
		t.Errorf("second Open: %v, want the error to name the file", err)
	}
}

func TestOpenNotBolt(t *testing.T) {
	path := filepath.Join(t.TempDir(), FileName)
	if err := os.WriteFile(path, []byte(strings.Repeat("not a bolt file ", 1024)), 0o600); err != nil {
		t.Fatal(err)
	}
	if s, err := Open(path, Options{}); err == nil {
		s.Close()
		t.Fatal("Open of a file that is not a bbolt file succeeded")
	}
}

// checkIndex checks that the expiry index has exactly one entry per record, at its expiry.
func checkIndex(tx *bbolt.Tx) error {
	want := map[string]bool{}
	err := tx.Bucket(bucketRecords).ForEach(func(id, v []byte) error {
		rec, err := keys.DecodeRecord(v)
		if err != nil {
			return fmt.Errorf("record %x: %w", id, err)
		}
		want[string(expiryKey(rec.ExpiresAt, id))] = true
		return nil
	})
	if err != nil {
		return err
	}
	var errs []error
	err = tx.Bucket(bucketExpiry).ForEach(func(k, _ []byte) error {
		if !want[string(k)] {
			errs = append(errs, fmt.Errorf("expiry index entry %x has no record with that expiry", k))
		}
		delete(want, string(k))
		return nil
	})
	for k := range want {
		errs = append(errs, fmt.Errorf("record %x has no expiry index entry", k[8:]))
	}
	return errors.Join(append(errs, err)...)
}
