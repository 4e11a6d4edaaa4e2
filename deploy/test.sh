#!/usr/bin/env bash
# The test command (README, .ci/run): installs what is missing, starts the local stack of real
# servers, checks formatting and lints, then runs every test against the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-board/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
started=$(date +%s)
bash deploy/stack.sh up
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -q -- -D warnings
cargo test --workspace --locked -- --test-threads "${TEST_THREADS:-4}"
echo "[test] all checks and tests passed in $(( $(date +%s) - started )) s"
