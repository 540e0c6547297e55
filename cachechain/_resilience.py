"""ResilientLayer: a cache layer behind a circuit breaker, with slow calls counted.

:class:`ResilientLayer` wraps any :class:`~cachechain.layers.base.CacheLayer` and is
one itself. Every operation asks the layer's :class:`CircuitBreaker` first: while the
breaker is open the call raises :class:`~cachechain.errors.CircuitOpenError` at once and
the wrapped layer is not touched. Otherwise the operation runs on the caller's thread
(the breaker's lock is not held meanwhile) and its outcome is reported:

* it returned (a miss included) within ``timeout`` seconds: a success;
* it returned, but took longer than ``timeout`` in total: a failure (a slow call); its
  result is still returned;
* it raised an error for which :func:`~cachechain.errors.trips_breaker` is true (a
  backend error, a :class:`~cachechain.errors.LayerTimeoutError`, any exception
  cachechain does not know): a failure;
* it raised anything else (:class:`~cachechain.errors.InvalidKeyError`,
  :class:`~cachechain.errors.InvalidValueError`, an exhausted pool, an interrupt):
  neutral, nothing counted.

The exception, if any, is re-raised unchanged. No thread ever waits for a call: the
wrapped layer enforces its own timeout (the memcached layer on its socket), and the
wrapper only measures how long the call took.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from ._breaker import BreakerStats, CircuitBreaker, CircuitState
from ._errors import ConfigError
from .layers._base import CacheLayer

__all__ = ["BreakerStats", "CircuitBreaker", "CircuitState", "ResilientLayer"]

T = TypeVar("T")


def _check_timeout(value: object, field: str) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{field} must be a finite number of seconds > 0 or None, got {value!r}")
    return float(value)


class ResilientLayer:
    """``layer`` guarded by ``breaker``, with calls slower than ``timeout`` counted as
    failures. Implements the whole :class:`~cachechain.layers.base.CacheLayer` protocol.

    ``breaker`` defaults to ``CircuitBreaker(layer.name)``. ``timeout`` (seconds,
    ``None`` = no slow-call check) defaults to the wrapped layer's ``timeout`` plus its
    ``connect_timeout`` when it has them (a socket timeout bounds each read, and a
    healthy call may also have to connect). ``clock`` returns monotonic seconds and
    times each call. Raises
    :class:`~cachechain.errors.ConfigError` for a layer that is not a ``CacheLayer`` or
    an invalid timeout (``layer.timeout`` is named when the default was invalid).
    Every operation raises :class:`~cachechain.errors.CircuitOpenError` while the
    breaker refuses calls, and otherwise whatever the wrapped layer raises.
    """

    def __init__(
        self,
        layer: CacheLayer,
        *,
        breaker: CircuitBreaker | None = None,
        timeout: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not isinstance(layer, CacheLayer):
            raise ConfigError(f"layer must implement CacheLayer, got {layer!r}")
        if breaker is None:
            breaker = CircuitBreaker(layer.name)
        elif not isinstance(breaker, CircuitBreaker):
            raise ConfigError(f"breaker must be a CircuitBreaker, got {breaker!r}")
        if timeout is None:
            # A socket timeout bounds each read; a healthy call may also connect.
            own = _check_timeout(getattr(layer, "timeout", None), "layer.timeout")
            connect = _check_timeout(
                getattr(layer, "connect_timeout", None), "layer.connect_timeout"
            )
            self._timeout = own if own is None or connect is None else own + connect
        else:
            self._timeout = _check_timeout(timeout, "timeout")
        if not callable(clock):
            raise ConfigError(f"clock must be callable, got {clock!r}")
        self._layer = layer
        self._breaker = breaker
        self._clock = clock

    # -- configuration and pass-through properties -------------------------------------

    @property
    def layer(self) -> CacheLayer:
        """The wrapped layer."""
        return self._layer

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding the wrapped layer."""
        return self._breaker

    @property
    def timeout(self) -> float | None:
        """The slow-call threshold in seconds, or ``None`` for no check."""
        return self._timeout

    @property
    def rejected(self) -> int:
        """How many calls the breaker has refused (its ``stats().rejected``)."""
        return self._breaker.rejected

    @property
    def name(self) -> str:
        """The wrapped layer's name."""
        return self._layer.name

    @property
    def local(self) -> bool:
        """The wrapped layer's ``local`` flag."""
        return self._layer.local

    @property
    def max_ttl(self) -> float | None:
        """The wrapped layer's TTL cap in seconds (``None``: no cap)."""
        return self._layer.max_ttl

    # -- guarded operations --------------------------------------------------------------

    def get(self, key: str) -> Any:
        """Return the value under ``key`` or :data:`~cachechain.layers.base.MISSING`
        (a miss is a success for the breaker)."""
        breaker = self._breaker
        permit = breaker.acquire()
        timeout = self._timeout
        if timeout is None:
            try:
                value = self._layer.get(key)
            except BaseException as exc:
                breaker.on_error(permit, exc)
                raise
            breaker.on_success(permit)
            return value
        clock = self._clock
        start = clock()
        try:
            value = self._layer.get(key)
        except BaseException as exc:
            breaker.on_error(permit, exc)
            raise
        if clock() - start > timeout:
            breaker.on_failure(permit)
        else:
            breaker.on_success(permit)
        return value

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """Return ``(value, remaining_ttl_seconds_or_None)`` or ``(MISSING, None)``."""
        # Inlined like ``get``: the chain calls this on every lookup that misses L1.
        breaker = self._breaker
        permit = breaker.acquire()
        timeout = self._timeout
        if timeout is None:
            try:
                entry = self._layer.get_with_ttl(key)
            except BaseException as exc:
                breaker.on_error(permit, exc)
                raise
            breaker.on_success(permit)
            return entry
        clock = self._clock
        start = clock()
        try:
            entry = self._layer.get_with_ttl(key)
        except BaseException as exc:
            breaker.on_error(permit, exc)
            raise
        if clock() - start > timeout:
            breaker.on_failure(permit)
        else:
            breaker.on_success(permit)
        return entry

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Return the hits among ``keys``; misses are absent."""
        return self._guard(self._layer.get_many, keys)

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Return the hits among ``keys`` with their remaining TTLs (seconds)."""
        return self._guard(self._layer.get_many_with_ttl, keys)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (``None``: the layer's default)."""
        self._guard(self._layer.set, key, value, ttl)

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store every item the layer can; return the keys it rejected as invalid."""
        return self._guard(self._layer.set_many, items, ttl)

    def delete(self, key: str) -> None:
        """Remove ``key``."""
        self._guard(self._layer.delete, key)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key in ``keys``."""
        self._guard(self._layer.delete_many, keys)

    def close(self) -> None:
        """Close the wrapped layer (not guarded by the breaker). Idempotent if the
        wrapped layer's ``close`` is."""
        self._layer.close()

    def stats(self) -> BreakerStats:
        """Return the breaker's :class:`BreakerStats`."""
        return self._breaker.stats()

    def __repr__(self) -> str:
        return f"<ResilientLayer {self._layer!r} timeout={self._timeout!r}>"

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` under the breaker, timing it against ``timeout``."""
        breaker = self._breaker
        permit = breaker.acquire()
        timeout = self._timeout
        start = self._clock() if timeout is not None else 0.0
        try:
            result = fn(*args)
        except BaseException as exc:
            breaker.on_error(permit, exc)
            raise
        if timeout is not None and self._clock() - start > timeout:
            breaker.on_failure(permit)
        else:
            breaker.on_success(permit)
        return result
