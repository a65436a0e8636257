// Package hostile proves that the idemsvc binary stays responsive and bounded under hostile
// clients: headers dribbled a byte at a time, bodies of tens of megabytes, thousands of headers
// or one huge one, and a thousand connections that never send a byte. The tests build
// cmd/idemsvc and run it, so that the http.Server settings under test are the real ones of
// cmd/idemsvc/run.go, not a copy of them.
//
// The fuzz targets of the same proof live next to the code they fuzz:
// internal/server/fuzz_test.go (FuzzHandler, FuzzRequestBody) and
// internal/keys/validate_fuzz_test.go (FuzzValidateKey, FuzzStorageID).
//
// The package has no code outside its tests.
package hostile
