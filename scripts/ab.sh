#!/usr/bin/env bash
# scripts/ab.sh: two idemsvc binaries, run alternately under the same load, to tell a change from
# the machine's drift (a shared VM moves by tens of percent from minute to minute).
#
#   bash scripts/ab.sh OLD_BINARY NEW_BINARY
#
# Environment: AB_BACKEND (bolt, or redis with AB_REDIS_URL, default redis://127.0.0.1:6379/15),
# AB_SCENARIO (pair), AB_ROUNDS (3), AB_DURATION (4s), AB_CONNS (64), AB_PIN (1: server on CPU 0,
# generator on CPU 1, as make bench). Each round runs OLD then NEW; run it again with the two
# swapped to see the order's share. Every server is started on 127.0.0.1 with a fresh data dir
# and stopped by its PID; every load is bounded in time.
set -euo pipefail
[[ $# == 2 ]] || { sed -n '2,11p' "$0" >&2; exit 2; }
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/idemsvc-ab.XXXXXX")
trap 'rm -rf "$work"' EXIT
go build -o "$work/idembench" ./cmd/idembench
IB=$work/idembench TOKEN=idembench-token-0123456789
backend=${AB_BACKEND:-bolt}
pin_server=() pin_gen=()
if [[ ${AB_PIN:-1} == 1 ]] && [[ $(nproc) -ge 2 ]] && command -v taskset >/dev/null; then
	pin_server=(taskset -c 0) pin_gen=(taskset -c 1)
fi
for ((r = 1; r <= ${AB_ROUNDS:-3}; r++)); do
	for bin in "$1" "$2"; do
		port=$("$IB" freeport)
		data=$(mktemp -d "$work/data.XXXXXX")
		env IDEMSVC_ADDR="127.0.0.1:$port" IDEMSVC_BACKEND="$backend" IDEMSVC_DATA_DIR="$data" \
			IDEMSVC_REDIS_URL="${AB_REDIS_URL:-redis://127.0.0.1:6379/15}" \
			IDEMSVC_TOKENS="bench:$TOKEN" "${pin_server[@]}" "$bin" >"$work/server.log" 2>&1 &
		pid=$!
		if ! "$IB" wait -url "http://127.0.0.1:$port" -path /readyz -timeout 20s; then
			tail -n 5 "$work/server.log" >&2
			kill "$pid" 2>/dev/null || true
			exit 1
		fi
		out=$("${pin_gen[@]}" "$IB" -url "http://127.0.0.1:$port" -token "$TOKEN" -scenario "${AB_SCENARIO:-pair}" \
			-c "${AB_CONNS:-64}" -d "${AB_DURATION:-4s}" -warmup 1s -key-prefix "ab$$r" -server-pid "$pid" 2>&1) || true
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		printf 'round %d %s: %s\n' "$r" "$bin" "$(grep -E '^(requests|pairs|cpu|commits|latency)' <<<"$out" | tr -s ' ' | tr '\n' '|')"
	done
done
