"""What a CLOSED circuit breaker counts toward opening.

:class:`FailureWindow` keeps the consecutive failures since the last success and, when
a failure rate is set, the outcomes of the last ``size`` calls. It decides when those
numbers open the breaker. It has no lock: :class:`~cachechain._breaker.CircuitBreaker`
calls it under its own. While no failure is recorded the breaker counts successes
without its lock (in an :func:`itertools.count`) and hands the count over with
:meth:`FailureWindow.resume` when the first failure comes; :meth:`FailureWindow.suspend`
gives the window's length back when the breaker returns to that lock-free mode.
"""

from __future__ import annotations

from collections import deque

__all__ = ["FailureWindow"]


class FailureWindow:
    """Consecutive failures, and the failure share of the last ``size`` calls.

    ``max_failures`` consecutive failures open the breaker; with ``rate`` set (in
    ``(0, 1]``, ``None`` = off) so does a share of failures ``>= rate`` among the last
    ``size`` calls, once at least ``min_calls`` of them were recorded. The arguments are
    checked by the breaker. Not thread-safe.
    """

    __slots__ = (
        "_failures",
        "_max_failures",
        "_min_calls",
        "_outcomes",
        "consecutive",
        "rate",
        "size",
    )

    def __init__(self, max_failures: int, rate: float | None, size: int, min_calls: int) -> None:
        self._max_failures = max_failures
        #: The failure share that opens the breaker, or None (consecutive failures only).
        self.rate = rate
        #: How many of the last calls the rate looks at.
        self.size = size
        self._min_calls = min_calls
        #: Failures recorded since the last success.
        self.consecutive = 0
        self._outcomes: deque[bool] = deque()  # True = failure; kept only while a failure is
        self._failures = 0

    def clear(self) -> None:
        """Forget every outcome (the breaker closed)."""
        self.consecutive = 0
        self._outcomes = deque()
        self._failures = 0

    @property
    def clean(self) -> bool:
        """Whether no failure is recorded (neither consecutive nor in the window)."""
        return not (self.consecutive or self._failures)

    def success(self) -> None:
        """Record a successful call."""
        self.consecutive = 0
        if self.rate is not None:
            self._record(False)

    def failure(self) -> bool:
        """Record a failed call; return whether the breaker must open."""
        self.consecutive += 1
        if self.rate is not None:
            self._record(True)
        return self._should_open()

    def resume(self, successes: int) -> None:
        """Start recording outcomes again after ``successes`` calls counted elsewhere
        (the breaker's lock-free mode), all of them successes."""
        self._outcomes = deque([False] * min(successes, self.size))
        self._failures = 0

    def suspend(self) -> int:
        """Stop recording outcomes (the breaker counts successes itself from now on);
        return how many calls the window held, to count on from."""
        held = len(self._outcomes)
        self._outcomes = deque()
        return held

    def _record(self, failed: bool) -> None:
        outcomes = self._outcomes
        outcomes.append(failed)
        self._failures += failed
        if len(outcomes) > self.size and outcomes.popleft():
            self._failures -= 1

    def _should_open(self) -> bool:
        if self.consecutive >= self._max_failures:
            return True
        rate = self.rate
        if rate is None:
            return False
        calls = len(self._outcomes)
        return calls >= self._min_calls and self._failures / calls >= rate
