#!/usr/bin/env bash
# The public RFC 9111 conformance suite (http-tests/cache-tests) through `edge run`.
# Not part of CI: the suite and its runner are third-party and live outside this repository.
#   CACHE_TESTS_SUITE=/path/to/cache-tests  CACHE_TESTS_RUNNER=/path/to/run.sh  bench/cache_conformance.sh
# The runner starts the suite's origin on ORIGIN_PORT and prints "cache-tests: P passed, ...".
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CACHE_TESTS_SUITE:?set CACHE_TESTS_SUITE to a copy of http-tests/cache-tests (test-engine/, tests/, package.json)}"
: "${CACHE_TESTS_RUNNER:?set CACHE_TESTS_RUNNER to the runner script (run.sh PROXY_URL ORIGIN_PORT)}"
ORIGIN_PORT=${ORIGIN_PORT:-8999}
EDGE_PORT=${EDGE_PORT:-8998}
confdir=$(mktemp -d)
.venv/bin/edge run --origin "http://127.0.0.1:$ORIGIN_PORT" --listen "127.0.0.1:$EDGE_PORT" --confdir "$confdir" &
edge_pid=$!
trap 'kill -INT $edge_pid 2>/dev/null; wait $edge_pid 2>/dev/null; rm -rf "$confdir"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$EDGE_PORT) 2>/dev/null && break; sleep 0.1; done
export CACHE_TESTS_SUITE
bash "$CACHE_TESTS_RUNNER" "http://127.0.0.1:$EDGE_PORT" "$ORIGIN_PORT"
