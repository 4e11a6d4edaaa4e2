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
threads="${TEST_THREADS:-4}"
# The stack-free tier first (every crate's unit tests and doc tests: seconds, no server).
cargo test --workspace --locked --lib --bins -- --test-threads "$threads"
cargo test --workspace --locked --doc
# The index's memory measured by a counting allocator: a test binary of its own (the allocator
# counts every allocation of the process).
cargo test -p board-api --locked --test index_memory
# Then the one integration test binary, a module at a time (its tests in parallel): the heavy
# modules (the differential test on FerretDB, the cluster node kills, the chaos run) never run
# beside each other, so a loaded machine slows them without making them fail.
cargo test --workspace --locked --test it --no-run
for module in $(sed -n 's/^mod \([a-z_]*\);$/\1/p' tests/it/main.rs | grep -vx common); do
  echo "[test] tests/it/$module.rs"
  cargo test --workspace --locked --test it -- "$module::" --test-threads "$threads"
done
echo "[test] all checks and tests passed in $(( $(date +%s) - started )) s"
