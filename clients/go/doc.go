// Package idemclient is the Go client of idemsvc, an idempotency-as-a-service REST server.
//
// It has three layers:
//
//   - [Client] calls the endpoints of the HTTP API one by one ([Client.Begin], [Client.Complete],
//     [Client.Renew], [Client.Release], [Client.Get], [Client.Delete]), retrying what is safe to
//     retry (see [RetryPolicy]) and returning typed values and [*Error].
//   - [Client.Do] runs a function at most once per key: it begins, renews the lease in the
//     background while the function runs, and completes with the function's result, or releases
//     the key when the function fails so that a retry can run. A second Do with the same key
//     returns the stored result without calling the function.
//   - [Middleware] makes a net/http handler idempotent for requests carrying an Idempotency-Key
//     header, replaying the stored response to retries.
//
// [Fingerprint] derives the fingerprint that ties a key to one request, so that a key reused for
// a different request is refused instead of answered with another request's response.
//
// The package depends on the standard library only.
package idemclient
