#!/usr/bin/env bash
# The benchmark at scale (never part of the tests), every number from one run on one machine:
#   deploy/bench.sh [contacts] [flags]   (default 1000000: one org of that size plus 3 orgs of 5,000)
# Ingest beside the raw Kafka read rate and the raw Redis rate of the same write mix; Redis bytes
# per card; boards (a)-(h) over HTTP with wrk at 1 and 32 connections beside the same Redis work
# issued directly, the simplest possible board and a canned axum response of the same size;
# freshness under load; the MongoDB path against the projection. Section "Latest run" of
# docs/benchmarks.md. `deploy/bench.sh --clean` removes what interrupted runs left.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/bench-run.sh
if [ "${1:-}" = "--clean" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-board/target}"
  cargo build --release --locked -q
  exec "$CARGO_TARGET_DIR/release/pipeline-board" bench clean
fi
bench_run scale 1000000 "$@"
