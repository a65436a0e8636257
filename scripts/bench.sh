#!/usr/bin/env bash
# scripts/bench.sh: measure idemsvc against the HTTP ceiling of this machine, in one run.
#
# Builds idemsvc and idembench, then, REPS times and interleaved so that drift in a shared machine
# hits every server alike:
#   - the no-op baseline (idembench -serve-baseline), idemsvc on bbolt (fresh data dir, fsync on),
#     idemsvc on Redis: pair at 1..128 connections, replay at 64;
#   - redis-benchmark SET NX EX (Redis's own ceiling).
# Once: contend and mixed at 64 connections on each server (statuses, not speed).
# Then writes the medians into docs/BENCHMARKS.md (between its markers) and docs/bench.svg.
#
# Server and generator are pinned to separate CPUs with taskset (server: BENCH_SERVER_CPUS,
# default 0; generator and redis-benchmark: BENCH_GEN_CPUS, default 1). The shared Redis is not
# ours and is not pinned.
#
# Environment:
#   BENCH_QUICK=1        short smoke run (1 repetition, 3 connection counts, 1 s runs)
#   BENCH_REDIS_URL      Redis for the redis backend (default redis://127.0.0.1:6379/15). Nothing is
#                        flushed: every key idembench and redis-benchmark create carries this run's
#                        prefix and a TTL, and the keys with that prefix are deleted at the end.
#   BENCH_OUT            directory for BENCHMARKS.md and bench.svg (default docs)
#   BENCH_PROFILE=1      also take a 10 s CPU profile of idemsvc on each backend under pair load
#                        (built with a pprof listener through go build -overlay; the tree is not
#                        touched), and print `go tool pprof -top` of it
#   BENCH_KEEP=1         keep the work directory (results.jsonl, server logs, profiles)
# Every server is started here on 127.0.0.1 with a free port and stopped by its PID; every load is
# bounded in time. The full run takes about 9 minutes on 2 CPUs (BENCH_PROFILE=1 adds about 40 s).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
	REPS=1 DUR=1s DUR64=1s WARM=300ms SWEEP="1 8 64" RB_N=100000 PRELOAD=1000 OTHER_DUR=1s
else
	REPS=3 DUR=3s DUR64=4s WARM=1s SWEEP="1 2 4 8 16 32 64 128" RB_N=500000 PRELOAD=10000 OTHER_DUR=3s
fi
REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:6379/15}
OUT=${BENCH_OUT:-docs}
SERVER_CPUS=${BENCH_SERVER_CPUS:-0}
GEN_CPUS=${BENCH_GEN_CPUS:-1}
TOKEN=idembench-token-0123456789
RUNID=ibx$(date +%s | tail -c 6)$$
WORK=$(mktemp -d "${TMPDIR:-/tmp}/idembench.XXXXXX")
RESULTS=$WORK/results.jsonl
COMMANDS=$WORK/commands.txt
META=$WORK/meta.txt
: >"$RESULTS" >"$COMMANDS"

PIDS=()
FAILED=0

log() { printf '%s bench: %s\n' "$(date +%T)" "$*" >&2; }

PIN_SERVER=() PIN_GEN=()
if [[ $(nproc) -ge 2 ]] && command -v taskset >/dev/null; then
	PIN_SERVER=(taskset -c "$SERVER_CPUS")
	PIN_GEN=(taskset -c "$GEN_CPUS")
else
	log "fewer than 2 CPUs or no taskset: server and generator are not pinned"
fi

redis_cli() { redis-cli -u "$REDIS_URL" "$@"; }
REDIS_HOSTPORT=$(sed -E 's#^rediss?://([^@/]*@)?([^/]+).*#\2#' <<<"$REDIS_URL")

# cleanup_redis deletes the keys this run created: their names carry $RUNID.
cleanup_redis() {
	command -v redis-cli >/dev/null || return 0
	redis_cli ping >/dev/null 2>&1 || return 0
	redis_cli --scan --pattern "*$RUNID*" 2>/dev/null | xargs -r -n 500 redis-cli -u "$REDIS_URL" unlink >/dev/null || true
}

stop_pid() {
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 200; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local pid
	for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
	cleanup_redis
	if [[ ${BENCH_KEEP:-0} == 1 ]]; then
		log "work directory kept: $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "building into $WORK"
go build -o "$WORK/idemsvc" ./cmd/idemsvc
go build -o "$WORK/idembench" ./cmd/idembench
IB=$WORK/idembench

# start_server NAME: starts baseline, bolt or redis on a free port; sets URL and SERVER_PID.
start_server() {
	local name=$1 port
	port=$("$IB" freeport)
	SERVER_LOG=$WORK/$name.rep$REP.log
	URL=http://127.0.0.1:$port
	case $name in
	baseline)
		"${PIN_SERVER[@]}" "$IB" -serve-baseline "127.0.0.1:$port" -body-bytes 200 >>"$SERVER_LOG" 2>&1 &
		;;
	bolt)
		local dir
		dir=$(mktemp -d "$WORK/bolt-data.XXXXXX")
		env IDEMSVC_ADDR="127.0.0.1:$port" IDEMSVC_BACKEND=bolt IDEMSVC_DATA_DIR="$dir" \
			IDEMSVC_TOKENS="bench:$TOKEN" "${PIN_SERVER[@]}" "${BENCH_IDEMSVC_BIN:-$WORK/idemsvc}" >>"$SERVER_LOG" 2>&1 &
		;;
	redis)
		env IDEMSVC_ADDR="127.0.0.1:$port" IDEMSVC_BACKEND=redis IDEMSVC_REDIS_URL="$REDIS_URL" \
			IDEMSVC_TOKENS="bench:$TOKEN" "${PIN_SERVER[@]}" "${BENCH_IDEMSVC_BIN:-$WORK/idemsvc}" >>"$SERVER_LOG" 2>&1 &
		;;
	esac
	SERVER_PID=$!
	PIDS+=("$SERVER_PID")
	if [[ $REP == 1 ]]; then
		case $name in
		baseline) echo "${PIN_SERVER[*]} idembench -serve-baseline 127.0.0.1:PORT -body-bytes 200 &" >>"$COMMANDS" ;;
		bolt) echo "IDEMSVC_ADDR=127.0.0.1:PORT IDEMSVC_BACKEND=bolt IDEMSVC_DATA_DIR=\$(mktemp -d) IDEMSVC_TOKENS=bench:TOKEN ${PIN_SERVER[*]} idemsvc &" >>"$COMMANDS" ;;
		redis) echo "IDEMSVC_ADDR=127.0.0.1:PORT IDEMSVC_BACKEND=redis IDEMSVC_REDIS_URL=$REDIS_URL IDEMSVC_TOKENS=bench:TOKEN ${PIN_SERVER[*]} idemsvc &" >>"$COMMANDS" ;;
		esac
	fi
	if ! "$IB" wait -url "$URL" -path /readyz -timeout 20s; then
		log "$name did not become ready; its log:"
		tail -n 20 "$SERVER_LOG" >&2
		stop_server
		return 1
	fi
}

stop_server() {
	stop_pid "$SERVER_PID"
	local keep=() pid
	for pid in "${PIDS[@]}"; do [[ $pid == "$SERVER_PID" ]] || keep+=("$pid"); done
	PIDS=("${keep[@]}")
}

# load LABEL SCENARIO CONNS DURATION [more idembench flags]: one measured run, appended to RESULTS.
load() {
	local label=$1 scenario=$2 c=$3 d=$4
	shift 4
	local args=(-url "$URL" -scenario "$scenario" -c "$c" -d "$d" -warmup "$WARM" -preload "$PRELOAD"
		-body-bytes 200 -key-prefix "$RUNID" -json -label "$label" "$@")
	[[ $label == baseline ]] || args+=(-token "$TOKEN")
	args+=(-server-pid "$SERVER_PID")
	[[ $label == redis ]] && args+=(-redis-addr "$REDIS_HOSTPORT")
	# The commands of the first repetition: every one for the first server, then what differs.
	if [[ $REP == 1 && ($label == "${TARGETS[0]}" || ($scenario == pair && $c == 64)) ]]; then
		echo "${PIN_GEN[*]} idembench ${args[*]}" |
			sed "s#$URL#http://127.0.0.1:PORT#; s#$TOKEN#TOKEN#; s#-server-pid [0-9]*#-server-pid PID#" >>"$COMMANDS"
	fi
	local line rc=0
	# The JSON line goes to RESULTS; idembench's one-line summary and any failure go to stderr.
	line=$(timeout 120 "${PIN_GEN[@]}" "$IB" "${args[@]}" 2> >(tee -a "$WORK/idembench.err" >&2)) || rc=$?
	if [[ -n $line ]]; then echo "$line" >>"$RESULTS"; fi
	if [[ $rc != 0 ]]; then
		FAILED=1
		log "FAILED: $label $scenario c=$c (exit $rc)"
	fi
}

# redis_benchmark: Redis's own ceiling for SET NX EX at 64 connections, no pipelining.
redis_benchmark() {
	local host port db
	host=$(sed -E 's#^redis://([^:/]+).*#\1#' <<<"$REDIS_URL")
	port=$(sed -E 's#^redis://[^:/]+:([0-9]+).*#\1#' <<<"$REDIS_URL")
	db=$(sed -E 's#^redis://[^/]+/?([0-9]*).*#\1#' <<<"$REDIS_URL")
	local args=(-h "$host" -p "$port" --dbnum "${db:-0}" -n "$RB_N" -c 64 -P 1 -r 1000000 --csv
		SET "$RUNID:rb:__rand_int__" v NX EX 60)
	if [[ $REP == 1 ]]; then echo "${PIN_GEN[*]} redis-benchmark ${args[*]}" >>"$COMMANDS"; fi
	local csv
	if ! csv=$(timeout 120 "${PIN_GEN[@]}" redis-benchmark "${args[@]}" 2>>"$WORK/redis-benchmark.err"); then
		log "redis-benchmark failed: $(tail -n 1 "$WORK/redis-benchmark.err")"
		return 0
	fi
	"$IB" import-redis-benchmark -c 64 <<<"$csv" >>"$RESULTS" || log "redis-benchmark: unreadable output: $csv"
}

# redis_store_bench: the Redis store's own Go benchmark (begin+complete, 64 goroutines, no HTTP),
# pinned like the generator, so that its writes can be set beside redis-benchmark's.
redis_store_bench() {
	if [[ ! -x $WORK/redis.test ]] && ! go test -c -o "$WORK/redis.test" ./internal/storage/redis/; then
		log "the Redis store benchmark did not build"
		return 0
	fi
	local args=(-test.run '^$' -test.bench 'BeginComplete/goroutines=64$' -test.benchtime 3s)
	if [[ $REP == 1 ]]; then echo "IDEMSVC_TEST_REDIS_URL=$REDIS_URL ${PIN_GEN[*]} go test ./internal/storage/redis/ ${args[*]//-test./-}" >>"$COMMANDS"; fi
	local out
	out=$(IDEMSVC_TEST_REDIS_URL=$REDIS_URL timeout 120 "${PIN_GEN[@]}" "$WORK/redis.test" "${args[@]}" 2>&1) || true
	"$IB" import-gobench -c 64 -label redis-store <<<"$out" >>"$RESULTS" || log "Redis store benchmark: unreadable output: $(tail -n 3 <<<"$out")"
}

# What one fsync costs here: the floor of a bolt commit.
SYNC_US=$(dd if=/dev/zero of="$WORK/sync-probe" bs=4k count=200 oflag=dsync 2>&1 | sed -nE 's/.* copied, ([0-9.]+) s.*/\1/p' | awk '{printf "%.0f", $1 / 200 * 1e6}')
rm -f "$WORK/sync-probe"

TARGETS=(baseline bolt)
REDIS_NOTE="measured"
if ! command -v redis-cli >/dev/null || ! redis_cli ping >/dev/null 2>&1; then
	REDIS_NOTE="not run: no Redis answers at $REDIS_URL"
else
	TARGETS+=(redis)
fi
SKIP=" "

for ((REP = 1; REP <= REPS; REP++)); do
	log "repetition $REP of $REPS"
	for t in "${TARGETS[@]}"; do
		[[ $SKIP == *" $t "* ]] && continue
		if ! start_server "$t"; then
			log "$t: not run (did not start)"
			SKIP+="$t "
			[[ $t == redis ]] && REDIS_NOTE="not run: idemsvc with IDEMSVC_BACKEND=redis did not start"
			continue
		fi
		for c in $SWEEP; do
			d=$DUR
			[[ $c == 64 ]] && d=$DUR64
			load "$t" pair "$c" "$d"
		done
		load "$t" replay 64 "$DUR64"
		if [[ $REP == 1 ]]; then
			load "$t" contend 64 "$OTHER_DUR" -keys 8
			load "$t" mixed 64 "$OTHER_DUR" -keys 8
		fi
		stop_server
	done
	if [[ " ${TARGETS[*]} " == *" redis "* ]] && command -v redis-benchmark >/dev/null; then
		redis_benchmark
		redis_store_bench
	fi
done

if [[ ${BENCH_PROFILE:-0} == 1 ]]; then
	# A second idemsvc binary with a pprof listener, added through an overlay: no file of the tree
	# changes. It listens on BENCH_PPROF_ADDR.
	cat >"$WORK/zz_pprof.go" <<'EOF'
package main

import (
	"net/http"
	_ "net/http/pprof"
	"os"
)

func init() {
	if addr := os.Getenv("BENCH_PPROF_ADDR"); addr != "" {
		go http.ListenAndServe(addr, nil)
	}
}
EOF
	printf '{"Replace": {"%s/cmd/idemsvc/zz_pprof.go": "%s/zz_pprof.go"}}\n' "$ROOT" "$WORK" >"$WORK/overlay.json"
	go build -overlay "$WORK/overlay.json" -o "$WORK/idemsvc-pprof" ./cmd/idemsvc
	REP=0
	for t in "${TARGETS[@]}"; do
		[[ $t == baseline || $SKIP == *" $t "* ]] && continue
		pport=$("$IB" freeport)
		export BENCH_PPROF_ADDR=127.0.0.1:$pport BENCH_IDEMSVC_BIN=$WORK/idemsvc-pprof
		start_server "$t" || continue
		timeout 60 "${PIN_GEN[@]}" "$IB" -url "$URL" -token "$TOKEN" -scenario pair -c 64 -d 12s -warmup 0 \
			-key-prefix "$RUNID" >"$WORK/profile-$t.load.txt" 2>&1 &
		loadpid=$!
		PIDS+=("$loadpid")
		sleep 1
		curl -fsS -o "$WORK/profile-$t.pprof" "http://127.0.0.1:$pport/debug/pprof/profile?seconds=10" || true
		wait "$loadpid" || true
		unset BENCH_PPROF_ADDR BENCH_IDEMSVC_BIN
		stop_server
		if [[ -s $WORK/profile-$t.pprof ]]; then
			go tool pprof -top -nodecount=40 "$WORK/idemsvc-pprof" "$WORK/profile-$t.pprof" >"$WORK/profile-$t.top.txt" 2>/dev/null || true
			log "CPU profile of idemsvc on $t under pair load (c=64): $WORK/profile-$t.pprof"
			head -n 30 "$WORK/profile-$t.top.txt" >&2
		fi
	done
	BENCH_KEEP=1
fi

{
	echo "date: $(date -u +'%Y-%m-%d %H:%M UTC')"
	echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
	echo "CPUs (nproc): $(nproc)"
	echo "CPU model: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
	echo "kernel: $(uname -sr)"
	echo "Go: $(go env GOVERSION)"
	echo "bolt data dir: $(findmnt -n -o FSTYPE,SOURCE -T "$WORK" 2>/dev/null | tr -s ' ' || echo unknown); one synced 4 KiB write (dd oflag=dsync) takes ${SYNC_US} µs"
	echo "Redis: $(redis_cli info server 2>/dev/null | tr -d '\r' | sed -n 's/^redis_version://p' || true) ($REDIS_NOTE)"
	echo "pinning: server on CPU ${SERVER_CPUS} (${PIN_SERVER[*]:-none}), generator and redis-benchmark on CPU ${GEN_CPUS}; the shared Redis is not pinned"
	echo "run: $([[ $QUICK == 1 ]] && echo 'BENCH_QUICK=1 (smoke run, not figures to quote)' || echo 'full') — $REPS repetition(s), ${DUR64} measured at 64 connections, ${DUR} at the others, ${WARM} warmup each"
	echo "idemsvc: IDEMSVC_BACKEND=bolt (fresh data dir per repetition, fsync on, default batching) or redis ($REDIS_URL), IDEMSVC_TOKENS set, every other variable at its default (log level info)"
	echo "load: closed loop, one keep-alive connection per worker, begin body {fingerprint (64 hex), ttl_ms 600000}, stored response 201 with a 200-byte body"
} >"$META"

mkdir -p "$OUT"
"$IB" chart -in "$RESULTS" -out "$OUT/bench.svg" -title "$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(go env GOVERSION), $(date -u +%F)"
"$IB" report -in "$RESULTS" -out "$OUT/BENCHMARKS.md" -meta "$META" -commands "$COMMANDS" -chart bench.svg
log "wrote $OUT/BENCHMARKS.md and $OUT/bench.svg"
if [[ $FAILED == 1 ]]; then
	log "some runs failed (see the Failed runs section of $OUT/BENCHMARKS.md)"
	exit 1
fi
