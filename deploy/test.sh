#!/usr/bin/env bash
# The test command: installs what is missing, starts the local stack, runs every test against it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-board/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
bash deploy/stack.sh up
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads "${TEST_THREADS:-4}"
