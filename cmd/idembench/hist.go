package main

import (
	"math"
	"math/bits"
	"time"
)

// hist is a log-linear latency histogram in the manner of HdrHistogram: every power of two of
// nanoseconds is split into subBuckets linear buckets, so any recorded value is known to within
// 1/subBuckets (under 0.8%) of itself, at a fixed cost per record (a few shifts and an add) and a
// fixed size. Each worker owns one; they are merged once the run ends, so recording takes no lock.
type hist struct {
	counts [histBuckets]uint64
	n      uint64
	sum    uint64 // nanoseconds
	min    uint64
	max    uint64
}

const (
	subBits     = 7
	subBuckets  = 1 << subBits // linear buckets per power of two
	maxExponent = 36           // values at or above 2^36 ns (about 68 s) land in the last bucket
	histBuckets = (maxExponent - subBits + 1) * subBuckets
)

// bucketOf returns the bucket of v nanoseconds. Values below subBuckets have a bucket each;
// above, the top subBits+1 bits of v pick the bucket.
func bucketOf(v uint64) int {
	if v < subBuckets {
		return int(v)
	}
	e := bits.Len64(v) - subBits - 1 // v>>e is in [subBuckets, 2*subBuckets)
	if e > maxExponent-subBits-1 {
		return histBuckets - 1
	}
	return (e+1)*subBuckets + int(v>>e) - subBuckets
}

// bucketRange returns the smallest and largest value that land in bucket i.
func bucketRange(i int) (lo, hi uint64) {
	if i < subBuckets {
		return uint64(i), uint64(i)
	}
	e := i/subBuckets - 1
	lo = uint64(subBuckets+i%subBuckets) << e
	return lo, lo + (1 << e) - 1
}

func (h *hist) record(d time.Duration) {
	v := uint64(0)
	if d > 0 {
		v = uint64(d)
	}
	h.counts[bucketOf(v)]++
	if h.n == 0 || v < h.min {
		h.min = v
	}
	if v > h.max {
		h.max = v
	}
	h.n++
	h.sum += v
}

func (h *hist) merge(o *hist) {
	if o.n == 0 {
		return
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	if o.max > h.max {
		h.max = o.max
	}
	h.n += o.n
	h.sum += o.sum
}

// quantile returns the smallest recorded value v (to the histogram's precision) such that at
// least a fraction q of the values are at most v; 0 when nothing was recorded. The answer is the
// middle of v's bucket, clamped to the exact minimum and maximum.
func (h *hist) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	if rank < 1 {
		rank = 1
	}
	if rank > h.n {
		rank = h.n
	}
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			lo, hi := bucketRange(i)
			v := lo + (hi-lo)/2
			v = max(v, h.min)
			v = min(v, h.max)
			return time.Duration(v)
		}
	}
	return time.Duration(h.max)
}

func (h *hist) mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(h.sum / h.n)
}
