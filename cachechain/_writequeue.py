"""The queue of an :class:`~cachechain.AsyncWriter`: :class:`WriteQueue`.

A plain data structure (no threads, locks or clock; the writer calls it with its lock
held) for write-behind operations on keys:

- one pending operation per key, last write wins: an operation of a key that is already
  queued replaces it in place, so the key keeps its turn (first in, first out by the
  first arrival of each key) and a hot key cannot fill the queue;
- ``capacity`` bounds the number of queued keys for a *set* of a new key; a delete is
  always queued (deletes may take the queue past ``capacity``);
- a key taken by a worker (:meth:`WriteQueue.take`) is *in flight* until
  :meth:`WriteQueue.done`, and ``take`` skips keys in flight, so two writes of one key
  never run at once and per-key order holds;
- :attr:`WriteQueue.held` is every key queued or in flight, plus the keys the owner holds
  itself (:meth:`WriteQueue.hold`): a key joins it before it is queued and leaves it only
  through :meth:`~WriteQueue.release`, :meth:`~WriteQueue.done` or
  :meth:`~WriteQueue.cancel_set` once it is neither queued nor in flight. The set object
  is never replaced, so a reader may keep a reference and test it without a lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

__all__ = [
    "COALESCED",
    "DELETE",
    "DELETE_OP",
    "FULL",
    "QUEUED",
    "SET",
    "Op",
    "WriteQueue",
]

SET: Final = "set"
DELETE: Final = "delete"
#: A queued operation: ``(kind, value, ttl)``, kind :data:`SET` or :data:`DELETE`;
#: ``ttl`` is seconds or ``None``. Every delete is the one tuple :data:`DELETE_OP`.
Op = tuple[str, Any, "float | None"]
DELETE_OP: Final[Op] = (DELETE, None, None)

# What WriteQueue.offer did.
#: The operation was queued for a key that had none queued.
QUEUED: Final = 0
#: The operation replaced the key's queued operation (it keeps the key's turn).
COALESCED: Final = 1
#: A set of a new key found no room: nothing was queued, the key is held.
FULL: Final = 2


class WriteQueue:
    """A keyed, coalescing queue of write operations, bounded to ``capacity`` keys
    (an ``int >= 1``, unchecked) for sets of new keys. See the module docstring."""

    __slots__ = ("_inflight", "_pending", "capacity", "held")

    def __init__(self, capacity: int) -> None:
        #: The bound on queued keys for a set of a new key.
        self.capacity = capacity
        #: Keys queued, in flight, or held by the owner (see the module docstring).
        self.held: set[str] = set()
        self._pending: OrderedDict[str, Op] = OrderedDict()
        self._inflight: set[str] = set()

    def __len__(self) -> int:
        """The number of queued operations (in flight ones not included)."""
        return len(self._pending)

    def __repr__(self) -> str:
        return (
            f"<WriteQueue queued={len(self._pending)} inflight={len(self._inflight)} "
            f"held={len(self.held)} capacity={self.capacity}>"
        )

    # ------------------------------------------------------------------ intake

    def offer(self, key: str, op: Op) -> int:
        """Queue ``op`` for ``key`` and return what happened: :data:`COALESCED` (it
        replaced the key's queued operation), :data:`QUEUED`, or :data:`FULL` for a set
        of a new key when ``capacity`` keys are queued: then nothing is queued but the
        key is held (offer it again once :meth:`has_room`, or :meth:`release` it)."""
        pending = self._pending
        if key in pending:
            pending[key] = op
            return COALESCED
        self.held.add(key)
        if len(pending) >= self.capacity and op[0] is SET:
            return FULL
        pending[key] = op
        return QUEUED

    def has_room(self, key: str | None = None) -> bool:
        """Whether a set of ``key`` would be taken now: fewer than ``capacity`` keys are
        queued, or ``key`` is queued (the set would replace its operation)."""
        return len(self._pending) < self.capacity or key in self._pending

    def queue_delete(self, key: str) -> bool:
        """Queue a delete of ``key`` unless an operation of it is queued already (that
        newer one wins); return whether it was queued. Holds the key. Never full."""
        if key in self._pending:
            return False
        self.held.add(key)
        self._pending[key] = DELETE_OP
        return True

    def cancel_set(self, key: str) -> bool:
        """Remove a queued set of ``key`` and return True; False if ``key`` has no queued
        operation or a delete queued (never cancelled). The key is released unless it is
        in flight."""
        op = self._pending.get(key)
        if op is None or op[0] is not SET:
            return False
        del self._pending[key]
        if key not in self._inflight:
            self.held.discard(key)
        return True

    def sets_to_deletes(self) -> int:
        """Turn every queued set into a delete of its key, in place (its turn and its
        hold kept); return how many were turned."""
        pending = self._pending
        turned = [key for key, op in pending.items() if op[0] is SET]
        for key in turned:
            pending[key] = DELETE_OP
        return len(turned)

    def pop_all(self) -> list[tuple[str, Op]]:
        """Remove every queued operation and return them, oldest first. Their keys stay
        held: :meth:`release` those the caller does not keep."""
        items = list(self._pending.items())
        self._pending.clear()
        return items

    # ------------------------------------------------------------------ workers

    def take(self) -> tuple[str, Op] | None:
        """Remove the operation of the oldest queued key that is not in flight, mark the
        key in flight, and return ``(key, op)``; None if there is no such key."""
        key = self._next_key()
        if key is None:
            return None
        self._inflight.add(key)
        return key, self._pending.pop(key)

    def ready(self) -> bool:
        """Whether :meth:`take` would return an operation."""
        return self._next_key() is not None

    def _next_key(self) -> str | None:
        inflight = self._inflight
        if not inflight:
            return next(iter(self._pending), None)
        for key in self._pending:
            if key not in inflight:
                return key
        return None

    def done(self, key: str, *, keep: bool = False) -> None:
        """The write of ``key`` taken by :meth:`take` is over: the key is no longer in
        flight, and is released unless it is queued again or ``keep`` is true."""
        self._inflight.discard(key)
        if not keep and key not in self._pending:
            self.held.discard(key)

    # ------------------------------------------------------------------ holding

    def hold(self, key: str) -> None:
        """Hold ``key`` (see :attr:`held`) until :meth:`release`."""
        self.held.add(key)

    def release(self, key: str) -> None:
        """Stop holding ``key``, unless it is queued or in flight."""
        if key not in self._pending and key not in self._inflight:
            self.held.discard(key)

    def release_all(self) -> None:
        """Stop holding every key that is neither queued nor in flight."""
        self.held.intersection_update(self._inflight.union(self._pending))

    # ------------------------------------------------------------------ state

    def queued(self, key: str) -> bool:
        """Whether ``key`` has an operation queued (not yet taken)."""
        return key in self._pending

    def in_flight(self, key: str) -> bool:
        """Whether ``key`` was taken by :meth:`take` and is not :meth:`done` yet."""
        return key in self._inflight

    def inflight_count(self) -> int:
        """The number of keys in flight."""
        return len(self._inflight)

    def idle(self) -> bool:
        """Whether nothing is queued or in flight."""
        return not self._pending and not self._inflight
