"""Real processes for the cross-process tests: forked workers released together.

:func:`run_processes` forks ``n`` processes (``multiprocessing``'s fork context: a
worker is a copy of the test process, as gunicorn's are of its master) that each call
``target(barrier, results, index, *args)``: ``barrier`` is a ``multiprocessing.Barrier``
of the ``n`` workers (each wait bounded by :data:`WAIT` seconds), and each worker puts
one result in the ``results`` queue, or a ``str`` describing its failure.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

__all__ = ["WAIT", "reported", "run_processes"]

_CTX = multiprocessing.get_context("fork")

#: Seconds a barrier wait, a result or a worker's exit may take before the test fails.
WAIT = 20.0


def run_processes(target: Callable[..., None], n: int, *args: Any) -> list[Any]:
    """Run ``target(barrier, results, index, *args)`` in ``n`` forked processes; return
    their results (in the order they came). Fails the test when a worker reported a
    failure (a ``str``), exited with an error or hung."""
    barrier = _CTX.Barrier(n)
    results = _CTX.Queue()
    procs = [_CTX.Process(target=target, args=(barrier, results, i, *args)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=WAIT) for _ in procs]
    finally:
        for p in procs:
            p.join(WAIT)
            if p.is_alive():  # pragma: no cover - only on a hang
                p.kill()
                p.join(WAIT)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    failures = [r for r in got if isinstance(r, str)]
    assert not failures, failures
    return got


def reported(results: Any, index: int, work: Callable[[], Any]) -> None:
    """Put ``work()`` in ``results``, or a description of what it raised (a worker's
    exception would otherwise only reach its stderr)."""
    try:
        results.put(work())
    except BaseException as exc:  # pragma: no cover - reported to the parent
        results.put(f"process {index}: {exc!r}")
