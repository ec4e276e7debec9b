#!/usr/bin/env bash
# On-demand benchmarks (not part of CI). Installs wrk and nginx from Debian if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null || ! { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; }; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
fi
exec .venv/bin/python bench/bench.py "$@"
