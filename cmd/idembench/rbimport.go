package main

import (
	"bufio"
	"encoding/csv"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// rbImportMain turns the --csv output of redis-benchmark (one test) into one result line, so
// that Redis's own ceiling sits in the same results file as the loads.
func rbImportMain(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("import-redis-benchmark", flag.ContinueOnError)
	conns := fs.Int("c", 64, "the -c given to redis-benchmark")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rows, err := csv.NewReader(stdin).ReadAll()
	if err != nil {
		return err
	}
	// "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
	var row []string
	for _, r := range rows {
		if len(r) >= 8 && r[0] != "test" {
			row = r
		}
	}
	if row == nil {
		return errors.New("no result row in the redis-benchmark CSV")
	}
	num := func(i int) float64 { v, _ := strconv.ParseFloat(row[i], 64); return v }
	res := result{
		Label: "redis-benchmark", Scenario: "redis-benchmark", Client: "redis-benchmark", Conns: *conns,
		RPS: num(1),
		Latency: latency{
			MeanUS: num(2) * 1e3, P50US: num(4) * 1e3, P99US: num(6) * 1e3, MaxUS: num(7) * 1e3,
		},
		PerOp: map[string]latency{}, Statuses: map[string]uint64{},
	}
	if res.RPS <= 0 {
		return fmt.Errorf("redis-benchmark CSV row %q has no requests/s", row)
	}
	b, _ := json.Marshal(res)
	fmt.Fprintf(stdout, "%s\n", b)
	fmt.Fprintf(stderr, "  redis-benchmark %s c=%d: %.0f req/s, p99 %s ms\n", row[0], *conns, res.RPS, row[6])
	return nil
}

// gobenchImportMain turns the output of the Redis store's Go benchmark
// (BenchmarkBeginComplete, which reports "pairs/s") into one result line: idemsvc's Redis
// writes without HTTP in front, to set beside redis-benchmark's SET NX EX. Each pair is two
// writes (a begin and a complete), so its requests/s are twice its pairs/s.
func gobenchImportMain(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("import-gobench", flag.ContinueOnError)
	conns := fs.Int("c", 64, "the goroutines of the benchmark line to take")
	label := fs.String("label", "redis-store", "the result's label")
	if err := fs.Parse(args); err != nil {
		return err
	}
	want := "goroutines=" + strconv.Itoa(*conns)
	sc := bufio.NewScanner(stdin)
	var pairs float64
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") || !strings.Contains(f[0], want) {
			continue
		}
		for i := 2; i+1 < len(f); i++ {
			if f[i+1] == "pairs/s" {
				pairs, _ = strconv.ParseFloat(f[i], 64)
			}
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	if pairs <= 0 {
		return fmt.Errorf("no benchmark line with %s and a pairs/s figure", want)
	}
	res := result{
		Label: *label, Scenario: "store-pair", Client: "go test -bench", Conns: *conns,
		RPS: 2 * pairs, PairsPerSec: pairs,
		PerOp: map[string]latency{}, Statuses: map[string]uint64{},
	}
	b, _ := json.Marshal(res)
	fmt.Fprintf(stdout, "%s\n", b)
	fmt.Fprintf(stderr, "  %s c=%d: %.0f pairs/s, %.0f writes/s\n", *label, *conns, pairs, 2*pairs)
	return nil
}
