"""Configuration of a chain: which layers, how each is protected, how writes flow.

Everything has a default that suits a web app: a remote layer is wrapped in a circuit
breaker (5 consecutive failures open it for 10 s) and gets a write-behind queue of
1,000 entries for backfills; sets reach it synchronously unless ``write_behind`` is on.
An in-process layer is written synchronously and not wrapped unless asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ._errors import ConfigError
from ._validate import (
    check_optional_seconds,
    check_positive_int,
    check_rate,
    check_seconds,
)
from .layers._base import CacheLayer

__all__ = [
    "BreakerConfig",
    "ChainConfig",
    "CoherenceConfig",
    "LayerConfig",
    "LeaseConfig",
    "LoadConfig",
    "WriterConfig",
    "check_share",
]


@dataclass(frozen=True)
class BreakerConfig:
    """Circuit-breaker settings for one layer (durations in seconds).

    ``max_failures`` consecutive failures open the breaker; after ``reset_timeout`` it
    lets ``half_open_max_calls`` trial calls through at once, and closes after
    ``half_open_successes`` of them succeed. ``failure_rate`` (0 to 1, ``None`` = off)
    also opens it when that share of the last ``window`` calls failed, once at least
    ``min_calls`` were made. Raises :class:`~cachechain.ConfigError` when a
    value is out of range.
    """

    max_failures: int = 5
    reset_timeout: float = 10.0
    half_open_max_calls: int = 1
    half_open_successes: int = 1
    failure_rate: float | None = None
    window: int = 20
    min_calls: int = 10

    def __post_init__(self) -> None:
        for name in (
            "max_failures",
            "half_open_max_calls",
            "half_open_successes",
            "window",
            "min_calls",
        ):
            check_positive_int(getattr(self, name), f"breaker.{name}")
        check_seconds(self.reset_timeout, "breaker.reset_timeout")
        rate = check_rate(self.failure_rate, "breaker.failure_rate")
        if rate is not None and self.min_calls > self.window:
            raise ConfigError(
                f"breaker.min_calls ({self.min_calls}) must not exceed breaker.window "
                f"({self.window}): the failure rate could never open the breaker"
            )


@dataclass(frozen=True)
class WriterConfig:
    """Settings of the async writer of one lower layer.

    ``queue_size`` bounds the pending writes (distinct keys); ``max_wait`` is how long
    a write-behind ``set`` may wait for room before it is dropped (seconds, 0 = drop at
    once; backfills never wait); ``workers`` is the number of writer threads.
    ``retry_delay`` and ``max_retry_delay`` (seconds) bound the backoff between the
    retries of deletes that repair a write the layer missed (see
    :mod:`cachechain._writer`). ``max_repairs`` caps those deletes (keys): past it the
    layer is handled as a whole, unread until every older value in it is made
    invisible (see :mod:`cachechain._writer`).
    """

    queue_size: int = 1000
    max_wait: float = 0.0
    workers: int = 1
    retry_delay: float = 0.05
    max_retry_delay: float = 2.0
    max_repairs: int = 10_000

    def __post_init__(self) -> None:
        check_positive_int(self.queue_size, "writer.queue_size")
        check_positive_int(self.max_repairs, "writer.max_repairs")
        check_positive_int(self.workers, "writer.workers")
        check_seconds(self.retry_delay, "writer.retry_delay")
        check_seconds(self.max_retry_delay, "writer.max_retry_delay")
        if self.max_retry_delay < self.retry_delay:
            raise ConfigError(
                f"writer.max_retry_delay must be >= writer.retry_delay ({self.retry_delay}), "
                f"got {self.max_retry_delay!r}"
            )
        check_seconds(self.max_wait, "writer.max_wait", zero_ok=True)


@dataclass(frozen=True)
class LayerConfig:
    """One layer of a chain with its options.

    ``resilient``: wrap the layer in a circuit breaker and timeout (``None``: yes for a
    remote layer, no for an in-process one). ``breaker`` overrides the chain's default
    breaker settings for this layer; ``timeout`` (seconds) is the longest a call may
    take before it counts as a failure (default: the layer's own socket ``timeout``
    plus its ``connect_timeout`` and ``pool_timeout``, as
    :class:`~cachechain._resilience.ResilientLayer` computes it).
    ``write_behind``: ``set`` queues writes to this layer instead of waiting for them.
    ``writer`` overrides the chain's default writer settings.
    """

    layer: CacheLayer
    resilient: bool | None = None
    breaker: BreakerConfig | None = None
    timeout: float | None = None
    write_behind: bool = False
    writer: WriterConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.layer, CacheLayer):
            raise ConfigError(f"layer must implement CacheLayer, got {self.layer!r}")
        check_optional_seconds(self.timeout, "layer.timeout")


#: Fraction of the coherence ``interval`` a journal waits between two publications
#: outside a poll (so a burst of writes costs a few round trips, not one per write).
PUBLISH_DELAY: Final = 0.25
#: Seconds between two checks of the coherence watchdog (a poll stuck in I/O).
WATCH_TICK: Final = 0.02


def stuck_after(interval: float, bound: float) -> float:
    """Seconds without a poll that began successfully after which a journal polling
    every ``interval`` seconds has lost track (its watchdog drops the in-process
    layers): ``bound`` less a publisher's delay and one watchdog tick, so no entry is
    served past ``bound``. :class:`CoherenceConfig` keeps it above ``interval``."""
    return bound - interval * PUBLISH_DELAY - WATCH_TICK


@dataclass(frozen=True)
class CoherenceConfig:
    """How a chain stays coherent with the other processes sharing its shared layer
    (see docs/coherence.md and "Running many processes" in the README).

    ``namespace``: every key sent to a shared layer carries the namespace generation
    stored in the lowest one, so :meth:`Chain.clear <cachechain.Chain.clear>` empties
    the cache for every process (needs ``add`` and counters on that layer, as
    memcached has). ``enabled``: a change made in one process removes the key from
    every other process's in-process layers within ``bound`` seconds, through a
    journal in the shared layer polled every ``interval`` seconds (``interval *
    (1 + PUBLISH_DELAY) + WATCH_TICK < bound``: at most 64 ms for the default 100 ms
    bound); ``slots`` entries of it are kept. Both are on by default; they need no
    server beyond the shared layer, and cost one round trip per ``interval`` per
    chain. Raises :class:`~cachechain.ConfigError` for invalid values.
    """

    enabled: bool = True
    namespace: bool = True
    interval: float = 0.04
    bound: float = 0.1
    slots: int = 1024

    def __post_init__(self) -> None:
        for name in ("enabled", "namespace"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"coherence.{name} must be a bool, got {getattr(self, name)!r}")
        check_seconds(self.interval, "coherence.interval")
        check_seconds(self.bound, "coherence.bound")
        if self.interval >= self.bound:
            raise ConfigError(
                f"coherence.interval ({self.interval}) must be below coherence.bound ({self.bound})"
            )
        if stuck_after(self.interval, self.bound) <= self.interval:
            longest = (self.bound - WATCH_TICK) / (1 + PUBLISH_DELAY)  # where they meet
            raise ConfigError(
                f"coherence.interval ({self.interval}) must be below {max(longest, 0.0):.6g} "
                f"for coherence.bound ({self.bound}): (bound - {WATCH_TICK}) / "
                f"{1 + PUBLISH_DELAY}, so that a poll begun in time is never taken for a "
                "stuck one (its watchdog drops the in-process layers after bound - "
                f"interval * {PUBLISH_DELAY} - {WATCH_TICK} seconds without one)"
            )
        check_positive_int(self.slots, "coherence.slots")
        if self.enabled and not self.namespace:
            raise ConfigError(
                "coherence.enabled needs coherence.namespace (the journal lives in the "
                "namespace and follows its generation); coherence=False turns both off"
            )

    @classmethod
    def of(cls, value: CoherenceConfig | bool) -> CoherenceConfig:
        """``value`` as a config: True is the default one, False turns both off.
        Raises :class:`~cachechain.ConfigError` for anything else."""
        if isinstance(value, CoherenceConfig):
            return value
        if value is True:
            return cls()
        if value is False:
            return cls(enabled=False, namespace=False)
        raise ConfigError(f"coherence must be a bool or a CoherenceConfig, got {value!r}")


def check_share(value: object, field: str, *, error: type[Exception] = ConfigError) -> float | None:
    """``None``, or ``value`` as a ``float`` share strictly between 0 and 1 (an eager
    refresh's point in a TTL); raise ``error`` naming ``field`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise error(f"{field} must be a number in (0, 1) or None, got {value!r}")
    return float(value)


#: Seconds a lease lives by default: how long a holder that died blocks the others.
LEASE_TTL: Final = 2.0


@dataclass(frozen=True)
class LeaseConfig:
    """How ``get_or_load`` shares a load across processes (see :mod:`cachechain._lease`).

    ``enabled``: take a lease on the shared layer on a miss (when the layer supports
    it). ``ttl``: seconds a lease lives (a holder that dies blocks the others at most
    that long; memcached rounds it up to whole seconds). ``wait``: the most seconds a
    caller waits for another process's load before it loads itself (or serves a
    fail-safe value); ``None``: ``ttl``. Raises :class:`~cachechain.ConfigError` naming
    the field for a bad value.
    """

    enabled: bool = True
    ttl: float = LEASE_TTL
    wait: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"lease.enabled must be a bool, got {self.enabled!r}")
        ttl = check_seconds(self.ttl, "lease.ttl")
        if ttl > 30 * 24 * 3600:
            raise ConfigError(f"lease.ttl must be at most 30 days, got {self.ttl!r}")
        check_optional_seconds(self.wait, "lease.wait", zero_ok=True)

    @property
    def max_wait(self) -> float:
        """The most seconds a caller waits for another process's load."""
        return self.ttl if self.wait is None else self.wait

    @classmethod
    def of(cls, value: LeaseConfig | bool | None) -> LeaseConfig:
        """``value`` as a config: True or None give the defaults, False turns leases
        off. Raises :class:`~cachechain.ConfigError` for anything else."""
        if isinstance(value, LeaseConfig):
            return value
        if value is None or value is True:
            return LeaseConfig()
        if value is False:
            return LeaseConfig(enabled=False)
        raise ConfigError(f"lease must be a LeaseConfig or a bool, got {value!r}")


@dataclass(frozen=True)
class LoadConfig:
    """How a chain's ``get_or_load`` and ``cached`` treat loaders (their defaults; each
    call may override ``fail_safe``, ``soft_timeout``, ``hard_timeout``,
    ``eager_refresh`` and ``lease``). Durations are seconds. Everything but ``lease`` is
    off by default.

    ``fail_safe``: when the loader raises or times out and an earlier value of the key
    exists, serve that value instead, if it expired at most ``fail_safe_max_age``
    seconds ago, and do not call the loader of that key again (in this process) for
    ``fail_safe_throttle`` seconds. Loaded values are kept ``ttl +
    fail_safe_max_age`` seconds in every layer that keeps stamped entries (the
    in-process layer, memcached) for that purpose; only ``get_or_load`` with fail-safe
    on ever reads them past their ``ttl``.

    ``soft_timeout``: a caller with a fail-safe value waits that long for the loader,
    then gets the fail-safe value while the load goes on in the background (its value
    is stored when it arrives). ``hard_timeout``: any caller waits that long at most:
    then it gets the fail-safe value, or :class:`~cachechain.LoadTimeoutError`.
    Timed loads run on background threads, ``max_background_loads`` at most per chain
    (a load that finds no room fails as a loader would, with a ``LoadTimeoutError``).

    ``eager_refresh`` (a share of the TTL in ``(0, 1)``, e.g. ``0.8``): a hit on a
    value older than that share of its TTL returns it and starts one background reload
    of the key (one per key per process).

    ``lease`` (a :class:`LeaseConfig`, or a bool for the defaults or off; a mapping of
    its fields in settings): on a miss in every layer, one process of all those sharing
    the chain's shared layer (memcached) runs the loader; the others wait for its value
    (at most ``lease.wait`` seconds), then serve a fail-safe value or load themselves.
    The one feature on by default: it costs one round trip per miss, none per hit, and
    nothing on a chain whose shared layer cannot lease (an in-process one).

    Raises :class:`~cachechain.ConfigError` naming the field for a bad value.
    """

    fail_safe: bool = False
    fail_safe_max_age: float = 3600.0
    fail_safe_throttle: float = 30.0
    soft_timeout: float | None = None
    hard_timeout: float | None = None
    eager_refresh: float | None = None
    max_background_loads: int = 64
    lease: LeaseConfig | bool = True

    def __post_init__(self) -> None:
        lease = self.lease
        if isinstance(lease, Mapping):
            unknown = sorted(set(lease) - {"enabled", "ttl", "wait"})
            if unknown:
                raise ConfigError(f"load.lease: unknown setting {unknown[0]!r}")
            lease = LeaseConfig(**lease)
        object.__setattr__(self, "lease", LeaseConfig.of(lease))
        if not isinstance(self.fail_safe, bool):
            raise ConfigError(f"load.fail_safe must be a bool, got {self.fail_safe!r}")
        for name in ("fail_safe_max_age", "fail_safe_throttle"):
            check_seconds(getattr(self, name), f"load.{name}", zero_ok=True)
        for name in ("soft_timeout", "hard_timeout"):
            check_optional_seconds(getattr(self, name), f"load.{name}", zero_ok=True)
        check_share(self.eager_refresh, "load.eager_refresh")
        check_positive_int(self.max_background_loads, "load.max_background_loads")

    @property
    def active(self) -> bool:
        """Whether any of the features is on (a chain whose defaults are all off
        takes the plain path)."""
        return (
            self.fail_safe
            or self.soft_timeout is not None
            or self.hard_timeout is not None
            or self.eager_refresh is not None
        )


@dataclass(frozen=True)
class ChainConfig:
    """A whole chain: the seed's ``ChainConfig`` (``Chain.from_config`` builds it).

    ``layers`` are ordered fastest first; each is a layer or a :class:`LayerConfig`.
    ``name`` labels the chain's metrics. ``metrics_collector`` receives the metrics
    (``None``: none are recorded, at no cost). ``breaker`` and ``writer`` are the
    defaults for every layer that does not set its own. ``coherence``: see
    :class:`CoherenceConfig` (True: its defaults; False: off). ``load``: the
    defaults of ``get_or_load`` and ``cached`` (fail-safe, loader timeouts, eager
    refresh; see :class:`LoadConfig`). ``owns_collector``: the chain
    closes the collector (if it has ``close()``) when the chain closes; set by
    :func:`cachechain.chain_config_from_mapping`, which creates it.
    """

    layers: Sequence[CacheLayer | LayerConfig]
    name: str = "default"
    metrics_collector: Any = None
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    coherence: CoherenceConfig | bool = True
    owns_collector: bool = False
    load: LoadConfig = field(default_factory=LoadConfig)
