package bolt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// TestDiskFull: on a full disk a write fails with keys.ErrUnavailable (503: retry later), not an
// internal error, and the store takes writes again once there is room. It needs a small tmpfs,
// so root; it is skipped otherwise.
func TestDiskFull(t *testing.T) {
	dir := smallTmpfs(t, "400k")
	s, err := Open(filepath.Join(dir, FileName), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	body := make([]byte, 2000)
	var full error
	n := 0
	for ; n < 10000; n++ {
		res, err := s.Begin(ctx, "t", fmt.Sprintf("k%d", n), keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
		if err == nil {
			_, err = s.Complete(ctx, "t", fmt.Sprintf("k%d", n), keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200, Body: body}})
		}
		if err != nil {
			full = err
			break
		}
	}
	if full == nil {
		t.Fatal("10,000 records of 2 KB fit in 400 KiB")
	}
	if !errors.Is(full, keys.ErrUnavailable) {
		t.Fatalf("the write on a full disk: %v, want keys.ErrUnavailable", full)
	}
	// Make room (grow the file system) and write again.
	remount(t, dir, "4m")
	if _, err := s.Begin(ctx, "t", "after", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
		t.Errorf("a write once there is room: %v", err)
	}
	if _, err := s.Get(ctx, "t", "k0"); err != nil {
		t.Errorf("a record stored before the disk filled: %v", err)
	}
}

// smallTmpfs mounts a tmpfs of size (mount's -o size=) on a directory of the test's and returns
// it; it needs root, and skips the test otherwise. Grow it with remount.
func smallTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", dir).Run() })
	return dir
}

// remount grows (or shrinks) the tmpfs at dir to size.
func remount(t *testing.T, dir, size string) {
	t.Helper()
	if out, err := exec.Command("mount", "-o", "remount,size="+size, dir).CombinedOutput(); err != nil {
		t.Fatalf("remount: %v: %s", err, out)
	}
}
