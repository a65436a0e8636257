// Package crash proves that nothing acknowledged is lost: a complete answered 200 (and a begin
// answered 201) survives the idemsvc process being killed with SIGKILL at any moment, and the
// bbolt file stays consistent.
//
// The harness builds the real idemsvc binary, runs it on a data directory, drives begin and
// complete from concurrent workers, kills the process at a random moment under load, restarts it
// on the same directory and reads every acknowledged key back byte for byte; after every kill it
// runs bbolt's consistency check on the file.
//
// A kill cannot show a missing fsync (the page cache survives the process), so a separate test
// fails if the bolt store is ever opened without fsync on commit.
//
// The tests live in this package's _test files; `go test` runs the short version and
// IDEMSVC_PROOFS=long the long one.
package crash
