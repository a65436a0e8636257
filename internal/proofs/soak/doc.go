// Package soak proves that idemsvc holds a steady load without leaking: a bounded soak over
// loopback against the real handler and a bbolt store, in process, that samples goroutines,
// the heap after a GC, open files and the bbolt file size, and asserts that they stay bounded;
// after shutdown, go.uber.org/goleak finds no goroutine left behind.
//
// The package has no code outside its tests. The short run takes about ten seconds; set
// IDEMSVC_PROOFS=long for five minutes, or IDEMSVC_SOAK_DURATION to any Go duration.
package soak
