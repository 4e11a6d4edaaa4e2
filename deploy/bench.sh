#!/usr/bin/env bash
# Benchmarks (never part of the tests): ingest throughput and memory, and board latency over HTTP
# against the raw Redis work of the same board, all measured in one run on one machine.
#   deploy/bench.sh [contacts]      (default 200000; one org)
# Each run uses its own topics, consumer group and Redis prefix; `redis-cli --scan --pattern
# 'bench-*' | xargs redis-cli del` cleans up afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-board/target}"
CONTACTS="${1:-200000}"
DURATION="${BENCH_SECONDS:-8}"
bash deploy/stack.sh up >/dev/null
cargo build --release --locked -q
BIN="$CARGO_TARGET_DIR/release/pipeline-board"
RUN="bench-$(date +%s)"
export REDIS_PREFIX="$RUN" KAFKA_GROUP_ID="$RUN" JWT_SECRET="bench-secret-not-for-production-0123456789" MONGODB_DB="$RUN" LOG_FORMAT=text RUST_LOG=warn
for t in contacts applications conversations messages pipelines users dlq; do
  upper=$(echo "$t" | tr a-z A-Z)
  export "TOPIC_$upper=$RUN.crm.$t"
done
# The run's own topics, through the Admin API of the stack's broker.
bash deploy/kafka-node.sh topics "${PIPELINE_BOARD_HOME:-$HOME/.cache/pipeline-board}/kafka/node" 4 \
  $(for t in contacts applications conversations messages pipelines users dlq; do echo "$RUN.crm.$t"; done) >/dev/null
used_memory() { redis-cli info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; redis $(redis-server --version | awk '{print $3}')"
echo "== seed: 1 org, $CONTACTS contacts (events to Kafka only)"
"$BIN" seed --orgs 1 --contacts "$CONTACTS" --no-mongo --quiet

echo "== ingest: pipeline-board project --exit-when-caught-up"
before=$(used_memory)
"$BIN" project --exit-when-caught-up --metrics-addr "" 2>/dev/null
after=$(used_memory)
ORG=$(redis-cli --scan --pattern "$RUN:{*}:pipelines" | head -1 | sed 's/.*{\(.*\)}.*/\1/')
cards=$(( $(redis-cli hlen "$RUN:{$ORG}:body:c") + $(redis-cli hlen "$RUN:{$ORG}:body:a") ))
echo "redis used_memory grew by $(( (after - before) / 1048576 )) MiB for $(redis-cli hlen "$RUN:{$ORG}:body:c") contacts and $(redis-cli hlen "$RUN:{$ORG}:body:a") applications with their messages: $(( (after - before) / cards )) bytes per card"

echo "== raw kafka read of the same topics"
"$BIN" bench kafka-read
echo "== raw redis writes (redis-benchmark, pipelined 100)"
redis-benchmark -q -n 1000000 -P 100 -t hset,sadd,zadd | tr '\r' '\n' | grep -v '^$' | grep -v 'rps=' || true

echo "== queries: HTTP (wrk) vs the raw Redis work of the same board (redis-benchmark FCALL_RO)"
USER_ID=$(redis-cli hkeys "$RUN:{$ORG}:users" | head -1)
TOKEN=$("$BIN" token --org "$ORG" --user "$USER_ID")
PORT=18181
# The consumer keeps running (caught up) while the board is queried, as in production.
"$BIN" project --metrics-addr "" >/dev/null 2>&1 &
PROJECT_PID=$!
"$BIN" serve --listen-addr "127.0.0.1:$PORT" >/dev/null 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID $PROJECT_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
SCRIPT=$(mktemp --suffix .lua)
cat >"$SCRIPT" <<'LUA'
wrk.method = "POST"
wrk.body = os.getenv("BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
LUA
since=$(date -u -d '-180 days' +%Y-%m-%dT%H:%M:%S.000Z)
declare -A BODIES=(
  [1-unfiltered]='{"size":25}'
  [2-owner+created]="{\"size\":25,\"owner\":[\"$USER_ID\"],\"createdDateRange\":{\"start\":\"$since\"}}"
  [3-my+unanswered]='{"size":25,"ownerFilter":"my","messageStatus":"unanswered"}'
  [4-search-phone]='{"size":25,"search":"47110"}'
  [5-search-name]='{"size":25,"search":"jane"}'
  [6-page-40]='{"size":25,"page":{"New Lead":40,"Won":40,"Qualified":40}}'
)
printf '%-16s %5s | %10s %10s %10s | %10s %10s %10s\n' query conns "http p50" "http p99" "http rps" "redis p50" "redis p99" "redis rps"
for name in $(echo "${!BODIES[@]}" | tr ' ' '\n' | sort); do
  body="${BODIES[$name]}"
  first_total=$(curl -s -X POST "http://127.0.0.1:$PORT/api/contacts" -H "Authorization: Bearer $TOKEN" -d "$body" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(b["total"] for b in d["data"].values()), d["meta"]["answeredBy"])')
  mapfile -t call < <("$BIN" bench board-call --org "$ORG" --user "$USER_ID" --body "$body")
  for c in 1 32; do
    out=$(BODY="$body" TOKEN="$TOKEN" wrk -t $(( c > 1 ? 2 : 1 )) -c "$c" -d "${DURATION}s" --latency -s "$SCRIPT" "http://127.0.0.1:$PORT/api/contacts")
    p50=$(echo "$out" | awk '$1=="50%" {print $2}'); p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    # About three seconds of the raw call at the rate HTTP reached (at least 2 per connection).
    n=$(awk -v r="$rps" -v c="$c" 'BEGIN { n = int(r * 3); if (n < 2 * c) n = 2 * c; print n }')
    # The CSV row starts with the command text (JSON with commas and quotes): read it from the end.
    raw=$(redis-benchmark -c "$c" -n "$n" --csv FCALL_RO pb_board 1 "${call[0]}" "${call[1]}" | tail -1 | tr -d '"')
    rrps=$(echo "$raw" | awk -F, '{print $(NF-6)}'); rp50=$(echo "$raw" | awk -F, '{print $(NF-3)}'); rp99=$(echo "$raw" | awk -F, '{print $(NF-1)}')
    printf '%-16s %5s | %10s %10s %10s | %8sms %8sms %10s %s\n' "$name" "$c" "$p50" "$p99" "$rps" "$rp50" "$rp99" "$rrps" "${non2xx:+NON-2XX:$non2xx}"
  done
  echo "   ($name: $first_total; body $body)"
done
rm -f "$SCRIPT"
