#!/usr/bin/env bash
# One Redis against the stack's Redis Cluster (3 primaries + 3 replicas on 7000-7005), every
# number from one run on one machine (never part of the tests):
#   deploy/cluster-bench.sh [contacts per org] [flags]   (default 50000; 6 orgs, spread over the shards)
# Ingest into the single Redis with 1 projector and into the cluster with 1 and 2 projectors;
# boards with wrk (32 connections, spread over the orgs) from an API on the single Redis, on the
# cluster's primaries and on its replicas, with Redis and API CPU per board. Section "Redis
# Cluster" of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/bench-run.sh
bench_run cluster 50000 "$@"
