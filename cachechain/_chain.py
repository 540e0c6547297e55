"""The Chain: several cache layers behind one thread-safe, never-failing front.

Reads go through the layers fastest first; a hit in a lower layer is copied into the
layers above it (backfill) with the entry's remaining TTL. Any layer failure is
skipped as a miss, counted and logged once; only a loader's own exception and
programmer errors (a non-``str`` key, a closed chain) reach the caller.

Consistency: every ``set`` and ``delete`` bumps a per-stripe mutation counter. A read
that found a value in a lower layer backfills the layers above only if no mutation of
its key's stripe began or was in progress since the read started, checked under the
same lock that a mutation holds while it bumps the counter and deletes from the first
layer. So a backfill can never bring back a value that a concurrent ``delete`` or
``set`` replaced; at worst a backfill is skipped. Lower layers keep per-key order in
their async writers, and a ``delete`` cancels queued writes of its key. A read also
skips the backfill of a key that an async writer still holds a write of (a
write-behind ``set`` or ``delete`` that returned before it reached its layer), since
the lower layers may still have the older value.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar, cast

from . import _fork
from ._config import BreakerConfig, ChainConfig, LayerConfig, WriterConfig
from ._errors import (
    ChainClosedError,
    CircuitOpenError,
    ConfigError,
    InvalidKeyError,
    classify_error,
)
from ._resilience import CircuitBreaker, CircuitState, ResilientLayer
from ._singleflight import SingleFlight
from ._writer import AsyncWriter
from .layers._base import MISSING, CacheLayer
from .metrics._base import CollectorGuard, adapt

__all__ = ["Chain"]

log = logging.getLogger("cachechain")

P = ParamSpec("P")
R = TypeVar("R")

_STRIPES = 64  # a power of two
_SETTLE_DEFAULT = 1.0  # seconds; a layer without a timeout of its own
_perf = time.perf_counter


def _closed_get(key: str) -> Any:
    raise ChainClosedError("the chain is closed")


class _LogOnce:
    """Logs the first failure of each (layer, operation, error type) at WARNING."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, layer: str, operation: str, exc: BaseException) -> None:
        key = (layer, operation, classify_error(exc))
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        if first:
            log.warning(
                "cache layer %r failed on %s (%s: %s); skipped as a miss. Further %s "
                "errors of this layer are counted, logged at DEBUG",
                layer,
                operation,
                type(exc).__name__,
                exc,
                key[2],
            )
        else:
            log.debug("cache layer %r failed on %s: %r", layer, operation, exc)

    def forget(self, layer: str) -> None:
        """Log the next failure of ``layer`` again (called when it recovers)."""
        with self._lock:
            self._seen = {k for k in self._seen if k[0] != layer}


class Chain:
    """Cache layers behind one thread-safe front, fastest layer first.

    ``layers`` are :class:`~cachechain.layers.CacheLayer` objects or
    :class:`~cachechain.config.LayerConfig` entries. Remote layers are wrapped in a
    circuit breaker (``breaker`` defaults) unless their config says otherwise, and each
    layer below the first gets an async writer (``writer`` defaults) for backfills and
    write-behind sets. ``metrics`` is a :class:`~cachechain.metrics.MetricsCollector`
    (``None``: no metrics, no clock reads). ``name`` labels this chain's metrics.

    Raises :class:`~cachechain.errors.ConfigError` for an empty chain, duplicate layer
    names or bad settings.
    """

    def __init__(
        self,
        layers: Sequence[CacheLayer | LayerConfig],
        *,
        name: str = "default",
        metrics: Any = None,
        breaker: BreakerConfig | None = None,
        writer: WriterConfig | None = None,
    ) -> None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise ConfigError(f"layers must be a sequence of layers, got {layers!r}")
        if not layers:
            raise ConfigError("a chain needs at least one layer")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty str, got {name!r}")
        self.name = name
        breaker = breaker or BreakerConfig()
        writer = writer or WriterConfig()
        configs = [e if isinstance(e, LayerConfig) else LayerConfig(layer=e) for e in layers]
        names = [c.layer.name for c in configs]
        if len(set(names)) != len(names):
            raise ConfigError(f"layer names must be unique, got {names}")
        self._names: tuple[str, ...] = tuple(names)
        self._log_failure = _LogOnce()
        self._m: CollectorGuard | None = adapt(metrics, name, names)

        wrapped: list[CacheLayer] = []
        self._breakers: dict[str, CircuitBreaker] = {}
        for cfg in configs:
            layer = cfg.layer
            resilient = (not layer.local) if cfg.resilient is None else cfg.resilient
            if resilient and not isinstance(layer, ResilientLayer):
                b = cfg.breaker or breaker
                cb = CircuitBreaker(
                    layer.name,
                    max_failures=b.max_failures,
                    reset_timeout=b.reset_timeout,
                    half_open_max_calls=b.half_open_max_calls,
                    half_open_successes=b.half_open_successes,
                    failure_rate=b.failure_rate,
                    window=b.window,
                    min_calls=b.min_calls,
                )
                layer = ResilientLayer(layer, breaker=cb, timeout=cfg.timeout)
            if isinstance(layer, ResilientLayer):
                self._breakers[layer.name] = layer.breaker
                layer.breaker.add_listener(self._on_breaker_change)
            wrapped.append(layer)
        self._layers: tuple[CacheLayer, ...] = tuple(wrapped)
        self._breaker_at = tuple(
            lay.breaker if isinstance(lay, ResilientLayer) else None for lay in wrapped
        )
        self._write_behind = tuple(c.write_behind for c in configs)
        self._writers: tuple[AsyncWriter | None, ...] = (
            None,
            *(
                _make_writer(lay, cfg.writer or writer)
                for lay, cfg in zip(self._layers[1:], configs[1:], strict=True)
            ),
        )
        # How long a synchronous write waits for an in-flight write of its key.
        self._settle = tuple(
            getattr(lay, "timeout", None) or _SETTLE_DEFAULT for lay in self._layers
        )
        self._set_wait = tuple(
            (cfg.writer or writer).max_wait if cfg.write_behind else 0.0 for cfg in configs
        )
        self._evictions_seen: dict[str, int] = {}
        self._refresh_lock = threading.Lock()  # refreshes may run in several threads
        self._owned_collector: Any = None
        self._closed = False
        m = self._m
        if m is not None:
            for lay, w in zip(self._layers, self._writers, strict=True):
                if w is not None:
                    m.record_queue_capacity(lay.name, w.stats().capacity)
                    w.observer = _WriterMetrics(m, lay.name)
            for lay in self._layers:
                if isinstance(lay, ResilientLayer):
                    m.record_circuit_state(lay.name, int(lay.breaker.state))
            add_hook = getattr(m.collector, "add_refresh_hook", None)
            if add_hook is not None:
                try:
                    add_hook(_weak_refresh(self))
                except Exception as exc:  # the chain works without polled figures
                    m.failed(exc)

        self._l1 = self._layers[0]
        self._l1_name = self._names[0]
        self._l1_get: Callable[[str], Any] = self._l1.get
        self._remote_writers = tuple((i, w) for i, w in enumerate(self._writers) if w is not None)
        self._flight: SingleFlight[Any] = SingleFlight()
        self._mut_lock = threading.Lock()
        self._mut_seq = [0] * _STRIPES
        self._mut_active = [0] * _STRIPES
        self._close_lock = threading.Lock()
        _fork.track(self)

    def _after_fork(self) -> None:
        """In a forked child: fresh locks, no loads or mutations of the parent's
        threads in flight (their stripes would otherwise stay busy for ever)."""
        self._mut_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._mut_active = [0] * _STRIPES
        self._flight = SingleFlight()
        self._log_failure = _LogOnce()

    @classmethod
    def from_config(cls, config: ChainConfig | Mapping[str, Any]) -> Chain:
        """Build a chain from a :class:`~cachechain.config.ChainConfig` (the seed's
        ``NewWithConfig``), or from a plain mapping as it would sit in Django settings
        or a JSON/TOML file (see :mod:`cachechain.settings`: layers by type, exporters
        by name). Raises :class:`~cachechain.errors.ConfigError` naming the field that
        is wrong."""
        if isinstance(config, Mapping):
            from ._settings import chain_config_from_mapping

            config = chain_config_from_mapping(config)
        if not isinstance(config, ChainConfig):
            raise ConfigError(
                f"from_config takes a ChainConfig or a mapping, got {type(config).__name__}"
            )
        try:
            chain = cls(
                config.layers,
                name=config.name,
                metrics=config.metrics_collector,
                breaker=config.breaker,
                writer=config.writer,
            )
        except BaseException:
            if config.owns_collector:  # what the mapping made must not leak
                _close_quietly(config.metrics_collector)
                for entry in config.layers:
                    _close_quietly(entry.layer if isinstance(entry, LayerConfig) else entry)
            raise
        if config.owns_collector:
            chain._owned_collector = config.metrics_collector
        return chain

    # -- properties -------------------------------------------------------------------
    @property
    def layers(self) -> tuple[CacheLayer, ...]:
        """The chain's layers, fastest first, as wrapped by the chain."""
        return self._layers

    @property
    def breakers(self) -> Mapping[str, CircuitBreaker]:
        """The circuit breaker of each protected layer, by layer name."""
        return dict(self._breakers)

    @property
    def writers(self) -> Mapping[str, AsyncWriter]:
        """The async writer of each lower layer, by layer name."""
        return {
            lay.name: w for lay, w in zip(self._layers, self._writers, strict=True) if w is not None
        }

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- reads ------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """Return the value cached under ``key``, or ``default`` when no layer has it.

        Never raises for a layer failure. Raises
        :class:`~cachechain.errors.InvalidKeyError` for a key that is not a ``str`` and
        :class:`~cachechain.errors.ChainClosedError` after :meth:`close`.
        """
        m = self._m
        if m is None:
            try:
                value = self._l1_get(key)
            except ChainClosedError:
                raise
            except Exception as exc:
                value = self._l1_failed(key, exc)
            if value is not MISSING:
                return value
            value, _ = self._lookup(key, None, 0.0)
            return default if value is MISSING else value
        # The same, timed (kept inline: this is the hottest path with metrics on).
        start = _perf()
        try:
            value = self._l1_get(key)
        except ChainClosedError:
            raise
        except Exception as exc:
            self._l1_failed(key, exc)
            value, index = self._lookup(key, m, start, first_failed=True)
        else:
            if value is not MISSING:
                m.record_first_layer_hit(self._l1_name, _perf() - start)
                return value
            value, index = self._lookup(key, m, start)
        m.record_chain_get(index >= 0, index, _perf() - start)
        return default if value is MISSING else value

    def _l1_failed(self, key: object, exc: Exception) -> Any:
        _check_key(key)  # an unhashable key is the caller's error, not the layer's
        self._layer_failed(0, "get", exc)
        return MISSING

    def _lookup(
        self, key: str, m: CollectorGuard | None, start: float, *, first_failed: bool = False
    ) -> tuple[Any, int]:
        """Read the layers below the first after a first-layer miss (measured from
        ``start`` when ``m`` is set; not a miss but an error, already counted, when
        ``first_failed``). Return ``(value or MISSING, layer index or -1)``, backfilling
        on a hit."""
        if type(key) is not str:
            _check_key(key)
        if self._closed:
            raise ChainClosedError("the chain is closed")
        if m is not None and not first_failed:
            m.record_get(self._names[0], False, _perf() - start)
        stripe = hash(key) & (_STRIPES - 1)
        seq = self._mut_seq[stripe]
        busy = self._mut_active[stripe]
        # Read after the counter: a write a writer still holds (a write-behind set or
        # delete that has returned, or a repair delete) has not reached its layer yet,
        # so that layer's value of the key may be older: it is neither read nor
        # backfilled. Every other layer has taken every write of this process.
        skip: list[int] | None = None
        for at, writer in self._remote_writers:
            if writer.holds(key):
                if skip is None:
                    skip = [at]
                else:
                    skip.append(at)
        layers = self._layers
        for index in range(1, len(layers)):
            if skip is not None and index in skip:
                continue
            layer = layers[index]
            t0 = _perf() if m is not None else 0.0
            try:
                value, ttl = layer.get_with_ttl(key)
            except Exception as exc:
                self._layer_failed(index, "get", exc)
                continue
            if m is not None:
                m.record_get(layer.name, value is not MISSING, _perf() - t0)
            if value is not MISSING:
                if not busy:
                    self._backfill(stripe, seq, index, key, value, ttl, skip)
                return value, index
        return MISSING, -1

    def _backfill(
        self,
        stripe: int,
        seq: int,
        index: int,
        key: str,
        value: Any,
        ttl: float | None,
        skip: Collection[int] | None,
    ) -> None:
        """Copy a hit from layer ``index`` into the layers above it but those in
        ``skip`` (their writers hold the key), unless a mutation of the stripe started
        since ``seq`` was read."""
        with self._mut_lock:
            if self._mut_seq[stripe] != seq or self._mut_active[stripe]:
                return
            for upper in range(index):
                if skip is not None and upper in skip:
                    continue
                if upper or self._m is not None:
                    self._write_one(upper, key, value, ttl, backfill=True)
                    continue
                # The first layer has no writer; without metrics to record, write it
                # directly: what _write_one would do, minus two calls, which are 2.7k of
                # the 60k instructions of an L2 hit (measured with callgrind).
                try:
                    self._l1.set(key, value, ttl)
                except Exception as exc:
                    self._layer_failed(0, "set", exc)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return the cached values of ``keys`` as a dict; keys no layer has are absent.

        Each layer is asked once, only for the keys the layers above it missed, and
        hits are backfilled. Never raises for a layer failure; raises
        :class:`~cachechain.errors.InvalidKeyError` for a non-``str`` key.
        """
        if isinstance(keys, str):
            raise InvalidKeyError("get_many takes an iterable of keys, not one str")
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            _check_key(key)
        if self._closed:
            raise ChainClosedError("the chain is closed")
        m = self._m
        start = _perf() if m is not None else 0.0
        snapshot = self._snapshot(wanted)
        found: dict[str, Any] = {}
        served: dict[str, int] = {}
        remaining = wanted
        held_by: dict[int, frozenset[str]] = {}  # layer index -> keys its writer holds
        for index, layer in enumerate(self._layers):
            if not remaining:
                break
            ask = remaining
            writer = self._writers[index]
            if writer is not None:  # keys it holds are neither read nor backfilled there
                held = writer.holding(remaining)  # after the snapshot: see _lookup
                if held:
                    held_by[index] = held
                    ask = [k for k in remaining if k not in held]
                    if not ask:
                        continue
            t0 = _perf() if m is not None else 0.0
            try:
                asked = set(ask)
                # Only what was asked, as (value, ttl) pairs: a layer that answers
                # otherwise has failed, like one that raised.
                hits = {
                    k: (v, t) for k, (v, t) in layer.get_many_with_ttl(ask).items() if k in asked
                }
            except Exception as exc:
                self._layer_failed(index, "get_many", exc)
                continue
            if m is not None:
                elapsed = _perf() - t0
                for key in ask:
                    m.record_get(layer.name, key in hits, elapsed / len(ask))
            if not hits:
                continue
            for key, (value, ttl) in hits.items():
                found[key] = value
                served[key] = index
                if index:
                    stripe, seq, busy = snapshot[key]
                    if not busy:
                        skip = [at for at, held in held_by.items() if key in held]
                        self._backfill(stripe, seq, index, key, value, ttl, skip or None)
            remaining = [k for k in remaining if k not in hits]
        if m is not None:
            elapsed = _perf() - start
            for key in wanted:
                index = served.get(key, -1)
                m.record_chain_get(index >= 0, index, elapsed)
        return found

    def _snapshot(self, keys: Sequence[str]) -> dict[str, tuple[int, int, int]]:
        seqs, active = self._mut_seq, self._mut_active
        out = {}
        for key in keys:
            stripe = hash(key) & (_STRIPES - 1)
            out[key] = (stripe, seqs[stripe], active[stripe])
        return out

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], Any],
        ttl: float | None = None,
        *,
        wait_timeout: float | None = None,
    ) -> Any:
        """Return the cached value of ``key``, or call ``loader()`` once, cache its
        result for ``ttl`` seconds (``None``: each layer's default) and return it.

        However many threads miss the same key at once, the loader runs once in this
        process and every one of them gets its result or its exception (nothing is
        cached then). A ``None`` result is cached like any other value. A thread that
        joined another's load waits at most ``wait_timeout`` seconds, then raises
        :class:`~cachechain.singleflight.LoadTimeoutError`. If the key is set or
        deleted while the loader runs, the loaded value is returned but not cached.
        """
        value = self.get(key, MISSING)
        if value is not MISSING:
            return value
        stripe = hash(key) & (_STRIPES - 1)

        def load() -> Any:
            seq = self._mut_seq[stripe]
            busy = self._mut_active[stripe]
            try:
                again = self._l1_get(key)  # a load that just finished may have filled it
            except Exception:
                again = MISSING
            if again is not MISSING:
                return again
            m = self._m
            t0 = _perf() if m is not None else 0.0
            try:
                loaded = loader()
            except BaseException:
                if m is not None:
                    m.record_load(False, _perf() - t0)
                raise
            if m is not None:
                m.record_load(True, _perf() - t0)
            if not busy:
                self._store_loaded(stripe, seq, key, loaded, ttl)
            return loaded

        value, shared = self._flight.do(key, load, wait_timeout)
        if shared and self._m is not None:
            self._m.record_singleflight_shared()
        return value

    def _store_loaded(self, stripe: int, seq: int, key: str, value: Any, ttl: float | None) -> None:
        with self._mut_lock:
            if self._mut_seq[stripe] != seq or self._mut_active[stripe]:
                return
            for index in reversed(range(len(self._layers))):
                self._write_one(index, key, value, ttl, backfill=index > 0)

    def cached(
        self,
        ttl: float | None = None,
        *,
        key: Callable[..., str] | None = None,
        prefix: str | None = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a function so its results are cached through :meth:`get_or_load`.

        The cache key is ``key(*args, **kwargs)`` when given, else the function's
        ``prefix`` (default: its module and qualified name) followed by the ``repr`` of
        its arguments. The wrapper gains ``invalidate(*args, **kwargs)``, which deletes
        the entry of those arguments.
        """

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:
            base = prefix if prefix is not None else f"{fn.__module__}.{fn.__qualname__}"

            def make_key(*args: Any, **kwargs: Any) -> str:
                if key is not None:
                    return key(*args, **kwargs)
                parts = [repr(a) for a in args]
                parts += [f"{k}={v!r}" for k, v in sorted(kwargs.items())]
                return f"{base}({', '.join(parts)})"

            @functools.wraps(fn)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                return cast(
                    R,
                    self.get_or_load(make_key(*args, **kwargs), lambda: fn(*args, **kwargs), ttl),
                )

            def invalidate(*args: Any, **kwargs: Any) -> None:
                self.delete(make_key(*args, **kwargs))

            wrapper.invalidate = invalidate  # type: ignore[attr-defined]
            wrapper.cache_key = make_key  # type: ignore[attr-defined]
            return wrapper

        return decorate

    # -- writes -----------------------------------------------------------------------
    def set(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` under ``key`` in every layer, for ``ttl`` seconds (``None``:
        each layer's default TTL; each layer caps it at its ``max_ttl``).

        Lower layers are written first, synchronously, or queued where the layer is
        write-behind. Returns True when every layer took the value (a queued write
        counts), False when some layer failed or refused it (counted, logged once). A
        lower layer that did not take the value (it failed, refused it, or its writer
        dropped it for a full queue) gets a delete of the key instead, retried until it
        lands, so no older value of it stays there; meanwhile this chain does not read
        the key from that layer.
        Raises :class:`~cachechain.errors.InvalidKeyError` for a non-``str`` key.
        """
        _check_key(key)
        stripe = self._begin_mutation(key)
        ok = True
        try:
            for index in reversed(range(1, len(self._layers))):
                ok = self._write_one(index, key, value, ttl, backfill=False) and ok
        finally:
            ok = self._end_mutation(stripe, key, value, ttl) and ok
        return ok

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> bool:
        """Store every item in every layer (one batch per layer where synchronous).

        Returns True when every layer took every value. Raises
        :class:`~cachechain.errors.InvalidKeyError` for a non-``str`` key.
        """
        items = dict(items)
        for key in items:
            _check_key(key)
        stripes = self._begin_many(items)
        ok = True
        try:
            for index in reversed(range(1, len(self._layers))):
                batch = {}
                for key, value in items.items():
                    queued = self._write_one_queued(index, key, value, ttl)
                    if queued is None:
                        batch[key] = value
                    elif not queued:
                        ok = False
                if batch:
                    layer = self._layers[index]
                    ok = (
                        self._sync_call(index, "set_many", layer.set_many, batch, ttl, keys=batch)
                        and ok
                    )
        finally:
            with self._mut_lock:
                for stripe in stripes:
                    self._mut_seq[stripe] += 1
                    self._mut_active[stripe] -= 1
                ok = self._sync_call(0, "set_many", self._l1.set_many, items, ttl) and ok
        return ok

    def delete(self, key: str) -> bool:
        """Remove ``key`` from every layer. It cancels queued writes of the key and
        reaches each layer synchronously, after any write of the key in flight (or,
        for a write-behind layer, through its ordered queue, which never drops a
        delete for lack of room).

        Returns True when every layer took the delete or has it queued (a queued delete
        is never dropped), False when some layer could not be reached (down, or its
        breaker open): that is counted and logged once, and the layer's writer retries
        the delete until it lands; meanwhile this chain does not read the key from that
        layer. Raises :class:`~cachechain.errors.InvalidKeyError` for a non-``str`` key.
        """
        _check_key(key)
        stripe = self._begin_mutation(key)
        ok = True
        try:
            for index in reversed(range(1, len(self._layers))):
                ok = self._delete_one(index, key) and ok
        finally:
            ok = self._end_mutation(stripe, key, MISSING, None) and ok
        return ok

    def delete_many(self, keys: Iterable[str]) -> bool:
        """Remove every key in ``keys`` from every layer; see :meth:`delete`."""
        if isinstance(keys, str):
            raise InvalidKeyError("delete_many takes an iterable of keys, not one str")
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            _check_key(key)
        stripes = self._begin_many(wanted)
        ok = True
        try:
            for index in reversed(range(1, len(self._layers))):
                batch = []
                for key in wanted:
                    queued = self._delete_one_queued(index, key)
                    if queued is None:
                        batch.append(key)
                    elif not queued:
                        ok = False
                if batch:
                    layer = self._layers[index]
                    ok = (
                        self._sync_call(index, "delete_many", layer.delete_many, batch, keys=batch)
                        and ok
                    )
        finally:
            with self._mut_lock:
                for stripe in stripes:
                    self._mut_seq[stripe] += 1
                    self._mut_active[stripe] -= 1
                ok = self._sync_call(0, "delete_many", self._l1.delete_many, wanted) and ok
        return ok

    def _begin_mutation(self, key: str) -> int:
        if self._closed:
            raise ChainClosedError("the chain is closed")
        stripe = hash(key) & (_STRIPES - 1)
        with self._mut_lock:
            self._mut_seq[stripe] += 1
            self._mut_active[stripe] += 1
        return stripe

    def _end_mutation(self, stripe: int, key: str, value: Any, ttl: float | None) -> bool:
        """Finish a mutation: bump the stripe and write (or delete, for ``MISSING``)
        the first layer under the mutation lock, so no backfill can slip between."""
        with self._mut_lock:
            self._mut_seq[stripe] += 1
            self._mut_active[stripe] -= 1
            if value is MISSING:
                return self._delete_one(0, key)
            return self._write_one(0, key, value, ttl, backfill=False)

    def _begin_many(self, keys: Iterable[str]) -> list[int]:
        if self._closed:
            raise ChainClosedError("the chain is closed")
        stripes = sorted({hash(k) & (_STRIPES - 1) for k in keys})
        with self._mut_lock:
            for stripe in stripes:
                self._mut_seq[stripe] += 1
                self._mut_active[stripe] += 1
        return stripes

    def _write_one(
        self, index: int, key: str, value: Any, ttl: float | None, *, backfill: bool
    ) -> bool:
        """Write one key to layer ``index``: queued for a backfill or a write-behind
        layer, else synchronously once no older queued or in-flight write of the key can
        overtake it. Never raises for a layer failure."""
        writer = self._writers[index]
        if writer is not None:
            try:
                if backfill:
                    breaker = self._breaker_at[index]
                    if breaker is not None and breaker.refusing():
                        return False  # the writer would only see it refused
                    return writer.set(key, value, ttl, max_wait=0.0)
                if self._write_behind[index] or not writer.settle(key, self._settle[index]):
                    return self._queue_set(writer, index, key, value, ttl)
            except ChainClosedError:  # the chain is being closed by another thread
                return False
        return self._sync_call(index, "set", self._layers[index].set, key, value, ttl, keys=(key,))

    def _queue_set(
        self, writer: AsyncWriter, index: int, key: str, value: Any, ttl: float | None
    ) -> bool:
        """Queue a set of ``key``; if the writer drops it (queue full), queue a delete
        instead (never dropped), so that no older value of ``key`` outlives it there."""
        if writer.set(key, value, ttl, max_wait=self._set_wait[index]):
            return True
        writer.delete(key)
        return False

    def _delete_one(self, index: int, key: str) -> bool:
        """Delete one key from layer ``index``, after (or behind) any write of it that
        its writer holds, so that no older write can bring the key back."""
        writer = self._writers[index]
        if writer is not None:
            try:
                if self._write_behind[index] or not writer.settle(key, self._settle[index]):
                    writer.delete(key)
                    return True
            except ChainClosedError:
                return False
        return self._sync_call(index, "delete", self._layers[index].delete, key, keys=(key,))

    def _write_one_queued(self, index: int, key: str, value: Any, ttl: float | None) -> bool | None:
        """For a batch: queue the write of ``key`` if it must go through the writer
        (write-behind, or behind an older write) and return whether it was queued (see
        :meth:`_queue_set`); return None to write it in the synchronous batch instead."""
        writer = self._writers[index]
        if writer is None:
            return None
        try:
            if self._write_behind[index] or not writer.settle(key, self._settle[index]):
                return self._queue_set(writer, index, key, value, ttl)
        except ChainClosedError:
            return False
        return None

    def _delete_one_queued(self, index: int, key: str) -> bool | None:
        """For a batch: queue the delete of ``key`` where it must go through the writer
        and return True; None to delete it in the synchronous batch instead; False if
        it could not be queued (the chain is closing)."""
        writer = self._writers[index]
        if writer is None:
            return None
        try:
            if self._write_behind[index] or not writer.settle(key, self._settle[index]):
                writer.delete(key)
                return True
        except ChainClosedError:
            return False
        return None

    def _sync_call(
        self,
        index: int,
        operation: str,
        fn: Callable[..., Any],
        *args: Any,
        keys: Collection[str] = (),
    ) -> bool:
        """Run one synchronous write operation on a layer, timing and counting it.

        ``keys`` are the keys it writes: those the layer did not take (the call raised,
        or set_many returned them) get a repair delete (see :meth:`_repair`)."""
        m = self._m
        t0 = _perf() if m is not None else 0.0
        try:
            rejected = fn(*args)
        except Exception as exc:
            self._layer_failed(index, operation, exc)
            ok = False
            self._repair(index, keys)
        else:
            ok = not rejected  # set_many returns the keys it could not store
            if rejected and keys:
                self._repair(index, rejected)
        if m is not None:
            record = m.record_delete if operation.startswith("delete") else m.record_set
            record(self._names[index], ok, _perf() - t0)
        return ok

    def _repair(self, index: int, keys: Iterable[str]) -> None:
        """Layer ``index`` missed a write of ``keys``, so it may keep older values of
        them: have its writer delete them at its next retry round, retried until the
        deletes land (:meth:`AsyncWriter.repair`). The writer holds the keys meanwhile,
        so reads neither serve nor copy up that layer's value (see :meth:`_lookup`).
        The first layer has no writer: nothing to repair."""
        writer = self._writers[index]
        if writer is not None:
            for key in keys:
                writer.repair(key)  # counted as dropped if the writer is closing

    # -- failures and metrics ---------------------------------------------------------
    def _layer_failed(self, index: int, operation: str, exc: Exception) -> None:
        name = self._names[index]
        m = self._m
        if isinstance(exc, CircuitOpenError):
            if m is not None:
                m.record_circuit_rejected(name)
            return
        if m is not None:
            m.record_error(name, operation, classify_error(exc))
        self._log_failure(name, operation, exc)

    def _on_breaker_change(self, layer: str, old: CircuitState, new: CircuitState) -> None:
        if new is CircuitState.CLOSED:
            self._log_failure.forget(layer)
        log.warning("circuit breaker of cache layer %r: %s -> %s", layer, old.name, new.name)
        if self._m is not None:
            self._m.record_circuit_state(layer, int(new))

    def _refresh_metrics(self) -> None:
        """Report the polled figures: queue depths, and the entries and evictions of
        layers that count them. The collector calls it before it reads its figures."""
        m = self._m
        if m is None:
            return
        for lay, writer in zip(self._layers, self._writers, strict=True):
            if writer is not None:
                queued = writer.stats()
                m.record_queue_depth(lay.name, queued.depth + queued.repairing)
            stats = getattr(lay, "stats", None)
            figures = stats() if callable(stats) else None
            entries = getattr(figures, "entries", None)
            evictions = getattr(figures, "evictions", None)
            if isinstance(entries, int):
                m.record_entries(lay.name, entries)
            if isinstance(evictions, int):
                with self._refresh_lock:
                    seen = self._evictions_seen.get(lay.name, 0)
                    self._evictions_seen[lay.name] = max(seen, evictions)
                if evictions > seen:
                    m.record_evictions(lay.name, evictions - seen)

    # -- lifecycle --------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Make every async writer write what it holds now, repair deletes included
        (``timeout`` seconds in all, ``None``: no limit). Return True if they all got
        there in time and no lower layer is left awaiting a repair (see
        :meth:`AsyncWriter.flush <cachechain.writer.AsyncWriter.flush>`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = True
        for writer in self._writers:
            if writer is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done = writer.flush(left) and done
        return done

    def close(self, timeout: float = 5.0) -> int:
        """Stop the chain: drain the async writers within ``timeout`` seconds in all,
        then close every layer. Returns the number of queued writes that could not be
        made in time (counted as dropped). Later calls raise
        :class:`~cachechain.errors.ChainClosedError`. Idempotent."""
        with self._close_lock:
            if self._closed:
                return 0
            self._closed = True
            self._l1_get = _closed_get
        deadline = time.monotonic() + timeout
        lost = 0
        for writer in self._writers:
            if writer is not None:
                lost += writer.close(max(0.0, deadline - time.monotonic()))
        for index, layer in enumerate(self._layers):
            try:
                layer.close()
            except Exception as exc:
                self._layer_failed(index, "close", exc)
        close_collector = getattr(self._owned_collector, "close", None)
        if close_collector is not None:  # after the writers: their last events are in
            try:
                close_collector()
            except Exception as exc:
                if self._m is not None:
                    self._m.failed(exc)
        return lost

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Chain {self.name!r} {list(self._names)} {state}>"


class _WriterMetrics:
    """Forwards one async writer's events to the chain's metrics collector."""

    __slots__ = ("layer", "m")

    def __init__(self, m: CollectorGuard, layer: str) -> None:
        self.m = m
        self.layer = layer

    def dropped(self, reason: str, count: int) -> None:
        for _ in range(count):
            self.m.record_write_dropped(self.layer, reason)

    def written(self, success: bool, duration: float) -> None:
        self.m.record_async_write(self.layer, success, duration)

    def depth(self, depth: int) -> None:
        self.m.record_queue_depth(self.layer, depth)


def _make_writer(layer: CacheLayer, config: WriterConfig) -> AsyncWriter:
    """The async writer of a lower layer, with the settings of ``config``."""
    return AsyncWriter(
        layer,
        queue_size=config.queue_size,
        max_wait=config.max_wait,
        workers=config.workers,
        retry_delay=config.retry_delay,
        max_retry_delay=config.max_retry_delay,
    )


def _close_quietly(obj: Any) -> None:
    """Call ``obj.close()`` if it has one; what it raises is logged, not raised."""
    close = getattr(obj, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.debug("could not close %r", obj, exc_info=True)


def _weak_refresh(chain: Chain) -> Callable[[], bool]:
    """A refresh hook that does not keep the chain alive (collectors outlive chains)."""
    ref = weakref.ref(chain)

    def refresh() -> bool:
        alive = ref()
        if alive is None or alive.closed:
            return False  # the collector drops a hook that returns False
        alive._refresh_metrics()
        return True

    return refresh


def _check_key(key: object) -> None:
    if type(key) is not str and not isinstance(key, str):
        if isinstance(key, Hashable):
            raise InvalidKeyError(f"cache keys must be str, got {type(key).__name__}: {key!r}")
        raise InvalidKeyError(f"cache keys must be str, got unhashable {type(key).__name__}")
