// Package model proves the lease and fence rules of CONTRACT.md on every keys.Store backend
// with a model-based test: a pgregory.net/rapid state machine drives a store with random begin,
// complete, renew, release, delete, sweep and clock advances over a few keys and two tenants,
// and compares every answer with a small model written from the contract.
//
// The package has no code outside its tests. Run the short version with go test; the long one
// with IDEMSVC_PROOFS=long or -rapid.checks=N (see model_test.go).
package model
