#!/usr/bin/env bash
# One Apache Kafka KRaft node (broker + controller in one JVM) from the jars that
# deploy/install-deps.sh put in $PIPELINE_BOARD_HOME/kafka/libs. Used by deploy/stack.sh for the
# shared broker and by the failure tests for brokers of their own that they stop and restart.
#
#   deploy/kafka-node.sh start DIR PORT   format DIR once (data survives restarts), start, wait until it answers
#   deploy/kafka-node.sh stop DIR         SIGTERM, wait for a clean shutdown
#   deploy/kafka-node.sh kill DIR         SIGKILL
#   deploy/kafka-node.sh topics DIR PARTITIONS TOPIC...   create topics (Admin API), idempotent
# The controller listens on PORT+1. DIR holds config/, data/, broker.log and pid.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${PIPELINE_BOARD_HOME:-$HOME/.cache/pipeline-board}"
LIBS="$STATE_DIR/kafka/libs"
HEAP="${KAFKA_HEAP:-768m}"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
running() { [ -f "$1/pid" ] && kill -0 "$(cat "$1/pid")" 2>/dev/null; }

write_config() { # dir port
  local dir="$1" port="$2" ctrl=$(($2 + 1))
  mkdir -p "$dir/config" "$dir/data"
  cat >"$dir/config/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$ctrl
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctrl
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
# One node: every internal topic has one replica.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests join many short-lived groups: no initial rebalance delay.
group.initial.rebalance.delay.ms=0
# Topics are created explicitly (Admin API); a typo must not create one.
auto.create.topics.enable=false
num.partitions=4
PROPS
  cat >"$dir/config/log4j2.properties" <<PROPS
rootLogger.level=WARN
rootLogger.appenderRef.file.ref=file
appender.file.type=File
appender.file.name=file
appender.file.fileName=$dir/broker.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=INFO
logger.server.name=org.apache.kafka.server
logger.server.level=INFO
PROPS
}

start() { # dir port
  local dir="$1" port="$2"
  [ -d "$LIBS" ] || { echo "[kafka] broker jars missing: run deploy/install-deps.sh" >&2; exit 1; }
  if running "$dir"; then echo "[kafka] node in $dir already running"; return 0; fi
  if port_open "$port"; then echo "[kafka] 127.0.0.1:$port is taken by another process" >&2; exit 1; fi
  write_config "$dir" "$port"
  if [ ! -f "$dir/data/meta.properties" ]; then
    local id; id="$(java -cp "$LIBS/*" kafka.tools.StorageTool random-uuid)"
    java -cp "$LIBS/*" -Dlog4j2.configurationFile="$dir/config/log4j2.properties" \
      kafka.tools.StorageTool format -t "$id" -c "$dir/config/server.properties" >/dev/null
  fi
  setsid nohup java -Xms256m -Xmx"$HEAP" -XX:+UseG1GC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$dir/config/log4j2.properties" -cp "$LIBS/*" \
    kafka.Kafka "$dir/config/server.properties" >"$dir/stdout.log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  local i
  for ((i = 0; i < 600; i++)); do
    port_open "$port" && { echo "[kafka] node answers on 127.0.0.1:$port"; return 0; }
    running "$dir" || {
      echo "[kafka] node exited; see $dir/broker.log $dir/stdout.log" >&2
      tail -20 "$dir/stdout.log" "$dir/broker.log" >&2 2>/dev/null
      exit 1
    }
    sleep 0.1
  done
  echo "[kafka] node did not answer on 127.0.0.1:$port within 60 s" >&2
  exit 1
}

stop() { # dir signal
  local dir="$1" sig="$2"
  running "$dir" || { rm -f "$dir/pid"; return 0; }
  local pid; pid="$(cat "$dir/pid")"
  kill "-$sig" "$pid"
  local i
  for ((i = 0; i < 600; i++)); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$dir/pid"; echo "[kafka] node $pid stopped ($sig)"; return 0; }
    sleep 0.1
  done
  echo "[kafka] node $pid still running after 60 s; killing" >&2
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

topics() { # dir partitions topic...
  local dir="$1" partitions="$2"; shift 2
  local port; port="$(awk -F'[:=]' '/^advertised.listeners=/ {print $NF}' "$dir/config/server.properties")"
  java -cp "$LIBS/*" -Dlog4j2.configurationFile="$dir/config/log4j2.properties" \
    "$HERE/kafka/CreateTopics.java" "127.0.0.1:$port" "$partitions" "$@"
}

case "${1:-}" in
  start) start "$2" "$3" ;;
  stop) stop "$2" TERM ;;
  kill) stop "$2" KILL ;;
  topics) shift; topics "$@" ;;
  *) echo "usage: $0 start DIR PORT | stop DIR | kill DIR | topics DIR PARTITIONS TOPIC..." >&2; exit 2 ;;
esac
