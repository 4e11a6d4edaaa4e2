#!/usr/bin/env bash
# The many-org benchmark (never part of the tests), every number from one run on one machine:
#   deploy/saas-bench.sh [scale] [flags]   (default 1: seed --profile saas, 1 x 1M + 20 x 50k +
#                                           2,000 x 500 + 10,000 x 20 contacts; 0.1 for a tenth)
# Seed and ingest rates, Redis bytes per card, the first index board per size class cold and
# warm, a sweep of every org's index board (API RSS and index bytes against INDEX_MEMORY_LIMIT),
# boards per size class at 1 and 32 connections, a small org's p99 while the big org is
# hammered. Section "Many orgs" of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/bench-run.sh
scale="${1:-1}"
[ $# -gt 0 ] && shift
bench_run saas "" --scale "$scale" "$@"
