package main

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func TestBucketOf(t *testing.T) {
	t.Parallel()
	// Every value lands in a bucket whose range holds it, and buckets are in value order.
	last := -1
	for _, v := range []uint64{0, 1, 127, 128, 129, 255, 256, 257, 1000, 1 << 20, 1<<20 + 1, 123456789, 1<<36 - 1} {
		i := bucketOf(v)
		lo, hi := bucketRange(i)
		if v < lo || v > hi {
			t.Errorf("bucketOf(%d) = %d, range [%d, %d] does not hold it", v, i, lo, hi)
		}
		if i < last {
			t.Errorf("bucketOf(%d) = %d, below the bucket of a smaller value (%d)", v, i, last)
		}
		last = i
		if hi-lo > lo/subBuckets {
			t.Errorf("bucket %d of %d is [%d, %d], wider than 1/%d of its start", i, v, lo, hi, subBuckets)
		}
	}
	if got, want := bucketOf(1<<40), histBuckets-1; got != want {
		t.Errorf("bucketOf(2^40) = %d, want the last bucket %d", got, want)
	}
}

func TestQuantile(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(1, 2))
	tests := []struct {
		name string
		gen  func() time.Duration
	}{
		{"Uniform", func() time.Duration { return time.Duration(rng.IntN(10_000_000)) }},
		{"LogNormal", func() time.Duration { return time.Duration(math.Exp(rng.NormFloat64()*1.5 + 13)) }},
		{"Constant", func() time.Duration { return 1234567 }},
		{"Tiny", func() time.Duration { return time.Duration(rng.IntN(100)) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h hist
			vals := make([]time.Duration, 100_000)
			for i := range vals {
				vals[i] = tt.gen()
				h.record(vals[i])
			}
			slices.Sort(vals)
			for _, q := range []float64{0, 0.5, 0.9, 0.99, 0.999, 1} {
				rank := max(int(math.Ceil(q*float64(len(vals)))), 1)
				want := vals[rank-1]
				got := h.quantile(q)
				if diff := math.Abs(float64(got - want)); diff > float64(want)/subBuckets+1 {
					t.Errorf("quantile(%v) = %v, want %v within 1/%d", q, got, want, subBuckets)
				}
			}
			if got, want := time.Duration(h.max), vals[len(vals)-1]; got != want {
				t.Errorf("max = %v, want %v", got, want)
			}
		})
	}
}

func TestMerge(t *testing.T) {
	t.Parallel()
	var a, b, all hist
	for i := range 1000 {
		d := time.Duration(i) * time.Microsecond
		all.record(d)
		if i%3 == 0 {
			a.record(d)
		} else {
			b.record(d)
		}
	}
	var m hist
	m.merge(&a)
	m.merge(&b)
	if m != all {
		t.Errorf("merge of two halves differs from recording all: n %d/%d, min %d/%d, max %d/%d",
			m.n, all.n, m.min, all.min, m.max, all.max)
	}
	var empty hist
	if got := empty.quantile(0.99); got != 0 {
		t.Errorf("empty quantile = %v, want 0", got)
	}
}

func TestMedian(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   []float64
		want float64
	}{
		{"Empty", nil, 0},
		{"Odd", []float64{3, 1, 2}, 2},
		{"Even", []float64{4, 1, 3, 2}, 2.5},
	}
	for _, tt := range tests {
		if got := median(tt.in); got != tt.want {
			t.Errorf("%s: median(%v) = %v, want %v", tt.name, tt.in, got, tt.want)
		}
	}
}
