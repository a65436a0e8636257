package server

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// TestMetricsMethodLabelBounded: made-up methods, which any client may send, share one series.
func TestMetricsMethodLabelBounded(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	m := newMetrics(reg)
	for i := range 1000 {
		m.observeRequest("M"+strconv.Itoa(i)+strings.Repeat("X", 100), "unmatched", 405, time.Millisecond)
	}
	m.observeRequest("POST", "unmatched", 405, time.Millisecond)
	got := exposition(t, reg)
	if n := strings.Count(got, "idemsvc_http_requests_total{"); n != 2 {
		t.Errorf("%d request series after 1,001 methods, want 2 (other, POST):\n%.2000s", n, got)
	}
	if !strings.Contains(got, `idemsvc_http_requests_total{method="other",route="unmatched",status="405",} 1000`) {
		t.Errorf("made-up methods are not counted as other:\n%.2000s", got)
	}
}

// TestMetricsCachesShowTheSameSeries: what the request and store metrics show through the
// caches of resolved children is what they show with WithLabelValues on every observation:
// the same series, made at the same moment (first use), with the same values.
func TestMetricsCachesShowTheSameSeries(t *testing.T) {
	t.Parallel()
	cached, direct := prometheus.NewRegistry(), prometheus.NewRegistry()
	mc, md := newMetrics(cached), newMetrics(direct)
	store := instrumented{m: mc}
	errs := []error{nil, keys.ErrNotFound, keys.ErrUnavailable, errors.New("boom")}
	step := 0
	observe := func() {
		step++
		d := time.Duration(step%7) * time.Millisecond
		method := []string{"GET", "POST", "DELETE"}[step%3]
		route := []string{"/v1/keys/{key}/begin", "/v1/keys/{key}", "unmatched"}[step%5%3]
		status := []int{200, 201, 404, 409, 503}[step%5]
		mc.observeRequest(method, route, status, d)
		md.requests.WithLabelValues(method, route, strconv.Itoa(status)).Inc()
		md.latency.WithLabelValues(route).Observe(d.Seconds())

		outcome := []string{"acquired", "replayed", "in_progress", "unknown"}[step%4]
		mc.begin(outcome)
		md.begins.WithLabelValues(outcome).Inc()

		op, err := []string{"begin", "complete", "get"}[step%3], errs[step%len(errs)]
		result := map[error]string{nil: "ok", keys.ErrNotFound: "rejected", keys.ErrUnavailable: "unavailable"}[err]
		if result == "" {
			result = "error"
		}
		// instrumented.observe takes the time itself: the two sides share the count only.
		store.observe(context.Background(), op, opWrite, time.Now(), err)
		md.storeOps.WithLabelValues(op, result).Observe(0)
	}
	for range 3 * maxCachedChildren { // past the bound, for the methods below
		observe()
	}
	for i := range 2 * maxCachedChildren { // more methods than the cache keeps
		method := "M" + strconv.Itoa(i%(maxCachedChildren+10))
		mc.observeRequest(method, "unmatched", 405, time.Millisecond)
		md.requests.WithLabelValues(metricMethod(method), "unmatched", "405").Inc()
		md.latency.WithLabelValues("unmatched").Observe(time.Millisecond.Seconds())
	}
	if got, want := exposition(t, cached), exposition(t, direct); got != want {
		t.Errorf("the cached metrics differ:\n got %s\nwant %s", got, want)
	}
}

// exposition returns the server's own metrics (not the Go and process collectors) as text:
// each series with its labels, and its value, or its count and (but for the store latencies,
// which depend on the time taken) its sum and buckets.
func exposition(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, f := range families {
		if !strings.HasPrefix(f.GetName(), "idemsvc_") {
			continue
		}
		timed := f.GetName() == "idemsvc_store_operation_duration_seconds"
		for _, m := range f.Metric {
			fmt.Fprintf(&b, "%s{", f.GetName())
			for _, l := range m.Label {
				fmt.Fprintf(&b, "%s=%q,", l.GetName(), l.GetValue())
			}
			switch h := m.GetHistogram(); {
			case h == nil:
				fmt.Fprintf(&b, "} %v\n", m.GetCounter().GetValue())
			case timed:
				fmt.Fprintf(&b, "} count %d\n", h.GetSampleCount())
			default:
				fmt.Fprintf(&b, "} count %d sum %v", h.GetSampleCount(), h.GetSampleSum())
				for _, bucket := range h.Bucket {
					fmt.Fprintf(&b, " %v:%d", bucket.GetUpperBound(), bucket.GetCumulativeCount())
				}
				b.WriteString("\n")
			}
		}
	}
	return b.String()
}

func BenchmarkObserveRequest(b *testing.B) {
	m := newMetrics(prometheus.NewRegistry())
	b.Run("cached", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			m.observeRequest("POST", "/v1/keys/{key}/begin", 200, time.Millisecond)
		}
	})
	b.Run("WithLabelValues", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			m.requests.WithLabelValues("POST", "/v1/keys/{key}/begin", strconv.Itoa(200)).Inc()
			m.latency.WithLabelValues("/v1/keys/{key}/begin").Observe(time.Millisecond.Seconds())
		}
	})
}
