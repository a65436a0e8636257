package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// boltCollector shows the bbolt store's group commit on /metrics: writes per commit are
// idemsvc_bolt_commit_calls_total over idemsvc_bolt_commits_total, a commit's time is
// idemsvc_bolt_commit_seconds_total over the commits, and the disk's share of it is
// idemsvc_bolt_wal_seconds_total (writing the log and fdatasync) with the bytes it wrote. The
// checkpoints that carry the log into the bbolt file, and the sweeps, write pages:
// idemsvc_bolt_pages_written_total, in idemsvc_bolt_write_seconds_total.
type boltCollector struct{ store *bolt.Store }

var (
	boltCommitsDesc = prometheus.NewDesc("idemsvc_bolt_commits_total",
		"Groups of writes the bbolt store's group commit appended to its write-ahead log, each synced once.", nil, nil)
	boltCallsDesc = prometheus.NewDesc("idemsvc_bolt_commit_calls_total",
		"Writes carried by those groups.", nil, nil)
	boltCommitSecondsDesc = prometheus.NewDesc("idemsvc_bolt_commit_seconds_total",
		"Wall time of those groups, from start to the end of their sync.", nil, nil)
	boltWALBytesDesc = prometheus.NewDesc("idemsvc_bolt_wal_bytes_total",
		"Bytes those groups appended to the write-ahead log.", nil, nil)
	boltWALSecondsDesc = prometheus.NewDesc("idemsvc_bolt_wal_seconds_total",
		"Time spent writing those bytes and in fdatasync.", nil, nil)
	boltCheckpointsDesc = prometheus.NewDesc("idemsvc_bolt_checkpoints_total",
		"Checkpoints that carried the write-ahead log into the bbolt file.", nil, nil)
	boltCheckpointSecondsDesc = prometheus.NewDesc("idemsvc_bolt_checkpoint_seconds_total",
		"Wall time of those checkpoints.", nil, nil)
	boltCheckpointFailuresDesc = prometheus.NewDesc("idemsvc_bolt_checkpoint_failures_total",
		"Checkpoints that failed (a full disk, say): the writes stay in the log and in memory until one succeeds.", nil, nil)
	boltPagesDesc = prometheus.NewDesc("idemsvc_bolt_pages_written_total",
		"Pages bbolt wrote (dirty pages, freelist and meta), in every read-write transaction: checkpoints and sweeps.", nil, nil)
	boltWriteSecondsDesc = prometheus.NewDesc("idemsvc_bolt_write_seconds_total",
		"Time bbolt spent writing those pages and in fdatasync.", nil, nil)
	boltGathersDesc = prometheus.NewDesc("idemsvc_bolt_commit_gathers_total",
		"Times a group of writes waited for more before it ran, under load, so that more writes share a sync.", nil, nil)
	boltGatherSecondsDesc = prometheus.NewDesc("idemsvc_bolt_commit_gather_seconds_total",
		"Time those waits took in all.", nil, nil)
)

func (boltCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{boltCommitsDesc, boltCallsDesc, boltCommitSecondsDesc, boltWALBytesDesc,
		boltWALSecondsDesc, boltCheckpointsDesc, boltCheckpointSecondsDesc, boltCheckpointFailuresDesc, boltPagesDesc, boltWriteSecondsDesc,
		boltGathersDesc, boltGatherSecondsDesc} {
		ch <- d
	}
}

func (c boltCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.store.CommitStats()
	for _, m := range []struct {
		d *prometheus.Desc
		v float64
	}{
		{boltCommitsDesc, float64(st.Commits)},
		{boltCallsDesc, float64(st.Calls)},
		{boltCommitSecondsDesc, st.CommitTime.Seconds()},
		{boltWALBytesDesc, float64(st.WALBytes)},
		{boltWALSecondsDesc, st.WALTime.Seconds()},
		{boltCheckpointsDesc, float64(st.Checkpoints)},
		{boltCheckpointSecondsDesc, st.CheckpointTime.Seconds()},
		{boltCheckpointFailuresDesc, float64(st.CheckpointFailures)},
		{boltPagesDesc, float64(st.Pages)},
		{boltWriteSecondsDesc, st.WriteTime.Seconds()},
		{boltGathersDesc, float64(st.Gathers)},
		{boltGatherSecondsDesc, st.GatherTime.Seconds()},
	} {
		ch <- prometheus.MustNewConstMetric(m.d, prometheus.CounterValue, m.v)
	}
}
