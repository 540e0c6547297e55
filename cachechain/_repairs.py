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
  ends without an answer: the backoff is left as it was;
- at most ``max_repairs`` repairs wait. Past that cap the schedule *overflows*: it
  gives up every waiting repair (:meth:`RepairSchedule.add` returns their keys, for
  the writer to stop holding them) and the layer is handled as a whole instead: while
  :attr:`~RepairSchedule.overflowed`, a repair that arrives is covered by the next
  *overflow round* and not kept, and each round (on the same backoff, one at a time)
  asks the writer's overflow handler to handle the layer as a whole
  (:meth:`~RepairSchedule.start_overflow`, :meth:`~RepairSchedule.end_overflow`). A
  round that succeeds ends the overflow; the repairs that arrived while it ran are
  kept one by one (the handler may have acted before their writes failed), and if
  they passed the cap again meanwhile, the overflow goes on and the next round starts
  at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["RepairSchedule"]

_NONE: tuple[str, ...] = ()


class RepairSchedule:
    """The repairs waiting for a retry round, and when the next round may start.

    ``retry_delay`` and ``max_retry_delay`` are the first and the largest wait (seconds,
    finite, ``0 < retry_delay <= max_retry_delay``; unchecked here) between a round that
    failed and the next. ``clock`` returns monotonic seconds. ``max_repairs`` (an ``int
    >= 1``, unchecked) is the most repairs that wait before the schedule overflows. See
    the module docstring.
    """

    __slots__ = (
        "_clock",
        "_delay",
        "_due_at",
        "_hurried",
        "_max_delay",
        "_max_repairs",
        "_min_delay",
        "_renewed",
        "handling",
        "overflowed",
        "overflows",
        "probe",
        "waiting",
    )

    def __init__(
        self,
        retry_delay: float,
        max_retry_delay: float,
        clock: Callable[[], float],
        max_repairs: int = 10_000,
    ) -> None:
        self._min_delay = retry_delay
        self._max_delay = max_retry_delay
        self._clock = clock
        self._max_repairs = max_repairs
        #: The layer is handled as a whole: the key-by-key repairs were given up (read
        #: it, lock-free; it changes only through the methods below).
        self.overflowed = False
        #: An overflow round is in progress (its handler is being called).
        self.handling = False
        #: How many times the schedule overflowed (from not overflowed).
        self.overflows = 0
        self._renewed = False  # passed the cap again while the round was in progress
        self._hurried = False  # an overflow round was asked for now (hurry)
        #: The keys whose repair waits for a round, oldest first (read it, do not change
        #: it: use :meth:`add`, :meth:`discard`, :meth:`start_round`, :meth:`take_all`).
        self.waiting: dict[str, None] = {}
        #: The key whose repair the current round sent, or None between rounds.
        self.probe: str | None = None
        self._due_at = 0.0  # clock seconds: when the next round may start
        self._delay = retry_delay  # how long the next failure puts the next round off

    @property
    def max_repairs(self) -> int:
        """The most repairs that wait before the schedule overflows."""
        return self._max_repairs

    def __len__(self) -> int:
        """The number of repairs waiting (the one a round sent not included)."""
        return len(self.waiting)

    def __contains__(self, key: object) -> bool:
        """Whether a repair of ``key`` waits for a round."""
        return key in self.waiting

    def __repr__(self) -> str:
        state = " overflowed" if self.overflowed else ""
        return (
            f"<RepairSchedule waiting={len(self.waiting)} probe={self.probe!r} "
            f"delay={self._delay}{state}>"
        )

    def add(self, key: str) -> Sequence[str]:
        """A repair of ``key`` waits for a round (its turn is kept if it waits already).
        With no round in progress nor scheduled, the next is put off by the current
        delay (which then doubles).

        Returns the keys whose repairs were given up, for the caller to stop holding
        them: none, usually; ``key`` alone while :attr:`overflowed` (the next overflow
        round covers it); every waiting key, ``key`` included, when this repair passes
        ``max_repairs`` (the schedule overflows, see the module docstring)."""
        if self.overflowed and not self.handling:
            return (key,)
        waiting = self.waiting
        waiting[key] = None
        if len(waiting) > self._max_repairs:
            return self._overflow()
        if self.probe is None and not self.handling and self._due_at <= self._clock():
            self._back_off()
        return _NONE

    def _overflow(self) -> list[str]:
        """Give up every waiting repair and handle the layer as a whole."""
        given = list(self.waiting)
        self.waiting.clear()
        if self.handling:
            self._renewed = True  # the round in progress may have acted before these
        elif not self.overflowed:
            self.overflows += 1  # its first round keeps the repairs' schedule
        self.overflowed = True
        return given

    def discard(self, key: str) -> bool:
        """Forget the waiting repair of ``key`` (a newer write replaces it); return
        whether there was one. A round in progress is not affected."""
        if key in self.waiting:
            del self.waiting[key]
            return True
        return False

    def due(self) -> bool:
        """Whether a round should start now: no round is in progress, repairs wait
        (or the schedule is :attr:`overflowed`), and the backoff is over (or an
        overflow round was asked for now, :meth:`hurry`)."""
        if self.probe is not None or self.handling:
            return False
        if self.overflowed:
            return self._hurried or self._due_at <= self._clock()
        return bool(self.waiting) and self._due_at <= self._clock()

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

    def start_overflow(self) -> list[str]:
        """Start an overflow round (call it when :attr:`overflowed` and :meth:`due`):
        the caller now calls its overflow handler and reports the outcome with
        :meth:`end_overflow`. Returns the keys of the repairs waiting, given up: the
        round covers them."""
        self.handling = True
        self._hurried = False
        self._renewed = False
        given = list(self.waiting)
        self.waiting.clear()
        return given

    def end_overflow(self, handled: bool) -> bool:
        """The overflow round is over: the layer was ``handled`` as a whole, or not.
        Handled, the overflow ends (unless repairs passed the cap again meanwhile: then
        the next round is due at once) and the repairs that arrived during the round
        wait for rounds of their own, the first at once; not handled, the next round is
        put off by the current delay (which then doubles). Returns whether the schedule
        is no longer overflowed."""
        self.handling = False
        self._hurried = False
        if handled:
            self.overflowed = self._renewed
            self._delay = self._min_delay
            self._due_at = 0.0
        else:
            self._back_off()
        self._renewed = False
        return not self.overflowed

    def hurry(self) -> bool:
        """Ask for an overflow round now, whatever the backoff (a flush, a close).
        Returns whether one will start: the schedule is overflowed and no round is in
        progress (a round in progress is the answer already)."""
        if not self.overflowed or self.handling:
            return False
        self._hurried = True
        return True

    @property
    def hurried(self) -> bool:
        """Whether an overflow round was asked for now (:meth:`hurry`) and has not
        started yet."""
        return self._hurried

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
        """Forget every repair, the round in progress and the overflow; return how
        many repairs waited."""
        count = len(self.waiting)
        self.waiting.clear()
        self.probe = None
        self.overflowed = self.handling = self._hurried = self._renewed = False
        return count

    def idle_wait(self, limit: float) -> float:
        """How long (seconds) a worker with nothing else to do may wait before the next
        round is due: ``limit`` at most, and never less than ``retry_delay``; ``limit``
        while a round is in progress (its end schedules the next)."""
        if self.probe is not None or self.handling:
            return limit
        return min(limit, max(self._due_at - self._clock(), self._min_delay))

    def _back_off(self) -> None:
        self._due_at = self._clock() + self._delay
        self._delay = min(self._delay * 2, self._max_delay)
