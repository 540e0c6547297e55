"""Run the frameworks' own cache test suites against the backends; print a table.

``python -m tests.frameworks.run`` (from the repository root; ``scripts/framework_suites.sh``
is the usual way in):

1. fetches the sdists of the installed Django, Flask-Caching and cachelib with
   ``pip download --no-deps --no-binary :all:`` into ``.tools/frameworks/sdists`` (once;
   only PyPI is needed) and extracts the test files the suites use into
   ``.tools/frameworks/src/<project>-<version>/``;
2. runs each suite (``django``: Django's ``tests/cache/tests.py``; ``flask``:
   Flask-Caching's and cachelib's generic tests) against each backend in a process of
   its own, each with a fresh memcached on a free loopback port
   (:class:`tests.support.servers.MemcachedProcess`);
3. prints, per run, passed/total, and every failing test with a one-line cause.

By default the backends are the stock ones (the reference: ``locmem`` and
``pymemcache`` for Django, ``simple`` and ``memcached`` for Flask-Caching) and
``cachechain`` (L1 in memory over L2 on memcached; for Flask also
``cachechain-nosecret``); ``--backend all`` adds the L1-only and L2-only set-ups and
Django's default set-up (``cachechain-location``: servers in ``LOCATION``).

``--flush-diagnostic`` runs each cachechain set-up with memcached a second time, with
memcached flushed before every test (``flush`` column): what fails only without the
flush is due to state an earlier test left in memcached (``clear()`` not reaching it).
It is off by default since ``clear()`` reaches memcached: a ``flush_all`` under a live
chain also deletes its namespace generation and journal, so the chain starts a fresh
namespace at its next poll (within 40 ms) and drops what it wrote in between, and a
few timing-sensitive tests fail in those runs for that reason alone.

Logs and JSON results go to ``.tools/frameworks/runs/``. Exit status: 0 when every run
completed (whatever its failures), 1 for ``--strict`` problems, 2 when a run could not
complete. ``--strict`` (the gate ``scripts/test.sh`` runs) checks every cachechain run
without the flush against :mod:`tests.frameworks.deviations`: a failure or a skip that
is not listed there, or a listed one that did not happen, is a problem, and so is a run
of fewer tests than :data:`MIN_TESTS` (tests that went missing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tests.frameworks.backends import (
    DJANGO_BACKENDS,
    DJANGO_REFERENCE,
    FLASK_BACKENDS,
    FLASK_REFERENCE,
    SDIST_FILES,
    installed_version,
    needs_memcached,
    sdist_tests_dir,
)
from tests.frameworks.deviations import strict_problems
from tests.frameworks.results import SuiteResult
from tests.support.servers import MemcachedProcess

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "frameworks"
SUITES = {"django": DJANGO_BACKENDS, "flask": FLASK_BACKENDS}
DEFAULTS = {
    "django": (*DJANGO_REFERENCE, "cachechain"),
    "flask": (*FLASK_REFERENCE, "cachechain", "cachechain-nosecret"),
}
PROJECTS = {"django": ("django",), "flask": ("flask-caching", "cachelib")}
RUN_TIMEOUT = 900.0
#: Fewer tests than this in a run means some went missing (an import or collection
#: problem): Django 5.2's suite holds 103 of them here, Flask-Caching 2.5 with cachelib
#: 0.17 34.
MIN_TESTS = {"django": 100, "flask": 30}


# -- 1. the sdists ----------------------------------------------------------------------


def _find_sdist(sdists: Path, project: str, version: str) -> Path | None:
    wanted = {f"{project}-{version}.tar.gz", f"{project.replace('-', '_')}-{version}.tar.gz"}
    for path in sdists.glob("*.tar.gz"):
        if path.name.lower() in wanted:
            return path
    return None


def _download(sdists: Path, project: str, version: str) -> Path:
    sdists.mkdir(parents=True, exist_ok=True)
    print(f"== pip download {project}=={version} (sdist) into {sdists}", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            str(sdists),
            f"{project}=={version}",
        ],
        check=True,
    )
    found = _find_sdist(sdists, project, version)
    if found is None:
        raise RuntimeError(f"pip download left no {project}-{version}.tar.gz in {sdists}")
    return found


def _extract(archive: Path, wanted: tuple[str, ...], dest: Path) -> None:
    """Extract the regular files under ``wanted`` (paths below the sdist's top
    directory; a trailing ``/`` takes a whole directory) into ``dest``."""
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        count = 0
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = PurePosixPath(member.name).parts
                relative = PurePosixPath(*parts[1:]) if len(parts) > 1 else None
                if relative is None or not member.isfile() or ".." in relative.parts:
                    continue
                text = relative.as_posix()
                if not any(text == w or (w.endswith("/") and text.startswith(w)) for w in wanted):
                    continue
                source = tar.extractfile(member)
                assert source is not None
                target = stage.joinpath(*relative.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read())
                count += 1
        if count == 0:
            raise RuntimeError(f"{archive.name} holds none of {wanted}")
        stage.rename(dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def fetch(projects: set[str], sources: Path, sdists: Path) -> None:
    """Make sure the test files of each project's installed version are extracted."""
    sources.mkdir(parents=True, exist_ok=True)
    for project in sorted(projects):
        version = installed_version(project)
        dest = sdist_tests_dir(project, sources).parent
        if dest.is_dir():
            continue
        archive = _find_sdist(sdists, project, version) or _download(sdists, project, version)
        _extract(archive, SDIST_FILES[project][1], dest)
        print(f"== extracted {', '.join(SDIST_FILES[project][1])} into {dest}", flush=True)


# -- 2. the runs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One suite on one backend."""

    suite: str
    backend: str
    flush: bool = False

    @property
    def slug(self) -> str:
        return f"{self.suite}-{self.backend}" + ("-flush" if self.flush else "")

    def command(self, verbose: bool) -> list[str]:
        if self.suite == "django":
            return [
                sys.executable,
                "-m",
                "tests.frameworks.django_runner",
                "-v",
                "2" if verbose else "1",
            ]
        return [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            "tests/frameworks/pytest.ini",
            "-v" if verbose else "-q",
            "-rN",
            "tests/frameworks/flask_cache_tests.py",
        ]


def execute(run: Run, sources: Path, out_dir: Path, verbose: bool) -> SuiteResult:
    """Run ``run`` in its own process (with its own memcached); return its result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / f"{run.slug}.json"
    log_path = out_dir / f"{run.slug}.log"
    result_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "CACHECHAIN_FW_BACKEND": run.backend,
        "CACHECHAIN_FW_SOURCES": str(sources),
        "CACHECHAIN_FW_RESULT": str(result_path),
        "CACHECHAIN_FW_FLUSH": "1" if run.flush else "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    server = MemcachedProcess().start() if needs_memcached(run.backend) else None
    if server is not None:
        env["CACHECHAIN_FW_MEMCACHED"] = server.address
    started = time.monotonic()
    try:
        with log_path.open("wb") as log:
            proc = subprocess.run(
                run.command(verbose),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=RUN_TIMEOUT,
                check=False,
            )
        crashed = "" if result_path.is_file() else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        crashed = f"did not finish within {RUN_TIMEOUT:.0f} s"
    finally:
        if server is not None:
            server.stop()
    if crashed:
        return SuiteResult(
            suite=run.suite,
            backend=run.backend,
            flush=run.flush,
            seconds=round(time.monotonic() - started, 1),
            crashed=f"{crashed}, see {log_path.relative_to(ROOT)}",
        )
    result = SuiteResult.read(result_path)
    result.seconds = round(time.monotonic() - started, 1)  # the whole process
    return result


# -- 3. the table -----------------------------------------------------------------------


def table(results: list[SuiteResult]) -> str:
    """The counts, one row per run, then the failing tests of each run."""
    lines = [
        f"{'suite':<7} {'backend':<20} {'flush':<5} {'passed/total':>12} "
        f"{'skipped':>7} {'seconds':>7}"
    ]
    for r in results:
        counts = "crashed" if r.crashed else f"{r.passed}/{r.total}"
        lines.append(
            f"{r.suite:<7} {r.backend:<20} {'yes' if r.flush else '-':<5} {counts:>12} "
            f"{len(r.skipped):>7} {r.seconds:>7.1f}"
        )
    for r in results:
        if not (r.failed or r.crashed):
            continue
        flush = ", memcached flushed before each test" if r.flush else ""
        lines += ["", f"{r.suite} / {r.backend}{flush}: {len(r.failed)} failing"]
        if r.crashed:
            lines.append(f"  the run did not complete: {r.crashed}")
        lines += [f"  {test}: {cause}" for test, cause in sorted(r.failed.items())]
    return "\n".join(lines)


def _plan(suites: list[str], backends: list[str], flush_diagnostic: bool) -> list[Run]:
    runs: list[Run] = []
    for suite in suites:
        if not backends:
            chosen = list(DEFAULTS[suite])
        elif "all" in backends:
            chosen = list(SUITES[suite])
        else:
            chosen = [b for b in backends if b in SUITES[suite]]
        for backend in chosen:
            runs.append(Run(suite, backend))
            if flush_diagnostic and backend.startswith("cachechain") and needs_memcached(backend):
                runs.append(Run(suite, backend, flush=True))
    return runs


def main(argv: list[str] | None = None) -> int:
    """Fetch, run, print; return the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.frameworks.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), default=[])
    parser.add_argument(
        "--backend",
        action="append",
        default=[],
        choices=sorted({"all", *DJANGO_BACKENDS, *FLASK_BACKENDS}),
        help="repeat for several; 'all' for every backend (default: reference + cachechain)",
    )
    parser.add_argument(
        "--flush-diagnostic",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also run the cachechain set-ups with memcached flushed before each test",
    )
    parser.add_argument("--sources", type=Path, default=TOOLS / "src")
    parser.add_argument("--sdists", type=Path, default=TOOLS / "sdists")
    parser.add_argument("--out", type=Path, default=TOOLS / "runs")
    parser.add_argument("--fetch-only", action="store_true")
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="per-test lines in the logs")
    args = parser.parse_args(argv)

    suites = args.suite or sorted(SUITES)
    fetch({p for s in suites for p in PROJECTS[s]}, args.sources.resolve(), args.sdists)
    if args.fetch_only:
        return 0
    results: list[SuiteResult] = []
    for run in _plan(suites, args.backend, args.flush_diagnostic):
        print(f"== {run.suite} on {run.backend}{' (flush)' if run.flush else ''}", flush=True)
        result = execute(run, args.sources.resolve(), args.out, args.verbose)
        status = result.crashed or f"{result.passed}/{result.total} passed"
        print(f"   {status} in {result.seconds:.1f} s", flush=True)
        results.append(result)
    print()
    print(table(results))
    if any(r.crashed for r in results):
        return 2
    if not args.strict:
        return 0
    problems = _strict(results)
    print()
    if problems:
        print("--strict: " + "\n--strict: ".join(problems))
        return 1
    print("--strict: every cachechain run is as expected (tests/frameworks/deviations.py)")
    return 0


def _strict(results: list[SuiteResult]) -> list[str]:
    """The ``--strict`` problems of the cachechain runs without the flush, one line
    each, prefixed with the run."""
    problems: list[str] = []
    for r in results:
        if not r.backend.startswith("cachechain") or r.flush:
            continue
        found = strict_problems(r)
        if r.total < MIN_TESTS[r.suite]:
            found.append(f"only {r.total} tests ran (at least {MIN_TESTS[r.suite]} expected)")
        problems += [f"{r.suite} / {r.backend}: {line}" for line in found]
    return problems


if __name__ == "__main__":
    sys.exit(main())
