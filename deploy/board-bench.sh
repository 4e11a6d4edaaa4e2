#!/usr/bin/env bash
# The board page at scale (never part of the tests), one run:
#   deploy/board-bench.sh [contacts] [flags]     (default 1000000 contacts in one org, ~3 messages each)
# The time from the API's answer to the rendered board in headless Chromium (5 loads), what one
# idle open board costs the server (requests per minute, share answered 304), and a column poll
# answered 304 against 200 (wrk, 1 and 32 connections) with the API's and Redis' CPU per poll.
# Section "The board page" of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/bench-run.sh
bench_run page 1000000 "$@"
