#!/usr/bin/env bash
# Rebuild and self-healing at scale (never part of the tests), every number from one run:
#   deploy/rebuild-bench.sh [contacts]     (default 1000000 contacts in one org, ~3 messages each)
# 1. seeds the events and projects them (the live projection);
# 2. with a live projector and the API running and a client asking board (a) in a loop (wrk, one
#    connection), runs `pipeline-board rebuild`: its time and events/s, and the client's
#    latencies over the whole rebuild, switch included;
# 3. FLUSHALL under the running projector and API: the time until the projection is whole again.
# Output printed and written into docs/benchmarks.md (section "Rebuild and heal").
# FLUSHALL empties the whole Redis: run it on a machine where nothing else uses that Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
CONTACTS="${1:-1000000}"
. deploy/bench-run.sh
bench_run rebuild
# A port nothing listens on (an API left by an earlier run must not answer for this one).
PORT=$(free_port)
STATE_KEY=$("$BIN" keys state)
state() { redis-cli hget "$STATE_KEY" status | tr -d '\r'; }
# Board (a): its total and who answered, or the whole reply when it is not a board.
board_a() {
  curl -s -X POST "http://127.0.0.1:$PORT/api/contacts" -H "Authorization: Bearer $TOKEN" -d '{"size":25}' |
    python3 -c 'import json,sys; t=sys.stdin.read(); d=json.loads(t) if t.startswith("{") else {}
print("total %d, answered by %s" % (sum(b["total"] for b in d["data"].values()), d["meta"]["answeredBy"]) if "data" in d else "reply: " + t[:300])'
}
{
# The block runs in the pipe's subshell: its processes are stopped when it ends.
PIDS=()
trap 'kill ${PIDS[@]:-} 2>/dev/null || true' EXIT
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; redis $(redis-server --version | awk '{print $3}'); commit $(git rev-parse --short HEAD)"
echo "== command: deploy/rebuild-bench.sh $CONTACTS"
seed_and_project_one_org
start_projector_and_api
SCRIPT=$(mktemp --suffix .lua)
cat >"$SCRIPT" <<'LUA'
wrk.method = "POST"
wrk.body = '{"size":25}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
done = function(summary, latency, requests)
  io.write(string.format("client during the rebuild: %d boards, %d non-2xx or errors; latency p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms, max %.2f ms\n",
    summary.requests, summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000, latency.max / 1000))
end
LUA
echo "board (a) before: $(board_a)"
echo "== rebuild of every org from the topics' beginning, while the projector runs and a client asks board (a) in a loop"
TOKEN="$TOKEN" wrk -t 1 -c 1 -d 3600s --timeout 10s -s "$SCRIPT" "http://127.0.0.1:$PORT/api/contacts" > "$OUT.wrk" 2>&1 & WRK=$!
PIDS+=($WRK)
/usr/bin/time -f "rebuild process: %U s user + %S s system CPU, %M KiB max RSS, %e s" "$BIN" rebuild --metrics-addr "" 2>&1 | grep -E 'rebuilt|rebuild process'
kill -INT $WRK; wait $WRK 2>/dev/null || true
grep 'client during' "$OUT.wrk"
echo "board (a) after: $(board_a); generation $(redis-cli get "$("$BIN" keys generation "$ORG")" | tr -d '\r')"
echo "== FLUSHALL under the running projector and API"
redis-cli flushall >/dev/null
t0=$(date +%s.%N)
seen=""
while [ "$(state)" != "whole" ]; do
  if [ -z "$seen" ]; then
    # (This org is events only, not in MongoDB: the fallback is seen through readiness.)
    m=$(curl -s "http://127.0.0.1:$PORT/readyz" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["status"], r["projection"])' 2>/dev/null || true)
    case "$m" in projection_not_ready*) seen="readyz $m after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}') s";; esac
  fi
  sleep 0.2
done
echo "from FLUSHALL to a whole projection again: $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s (${seen:-readiness change not observed})"
echo "board (a) when whole: $(board_a)"
rm -f "$SCRIPT"
# The run's keys (a 1M org holds ~1.5 GB): removed, names with spaces included.
redis-cli --scan --pattern "$("$BIN" keys pattern)" | xargs -r -d '\n' -n 1000 redis-cli unlink >/dev/null
} 2>&1 | tee "$OUT"
rm -f "$OUT.wrk"
write_section rebuild-run "Rebuild and heal" deploy/rebuild-bench.sh
