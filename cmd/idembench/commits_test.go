package main

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

// TestCommitsBetween: the window's commits come from the difference of two /metrics readings;
// a server without idemsvc's bbolt counters (the baseline, Redis) gives none.
func TestCommitsBetween(t *testing.T) {
	t.Parallel()
	readings := []string{
		"idemsvc_bolt_commits_total 100\nidemsvc_bolt_commit_calls_total 3000\nidemsvc_bolt_commit_seconds_total 0.2\n" +
			"idemsvc_bolt_pages_written_total 8000\nidemsvc_bolt_write_seconds_total 0.15\nidemsvc_http_requests_total{x=\"y\"} 5\n",
		"# HELP idemsvc_bolt_commits_total x\nidemsvc_bolt_commits_total 300\nidemsvc_bolt_commit_calls_total 9400\nidemsvc_bolt_commit_seconds_total 0.7\n" +
			"idemsvc_bolt_pages_written_total 24000\nidemsvc_bolt_write_seconds_total 0.55\n",
	}
	walReadings := []string{
		readings[0] + "idemsvc_bolt_wal_seconds_total 0.1\nidemsvc_bolt_checkpoints_total 7\nidemsvc_bolt_checkpoint_seconds_total 0.07\n",
		readings[1] + "idemsvc_bolt_wal_seconds_total 0.3\nidemsvc_bolt_checkpoints_total 9\nidemsvc_bolt_checkpoint_seconds_total 0.13\n",
	}
	n := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(readings[n]))
		n++
	}))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	a, b := takeCommits(u), takeCommits(u)
	c := commitsBetween(a, b, 2)
	if c == nil {
		t.Fatal("no commits between the readings")
	}
	if c.Commits != 200 || c.CallsPerCommit != 32 || c.PagesPerCommit != 80 || c.CommitsBusyFrac < 0.2499 || c.CommitsBusyFrac > 0.2501 {
		t.Errorf("commits = %+v", *c)
	}
	if d := c.CommitMS - 2.5; d < -1e-9 || d > 1e-9 {
		t.Errorf("commit = %v ms, want 2.5", c.CommitMS)
	}
	if d := c.WriteMS - 2; d < -1e-9 || d > 1e-9 {
		t.Errorf("write = %v ms, want 2", c.WriteMS)
	}

	if c.WAL {
		t.Errorf("commits of a server without a write-ahead log say it has one: %+v", *c)
	}
	readings, n = walReadings, 0
	a, b = takeCommits(u), takeCommits(u)
	c = commitsBetween(a, b, 2)
	if c == nil || !c.WAL || c.Commits != 200 || c.CheckpointsPerSec != 1 {
		t.Fatalf("commits with a log = %+v", c)
	}
	if d := c.WriteMS - 1; d < -1e-9 || d > 1e-9 { // the log's time per commit
		t.Errorf("writing the log = %v ms, want 1", c.WriteMS)
	}
	if d := c.CheckpointMS - 30; d < -1e-9 || d > 1e-9 {
		t.Errorf("checkpoint = %v ms, want 30", c.CheckpointMS)
	}
	if c.Gather {
		t.Errorf("commits of a server without gathering say it gathers: %+v", *c)
	}
	readings, n = []string{
		walReadings[0] + "idemsvc_bolt_commit_gathers_total 50\nidemsvc_bolt_commit_gather_seconds_total 0.4\n",
		walReadings[1] + "idemsvc_bolt_commit_gathers_total 150\nidemsvc_bolt_commit_gather_seconds_total 1.4\n",
	}, 0
	c = commitsBetween(takeCommits(u), takeCommits(u), 2)
	if c == nil || !c.Gather || c.GatherFrac < 0.4999 || c.GatherFrac > 0.5001 {
		t.Errorf("commits with gathering = %+v, want waiting half the window", c)
	}

	none := httptest.NewServer(http.NotFoundHandler())
	defer none.Close()
	u, _ = url.Parse(none.URL)
	if c := commitsBetween(takeCommits(u), takeCommits(u), 2); c != nil {
		t.Errorf("a server without /metrics gave commits %+v", *c)
	}
}

// TestReportShowsCommits: the report has the group-commit table when results carry commits.
func TestReportShowsCommits(t *testing.T) {
	t.Parallel()
	rs := []result{
		{Label: "baseline", Scenario: "pair", Conns: 64, Seconds: 4, Requests: 1000, Pairs: 500, RPS: 250, PairsPerSec: 125},
		{Label: "bolt", Scenario: "pair", Conns: 64, Seconds: 4, Requests: 500, Pairs: 250, RPS: 125, PairsPerSec: 62.5,
			Commits: &commitUse{Commits: 10, CallsPerCommit: 31.6, PagesPerCommit: 3.16, CommitMS: 2.78, WriteMS: 1.94, CommitsBusyFrac: 0.99,
				WAL: true, CheckpointsPerSec: 1, CheckpointMS: 40, Gather: true, GatherFrac: 0.25}},
	}
	out := string(renderReport(rs, "", "", "", []string{"baseline", "bolt"}, 64))
	for _, want := range []string{"### bbolt's group commit, 64 connections", "| pair | bolt | 31.6 | 2.78 ms | 1.94 ms (70%) | 99% | 25% | 1.0/s, 40.0 ms each | 0.10 |"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q", want)
		}
	}
}
