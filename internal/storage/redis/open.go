package redis

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Open returns a Store on the Redis at url: redis://[user:password@]host:port[/db], rediss://
// for TLS (with Options.TLS for a private CA or a client certificate) or
// unix:///path/to/redis.sock (the db may also be given as ?db=N, and on unix only so).
//
// Open connects at once and checks the server (see check.go), so that a misconfiguration stops
// the start: it returns an error when the URL or options are invalid, when Redis refuses the
// credentials or the database, and, wrapping ErrMisconfigured, when Redis is older than 7.0, when
// its maxmemory-policy is not noeviction (unless Options.AllowEviction), or when the ACL denies a
// command, key or channel the Store needs (the error names it; see ACL and the package doc).
//
// A Redis that cannot be reached is not an error: the Store then answers keys.ErrUnavailable (and
// Ping fails) until Redis is back, and connects by itself. The checks then run at the first
// contact, and until they pass every operation and Ping fails: with an error that wraps
// ErrMisconfigured too when Redis answers but fails them (they are tried again at most once a
// second, so that fixing Redis's configuration needs no restart).
func Open(ctx context.Context, url string, opts Options) (*Store, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = defaultTimeout
	}
	if opts.MinReplicas < 0 {
		return nil, fmt.Errorf("redis: MinReplicas %d is negative", opts.MinReplicas)
	}
	d, err := newRueidisDriver(url, opts.Timeout, opts.TLS, opts.Sentinel)
	if err != nil {
		return nil, fmt.Errorf("redis: %w", err)
	}
	d.minReplicas = opts.MinReplicas
	s, err := newStore(d, opts)
	if err != nil {
		return nil, err
	}
	s.rd = d
	s.hub = newHub(d.subClient)
	if err := s.checkServer(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// checkServer runs the checks (check.go) within the Store's timeout. It returns their error when
// Redis answered and failed them; when Redis cannot be reached it returns nil, and the first
// operation or Ping that reaches Redis runs them.
func (s *Store) checkServer(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	s.checkMu.Lock()
	defer s.checkMu.Unlock()
	err := s.check(ctx)
	switch {
	case err == nil:
		s.checked.Store(true)
		return nil
	case errors.Is(err, ErrMisconfigured), errors.Is(err, errClosed):
		return err
	}
	return nil // unreachable for now: keys.ErrUnavailable until it answers and passes
}

// checkVersion returns an error unless INFO's redis_version is 7.0 or later (the scripts use
// PEXPIRETIME, and EVAL_RO; Valkey reports a compatible redis_version too).
func checkVersion(info string) error {
	v := infoField(info, "redis_version")
	if v == "" {
		return nil // not told: let the scripts speak
	}
	major, _, _ := strings.Cut(v, ".")
	if n, err := strconv.Atoi(major); err != nil || n < 7 {
		return fmt.Errorf("%w: Redis version %s is older than 7.0, which idemsvc needs", ErrMisconfigured, v)
	}
	return nil
}
