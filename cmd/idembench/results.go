package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"slices"
)

// readResults reads a JSON-lines file of results (idembench -json output, and the lines
// scripts/bench.sh writes for redis-benchmark with scenario "redis-benchmark").
func readResults(path string) ([]result, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []result
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for line := 1; sc.Scan(); line++ {
		if len(sc.Bytes()) == 0 {
			continue
		}
		var r result
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		out = append(out, r)
	}
	return out, sc.Err()
}

// summary is the median over the repetitions of one (label, scenario, conns).
type summary struct {
	runs, failed        int
	rps, pairs, replays float64
	p50, p99, p999      float64 // microseconds
	rpsMin, rpsMax      float64
	pairsMin, pairsMax  float64
	serverUS, redisUS   float64           // CPU microseconds per request, of the server and of Redis
	genUS               float64           // and of the generator
	serverShare         float64           // CPU seconds of the server per second: the cores it got
	coreBusy            []float64         // per core, every process
	statuses            map[string]uint64 // summed over the runs
	// idemsvc on bbolt: medians of its group commit's figures (commitRuns > 0)
	commitRuns                      int
	callsPerCommit, pagesPerCommit  float64
	commitMS, writeMS, commitsBusy  float64
	walRuns                         int // of them with a write-ahead log
	checkpointsPerSec, checkpointMS float64
	gatherRuns                      int // of them with gathering
	gatherFrac                      float64
}

type groupKey struct {
	label, scenario string
	conns           int
}

// summarize groups results and takes medians. Failed runs are counted but left out of the
// medians.
func summarize(rs []result) map[groupKey]*summary {
	type acc struct {
		rps, pairs, replays, p50, p99, p999 []float64
		serverUS, redisUS, genUS, share     []float64
		busy                                [][]float64
		calls, pages, commitMS, writeMS     []float64
		commitsBusy, ckPerSec, ckMS         []float64
		gatherFrac                          []float64
		runs, failed                        int
		statuses                            map[string]uint64
	}
	accs := map[groupKey]*acc{}
	for _, r := range rs {
		k := groupKey{r.Label, r.Scenario, r.Conns}
		a := accs[k]
		if a == nil {
			a = &acc{statuses: map[string]uint64{}}
			accs[k] = a
		}
		a.runs++
		for s, c := range r.Statuses {
			a.statuses[s] += c
		}
		if r.Failed {
			a.failed++
			continue
		}
		a.rps = append(a.rps, r.RPS)
		a.pairs = append(a.pairs, r.PairsPerSec)
		a.replays = append(a.replays, float64(r.Replays)/max(r.Seconds, 1e-9))
		a.p50 = append(a.p50, r.Latency.P50US)
		a.p99 = append(a.p99, r.Latency.P99US)
		a.p999 = append(a.p999, r.Latency.P999US)
		if r.CPU.ServerUSPerReq > 0 {
			a.serverUS = append(a.serverUS, r.CPU.ServerUSPerReq)
			a.share = append(a.share, r.CPU.ServerSec/max(r.Seconds, 1e-9))
		}
		if r.CPU.RedisUSPerReq > 0 {
			a.redisUS = append(a.redisUS, r.CPU.RedisUSPerReq)
		}
		if r.CPU.GenUSPerReq > 0 {
			a.genUS = append(a.genUS, r.CPU.GenUSPerReq)
		}
		if c := r.Commits; c != nil {
			a.calls = append(a.calls, c.CallsPerCommit)
			a.pages = append(a.pages, c.PagesPerCommit)
			a.commitMS = append(a.commitMS, c.CommitMS)
			a.writeMS = append(a.writeMS, c.WriteMS)
			a.commitsBusy = append(a.commitsBusy, c.CommitsBusyFrac)
			if c.WAL {
				a.ckPerSec = append(a.ckPerSec, c.CheckpointsPerSec)
				a.ckMS = append(a.ckMS, c.CheckpointMS)
			}
			if c.Gather {
				a.gatherFrac = append(a.gatherFrac, c.GatherFrac)
			}
		}
		for i, b := range r.CPU.CoreBusy {
			if i >= len(a.busy) {
				a.busy = append(a.busy, nil)
			}
			a.busy[i] = append(a.busy[i], b)
		}
	}
	out := map[groupKey]*summary{}
	for k, a := range accs {
		s := &summary{runs: a.runs, failed: a.failed, statuses: a.statuses}
		if len(a.rps) > 0 {
			s.rps, s.pairs, s.replays = median(a.rps), median(a.pairs), median(a.replays)
			s.p50, s.p99, s.p999 = median(a.p50), median(a.p99), median(a.p999)
			s.rpsMin, s.rpsMax = slices.Min(a.rps), slices.Max(a.rps)
			s.pairsMin, s.pairsMax = slices.Min(a.pairs), slices.Max(a.pairs)
			s.serverUS, s.redisUS, s.genUS = median(a.serverUS), median(a.redisUS), median(a.genUS)
			s.serverShare = median(a.share)
			for _, b := range a.busy {
				s.coreBusy = append(s.coreBusy, median(b))
			}
			if s.commitRuns = len(a.calls); s.commitRuns > 0 {
				s.callsPerCommit, s.pagesPerCommit = median(a.calls), median(a.pages)
				s.commitMS, s.writeMS, s.commitsBusy = median(a.commitMS), median(a.writeMS), median(a.commitsBusy)
				if s.walRuns = len(a.ckPerSec); s.walRuns > 0 {
					s.checkpointsPerSec, s.checkpointMS = median(a.ckPerSec), median(a.ckMS)
				}
				if s.gatherRuns = len(a.gatherFrac); s.gatherRuns > 0 {
					s.gatherFrac = median(a.gatherFrac)
				}
			}
		}
		out[k] = s
	}
	return out
}

// median returns the middle value (the mean of the two middle values for an even count).
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
