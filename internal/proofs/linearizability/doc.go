// Package linearizability proves that idemsvc's key operations are linearizable: that every
// history of concurrent begin, complete, renew, release, get and delete calls, recorded over
// real HTTP against a real store, can be explained by some one-at-a-time order of those calls
// that respects real time, on a simple sequential model of one key.
//
// The model (Model) is checked with github.com/anishathalye/porcupine, partitioned by key. In
// particular, two begins that both answer 201 while neither released nor lost its lease can never
// be linearized: "exactly one winner" is a special case of linearizability.
//
// A call whose outcome the client never learned (a timeout, a broken connection, a 5xx) is an
// unknown outcome, as in Jepsen: it may have taken effect at any moment after it was called, so
// it is given a return time after the end of the history and the model accepts any output for it.
//
// The tests live in this package's _test files; `go test` runs the short version and
// IDEMSVC_PROOFS=long a longer one.
package linearizability
