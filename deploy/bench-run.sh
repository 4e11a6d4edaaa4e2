# Sourced by the benchmark scripts: starts the stack, builds the release binary and hands over to
# `pipeline-board bench run <scenario> [flags]`, which runs the whole benchmark in Rust in a
# sandbox of its own on the stack (its topics, keys, consumer groups and database, removed at
# the end), prints it and writes it into docs/benchmarks.md. `--keep` keeps the sandbox,
# `--no-doc` leaves the doc alone; `pipeline-board bench run --help` lists the scenarios.
bench_run() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-board/target}"
  bash deploy/stack.sh up >/dev/null
  cargo build --release --locked -q
  exec "$CARGO_TARGET_DIR/release/pipeline-board" bench run "$@"
}
