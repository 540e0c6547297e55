"""A model of what a cache may answer, and a checker of stale reads, for threaded tests.

Each key of the model has the history of its *acknowledged* mutations: a ``set``,
``delete`` or ``add`` that returned True, an ``incr`` that returned a count. The test
serialises the mutations of each key (one owner thread, or :attr:`KeyModel.lock`), so
their order is known. A mutation that failed (False, None) is *unknown*: it may have
happened, or may still happen (a write that timed out after it was sent), until a
later acknowledged mutation of the key decides.

Values say which mutation wrote them: ``value = key_id << 40 | seq << 20 | n``, where
``seq`` numbers the mutation attempts of the key (acknowledged or not, from 1) and
``n`` counts the increments made on the value that attempt ``seq`` stored. A value's
*version* is ``(seq, n)``. A delete made by attempt ``d`` counts as version ``(d, 0)``,
which no value has. Versions of the acknowledged mutations grow in their order.

A mutation acknowledged while the chain still holds it (queued in its writer behind an
older write of the key, which the chain documents as taken: "a queued write counts")
has not reached memcached yet: other processes must see it only once it *landed*
(the writer no longer holds the key, and no later write of the key by the same chain,
which may have cancelled the queued one, is still under way), the chain that made it
at once.

A read may return a miss (a cache may lose anything) or a value of version at least its
*floor*: the newest acknowledged mutation it must see (:meth:`KeyModel.floor`). An
older value is a **stale read**: a mutation was acknowledged, and an earlier state of
the key came back. A value of the wrong key, or of an attempt not made yet, is
*unexplained*. Both are recorded by :class:`Checker` with what is known of the
mutations involved.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Ack", "Attempt", "Checker", "KeyModel", "Odd", "decode", "encode"]

_SEQ_SHIFT = 20
_KEY_SHIFT = 40
_LOW = (1 << _SEQ_SHIFT) - 1

Version = tuple[int, int]


def encode(key_id: int, seq: int, n: int = 0) -> int:
    """The value that attempt ``seq`` of key ``key_id`` stores (``n``: increments on it)."""
    return (key_id << _KEY_SHIFT) | (seq << _SEQ_SHIFT) | n


def decode(value: object) -> tuple[int, Version] | None:
    """``(key_id, (seq, n))`` of a value made by :func:`encode`; None for anything else."""
    if type(value) is not int or value < 0:
        return None
    return value >> _KEY_SHIFT, ((value >> _SEQ_SHIFT) & _LOW, value & _LOW)


@dataclass
class Ack:
    """An acknowledged mutation: the ``version`` it left, by ``op`` through
    ``process`` (a chain's name), at monotonic time ``at`` (taken after it returned).
    ``landed_at``: when it was first seen to have reached memcached (``at`` unless the
    chain's writer still held the key when it returned); None until then. ``seq``:
    the attempt's number."""

    version: Version
    op: str
    process: str
    at: float
    landed_at: float | None
    seq: int


@dataclass
class Attempt:
    """One mutation attempt of a key: ``op`` through ``process``, begun at ``started``
    (monotonic s); ``outcome`` is what it returned (``"pending"`` until then) and
    ``ended`` when; ``acked``: whether it was acknowledged, ``queued``: whether the
    chain's writer still held the key when it returned."""

    op: str
    process: str
    started: float
    outcome: str = "pending"
    ended: float = 0.0
    acked: bool = False
    queued: bool = False


@dataclass(frozen=True)
class Odd:
    """A read that broke the model. ``kind``: ``"stale"`` (an older version than the
    floor), ``"unexplained"`` (not a value of this key's attempts so far), or
    ``"stale-incr"`` (an acknowledged ``incr`` counted on an older value). ``got`` is
    the version read (None if undecodable), ``floor`` the acknowledged mutation it
    had to see; ``got_attempt`` the attempt that wrote ``got``; ``started`` the read's
    start (seconds since the checker began); ``phase`` the test's phase then."""

    kind: str
    reader: str
    key: str
    value: Any
    got: Version | None
    floor: Ack | None
    got_attempt: Attempt | None
    started: float
    phase: str

    def describe(self, t0: float) -> str:
        """One line for a failure message; ``t0``: the checker's start (monotonic s)."""
        floor = self.floor
        where = f"{self.phase} t={self.started:.3f}s {self.reader} read {self.key}"
        if floor is None:
            return f"{self.kind}: {where} -> {self.value!r} (version {self.got})"
        age = self.started - (floor.at - t0)
        made = self.got_attempt
        origin = (
            "?"
            if made is None
            else f"{made.op} via {made.process} -> {made.outcome}"
            f"{' (queued)' if made.queued else ''} at t={made.started - t0:.3f}s"
        )
        behind = floor.version[0] - self.got[0] if self.got is not None else "?"
        queued = "" if floor.landed_at == floor.at else " (queued when acknowledged)"
        return (
            f"{self.kind}: {where} -> version {self.got} (written by {origin}), but "
            f"{floor.op} via {floor.process} acknowledged version {floor.version}{queued} "
            f"{age:.3f}s before the read ({behind} attempts newer)"
        )


@dataclass
class KeyModel:
    """One key: its attempts and acknowledged mutations. ``lock`` is the test's, held
    around each mutation and its recording (shared keys); the history has its own."""

    key_id: int
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    _history: threading.Lock = field(default_factory=threading.Lock)
    _seq: int = 0
    attempts: dict[int, Attempt] = field(default_factory=dict)
    acks: list[Ack] = field(default_factory=list)
    _ack_times: list[float] = field(default_factory=list)

    def begin(self, op: str, process: str) -> int:
        """Number a new attempt of ``op`` through ``process``; return its ``seq``."""
        with self._history:
            self._seq += 1
            self.attempts[self._seq] = Attempt(op, process, time.monotonic())
            return self._seq

    def end(self, seq: int, outcome: str, ack: Version | None, *, queued: bool) -> Ack | None:
        """Record what attempt ``seq`` returned; ``ack``: the version it left when it
        was acknowledged (None: unknown); ``queued``: whether the chain's writer still
        held the key then. Return the new :class:`Ack`, if any."""
        now = time.monotonic()
        with self._history:
            attempt = self.attempts[seq]
            attempt.outcome, attempt.ended = outcome, now
            attempt.acked, attempt.queued = ack is not None, queued
            if ack is None:
                return None
            made = Ack(ack, attempt.op, attempt.process, now, None if queued else now, seq)
            self.acks.append(made)
            self._ack_times.append(now)
            return made

    def last_ack(self) -> Ack | None:
        """The newest acknowledged mutation, if any."""
        with self._history:
            return self.acks[-1] if self.acks else None

    def issued(self) -> int:
        """Attempts numbered so far."""
        with self._history:
            return self._seq

    def floor(self, process: str, lag: float, held: Callable[[str, str], bool]) -> Ack | None:
        """What a read starting now through ``process`` must see: the newest of the
        mutations acknowledged through ``process`` itself, and of those of any process
        that landed at least ``lag`` seconds ago (``lag=0``: every landed one; other
        processes' in-process copies may lag by the coherence bound).
        ``held(process, key)`` says whether that process's writer still holds the key:
        an acknowledged mutation is seen to land once it does not."""
        now = time.monotonic()
        with self._history:
            if not self.acks:
                return None
            # Acknowledged before now - lag: the only ones of other processes that count.
            settled = bisect.bisect_right(self._ack_times, now - lag) - 1
            for i in range(len(self.acks) - 1, -1, -1):
                ack = self.acks[i]
                if ack.process == process:
                    return ack
                if i > settled:
                    continue
                if ack.landed_at is None and self._landed(ack, held):
                    ack.landed_at = now  # first seen landed: its lag counts from now
                if ack.landed_at is not None and ack.landed_at <= now - lag:
                    return ack
            return None

    def _landed(self, ack: Ack, held: Callable[[str, str], bool]) -> bool:
        """Whether ``ack``, queued when acknowledged, has landed: its process's writer
        no longer holds the key and no later attempt of that process is under way (a
        synchronous write cancels a queued set). Called under the history lock."""
        latest = self.attempts[self._seq]
        if self._seq > ack.seq and latest.process == ack.process and latest.outcome == "pending":
            return False  # mutations of a key are serialised: only the latest may be pending
        return not held(ack.process, self.name)

    def attempt(self, seq: int) -> Attempt | None:
        """Attempt ``seq`` (a copy), if it was made."""
        with self._history:
            made = self.attempts.get(seq)
            return None if made is None else Attempt(**vars(made))


class Checker:
    """Counts and judges the reads and mutations of a run; thread-safe.

    :meth:`judge` checks one read against its floor; :meth:`acked` and :meth:`unknown`
    count mutations (and wake :meth:`wait_for`); :attr:`phase` labels what the run is
    doing (for the reports).
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.phase = "start"
        self._cond = threading.Condition()
        self.acks = 0
        self.unknowns = 0
        self.reads = 0
        self.hits = 0
        self.odd: list[Odd] = []
        #: Reads that returned a failed write's value while it could still show: the
        #: late write and its retraction (a ``delete`` sent right behind it on its
        #: connection) had not both run yet, or a copy another process read meanwhile
        #: was not dropped yet (the write's repair not published). Not stale by the
        #: chain's promise (docs/design.md, "Writes in doubt"); reported as a figure.
        self.in_doubt_reads = 0

    def acked(self) -> None:
        """One more acknowledged mutation."""
        with self._cond:
            self.acks += 1
            self._cond.notify_all()

    def unknown(self) -> None:
        """One more mutation that failed (its fate unknown)."""
        with self._cond:
            self.unknowns += 1
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Checker], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (woken by every count), at most
        ``timeout`` seconds; return whether it held."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def judge(
        self,
        reader: str,
        model: KeyModel,
        floor: Ack | None,
        started: float,
        value: Any,
        in_doubt: Collection[str] = (),
    ) -> None:
        """Check ``value``, read from ``model``'s key through ``reader`` by a read that
        began at ``started`` (monotonic s) when its floor was ``floor``; a miss is
        ``None``. ``in_doubt``: the processes whose failed write of the key could still
        show when the read began (it timed out after it was sent, and its retraction
        or the publication of its repair had not run yet; the caller says): a failed
        write of theirs is not stale then (see :attr:`in_doubt_reads`)."""
        odd: Odd | None = None
        doubtful = False
        if value is not None:
            decoded = decode(value)
            got = None if decoded is None else decoded[1]
            if decoded is None or decoded[0] != model.key_id or decoded[1][0] > model.issued():
                odd = self._odd("unexplained", reader, model, value, got, floor, started)
            elif floor is not None and decoded[1] < floor.version:
                odd = self._odd("stale", reader, model, value, got, floor, started)
                made = odd.got_attempt
                doubtful = (
                    made is not None
                    and made.op in ("set", "add")
                    and not made.acked
                    and made.process in in_doubt
                )
        with self._cond:
            self.reads += 1
            self.hits += value is not None
            if doubtful:
                self.in_doubt_reads += 1
            elif odd is not None:
                self.odd.append(odd)

    def judge_count(self, reader: str, model: KeyModel, floor: Ack | None, count: int) -> None:
        """Check the count an acknowledged ``incr`` returned: it must be above the
        floor the ``incr`` began with (the value it incremented was current)."""
        decoded = decode(count)
        if decoded is None or decoded[0] != model.key_id:
            odd = self._odd("unexplained", reader, model, count, None, floor, time.monotonic())
        elif floor is not None and decoded[1] <= floor.version:
            odd = self._odd("stale-incr", reader, model, count, decoded[1], floor, time.monotonic())
        else:
            return
        with self._cond:
            self.odd.append(odd)

    def _odd(
        self,
        kind: str,
        reader: str,
        model: KeyModel,
        value: Any,
        got: Version | None,
        floor: Ack | None,
        started: float,
    ) -> Odd:
        made = None if got is None else model.attempt(got[0])
        return Odd(kind, reader, model.name, value, got, floor, made, started - self.t0, self.phase)

    def of_kind(self, *kinds: str) -> list[Odd]:
        """The recorded odd reads of ``kinds``."""
        with self._cond:
            return [o for o in self.odd if o.kind in kinds]
