#!/usr/bin/env bash
# The board page at scale (never part of the tests), one run:
#   deploy/board-bench.sh [contacts]     (default 1000000 contacts in one org, ~3 messages each)
# - the time from the API's answer to the rendered board in headless Chromium (the page's
#   performance marks; 5 loads);
# - what one idle open board costs the server: its requests per minute and the share answered 304;
# - the server's cost of a poll answered 304 against one answered 200 (wrk, 1 and 32 connections,
#   with and without If-None-Match), and the API's and Redis' CPU per poll, to size 1,000 boards.
# Output printed and written into docs/benchmarks.md (section "The board page").
set -euo pipefail
cd "$(dirname "$0")/.."
CONTACTS="${1:-1000000}"
. deploy/bench-run.sh
bench_run board
PORT=$(free_port)
{
PIDS=()
trap 'kill ${PIDS[@]:-} 2>/dev/null || true' EXIT
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; chromium $(chromium --version 2>/dev/null | awk '{print $2}'); commit $(git rev-parse --short HEAD)"
echo "== command: deploy/board-bench.sh $CONTACTS"
seed_and_project_one_org
start_projector_and_api
echo "== the page in headless Chromium: 5 loads of the board, then the board left open and idle for 60 s"
BOARD_URL="http://127.0.0.1:$PORT" TOKEN="$TOKEN" IDLE_SECONDS=60 node tests/browser/measure.mjs | python3 -c '
import json, sys
r = json.load(sys.stdin)
for l in r["loads"]:
    print("load: API answer %.1f ms (fetch), rendering %.1f ms; %d columns, %d cards" % (l["answerMs"], l["renderMs"], l["columns"], l["cards"]))
print("idle open board: %d polls in %d s = %.0f requests/minute; statuses %s; %.1f%% answered 304" % (r["polls"], r["idleSeconds"], r["perMinute"], r["statuses"], 100 * r["share304"]))'
echo "== one column poll: 200 (no If-None-Match) against 304 (the current ETag), wrk 10 s each"
FIRST=$(curl -s -X POST "http://127.0.0.1:$PORT/api/contacts" -H "Authorization: Bearer $TOKEN" -d '{"size":1}' | python3 -c 'import json,sys; print(next(iter(json.load(sys.stdin)["data"])))')
BODY="{\"size\":25,\"stages\":[\"$FIRST\"]}"
ETAG=$(curl -s -D - -o /dev/null -X POST "http://127.0.0.1:$PORT/api/contacts" -H "Authorization: Bearer $TOKEN" -d "$BODY" | awk -F': ' 'tolower($1)=="etag" {print $2}' | tr -d '\r')
SCRIPT=$(wrk_post_script)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
redis_pid=$(pgrep -f 'redis-server 127.0.0.1:6379' | head -1)
tck=$(getconf CLK_TCK)
for conns in 1 32; do
  for etag in "" "$ETAG"; do
    a0=$(cpu "$SERVE_PID"); r0=$(cpu "$redis_pid")
    out=$(BODY="$BODY" TOKEN="$TOKEN" ETAG="$etag" wrk -t $(( conns > 1 ? 2 : 1 )) -c $conns -d 10s --latency -s "$SCRIPT" "http://127.0.0.1:$PORT/api/contacts")
    a1=$(cpu "$SERVE_PID"); r1=$(cpu "$redis_pid")
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    printf '%-4s conns %2d: %s req/s, p50 %s, p99 %s; API %.0f us CPU/poll, Redis %.0f us CPU/poll\n' \
      "$([ -z "$etag" ] && echo 200 || echo 304)" "$conns" "$(echo "$out" | awk '/Requests\/sec/ {print $2}')" \
      "$(echo "$out" | awk '$1=="50%" {print $2}')" "$(echo "$out" | awk '$1=="99%" {print $2}')" \
      "$(awk -v a=$((a1 - a0)) -v n="$n" -v t="$tck" 'BEGIN {print a / t / n * 1e6}')" "$(awk -v a=$((r1 - r0)) -v n="$n" -v t="$tck" 'BEGIN {print a / t / n * 1e6}')"
  done
done
rm -f "$SCRIPT"
} 2>&1 | tee "$OUT"
write_section board-run "The board page" deploy/board-bench.sh
