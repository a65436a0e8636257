package crash

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// A SIGKILL leaves the page cache intact, so TestKill9 cannot see a commit that skipped fsync;
// a power cut would. These tests hold the store to fsync on every commit instead.

// TestBoltStoreSyncsEveryCommit opens the bolt store the ways the service and the tests do and
// fails if any of them could acknowledge a write that is not on disk.
func TestBoltStoreSyncsEveryCommit(t *testing.T) {
	for _, tt := range []struct {
		name string
		opts bolt.Options
	}{
		{"Defaults", bolt.Options{}},
		{"AsCmdIdemsvc", bolt.Options{Timeout: 2 * time.Second}}, // cmd/idemsvc's openStore
		{"LargeBatches", bolt.Options{MaxBatchSize: 1000}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := bolt.OpenDir(t.TempDir(), tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if problems := durabilityProblems(boltDB(t, s)); len(problems) > 0 {
				t.Errorf("the bolt store can acknowledge writes that are not on disk: %s", strings.Join(problems, "; "))
			}
		})
	}
}

// TestDurabilityCheckCatchesNoSync shows that the check above fails when fsync is off.
func TestDurabilityCheckCatchesNoSync(t *testing.T) {
	t.Run("OpenedWithNoSync", func(t *testing.T) {
		db, err := bbolt.Open(filepath.Join(t.TempDir(), "x.db"), 0o600, &bbolt.Options{NoSync: true, NoGrowSync: true})
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if got := durabilityProblems(db); len(got) != 2 {
			t.Errorf("durabilityProblems = %q, want NoSync and NoGrowSync reported", got)
		}
	})
	t.Run("StoreSwitchedToNoSync", func(t *testing.T) {
		s, err := bolt.OpenDir(t.TempDir(), bolt.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		db := boltDB(t, s)
		db.NoSync = true
		defer func() { db.NoSync = false }()
		if got := durabilityProblems(db); len(got) != 1 || !strings.Contains(got[0], "NoSync") {
			t.Errorf("durabilityProblems = %q, want NoSync reported", got)
		}
	})
}

// durabilityProblems lists the settings of db under which a commit can return before its
// pages are on disk.
func durabilityProblems(db *bbolt.DB) []string {
	var problems []string
	if db.NoSync {
		problems = append(problems, "NoSync is set: commits skip fsync")
	}
	if db.NoGrowSync {
		problems = append(problems, "NoGrowSync is set: growing the file skips fsync")
	}
	if db.IsReadOnly() {
		problems = append(problems, "the database is read-only")
	}
	return problems
}

// boltDB returns the *bbolt.DB under a bolt store.
func boltDB(t *testing.T, s *bolt.Store) *bbolt.DB {
	t.Helper()
	return s.DB()
}

// TestConsistencyCheckCatchesCorruption shows that the harness's bbolt check is not vacuous: a
// file whose page headers are overwritten must fail it.
func TestConsistencyCheckCatchesCorruption(t *testing.T) {
	dir := t.TempDir()
	s, err := bolt.OpenDir(dir, bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := range 100 {
		if _, err := s.Begin(ctx, "default", fmt.Sprintf("key-%04d", i), keys.BeginRequest{Lease: time.Hour, TTL: time.Hour}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, bolt.FileName)
	if errs := consistencyErrors(path); len(errs) > 0 {
		t.Fatalf("the intact file fails the check: %v", errs)
	}

	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Give every page after the meta pages a wrong page id in its header.
	page := int64(os.Getpagesize()) // bbolt's default page size
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	for off := 2 * page; off < fi.Size(); off += page {
		if _, err := f.WriteAt([]byte{0xff, 0xff, 0xff, 0x7f}, off); err != nil {
			t.Fatal(err)
		}
	}
	_ = f.Close()
	errs := consistencyErrors(path)
	if len(errs) == 0 {
		t.Fatalf("the check finds nothing wrong with a corrupted file")
	}
	t.Logf("a corrupted page fails the check, as it must: %v", errs[0])
}
