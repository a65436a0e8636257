package redis

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// Open returns a Store on the Redis at url: redis://[user:password@]host:port[/db] or
// rediss:// for TLS (the db may also be given as ?db=N).
//
// Open connects at once, so that a misconfiguration stops the start: it returns an error when
// the URL or options are invalid, when Redis refuses the credentials or the database, or when
// Redis is older than 7.0. A Redis that cannot be reached is not an error: the Store then
// answers keys.ErrUnavailable (and Ping fails) until Redis is back, and connects by itself.
func Open(ctx context.Context, url string, opts Options) (*Store, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = defaultTimeout
	}
	d, err := newRueidisDriver(url, opts.Timeout)
	if err != nil {
		return nil, fmt.Errorf("redis: %w", err)
	}
	s, err := newStore(d, opts)
	if err != nil {
		return nil, err
	}
	s.hub = newHub(d.client)
	if err := s.checkServer(ctx, d); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// checkServer connects and checks the server's version, then reads its clock once, so that the
// first begin can already decide ahead (see clock.go). An unreachable server passes.
func (s *Store) checkServer(ctx context.Context, d *rueidisDriver) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	c, err := d.client(ctx)
	if err == nil {
		var info string
		info, err = c.Do(ctx, c.B().Info().Section("server").Build()).ToString()
		if err == nil {
			if err := checkVersion(info); err != nil {
				return err
			}
			sent := time.Now()
			if sec, usec, err := d.time(ctx); err == nil { // else the first reply teaches it
				s.clock.observe(sent, time.Now(), time.Unix(sec, usec*1000))
			}
			return nil
		}
	}
	if _, isReply := rueidis.IsRedisErr(err); isReply {
		return fmt.Errorf("redis: %w", err) // credentials, database, ACL: configuration
	}
	if errors.Is(err, errClosed) {
		return err
	}
	return nil // unreachable for now: keys.ErrUnavailable until it answers
}

// checkVersion returns an error unless INFO's redis_version is 7.0 or later (the scripts use
// PEXPIRETIME; Valkey reports a compatible redis_version too).
func checkVersion(info string) error {
	for line := range strings.Lines(info) {
		v, ok := strings.CutPrefix(strings.TrimSpace(line), "redis_version:")
		if !ok {
			continue
		}
		major, _, _ := strings.Cut(v, ".")
		if n, err := strconv.Atoi(major); err != nil || n < 7 {
			return fmt.Errorf("redis: version %s is older than 7.0, which idemsvc needs", v)
		}
		return nil
	}
	return nil // not told: let the scripts speak
}
