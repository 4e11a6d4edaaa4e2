#!/usr/bin/env bash
# Rebuild and self-healing at scale (never part of the tests), every number from one run:
#   deploy/rebuild-bench.sh [contacts] [flags]   (default 1000000 contacts in one org, ~3 messages each)
# The rebuild's time and CPU while a projector, the API and a client asking board (a) in a loop
# run (the client's latencies over the whole rebuild, switch included), then FLUSHALL under the
# running projector and API and the time until the projection is whole again. Section "Rebuild
# and heal" of docs/benchmarks.md. FLUSHALL empties the whole Redis: run it where nothing else
# uses that Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/bench-run.sh
bench_run rebuild 1000000 "$@"
