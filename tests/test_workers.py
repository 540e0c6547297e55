"""Many processes, one cache (issue 10, point 5): the Django and Flask example apps under
gunicorn, 4 workers (sync; gthread with 4 threads and ``--preload``, so the chain is
built in the master and its threads restarted in each forked worker) over one real
memcached, driven by ``scripts/load_workers.py``.

Each configuration is served once (a fresh memcached, then gunicorn, then every check,
a few seconds) and each check is reported by its own test: the lock pattern, the
counter, a set / delete / clear seen by every worker within the bound (100 ms), Django's
cache-backed sessions (in the default alias, and in an alias without the in-process
layer), and nothing raising. The judge of "seen within the bound"
(:func:`load_workers.evaluate`) and the log screen are tested on their own.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.support.gunicorn import log_problems, log_warnings


def _load_script() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "scripts" / "load_workers.py"
    spec = importlib.util.spec_from_file_location("load_workers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


lw = _load_script()

#: (framework, worker class, --preload): each framework under both worker classes.
RUNS = [
    ("django", "sync", False),
    ("django", "gthread", True),
    ("flask", "sync", False),
    ("flask", "gthread", True),
]
#: Seconds per memcached call in the workers. The example's 0.1 s is passed now and then
#: on 2 busy cores (about 1 call in 5,000 here): a timed-out ``add`` grants no lock and a
#: timed-out ``incr`` reports no count, as documented, and the checks would fail for the
#: machine's load rather than for what they check. ``scripts/load_workers.py`` keeps 0.1.
MEMCACHED_TIMEOUT = 1.0
_OUTCOMES: dict[tuple[str, str, bool], Any] = {}


def _outcome(run: tuple[str, str, bool]) -> Any:
    """The checks of ``run``, served once for the whole module."""
    if run not in _OUTCOMES:
        framework, worker_class, preload = run
        setup = lw.Setup(
            framework,
            worker_class=worker_class,
            preload=preload,
            rounds=3,
            memcached_timeout=MEMCACHED_TIMEOUT,
        )
        _OUTCOMES[run] = lw.serve_and_check(setup)
    return _OUTCOMES[run]


def _ids(run: tuple[str, str, bool]) -> str:
    framework, worker_class, preload = run
    return f"{framework}-{worker_class}" + ("-preload" if preload else "")


def _assert_passed(run: tuple[str, str, bool], name: str) -> None:
    outcome = _outcome(run)
    checks = {c.name: c for c in outcome.checks}
    check = checks.get(name)
    assert check is not None and check.ok, lw.report(outcome)


# -- the checks under gunicorn ---------------------------------------------------------


@pytest.mark.memcached
@pytest.mark.parametrize("run", RUNS, ids=_ids)
def test_add_as_a_lock_has_one_winner_per_key(run: tuple[str, str, bool]) -> None:
    _assert_passed(run, "lock")


@pytest.mark.memcached
@pytest.mark.parametrize("run", RUNS, ids=_ids)
def test_400_increments_across_workers_count_400_in_every_worker(
    run: tuple[str, str, bool],
) -> None:
    _assert_passed(run, "counter")


@pytest.mark.memcached
@pytest.mark.parametrize("run", RUNS, ids=_ids)
@pytest.mark.parametrize("op", ["set", "delete", "clear"])
def test_a_change_in_one_worker_is_seen_by_every_worker_within_the_bound(
    run: tuple[str, str, bool], op: str
) -> None:
    _assert_passed(run, op)


@pytest.mark.memcached
@pytest.mark.parametrize("run", [r for r in RUNS if r[0] == "django"], ids=_ids)
def test_cache_sessions_survive_cart_updates_and_logout_across_workers(
    run: tuple[str, str, bool],
) -> None:
    _assert_passed(run, "sessions")


@pytest.mark.memcached
@pytest.mark.parametrize("run", RUNS, ids=_ids)
def test_nothing_raises_in_the_workers(run: tuple[str, str, bool]) -> None:
    _assert_passed(run, "errors")


@pytest.mark.memcached
def test_sessions_in_an_alias_without_the_in_process_layer_survive_across_workers() -> None:
    setup = lw.Setup(
        "django",
        session_cache="shared",
        memcached_timeout=MEMCACHED_TIMEOUT,
        only=("sessions",),
    )
    outcome = lw.serve_and_check(setup)
    assert [c.name for c in outcome.checks] == ["sessions", "errors"], lw.report(outcome)
    assert outcome.ok, lw.report(outcome)


# -- the judge and the log screen ------------------------------------------------------


def _reply(pid: int, started: float, ended: float) -> Any:
    return lw.Reply(200, {"pid": pid}, started, ended)


def test_a_stale_reply_to_a_request_sent_past_the_bound_fails() -> None:
    replies = [
        (_reply(1, 1.01, 1.02), True),
        (_reply(2, 1.05, 1.06), False),  # stale, but within the bound
        (_reply(2, 1.15, 1.16), False),  # stale, sent 150 ms after: late
        (_reply(2, 1.17, 1.18), True),
    ]
    seen = lw.evaluate(replies, {1, 2}, t0=1.0, bound=0.1)
    assert not seen.ok
    assert seen.late == [(2, pytest.approx(0.15))]
    assert seen.lags == {1: pytest.approx(0.02), 2: pytest.approx(0.18)}
    assert "1 stale replies from 1 worker(s)" in seen.describe()


def test_a_worker_that_never_gave_a_fresh_reply_fails() -> None:
    replies = [(_reply(1, 1.01, 1.02), True), (_reply(2, 1.03, 1.04), False)]
    seen = lw.evaluate(replies, {1, 2, 3}, t0=1.0, bound=0.1)
    assert seen.unseen == {2, 3}
    assert not seen.ok


def test_every_worker_fresh_within_the_bound_passes_and_reports_its_lag() -> None:
    replies = [
        (_reply(2, 1.06, 1.07), True),
        (_reply(1, 1.00, 1.01), False),
        (_reply(1, 1.02, 1.03), True),
        (_reply(2, 1.01, 1.02), False),
    ]
    seen = lw.evaluate(replies, {1, 2}, t0=1.0, bound=0.1, read=lambda r: r.pid)
    assert seen.ok and seen.describe() == ""
    assert seen.lags == {1: pytest.approx(0.03), 2: pytest.approx(0.07)}
    assert seen.first == {1: 1, 2: 2}


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert lw.percentile(values, 0.5) == 50.0
    assert lw.percentile(values, 0.99) == 99.0
    assert lw.percentile(values, 1.0) == 100.0
    assert lw.percentile([3.0], 0.5) == 3.0
    assert lw.lag_text([0.012, 0.041]) == "lag p50 12 ms, p99 41 ms, max 41 ms (n=2)"


def test_the_log_screen_fails_errors_and_lists_warnings() -> None:
    log = "\n".join(
        [
            "[2024-01-01 00:00:00 +0000] [10] [INFO] Booting worker with pid: 10",
            "[2024-01-01 00:00:01 +0000] [10] [ERROR] Exception in worker process",
            "Traceback (most recent call last):",
            "[2024-01-01 00:00:02 +0000] [9] [WARNING] Worker with pid 10 was terminated",
            "[2024-01-01 00:00:02 +0000] [9] [CRITICAL] WORKER TIMEOUT (pid:10)",
            "cachechain: layer 'L2' failed",
            "[ERROR] django.request: Internal Server Error: /load/incr",
            "[WARNING] cachechain: coherence: poll failed: LayerTimeoutError()",
            "",
        ]
    )
    lines = log.splitlines()
    assert log_problems(log) == lines[1:7]
    assert log_warnings(log) == [lines[7]]


def test_the_session_cookie_is_read_from_set_cookie() -> None:
    headers = ["csrftoken=x; Path=/", "sessionid=abc123; expires=Thu; HttpOnly; Path=/"]
    assert lw._session_cookie(headers) == "abc123"
    assert lw._session_cookie(["other=1"]) is None
