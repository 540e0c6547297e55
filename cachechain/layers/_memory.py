"""MemoryLayer: a bounded, thread-safe, in-process layer with per-entry TTLs.

One ``OrderedDict`` holds the entries, least recently used first: an LRU of its own
(cachetools' ``LRUCache`` before 0.3: see docs/design.md, "Memory per entry"), written
under one ``threading.Lock``. What an entry is tells the reader all it needs:

- without a TTL, the value itself;
- with a TTL, an :class:`_Expiring`: a ``float`` subclass whose float is the expiry (on
  a monotonic clock) and whose one slot holds the value (48 bytes; the tuple and the
  float it replaced took 80);
- a stamped entry (``get_or_load``'s fail-safe, :mod:`cachechain.layers._stamps`), a
  :class:`_Stamp`: an ``_Expiring`` whose float is its *logical* expiry, with two
  slots more, its physical expiry (``expires_at``) and the TTL it was stored with.

Reads tell them apart by their exact class (``item.__class__ is _Expiring``, as ``set``
tells a ``Stamped`` value), which no caller's value has (both classes are private and
their instances never leave the layer, so not even a proxy's ``__class__`` can name
them). A TTL costs one comparison on a hit; an entry without one costs no clock read.
A stamped entry reads as an entry with a TTL (past its logical expiry, a miss) and is
removed only once its physical expiry has passed. Expired entries are removed when
they are next read, and by :meth:`MemoryLayer.expire`; LRU eviction bounds the size
either way. Values are stored by reference: do not mutate a value after caching it.

**Reads take no lock** (issue 14), as in Caffeine: a read looks the key up in the
entries (one ``dict.get``, bound once: ``OrderedDict`` inherits it from ``dict``) and
records the key in a bounded *read buffer* (a ``deque``, whose ``append`` is atomic);
the LRU order is brought up to date from the buffer by whichever thread next holds the
lock: a writer before it writes (so an eviction sees the reads), or a reader that finds
the buffer full enough and the lock free (``lock.locked()`` first: a reader waits only
for a writer that took the lock in between; never ``acquire(blocking=False)`` then
``try``, which a signal raised as the acquire returns would leave held). Each key is
moved once per replay however often it was read; a buffer past its bound drops its
oldest reads, and a replay drops the reads recorded while it takes the buffer (between
its ``copy`` and its ``clear``): the recency order is approximate,
exactly what a read sees is not. With threads on several CPUs a lock taken by every
read made a convoy: 16 threads read a seventh of one thread's hits.

Why a read without the lock is right: an entry is built whole (its float and its slots
set) before the one store that publishes it under its key, and is never changed after:
every write, ``incr`` and ``touch`` included, stores a new entry. So the one lookup of a
read yields one whole entry, the value with its own expiry, the one its key held before
or after any write running at the same time (as with the lock); never a value with the
expiry of another write (a design keeping the expiry apart from the value would need two
lookups, and a writer between them could pair a new value with an old expiry), nor an
entry of another key (an entry is stored under one key only). The ``OrderedDict``'s own
links (the order) are read and changed only under the lock. Under the GIL each
lock-free step is one operation on a built-in container. On a free-threaded Python
(3.13t) ``dict.get`` (the dict inside the ``OrderedDict``: the ``OrderedDict``'s own
methods run only under the layer's lock) and the deque's ``append``, ``copy`` and
``clear`` are thread-safe on their own: each takes its object's lock, or reads without
one against stores that publish a whole object, so an entry is seen with the float and
slots it was built with; correctness does not rest on the GIL, only the speed figures
do.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from .. import _fork
from .._errors import InvalidValueError
from .._validate import check_count
from ._base import MISSING, BaseLayer
from ._counters import check_delta, countable, decr_value, incr_value
from ._stamps import Found, Stamped, stamps_wanted

__all__ = ["MemoryLayer", "MemoryLayerStats"]


class _Expiring(float):
    """An entry with a TTL: the float is its expiry (the layer's clock, seconds),
    :attr:`value` the value. Never changed once stored (see the module)."""

    __slots__ = ("value",)

    value: Any


class _Stamp(_Expiring):
    """A stamped entry: the float is its logical expiry (the end of its freshness),
    :attr:`expires_at` its physical one (``None``: never), :attr:`origin` the TTL it
    was loaded with (seconds)."""

    __slots__ = ("expires_at", "origin")

    expires_at: float | None
    origin: float


#: An entry: a value (no TTL), an :class:`_Expiring` or a :class:`_Stamp`.
_Item = Any

#: What a lookup of an absent key returns (a private object: no value is it).
_ABSENT: Any = object()

#: Reads recorded before a reader tries to replay them into the LRU order.
_REPLAY_AT = 64
#: The most reads the buffer keeps (older ones are dropped: recency is approximate).
_READS_KEPT = 4096


def _expiring(value: Any, expires: float) -> _Expiring:
    """The entry of ``value`` expiring at ``expires``."""
    item = _Expiring(expires)
    item.value = value
    return item


def _backfills(
    hits: Mapping[str, tuple[Any, float | None]], now: float, layer: BaseLayer
) -> dict[str, _Item]:
    """The entries of :meth:`MemoryLayer.fill_many`'s ``hits`` at ``now`` (see there):
    the usual float TTL in one test, any other through ``layer.effective_ttl`` (the
    default for ``None``, the cap, and an error for a bad one)."""
    cap = layer.max_ttl
    limit = sys.float_info.max if cap is None else cap  # finite: inf and NaN fail
    entries: dict[str, _Item] = {}
    for key, (value, ttl) in hits.items():
        if ttl.__class__ is not float or not 0.0 < ttl <= limit:
            if _spent(ttl):
                continue  # a TTL the lower layer cannot tell, or none left
            ttl = layer.effective_ttl(ttl)
            if ttl is None:
                entries[key] = value
                continue
        item = entries[key] = _Expiring(now + ttl)
        item.value = value
    return entries


def _spent(ttl: object) -> bool:
    """Whether ``ttl`` (a remaining TTL a lower layer gave) is a number that is not
    > 0: ``0.0`` (it cannot tell), below 0 or NaN (none left)."""
    return ttl.__class__ is not bool and isinstance(ttl, (int, float)) and not ttl > 0.0


class _LRU:
    """The entries, least recently used first, bounded to ``maxsize``; writes make room
    by evicting the least recent entries, counted in :attr:`evictions`. Not locked:
    the layer calls it under its lock."""

    __slots__ = ("entries", "evictions", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.entries: OrderedDict[str, _Item] = OrderedDict()
        self.maxsize = maxsize
        self.evictions = 0

    def put(self, key: str, item: _Item) -> None:
        """Store ``item`` under ``key`` as the most recent entry, evicting the least
        recent one if ``key`` is new and the layer is full."""
        entries = self.entries
        if key in entries:
            entries[key] = item
            entries.move_to_end(key)
            return
        if len(entries) >= self.maxsize:
            entries.popitem(last=False)
            self.evictions += 1
        entries[key] = item

    def put_many(self, batch: dict[str, _Item]) -> None:
        """Store every item of ``batch`` as the most recent entries (issue 14: a batch
        backfill), with C-level steps doing the per-item work: the keys already held
        take their new item in place and move to the recent end (a lock-free reader
        never misses one), the least recent other entries make room for the new keys
        (counted in :attr:`evictions`), and the new keys join in ``batch``'s order
        with one ``update``. The entries end as a :meth:`put` of each item in turn
        leaves them but for the order among the batch's own items (the held ones
        first), and no fewer entries are kept. A batch larger than ``maxsize`` is
        put item by item."""
        entries, maxsize = self.entries, self.maxsize
        if len(batch) > maxsize:
            for key, item in batch.items():
                self.put(key, item)
            return
        held = entries.keys() & batch.keys()  # iterates the smaller of the two
        for key in held:
            entries[key] = batch[key]
            entries.move_to_end(key)
        # With len(batch) <= maxsize, the entries evicted are never the batch's own.
        excess = len(entries) + len(batch) - len(held) - maxsize
        if excess > 0:
            self.evictions += excess
            # ``popitem(False)`` ``excess`` times, the loop in C (a consumed ``map``).
            deque(map(entries.popitem, repeat(False, excess)), 0)
        entries.update(batch)  # the held keys again, in place: same items

    def live(self, key: str, now: float) -> _Item:
        """The entry of ``key`` if it has not expired (a stamped one: its logical
        expiry) at ``now``, else :data:`_ABSENT`."""
        item = self.entries.get(key, _ABSENT)
        if _timed(item) and item <= now:
            return _ABSENT
        return item

    def drop_gone(self, now: float) -> int:
        """Remove every entry past its physical expiry at ``now``; return how many."""
        entries = self.entries
        dead = [key for key, item in entries.items() if _gone(item, now)]
        for key in dead:
            del entries[key]
        return len(dead)

    def put_back(self, aside: Mapping[str, _Item], now: float) -> int:
        """Put ``aside``'s entries (least recent first) back as the least recent ones:
        those whose key is not held now and that have not expired at ``now``, as many
        as there is room for, the most recent of them first. Return how many."""
        entries = self.entries
        room = self.maxsize - len(entries)
        if room <= 0:
            return 0
        back = [
            (key, item)
            for key, item in aside.items()
            if key not in entries and not _gone(item, now)
        ][-room:]
        move = entries.move_to_end
        for key, item in reversed(back):  # the most recent first, each to the front
            entries[key] = item
            move(key, last=False)
        return len(back)


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


class _TupleView(Mapping[str, tuple[Any, ...]]):
    """The entries as tuples: ``(value, expires_at)`` (``expires_at`` ``None``: no
    TTL) or, stamped, ``(value, fresh_until, expires_at, origin)``; for tests and
    debugging (read it with no other thread writing)."""

    def __init__(self, entries: OrderedDict[str, _Item]) -> None:
        self._entries = entries

    def __getitem__(self, key: str) -> tuple[Any, ...]:
        return _as_tuple(self._entries[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


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
        self._store = _LRU(check_count(maxsize, "maxsize"))
        self._entries = self._store.entries
        #: The lock-free lookup, bound once (``OrderedDict`` looks ``get`` up slower
        #: than ``dict`` does, through its instance dict).
        self._lookup: Callable[[str, Any], _Item] = self._entries.get
        self._reads: deque[str] = deque(maxlen=_READS_KEPT)
        self._lock = threading.Lock()
        self._clock = clock
        _fork.track(self)

    @property
    def _data(self) -> Mapping[str, tuple[Any, ...]]:
        """The entries as tuples (see :class:`_TupleView`), for tests and debugging."""
        return _TupleView(self._entries)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock and read buffer (the entries are kept)."""
        self._lock = threading.Lock()
        self._reads = deque(maxlen=_READS_KEPT)

    def get(self, key: str) -> Any:
        """Return the value under ``key``, or :data:`~cachechain.MISSING`."""
        # The hot path (issue 14): bound methods read into locals (``self._lookup(...)``
        # is a lookup CPython 3.11 does not specialize: ~10 ns a hit), the exact class
        # read with ``__class__`` (~5 ns less than ``type()``), an entry with a TTL
        # tested first (the default).
        lookup = self._lookup
        item = lookup(key, _ABSENT)  # no lock: see the module docstring
        if item is _ABSENT:
            return MISSING
        reads = self._reads
        reads.append(key)
        if len(reads) >= _REPLAY_AT:
            self._replay()
        if item.__class__ is _Expiring:
            clock = self._clock
            if item > clock():
                return item.value
            self._drop_if_same(key, item)
            return MISSING
        if item.__class__ is _Stamp:  # read to its logical expiry, as any TTL
            if item > self._clock():
                return item.value
            self._drop_if_same(key, item)  # kept if it is a fail-safe copy
            return MISSING
        return item

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """Return ``(value, remaining_seconds)`` or ``(MISSING, None)``."""
        item = self._read(key)
        kind = item.__class__
        if kind is _Expiring or kind is _Stamp:
            now = self._clock()
            if kind is _Stamp and stamps_wanted():  # get_or_load's fail-safe read
                return _found(item, now)
            remaining = item - now
            if remaining > 0:
                return item.value, remaining
            self._drop_if_same(key, item)
            return MISSING, None
        if item is _ABSENT:
            return MISSING, None
        return item, None

    def get_fresh(self, key: str) -> tuple[Any, float | None, float | None]:
        """Return ``(value, fresh_left, origin)`` for ``get_or_load``: the value while
        it is fresh, the seconds until its logical expiry (``None``: it never expires)
        and the TTL a stamped entry was stored with (``None`` for a plain entry);
        ``(MISSING, None, None)`` otherwise (an expired fail-safe copy is kept: read it
        with ``get_with_ttl`` in stamp reading mode)."""
        lookup = self._lookup  # _read, inlined: get_or_load's hit path (see get)
        item = lookup(key, _ABSENT)
        if item is _ABSENT:
            return MISSING, None, None
        reads = self._reads
        reads.append(key)
        if len(reads) >= _REPLAY_AT:
            self._replay()
        kind = item.__class__
        if kind is _Expiring or kind is _Stamp:
            clock = self._clock
            left = item - clock()
            if left > 0:
                return item.value, left, (item.origin if kind is _Stamp else None)
            self._drop_if_same(key, item)  # kept if it is a fail-safe copy
            return MISSING, None, None
        return item, None, None

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Return the live entries among ``keys`` (read without the lock, as :meth:`get`)."""
        shape = keys.__class__
        if (shape is list or shape is tuple) and self._entries.keys().isdisjoint(keys):
            return {}  # none held: one pass in C over ``keys`` (issue 14)
        lookup = self._lookup
        items = [(key, item) for key in keys if (item := lookup(key, _ABSENT)) is not _ABSENT]
        if items:
            reads = self._reads
            reads.extend(key for key, _ in items)
            if len(reads) >= _REPLAY_AT:
                self._replay()
        now = self._clock()
        found: dict[str, tuple[Any, float | None]] = {}
        for key, item in items:
            kind = item.__class__
            if kind is not _Expiring and kind is not _Stamp:
                found[key] = (item, None)
            elif item > now:
                found[key] = (item.value, item - now)
            else:
                self._drop_if_same(key, item)
        return found

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (default: ``default_ttl``); a
        :class:`~cachechain.layers._stamps.Stamped` value is stored as a stamped entry
        (fresh for its ``fresh`` seconds at most, kept for ``ttl``)."""
        ttl = self.effective_ttl(ttl)
        item: _Item
        if value.__class__ is Stamped:
            item = _stamped(value, ttl, self._clock())
        elif ttl is None:
            item = value
        else:
            item = _Expiring(self._clock() + ttl)
            item.value = value
        with self._lock:  # never acquire() then try (see _fence's _WITH_ONLY)
            if self._reads:
                self._replay_locked()
            self._store.put(key, item)

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store every item under one lock acquisition; nothing is ever rejected."""
        ttl = self.effective_ttl(ttl)
        now = self._clock()
        expires = None if ttl is None else now + ttl
        entries: dict[str, _Item] = {}
        for key, value in items.items():
            if value.__class__ is Stamped:
                entries[key] = _stamped(value, ttl, now)
            else:
                entries[key] = value if expires is None else _expiring(value, expires)
        with self._lock:
            if self._reads:
                self._replay_locked()
            self._store.put_many(entries)
        return []

    def fill(self, key: str, value: Any, ttl: float | None) -> None:
        """:meth:`fill_many` of one item (a chain's backfill of an L2 hit): ``set``
        without its checks for the TTL a lower layer gave (a finite float > 0, or
        ``None`` for ``default_ttl``; capped by ``max_ttl``); anything else goes
        through :meth:`set`, which raises :class:`~cachechain.InvalidValueError` for a
        bad TTL."""
        if ttl is None:
            ttl = self.default_ttl
        elif ttl.__class__ is not float or not 0.0 < ttl < math.inf:
            self.set(key, value, ttl)
            return
        if value.__class__ is Stamped:
            self.set(key, value, ttl)
            return
        item: _Item = value
        if ttl is not None:
            cap = self._max_ttl
            item = _Expiring(self._clock() + (ttl if cap is None or ttl <= cap else cap))
            item.value = value
        with self._lock:  # never acquire() then try (see _fence's _WITH_ONLY)
            if self._reads:
                self._replay_locked()
            self._store.put(key, item)

    def fill_many(self, hits: Mapping[str, tuple[Any, float | None]]) -> None:
        """Store each ``key: (value, ttl)`` of ``hits`` under one lock acquisition and
        one clock read: a chain's backfill of a batch read from a lower layer (values
        of other layers, never :class:`Stamped`), in that layer's own shape. ``ttl``
        is what the value has left there: seconds, a finite number > 0 (capped by
        ``max_ttl``), ``None`` for no expiry there (``default_ttl``), or a number that is
        not > 0 (``0.0``: that layer cannot tell, a memcached counter; below 0 or
        NaN: none is left) for an item skipped, as a copy must not outlive its
        source. Raises
        :class:`~cachechain.InvalidValueError` for any other TTL (nothing is
        stored)."""
        entries = _backfills(hits, self._clock(), self)
        with self._lock:
            if self._reads:
                self._replay_locked()
            self._store.put_many(entries)

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        with self._lock:
            self._entries.pop(key, None)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key in ``keys`` under one lock acquisition."""
        entries = self._entries
        with self._lock:
            for key in keys:
                entries.pop(key, None)

    # -- atomic operations (the chain's add/incr/decr/touch on an in-process chain) ------

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` for ``ttl`` seconds (default: ``default_ttl``) unless ``key``
        holds a live entry; return whether it was stored. Atomic (under the layer's
        lock). Raises :class:`~cachechain.InvalidValueError` for an invalid TTL."""
        ttl = self.effective_ttl(ttl)
        now = self._clock()
        with self._lock:
            if self._store.live(key, now) is not _ABSENT:
                return False
            if self._reads:  # an eviction must see the reads, as for any write
                self._replay_locked()
            self._store.put(key, value if ttl is None else _expiring(value, now + ttl))
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
            item = self._store.live(key, now)
            if item is _ABSENT:
                return None
            timed = _timed(item)
            stored = item.value if timed else item
            current = countable(stored)
            if current is None:
                raise InvalidValueError(
                    f"the value of {key!r} is not a counter (an int or a decimal str in "
                    f"[-2**63, 2**63)): {type(stored).__name__}"
                )
            value = apply(current, delta)
            # A new entry (entries never change: see the module), with the same expiry
            # (a stamped entry's logical one: a counter is no fail-safe copy).
            self._store.put(key, _expiring(value, float(item)) if timed else value)
            return value

    def touch(self, key: str, ttl: float | None = None) -> bool:
        """Make the live entry ``key`` expire ``ttl`` seconds from now (default:
        ``default_ttl``); return False when there is none. Raises
        :class:`~cachechain.InvalidValueError` for an invalid TTL."""
        ttl = self.effective_ttl(ttl)
        now = self._clock()
        with self._lock:
            item = self._store.live(key, now)
            if item is _ABSENT:
                return False
            value = item.value if _timed(item) else item
            self._store.put(key, value if ttl is None else _expiring(value, now + ttl))
            return True

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            self._entries.clear()

    def set_aside(self) -> Mapping[str, object]:
        """Empty the layer and return what it held, for :meth:`bring_back`: its
        entries, least recent first (opaque items: each value with its expiry). A
        chain's coherence sets its entries aside while it cannot hear other processes'
        changes in time, instead of dropping them."""
        with self._lock:
            if self._reads:
                self._replay_locked()
            held = self._store
            fresh = _LRU(held.maxsize)  # swapped in, not copied: O(1) under the lock
            fresh.evictions = held.evictions
            self._store, self._entries, self._lookup = fresh, fresh.entries, fresh.entries.get
        return held.entries

    def bring_back(self, aside: Mapping[str, object]) -> int:
        """Put back entries that :meth:`set_aside` returned, as the least recent ones:
        each whose key the layer holds no entry of now and that has not expired, as
        many as there is room for (the most recent of them first). Return how many
        were put back."""
        now = self._clock()
        with self._lock:
            return self._store.put_back(aside, now)

    def expire(self) -> int:
        """Remove every expired entry now (a stamped one once its physical expiry has
        passed); return how many were removed."""
        now = self._clock()
        with self._lock:
            return self._store.drop_gone(now)

    def stats(self) -> MemoryLayerStats:
        """Return the entry count, the bound and the eviction count."""
        store = self._store
        with self._lock:
            return MemoryLayerStats(len(store.entries), store.maxsize, store.evictions)

    def __len__(self) -> int:
        return len(self._entries)

    # -- the read buffer ----------------------------------------------------------------

    def _read(self, key: str) -> _Item:
        """The entry of ``key`` (or :data:`_ABSENT`), read without the lock and recorded
        in the read buffer."""
        lookup = self._lookup
        item = lookup(key, _ABSENT)
        if item is not _ABSENT:
            reads = self._reads
            reads.append(key)
            if len(reads) >= _REPLAY_AT:
                self._replay()
        return item

    def _replay(self) -> None:
        """Replay the read buffer into the LRU order if the lock is free; else leave it
        to the thread that holds it. The lock is taken with ``with`` once seen free (a
        reader waits only for a writer that took it in between): ``acquire(False)``
        then ``try`` would leave it held for good if a signal raised as the acquire
        returned (see :mod:`cachechain._fence`)."""
        lock = self._lock
        if not lock.locked():
            with lock:
                self._replay_locked()

    def _replay_locked(self) -> None:
        """Move each key read since the last replay to the recent end of the LRU order,
        once however often it was read, in the order of their first reads (a key gone
        since is skipped). Under the lock.

        The buffer is taken whole by ``copy`` (one C call that runs no Python code: no
        other thread appends meanwhile under the GIL; on 3.13t it holds the deque's
        lock), then cleared: reads recorded between the two are dropped, as reads past
        the buffer's bound are (recency is approximate). Half the cost of popping the
        reads one by one (1.8 against 3.8 us for 64 reads of one key)."""
        reads = self._reads
        batch = reads.copy()
        reads.clear()
        entries = self._entries
        move = entries.move_to_end
        for key in dict.fromkeys(batch):
            if key in entries:  # not evicted or removed since it was read
                move(key)

    def _drop_if_same(self, key: str, item: _Item) -> None:
        """Remove an expired entry unless a writer replaced it since it was read, or it
        is a stamped entry within its physical TTL (a fail-safe copy, kept)."""
        if type(item) is _Stamp and not _gone(item, self._clock()):
            return
        with self._lock:
            entries = self._entries
            if entries.get(key, _ABSENT) is item:
                del entries[key]


def _stamped(value: Stamped, ttl: float | None, now: float) -> _Stamp:
    """The entry of a stamped value stored for ``ttl`` seconds (physical) at ``now``."""
    fresh = value.fresh if ttl is None else min(value.fresh, ttl)
    item = _Stamp(now + fresh)
    item.value = value.value
    item.expires_at = None if ttl is None else now + ttl
    item.origin = value.origin
    return item


def _found(item: _Stamp, now: float) -> tuple[Any, float | None]:
    """A stamped entry as :meth:`MemoryLayer.get_with_ttl` answers it in reading mode:
    ``(Found, physical seconds left)``, or ``(MISSING, None)`` past its physical TTL."""
    expires_at = item.expires_at
    left = None if expires_at is None else expires_at - now
    if left is not None and left <= 0:
        return MISSING, None
    return Found(item.value, item - now, item.origin), left


def _timed(item: _Item) -> bool:
    """Whether an entry has an expiry (an :class:`_Expiring` or a :class:`_Stamp`)."""
    kind = type(item)
    return kind is _Expiring or kind is _Stamp


def _gone(item: _Item, now: float) -> bool:
    """Whether an entry is past its physical expiry (removable)."""
    kind = type(item)
    if kind is _Expiring:
        return bool(item <= now)
    if kind is _Stamp:
        return item.expires_at is not None and item.expires_at <= now
    return False


def _as_tuple(item: _Item) -> tuple[Any, ...]:
    """An entry in the tuple form of :class:`_TupleView`."""
    kind = type(item)
    if kind is _Stamp:
        return (item.value, float(item), item.expires_at, item.origin)
    if kind is _Expiring:
        return (item.value, float(item))
    return (item, None)
