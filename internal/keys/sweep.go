package keys

import (
	"context"
	"time"
)

// SweepBatch is how many expired records one sweep transaction removes at most, so that writers
// are never blocked long.
const SweepBatch = 1000

// SweepAll removes every record that has expired, SweepBatch at a time, and returns how many it
// removed. It stops early, with ctx's error, when ctx ends.
func SweepAll(ctx context.Context, s Store) (int, error) {
	total := 0
	for {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		n, err := s.Sweep(ctx, SweepBatch)
		total += n
		if err != nil || n < SweepBatch {
			return total, err
		}
	}
}

// RunSweeper calls SweepAll every interval until ctx ends, and reports each pass to report
// (which may be nil). It returns nil when ctx ends: stopping is not an error.
func RunSweeper(ctx context.Context, s Store, interval time.Duration, report func(removed int, err error)) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			n, err := SweepAll(ctx, s)
			if ctx.Err() != nil {
				return nil
			}
			if report != nil {
				report(n, err)
			}
		}
	}
}
