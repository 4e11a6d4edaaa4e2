#!/usr/bin/env bash
# Installs everything the local stack and the build need, idempotently, cached outside the clone
# (PIPELINE_BOARD_HOME, default ~/.cache/pipeline-board). Safe to run on every CI run: each step
# checks before it acts.
#   - Debian packages: Redis, PostgreSQL, the build dependencies of the bundled librdkafka, wrk,
#     HAProxy (deploy/org-router.sh).
#   - Apache Kafka: the broker jars from Maven Central (deploy/kafka/pom.xml) in $STATE_DIR/kafka/libs.
#   - FerretDB: `go install` of the pinned version into $STATE_DIR/bin.
#   - Headless Chromium (Debian's) and playwright-core (npm, tests/browser) for the browser tests.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${PIPELINE_BOARD_HOME:-$HOME/.cache/pipeline-board}"
FERRETDB_VERSION="${FERRETDB_VERSION:-v1.24.2}"
mkdir -p "$STATE_DIR/bin"

APT_PKGS=(cmake libcurl4-openssl-dev libssl-dev libsasl2-dev zlib1g-dev libzstd-dev pkg-config
  redis-server redis-tools postgresql wrk chromium haproxy)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[install] apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts a system Redis, PostgreSQL and HAProxy on install; the stack runs its own.
  systemctl disable --now redis-server postgresql haproxy >/dev/null 2>&1 || true
  service redis-server stop >/dev/null 2>&1 || true
  service postgresql stop >/dev/null 2>&1 || true
  service haproxy stop >/dev/null 2>&1 || true
fi

# Apache Kafka from Maven Central. The stamp names the pom's hash so a version bump re-resolves.
KAFKA_LIBS="$STATE_DIR/kafka/libs"
stamp="$KAFKA_LIBS/.pom-$(sha256sum "$HERE/kafka/pom.xml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[install] kafka broker jars (Maven Central)"
  # Resolved into a new folder and moved in place: an interrupted download leaves no half set.
  rm -rf "$KAFKA_LIBS.new"
  mvn -q -B -f "$HERE/kafka/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$KAFKA_LIBS.new" -DincludeScope=runtime
  rm -rf "$KAFKA_LIBS" && mv "$KAFKA_LIBS.new" "$KAFKA_LIBS"
  touch "$stamp"
fi

# FerretDB (MongoDB wire protocol on PostgreSQL), built from its module source by the Go toolchain.
# A plain `go install ...@version` builds a binary that panics at start: the module lacks the
# generated build/version/version.txt, which FerretDB's release build writes (`git describe`). So
# the module is downloaded, copied, given that file, and built.
if ! "$STATE_DIR/bin/ferretdb" --version 2>/dev/null | grep -q "${FERRETDB_VERSION#v}"; then
  echo "[install] ferretdb $FERRETDB_VERSION (Go module source)"
  src="$(cd "$STATE_DIR" && go mod download -json "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  build="$STATE_DIR/ferretdb-src"
  rm -rf "$build" && cp -r "$src" "$build" && chmod -R u+w "$build"
  echo "$FERRETDB_VERSION" >"$build/build/version/version.txt"
  (cd "$build" && go build -trimpath -o "$STATE_DIR/bin/ferretdb.new" ./cmd/ferretdb)
  mv "$STATE_DIR/bin/ferretdb.new" "$STATE_DIR/bin/ferretdb"
  rm -rf "$build"
fi
# The browser tests' driver (playwright-core: no browser of its own, it drives Debian's chromium).
BROWSER_TESTS="$HERE/../tests/browser"
if [ ! -f "$BROWSER_TESTS/node_modules/.package-lock.json" ] || ! cmp -s "$BROWSER_TESTS/package-lock.json" "$BROWSER_TESTS/node_modules/.lock-installed"; then
  echo "[install] playwright-core (npm ci in tests/browser)"
  (cd "$BROWSER_TESTS" && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.lock-installed)
fi
echo "[install] done"
