//go:build unix

package main

import "syscall"

// openFileLimit returns the soft RLIMIT_NOFILE. (Go raises the soft limit to the hard one at
// start, so this is the hard limit the process was started with, unless something lowered it.)
func openFileLimit() (uint64, error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, err
	}
	return uint64(rl.Cur), nil // int64 on some platforms
}
