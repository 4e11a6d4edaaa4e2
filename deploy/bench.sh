#!/usr/bin/env bash
# The benchmark at scale (never part of the tests), every number from one run on one machine:
#   deploy/bench.sh [contacts]      (default 1000000: one org of that size plus 3 orgs of 5,000)
# Ingest beside the raw Kafka read rate and the raw Redis rate of the same write mix; Redis bytes
# per card; boards (a)-(h) over HTTP with wrk at 1 and 32 connections beside the same Redis work
# issued directly, the simplest possible board and a canned axum response of the same size;
# freshness under load; the MongoDB path against the projection. The output is printed and
# written into docs/benchmarks.md (section "Latest run").
# Each run uses its own topics, consumer group, Redis prefix and MongoDB database; `deploy/bench.sh
# --clean` removes what earlier runs left.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--clean" ]; then
  redis-cli --scan --pattern 'bench-*' | xargs -r -n 1000 redis-cli unlink >/dev/null
  echo "bench keys removed"; exit 0
fi
CONTACTS="${1:-1000000}"
DURATION="${BENCH_SECONDS:-8}"
. deploy/bench-run.sh
bench_run bench
used_memory() { redis-cli info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }
# Key names come from the key model (`pipeline-board keys`), never spelled here.
cards_of() { echo $(( $(redis-cli hlen "$("$BIN" keys cards "$1" contact)") + $(redis-cli hlen "$("$BIN" keys cards "$1" application)") )); }
{
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2}'); redis $(redis-server --version | awk '{print $3}'); commit $(git rev-parse --short HEAD)"
echo "== command: deploy/bench.sh $CONTACTS (BENCH_SECONDS=$DURATION)"
echo "== seed: 1 org of $CONTACTS contacts, ~3 messages each (events only), and 3 orgs of 5,000 (MongoDB and events)"
"$BIN" seed --orgs 1 --contacts "$CONTACTS" --messages 3 --no-mongo --quiet > "$OUT.big"
grep -E '^seeded' "$OUT.big"
BIG=$(awk '/^org/ {print $2; exit}' "$OUT.big")
"$BIN" seed --orgs 3 --contacts 5000 --seed 7 --quiet > "$OUT.small"
grep -E '^seeded' "$OUT.small"
# The freshness probe writes into the first small org (through Kafka only); MongoDB is compared on
# the second, which nothing but the seed writes.
SMALL=$(awk '/^org/ {print $2; exit}' "$OUT.small")
MONGO_ORG=$(awk '/^org/ {n++; if (n == 2) {print $2; exit}}' "$OUT.small")

echo "== ingest: pipeline-board project --exit-when-caught-up"
before=$(used_memory)
cpu0=$(redis_cpu)
/usr/bin/time -f "projector process: %U s user + %S s system CPU in %e s" "$BIN" project --exit-when-caught-up --metrics-addr "" 2>&1 | grep -v '^\s*$' | tail -2
echo "redis-server: $(awk -v a="$cpu0" -v b="$(redis_cpu)" 'BEGIN {printf "%.1f", b - a}') s CPU during the ingest"
after=$(used_memory)
total_cards=0
for org in $(redis-cli --scan --pattern "$("$BIN" keys pipelines '*')" | sed 's/.*{\(.*\)}.*/\1/'); do total_cards=$(( total_cards + $(cards_of "$org") )); done
BIG_CARDS=$(cards_of "$BIG")
echo "redis used_memory grew by $(( (after - before) / 1048576 )) MiB for $total_cards cards (big org: $BIG_CARDS) with their conversations and messages: $(( (after - before) / total_cards )) bytes per card"

echo "== raw kafka read of the same topics"
"$BIN" bench kafka-read
echo "== raw redis rate of the same write mix (final writes of 200,000 cards as plain pipelined HSET/ZADD)"
all_events=$(redis-cli hgetall "$("$BIN" keys progress "$KAFKA_GROUP_ID")" | awk 'NR % 2 == 0 {s += $1} END {print s}')
"$BIN" bench redis-writes --org "$BIG" --cards 200000 --events-per-card "$(awk -v e="$all_events" -v c="$total_cards" 'BEGIN {printf "%.2f", e / c}')"

# The caller: a user with teams (so that `team` means something).
USER_ID=$(redis-cli hgetall "$("$BIN" keys users "$BIG")" | paste - - | awk '$2 != "[]" {print $1; exit}')
TOKEN=$("$BIN" token --org "$BIG" --user "$USER_ID")
SMALL_USER=$(redis-cli hkeys "$("$BIN" keys users "$SMALL")" | head -1)
SMALL_TOKEN=$("$BIN" token --org "$SMALL" --user "$SMALL_USER")
PORT=18181
"$BIN" project --metrics-addr "" >/dev/null 2>&1 &
PROJECT_PID=$!
"$BIN" serve --listen-addr "127.0.0.1:$PORT" >/dev/null 2>&1 &
SERVE_PID=$!
CANNED_PID=
trap 'kill $SERVE_PID $PROJECT_PID $CANNED_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
SCRIPT=$(wrk_post_script)
ask() { curl -s -X POST "http://127.0.0.1:$PORT/api/contacts" -H "Authorization: Bearer $TOKEN" -d "$1"; }
since=$(date -u -d '-180 days' +%Y-%m-%dT%H:%M:%S.000Z)
FIRST_STAGE=$(ask '{"size":1}' | python3 -c 'import json,sys; print(next(iter(json.load(sys.stdin)["data"])))')
# The in-memory index loads on the first board that needs it: load it before measuring.
load_started=$(date +%s.%N)
for _ in $(seq 60); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$PORT/api/contacts" -H "Authorization: Bearer $TOKEN" -d '{"size":1,"search":"jane"}')" = 200 ] && break
done
echo "in-memory index of the big org loaded on the first index board in $(awk -v a="$load_started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s (the API process: $(ps -o rss= -p $SERVE_PID | awk '{printf "%.0f MiB RSS", $1/1024}'))"
declare -A BODIES=(
  [a-none]='{"size":25}'
  [b-my]='{"size":25,"ownerFilter":"my"}'
  [c-owner+created]="{\"size\":25,\"owner\":[\"$USER_ID\"],\"createdDateRange\":{\"start\":\"$since\"}}"
  [d-team]='{"size":25,"ownerFilter":"team"}'
  [e-my+unanswered+quiet]='{"size":25,"ownerFilter":"my","messageStatus":"unanswered","lastMessageTimeRange":{"value":7,"unit":"days"}}'
  [f-search-name]='{"size":25,"search":"jane"}'
  [g-search-phone]='{"size":25,"search":"47110"}'
  [h-page-200]="{\"size\":25,\"stages\":[\"$FIRST_STAGE\"],\"page\":{\"$FIRST_STAGE\":200}}"
)
wrk_row() { # label conns body -> one table row
  local out p50 p99 max rps errs
  out=$(BODY="$3" TOKEN="$TOKEN" wrk -t $(( $2 > 1 ? 2 : 1 )) -c "$2" -d "${DURATION}s" --latency -s "$SCRIPT" "http://127.0.0.1:${4:-$PORT}/api/contacts")
  p50=$(echo "$out" | awk '$1=="50%" {print $2}'); p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  max=$(echo "$out" | awk '$1=="Latency" {print $4}'); rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  errs=$(echo "$out" | awk '/Non-2xx/ {print "non-2xx " $NF}')
  printf '%-24s %5s | %9s %9s %9s %9s %s\n' "$1" "$2" "$p50" "$p99" "$max" "$rps" "$errs"
}
echo "== boards on the big org, all stages, size 25: HTTP (wrk) | the same Redis work issued directly (pipeline-board bench board)"
printf '%-24s %5s | %9s %9s %9s %9s | %s\n' board conns "http p50" "http p99" "http max" "http rps" "redis work"
for name in $(echo "${!BODIES[@]}" | tr ' ' '\n' | sort); do
  body="${BODIES[$name]}"
  info=$(ask "$body" | python3 -c 'import json,sys; d=json.load(sys.stdin); m=d.get("meta",{}); print(sum(b["total"] for b in d["data"].values()), m.get("answeredBy"), m.get("route"))')
  for c in 1 32; do
    row=$(wrk_row "$name" "$c" "$body")
    raw=$("$BIN" bench board --org "$BIG" --user "$USER_ID" --body "$body" --conns "$c" --seconds 3)
    echo "$row | $raw"
  done
  echo "   ($name: total $info; body $body)"
done
echo "== the simplest possible board on the same Redis (per stage ZRANGE 0 24 REV + ZCARD, one HMGET of the page's records)"
for c in 1 32; do echo "simplest board  conns $c | $("$BIN" bench board --org "$BIG" --user "$USER_ID" --simplest --conns "$c" --seconds 3)"; done
BYTES=$(ask '{"size":25}' | wc -c)
echo "== a canned axum response of the same size ($BYTES bytes)"
"$BIN" bench canned --listen 127.0.0.1:18182 --bytes "$BYTES" & CANNED_PID=$!
for _ in $(seq 100); do curl -sf -X POST http://127.0.0.1:18182/api/contacts >/dev/null && break; sleep 0.1; done
for c in 1 32; do wrk_row canned "$c" '{}' 18182; done
kill $CANNED_PID; CANNED_PID=
echo "== freshness: produce -> visible in an API answer, under 5,000 events/s and 500 boards/s"
"$BIN" bench freshness --api "http://127.0.0.1:$PORT" --org "$BIG" --token "$TOKEN" --probe-org "$SMALL" --probe-token "$SMALL_TOKEN" --seconds 20
echo "== the MongoDB path against the projection on a 5,000-contact org (same process, no HTTP; identical answers checked)"
MONGO_USER=$(redis-cli hkeys "$("$BIN" keys users "$MONGO_ORG")" | head -1)
"$BIN" bench mongo-vs-projection --org "$MONGO_ORG" --user "$MONGO_USER" --n 10 --body '{"size":25}' --body '{"size":25,"ownerFilter":"my"}' \
  --body '{"size":25,"search":"jan"}' --body '{"size":25,"ownerFilter":"team","messageStatus":"unanswered"}'
echo "== redis after the run: $(redis-cli info memory | awk -F: '/^used_memory_human:/ {print $2}' | tr -d '\r') used; the API process: $(ps -o rss= -p $SERVE_PID | awk '{printf "%.0f MiB RSS", $1/1024}')"
rm -f "$SCRIPT"
} 2>&1 | tee "$OUT"
# (The block above runs in a subshell of the pipe: its variables end with it.)
rm -f "$OUT.small" "$OUT.big"
write_section latest-run "Latest run" deploy/bench.sh
