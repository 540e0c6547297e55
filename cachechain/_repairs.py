"""When an :class:`~cachechain.AsyncWriter` retries its repairs: :class:`RepairSchedule`.

A layer that missed a write of a key (it failed or refused it) may keep an older value
of it; the writer then owes the layer a *repair*, a delete of the key, retried until it
lands. This module holds the rules of those retries, as plain logic (no threads, no
locks; the writer calls it with its lock held, and a clock is injected):

- repairs wait in arrival order; a key waits once (a second repair of it keeps its turn);
- a *round* sends one repair, the oldest, and one round runs at a time: the next may
  start only once the current one has ended;
- a round that lands starts the next at once and resets the backoff; one that fails (or
  is refused), like the first repair after a quiet spell, puts the next round off by the
  current delay, which then doubles, from ``retry_delay`` up to ``max_retry_delay``
  seconds. So a layer that is still down gets one call per round, not one per waiting
  key, and one that answers again gets every repair in turn without delay;
- a round whose repair was withdrawn unsent (replaced by a set the caller cancelled)
  ends without an answer: the backoff is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["RepairSchedule"]


class RepairSchedule:
    """The repairs waiting for a retry round, and when the next round may start.

    ``retry_delay`` and ``max_retry_delay`` are the first and the largest wait (seconds,
    finite, ``0 < retry_delay <= max_retry_delay``; unchecked here) between a round that
    failed and the next. ``clock`` returns monotonic seconds. See the module docstring.
    """

    __slots__ = ("_clock", "_delay", "_due_at", "_max_delay", "_min_delay", "probe", "waiting")

    def __init__(
        self, retry_delay: float, max_retry_delay: float, clock: Callable[[], float]
    ) -> None:
        self._min_delay = retry_delay
        self._max_delay = max_retry_delay
        self._clock = clock
        #: The keys whose repair waits for a round, oldest first (read it, do not change
        #: it: use :meth:`add`, :meth:`discard`, :meth:`start_round`, :meth:`take_all`).
        self.waiting: dict[str, None] = {}
        #: The key whose repair the current round sent, or None between rounds.
        self.probe: str | None = None
        self._due_at = 0.0  # clock seconds: when the next round may start
        self._delay = retry_delay  # how long the next failure puts the next round off

    def __len__(self) -> int:
        """The number of repairs waiting (the one a round sent not included)."""
        return len(self.waiting)

    def __contains__(self, key: object) -> bool:
        """Whether a repair of ``key`` waits for a round."""
        return key in self.waiting

    def __repr__(self) -> str:
        return (
            f"<RepairSchedule waiting={len(self.waiting)} probe={self.probe!r} delay={self._delay}>"
        )

    def add(self, key: str) -> None:
        """A repair of ``key`` waits for a round (its turn is kept if it waits already).
        With no round in progress nor scheduled, the next is put off by the current
        delay (which then doubles)."""
        self.waiting[key] = None
        if self.probe is None and self._due_at <= self._clock():
            self._back_off()

    def discard(self, key: str) -> bool:
        """Forget the waiting repair of ``key`` (a newer write replaces it); return
        whether there was one. A round in progress is not affected."""
        if key in self.waiting:
            del self.waiting[key]
            return True
        return False

    def due(self) -> bool:
        """Whether a round should start now: repairs wait, no round is in progress,
        and the backoff is over."""
        return bool(self.waiting) and self.probe is None and self._due_at <= self._clock()

    def start_round(self) -> str | None:
        """Start a round: remove the oldest waiting repair and return its key (the
        :attr:`probe`), for the caller to send. None if none waits. Call it when
        :meth:`due`; the caller reports the outcome with :meth:`end_round`."""
        if not self.waiting:
            return None
        key = next(iter(self.waiting))
        del self.waiting[key]
        self.probe = key
        return key

    def end_round(self, key: str, landed: bool) -> bool:
        """A write of ``key`` ended, ``landed`` or not. If it was the round's repair (or
        the write that replaced it), the round is over: the next starts at once when it
        landed (the backoff resets), else after the current delay (which then doubles).
        Return whether the write ended the round."""
        if key != self.probe:
            return False
        self.probe = None
        if landed:
            self._delay = self._min_delay
            self._due_at = 0.0
        else:
            self._back_off()
        return True

    def withdraw(self, key: str) -> None:
        """The round's write of ``key`` was withdrawn before it was made: the round is
        over without an answer, the backoff unchanged. Nothing happens for another key."""
        if key == self.probe:
            self.probe = None

    def take_all(self) -> list[str]:
        """Remove every waiting repair and return their keys, oldest first, to be tried
        at once (a flush, a close). A round in progress is not affected."""
        keys = list(self.waiting)
        self.waiting.clear()
        return keys

    def clear(self) -> int:
        """Forget every repair and the round in progress; return how many waited."""
        count = len(self.waiting)
        self.waiting.clear()
        self.probe = None
        return count

    def idle_wait(self, limit: float) -> float:
        """How long (seconds) a worker with nothing else to do may wait before the next
        round is due: ``limit`` at most, and never less than ``retry_delay``; ``limit``
        while a round is in progress (its end schedules the next)."""
        if self.probe is not None:
            return limit
        return min(limit, max(self._due_at - self._clock(), self._min_delay))

    def _back_off(self) -> None:
        self._due_at = self._clock() + self._delay
        self._delay = min(self._delay * 2, self._max_delay)
