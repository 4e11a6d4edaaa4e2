# Sourced by the benchmark scripts: starts the stack, builds the release binary and gives the run
# its own topics, consumer group, Redis prefix and MongoDB database, all named "$RUN"
# (`bench_run <name>` sets RUN=<name>-<unix time>, BIN and OUT).
bench_run() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-board/target}"
  HOME_DIR="${PIPELINE_BOARD_HOME:-$HOME/.cache/pipeline-board}"
  bash deploy/stack.sh up >/dev/null
  cargo build --release --locked -q
  BIN="$CARGO_TARGET_DIR/release/pipeline-board"
  RUN="$1-$(date +%s)"
  OUT="$(mktemp --suffix .bench)"
  export REDIS_PREFIX="$RUN" KAFKA_GROUP_ID="$RUN" JWT_SECRET="bench-secret-not-for-production-0123456789" MONGODB_DB="$RUN" LOG_FORMAT=text RUST_LOG=warn
  local t upper
  for t in contacts applications conversations messages pipelines users dlq; do
    upper=$(echo "$t" | tr a-z A-Z)
    export "TOPIC_$upper=$RUN.crm.$t"
  done
  bash deploy/kafka-node.sh topics "$HOME_DIR/kafka/node" 4 \
    $(for t in contacts applications conversations messages pipelines users dlq; do echo "$RUN.crm.$t"; done) >/dev/null
}

# CPU seconds the redis-servers on the given ports (default 6379) have used so far.
redis_cpu() {
  local p
  for p in "${@:-6379}"; do redis-cli -p "$p" info cpu; done | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {printf "%.3f", s}'
}

# A free loopback port.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts a projector and the API on $PORT in the background (both added to PIDS, the API's pid in
# SERVE_PID) and waits until the API says ready; exits if it did not start.
start_projector_and_api() {
  "$BIN" project --metrics-addr "" >/dev/null 2>&1 & PIDS+=($!)
  "$BIN" serve --listen-addr "127.0.0.1:$PORT" >/dev/null 2>&1 & PIDS+=($!)
  SERVE_PID=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
  kill -0 "$SERVE_PID" || { echo "the API did not start"; exit 1; }
}

# Puts the run's output ($OUT) into docs/benchmarks.md between `<!-- <marker> -->` and
# `<!-- /<marker> -->` (replacing an earlier run there, or appended), under "## <title> (date)".
write_section() {
  python3 - "$OUT" "$1" "$2" "$3" <<'PY'
import re, sys, datetime
out, marker, title, script = sys.argv[1:5]
run = open(out).read()
path = "docs/benchmarks.md"
doc = open(path).read()
start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
block = f"{start}\n## {title} ({datetime.date.today()})\nOutput of `{script}`, verbatim:\n\n```\n{run.strip()}\n```\n{end}"
if start in doc:
    doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
else:
    doc = doc.rstrip("\n") + "\n\n" + block + "\n"
open(path, "w").write(doc)
PY
  echo "written to docs/benchmarks.md"
}

# One org of $CONTACTS contacts (~3 messages each, events only), projected until caught up:
# sets ORG, USER_ID (one of its users) and TOKEN (theirs). Prints the seed's and the
# projector's summary lines.
seed_and_project_one_org() {
  "$BIN" seed --orgs 1 --contacts "$CONTACTS" --messages 3 --no-mongo --quiet > "$OUT.seed"
  grep -E '^seeded' "$OUT.seed"
  ORG=$(awk '/^org/ {print $2; exit}' "$OUT.seed")
  rm -f "$OUT.seed"
  echo "== the projection: pipeline-board project --exit-when-caught-up"
  "$BIN" project --exit-when-caught-up --metrics-addr "" 2>&1 | grep -E '^applied'
  USER_ID=$(redis-cli hkeys "$("$BIN" keys users "$ORG")" | head -1)
  TOKEN=$("$BIN" token --org "$ORG" --user "$USER_ID")
}

# A wrk script (path printed) that POSTs $BODY with $TOKEN, and If-None-Match: $ETAG when set.
wrk_post_script() {
  local script
  script=$(mktemp --suffix .lua)
  cat >"$script" <<'LUA'
wrk.method = "POST"
wrk.body = os.getenv("BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
if (os.getenv("ETAG") or "") ~= "" then wrk.headers["If-None-Match"] = os.getenv("ETAG") end
LUA
  echo "$script"
}
