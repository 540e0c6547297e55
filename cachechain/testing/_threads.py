"""Run one piece of test work in several threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["run_together"]

#: Seconds a thread waits for the others to start, and the test for a thread to end.
_WAIT = 60.0


def run_together(work: Callable[[int], None], threads: int) -> None:
    """Call ``work(n)`` for ``n`` in ``range(threads)``, each in its own thread, all
    released at once by a barrier; wait for them all (60 s at most each). Re-raises the
    first exception a thread raised (an ``AssertionError`` if one hung)."""
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            start.wait(_WAIT)
            work(n)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(_WAIT)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in pool):
        raise AssertionError(f"a thread was still running after {_WAIT} s")
