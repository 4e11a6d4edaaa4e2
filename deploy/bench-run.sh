# Sourced by the benchmark scripts: starts the stack, builds the release binary and hands over to
# `pipeline-board bench run <scenario> [flags]`, which runs the whole benchmark in Rust in a
# sandbox of its own on the stack (its topics, keys, consumer groups and database, removed at
# the end), prints it and writes it into docs/benchmarks.md. `--keep` keeps the sandbox,
# `--no-doc` leaves the doc alone; `pipeline-board bench run --help` lists the scenarios.
# `bench_run <scenario> <default contacts> [contacts] [flags]`: a first argument that is a
# number is the contacts, the rest are flags of the scenario (`--keep`, `--no-doc`, ...); an
# empty default: the scenario takes no contacts.
bench_run() {
  local scenario=$1 contacts=$2
  shift 2
  case "${1:-}" in [0-9]*) contacts=$1; shift ;; esac
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pipeline-board/target}"
  bash deploy/stack.sh up >/dev/null
  cargo build --release --locked -q
  exec "$CARGO_TARGET_DIR/release/pipeline-board" bench run "$scenario" ${contacts:+--contacts "$contacts"} "$@"
}
