#!/usr/bin/env bash
# Runs every check of the project on a fresh Debian machine where you are root:
# installs what the tests need (memcached, promtool, the Python packages), then runs
# ruff, mypy and pytest with coverage. The tests start their own servers on free
# loopback ports. Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v memcached >/dev/null 2>&1 || need_apt+=(memcached)
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need_apt+=(prometheus)
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

# ---- exporter plugins (issue 5): the StatsD daemon, the plugin, the example ------------
# Etsy's StatsD daemon (npm package statsd) receives the tests' metrics; it goes into
# .tools/statsd (git-ignored). cachechain-statsd and the example exporter are installed
# the way users install them, so the tests find them through their entry points.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "== installing nodejs and npm (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ ! -f .tools/statsd/node_modules/statsd/stats.js ]; then
  echo "== installing the StatsD daemon (npm statsd@0.9.0 into .tools/statsd)"
  npm install --prefix .tools/statsd --no-audit --no-fund --loglevel=error statsd@0.9.0 >/dev/null
fi
echo "== installing cachechain-statsd and the example exporter (pip)"
python3 -m pip install -q --disable-pip-version-check \
  -e ./plugins/cachechain-statsd -e ./examples/custom_exporter
# ---- end of the exporter plugins block ---------------------------------------------------

echo "== ruff"
python3 -m ruff check cachechain tests examples benchmarks scripts
python3 -m ruff format --check cachechain tests examples benchmarks scripts

echo "== shape (no function above complexity 15, no class above 400 lines)"
python3 scripts/check_shape.py cachechain plugins/cachechain-statsd/src

echo "== mypy (strict)"
python3 -m mypy

echo "== pytest"
python3 -m pytest --cov=cachechain --cov-report=term-missing "$@"

# ---- exporter plugins (issue 5): cachechain-statsd's own checks and coverage gate -------
echo "== cachechain-statsd: ruff, mypy (strict), pytest (coverage >= 90%)"
python3 -m ruff check plugins/cachechain-statsd
python3 -m ruff format --check plugins/cachechain-statsd
python3 -m mypy --config-file plugins/cachechain-statsd/pyproject.toml \
  plugins/cachechain-statsd/src/cachechain_statsd
(cd plugins/cachechain-statsd && python3 -m pytest --cov=cachechain_statsd --cov-report=term-missing)
# ---- end of the cachechain-statsd block --------------------------------------------------

# ---- framework suites (issue 10): Django's and Flask-Caching's own cache tests ----------
# Django's tests/cache and Flask-Caching's and cachelib's generic tests, from their sdists,
# against cachechain's backends over an in-process layer and a real memcached (about a
# minute; the stock backends are left out: run the script without flags for the table
# beside them). --strict fails on any failure or skip that tests/frameworks/deviations.py
# does not list.
echo "== framework suites (scripts/framework_suites.sh --strict)"
bash scripts/framework_suites.sh --strict \
  --backend cachechain --backend cachechain-location --backend cachechain-nosecret
# ---- end of the framework suites block ----------------------------------------------------

# ---- supported Pythons (issue 11): mypy and pytest on 3.10, 3.12 and 3.13 ------------------
# 3.11 is the run above; the others run in venvs under .tools/venvs (see scripts/matrix.sh).
echo "== other supported Pythons: 3.10, 3.12, 3.13 (scripts/matrix.sh)"
bash scripts/matrix.sh
# ---- end of the supported Pythons block -----------------------------------------------------
