#!/usr/bin/env bash
# The local stack, all real servers on loopback: Redis (Debian; one server on 6379 and a cluster of
# 3 primaries + 3 replicas on 7000-7005, deploy/redis-cluster.sh), Apache Kafka (one KRaft node from
# Maven Central's jars, data on disk) and FerretDB (MongoDB wire protocol) on PostgreSQL (Debian).
# Production runs the same protocols against your own clusters (README "Your own clusters").
#
#   deploy/stack.sh up      install what is missing, start what is not running, create topics, wait until each answers
#   deploy/stack.sh down    stop what this script started, nothing else
#   deploy/stack.sh status  say what answers
#
# State (binaries, data, logs, pid files) lives in $PIPELINE_BOARD_HOME (~/.cache/pipeline-board),
# outside the clone; Kafka and PostgreSQL keep their data across restarts.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${PIPELINE_BOARD_HOME:-$HOME/.cache/pipeline-board}"
RUN_DIR="$STATE_DIR/run"
KAFKA_DIR="$STATE_DIR/kafka/node"
KAFKA_PORT="${KAFKA_PORT:-9092}"
MONGO_PORT="${MONGO_PORT:-27017}"
REDIS_PORT="${REDIS_PORT:-6379}"
PG_PORT="${PG_PORT:-54320}"
FERRETDB_DEBUG_PORT="${FERRETDB_DEBUG_PORT:-27018}"
PARTITIONS="${PARTITIONS:-4}"
TOPICS=(crm.contacts crm.applications crm.conversations crm.messages crm.pipelines crm.users crm.dlq)
mkdir -p "$RUN_DIR"

# PostgreSQL refuses to run as root: as root the cluster belongs to Debian's `postgres` user and
# lives where that user can reach it (root's home is private).
if [ "$(id -u)" = 0 ]; then
  PG_DATA="${PG_DATA:-/var/lib/pipeline-board/pg}"
  as_pg() { runuser -u postgres -- "$@"; }
else
  PG_DATA="${PG_DATA:-$STATE_DIR/pg}"
  as_pg() { "$@"; }
fi
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_until() { # name seconds command...
  local name="$1" secs="$2" i; shift 2
  for ((i = 0; i < secs * 10; i++)); do
    "$@" >/dev/null 2>&1 && { echo "[stack] $name answers"; return 0; }
    sleep 0.1
  done
  echo "[stack] $name did not answer within $secs s" >&2
  return 1
}

start_redis() {
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then echo "[stack] redis already running on $REDIS_PORT"; return; fi
  mkdir -p "$STATE_DIR/redis"
  # DEBUG from loopback only: the chaos run (deploy/chaos.sh) reloads older snapshots with it.
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --enable-debug-command local \
    --dir "$STATE_DIR/redis" --logfile "$RUN_DIR/redis.log" --pidfile "$RUN_DIR/redis.pid"
  touch "$RUN_DIR/redis.ours"
  wait_until "redis on 127.0.0.1:$REDIS_PORT" 20 redis-cli -p "$REDIS_PORT" ping
}

start_kafka() {
  if port_open "$KAFKA_PORT" && [ ! -f "$RUN_DIR/kafka.ours" ]; then
    echo "[stack] a kafka broker already answers on $KAFKA_PORT"
  else
    KAFKA_HEAP="${KAFKA_HEAP:-1g}" bash "$HERE/kafka-node.sh" start "$KAFKA_DIR" "$KAFKA_PORT"
    touch "$RUN_DIR/kafka.ours"
  fi
  # Through the Admin API; waits for the broker's metadata, idempotent.
  bash "$HERE/kafka-node.sh" topics "$KAFKA_DIR" "$PARTITIONS" "${TOPICS[@]}"
}

start_postgres() {
  if as_pg "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then echo "[stack] postgresql already running on $PG_PORT"; return; fi
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    mkdir -p "$PG_DATA"
    [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$(dirname "$PG_DATA")"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    # A test database: durability is traded for speed (the projection's tests never restart
    # PostgreSQL expecting data to survive a crash; a clean stop keeps everything).
    cat >>"$PG_DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DATA'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
shared_buffers = 256MB
CONF
  fi
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 start >/dev/null
  touch "$RUN_DIR/postgres.ours"
  wait_until "postgresql on 127.0.0.1:$PG_PORT" 30 as_pg "$PG_BIN/pg_isready" -h 127.0.0.1 -p "$PG_PORT"
  as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='ferretdb'" | grep -q 1 \
    || as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres ferretdb
}

mongo_ping() { # FerretDB answers the MongoDB wire protocol; its debug port says when it is ready.
  curl -sf "http://127.0.0.1:$FERRETDB_DEBUG_PORT/debug/readyz" >/dev/null
}

start_ferretdb() {
  if port_open "$MONGO_PORT"; then echo "[stack] a mongodb-wire server already answers on $MONGO_PORT"; return; fi
  mkdir -p "$STATE_DIR/ferretdb"
  setsid nohup "$STATE_DIR/bin/ferretdb" --handler=postgresql \
    --postgresql-url="postgres://postgres@127.0.0.1:$PG_PORT/ferretdb" \
    --listen-addr="127.0.0.1:$MONGO_PORT" --debug-addr="127.0.0.1:$FERRETDB_DEBUG_PORT" \
    --state-dir="$STATE_DIR/ferretdb" --telemetry=disable --log-level=warn \
    >"$RUN_DIR/ferretdb.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/ferretdb.pid"
  wait_until "ferretdb (mongodb wire) on 127.0.0.1:$MONGO_PORT" 30 mongo_ping
}

stop_pidfile() { # name pidfile
  if [ -f "$2" ]; then
    local pid i; pid="$(cat "$2")"
    if kill "$pid" 2>/dev/null; then
      for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "[stack] stopped $1 ($pid)"
    fi
    rm -f "$2"
  fi
}

case "${1:-up}" in
  up)
    started=$(date +%s.%N)
    bash "$HERE/install-deps.sh"
    start_redis
    bash "$HERE/redis-cluster.sh" up
    start_postgres
    start_ferretdb
    start_kafka
    echo "[stack] ready in $(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}') s:" \
      "KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT MONGODB_URI=mongodb://127.0.0.1:$MONGO_PORT"
    ;;
  down)
    stop_pidfile ferretdb "$RUN_DIR/ferretdb.pid"
    if [ -f "$RUN_DIR/kafka.ours" ]; then bash "$HERE/kafka-node.sh" stop "$KAFKA_DIR"; rm -f "$RUN_DIR/kafka.ours"; fi
    if [ -f "$RUN_DIR/postgres.ours" ]; then
      as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null && echo "[stack] stopped postgresql"
      rm -f "$RUN_DIR/postgres.ours"
    fi
    if [ -f "$RUN_DIR/redis.ours" ]; then stop_pidfile redis "$RUN_DIR/redis.pid"; rm -f "$RUN_DIR/redis.ours"; fi
    bash "$HERE/redis-cluster.sh" down
    ;;
  status)
    for s in "redis:$REDIS_PORT" "postgresql:$PG_PORT" "mongodb-wire (ferretdb):$MONGO_PORT" "kafka:$KAFKA_PORT"; do
      if port_open "${s##*:}"; then echo "${s%:*}: up"; else echo "${s%:*}: down"; fi
    done
    bash "$HERE/redis-cluster.sh" status
    ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
