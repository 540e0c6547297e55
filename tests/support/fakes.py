"""Fakes for injecting faults and time: a fake clock and a scriptable fake layer (both
shipped in :mod:`cachechain.testing`, re-exported here), ``Boom``, whose unpickling
leaves a trace (to prove nothing unpickles untrusted bytes), and ``wait_for_waiters``."""

from __future__ import annotations

import threading
from typing import Any

from cachechain.testing import FakeClock, FakeLayer

__all__ = ["UNPICKLED", "Boom", "FakeClock", "FakeLayer", "wait_for_waiters"]

#: Calls made by unpickling a Boom; the tests' conftest clears it before each test.
UNPICKLED: list[str] = []


def _unpickled(tag: str) -> None:
    UNPICKLED.append(tag)


class Boom:
    """Unpickling it appends to :data:`UNPICKLED`: proof that a pickle was (or was not)
    loaded."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _unpickled, ("boom",)


def wait_for_waiters(chain: Any, key: str, n: int) -> None:
    """Wait (bounded) until ``n`` threads have joined the chain's in-flight load of
    ``key`` (a SingleFlight has no event for "n waiters", so this polls, bounded)."""
    flight = chain._flight
    ready = threading.Event()
    for _ in range(5000):
        with flight._lock:
            call = flight._calls.get(key)
            if call is not None and call.waiters >= n:
                ready.set()
        if ready.wait(0.002):
            return
    raise AssertionError(f"fewer than {n} threads joined the load")
