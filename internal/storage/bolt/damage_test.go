package bolt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// damagedFixture writes a data file of n completed records and returns its bytes.
func damagedFixture(t *testing.T, n int) []byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), FileName)
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range n {
		key := fmt.Sprintf("k%d", i)
		res, err := s.Begin(ctx, "t", key, keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		req := keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 201, Body: bytes.Repeat([]byte("x"), 200)}}
		if _, err := s.Complete(ctx, "t", key, req); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOpenDamagedFile: a data file cut short or emptied is an error that says so, never a panic
// or a memory fault (both took the process down: bbolt panicked reading the freelist, or faulted
// on a page past the end of the file).
func TestOpenDamagedFile(t *testing.T) {
	t.Parallel()
	whole := damagedFixture(t, 300)
	if len(whole) < 98304+4096 {
		t.Fatalf("fixture of %d bytes: too small to cut at every size below", len(whole))
	}
	// The file grows ahead of its pages: the last page its meta counts ends at tx.Size().
	path := filepath.Join(t.TempDir(), FileName)
	if err := os.WriteFile(path, whole, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	var used int64
	_ = s.db.View(func(tx *bbolt.Tx) error { used = tx.Size(); return nil })
	_ = s.Close()
	for _, size := range []int{0, 10000, 16384, 65536, 98304, int(used) - 4096} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), FileName)
			if err := os.WriteFile(path, whole[:size], 0o600); err != nil {
				t.Fatal(err)
			}
			s, err := Open(path, Options{})
			if err == nil {
				_ = s.Close()
				t.Fatalf("a file cut to %d of %d bytes opened", size, len(whole))
			}
			if !errors.Is(err, ErrDamaged) {
				t.Errorf("error %v does not wrap ErrDamaged", err)
			}
		})
	}
	t.Run("Whole", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), FileName)
		if err := os.WriteFile(path, whole, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Open(path, Options{})
		if err != nil {
			t.Fatalf("the whole file: %v", err)
		}
		_ = s.Close()
	})
}

// TestDamagedPageFailsWrites: a leaf overwritten on disk, which Open cannot see, makes the reads
// and writes that touch it fail with ErrDamaged, and Ping report the damage, instead of a panic
// (in the committer goroutine it ended the process). Nothing is acknowledged that was not
// committed.
func TestDamagedPageFailsWrites(t *testing.T) {
	t.Parallel()
	whole := damagedFixture(t, 300)
	// Overwrite the element headers of the leaves that hold records (their storage ids carry
	// the keys in clear), as a bad disk or a stray write would.
	var hit []string
	for pg := 2; (pg+1)*4096 <= len(whole); pg++ {
		p := whole[pg*4096 : (pg+1)*4096]
		if p[8] != 0x02 || !bytes.Contains(p, []byte("\x01tk15")) { // a leaf page with k15*
			continue
		}
		copy(p[16:216], bytes.Repeat([]byte{0xff}, 200))
		hit = append(hit, fmt.Sprint(pg))
	}
	if len(hit) == 0 {
		t.Fatal("no leaf holds the records k15*: the fixture changed")
	}
	path := filepath.Join(t.TempDir(), FileName)
	if err := os.WriteFile(path, whole, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatalf("open: %v (the damage is in leaves that open does not read)", err)
	}
	defer s.Close()
	ctx := context.Background()
	if err := s.Ping(ctx); err != nil {
		t.Fatalf("Ping before any damage was met: %v", err)
	}
	// A write that lands on a damaged leaf: a delete goes through the committer.
	if err := s.Delete(ctx, "t", "k150"); !errors.Is(err, ErrDamaged) {
		t.Errorf("delete of a record on a damaged leaf (pages %v) = %v, want ErrDamaged", hit, err)
	}
	// A read of it, through a read transaction.
	if _, err := s.Get(ctx, "t", "k151"); !errors.Is(err, ErrDamaged) {
		t.Errorf("get of a record on a damaged leaf = %v, want ErrDamaged", err)
	}
	if err := s.Ping(ctx); !errors.Is(err, ErrDamaged) {
		t.Errorf("Ping after damage was met = %v, want ErrDamaged", err)
	}
}
