package bolt

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// TestCreateLeftovers: what a first start killed during bbolt's first write leaves (a partial
// file of its own, never the data file's name) does not stop the next start, and is removed.
func TestCreateLeftovers(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, FileName)
	leftover := path + ".new-999999"
	if err := os.WriteFile(leftover, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatalf("open after an interrupted first start: %v", err)
	}
	defer s.Close()
	if _, err := s.Begin(context.Background(), "t", "k", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(path + ".new-*"); len(left) != 0 {
		t.Errorf("files left: %v", left)
	}
}

// TestCreateOnFullDisk: a first start on a full disk fails, and leaves no data file; once there
// is room the next start makes one. It used to leave an empty data file, which every later start
// refused as damaged. It needs a small tmpfs, so root; it is skipped otherwise.
func TestCreateOnFullDisk(t *testing.T) {
	dir := smallTmpfs(t, "8k")
	path := filepath.Join(dir, FileName)
	if s, err := Open(path, Options{}); err == nil {
		s.Close()
		t.Fatal("a data file was made in 8 KiB")
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after the failed first start, the data file: %v; want none", err)
	}
	if left, _ := filepath.Glob(path + ".new-*"); len(left) != 0 {
		t.Errorf("files left: %v", left)
	}
	remount(t, dir, "4m")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatalf("the start once there is room: %v", err)
	}
	s.Close()
}

// TestCreateLeftoverLink: a start killed between linking the new file to its name and removing
// the temporary name leaves a second name of the data file; the next start removes it and keeps
// the records. The data directory's name may hold glob characters.
func TestCreateLeftoverLink(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data[1]*")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, FileName)
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Begin(context.Background(), "t", "kept", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := os.Link(path, path+".new-1-0badf00d"); err != nil {
		t.Fatal(err)
	}
	s, err = Open(path, Options{})
	if err != nil {
		t.Fatalf("open with a leftover link: %v", err)
	}
	defer s.Close()
	if _, err := s.Get(context.Background(), "t", "kept"); err != nil {
		t.Errorf("the record before: %v", err)
	}
	left, _ := os.ReadDir(dir)
	for _, e := range left {
		if e.Name() != FileName && !strings.HasPrefix(e.Name(), FileName+".wal-") {
			t.Errorf("files in the data directory: %v, want the data file and its log alone", left)
		}
	}
}
