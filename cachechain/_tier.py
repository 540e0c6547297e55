"""Tiers: each layer of a chain with its breaker, its async writer and its write policy.

A chain reaches each of its layers through a :class:`Tier`, which :func:`build_tier`
makes from a :class:`~cachechain.LayerConfig` and the chain's default
:class:`~cachechain.BreakerConfig` and :class:`~cachechain.WriterConfig`: a remote layer
(or one configured ``resilient=True``) is wrapped in a
:class:`~cachechain._resilience.ResilientLayer` with its own circuit breaker, and every
layer below the first gets an :class:`~cachechain._writer.AsyncWriter`. The tier's
class is its write policy:

- :class:`Tier`, the first layer: every write synchronous (it has no writer);
- :class:`SettlingTier`, a lower layer: backfills are queued (and skipped while its
  breaker refuses calls); a ``set`` or ``delete`` first waits (``settle``, at most the
  layer's timeout) for a write of its key in flight, then is made synchronously, or is
  queued behind that write when it does not end in time; a write the layer missed
  becomes a repair delete on the writer;
- :class:`WriteBehindTier`: a lower layer whose sets and deletes are all queued.

A new policy is a subclass that overrides :meth:`SettlingTier._must_queue` or the
routing methods. Tiers never raise for a layer failure: they count and log it through
the chain's :class:`~cachechain._chain_metrics.Reporter` and return False.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import suppress
from typing import Any

from ._breaker import CircuitBreaker
from ._chain_metrics import Reporter
from ._config import BreakerConfig, LayerConfig, WriterConfig
from ._errors import ChainClosedError
from ._resilience import ResilientLayer, unwrapped
from ._writer import AsyncWriter
from .layers._base import CacheLayer, SupportsTimeout

__all__ = [
    "SettlingTier",
    "Tier",
    "WriteBehindTier",
    "build_tier",
    "build_tiers",
    "close_layers",
    "close_writers",
    "delete_queued_sets",
    "fill_of",
    "flush",
    "shortcut",
]

#: Seconds a synchronous write waits for a write of its key in flight, for a layer
#: without a timeout of its own.
SETTLE_DEFAULT = 1.0
_perf = time.perf_counter
_NONE_HELD: frozenset[str] = frozenset()


def fill_of(layer: CacheLayer) -> Callable[[str, Any, float | None], Any]:
    """How a chain writes a value it already checked into the first layer ``layer``
    (a backfill): its ``fill`` (``MemoryLayer.fill``: ``set`` without re-checking the
    TTL) when it has one that its ``set`` does not override (see :func:`shortcut`),
    else its ``set``."""
    fill: Callable[[str, Any, float | None], Any] | None = shortcut(layer, "fill", "set")
    return fill or layer.set


def shortcut(layer: object, name: str, *bypassed: str) -> Any:
    """``layer``'s method ``name``, a shortcut that does the work of its methods
    ``bypassed`` without calling them (``MemoryLayer.fill`` for ``set``), or None when
    it has none or when a subclass overrides one of ``bypassed`` below the class that
    defines ``name``: a ``MemoryLayer`` subclass whose ``set`` adds a check or a side
    effect then gets every write through that ``set``."""
    mro = type(layer).__mro__
    owner = next((cls for cls in mro if name in vars(cls)), None)
    if owner is None:
        return None
    for other in bypassed:
        defined = next((cls for cls in mro if other in vars(cls)), None)
        if defined is not None and defined is not owner and issubclass(defined, owner):
            return None
    return getattr(layer, name)


class Tier:
    """A layer written synchronously (the first layer of a chain), with its breaker
    (None for a layer without one) and the chain's failure ``report``. ``index`` is the
    layer's position in the chain, 0 for the fastest."""

    __slots__ = (
        "_report",
        "_supports",
        "breaker",
        "get_with_ttl",
        "index",
        "layer",
        "name",
        "writer",
    )

    def __init__(
        self, index: int, layer: CacheLayer, report: Reporter, breaker: CircuitBreaker | None
    ) -> None:
        self.index = index
        self.layer = layer
        self.name: str = layer.name
        self.breaker = breaker
        #: The async writer of a lower layer; None here.
        self.writer: AsyncWriter | None = None
        #: The layer's ``get_with_ttl``, bound once for the read path.
        self.get_with_ttl: Callable[[str], tuple[Any, float | None]] = layer.get_with_ttl
        self._report = report
        self._supports: dict[type, bool] = {}

    # -- the policy: where a write goes -----------------------------------------------
    def route_set(self, key: str, value: Any, ttl: float | None) -> bool | None:
        """Queue the set of ``key`` if the policy says so and return whether it was
        queued; return None to have it made synchronously. Here: always synchronous."""
        return None

    def route_delete(self, key: str) -> bool | None:
        """As :meth:`route_set`, for a delete."""
        return None

    def fill(self, key: str, value: Any, ttl: float | None) -> None:
        """Copy a value read from a lower layer into this one (a backfill): here, a
        synchronous set. Never raises for a layer failure."""
        self.call("set", self.layer.set, key, value, ttl, keys=(key,))

    def repair(self, keys: Iterable[str]) -> None:
        """The layer missed writes of ``keys`` and may keep older values of them. The
        first layer has no writer to delete them later: nothing to do."""

    def drain(self, key: str) -> bool:
        """Make way for an atomic operation of ``key`` made on this layer directly (the
        chain's ``add``, ``incr``...): return True once the layer has taken every write
        of ``key`` handed to it, False if some are still pending. Here: always True
        (no writer)."""
        return True

    def supports(self, capability: type) -> bool:
        """Whether the layer itself (unwrapped from its breaker) has ``capability``, a
        runtime-checkable protocol such as :class:`~cachechain.layers.SupportsAdd`.
        Checked once per capability: such a check costs microseconds, and the chain's
        atomic operations ask it on every call."""
        known = self._supports.get(capability)
        if known is None:
            known = self._supports[capability] = isinstance(unwrapped(self.layer), capability)
        return known

    def forget(self, key: str) -> None:
        """Drop the layer's copy of ``key``, best effort, after an atomic operation that
        the shared layer could not take: nothing was written, so nothing is owed. A
        failure is counted and logged; unlike :meth:`delete`, it leaves no repair."""
        self.call("delete", self.layer.delete, key)

    # -- reads ---------------------------------------------------------------------------
    def held(self, keys: Iterable[str]) -> frozenset[str]:
        """Those of ``keys`` whose writes this layer has not taken yet (its writer holds
        them): the layer's values of them may be older. None here (no writer)."""
        return _NONE_HELD

    def read_many(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """The layer's hits among ``keys`` as ``(value, ttl)`` pairs, timed and counted.
        None when the layer fails, or answers with anything but such pairs (a failure
        too); keys it was not asked for are ignored. Never raises for a layer failure."""
        if not keys:
            return {}
        m = self._report.m
        t0 = _perf() if m is not None else 0.0
        try:
            asked = set(keys)
            hits = {
                k: (v, t) for k, (v, t) in self.layer.get_many_with_ttl(keys).items() if k in asked
            }
        except Exception as exc:
            self._report.failed(self.name, "get_many", exc)
            return {}
        if m is not None:
            share = (_perf() - t0) / len(keys)
            for key in keys:
                m.record_get(self.name, key in hits, share)
        return hits

    # -- writes, routed by the policy ----------------------------------------------------
    def set(self, key: str, value: Any, ttl: float | None) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``: the layer's
        default) as the policy routes it. Return whether the layer took it or has it
        queued."""
        routed = self.route_set(key, value, ttl)
        if routed is not None:
            return routed
        return self.call("set", self.layer.set, key, value, ttl, keys=(key,))

    def delete(self, key: str) -> bool:
        """Remove ``key`` as the policy routes it; return whether the layer took the
        delete (a write-behind layer: or has it queued)."""
        routed = self.route_delete(key)
        if routed is not None:
            return routed
        return self.call("delete", self.layer.delete, key, keys=(key,))

    def set_many(self, items: Mapping[str, Any], ttl: float | None) -> bool:
        """Store every item, those the policy does not queue in one synchronous batch.
        Return whether the layer took every value (a write-behind layer: or queued it)."""
        ok = True
        batch: dict[str, Any] = {}
        for key, value in items.items():
            routed = self.route_set(key, value, ttl)
            if routed is None:
                batch[key] = value
            elif not routed:
                ok = False
        if batch:
            ok = self.call("set_many", self.layer.set_many, batch, ttl, keys=batch) and ok
        return ok

    def delete_many(self, keys: Iterable[str]) -> bool:
        """Remove every key, those the policy does not queue in one synchronous batch.
        Return whether the layer took every delete (a write-behind layer: or queued it)."""
        ok = True
        batch: list[str] = []
        for key in keys:
            routed = self.route_delete(key)
            if routed is None:
                batch.append(key)
            elif not routed:
                ok = False
        if batch:
            ok = self.call("delete_many", self.layer.delete_many, batch, keys=batch) and ok
        return ok

    def call(
        self,
        operation: str,
        fn: Callable[..., Any],
        *args: Any,
        keys: Collection[str] = (),
    ) -> bool:
        """Run one synchronous write ``operation`` (``fn(*args)``) on the layer, timed
        and counted. ``keys`` are the keys it writes: those the layer did not take (the
        call raised, or ``set_many`` returned them) are repaired (:meth:`repair`).
        Return whether the layer took every write. Never raises for a layer failure."""
        report = self._report
        m = report.m
        t0 = _perf() if m is not None else 0.0
        try:
            rejected = fn(*args)
        except Exception as exc:
            report.failed(self.name, operation, exc)
            ok = False
            self.repair(keys)
        else:
            ok = not rejected  # set_many returns the keys it could not store
            if rejected and keys:
                self.repair(rejected)
        if m is not None:
            record = m.record_delete if operation.startswith("delete") else m.record_set
            record(self.name, ok, _perf() - t0)
        return ok

    def close(self) -> None:
        """Close the layer; a failure is counted and logged, not raised."""
        try:
            self.layer.close()
        except Exception as exc:
            self._report.failed(self.name, "close", exc)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.index} {self.name!r}>"


class SettlingTier(Tier):
    """A layer below the first, with its async ``writer``: backfills go through the
    writer, a set or delete is made synchronously once no write of its key is in
    flight (waiting for it at most ``settle`` seconds) or else queued behind it, and
    a write the layer missed becomes a repair delete (see the module docstring)."""

    __slots__ = ("_check_value", "_queue", "_set_wait", "_settle")

    def __init__(
        self,
        index: int,
        layer: CacheLayer,
        report: Reporter,
        breaker: CircuitBreaker | None,
        writer: AsyncWriter,
        *,
        settle: float,
        set_wait: float = 0.0,
    ) -> None:
        super().__init__(index, layer, report, breaker)
        self.writer = writer
        self._queue = writer
        self._settle = settle
        #: Seconds a queued set may wait for room in a full queue (0: dropped at once).
        self._set_wait = set_wait
        #: The layer's ``check_value(value)`` (raises for a value its ``set`` refuses,
        #: as MemcachedLayer's does), or None.
        self._check_value: Callable[[Any], object] | None = getattr(
            unwrapped(layer), "check_value", None
        )

    def held(self, keys: Iterable[str]) -> frozenset[str]:
        """Those of ``keys`` the writer holds (queued, in flight or awaiting a repair)."""
        return self._queue.holding(keys)

    def drain(self, key: str) -> bool:
        """Make way for an atomic operation of ``key`` on this layer: when the writer
        holds a write of ``key`` (a queued set, which must land rather than be
        cancelled, a delete, a write in flight or a repair; every key while the writer
        is overflowed), have it write what it holds now (its ``flush``, at most
        ``settle`` seconds; not while the layer's breaker refuses calls). Return whether
        none of ``key`` is left pending, so an older write cannot overtake the
        operation."""
        writer = self._queue
        if not writer.holds(key):
            return True
        breaker = self.breaker
        if breaker is not None and breaker.refusing():
            return False  # the layer is down: a flush would only be refused too
        writer.flush(self._settle)
        return not writer.holds(key)

    def _must_queue(self, key: str) -> bool:
        """Whether a write of ``key`` must go through the writer: yes when a write of
        it is still in flight after ``settle`` seconds, or a delete of it is queued."""
        return not self._queue.settle(key, self._settle)

    def route_set(self, key: str, value: Any, ttl: float | None) -> bool | None:
        """Queue the set if it must wait for an older write of ``key`` (see
        :meth:`_queue_set`), else None: it is made synchronously."""
        return self._route(key, self._queue_set, value, ttl)

    def route_delete(self, key: str) -> bool | None:
        """Queue the delete (never dropped) if it must wait for an older write of
        ``key``, else None: it is made synchronously."""
        return self._route(key, self._queue_delete)

    def _route(self, key: str, queue: Callable[..., bool], *args: Any) -> bool | None:
        try:
            if self._must_queue(key):
                return queue(key, *args)
        except ChainClosedError:  # the chain is being closed by another thread
            return False
        return None

    def _queue_set(self, key: str, value: Any, ttl: float | None) -> bool:
        """A set that must wait behind an older write of ``key`` is not queued with its
        value: acknowledged before it lands, it could land after a later write of the
        key by another process (memcached orders nothing across processes) and undo it.
        The layer gets a delete instead (never dropped, made after the older write; a
        late delete only makes a miss), and the set answers False: this layer does not
        have the value, the layers above it do."""
        self._queue.delete(key)
        return False

    def _queue_delete(self, key: str) -> bool:
        """Queue the delete behind the older write of ``key`` (never dropped) and answer
        False: until it lands, other processes may still read the older value."""
        self._queue.delete(key)
        return False

    def _accepts(self, value: Any) -> bool:
        """Whether the layer would take ``value`` (its ``check_value``, if it has one);
        a refusal is counted and logged as the refused synchronous set would be."""
        check = self._check_value
        if check is None:
            return True
        try:
            check(value)
        except Exception as exc:
            self._report.failed(self.name, "set", exc)
            if self._report.m is not None:
                self._report.m.record_set(self.name, False, 0.0)
            return False
        return True

    def fill(self, key: str, value: Any, ttl: float | None) -> None:
        """Queue the backfill (it never waits for room); skipped while the breaker
        refuses calls, as the writer would only see it refused."""
        breaker = self.breaker
        if breaker is not None and breaker.refusing():
            m = self._report.m
            if m is not None:
                m.record_backfill_skipped(self.name, "circuit_open")
            return
        with suppress(ChainClosedError):
            self._queue.set(key, value, ttl, max_wait=0.0)

    def repair(self, keys: Iterable[str]) -> None:
        """Have the writer delete ``keys`` at its next retry round, retried until the
        deletes land; it holds the keys meanwhile, so the chain neither reads nor
        copies up this layer's values of them."""
        writer = self._queue
        for key in keys:
            writer.repair(key)  # counted as dropped if the writer is closing


class WriteBehindTier(SettlingTier):
    """A lower layer configured ``write_behind``: sets and deletes are queued too, a set
    waiting at most ``set_wait`` seconds for room (the writer's ``max_wait``)."""

    __slots__ = ()

    def _must_queue(self, key: str) -> bool:
        return True

    def _queue_set(self, key: str, value: Any, ttl: float | None) -> bool:
        """Queue a set of ``key`` (True: queued; it may land after another process's
        later write of the key, which write-behind accepts). If the layer refuses the
        value (checked first, so a queued set answers as a synchronous one does) or
        the writer drops it (queue full), queue a delete instead (never dropped), so
        that no older value of ``key`` outlives it there."""
        writer = self._queue
        if self._accepts(value) and writer.set(key, value, ttl, max_wait=self._set_wait):
            return True
        writer.delete(key)
        return False

    def _queue_delete(self, key: str) -> bool:
        """Queue the delete (never dropped); True: queued, as write-behind answers."""
        self._queue.delete(key)
        return True


def build_tiers(
    configs: Sequence[LayerConfig],
    report: Reporter,
    *,
    breaker: BreakerConfig,
    writer: WriterConfig,
) -> tuple[Tier, ...]:
    """The tiers of a chain of ``configs``, fastest first (see :func:`build_tier`)."""
    return tuple(
        build_tier(i, config, report, breaker=breaker, writer=writer)
        for i, config in enumerate(configs)
    )


def flush(tiers: Iterable[Tier], timeout: float | None) -> bool:
    """Flush the writer of each of ``tiers`` (``timeout`` seconds in all, ``None``: no
    limit); return True if every one got its writes and repairs made in time."""
    deadline = None if timeout is None else time.monotonic() + timeout
    done = True
    for tier in tiers:
        if tier.writer is not None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done = tier.writer.flush(left) and done
    return done


def delete_queued_sets(tiers: Iterable[Tier]) -> None:
    """Turn the sets still queued in the writers of ``tiers`` into deletes (see
    :meth:`AsyncWriter.delete_queued_sets <cachechain.AsyncWriter.delete_queued_sets>`)."""
    for tier in tiers:
        if tier.writer is not None:
            tier.writer.delete_queued_sets()


def close_writers(tiers: Sequence[Tier], timeout: float) -> int:
    """Drain and close the writers of ``tiers`` within ``timeout`` seconds in all (the
    layers stay open). Return how many queued writes were dropped."""
    deadline = time.monotonic() + timeout
    lost = 0
    for tier in tiers:
        if tier.writer is not None:
            lost += tier.writer.close(max(0.0, deadline - time.monotonic()))
    return lost


def close_layers(tiers: Sequence[Tier]) -> None:
    """Close the layers of ``tiers`` (after :func:`close_writers`)."""
    for tier in tiers:
        tier.close()


def build_tier(
    index: int,
    config: LayerConfig,
    report: Reporter,
    *,
    breaker: BreakerConfig,
    writer: WriterConfig,
) -> Tier:
    """The tier of the layer at ``index`` of a chain, from its ``config`` and the
    chain's default ``breaker`` and ``writer`` settings (a layer's own settings win).
    Its breaker reports its state changes to ``report``. Raises
    :class:`~cachechain.ConfigError` for a layer whose timeout is invalid."""
    layer = _protected(config, breaker)
    guard = layer.breaker if isinstance(layer, ResilientLayer) else None
    if guard is not None:
        guard.add_listener(report.circuit_changed)
    if index == 0:
        return Tier(index, layer, report, guard)
    settings = config.writer or writer
    queue = AsyncWriter.from_config(layer, settings)
    settle = (layer.timeout if isinstance(layer, SupportsTimeout) else None) or SETTLE_DEFAULT
    if config.write_behind:
        return WriteBehindTier(
            index, layer, report, guard, queue, settle=settle, set_wait=settings.max_wait
        )
    return SettlingTier(index, layer, report, guard, queue, settle=settle)


def _protected(config: LayerConfig, defaults: BreakerConfig) -> CacheLayer:
    """``config.layer``, wrapped in a breaker if it should be (by default: remote)."""
    layer = config.layer
    resilient = (not layer.local) if config.resilient is None else config.resilient
    if resilient and not isinstance(layer, ResilientLayer):
        breaker = CircuitBreaker.from_config(layer.name, config.breaker or defaults)
        layer = ResilientLayer(layer, breaker=breaker, timeout=config.timeout)
    return layer
