//go:build !linux

package bolt

import "os"

// fdatasync is f.Sync where the system has no fdatasync (F_FULLFSYNC on macOS).
func fdatasync(f *os.File) error { return f.Sync() }
