//go:build !unix

package main

// openFileLimit: unknown here, so the connection limit's default is its cap.
func openFileLimit() (uint64, error) { return 0, nil }
