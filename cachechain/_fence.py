"""The mutation fence: no backfill brings back a value that a set or delete replaced.

Keys fall into 64 stripes by hash. Every mutation (``set``, ``delete`` and their batch
forms) bumps the sequence number of its keys' stripes when it begins and when it ends,
and keeps the stripes marked active in between. A read takes a *ticket* (its stripe's
sequence number, or none while a mutation of the stripe is active) before it reads the
lower layers, and backfills through :meth:`MutationFence.if_unchanged`, which runs the
backfill under the fence's lock only if no mutation of the stripe began since the ticket
was taken. A mutation's final bump and its write to the first layer run under that same
lock (the ``then`` of :meth:`MutationFence.mutating`), so a read that saw an old value
in a lower layer can never write it back above after a concurrent ``delete`` or
``set``: at worst the backfill is skipped. A batch read takes every stripe's number at
once (:meth:`MutationFence.tickets`, a copy of 64 numbers), which needs no check of the
active marks: a mutation in progress when it was taken is either still active at the
backfill or has bumped its stripe since. See docs/design.md, "Consistency between
reads, backfills and mutations".

Knows nothing of layers or chains: it runs the callables it is given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

from . import _fork

__all__ = ["Mutation", "MutationFence", "Ticket", "Tickets"]

T = TypeVar("T")

#: A read's snapshot of its key's stripe, or None when a mutation of the stripe was in
#: progress (nothing may be backfilled then). Opaque: only the fence reads it.
Ticket = int | None

_STRIPES = 64  # a power of two
# _WITH_ONLY: the fence's lock (as every lock a request thread takes) is taken with
# ``with``, never ``acquire()`` then ``try``/``finally``. That pattern is a third cheaper,
# but on 3.11 a signal handled as ``acquire()`` returns (a Ctrl-C, Celery's soft time
# limit, an alarm-based request timeout) raises before the ``try`` begins and leaves the
# lock held for good: every later mutation of the process would hang.
_MASK = _STRIPES - 1
_ALL = tuple(range(_STRIPES))


class Tickets:
    """:meth:`MutationFence.tickets`: the tickets of a batch read, one per stripe;
    ``tickets[key]`` is ``key``'s (see :meth:`MutationFence.tickets`). Immutable."""

    __slots__ = ("seq",)

    def __init__(self, seq: list[int]) -> None:
        #: The stripes' sequence numbers when the tickets were taken (read only).
        self.seq = seq

    def __getitem__(self, key: str) -> Ticket:
        return self.seq[hash(key) & _MASK]


class MutationFence:
    """Orders backfills after the mutations of the same keys. Thread-safe.

    A stripe's sequence number starts at the stripe's index and grows by the number of
    stripes at each bump, so a ticket is the number itself and names its own stripe.
    """

    __slots__ = ("__weakref__", "_active", "_lock", "_seq")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = list(range(_STRIPES))
        self._active = [0] * _STRIPES
        _fork.track(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock, and no mutation in progress (the threads
        that were mutating are gone; their stripes would stay busy for ever)."""
        self._lock = threading.Lock()
        self._active = [0] * _STRIPES

    def ticket(self, key: str) -> Ticket:
        """Snapshot ``key``'s stripe before reading the layers below the first: the
        ticket to give :meth:`if_unchanged`, or None while a mutation of the stripe is
        in progress (then the read must not backfill). Lock-free."""
        stripe = hash(key) & _MASK
        seq = self._seq[stripe]
        if self._active[stripe]:
            return None
        return seq

    def tickets(self) -> Tickets:
        """A ticket for every key at once (a batch read's): a copy of the stripes'
        sequence numbers, whatever the batch's size. Lock-free. Unlike :meth:`ticket`,
        a key's ticket is given while a mutation of its stripe is in progress, and
        still refused: by :meth:`if_unchanged` while the mutation runs (the stripe is
        active), after it (its end bumped the stripe)."""
        return Tickets(self._seq[:])

    def if_unchanged(self, ticket: Ticket, fn: Callable[..., object], *args: Any) -> bool:
        """Call ``fn(*args)`` under the fence's lock if no mutation of the ticket's
        stripe began, or is in progress, since the ticket was taken; return whether it
        was called. What ``fn`` raises propagates (the lock is released). ``fn`` must
        not start a mutation (the lock is not reentrant)."""
        if ticket is None:
            return False
        stripe = ticket & _MASK
        with self._lock:
            if self._seq[stripe] != ticket or self._active[stripe]:
                return False
            fn(*args)
            return True

    def if_unchanged_many(
        self,
        tickets: Tickets,
        hits: Mapping[str, T],
        fn: Callable[[Mapping[str, T]], object],
    ) -> int:
        """:meth:`if_unchanged` for a batch: under one acquisition of the fence's lock,
        call ``fn`` once with the entries of ``hits`` whose key's stripe saw no
        mutation since ``tickets`` were taken (``fn`` is not called when none did);
        return how many were passed. When no stripe moved and none is being mutated
        (the usual case, checked in two C-level passes over the 64 stripes), ``fn``
        gets ``hits`` itself, not a copy. What ``fn`` raises propagates."""
        seqs, active, taken = self._seq, self._active, tickets.seq
        with self._lock:
            if seqs == taken and not any(active):
                admitted = hits
            else:
                admitted = {
                    key: item
                    for key, item in hits.items()
                    if seqs[(stripe := hash(key) & _MASK)] == taken[stripe] and not active[stripe]
                }
            if admitted:
                fn(admitted)
            return len(admitted)

    def mutating(self, keys: Iterable[str], then: Callable[[], T]) -> Mutation[T]:
        """Begin a mutation of ``keys`` and return it as a context manager. Its exit
        ends the mutation and, under the same lock, calls ``then()`` (the write to the
        first layer), even when the block raised; ``then``'s result is then
        :attr:`Mutation.result`. What ``then`` raises propagates."""
        stripes = sorted({hash(key) & _MASK for key in keys})
        with self._lock:
            seqs, active = self._seq, self._active
            for stripe in stripes:
                seqs[stripe] += _STRIPES
                active[stripe] += 1
        return Mutation(self, stripes, then)

    def begin(self, key: str) -> int:
        """Begin a mutation of the one key ``key`` (what :meth:`mutating` does, without
        its context manager, for the chain's atomic operations); return the stripe to
        hand to :meth:`end`, which must follow, in ``finally``."""
        stripe = hash(key) & _MASK
        with self._lock:  # ``with``, never acquire() then try: see _WITH_ONLY
            self._seq[stripe] += _STRIPES
            self._active[stripe] += 1
        return stripe

    def end(self, stripe: int, then: Callable[..., object] | None = None, *args: Any) -> None:
        """End the mutation :meth:`begin` returned ``stripe`` for and, under the same
        lock, call ``then(*args)`` (the write to the first layer). What ``then`` raises
        propagates, the mutation ended."""
        with self._lock:
            self._seq[stripe] += _STRIPES
            self._active[stripe] -= 1
            if then is not None:
                then(*args)

    def mutating_all(self, then: Callable[[], T]) -> Mutation[T]:
        """:meth:`mutating` of every key (a clear): no read in flight may backfill
        after it."""
        with self._lock:
            seqs, active = self._seq, self._active
            for stripe in _ALL:
                seqs[stripe] += _STRIPES
                active[stripe] += 1
        return Mutation(self, _ALL, then)

    def _end(self, stripes: Sequence[int], then: Callable[[], T]) -> T:
        with self._lock:
            seqs, active = self._seq, self._active
            for stripe in stripes:
                seqs[stripe] += _STRIPES
                active[stripe] -= 1
            return then()


class Mutation(Generic[T]):
    """A mutation in progress (see :meth:`MutationFence.mutating`). Use it once, as a
    context manager; after the ``with`` block :attr:`result` is what ``then()``
    returned."""

    __slots__ = ("_fence", "_stripes", "_then", "result")

    #: What ``then()`` returned (set when the mutation ends).
    result: T

    def __init__(self, fence: MutationFence, stripes: Sequence[int], then: Callable[[], T]):
        self._fence = fence
        self._stripes = stripes
        self._then = then

    def __enter__(self) -> Mutation[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.result = self._fence._end(self._stripes, self._then)
