package server

import (
	"context"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// metrics are the server's Prometheus metrics, on the registry given in Options (never the
// default one).
type metrics struct {
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	begins   *prometheus.CounterVec
	storeOps *prometheus.HistogramVec
	swept    prometheus.Counter
	// waiting is how many begins wait for a holder now; waitsShed counts those that asked to
	// but found no room (Options.MaxWaiters).
	waiting   prometheus.Gauge
	waitsShed prometheus.Counter
	// bodyBytes is the room request bodies hold in the body budget (Options.BodyBuffer).
	bodyBytes prometheus.Gauge
	// answerBytes is the room large answers hold in the answer budget (limits.go).
	answerBytes prometheus.Gauge

	// The children that requests use, resolved once instead of hashing their labels on every
	// request. A child is made on its first use, as WithLabelValues makes it, so /metrics
	// shows exactly the series it showed without the caches.
	requestSeries childCache[requestLabels, requestObservers]
	storeSeries   childCache[storeLabels, prometheus.Observer]
	beginOutcomes map[string]prometheus.Counter // all of them: they are shown at 0 from the start
}

type requestLabels struct {
	method, route string
	status        int
}

type requestObservers struct {
	count   prometheus.Counter
	latency prometheus.Observer
}

type storeLabels struct{ op, result string }

// maxCachedChildren bounds a childCache: the method is the client's to choose, and a cache
// that is copied on every insert must not grow with what clients send.
const maxCachedChildren = 256

// childCache maps label values to the children of a metric vector: lock-free reads of a map
// that is copied on write (the set of labels in use settles quickly).
type childCache[K comparable, V any] struct {
	m  atomic.Pointer[map[K]V]
	mu sync.Mutex
}

// get returns the child for k, resolving it with resolve and keeping it on first use.
func (c *childCache[K, V]) get(k K, resolve func(K) V) V {
	if m := c.m.Load(); m != nil {
		if v, ok := (*m)[k]; ok {
			return v
		}
	}
	v := resolve(k)
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	if old != nil && len(*old) >= maxCachedChildren {
		return v
	}
	m := make(map[K]V, 1+lenOf(old))
	if old != nil {
		for k, v := range *old {
			m[k] = v
		}
	}
	m[k] = v
	c.m.Store(&m)
	return v
}

func lenOf[K comparable, V any](m *map[K]V) int {
	if m == nil {
		return 0
	}
	return len(*m)
}

func newMetrics(reg *prometheus.Registry) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "idemsvc_http_requests_total",
			Help: "HTTP requests by method, route pattern and status.",
		}, []string{"method", "route", "status"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "idemsvc_http_request_duration_seconds",
			Help:    "HTTP request latency by route pattern.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5, 30},
		}, []string{"route"}),
		begins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "idemsvc_begin_outcomes_total",
			Help: "Begin outcomes: acquired, takeover, replayed, in_progress, mismatch.",
		}, []string{"outcome"}),
		storeOps: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "idemsvc_store_operation_duration_seconds",
			Help:    "Store operation latency by operation and result: ok, rejected (the store's answer was no), unavailable, cancelled (the client went away within 0.5 s), error.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}, // a Redis call times out at 2 s
		}, []string{"op", "result"}),
		swept: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "idemsvc_swept_records_total",
			Help: "Expired records removed by the sweeper.",
		}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "idemsvc_begin_waiting",
			Help: "Begins with wait_ms in progress now (IDEMSVC_MAX_WAITERS bounds them).",
		}),
		bodyBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "idemsvc_request_body_bytes_held",
			Help: "Bytes of the request-body budget held by bodies of 4 KiB or more being read now.",
		}),
		answerBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "idemsvc_answer_bytes_held",
			Help: "Bytes of the answer budget held by answers carrying a stored body of 64 KiB or more, being written now.",
		}),
		waitsShed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "idemsvc_begin_waits_shed_total",
			Help: "Begins that asked to wait (wait_ms) while as many were waiting as allowed, in all or for their tenant: they did not wait.",
		}),
	}
	reg.MustRegister(m.requests, m.latency, m.begins, m.storeOps, m.swept, m.waiting, m.waitsShed, m.bodyBytes, m.answerBytes,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.beginOutcomes = map[string]prometheus.Counter{}
	for _, o := range []string{"acquired", "takeover", "replayed", "in_progress", "mismatch"} {
		m.beginOutcomes[o] = m.begins.WithLabelValues(o) // show every outcome from the start, at 0
	}
	return m
}

// metricMethod is the method label: one of the methods HTTP defines, or "other". The method is
// the client's to choose, and every distinct label value is a series kept for the process's
// life: 1,000 made-up methods of 40 KB each cost 86 MB and a 40 MB /metrics.
func metricMethod(method string) string {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodConnect, http.MethodOptions, http.MethodTrace:
		return method
	}
	return "other"
}

func (m *metrics) observeRequest(method, route string, status int, d time.Duration) {
	method = metricMethod(method)
	o := m.requestSeries.get(requestLabels{method, route, status}, func(l requestLabels) requestObservers {
		return requestObservers{
			count:   m.requests.WithLabelValues(l.method, l.route, strconv.Itoa(l.status)),
			latency: m.latency.WithLabelValues(l.route),
		}
	})
	o.count.Inc()
	o.latency.Observe(d.Seconds())
}

// begin counts a begin's outcome.
func (m *metrics) begin(outcome string) {
	if c, ok := m.beginOutcomes[outcome]; ok {
		c.Inc()
		return
	}
	m.begins.WithLabelValues(outcome).Inc()
}

// instrumented is a keys.Store that times every operation of the store it wraps.
type instrumented struct {
	keys.Store
	m *metrics
	h *storeHealth
}

var _ keys.Store = instrumented{}

func instrument(s keys.Store, m *metrics, h *storeHealth) keys.Store {
	return instrumented{Store: s, m: m, h: h}
}

// observe counts and times one operation of kind (opRead or opWrite: whether it would write had it
// succeeded), and tells the store's health how it went (storeHealth.observe).
func (s instrumented) observe(ctx context.Context, op string, kind uint32, start time.Time, err error) {
	result := s.h.observe(ctx, kind, start, err)
	s.m.storeSeries.get(storeLabels{op, result}, func(l storeLabels) prometheus.Observer {
		return s.m.storeOps.WithLabelValues(l.op, l.result)
	}).Observe(time.Since(start).Seconds())
}

func (s instrumented) Begin(ctx context.Context, tenant, key string, req keys.BeginRequest) (keys.BeginResult, error) {
	start := time.Now()
	res, err := s.Store.Begin(ctx, tenant, key, req)
	kind := opWrite // a begin that failed may have had to take the key
	if err == nil && res.Outcome == keys.Replayed {
		kind = opRead
	}
	s.observe(ctx, "begin", kind, start, err)
	return res, err
}

func (s instrumented) Complete(ctx context.Context, tenant, key string, req keys.CompleteRequest) (keys.Record, error) {
	start := time.Now()
	rec, err := s.Store.Complete(ctx, tenant, key, req)
	s.observe(ctx, "complete", opWrite, start, err)
	return rec, err
}

func (s instrumented) Renew(ctx context.Context, tenant, key string, req keys.RenewRequest) (keys.Record, error) {
	start := time.Now()
	rec, err := s.Store.Renew(ctx, tenant, key, req)
	s.observe(ctx, "renew", opWrite, start, err)
	return rec, err
}

func (s instrumented) Release(ctx context.Context, tenant, key, token string) error {
	start := time.Now()
	err := s.Store.Release(ctx, tenant, key, token)
	s.observe(ctx, "release", opWrite, start, err)
	return err
}

func (s instrumented) Get(ctx context.Context, tenant, key string) (keys.Record, error) {
	start := time.Now()
	rec, err := s.Store.Get(ctx, tenant, key)
	s.observe(ctx, "get", opRead, start, err)
	return rec, err
}

func (s instrumented) Delete(ctx context.Context, tenant, key string) error {
	start := time.Now()
	err := s.Store.Delete(ctx, tenant, key)
	s.observe(ctx, "delete", opWrite, start, err)
	return err
}
