#!/usr/bin/env bash
# One Redis against the stack's Redis Cluster (3 primaries + 3 replicas on 7000-7005), every
# number from one run on one machine (never part of the tests):
#   deploy/cluster-bench.sh [contacts per org]   (default 50000; 6 orgs, spread over the shards)
# Ingest of the same events into the single Redis with 1 projector, into the cluster with 1 and
# with 2 projectors (one consumer group, 4 partitions); then the same boards with wrk (32
# connections, requests spread over the 6 orgs) from an API on the single Redis, on the cluster's
# primaries and on its replicas (REDIS_READ_FROM=replica), with the Redis and API CPU per board.
# On 2 cores every Redis process, the API and wrk share the machine: read the ratios. The output
# is printed and written into docs/benchmarks.md (section "Redis Cluster").
set -euo pipefail
cd "$(dirname "$0")/.."
CONTACTS="${1:-50000}"
ORGS=6
DURATION="${BENCH_SECONDS:-10}"
. deploy/bench-run.sh
bench_run cluster
SINGLE_URL="redis://127.0.0.1:6379"
CLUSTER_URL="redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
CLUSTER_PORTS="7000 7001 7002 7003 7004 7005"
proc_cpu() { # pid -> CPU seconds (user + system) so far
  awk '{printf "%.3f", ($14 + $15) / 100}' "/proc/$1/stat"
}
ingest() { # label url prefix projectors
  local label="$1" url="$2" prefix="$3" n="$4" ports started cpu0 i pids=()
  if [ "$url" = "$SINGLE_URL" ]; then ports=6379; else ports=$CLUSTER_PORTS; fi
  cpu0=$(redis_cpu $ports)
  started=$(date +%s.%N)
  for ((i = 0; i < n; i++)); do
    REDIS_URL="$url" REDIS_PREFIX="$prefix" KAFKA_GROUP_ID="$prefix" "$BIN" project --exit-when-caught-up --metrics-addr "" >"$OUT.p$i" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  local secs redis_s
  secs=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {printf "%.2f", e - s}')
  redis_s=$(awk -v a="$cpu0" -v b="$(redis_cpu $ports)" 'BEGIN {printf "%.1f", b - a}')
  printf '%-34s %8.2f s  %9.0f events/s  redis CPU %6.1f s (%4.1f us/event)\n' "$label" "$secs" \
    "$(awk -v e="$EVENTS" -v s="$secs" 'BEGIN {print e / s}')" "$redis_s" "$(awk -v r="$redis_s" -v e="$EVENTS" 'BEGIN {print r * 1e6 / e}')"
  rm -f "$OUT".p*
}
{
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; redis $(redis-server --version | awk '{print $3}'); commit $(git rev-parse --short HEAD)"
echo "== command: deploy/cluster-bench.sh $CONTACTS (BENCH_SECONDS=$DURATION)"
"$BIN" seed --orgs "$ORGS" --contacts "$CONTACTS" --messages 3 --no-mongo --quiet > "$OUT.seed"
grep -E '^seeded' "$OUT.seed"
ORG_IDS=$(awk '/^org/ {print $2}' "$OUT.seed")
EVENTS=$(awk '/^seeded/ {for (i = 1; i <= NF; i++) if ($(i+1) == "events") print $i}' "$OUT.seed" | head -1)
shard_of() { # org -> port of the primary serving its slot
  local slot
  slot=$(redis-cli -p 7000 cluster keyslot "{$1}")
  redis-cli -p 7000 cluster nodes | awk -v s="$slot" '$3 ~ /master/ {for (i = 9; i <= NF; i++) {split($i, r, "-"); if (r[2] == "") r[2] = r[1]; if (s >= r[1] && s <= r[2]) {split($2, a, "[:@]"); print a[2]}}}'
}
echo "orgs per shard (primary port: orgs): $(for o in $ORG_IDS; do shard_of "$o"; done | sort | uniq -c | awk '{printf "%s: %s  ", $2, $1}')"
echo "== ingest of $EVENTS events (pipeline-board project --exit-when-caught-up, 4 partitions per topic)"
ingest "single redis, 1 projector" "$SINGLE_URL" "$RUN-s" 1
ingest "cluster 3+3, 1 projector" "$CLUSTER_URL" "$RUN-c" 1
ingest "cluster 3+3, 2 projectors" "$CLUSTER_URL" "$RUN-c2" 2

# Boards: every request goes to the next of the 6 orgs (each with a token of one of its users).
TOKENS=""
for o in $ORG_IDS; do
  u=$(redis-cli -p 6379 hkeys "$("$BIN" keys --redis-prefix "$RUN-s" users "$o")" | head -1)
  TOKENS="$TOKENS $("$BIN" token --org "$o" --user "$u")"
done
SCRIPT=$(mktemp --suffix .lua)
cat >"$SCRIPT" <<'LUA'
local tokens, i = {}, 0
for t in string.gmatch(os.getenv("TOKENS"), "%S+") do tokens[#tokens + 1] = t end
request = function()
  i = i % #tokens + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. tokens[i]}, os.getenv("BODY"))
end
LUA
declare -A BODIES=([a-none]='{"size":25}' [b-my]='{"size":25,"ownerFilter":"my"}' [f-search]='{"size":25,"search":"jane"}')
PORT=18191
echo "== boards, wrk -c 32 for ${DURATION} s each, requests spread over the $ORGS orgs"
printf '%-28s %-9s | %9s %9s %9s | %12s %12s\n' deployment board "rps" "p50" "p99" "redis us/brd" "api us/brd"
for mode in single cluster-primary cluster-replica; do
  case $mode in
    single) url=$SINGLE_URL; prefix="$RUN-s"; read_from=primary; ports=6379 ;;
    cluster-primary) url=$CLUSTER_URL; prefix="$RUN-c"; read_from=primary; ports=$CLUSTER_PORTS ;;
    cluster-replica) url=$CLUSTER_URL; prefix="$RUN-c"; read_from=replica; ports=$CLUSTER_PORTS ;;
  esac
  REDIS_URL="$url" REDIS_PREFIX="$prefix" KAFKA_GROUP_ID="$prefix" REDIS_READ_FROM="$read_from" "$BIN" serve --listen-addr "127.0.0.1:$PORT" >/dev/null 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
  for name in $(echo "${!BODIES[@]}" | tr ' ' '\n' | sort); do
    body="${BODIES[$name]}"
    # Warm up (the in-memory indexes of the orgs load on their first index board).
    BODY="$body" TOKENS="$TOKENS" wrk -t 2 -c 8 -d 3s -s "$SCRIPT" "http://127.0.0.1:$PORT/api/contacts" >/dev/null
    r0=$(redis_cpu $ports); a0=$(proc_cpu $SERVE_PID)
    out=$(BODY="$body" TOKENS="$TOKENS" wrk -t 2 -c 32 -d "${DURATION}s" --latency -s "$SCRIPT" "http://127.0.0.1:$PORT/api/contacts")
    r1=$(redis_cpu $ports); a1=$(proc_cpu $SERVE_PID)
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    errs=$(echo "$out" | awk '/Non-2xx/ {print "non-2xx " $NF}')
    printf '%-28s %-9s | %9s %9s %9s | %12.0f %12.0f %s\n' "$mode" "$name" "$(echo "$out" | awk '/Requests\/sec/ {print $2}')" \
      "$(echo "$out" | awk '$1=="50%" {print $2}')" "$(echo "$out" | awk '$1=="99%" {print $2}')" \
      "$(awk -v a="$r0" -v b="$r1" -v n="$n" 'BEGIN {print (b - a) * 1e6 / n}')" "$(awk -v a="$a0" -v b="$a1" -v n="$n" 'BEGIN {print (b - a) * 1e6 / n}')" "$errs"
  done
  if [ "$mode" = cluster-replica ]; then
    echo "   (replica staleness in meta: $(curl -s -X POST "http://127.0.0.1:$PORT/api/contacts" -H "Authorization: Bearer $(echo $TOKENS | awk '{print $1}')" -d '{"size":1}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["meta"].get("replicaStalenessMs"), "ms")'))"
  fi
  kill $SERVE_PID; wait $SERVE_PID 2>/dev/null || true
done
rm -f "$SCRIPT" "$OUT.seed"
# Remove the run's keys: per org on its primary (one slot: a multi-key UNLINK is allowed), then
# the few others one by one.
redis-cli -p 6379 --scan --pattern "$RUN-*" | xargs -r -d '\n' -n 1000 redis-cli -p 6379 unlink >/dev/null
for p in "$RUN-c" "$RUN-c2"; do
  for o in $ORG_IDS; do
    port=$(shard_of "$o")
    redis-cli -p "$port" --scan --pattern "$("$BIN" keys --redis-prefix "$p" org-pattern "$o")" | xargs -r -d '\n' -n 1000 redis-cli -p "$port" unlink >/dev/null
  done
  for port in 7000 7001 7002 7003 7004 7005; do
    redis-cli -p "$port" role | head -1 | grep -q master || continue
    redis-cli -p "$port" --scan --pattern "$("$BIN" keys --redis-prefix "$p" pattern)" | xargs -r -d '\n' -n 1 redis-cli -p "$port" unlink >/dev/null
  done
done
} 2>&1 | tee "$OUT"
write_section cluster-run "Redis Cluster" deploy/cluster-bench.sh
