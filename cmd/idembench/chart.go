package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
)

// chartMain draws, from a results file, pairs/s and p99 latency of the pair scenario against
// the connection count, one line per label, as a self-contained SVG.
func chartMain(args []string) error {
	fs := flag.NewFlagSet("chart", flag.ContinueOnError)
	in := fs.String("in", "results.jsonl", "results (JSON lines)")
	out := fs.String("out", "docs/bench.svg", "SVG to write")
	scenario := fs.String("scenario", "pair", "scenario to draw")
	labels := fs.String("labels", "baseline,bolt,redis", "labels to draw, in this order")
	title := fs.String("title", "", "subtitle (e.g. the machine)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rs, err := readResults(*in)
	if err != nil {
		return err
	}
	svg, err := chartSVG(summarize(rs), *scenario, strings.Split(*labels, ","), *title)
	if err != nil {
		return err
	}
	return os.WriteFile(*out, svg, 0o644)
}

type series struct {
	label string
	color string
	xs    []int     // connections
	tput  []float64 // pairs/s (requests/s when a scenario has no pairs)
	p99   []float64 // milliseconds
}

var palette = []string{"#555555", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"}

func chartSVG(sum map[groupKey]*summary, scenario string, labels []string, subtitle string) ([]byte, error) {
	var ss []series
	var allX []int
	for i, l := range labels {
		s := series{label: l, color: palette[i%len(palette)]}
		for k, v := range sum {
			if k.label == l && k.scenario == scenario && v.runs > v.failed {
				s.xs = append(s.xs, k.conns)
			}
		}
		slices.Sort(s.xs)
		for _, c := range s.xs {
			v := sum[groupKey{l, scenario, c}]
			t := v.pairs
			if t == 0 {
				t = v.rps
			}
			s.tput = append(s.tput, t)
			s.p99 = append(s.p99, v.p99/1e3)
		}
		if len(s.xs) > 0 {
			ss = append(ss, s)
			allX = append(allX, s.xs...)
		}
	}
	if len(ss) == 0 {
		return nil, errors.New("chart: no results to draw")
	}
	slices.Sort(allX)
	allX = slices.Compact(allX)

	const W, H = 960, 420
	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", W, H, W, H)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", W, H)
	fmt.Fprintf(&b, `<text x="%d" y="22" text-anchor="middle" font-size="15">idemsvc, scenario %s: throughput and p99 latency against connections (medians)</text>`+"\n", W/2, xmlEscape(scenario))
	if subtitle != "" {
		fmt.Fprintf(&b, `<text x="%d" y="40" text-anchor="middle" fill="#555">%s</text>`+"\n", W/2, xmlEscape(subtitle))
	}
	maxT := 0.0
	minP, maxP := math.Inf(1), 0.0
	for _, s := range ss {
		maxT = max(maxT, slices.Max(s.tput))
		for _, p := range s.p99 {
			if p > 0 {
				minP, maxP = min(minP, p), max(maxP, p)
			}
		}
	}
	unit := "pairs/s"
	if scenario != "pair" {
		unit = "per s"
	}
	panel(&b, 70, 72, 380, 280, allX, ss, "throughput ("+unit+")", 0, niceCeil(maxT), false, func(s series) []float64 { return s.tput })
	pLo, pHi := math.Pow(10, math.Floor(math.Log10(minP))), math.Pow(10, math.Ceil(math.Log10(maxP)))
	if pLo == pHi {
		pHi *= 10
	}
	panel(&b, 550, 72, 380, 280, allX, ss, "p99 latency (ms, log scale)", pLo, pHi, true, func(s series) []float64 { return s.p99 })
	// legend
	x := 70
	for _, s := range ss {
		fmt.Fprintf(&b, `<line x1="%d" y1="400" x2="%d" y2="400" stroke="%s" stroke-width="3"/><text x="%d" y="404">%s</text>`+"\n", x, x+24, s.color, x+30, xmlEscape(s.label))
		x += 40 + 8*len(s.label) + 30
	}
	b.WriteString("</svg>\n")
	return b.Bytes(), nil
}

// panel draws one plot: x is the connection count on a log2 axis; y linear or log10.
func panel(b *bytes.Buffer, x0, y0, w, h int, xs []int, ss []series, ylabel string, yLo, yHi float64, logY bool, val func(series) []float64) {
	fx := func(c int) float64 {
		lo, hi := math.Log2(float64(xs[0])), math.Log2(float64(xs[len(xs)-1]))
		if hi == lo {
			return float64(x0) + float64(w)/2
		}
		return float64(x0) + (math.Log2(float64(c))-lo)/(hi-lo)*float64(w)
	}
	fy := func(v float64) float64 {
		var f float64
		if logY {
			f = (math.Log10(max(v, yLo)) - math.Log10(yLo)) / (math.Log10(yHi) - math.Log10(yLo))
		} else {
			f = (v - yLo) / (yHi - yLo)
		}
		return float64(y0+h) - f*float64(h)
	}
	fmt.Fprintf(b, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#999"/>`+"\n", x0, y0, w, h)
	fmt.Fprintf(b, `<text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n", x0+w/2, y0-8, xmlEscape(ylabel))
	fmt.Fprintf(b, `<text x="%d" y="%d" text-anchor="middle">connections</text>`+"\n", x0+w/2, y0+h+34)
	for _, c := range xs {
		x := fx(c)
		fmt.Fprintf(b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#eee"/><text x="%.1f" y="%d" text-anchor="middle">%d</text>`+"\n", x, y0, x, y0+h, x, y0+h+16, c)
	}
	var ticks []float64
	if logY {
		for v := yLo; v <= yHi*1.0001; v *= 10 {
			ticks = append(ticks, v)
		}
	} else {
		for i := 0; i <= 5; i++ {
			ticks = append(ticks, yLo+(yHi-yLo)*float64(i)/5)
		}
	}
	for _, v := range ticks {
		y := fy(v)
		fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#eee"/><text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", x0, y, x0+w, y, x0-6, y+4, tick(v))
	}
	for _, s := range ss {
		vs := val(s)
		var pts []string
		for i, c := range s.xs {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", fx(c), fy(vs[i])))
		}
		fmt.Fprintf(b, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`+"\n", strings.Join(pts, " "), s.color)
		for i, c := range s.xs {
			fmt.Fprintf(b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"><title>%s c=%d: %s</title></circle>`+"\n", fx(c), fy(vs[i]), s.color, xmlEscape(s.label), c, tick(vs[i]))
		}
	}
}

func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func tick(v float64) string {
	switch {
	case v >= 1e3:
		return fmt.Sprintf("%gk", math.Round(v/100)/10)
	case v >= 1:
		return fmt.Sprintf("%g", math.Round(v*10)/10)
	}
	return fmt.Sprintf("%g", v)
}

func xmlEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;").Replace(s)
}
