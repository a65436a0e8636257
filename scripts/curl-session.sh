#!/usr/bin/env bash
# The README's curl session, run verbatim against a running idemsvc, checking every status.
# usage: scripts/curl-session.sh [BASE_URL]   (default http://localhost:8080)
set -euo pipefail
B=${1:-http://localhost:8080}
KEY=order-$RANDOM$RANDOM
fail() { echo "FAIL: $*" >&2; exit 1; }
status() { printf '%s' "$1" | sed -n 's/^HTTP\/[0-9.]* \([0-9]*\).*/\1/p' | head -1; }

# The README's session itself, verbatim but for the address: it must run without an error and
# show the replay marker, the mismatch and no token in the final GET.
readme=$(dirname "$0")/../README.md
block=$(awk '/^# 0\. Start clean/{f=1} f && /^```/{exit} f' "$readme")
[[ -n $block ]] || fail "no curl session found in README.md"
out=$(printf '%s\n' "$block" | sed "s#localhost:8080#${B#http://}#g" | bash -e 2>&1) || fail "README session: $out"
grep -qi '^Idempotent-Replayed: true' <<<"$out" || fail "README session: no replay marker: $out"
grep -q 'urn:idemsvc:problem:fingerprint-mismatch' <<<"$out" || fail "README session: no mismatch: $out"
grep -q '"state":"completed"' <<<"$(tail -1 <<<"$out")" || fail "README session: GET is not completed: $out"
echo "0 README session ran verbatim"

# The same steps on a fresh key, each status checked.
# 1. Begin
out=$(curl -s -X POST "$B/v1/keys/$KEY/begin" \
  -H 'Content-Type: application/json' -d '{"fingerprint":"sha256:abc","lease_ms":30000}')
TOKEN=$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["lease"]["token"])') \
  || fail "begin: $out"
echo "1 begin: acquired, fence $(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["lease"]["fence"])')"

# 2. Begin again: 409 with Retry-After
out=$(curl -si -X POST "$B/v1/keys/$KEY/begin" \
  -H 'Content-Type: application/json' -d '{"fingerprint":"sha256:abc"}')
[[ $(status "$out") == 409 ]] || fail "second begin: $out"
printf '%s' "$out" | grep -qi '^Retry-After: [1-9]' || fail "no Retry-After: $out"
echo "2 begin again: 409 in-progress"

# 3. Complete
out=$(curl -s -w '\n%{http_code}' -X POST "$B/v1/keys/$KEY/complete" -H 'Content-Type: application/json' \
  -d '{"token":"'$TOKEN'","response":{"status":201,"headers":{"Content-Type":["application/json"]},"body":"eyJpZCI6NDJ9"}}')
[[ ${out##*$'\n'} == 200 ]] || fail "complete: $out"
echo "3 complete: 200"

# 4. Replay
out=$(curl -si -X POST "$B/v1/keys/$KEY/begin" \
  -H 'Content-Type: application/json' -d '{"fingerprint":"sha256:abc"}')
[[ $(status "$out") == 200 ]] || fail "replay: $out"
printf '%s' "$out" | grep -qi '^Idempotent-Replayed: true' || fail "replay without the marker: $out"
printf '%s' "$out" | grep -q 'eyJpZCI6NDJ9' || fail "replay without the stored body: $out"
echo "4 replay: 200, Idempotent-Replayed: true"

# 5. Mismatch
out=$(curl -s -w '\n%{http_code}' -X POST "$B/v1/keys/$KEY/begin" \
  -H 'Content-Type: application/json' -d '{"fingerprint":"sha256:other"}')
[[ ${out##*$'\n'} == 422 ]] || fail "mismatch: $out"
printf '%s' "$out" | grep -q 'urn:idemsvc:problem:fingerprint-mismatch' || fail "mismatch type: $out"
echo "5 mismatch: 422 fingerprint-mismatch"

# 6. Get
out=$(curl -s -w '\n%{http_code}' "$B/v1/keys/$KEY")
[[ ${out##*$'\n'} == 200 ]] || fail "get: $out"
printf '%s' "$out" | grep -qF -- "$TOKEN" && fail "get shows the token: $out"
echo "6 get: 200, no token"
echo "PASS: curl session"
