"""MemoryLayer: a bounded, thread-safe, in-process layer with per-entry TTLs.

Built on cachetools' ``LRUCache``, written under one ``threading.Lock``. Each entry is
stored as ``(value, expires_at)`` on a monotonic clock, so per-entry TTLs cost one
comparison on a hit, and an entry without a TTL costs no clock read at all. Expired
entries are removed when they are next read, and by :meth:`MemoryLayer.expire`; LRU
eviction bounds the size either way. Values are stored by reference, as in cachetools:
do not mutate a value after caching it.

**Reads take no lock** (issue 14), as in Caffeine: a read looks the key up in the
cache's dict (one atomic ``dict.get``) and records the key in a bounded *read buffer*
(a ``deque``, whose ``append`` is atomic); the LRU order is brought up to date from the
buffer by whichever thread next holds the lock: a writer before it writes (so an
eviction sees the reads), or a reader that finds the buffer full enough and the lock
free (``acquire(blocking=False)``: a reader never waits). Each key is moved once per
replay however often it was read, and a buffer past its bound drops its oldest reads:
the recency order is approximate, exactly what a read sees is not. Under the GIL the
lock-free steps are single bytecode-level operations on built-in containers; on a
free-threaded Python (3.13t) ``dict`` and ``deque`` operations are thread-safe on their
own (each takes its object's lock), so correctness does not rest on the GIL, only the
speed figures do. A thread that reads while a writer replaces or removes the key sees
the entry before or after the write, as with the lock. With threads on several CPUs a
lock taken by every read made a convoy: 16 threads read a seventh of one thread's hits.

A stamped entry (``get_or_load``'s fail-safe, :mod:`cachechain.layers._stamps`) is
``(value, fresh_until, expires_at, origin_ttl)``: its second item is its *logical*
expiry, so the hot path reads it exactly as a plain entry (past it, a miss), and it is
removed only once its physical expiry (``expires_at``) has passed.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from .. import _fork
from .._errors import InvalidValueError
from .._validate import check_count
from ._base import MISSING, BaseLayer
from ._counters import check_delta, countable, decr_value, incr_value
from ._stamps import Found, Stamped, stamps_wanted

__all__ = ["MemoryLayer", "MemoryLayerStats"]

#: ``(value, expires_at)``, or a stamped ``(value, fresh_until, expires_at, origin)``.
_Item = tuple[Any, ...]


#: What the store returns for an absent key (cachetools' ``__missing__`` hook), which
#: reads meet only when a key is evicted between their lock-free ``key in data`` test
#: and their locked read. The test comes first because a miss through ``data[key]``
#: costs two caught exceptions inside cachetools 8 (~800 ns against ~100 ns), for
#: ~70 ns more on a hit.
_ABSENT: Any = (MISSING, None)

#: Reads recorded before a reader tries to replay them into the LRU order.
_REPLAY_AT = 64
#: The most reads the buffer keeps (older ones are dropped: recency is approximate).
_READS_KEPT = 4096


class _CountingLRU(LRUCache[str, _Item]):
    """An ``LRUCache`` that counts evictions (``popitem`` runs only to make room) and
    returns :data:`_ABSENT` for an absent key instead of raising ``KeyError``."""

    evictions = 0

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        #: Whether :meth:`put` may write cachetools' own dict, order and count (it
        #: keeps no per-item sizes: cachetools 8 without ``getsizeof``).
        self.direct = getattr(self, "_Cache__size", 0) is None
        self._bound = maxsize  # cachetools' maxsize is a property: read on every put

    def __missing__(self, key: str) -> _Item:
        return _ABSENT  # type: ignore[no-any-return]

    def popitem(self) -> tuple[str, _Item]:
        item = LRUCache.popitem(self)
        self.evictions += 1
        return item

    def put(self, key: str, item: _Item) -> None:
        """``self[key] = item``, making room as ``__setitem__`` does; see :meth:`put_many`."""
        if not self.direct:
            self[key] = item
            return
        data: dict[str, _Item] = self._Cache__data  # type: ignore[attr-defined]
        order: OrderedDict[str, None] = self._LRUCache__order  # type: ignore[attr-defined]
        if key in data:
            data[key] = item
            order.move_to_end(key)
            return
        size: int = self._Cache__currsize  # type: ignore[has-type]
        while size >= self._bound:
            old, _ = order.popitem(last=False)
            del data[old]
            size -= 1
            self.evictions += 1
        data[key] = item
        order[key] = None
        self._Cache__currsize = size + 1

    def put_many(self, pairs: Iterable[tuple[str, _Item]]) -> None:
        """``self[key] = item`` for each pair, in order, making room as ``__setitem__``
        does (the least recent entries go, counted). Where cachetools keeps no sizes
        (cachetools 8: ``getsizeof`` not given), straight on its dict, order and count,
        which saves its per-item Python calls (a batch backfill's main cost); else
        through ``__setitem__``."""
        if not self.direct:  # another cachetools: the slow way
            for key, item in pairs:
                self[key] = item
            return
        data: dict[str, _Item] = self._Cache__data  # type: ignore[attr-defined]
        order: OrderedDict[str, None] = self._LRUCache__order  # type: ignore[attr-defined]
        maxsize = self.maxsize
        size: int = getattr(self, "_Cache__currsize")  # noqa: B009 - cachetools' own count
        evicted = 0
        try:
            for key, item in pairs:
                if key in data:
                    data[key] = item
                    order.move_to_end(key)
                    continue
                while size >= maxsize:
                    old, _ = order.popitem(last=False)
                    del data[old]
                    size -= 1
                    evicted += 1
                data[key] = item
                order[key] = None
                size += 1
        finally:
            setattr(self, "_Cache__currsize", size)  # noqa: B010
            self.evictions += evicted


@dataclass(frozen=True)
class MemoryLayerStats:
    """A point-in-time view of a :class:`MemoryLayer`.

    ``entries`` counts stored entries (expired ones not yet removed included),
    ``maxsize`` is the bound, ``evictions`` counts entries removed to make room since
    the layer was created.
    """

    entries: int
    maxsize: int
    evictions: int


class MemoryLayer(BaseLayer):
    """An in-process cache layer, bounded to ``maxsize`` entries with LRU eviction.

    ``default_ttl`` (seconds, ``None`` for no expiry) applies to writes without a TTL;
    ``max_ttl`` caps every TTL. ``clock`` returns monotonic seconds and exists for
    tests. Raises :class:`~cachechain.ConfigError` for a bad ``maxsize`` or TTL.

    It keeps stamped entries (fail-safe copies: see :mod:`cachechain.layers._stamps`):
    ``set`` of a :class:`~cachechain.layers._stamps.Stamped` value keeps it for the
    whole ``ttl`` but serves it only while it is fresh; :meth:`get_fresh` reads one.
    """

    local = True
    #: Takes :class:`~cachechain.layers._stamps.Stamped` values (see the module).
    keeps_stamps = True

    def __init__(
        self,
        name: str = "L1",
        *,
        maxsize: int = 10_000,
        default_ttl: float | None = 300.0,
        max_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, default_ttl=default_ttl, max_ttl=max_ttl)
        self._data = _CountingLRU(check_count(maxsize, "maxsize"))
        # The cache's own dict and recency order (cachetools' private attributes: read
        # here once, checked, so a cachetools that renamed them fails at once).
        self._entries: dict[str, _Item] = self._data._Cache__data  # type: ignore[attr-defined]
        self._order: OrderedDict[str, None] = self._data._LRUCache__order  # type: ignore[attr-defined]
        if not isinstance(self._entries, dict) or not isinstance(self._order, OrderedDict):
            raise TypeError("cachetools.LRUCache changed its internals: update MemoryLayer")
        self._reads: deque[str] = deque(maxlen=_READS_KEPT)
        self._lock = threading.Lock()
        self._clock = clock
        _fork.track(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock and read buffer (the entries are kept)."""
        self._lock = threading.Lock()
        self._reads = deque(maxlen=_READS_KEPT)

    def get(self, key: str) -> Any:
        """Return the value under ``key``, or :data:`~cachechain.MISSING`."""
        item = self._entries.get(key, _ABSENT)  # no lock: see the module docstring
        if item is _ABSENT:
            return MISSING
        reads = self._reads
        reads.append(key)
        if len(reads) >= _REPLAY_AT:
            self._replay()
        expires = item[1]
        if expires is not None and expires <= self._clock():
            self._drop_if_same(key, item)
            return MISSING
        return item[0]

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """Return ``(value, remaining_seconds)`` or ``(MISSING, None)``."""
        item = self._read(key)
        if item is _ABSENT:
            return MISSING, None
        expires = item[1]
        if expires is None:
            return item[0], None
        now = self._clock()
        remaining = expires - now
        if len(item) > 2 and stamps_wanted():  # get_or_load's fail-safe read
            return _found(item, now)
        if remaining <= 0:
            self._drop_if_same(key, item)
            return MISSING, None
        return item[0], remaining

    def get_fresh(self, key: str) -> tuple[Any, float | None, float | None]:
        """Return ``(value, fresh_left, origin)`` for ``get_or_load``: the value while
        it is fresh, the seconds until its logical expiry (``None``: it never expires)
        and the TTL a stamped entry was stored with (``None`` for a plain entry);
        ``(MISSING, None, None)`` otherwise (an expired fail-safe copy is kept: read it
        with ``get_with_ttl`` in stamp reading mode)."""
        item = self._entries.get(key, _ABSENT)  # _read, inlined: get_or_load's hit path
        if item is _ABSENT:
            return MISSING, None, None
        reads = self._reads
        reads.append(key)
        if len(reads) >= _REPLAY_AT:
            self._replay()
        expires = item[1]
        if expires is None:
            return item[0], None, None
        left = expires - self._clock()
        if left > 0:  # a stamped entry has 4 fields; a plain one (a set's) 2
            return item[0], left, (item[3] if len(item) > 3 else None)
        self._drop_if_same(key, item)  # kept if it is a fail-safe copy
        return MISSING, None, None

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Return the live entries among ``keys`` (read without the lock, as :meth:`get`)."""
        entries = self._entries
        items: list[tuple[str, _Item]] = []
        for key in keys:
            item = entries.get(key, _ABSENT)
            if item is not _ABSENT:
                items.append((key, item))
        if items:
            reads = self._reads
            reads.extend(key for key, _ in items)
            if len(reads) >= _REPLAY_AT:
                self._replay()
        now = self._clock()
        found: dict[str, tuple[Any, float | None]] = {}
        for key, item in items:
            value, expires = item[0], item[1]
            if expires is None:
                found[key] = (value, None)
            elif expires > now:
                found[key] = (value, expires - now)
            else:
                self._drop_if_same(key, item)
        return found

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (default: ``default_ttl``); a
        :class:`~cachechain.layers._stamps.Stamped` value is stored as a stamped entry
        (fresh for its ``fresh`` seconds at most, kept for ``ttl``)."""
        ttl = self.effective_ttl(ttl)
        if value.__class__ is Stamped:
            item = _stamped(value, ttl, self._clock())
        else:
            item = (value, None if ttl is None else self._clock() + ttl)
        with self._lock:
            if self._reads:
                self._replay_locked()
            self._data.put(key, item)

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store every item under one lock acquisition; nothing is ever rejected."""
        ttl = self.effective_ttl(ttl)
        now = self._clock()
        expires = None if ttl is None else now + ttl
        data = self._data
        with self._lock:
            if self._reads:
                self._replay_locked()
            for key, value in items.items():
                if value.__class__ is Stamped:
                    data[key] = _stamped(value, ttl, now)
                else:
                    data[key] = (value, expires)
        return []

    def fill_many(self, items: Sequence[tuple[str, Any, float | None]]) -> None:
        """Store each ``(key, value, ttl)`` (``ttl``: seconds, a finite number > 0, or
        ``None`` for ``default_ttl``; capped by ``max_ttl``) under one lock
        acquisition and one clock read: a chain's backfill of a batch read from a lower
        layer (values of other layers, never :class:`Stamped`). Raises
        :class:`~cachechain.InvalidValueError` for a bad TTL (nothing is stored)."""
        now = self._clock()
        default, cap = self.default_ttl, self._max_ttl
        entries: list[tuple[str, _Item]] = []
        for key, value, ttl in items:
            if ttl is None:
                ttl = default
            elif ttl.__class__ is not float or not 0.0 < ttl < math.inf:
                ttl = self.effective_ttl(ttl)  # validated (raises for a bad one)
            if ttl is not None and cap is not None and ttl > cap:
                ttl = cap
            entries.append((key, (value, None if ttl is None else now + ttl)))
        with self._lock:
            if self._reads:
                self._replay_locked()
            self._data.put_many(entries)

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        with self._lock:
            self._data.pop(key, None)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key in ``keys`` under one lock acquisition."""
        data = self._data
        with self._lock:
            for key in keys:
                data.pop(key, None)

    # -- atomic operations (the chain's add/incr/decr/touch on an in-process chain) ------

    def _live(self, key: str, now: float) -> _Item | None:
        """The entry of ``key`` if it has not expired at ``now``; call under the lock."""
        item = self._data.get(key)
        if item is None or (item[1] is not None and item[1] <= now):
            return None
        return item

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` for ``ttl`` seconds (default: ``default_ttl``) unless ``key``
        holds a live entry; return whether it was stored. Atomic (under the layer's
        lock). Raises :class:`~cachechain.InvalidValueError` for an invalid TTL."""
        ttl = self.effective_ttl(ttl)
        now = self._clock()
        with self._lock:
            if self._live(key, now) is not None:
                return False
            if self._reads:  # an eviction must see the reads, as for any write
                self._replay_locked()
            self._data.put(key, (value, None if ttl is None else now + ttl))
            return True

    def incr(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` (``0 <= delta < 2**64``) to the counter ``key``, keeping its
        expiry; return the new value, or None when ``key`` is absent. Counters are
        signed 64-bit, with memcached's wrap-around (see
        :class:`~cachechain.layers.SupportsCounters`). Raises
        :class:`~cachechain.InvalidValueError` for a bad ``delta`` or a value that
        cannot be a counter."""
        return self._count(key, check_delta(delta), incr_value)

    def decr(self, key: str, delta: int = 1) -> int | None:
        """Subtract ``delta`` from the counter ``key``; a counter that is not negative
        stops at 0 (memcached's ``decr``). Otherwise as :meth:`incr`."""
        return self._count(key, check_delta(delta), decr_value)

    def _count(self, key: str, delta: int, apply: Callable[[int, int], int]) -> int | None:
        now = self._clock()
        with self._lock:
            item = self._live(key, now)
            if item is None:
                return None
            current = countable(item[0])
            if current is None:
                raise InvalidValueError(
                    f"the value of {key!r} is not a counter (an int or a decimal str in "
                    f"[-2**63, 2**63)): {type(item[0]).__name__}"
                )
            value = apply(current, delta)
            self._data[key] = (value, item[1])
            return value

    def touch(self, key: str, ttl: float | None = None) -> bool:
        """Make the live entry ``key`` expire ``ttl`` seconds from now (default:
        ``default_ttl``); return False when there is none. Raises
        :class:`~cachechain.InvalidValueError` for an invalid TTL."""
        ttl = self.effective_ttl(ttl)
        now = self._clock()
        with self._lock:
            item = self._live(key, now)
            if item is None:
                return False
            self._data[key] = (item[0], None if ttl is None else now + ttl)
            return True

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            self._data.clear()

    def expire(self) -> int:
        """Remove every expired entry now (a stamped one once its physical expiry has
        passed); return how many were removed."""
        now = self._clock()
        with self._lock:
            dead = [k for k, item in self._data.items() if _gone(item, now)]
            for key in dead:
                del self._data[key]
        return len(dead)

    def stats(self) -> MemoryLayerStats:
        """Return the entry count, the bound and the eviction count."""
        with self._lock:
            return MemoryLayerStats(
                entries=len(self._data),
                maxsize=int(self._data.maxsize),
                evictions=self._data.evictions,
            )

    def __len__(self) -> int:
        return len(self._data)

    # -- the read buffer ----------------------------------------------------------------

    def _read(self, key: str) -> _Item:
        """The entry of ``key`` (or :data:`_ABSENT`), read without the lock and recorded
        in the read buffer."""
        item: _Item = self._entries.get(key, _ABSENT)
        if item is not _ABSENT:
            reads = self._reads
            reads.append(key)
            if len(reads) >= _REPLAY_AT:
                self._replay()
        return item

    def _replay(self) -> None:
        """Replay the read buffer into the LRU order if the lock is free; else leave it
        to the thread that holds it (never waits)."""
        lock = self._lock
        if lock.acquire(False):
            try:
                self._replay_locked()
            finally:
                lock.release()

    def _replay_locked(self) -> None:
        """Move each key read since the last replay to the recent end of the LRU order,
        once however often it was read (a key gone since is skipped). Under the lock."""
        reads = self._reads
        batch: list[str] = []
        take = reads.popleft
        for _ in range(len(reads)):
            try:
                batch.append(take())
            except IndexError:  # pragma: no cover - another thread emptied it (3.13t)
                break
        order = self._order
        move = order.move_to_end
        for key in dict.fromkeys(batch):
            if key in order:  # not evicted or removed since it was read
                move(key)

    def _drop_if_same(self, key: str, item: _Item) -> None:
        """Remove an expired entry unless a writer replaced it since it was read, or it
        is a stamped entry within its physical TTL (a fail-safe copy, kept)."""
        if len(item) > 2 and not _gone(item, self._clock()):
            return
        with self._lock:
            if self._data.get(key) is item:
                del self._data[key]


def _stamped(value: Stamped, ttl: float | None, now: float) -> _Item:
    """The entry of a stamped value stored for ``ttl`` seconds (physical) at ``now``."""
    fresh = value.fresh if ttl is None else min(value.fresh, ttl)
    return (value.value, now + fresh, None if ttl is None else now + ttl, value.origin)


def _found(item: _Item, now: float) -> tuple[Any, float | None]:
    """A stamped entry as :meth:`MemoryLayer.get_with_ttl` answers it in reading mode:
    ``(Found, physical seconds left)``, or ``(MISSING, None)`` past its physical TTL."""
    expires_at = item[2]
    left = None if expires_at is None else expires_at - now
    if left is not None and left <= 0:
        return MISSING, None
    return Found(item[0], item[1] - now, item[3]), left


def _gone(item: _Item, now: float) -> bool:
    """Whether an entry is past its physical expiry (removable)."""
    expires = item[2] if len(item) > 2 else item[1]
    return expires is not None and expires <= now
