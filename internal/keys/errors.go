package keys

import "errors"

// The closed set of errors of this package. Any other error from a Store means internal.
var (
	// ErrNotFound: there is no live record for the key.
	ErrNotFound = errors.New("not found")
	// ErrInProgress: a live lease holds the key.
	ErrInProgress = errors.New("in progress")
	// ErrFingerprintMismatch: the key was begun with another fingerprint.
	ErrFingerprintMismatch = errors.New("fingerprint mismatch")
	// ErrLeaseLost: the token is not the key's current lease.
	ErrLeaseLost = errors.New("lease lost")
	// ErrAlreadyCompleted: the key is completed (with another token or response).
	ErrAlreadyCompleted = errors.New("already completed")
	// ErrInvalidKey: the key is not 1 to 255 bytes of visible ASCII, or is "." or "..".
	ErrInvalidKey = errors.New("invalid key")
	// ErrInvalidRequest: a request field is missing, malformed or out of range.
	ErrInvalidRequest = errors.New("invalid request")
	// ErrInvalidResponse: the response to store breaks a rule (status, headers, size).
	ErrInvalidResponse = errors.New("invalid response")
	// ErrUnavailable: the store cannot be reached; the operation may be retried.
	ErrUnavailable = errors.New("store unavailable")
)
