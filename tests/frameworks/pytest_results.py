"""A pytest plugin that writes the run's :class:`~tests.frameworks.results.SuiteResult`.

Loaded by ``tests/frameworks/pytest.ini`` (``-p tests.frameworks.pytest_results``);
writes to ``CACHECHAIN_FW_RESULT`` when it is set. A test is failed when any of its
phases (setup, call, teardown) failed; its cause is the first line of pytest's crash
message.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from tests.frameworks.results import SuiteResult, one_line

_seen: dict[str, str] = {}  # test name -> "passed", "skipped" or "failed"
_record = SuiteResult(suite="flask", backend=os.environ.get("CACHECHAIN_FW_BACKEND", ""))
_started = time.monotonic()


def _name(nodeid: str) -> str:
    """``Class.test[param]`` from a node id ``path::Class::test[param]``."""
    return ".".join(nodeid.split("::")[1:]) or nodeid


def _failing_line(report: pytest.TestReport) -> str:
    """The source line pytest marks with ``>`` in the innermost traceback entry."""
    entries = getattr(getattr(report.longrepr, "reprtraceback", None), "reprentries", [])
    for line in getattr(entries[-1], "lines", []) if entries else []:
        if isinstance(line, str) and line.startswith(">"):
            return line[1:].strip()
    return ""


def _cause(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is None:
        return one_line("Error", str(report.longrepr))
    kind, sep, message = crash.message.partition(": ")
    if not (sep and kind.replace(".", "").isidentifier()):
        kind, message = "AssertionError", crash.message  # pytest's rewritten assert
    where = _failing_line(report)
    first = message.strip().splitlines()[0] if message.strip() else ""
    return one_line(kind, f"{first} [at: {where}]" if where else first)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    name = _name(report.nodeid)
    _seen.setdefault(name, "passed")
    if report.failed:
        _seen[name] = "failed"
        phase = "" if report.when == "call" else f"(in {report.when}) "
        _record.add_failure(name, phase + _cause(report))
    elif report.skipped and _seen[name] != "failed":
        _seen[name] = "skipped"
        longrepr: Any = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _record.skipped[name] = reason


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _record.flush = os.environ.get("CACHECHAIN_FW_FLUSH") == "1"
    _record.total = len(_seen)
    _record.passed = sum(1 for outcome in _seen.values() if outcome == "passed")
    _record.seconds = round(time.monotonic() - _started, 1)
    out = os.environ.get("CACHECHAIN_FW_RESULT")
    if out:
        _record.write(out)
