#!/usr/bin/env bash
# The chaos run (README "Tests"): `deploy/chaos.sh [minutes] [single|cluster]` (default 10 minutes
# on a single Redis). Starts the stack, then runs tests/it/chaos.rs alone for that long against a
# Kafka node and a Redis of its own — one server, or a 3+3 Redis Cluster (each Redis fault hits
# one shard's primary) — (the stack's FerretDB holds MongoDB's side): random faults while a producer writes and clients
# poll boards with ETags; prints the table (fault, count, time to heal p50/max, wrong answers
# while healthy) and fails on any wrong answer, undocumented 5xx, drift or fault not healed.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-board/target}"
minutes="${1:-10}"
bash deploy/stack.sh up
CHAOS_REDIS="${2:-single}" CHAOS_MINUTES="$minutes" cargo test --locked --test it -- chaos:: --nocapture --test-threads 1
