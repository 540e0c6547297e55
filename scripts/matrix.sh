#!/usr/bin/env bash
# Runs mypy (strict) and pytest on every other supported Python (issue 11): 3.10, 3.12
# and 3.13; 3.11, the machine's default, is the main run of scripts/test.sh, which calls
# this script last. For each version it creates (or reuses) a venv in .tools/venvs/pyX.Y
# (git-ignored) from pyenv's interpreter, installs the package with its test extras, the
# cachechain-statsd plugin and the example exporter, then runs
#   mypy --python-version X.Y          (strict, as configured in pyproject.toml)
#   pytest -q -p no:cacheprovider      (no coverage: the main run measures it)
# A missing interpreter is installed with `pyenv install` when pyenv is there; otherwise
# the script fails: a version skipped is a version not tested.
#
# Needs what scripts/test.sh installs first: memcached, and the StatsD daemon in
# .tools/statsd. Versions run MATRIX_JOBS at a time (default 2), each in a network
# namespace of its own when `unshare` works (as root), so the servers the tests start on
# "free" loopback ports cannot meet those of the other run. Logs go to
# .tools/venvs/pyX.Y/last-run.log and are printed when a run ends.
# Usage: bash scripts/matrix.sh [X.Y ...]      (default: 3.10 3.12 3.13)
#        MATRIX_JOBS=1 bash scripts/matrix.sh  (one version at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CHECK_ONE=""
if [ "${1:-}" = --check-one ]; then  # internal: the checks of one version (run_one)
  CHECK_ONE=$2
  shift 2
fi
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.10 3.12 3.13)
JOBS=${MATRIX_JOBS:-2}
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
VENVS=$ROOT/.tools/venvs

die() {
  echo "matrix: $*" >&2
  exit 1
}

# ---- preconditions: the servers the tests start ------------------------------------------
command -v memcached >/dev/null 2>&1 ||
  die "memcached is not on PATH (scripts/test.sh installs it)"
[ -f .tools/statsd/node_modules/statsd/stats.js ] ||
  die "the StatsD daemon is not in .tools/statsd (scripts/test.sh installs it)"

# ---- the interpreters ---------------------------------------------------------------------

# Prints the newest pyenv interpreter X.Y.N for version X.Y (final releases only: not
# 3.13.0t, 3.13-dev or 3.13.0rc1), or nothing.
find_python() {
  local want=$1 dir name best=""
  for dir in "$PYENV_ROOT"/versions/"$want".*; do
    name=${dir##*/}
    [[ $name =~ ^${want//./\\.}\.[0-9]+$ ]] || continue
    [ -x "$dir/bin/python3" ] || continue
    best=$(printf '%s\n%s\n' "$best" "$name" | sed '/^$/d' | sort -V | tail -n 1)
  done
  [ -n "$best" ] && echo "$PYENV_ROOT/versions/$best/bin/python3"
  return 0
}

# Prints the interpreter for X.Y, installing it with pyenv when it is missing; fails if
# it cannot be had.
python_for() {
  local want=$1 python pyenv_bin latest
  python=$(find_python "$want")
  if [ -z "$python" ]; then
    pyenv_bin=$(command -v pyenv || true)
    [ -n "$pyenv_bin" ] || [ ! -x "$PYENV_ROOT/bin/pyenv" ] || pyenv_bin=$PYENV_ROOT/bin/pyenv
    [ -n "$pyenv_bin" ] ||
      die "Python $want is not in $PYENV_ROOT/versions and pyenv is not installed"
    latest=$(PYENV_ROOT=$PYENV_ROOT "$pyenv_bin" latest --known "$want") ||
      die "pyenv knows no Python $want"
    echo "== Python $want is missing: pyenv install $latest" >&2
    PYENV_ROOT=$PYENV_ROOT "$pyenv_bin" install --skip-existing "$latest" >&2 ||
      die "pyenv install $latest failed"
    python=$(find_python "$want")
    [ -n "$python" ] || die "pyenv installed $latest but no $PYENV_ROOT/versions/$want.*/bin/python3"
  fi
  "$python" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" ||
    die "$python is not Python $want"
  echo "$python"
}

# ---- one version: venv, install, mypy, pytest --------------------------------------------

# What the editable installs depend on: when none of it changed, pip is not run again.
install_inputs() {
  cat pyproject.toml plugins/cachechain-statsd/pyproject.toml \
    examples/custom_exporter/pyproject.toml 2>/dev/null
}

# Sets up the venv for X.Y with interpreter $2 (runs in the foreground, one at a time:
# pip's downloads and builds are what a second run would wait for anyway).
prepare() {
  local want=$1 python=$2 venv=$VENVS/py$1 stamp
  # Reuse the venv only if it was made from this very interpreter (a pyenv upgrade from
  # 3.10.13 to 3.10.14 leaves a venv whose python no longer starts).
  if [ -d "$venv" ] && ! { [ -x "$venv/bin/python" ] &&
    [ "$(cat "$venv/.base-python" 2>/dev/null)" = "$python" ] &&
    "$venv/bin/python" -c 'pass' 2>/dev/null; }; then
    echo "== py$want: venv is stale, recreating it"
    rm -rf "$venv"
  fi
  if [ ! -d "$venv" ]; then
    echo "== py$want: creating $venv from $python"
    "$python" -m venv "$venv"
    echo "$python" >"$venv/.base-python"
  fi
  stamp=$( (echo "$python"; install_inputs) | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$stamp" ]; then
    echo "== py$want: installing -e '.[test]', the statsd plugin and the example exporter"
    rm -f "$venv/.installed"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
      -e '.[test]' -e ./plugins/cachechain-statsd -e ./examples/custom_exporter
    echo "$stamp" >"$venv/.installed"
  fi
  "$venv/bin/python" -m pip check --disable-pip-version-check >/dev/null ||
    die "py$want: pip check found broken dependencies"
}

# Runs the checks of X.Y; its output goes to the log. Run inside its own network
# namespace when one is available (see NETNS below).
check_version() {
  local want=$1 venv=$VENVS/py$1 tmp status=0
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/cachechain-py$want.XXXXXX")
  echo "== py$want: $("$venv/bin/python" -VV)"
  "$venv/bin/python" - <<'EOF'
from importlib.metadata import version
names = ["cachetools", "pymemcache", "pluggy", "prometheus-client", "Django", "Flask",
         "Flask-Caching", "mypy", "pytest", "hypothesis", "cachechain-statsd"]
print("   ", ", ".join(f"{name} {version(name)}" for name in names))
EOF
  echo "== py$want: mypy --python-version $want"
  "$venv/bin/python" -m mypy --python-version "$want" \
    --cache-dir "$venv/mypy_cache" || status=1
  echo "== py$want: pytest"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider --basetemp "$tmp/pytest" || status=1
  rm -rf "$tmp"
  return $status
}
if [ -n "$CHECK_ONE" ]; then
  check_version "$CHECK_ONE"
  exit
fi

# Brings up loopback in a fresh network namespace, then runs the rest of the command.
NETNS=()
if [ "${MATRIX_NETNS:-1}" = 1 ] &&
  unshare --net sh -c 'ip link set lo up' >/dev/null 2>&1; then
  NETNS=(unshare --net sh -c 'ip link set lo up && exec "$@"' netns)
fi

# ---- the matrix ---------------------------------------------------------------------------

mkdir -p "$VENVS"
declare -A PYTHON
for want in "${VERSIONS[@]}"; do
  PYTHON[$want]=$(python_for "$want")
done

started=$SECONDS
for want in "${VERSIONS[@]}"; do
  t0=$SECONDS
  prepare "$want" "${PYTHON[$want]}"
  echo "== py$want: venv ready in $((SECONDS - t0)) s"
done

# Runs the checks of X.Y into its log and records the exit status and time.
run_one() {
  local want=$1 venv=$VENVS/py$1 t0=$SECONDS status=0
  "${NETNS[@]}" bash "$ROOT/scripts/matrix.sh" --check-one "$want" >"$venv/last-run.log" 2>&1 ||
    status=$?
  echo "$status $((SECONDS - t0))" >"$venv/last-run.status"
}

echo "== running ${VERSIONS[*]}, $JOBS at a time$([ ${#NETNS[@]} -gt 0 ] && echo ', each in its own network namespace')"
pids=()
for want in "${VERSIONS[@]}"; do
  rm -f "$VENVS/py$want/last-run.status"
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  run_one "$want" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done

failed=()
summary=()
for want in "${VERSIONS[@]}"; do
  venv=$VENVS/py$want
  echo
  echo "======== Python $want (log: ${venv#"$ROOT"/}/last-run.log)"
  cat "$venv/last-run.log"
  read -r status seconds <"$venv/last-run.status" || status=1 seconds=?
  if [ "$status" = 0 ]; then
    summary+=("py$want: passed in ${seconds} s")
  else
    summary+=("py$want: FAILED (exit $status) after ${seconds} s")
    failed+=("$want")
  fi
done
echo
echo "== matrix summary (wall $((SECONDS - started)) s, $JOBS at a time)"
printf '   %s\n' "${summary[@]}"
[ ${#failed[@]} -eq 0 ] || die "failed on Python ${failed[*]}"
