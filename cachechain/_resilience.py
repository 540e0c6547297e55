"""ResilientLayer: a cache layer behind a circuit breaker, with slow calls counted.

:class:`ResilientLayer` wraps any :class:`~cachechain.layers.CacheLayer` and is
one itself. Every operation asks the layer's :class:`CircuitBreaker` first: while the
breaker is open the call raises :class:`~cachechain.CircuitOpenError` at once and
the wrapped layer is not touched. Otherwise the operation runs on the caller's thread
(the breaker's lock is not held meanwhile) and its outcome is reported:

* it returned (a miss included) within ``timeout`` seconds: a success;
* it returned, but took longer than ``timeout`` in total: a failure (a slow call); its
  result is still returned;
* it raised an error for which :func:`~cachechain._errors.trips_breaker` is true (a
  backend error, a :class:`~cachechain.LayerTimeoutError`, any exception
  cachechain does not know): a failure;
* it raised anything else (:class:`~cachechain.InvalidKeyError`,
  :class:`~cachechain.InvalidValueError`, an exhausted pool, an interrupt):
  neutral, nothing counted.

It also forwards the atomic operations of the wrapped layer (``add``, ``incr``,
``decr``, ``touch``: the capabilities :class:`~cachechain.layers.SupportsAdd`,
:class:`~cachechain.layers.SupportsCounters`, :class:`~cachechain.layers.SupportsTouch`)
and its ``lease`` (:class:`~cachechain.layers.SupportsLease`), through the breaker
too; they raise :class:`~cachechain.ConfigError` when the wrapped layer lacks them
(:func:`unwrapped` gives the layer to ask).

The exception, if any, is re-raised unchanged. No thread ever waits for a call: the
wrapped layer enforces its own timeout (the memcached layer on its socket), and the
wrapper only measures how long the call took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from ._breaker import BreakerStats, CircuitBreaker, CircuitState
from ._errors import ConfigError
from ._namespace import NamespacedLayer
from ._validate import check_callable, check_optional_seconds
from .layers._base import (
    CacheLayer,
    Lease,
    SupportsAdd,
    SupportsCounters,
    SupportsLease,
    SupportsTimeout,
    SupportsTouch,
)
from .layers._proxy import LayerProxy

__all__ = ["BreakerStats", "CircuitBreaker", "CircuitState", "ResilientLayer", "unwrapped"]

T = TypeVar("T")


class ResilientLayer(LayerProxy):
    """``layer`` guarded by ``breaker``, with calls slower than ``timeout`` counted as
    failures. Implements the whole :class:`~cachechain.layers.CacheLayer` protocol
    (a :class:`~cachechain.layers.LayerProxy` whose every operation but ``close``
    passes through the breaker).

    ``breaker`` defaults to ``CircuitBreaker(layer.name)``. ``timeout`` (seconds,
    ``None`` = no slow-call check) defaults to the wrapped layer's ``timeout`` plus its
    ``connect_timeout`` and ``pool_timeout`` when it has them (the layer's timeout
    bounds a call once it has a connection; a healthy call may first wait for a pooled
    one, then connect). ``clock`` returns monotonic seconds and
    times each call. Raises
    :class:`~cachechain.ConfigError` for a layer that is not a ``CacheLayer`` or
    an invalid timeout (the layer's attribute, such as ``layer.timeout``, is named when
    the default was invalid).
    Every operation raises :class:`~cachechain.CircuitOpenError` while the
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
        super().__init__(layer)
        if breaker is None:
            breaker = CircuitBreaker(layer.name)
        elif not isinstance(breaker, CircuitBreaker):
            raise ConfigError(f"breaker must be a CircuitBreaker, got {breaker!r}")
        if timeout is None:
            self._timeout = _slow_call_threshold(layer)
        else:
            self._timeout = check_optional_seconds(timeout, "timeout")
        check_callable(clock, "clock")
        self._breaker = breaker
        self._clock = clock
        self._ops: dict[str, Any] = {}

    def around(self, layer: CacheLayer) -> ResilientLayer:
        """A wrapper of ``layer`` with this one's breaker, timeout and clock (the
        chain uses it to slip a wrapper of its own inside a user's)."""
        return ResilientLayer(
            layer, breaker=self._breaker, timeout=self._timeout, clock=self._clock
        )

    # -- configuration -------------------------------------------------------------------

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

    # -- guarded operations --------------------------------------------------------------

    def get(self, key: str) -> Any:
        """Return the value under ``key`` or :data:`~cachechain.MISSING`
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

    # -- the atomic operations of the wrapped layer, guarded ---------------------------

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """The wrapped layer's ``add`` (:class:`~cachechain.layers.SupportsAdd`),
        through the breaker. Raises :class:`~cachechain.ConfigError` when the wrapped
        layer has none."""
        method = self._ops.get("add") or self._atomic("add", SupportsAdd)
        stored: bool = self._forward(method, key, value, ttl)
        return stored

    def incr(self, key: str, delta: int = 1) -> int | None:
        """The wrapped layer's ``incr`` (:class:`~cachechain.layers.SupportsCounters`),
        through the breaker; raises as :meth:`add` when it has none."""
        method = self._ops.get("incr") or self._atomic("incr", SupportsCounters)
        count: int | None = self._forward(method, key, delta)
        return count

    def decr(self, key: str, delta: int = 1) -> int | None:
        """The wrapped layer's ``decr``, through the breaker; raises as :meth:`add`
        when it has none."""
        method = self._ops.get("decr") or self._atomic("decr", SupportsCounters)
        count: int | None = self._forward(method, key, delta)
        return count

    def touch(self, key: str, ttl: float | None = None) -> bool:
        """The wrapped layer's ``touch`` (:class:`~cachechain.layers.SupportsTouch`),
        through the breaker; raises as :meth:`add` when it has none."""
        method = self._ops.get("touch") or self._atomic("touch", SupportsTouch)
        found: bool = self._forward(method, key, ttl)
        return found

    def lease(self, key: str, ttl: float) -> Lease | None:
        """The wrapped layer's ``lease`` (:class:`~cachechain.layers.SupportsLease`),
        through the breaker (an open one refuses it without I/O); raises as
        :meth:`add` when it has none."""
        method = self._ops.get("lease") or self._atomic("lease", SupportsLease)
        found: Lease | None = self._forward(method, key, ttl)
        return found

    def _atomic(self, operation: str, capability: type) -> Any:
        """The wrapped layer's bound ``operation``, its capability checked once (a
        protocol ``isinstance`` costs microseconds). Raises ConfigError without it."""
        found = self._ops.get(operation)
        if found is None:
            layer = self._layer
            if not isinstance(layer, capability):
                raise _unsupported(layer, operation, capability.__name__)
            found = self._ops[operation] = getattr(layer, operation)
        return found

    def stats(self) -> BreakerStats:
        """Return the breaker's :class:`BreakerStats`."""
        return self._breaker.stats()

    def __repr__(self) -> str:
        return f"<ResilientLayer {self._layer!r} timeout={self._timeout!r}>"

    def _forward(self, method: Callable[..., T], *args: Any) -> T:
        """Run ``method(*args)`` under the breaker, timing it against ``timeout``."""
        breaker = self._breaker
        permit = breaker.acquire()
        timeout = self._timeout
        start = self._clock() if timeout is not None else 0.0
        try:
            result = method(*args)
        except BaseException as exc:
            breaker.on_error(permit, exc)
            raise
        if timeout is not None and self._clock() - start > timeout:
            breaker.on_failure(permit)
        else:
            breaker.on_success(permit)
        return result


def _slow_call_threshold(layer: CacheLayer) -> float | None:
    """The default slow-call threshold of ``layer``: its ``timeout`` (None without
    one), plus its ``connect_timeout`` and ``pool_timeout`` when it has them, as a
    healthy call may wait for a pooled connection, then connect, before its timeout
    runs out. Raises :class:`~cachechain.ConfigError` naming an invalid attribute."""
    own = layer.timeout if isinstance(layer, SupportsTimeout) else None
    threshold = check_optional_seconds(own, "layer.timeout")
    connect = check_optional_seconds(
        getattr(layer, "connect_timeout", None), "layer.connect_timeout"
    )
    pool = check_optional_seconds(
        getattr(layer, "pool_timeout", None), "layer.pool_timeout", zero_ok=True
    )
    if threshold is None:
        return None
    return threshold + (connect or 0.0) + (pool or 0.0)


def unwrapped(layer: CacheLayer) -> CacheLayer:
    """``layer`` without the wrappers that forward its optional capabilities
    (:class:`ResilientLayer`, :class:`~cachechain._namespace.NamespacedLayer`): the
    layer whose capabilities they forward."""
    while isinstance(layer, (ResilientLayer, NamespacedLayer)):
        layer = layer.layer
    return layer


def _unsupported(layer: CacheLayer, operation: str, protocol: str) -> ConfigError:
    """The error for an atomic ``operation`` that ``layer`` does not implement."""
    return ConfigError(
        f"layer {layer.name!r} does not support {operation} (cachechain.layers.{protocol})"
    )
