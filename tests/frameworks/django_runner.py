"""Run Django's cache tests on one backend with Django's own test runner.

``python -m tests.frameworks.django_runner [LABEL ...]`` with the environment of
:mod:`tests.frameworks.backends` (``tests.frameworks.run`` sets it). The labels default
to the whole of :mod:`tests.frameworks.django_cache_tests`; give
``tests.frameworks.django_cache_tests.BackendCacheTests.test_clear`` to run one test.
Django's ``DiscoverRunner`` sets up the test environment and the (SQLite, in-memory)
test database, as Django's ``runtests.py`` does; the result goes to
``CACHECHAIN_FW_RESULT`` as JSON (:class:`tests.frameworks.results.SuiteResult`).
Exits 0 when every test passed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import unittest
from typing import Any

from tests.frameworks.backends import DJANGO_BACKENDS, flush_requested, sdist_tests_dir
from tests.frameworks.results import SuiteResult, one_line

DEFAULT_LABEL = "tests.frameworks.django_cache_tests"


def _test_name(test: Any) -> str:
    """``Class.test_method`` of a test (or of the test a subtest belongs to)."""
    test = getattr(test, "test_case", test)  # a _SubTest
    return f"{type(test).__name__}.{getattr(test, '_testMethodName', str(test))}"


def _cause(err: Any) -> str:
    exc_type, exc, _ = err
    return one_line(exc_type.__name__, str(exc))


class _RecordingResult(unittest.TextTestResult):
    """A text result that also keeps one line per failed test, for the JSON result."""

    record: SuiteResult

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self.record.add_failure(_test_name(test), _cause(err))

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self.record.add_failure(_test_name(test), _cause(err))

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            describe = getattr(subtest, "_subDescription", None)  # "(key='x')"
            described = describe() if callable(describe) else str(subtest)
            self.record.add_failure(_test_name(test), f"{described} {_cause(err)}")

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self.record.skipped[_test_name(test)] = reason

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self.record.add_failure(_test_name(test), "unexpected success")


def _runner_class(record: SuiteResult) -> type:
    from django.test.runner import DiscoverRunner

    class Runner(DiscoverRunner):  # type: ignore[misc]
        def get_resultclass(self) -> type:
            return type("Result", (_RecordingResult,), {"record": record})

        def suite_result(self, suite: Any, result: Any, **kwargs: Any) -> Any:
            record.total = result.testsRun  # the suite is emptied as it runs
            record.passed = record.total - len(record.failed) - len(record.skipped)
            return super().suite_result(suite, result, **kwargs)

    return Runner


def django_tests_dir() -> str:
    """The ``tests`` directory of the installed Django's sdist, as extracted."""
    path = sdist_tests_dir("django")
    if not (path / "cache" / "tests.py").is_file():
        raise RuntimeError(f"{path}/cache/tests.py is missing: run scripts/framework_suites.sh")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    """Run the labels; write the JSON result; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="*", default=[DEFAULT_LABEL])
    parser.add_argument("-v", "--verbosity", type=int, default=1)
    args = parser.parse_args(argv)

    backend = os.environ.get("CACHECHAIN_FW_BACKEND", "")
    record = SuiteResult(suite="django", backend=backend, flush=flush_requested())
    sys.path.insert(0, django_tests_dir())
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.frameworks.django_settings"
    import django

    if backend not in DJANGO_BACKENDS:
        raise SystemExit(f"CACHECHAIN_FW_BACKEND must be one of {DJANGO_BACKENDS}")
    django.setup()
    started = time.monotonic()
    runner = _runner_class(record)(verbosity=args.verbosity, interactive=False)
    failures = runner.run_tests(args.labels)
    record.seconds = round(time.monotonic() - started, 1)
    out = os.environ.get("CACHECHAIN_FW_RESULT")
    if out:
        record.write(out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
