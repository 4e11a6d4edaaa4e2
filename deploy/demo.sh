#!/usr/bin/env bash
# The demo: installs and starts everything, seeds a demo data set into MongoDB and Kafka, projects
# it into Redis, checks the projection against MongoDB, then keeps the projector running.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-board/target}"
bash deploy/stack.sh up
cargo build --release --locked
BIN="$CARGO_TARGET_DIR/release/pipeline-board"
export MONGODB_DB="${MONGODB_DB:-crm}"
# The read model changed (model 2): a projection an older build left under the default prefix is
# removed, and the topics are projected again from the start under a consumer group of model 2.
export KAFKA_GROUP_ID="${KAFKA_GROUP_ID:-pipeline-board-m2}"
P="${REDIS_PREFIX:-pb}"
# The marker's name comes from the key model; read model 2 kept it outside {meta} before.
model=$(redis-cli get "$("$BIN" keys model)")
[ -n "$model" ] || model=$(redis-cli get "$("$BIN" keys legacy-model)")
all_keys=$("$BIN" keys pattern)
if [ "$model" != "2" ] && [ -n "$(redis-cli --scan --pattern "$all_keys" | head -1)" ]; then
  echo "removing a projection of an older read model under the prefix $P (the topics are projected again)"
  redis-cli --scan --pattern "$all_keys" | xargs -r -n 1000 redis-cli unlink >/dev/null
fi
# MongoDB (the source of truth) decides whether the demo data set exists: Redis runs without
# persistence here, so an empty projection is rebuilt from the topics, never seeded twice.
"$BIN" seed --if-empty --orgs "${DEMO_ORGS:-3}" --contacts "${DEMO_CONTACTS:-5000}"
"$BIN" project --exit-when-caught-up --metrics-addr ""
"$BIN" verify
export JWT_SECRET="${JWT_SECRET:-demo-secret-not-for-production-0123456789}"
"$BIN" project &
PROJECTOR=$!
trap 'kill -TERM $PROJECTOR 2>/dev/null; wait $PROJECTOR' EXIT
echo "demo data projected; the projector keeps running (metrics on http://127.0.0.1:9898/metrics)"
echo "the board: open http://${LISTEN_ADDR:-127.0.0.1:8080}/ and pick a demo user (DEMO_SIGNIN is on for the demo only)"
echo "API on http://${LISTEN_ADDR:-127.0.0.1:8080} (JWT_SECRET=$JWT_SECRET; see README 'Try it'); Ctrl-C stops both gracefully"
DEMO_SIGNIN="${DEMO_SIGNIN:-true}" "$BIN" serve
