"""The ``--strict`` gate of the framework suites (tests/frameworks/run.py): what fails it.

The suites themselves run with ``scripts/framework_suites.sh`` (a step of
``scripts/test.sh``); this checks, on made-up results, that the gate fails on every
failure or skip not listed in tests/frameworks/deviations.py, on a listed one that did
not happen, and on a run that lost tests.
"""

from __future__ import annotations

import pytest

from tests.frameworks import deviations, run
from tests.frameworks.results import SuiteResult

CULL = sorted(test for suite, test in deviations.EXPECTED_SKIPS if suite == "django")


def result(suite: str = "django", backend: str = "cachechain", **fields: object) -> SuiteResult:
    made = SuiteResult(suite=suite, backend=backend, total=103, passed=100)
    if suite == "django":
        made.skipped = {test: "Culling isn't implemented." for test in CULL}
    for name, value in fields.items():
        setattr(made, name, value)
    return made


def test_a_run_as_expected_passes() -> None:
    assert deviations.strict_problems(result()) == []
    assert run._strict([result(), result("flask", total=34, passed=34)]) == []


def test_an_unlisted_failure_or_skip_fails_the_gate() -> None:
    failing = result(failed={"BackendCacheTests.test_clear": "AssertionError: 'spam'"})
    assert deviations.strict_problems(failing) == [
        "unexpected failure: BackendCacheTests.test_clear: AssertionError: 'spam'"
    ]
    skipping = result(skipped={**result().skipped, "CacheUtils.test_x": "no reason"})
    assert deviations.strict_problems(skipping) == ["unexpected skip: CacheUtils.test_x: no reason"]
    # the same skips are not expected of Flask's suite
    assert deviations.strict_problems(result("flask", skipped={CULL[0]: "r"})) == [
        f"unexpected skip: {CULL[0]}: r"
    ]


def test_a_listed_deviation_that_did_not_happen_fails_the_gate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(deviations.EXPECTED_FAILURES, ("django", "T.test_argued"), "see docs")
    assert deviations.strict_problems(result(failed={"T.test_argued": "AssertionError"})) == []
    (problem,) = deviations.strict_problems(result())
    assert problem.startswith("listed as an expected failure but did not fail: T.test_argued")
    monkeypatch.delitem(deviations.EXPECTED_FAILURES, ("django", "T.test_argued"))
    problems = deviations.strict_problems(result(skipped={}))
    assert problems == [
        f"listed as an expected skip but was not skipped: {test} (update "
        "tests/frameworks/deviations.py)"
        for test in CULL
    ]


def test_only_cachechain_runs_without_the_flush_are_gated_and_lost_tests_count() -> None:
    broken = {"failed": {"T.t": "AssertionError"}}
    assert run._strict([result(backend="pymemcache", **broken)]) == []
    assert run._strict([result(flush=True, **broken)]) == []
    assert run._strict([result(**broken)]) == [
        "django / cachechain: unexpected failure: T.t: AssertionError"
    ]
    assert run._strict([result("flask", total=0, passed=0)]) == [
        "flask / cachechain: only 0 tests ran (at least 30 expected)"
    ]
