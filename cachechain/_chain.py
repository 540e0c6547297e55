"""The Chain: several cache layers behind one thread-safe, never-failing front.

Reads go through the layers fastest first; a hit in a lower layer is copied into the
layers above it (backfill) with the entry's remaining TTL. Any layer failure is
skipped as a miss, counted and logged once; only a loader's own exception and
programmer errors (a non-``str`` key, a closed chain) reach the caller.

The chain orchestrates; the parts live apart. Each layer is a
:class:`~cachechain._tier.Tier` (the layer, its breaker, its async writer and its write
policy). Consistency is the :class:`~cachechain._fence.MutationFence`'s: every ``set``
and ``delete`` is a mutation of its keys' stripes, and a read that found a value in a
lower layer backfills the layers above only if no mutation of its key's stripe began or
was in progress since the read started, checked under the same lock that a mutation
holds while it ends and writes the first layer. So a backfill can never bring back a
value that a concurrent ``delete`` or ``set`` replaced; at worst a backfill is skipped.
Lower layers keep per-key order in their async writers, and a ``delete`` cancels queued
writes of its key. A read also skips the backfill of a key that an async writer still
holds a write of (a write-behind ``set`` or ``delete`` that returned before it reached
its layer), since the lower layers may still have the older value. Failures and
metrics go through :mod:`cachechain._chain_metrics`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

from . import _chain_clear, _chain_close, _fork, _tier
from ._breaker import CircuitBreaker
from ._chain_atomic import AtomicOps, shared_tier
from ._chain_batch import Backfiller, PairBatch, read_through
from ._chain_load import LoaderOps
from ._chain_metrics import Reporter, hit_sampler, record_batch, watch
from ._close import close_quietly
from ._coherence import Coherence, namespaced, shared_index
from ._config import (
    BreakerConfig,
    ChainConfig,
    CoherenceConfig,
    LayerConfig,
    LoadConfig,
    WriterConfig,
)
from ._errors import ChainClosedError, ConfigError, InvalidKeyError, InvalidValueError
from ._fence import MutationFence, Ticket
from ._health import ChainHealth, chain_health
from ._loads import Loads
from ._resilience import unwrapped
from ._singleflight import SingleFlight
from ._tier import Tier, build_tiers
from ._validate import check_key, check_ttl
from ._writer import AsyncWriter
from .layers._base import MISSING, CacheLayer, SupportsClear
from .metrics._base import CollectorGuard, adapt

__all__ = ["Chain"]

C = TypeVar("C", bound="Chain")

_perf = time.perf_counter
_STR: Final = frozenset({str})  # the one key type a batch may hold


class Chain(AtomicOps, LoaderOps):
    """Cache layers behind one thread-safe front, fastest layer first.

    ``layers`` are :class:`~cachechain.layers.CacheLayer` objects or
    :class:`~cachechain.LayerConfig` entries. Remote layers are wrapped in a
    circuit breaker (``breaker`` defaults) unless their config says otherwise, and each
    layer below the first gets an async writer (``writer`` defaults) for backfills and
    write-behind sets. ``metrics`` is a :class:`~cachechain.metrics.MetricsCollector`
    (``None``: no metrics, no clock reads). ``name`` labels this chain's metrics.
    ``add``, ``incr``, ``decr`` and ``touch`` are atomic across processes: they run on
    the chain's shared layer (see :mod:`cachechain._chain_atomic`). ``coherence``
    (:class:`~cachechain.CoherenceConfig`; True: its defaults, False: off) keeps the
    chain's in-process layers coherent with every other process sharing its shared
    layer, and makes :meth:`clear` clear the cache for all of them (see
    :mod:`cachechain._coherence`). ``load``: the defaults of :meth:`get_or_load` and
    :meth:`cached` (:class:`~cachechain.LoadConfig`). ``clock`` (monotonic seconds)
    times the fail-safe throttle and loads' timeouts (layers have clocks of their own).

    Raises :class:`~cachechain.ConfigError` for an empty chain, duplicate layer
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
        coherence: CoherenceConfig | bool = True,
        load: LoadConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        coherent = CoherenceConfig.of(coherence)
        configs, namespace = namespaced(_layer_configs(layers, name), coherent)
        self.name = name
        names = [c.layer.name for c in configs]
        self._collector = metrics
        self._m: CollectorGuard | None = adapt(metrics, name, names)
        self._report = report = Reporter(self._m)
        self._loads = Loads(name, load, self._m, clock)  # checks load and clock first
        breaker, writer = breaker or BreakerConfig(), writer or WriterConfig()
        tiers = build_tiers(configs, report, breaker=breaker, writer=writer)
        self._tiers = tiers
        self._first = tiers[0]
        self._below = tiers[1:]  # read top-down
        self._up = tiers[:0:-1]  # the lower tiers bottom-up, as writes reach them
        self._shared = shared_tier(tiers)  # where add/incr/decr/touch run
        self._layers: tuple[CacheLayer, ...] = tuple(t.layer for t in tiers)
        self._held_by = tuple((t.index, t.writer.holds) for t in tiers if t.writer is not None)
        self._figures = None if self._m is None else watch(self._m, tiers)
        self._l1_name = self._first.name
        self._l1_get: Callable[[str], Any] = self._first.layer.get
        # A collector that counts first-layer hits itself gets one in `every` timed
        # (see get); `_untimed` is its count while the next hit needs no clock.
        self._sampler = hit_sampler(self._m, self._first)
        self._untimed = None if self._sampler is None else self._sampler.hits
        self._every = 0 if self._sampler is None else self._sampler.every
        self._owned_collector: Any = None
        self._closed = False
        self._flight: SingleFlight[Any] = SingleFlight(clock)
        self._fence = MutationFence()
        self._close_lock = threading.Lock()
        self._drained = threading.Event()  # set once close() has drained everything
        self._backfill = Backfiller(tiers, self._fence, report, self._m)
        self._pair = _pair_of(self._below, self._held_by)  # _lookup in one step
        self._pair_batch = PairBatch.of(tiers, report, self._backfill)
        self._coherence: Coherence | None = None
        if namespace is not None:
            self._coherence = _coherence(self, configs, namespace, coherent)
        _fork.track(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (the fence, the single flight, the reporter
        and the polled figures reset themselves)."""
        self._close_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: ChainConfig | Mapping[str, Any]) -> Chain:
        """Build a chain from a :class:`~cachechain.ChainConfig` (the seed's
        ``NewWithConfig``), or from a plain mapping as it would sit in Django settings
        or a JSON/TOML file (see :func:`cachechain.chain_config_from_mapping`: layers
        by type, exporters by name). Raises :class:`~cachechain.ConfigError` naming the field that
        is wrong."""
        return _from_config(cls, config)

    # -- properties -------------------------------------------------------------------
    @property
    def layers(self) -> tuple[CacheLayer, ...]:
        """The chain's layers, fastest first, as wrapped by the chain."""
        return self._layers

    @property
    def breakers(self) -> Mapping[str, CircuitBreaker]:
        """The circuit breaker of each protected layer, by layer name."""
        return {t.name: t.breaker for t in self._tiers if t.breaker is not None}

    @property
    def writers(self) -> Mapping[str, AsyncWriter]:
        """The async writer of each lower layer, by layer name."""
        return {t.name: t.writer for t in self._tiers if t.writer is not None}

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def metrics_collector(self) -> Any:
        """The collector the chain reports to, as given or made by its config (None:
        no metrics); for example to ``close()`` it in gunicorn's ``worker_exit``."""
        return self._collector

    @property
    def coherence(self) -> Coherence | None:
        """The chain's cross-process coherence (namespace generation and backplane),
        or None when it has none (no shared layer that can hold a generation, or
        ``coherence=False``)."""
        return self._coherence

    # -- reads ------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """Return the value cached under ``key``, or ``default`` when no layer has it.

        Never raises for a layer failure. Raises
        :class:`~cachechain.InvalidKeyError` for a key that is not a ``str`` and
        :class:`~cachechain.ChainClosedError` after :meth:`close`.
        """
        m = self._m
        if m is None:
            try:
                value = self._l1_get(key)
            except Exception as exc:
                value = self._l1_failed(key, exc)
            if value is not MISSING:
                return value
            value, _ = self._lookup(key, None, 0.0)
            return default if value is MISSING else value
        # With a hit sampler, most first-layer hits are only counted (kept inline: this
        # is the hottest path with metrics on); a miss is read again under the clock.
        hits = self._untimed
        if hits is not None:
            try:
                value = self._l1_get(key)
            except Exception as exc:
                return _get_failed(self, key, default, m, exc)
            if value is not MISSING:
                if not next(hits) % self._every:
                    self._untimed = None  # the next hit is timed
                return value
        start = _perf()
        try:
            value = self._l1_get(key)
        except Exception as exc:
            self._l1_failed(key, exc)
            value, index = self._lookup(key, m, start, first_failed=True)
        else:
            if value is not MISSING:
                sampler = self._sampler
                if sampler is None:
                    m.record_first_layer_hit(self._l1_name, _perf() - start)
                else:  # count the hit, time it, and leave the next ones untimed
                    n = next(sampler.hits)
                    self._untimed = sampler.hits
                    sampler.timed(_perf() - start, n)
                return value
            value, index = self._lookup(key, m, start)
        m.record_chain_get(index >= 0, index, _perf() - start)
        return default if value is MISSING else value

    def _l1_failed(self, key: object, exc: Exception) -> Any:
        """A first-layer read raised ``exc``: raise it again if the chain is closed, raise
        :class:`~cachechain.InvalidKeyError` for a bad key, else count the failure and
        return ``MISSING``."""
        if isinstance(exc, ChainClosedError):
            raise exc
        check_key(key)  # an unhashable key is the caller's error, not the layer's
        self._report.failed(self._l1_name, "get", exc)
        return MISSING

    def _lookup(
        self, key: str, m: CollectorGuard | None, start: float, *, first_failed: bool = False
    ) -> tuple[Any, int]:
        """Read the layers below the first after a first-layer miss (measured from
        ``start`` when ``m`` is set; not a miss but an error, already counted, when
        ``first_failed``). Return ``(value or MISSING, layer index or -1)``, backfilling
        on a hit."""
        if type(key) is not str:
            check_key(key)
        if self._closed:
            raise ChainClosedError("the chain is closed")
        if m is not None and not first_failed:
            m.record_get(self._l1_name, False, _perf() - start)
        ticket = self._fence.ticket(key)
        if m is None and self._pair is not None:  # the usual chain: L1 over one layer
            return _lookup_pair(self, self._pair, key, ticket)
        # Taken after the ticket: a write a writer still holds (a write-behind set or
        # delete that has returned, or a repair delete) has not reached its layer yet,
        # so that layer's value of the key may be older: it is neither read nor
        # backfilled. Every other layer has taken every write of this process.
        skip: tuple[int, ...] = ()
        for at, holds in self._held_by:
            if holds(key):
                skip = (*skip, at)
        for tier in self._below:
            if tier.index in skip:
                continue
            t0 = _perf() if m is not None else 0.0
            try:
                value, ttl = tier.get_with_ttl(key)
            except Exception as exc:
                self._report.failed(tier.name, "get", exc)
                continue
            if m is not None:
                m.record_get(tier.name, value is not MISSING, _perf() - t0)
            if value is not MISSING:  # backfilled unless the key was mutated since
                self._backfill(ticket, tier.index, key, value, ttl, skip)
                return value, tier.index
        return MISSING, -1

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return the cached values of ``keys`` as a dict; keys no layer has are absent.

        Each layer is asked once, only for the keys the layers above it missed, and
        hits are backfilled. Never raises for a layer failure; raises
        :class:`~cachechain.InvalidKeyError` for a non-``str`` key.
        """
        wanted = _key_list(keys, "get_many")
        if self._closed:
            raise ChainClosedError("the chain is closed")
        m = self._m
        start = _perf() if m is not None else 0.0
        tickets = self._fence.tickets()
        if self._pair_batch is not None:  # read_through in one step: the usual chain
            return self._pair_batch.read(wanted, tickets)
        found, served = read_through(self._tiers, wanted, tickets, self._backfill)
        if m is not None:
            record_batch(m, wanted, served, _perf() - start)
        return found

    # -- writes -----------------------------------------------------------------------
    def set(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` under ``key`` in every layer, for ``ttl`` seconds (``None``:
        each layer's default TTL; each layer caps it at its ``max_ttl``).

        Lower layers are written first, synchronously, or queued where the layer is
        write-behind. Returns True when every layer took the value (for a write-behind
        layer, once queued: such a write may land after another process's later write
        of the key), False when some layer failed or refused it (counted, logged once),
        or must first finish an older write of the key (a write in flight for more
        than ``settle`` seconds, a pending repair): that layer then gets a delete after
        the older write rather than the value, which, acknowledged before it landed,
        could undo another process's later write. A
        lower layer that did not take the value (it failed, refused it, or its writer
        dropped it for a full queue) gets a delete of the key instead, retried until it
        lands, so no older value of it stays there; meanwhile this chain does not read
        the key from that layer. A value a layer refuses (its codec cannot encode it,
        or it is too large) always gives False, whether that layer's write is made at
        once or queued (the value is checked before it is queued): that layer keeps
        nothing of the key, and the layers that took the value (the in-process one)
        serve it.
        Raises :class:`~cachechain.InvalidKeyError` for a non-``str`` key.
        """
        check_key(key)
        ttl = check_ttl(ttl, error=InvalidValueError)
        first = self._first
        return self._mutate(
            (key,), lambda tier: tier.set(key, value, ttl), lambda: first.set(key, value, ttl)
        )

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> bool:
        """Store every item in every layer (one batch per layer where synchronous).

        Returns True when every layer took every value. Raises
        :class:`~cachechain.InvalidKeyError` for a non-``str`` key.
        """
        items = dict(items)
        for key in items:
            check_key(key)
        ttl = check_ttl(ttl, error=InvalidValueError)
        first = self._first
        return self._mutate(
            items,
            lambda tier: tier.set_many(items, ttl),
            lambda: first.call("set_many", first.layer.set_many, items, ttl),
        )

    def delete(self, key: str) -> bool:
        """Remove ``key`` from every layer. It cancels queued writes of the key and
        reaches each layer synchronously, after any write of the key in flight (or,
        for a write-behind layer, through its ordered queue, which never drops a
        delete for lack of room).

        Returns True when every layer took the delete (a write-behind layer: once
        queued; a queued delete is never dropped), False when some layer has it queued
        behind an older write of the key (not made yet: other processes may read the
        older value until it lands) or could not be reached (down, or its
        breaker open): that is counted and logged once, and the layer's writer retries
        the delete until it lands; meanwhile this chain does not read the key from that
        layer. Raises :class:`~cachechain.InvalidKeyError` for a non-``str`` key.
        """
        check_key(key)
        first = self._first
        return self._mutate((key,), lambda tier: tier.delete(key), lambda: first.delete(key))

    def delete_many(self, keys: Iterable[str]) -> bool:
        """Remove every key in ``keys`` from every layer; see :meth:`delete`."""
        wanted = _key_list(keys, "delete_many")
        first = self._first
        return self._mutate(
            wanted,
            lambda tier: tier.delete_many(wanted),
            lambda: first.call("delete_many", first.layer.delete_many, wanted),
        )

    def _mutate(
        self, keys: Iterable[str], below: Callable[[Tier], bool], first: Callable[[], bool]
    ) -> bool:
        """One mutation of ``keys``: ``below(tier)`` for each lower layer, bottom up,
        then ``first()`` (the first layer's write) as the fence ends the mutation.
        Return whether every layer took it."""
        if self._closed:
            raise ChainClosedError("the chain is closed")
        with self._fence.mutating(keys, first) as mutation:
            ok = True
            for tier in self._up:
                ok = below(tier) and ok
        self._publish_invalidation(list(keys))
        return mutation.result and ok

    def _publish_invalidation(self, keys: Sequence[str]) -> None:
        """``keys`` changed (a mutation ended; an atomic operation changed them on the
        shared layer): loads of them in flight are detached (a later caller starts its
        own instead of getting a value loaded before the change), and the other
        processes are told."""
        self._flight.forget(keys)
        if self._coherence is not None:
            self._coherence.publish(keys)

    def clear(self, *, flush: bool = False) -> bool:
        """Remove everything this cache holds, for every process sharing its shared
        layer: the namespace generation stored there moves (one ``incr``), so no
        process reads what was written before (others drop their in-process copies
        within the coherence bound), and this process's in-process layers are
        emptied. Other applications' keys in the same memcached are untouched.
        Queued async writes are made first (see :mod:`cachechain._chain_clear`).
        ``flush=True`` also empties the shared layers (memcached's ``flush_all``:
        every key on those servers, as Django's own backend does).

        Returns True when every process will see the cache empty; False when the
        shared layer could not be reached (counted, logged once; this process's
        layers are emptied anyway) or cannot be cleared at all (no namespace and no
        ``flush``). Raises :class:`~cachechain.InvalidValueError` for a non-bool
        ``flush``, :class:`~cachechain.ChainClosedError` after :meth:`close`.
        """
        return _chain_clear.clear(self, flush)

    # -- metrics ----------------------------------------------------------------------
    def health(self) -> ChainHealth:
        """A summary of the chain now (:class:`~cachechain.ChainHealth`): per layer its
        breaker state, last failure, async writer queue and repairs pending, and servers
        marked down; ``as_dict()`` makes it JSON-ready. No I/O; never raises for a layer
        failure (works on a closed chain too)."""
        return chain_health(self.name, self._tiers, self._report.last_errors, closed=self._closed)

    def _refresh_metrics(self) -> None:
        """Report the polled figures (queue depths, and the entries and evictions of
        layers that count them). The collector calls it before it reads its figures."""
        if self._figures is not None:
            self._figures.refresh()

    # -- lifecycle --------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Make every async writer write what it holds now, repair deletes included
        (``timeout`` seconds in all, ``None``: no limit). Return True if they all got
        there in time and no lower layer is left awaiting a repair (see
        :meth:`AsyncWriter.flush <cachechain._writer.AsyncWriter.flush>`)."""
        return _tier.flush(self._tiers, timeout)

    def close(self, timeout: float = 5.0) -> int:
        """Stop the chain: drain the async writers, publish its last invalidations
        (the drained writes' too), close every layer, within ``timeout`` seconds in
        all (a finite number >= 0). Returns the number of queued writes that could not
        be made in time (counted as dropped). A concurrent ``close`` waits for the same
        drain (at most its own ``timeout``) and returns 0; later calls return 0 at
        once, and every other method raises :class:`~cachechain.ChainClosedError`.
        Raises :class:`~cachechain.InvalidValueError` for a bad ``timeout``, before
        anything changes."""
        return _chain_close.close(self, timeout)

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Chain {self.name!r} {[t.name for t in self._tiers]} {state}>"


def _pair_of(
    below: Sequence[Tier], held_by: Sequence[tuple[int, Callable[[str], bool]]]
) -> tuple[Tier, Callable[[str], bool]] | None:
    """For a chain of two tiers whose lower one has a writer: that tier and its
    writer's ``holds`` (see :func:`_lookup_pair`); else None."""
    if len(below) == 1 and len(held_by) == 1 and held_by[0][0] == below[0].index:
        return below[0], held_by[0][1]
    return None


def _lookup_pair(
    chain: Chain, pair: tuple[Tier, Callable[[str], bool]], key: str, ticket: Ticket
) -> tuple[Any, int]:
    """:meth:`Chain._lookup` without metrics for a chain of two tiers whose lower one has
    a writer (``pair``: that tier and its writer's ``holds``), in one frame."""
    tier, holds = pair
    if holds(key):  # a write the writer holds has not reached the layer: not read
        return MISSING, -1
    try:
        value, ttl = tier.get_with_ttl(key)
    except Exception as exc:
        chain._report.failed(tier.name, "get", exc)
        return MISSING, -1
    if value is MISSING:
        return MISSING, -1
    chain._backfill(ticket, 1, key, value, ttl, ())
    return value, 1


def _get_failed(chain: Chain, key: str, default: Any, m: CollectorGuard, exc: Exception) -> Any:
    """The rest of an untimed ``get`` whose first-layer read raised ``exc``: the layers
    below, timed from here (the failed call itself is not)."""
    start = _perf()
    chain._l1_failed(key, exc)
    value, index = chain._lookup(key, m, start, first_failed=True)
    m.record_chain_get(index >= 0, index, _perf() - start)
    return default if value is MISSING else value


def _from_config(cls: type[C], config: ChainConfig | Mapping[str, Any]) -> C:
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
            coherence=config.coherence,
            load=config.load,
        )
    except BaseException:
        if config.owns_collector:  # what the mapping made must not leak
            close_quietly(config.metrics_collector)
            for entry in config.layers:
                close_quietly(entry.layer if isinstance(entry, LayerConfig) else entry)
        raise
    if config.owns_collector:
        chain._owned_collector = config.metrics_collector
    return chain


def _coherence(
    chain: Chain, configs: Sequence[LayerConfig], namespace: Any, config: CoherenceConfig
) -> Coherence:
    """The coherence of ``chain``, whose shared layers carry ``namespace``. Raises
    :class:`ConfigError` when an in-process layer above the shared one cannot be
    cleared (everything it holds must be droppable when track is lost)."""
    at = shared_index(configs)
    assert at is not None  # a namespace implies a shared layer
    tiers = chain._tiers
    if config.enabled:
        for tier in tiers[:at]:
            if tier.layer.local and not isinstance(unwrapped(tier.layer), SupportsClear):
                raise ConfigError(
                    f"layer {tier.name!r} has no clear(): an in-process layer above a "
                    "shared one must have one for coherence (or pass coherence=False)"
                )
    writer = tiers[at].writer
    held = writer.holds if writer is not None else _never_held
    overflowed = (lambda: writer.overflowed) if writer is not None else _never_overflowed
    coherence = Coherence(
        tiers, at, namespace, chain._fence, chain._report, config, held, overflowed
    )
    for tier in tiers:  # past max_repairs, a shared layer is handled as a whole
        if tier.writer is not None and not tier.layer.local:
            tier.writer.overflow_handler = coherence.handle_overflow
    return coherence


def _never_held(key: str) -> bool:
    return False


def _never_overflowed() -> bool:
    return False


def _layer_configs(layers: object, name: object) -> list[LayerConfig]:
    """The :class:`LayerConfig` of each entry of ``layers``, once ``layers`` and the
    chain's ``name`` are checked. Raises :class:`ConfigError`."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ConfigError(f"layers must be a sequence of layers, got {layers!r}")
    if not layers:
        raise ConfigError("a chain needs at least one layer")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name must be a non-empty str, got {name!r}")
    configs = [e if isinstance(e, LayerConfig) else LayerConfig(layer=e) for e in layers]
    names = [c.layer.name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"layer names must be unique, got {names}")
    return configs


def _key_list(keys: Iterable[str], operation: str) -> list[str]:
    """``keys`` once each, in order, checked. Raises :class:`InvalidKeyError` for one
    ``str`` (a common slip for a list of one) or a key that is not a ``str``."""
    if isinstance(keys, str):
        raise InvalidKeyError(f"{operation} takes an iterable of keys, not one str")
    if not isinstance(keys, (list, tuple)):
        keys = list(keys)  # an iterator: read once, checked below if need be
    try:
        wanted = list(dict.fromkeys(keys))
    except TypeError:  # an unhashable key (a list): name it as check_key does
        for key in keys:
            check_key(key)
        raise
    if {*map(type, wanted)} - _STR:  # a subclass, or an error (a pass in C)
        for key in wanted:
            check_key(key)
    return wanted
