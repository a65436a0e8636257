package main

import "testing"

// TestRepRatios: each server's run is set against the baseline's run of the same repetition,
// in file order, and failed runs and other scenarios or connection counts are left out.
func TestRepRatios(t *testing.T) {
	rs := []result{
		{Label: "baseline", Scenario: "pair", Conns: 64, PairsPerSec: 100},
		{Label: "bolt", Scenario: "pair", Conns: 64, PairsPerSec: 20},
		{Label: "bolt", Scenario: "pair", Conns: 8, PairsPerSec: 99},
		{Label: "bolt", Scenario: "replay", Conns: 64, PairsPerSec: 99},
		{Label: "baseline", Scenario: "pair", Conns: 64, PairsPerSec: 200},
		{Label: "bolt", Scenario: "pair", Conns: 64, PairsPerSec: 30},
		{Label: "baseline", Scenario: "pair", Conns: 64, PairsPerSec: 50, Failed: true},
		{Label: "bolt", Scenario: "pair", Conns: 64, PairsPerSec: 45, Failed: true},
	}
	lo, hi, n := repRatios(rs, "bolt", "pair", 64, true, "baseline")
	if n != 2 || lo != 0.15 || hi != 0.2 {
		t.Errorf("repRatios = %v, %v, %d; want 0.15, 0.2, 2", lo, hi, n)
	}
	if _, _, n := repRatios(rs, "redis", "pair", 64, true, "baseline"); n != 0 {
		t.Errorf("repRatios of a server not run: n = %d, want 0", n)
	}
}
