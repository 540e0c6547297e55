"""What cachechain's backends may do differently from the frameworks' suites, test by test.

``--strict`` (:func:`strict_problems`) fails a run of a cachechain backend on anything
not listed here, and on anything listed here that no longer happens (so the lists only
ever hold what is true):

- :data:`EXPECTED_FAILURES`: tests a cachechain backend fails on purpose, each with the
  argument for the deviation and where the docs make it. None today: every test of the
  suites passes on every cachechain set-up.
- :data:`EXPECTED_SKIPS`: tests the suite itself skips for a cachechain backend, with
  the reason. Django's culling tests need the ``cull`` and ``zero_cull`` aliases
  (``MAX_ENTRIES``, ``CULL_FREQUENCY``), which Django's own test settings leave out for
  memcached and Redis and :mod:`tests.frameworks.django_cache_tests` leaves out for
  every backend but ``locmem``; cachechain's in-process layer evicts by its own
  ``maxsize`` (LRU), it has no cull settings.

Keys are ``(suite, test)``, with ``test`` as the results name it (``Class.test_method``,
pytest's ``Class.test[param]``); they apply to every cachechain backend.
"""

from __future__ import annotations

from tests.frameworks.results import SuiteResult

__all__ = ["EXPECTED_FAILURES", "EXPECTED_SKIPS", "strict_problems"]

_NO_CULL = (
    "Django leaves the cull aliases out for memcached and Redis (no MAX_ENTRIES or "
    "CULL_FREQUENCY); so does the harness for every backend but locmem"
)

#: ``(suite, test)`` -> the argument for failing it, and where the docs make it.
EXPECTED_FAILURES: dict[tuple[str, str], str] = {}

#: ``(suite, test)`` -> why the suite skips it on cachechain's backends.
EXPECTED_SKIPS: dict[tuple[str, str], str] = {
    ("django", "BackendCacheTests.test_cull"): _NO_CULL,
    ("django", "BackendCacheTests.test_cull_delete_when_store_empty"): _NO_CULL,
    ("django", "BackendCacheTests.test_zero_cull"): _NO_CULL,
}


def _listed(table: dict[tuple[str, str], str], suite: str) -> set[str]:
    return {test for (s, test) in table if s == suite}


def strict_problems(result: SuiteResult) -> list[str]:
    """What makes ``result`` (a run of a cachechain backend) fail ``--strict``: each
    failure or skip not listed above, and each listed one that did not happen (the
    list must be updated). One line each; empty when the run is as expected."""
    problems: list[str] = []
    failed, skipped = set(result.failed), set(result.skipped)
    expected_failed = _listed(EXPECTED_FAILURES, result.suite)
    expected_skipped = _listed(EXPECTED_SKIPS, result.suite)
    problems += [f"unexpected failure: {t}: {result.failed[t]}" for t in failed - expected_failed]
    problems += [f"unexpected skip: {t}: {result.skipped[t]}" for t in skipped - expected_skipped]
    problems += [
        f"listed as an expected failure but did not fail: {t} (update "
        "tests/frameworks/deviations.py and the docs)"
        for t in expected_failed - failed
    ]
    problems += [
        f"listed as an expected skip but was not skipped: {t} (update "
        "tests/frameworks/deviations.py)"
        for t in expected_skipped - skipped
    ]
    return sorted(problems)
