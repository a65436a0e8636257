#!/usr/bin/env bash
# scripts/ab.sh: two idemsvc binaries, run alternately under the same load, to tell a change from
# the machine's drift (a shared VM moves by tens of percent from minute to minute).
#
#   bash scripts/ab.sh OLD_BINARY NEW_BINARY
#
# Environment: AB_BACKEND (bolt, or redis with AB_REDIS_URL, default redis://127.0.0.1:6379/15),
# AB_SCENARIO (pair), AB_ROUNDS (3), AB_DURATION (4s), AB_CONNS (64), AB_PIN (1: server on CPU 0,
# generator on CPU 1, as make bench). Each round runs OLD then NEW; run it again with the two
# swapped to see the order's share. It ends with NEW ÷ OLD round by round, and the median, for
# the rate (pairs/s for pair, else requests/s) and the server's CPU per request: on this VM a
# single round moves by ±20%, so read the median of six or more. Every server is started on
# 127.0.0.1 with a fresh data dir and stopped by its PID; every load is bounded in time.
set -euo pipefail
[[ $# == 2 ]] || { sed -n '2,13p' "$0" >&2; exit 2; }
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/idemsvc-ab.XXXXXX")
trap 'rm -rf "$work"' EXIT
go build -o "$work/idembench" ./cmd/idembench
IB=$work/idembench TOKEN=idembench-token-0123456789
backend=${AB_BACKEND:-bolt}
pin_server=() pin_gen=() rates=() cpus=()
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
		# The round's rate (pairs/s for pair, else requests/s) and the server's CPU per request.
		rate=$(awk -v k="$([[ ${AB_SCENARIO:-pair} == pair ]] && echo pairs || echo requests)" '$1 == k { sub("/s", "", $3); print $3 }' <<<"$out")
		cpu=$(sed -n 's/^cpu.*server \([0-9.]*\)µs\/req.*/\1/p' <<<"$out")
		rates+=("${rate:-0}") cpus+=("${cpu:-0}")
	done
done
# The summary: NEW ÷ OLD round by round (each round ran OLD, then NEW), and the medians.
awk -v rates="${rates[*]}" -v cpus="${cpus[*]}" 'function median(a, n,   i, j, t) {
		for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
		return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
	}
	BEGIN {
		n = split(rates, r, " "); split(cpus, c, " ")
		for (i = 1; i + 1 <= n; i += 2) {
			k++
			tr[k] = r[i] > 0 ? r[i + 1] / r[i] : 0; tc[k] = c[i] > 0 ? c[i + 1] / c[i] : 0
			line = line sprintf(" %.2f", tr[k]); cline = cline sprintf(" %.2f", tc[k])
		}
		if (k == 0) exit
		printf "NEW ÷ OLD, rate, round by round:%s (median %.2f)\n", line, median(tr, k)
		printf "NEW ÷ OLD, server CPU per request:%s (median %.2f)\n", cline, median(tc, k)
	}'

