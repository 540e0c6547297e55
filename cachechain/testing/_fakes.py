"""Test doubles: a clock that moves only when told to, and a scriptable in-memory layer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .._errors import InvalidValueError
from ..layers._base import MISSING, BaseLayer
from ..layers._counters import check_delta, countable, decr_value, incr_value

__all__ = ["FakeClock", "FakeLayer"]

#: Seconds a blocked FakeLayer call waits for its gate before it goes on anyway.
_GATE_WAIT = 10.0


class FakeClock:
    """A clock that moves only when told to: ``clock()`` returns :attr:`now`, in
    seconds (``start``, 1000.0 by default). Pass it wherever cachechain takes a
    ``clock`` callable (layers, breakers, collectors). Thread-safe."""

    def __init__(self, start: float = 1000.0) -> None:
        #: The current time, seconds.
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """Return the current time, seconds."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (a negative number moves it back)."""
        with self._lock:
            self.now += seconds


class FakeLayer(BaseLayer):
    """A dict-backed layer that records its calls and fails or blocks on demand.

    It keeps the whole :class:`~cachechain.layers.CacheLayer` contract (TTLs in seconds
    on ``clock``, a :class:`FakeClock` by default; ``default_ttl`` and ``max_ttl`` as in
    :class:`~cachechain.layers.BaseLayer`; every value and key stored as given), and
    adds levers for tests:

    - ``fail`` (an exception instance or ``None``) is raised by every operation while set;
    - ``block_get`` (an Event) makes ``get_with_ttl`` wait for it (10 s at most) after it
      has read; :attr:`entered` is set when such a call has started;
    - ``block_set`` and ``block_delete`` (Events) make ``set`` / ``delete`` wait for them
      before they change anything; :attr:`write_entered` is set when such a write has
      started;
    - it has the atomic operations ``add``, ``incr``, ``decr`` and ``touch`` (with
      memcached's counter arithmetic), so it can be a chain's shared layer;
    - :attr:`calls` lists ``(operation, argument)`` for every call (see :meth:`ops`),
      :attr:`data` holds ``key -> (value, expires_at or None)``, :attr:`closed` tells
      whether :meth:`close` was called, and ``local`` may be set per fake.

    Raises :class:`~cachechain.ConfigError` for a bad name or TTL setting, and
    :class:`~cachechain.InvalidValueError` for a write with an invalid TTL.
    """

    def __init__(
        self,
        name: str,
        *,
        local: bool = False,
        clock: FakeClock | None = None,
        default_ttl: float | None = None,
        max_ttl: float | None = None,
    ) -> None:
        super().__init__(name, default_ttl=default_ttl, max_ttl=max_ttl)
        self.local = local
        self.clock = clock or FakeClock()
        self.data: dict[str, tuple[Any, float | None]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.fail: BaseException | None = None
        self.block_get: threading.Event | None = None
        self.entered = threading.Event()
        self.block_set: threading.Event | None = None
        self.block_delete: threading.Event | None = None
        self.write_entered = threading.Event()
        self.closed = False
        self._lock = threading.Lock()

    def _enter(self, op: str, arg: Any) -> None:
        with self._lock:
            self.calls.append((op, arg))
        if self.fail is not None:
            # One instance raised many times: start its traceback afresh each time,
            # or it grows by every frame of every raise (and keeps them alive).
            raise self.fail.with_traceback(None)

    def _hold_write(self, gate: threading.Event | None) -> None:
        if gate is not None:
            self.write_entered.set()
            gate.wait(_GATE_WAIT)

    def ops(self, op: str) -> list[Any]:
        """The arguments of every call of ``op`` (``"get"``, ``"get_many"``, ``"set"``,
        ``"set_many"``, ``"delete"``, ``"delete_many"``, ``"add"``, ``"incr"``,
        ``"decr"``, ``"touch"``) so far, oldest first."""
        with self._lock:
            return [a for o, a in self.calls if o == op]

    def _read(self, key: str) -> tuple[Any, float | None]:
        item = self.data.get(key)
        if item is None:
            return MISSING, None
        value, expires = item
        if expires is None:
            return value, None
        remaining = expires - self.clock()
        if remaining <= 0:
            return MISSING, None
        return value, remaining

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """Return ``(value, remaining_seconds_or_None)`` or ``(MISSING, None)``;
        recorded as ``"get"``."""
        self._enter("get", key)
        result = self._read(key)
        if self.block_get is not None:
            self.entered.set()
            self.block_get.wait(_GATE_WAIT)
        return result

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Return the live entries among ``keys``; recorded once as ``"get_many"``."""
        self._enter("get_many", list(keys))
        found = {}
        for key in keys:
            value, ttl = self._read(key)
            if value is not MISSING:
                found[key] = (value, ttl)
        return found

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (``None``: ``default_ttl``)."""
        self._hold_write(self.block_set)
        self._enter("set", key)
        ttl = self.effective_ttl(ttl)
        self.data[key] = (value, None if ttl is None else self.clock() + ttl)

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store every item (none is ever rejected: returns ``[]``)."""
        self._enter("set_many", list(items))
        ttl = self.effective_ttl(ttl)
        for key, value in items.items():
            self.data[key] = (value, None if ttl is None else self.clock() + ttl)
        return []

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        self._hold_write(self.block_delete)
        self._enter("delete", key)
        self.data.pop(key, None)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key in ``keys``; recorded once as ``"delete_many"``."""
        keys = list(keys)
        self._enter("delete_many", keys)
        for key in keys:
            self.data.pop(key, None)

    # -- the atomic operations (SupportsAdd, SupportsCounters, SupportsTouch) -----------

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` unless ``key`` holds a live value; return whether it did.
        Recorded as ``"add"``."""
        self._enter("add", key)
        ttl = self.effective_ttl(ttl)
        with self._lock:
            if self._read(key)[0] is not MISSING:
                return False
            self.data[key] = (value, None if ttl is None else self.clock() + ttl)
            return True

    def incr(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` to the counter ``key`` with memcached's arithmetic (see
        :class:`~cachechain.layers.SupportsCounters`); None when absent. Recorded as
        ``"incr"``. Raises :class:`~cachechain.InvalidValueError` for a bad ``delta``
        or a value that cannot be a counter."""
        self._enter("incr", key)
        return self._count(key, check_delta(delta), incr_value)

    def decr(self, key: str, delta: int = 1) -> int | None:
        """Subtract ``delta`` (a counter that is not negative stops at 0); as
        :meth:`incr` otherwise. Recorded as ``"decr"``."""
        self._enter("decr", key)
        return self._count(key, check_delta(delta), decr_value)

    def _count(self, key: str, delta: int, apply: Callable[[int, int], int]) -> int | None:
        with self._lock:
            value = self._read(key)[0]
            if value is MISSING:
                return None
            current = countable(value)
            if current is None:
                raise InvalidValueError(f"the value of {key!r} is not a counter: {value!r}")
            new = apply(current, delta)
            self.data[key] = (new, self.data[key][1])
            return new

    def touch(self, key: str, ttl: float | None = None) -> bool:
        """Give the live entry ``key`` a new TTL; return False when there is none.
        Recorded as ``"touch"``."""
        self._enter("touch", key)
        ttl = self.effective_ttl(ttl)
        with self._lock:
            value = self._read(key)[0]
            if value is MISSING:
                return False
            self.data[key] = (value, None if ttl is None else self.clock() + ttl)
            return True

    def close(self) -> None:
        """Mark the layer closed (:attr:`closed`); it goes on working. Idempotent."""
        self.closed = True
