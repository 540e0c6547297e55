"""Fakes for injecting faults and time: a fake clock, a scriptable fake layer, and
``Boom``, whose unpickling leaves a trace (to prove nothing unpickles untrusted bytes)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cachechain.layers._base import MISSING, BaseLayer

#: Calls made by unpickling a Boom; the tests' conftest clears it before each test.
UNPICKLED: list[str] = []


def _unpickled(tag: str) -> None:
    UNPICKLED.append(tag)


class Boom:
    """Unpickling it appends to :data:`UNPICKLED`: proof that a pickle was (or was not)
    loaded."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _unpickled, ("boom",)


class FakeClock:
    """A clock that moves only when told to: ``clock()`` returns the current time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class FakeLayer(BaseLayer):
    """A dict-backed layer that records its calls and fails or blocks on demand.

    ``fail`` (an exception instance or None) is raised by every operation while set.
    ``block_get`` (an Event) makes ``get_with_ttl``/``get_many_with_ttl`` wait for it;
    ``entered`` is set when a blocked call has started. ``block_set`` and
    ``block_delete`` (Events) make ``set`` / ``delete`` wait for them before they change
    anything; ``write_entered`` is set when such a write has started. ``local`` may be set per
    fake.
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
            raise self.fail

    def _hold_write(self, gate: threading.Event | None) -> None:
        if gate is not None:
            self.write_entered.set()
            gate.wait(10)

    def ops(self, op: str) -> list[Any]:
        """The arguments of every call of ``op`` so far."""
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
        self._enter("get", key)
        result = self._read(key)
        if self.block_get is not None:
            self.entered.set()
            self.block_get.wait(10)
        return result

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        self._enter("get_many", list(keys))
        found = {}
        for key in keys:
            value, ttl = self._read(key)
            if value is not MISSING:
                found[key] = (value, ttl)
        return found

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        self._hold_write(self.block_set)
        self._enter("set", key)
        ttl = self.effective_ttl(ttl)
        self.data[key] = (value, None if ttl is None else self.clock() + ttl)

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        self._enter("set_many", list(items))
        ttl = self.effective_ttl(ttl)
        for key, value in items.items():
            self.data[key] = (value, None if ttl is None else self.clock() + ttl)
        return []

    def delete(self, key: str) -> None:
        self._hold_write(self.block_delete)
        self._enter("delete", key)
        self.data.pop(key, None)

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._enter("delete_many", keys)
        for key in keys:
            self.data.pop(key, None)

    def close(self) -> None:
        self.closed = True


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
