#!/usr/bin/env bash
# Runs the frameworks' own cache test suites against cachechain's backends (issue 10):
# Django's tests/cache/tests.py (BaseCacheTests and the http-level classes), and
# Flask-Caching's and cachelib's generic backend tests, from the sdists of the installed
# versions, over an in-process L1 plus a real memcached; the stock backends run too, as
# the reference. Prints passed/total per suite and backend and every failing test.
#
# Needs the project's test dependencies (pip install -e '.[test]') and memcached on PATH
# (installed with apt when missing and we are root, as scripts/test.sh does). The sdists
# come from PyPI once (pip download) into .tools/frameworks/ (git-ignored).
# --strict (a step of scripts/test.sh) fails on any failure or skip of a cachechain run
# that tests/frameworks/deviations.py does not list.
# Usage: bash scripts/framework_suites.sh [--suite django|flask] [--backend NAME|all]
#        [--flush-diagnostic] [--strict] [-v]     (see python -m tests.frameworks.run -h)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v memcached >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "memcached is not on PATH: install it (Debian: apt-get install memcached)" >&2
    exit 2
  fi
  echo "== installing memcached (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends memcached >/dev/null
  # Debian starts the service it installs; the suites run their own instances.
  (service memcached stop || true) >/dev/null 2>&1
fi

exec python3 -m tests.frameworks.run "$@"
