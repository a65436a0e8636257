package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// boltCollector shows the bbolt store's group commit on /metrics: writes per commit are
// idemsvc_bolt_commit_calls_total over idemsvc_bolt_commits_total, a commit's time is
// idemsvc_bolt_commit_seconds_total over the commits, and the disk's share of it is
// idemsvc_bolt_write_seconds_total (writing pages and fdatasync) with the pages it wrote.
type boltCollector struct{ store *bolt.Store }

var (
	boltCommitsDesc = prometheus.NewDesc("idemsvc_bolt_commits_total",
		"Transactions committed by the bbolt store's group commit.", nil, nil)
	boltCallsDesc = prometheus.NewDesc("idemsvc_bolt_commit_calls_total",
		"Writes (and sweep chunks) carried by those transactions.", nil, nil)
	boltCommitSecondsDesc = prometheus.NewDesc("idemsvc_bolt_commit_seconds_total",
		"Wall time of those transactions, from start to the end of their commit.", nil, nil)
	boltPagesDesc = prometheus.NewDesc("idemsvc_bolt_pages_written_total",
		"Pages bbolt wrote (dirty pages, freelist and meta), in every read-write transaction.", nil, nil)
	boltWriteSecondsDesc = prometheus.NewDesc("idemsvc_bolt_write_seconds_total",
		"Time bbolt spent writing those pages and in fdatasync.", nil, nil)
)

func (boltCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{boltCommitsDesc, boltCallsDesc, boltCommitSecondsDesc, boltPagesDesc, boltWriteSecondsDesc} {
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
		{boltPagesDesc, float64(st.Pages)},
		{boltWriteSecondsDesc, st.WriteTime.Seconds()},
	} {
		ch <- prometheus.MustNewConstMetric(m.d, prometheus.CounterValue, m.v)
	}
}
