#!/usr/bin/env bash
# Runs every check of the project on a fresh Debian machine where you are root:
# installs what the tests need (memcached, promtool, the Python packages), then runs
# ruff, mypy and pytest with coverage. The tests start their own servers on free
# loopback ports. Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v memcached >/dev/null 2>&1 || need_apt+=(memcached)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts the services it installs; the tests run their own instances.
  (service memcached stop || true) >/dev/null 2>&1
  (service prometheus stop || true) >/dev/null 2>&1
fi

echo "== installing cachechain and its test dependencies (pip)"
python3 -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff"
python3 -m ruff check cachechain tests examples benchmarks
python3 -m ruff format --check cachechain tests examples benchmarks

echo "== mypy (strict)"
python3 -m mypy

echo "== pytest"
python3 -m pytest --cov=cachechain --cov-report=term-missing "$@"
