package main

import (
	"bufio"
	"context"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Commit accounting around the measured window, for idemsvc on bbolt: its /metrics has the
// group commit's counters (idemsvc_bolt_*_total), and their differences say how many writes
// shared a commit, how long a commit took, and how much of that was the disk: writing and syncing
// the write-ahead log (idemsvc from the eleventh session on; before, each commit wrote and synced
// bbolt's pages), and the checkpoints that carry the log into the bbolt file.

// commitSnap is one reading of the counters; ok is false when the server has none (the
// baseline, idemsvc on Redis).
type commitSnap struct {
	ok                                         bool
	commits, calls, commitSec, pages, writeSec float64
	// The write-ahead log's counters; walOK is false for an idemsvc without one.
	walOK                      bool
	walSec, checkpoints, ckSec float64
	// The group commit's waits for more writes (gather); gatherOK is false for an idemsvc
	// without them.
	gatherOK  bool
	gatherSec float64
}

// commitUse is what the measured window's commits did.
type commitUse struct {
	Commits         float64 `json:"commits"`
	CallsPerCommit  float64 `json:"calls_per_commit"`
	PagesPerCommit  float64 `json:"pages_per_commit"`
	CommitMS        float64 `json:"commit_ms"`         // wall time of a commit, from its start
	WriteMS         float64 `json:"write_ms"`          // of which writing (the log, or pages) and fdatasync
	CommitsBusyFrac float64 `json:"commits_busy_frac"` // commit time per second: 1 = always committing
	// With a write-ahead log: PagesPerCommit counts the checkpoints' pages (and sweeps'),
	// spread over the commits; checkpoints per second, and the wall time of one.
	WAL               bool    `json:"wal,omitempty"`
	CheckpointsPerSec float64 `json:"checkpoints_per_sec,omitempty"`
	CheckpointMS      float64 `json:"checkpoint_ms,omitempty"`
	// With gathering: the share of the window in which the next group waited for more writes.
	Gather     bool    `json:"gather,omitempty"`
	GatherFrac float64 `json:"gather_frac,omitempty"`
}

var commitMetrics = map[string]func(*commitSnap) *float64{
	"idemsvc_bolt_commits_total":        func(s *commitSnap) *float64 { return &s.commits },
	"idemsvc_bolt_commit_calls_total":   func(s *commitSnap) *float64 { return &s.calls },
	"idemsvc_bolt_commit_seconds_total": func(s *commitSnap) *float64 { return &s.commitSec },
	"idemsvc_bolt_pages_written_total":  func(s *commitSnap) *float64 { return &s.pages },
	"idemsvc_bolt_write_seconds_total":  func(s *commitSnap) *float64 { return &s.writeSec },
}

var walMetrics = map[string]func(*commitSnap) *float64{
	"idemsvc_bolt_wal_seconds_total":        func(s *commitSnap) *float64 { return &s.walSec },
	"idemsvc_bolt_checkpoints_total":        func(s *commitSnap) *float64 { return &s.checkpoints },
	"idemsvc_bolt_checkpoint_seconds_total": func(s *commitSnap) *float64 { return &s.ckSec },
}

var gatherMetrics = map[string]func(*commitSnap) *float64{
	"idemsvc_bolt_commit_gather_seconds_total": func(s *commitSnap) *float64 { return &s.gatherSec },
}

// takeCommits reads base's /metrics; a server without the counters gives a snapshot with ok
// false.
func takeCommits(base *url.URL) commitSnap {
	var s commitSnap
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base.JoinPath("/metrics").String(), nil)
	if err != nil {
		return s
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return s
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s
	}
	found, foundWAL, foundGather := 0, 0, 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		field, counter := commitMetrics[name], &found
		if field == nil {
			field, counter = walMetrics[name], &foundWAL
		}
		if field == nil {
			field, counter = gatherMetrics[name], &foundGather
		}
		if field == nil {
			continue
		}
		if v, err := strconv.ParseFloat(value, 64); err == nil {
			*field(&s) = v
			*counter++
		}
	}
	s.ok = found == len(commitMetrics)
	s.walOK = s.ok && foundWAL == len(walMetrics)
	s.gatherOK = s.walOK && foundGather == len(gatherMetrics)
	return s
}

// commitsBetween returns the window's commits, or nil when either reading lacks them or no
// commit happened.
func commitsBetween(a, b commitSnap, seconds float64) *commitUse {
	n := b.commits - a.commits
	if !a.ok || !b.ok || n <= 0 {
		return nil
	}
	c := &commitUse{
		Commits:         n,
		CallsPerCommit:  (b.calls - a.calls) / n,
		PagesPerCommit:  (b.pages - a.pages) / n,
		CommitMS:        (b.commitSec - a.commitSec) / n * 1e3,
		WriteMS:         (b.writeSec - a.writeSec) / n * 1e3,
		CommitsBusyFrac: (b.commitSec - a.commitSec) / seconds,
	}
	if a.walOK && b.walOK {
		c.WAL = true
		c.WriteMS = (b.walSec - a.walSec) / n * 1e3
		if k := b.checkpoints - a.checkpoints; k > 0 {
			c.CheckpointsPerSec = k / seconds
			c.CheckpointMS = (b.ckSec - a.ckSec) / k * 1e3
		}
	}
	if a.gatherOK && b.gatherOK {
		c.Gather, c.GatherFrac = true, (b.gatherSec-a.gatherSec)/seconds
	}
	return c
}
