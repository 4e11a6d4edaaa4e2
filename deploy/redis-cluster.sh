#!/usr/bin/env bash
# A local Redis Cluster of 3 primaries + 3 replicas on loopback, from Debian's redis-server
# (cluster-enabled, no persistence, a 2 s node timeout so a killed primary is failed over fast).
#
#   deploy/redis-cluster.sh up   [DIR] [BASE_PORT]   start nodes BASE_PORT..BASE_PORT+5, create the cluster, wait until it is ok
#   deploy/redis-cluster.sh down [DIR]               stop the nodes started in DIR
#   deploy/redis-cluster.sh status [DIR] [BASE_PORT]
#   deploy/redis-cluster.sh start-node DIR PORT      (re)start one node of DIR with its nodes.conf (it rejoins, empty)
#
# DIR defaults to $PIPELINE_BOARD_HOME/redis-cluster, BASE_PORT to $REDIS_CLUSTER_PORT or 7000.
# Tests start clusters of their own (their own DIR and ports) to kill and reshard them.
set -euo pipefail

STATE_DIR="${PIPELINE_BOARD_HOME:-$HOME/.cache/pipeline-board}"
cmd="${1:-up}"
DIR="${2:-$STATE_DIR/redis-cluster}"
BASE="${3:-${REDIS_CLUSTER_PORT:-7000}}"
PORTS=()
for i in 0 1 2 3 4 5; do PORTS+=($((BASE + i))); done
NODE_TIMEOUT_MS="${REDIS_CLUSTER_NODE_TIMEOUT_MS:-2000}"

start_node() { # port
  local port="$1"
  if redis-cli -p "$port" ping >/dev/null 2>&1; then return; fi
  mkdir -p "$DIR/$port"
  # No persistence, like the single server of the stack: a restarted node comes back empty and
  # resyncs from its shard's primary.
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no --enable-debug-command local \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout "$NODE_TIMEOUT_MS" \
    --cluster-replica-validity-factor 0 \
    --dir "$DIR/$port" --logfile "$DIR/$port/redis.log" --pidfile "$DIR/$port/redis.pid"
  for ((i = 0; i < 100; i++)); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "[redis-cluster] node $port did not start" >&2
  return 1
}

cluster_ok() {
  local p
  for p in "${PORTS[@]}"; do
    redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
  done
  # Every replica linked to its primary.
  [ "$(for p in "${PORTS[@]}"; do redis-cli -p "$p" info replication; done | grep -c '^master_link_status:up')" -ge 3 ]
}

case "$cmd" in
  up)
    for p in "${PORTS[@]}"; do start_node "$p"; done
    if ! redis-cli -p "${PORTS[0]}" cluster info | grep -q '^cluster_slots_assigned:16384'; then
      hosts=()
      for p in "${PORTS[@]}"; do hosts+=("127.0.0.1:$p"); done
      # Bounded: a create whose nodes never meet on the cluster bus waits for them forever (a
      # test's cluster then starts again on other ports).
      timeout 120 redis-cli --cluster create "${hosts[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log" 2>&1 ||
        { cat "$DIR/create.log" >&2; exit 1; }
    fi
    for ((i = 0; i < 300; i++)); do cluster_ok && break; sleep 0.1; done
    cluster_ok || { echo "[redis-cluster] cluster on ${PORTS[0]}..${PORTS[5]} not ok" >&2; exit 1; }
    echo "[redis-cluster] 3 primaries + 3 replicas answer: REDIS_URL=redis+cluster://127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
    ;;
  start-node)
    start_node "$BASE"
    ;;
  down)
    for f in "$DIR"/*/redis.pid; do
      [ -f "$f" ] || continue
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    done
    echo "[redis-cluster] stopped the nodes of $DIR"
    ;;
  status)
    if cluster_ok; then echo "redis cluster: up"; else echo "redis cluster: down"; fi
    ;;
  *) echo "usage: $0 up|down|status [DIR] [BASE_PORT] | start-node DIR PORT" >&2; exit 2 ;;
esac
