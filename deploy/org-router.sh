#!/usr/bin/env bash
# Routes the board's requests to API instances by org: HAProxy (Debian's) hashing the x-org-id
# header that the page and the README's clients send (the API refuses one that disagrees with
# the token). One org's requests then reach one instance while it is up, so the fleet's index
# memory grows with the orgs, not with instances x orgs; consistent hashing moves only the
# orgs of an instance that is added or removed. Requests without the header are spread round
# robin. Health: GET /healthz every second, an instance out after 2 failures (not /readyz: an
# instance whose projection lags still answers, from MongoDB).
#
#   deploy/org-router.sh up DIR PORT API_ADDR...   write DIR/haproxy.cfg, start HAProxy on 127.0.0.1:PORT
#   deploy/org-router.sh down DIR                  stop it
# The same backend for Kubernetes (server-template over the API's headless Service) is in
# deploy/k8s/pipeline-board.yaml.
set -euo pipefail

config() { # port api_addr...
  local port=$1
  shift
  cat <<CFG
global
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend board
  bind 127.0.0.1:$port
  default_backend api
backend api
  # One org, one instance: the hash of x-org-id over the servers' weights, consistent.
  balance hdr(x-org-id)
  hash-type consistent
  option httpchk GET /healthz
  http-check expect status 200
  default-server inter 1s fall 2 rise 1
CFG
  local i=0 addr
  for addr in "$@"; do
    i=$((i + 1))
    echo "  server api$i $addr check"
  done
}

case "${1:-}" in
  up)
    dir=$2 port=$3
    shift 3
    [ $# -gt 0 ] || { echo "usage: $0 up DIR PORT API_ADDR..." >&2; exit 2; }
    command -v haproxy >/dev/null || { echo "[router] haproxy missing: run deploy/install-deps.sh" >&2; exit 1; }
    mkdir -p "$dir"
    config "$port" "$@" >"$dir/haproxy.cfg"
    haproxy -c -q -f "$dir/haproxy.cfg"
    haproxy -D -f "$dir/haproxy.cfg" -p "$dir/haproxy.pid"
    for _ in $(seq 100); do
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && { echo "[router] haproxy on 127.0.0.1:$port -> $*"; exit 0; }
      sleep 0.1
    done
    echo "[router] haproxy did not listen on $port" >&2
    exit 1
    ;;
  down)
    dir=$2
    [ -f "$dir/haproxy.pid" ] && kill "$(cat "$dir/haproxy.pid")" 2>/dev/null || true
    rm -f "$dir/haproxy.pid"
    ;;
  *) echo "usage: $0 up DIR PORT API_ADDR... | down DIR" >&2; exit 2 ;;
esac
