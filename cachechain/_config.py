"""Configuration of a chain: which layers, how each is protected, how writes flow.

Everything has a default that suits a web app: a remote layer is wrapped in a circuit
breaker (5 consecutive failures open it for 10 s) and gets a write-behind queue of
1,000 entries for backfills; sets reach it synchronously unless ``write_behind`` is on.
An in-process layer is written synchronously and not wrapped unless asked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import ConfigError
from .layers._base import CacheLayer

__all__ = ["BreakerConfig", "ChainConfig", "LayerConfig", "WriterConfig"]


def _positive(owner: str, name: str, value: Any, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "an int" if integer else "a number"
        raise ConfigError(f"{owner}.{name} must be {what} > 0, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ConfigError(f"{owner}.{name} must be finite, got {value!r}")


@dataclass(frozen=True)
class BreakerConfig:
    """Circuit-breaker settings for one layer (durations in seconds).

    ``max_failures`` consecutive failures open the breaker; after ``reset_timeout`` it
    lets ``half_open_max_calls`` trial calls through at once, and closes after
    ``half_open_successes`` of them succeed. ``failure_rate`` (0 to 1, ``None`` = off)
    also opens it when that share of the last ``window`` calls failed, once at least
    ``min_calls`` were made. Raises :class:`~cachechain.errors.ConfigError` when a
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
            _positive("breaker", name, getattr(self, name), integer=True)
        _positive("breaker", "reset_timeout", self.reset_timeout)
        rate = self.failure_rate
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1
        ):
            raise ConfigError(f"breaker.failure_rate must be in (0, 1] or None, got {rate!r}")
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
    :mod:`cachechain.writer`).
    """

    queue_size: int = 1000
    max_wait: float = 0.0
    workers: int = 1
    retry_delay: float = 0.05
    max_retry_delay: float = 2.0

    def __post_init__(self) -> None:
        _positive("writer", "queue_size", self.queue_size, integer=True)
        _positive("writer", "workers", self.workers, integer=True)
        _positive("writer", "retry_delay", self.retry_delay)
        _positive("writer", "max_retry_delay", self.max_retry_delay)
        if self.max_retry_delay < self.retry_delay:
            raise ConfigError(
                f"writer.max_retry_delay must be >= writer.retry_delay ({self.retry_delay}), "
                f"got {self.max_retry_delay!r}"
            )
        wait = self.max_wait
        if (
            isinstance(wait, bool)
            or not isinstance(wait, (int, float))
            or not (0 <= wait < math.inf)
        ):
            raise ConfigError(f"writer.max_wait must be a number of seconds >= 0, got {wait!r}")


@dataclass(frozen=True)
class LayerConfig:
    """One layer of a chain with its options.

    ``resilient``: wrap the layer in a circuit breaker and timeout (``None``: yes for a
    remote layer, no for an in-process one). ``breaker`` overrides the chain's default
    breaker settings for this layer; ``timeout`` (seconds) is the longest a call may
    take before it counts as a failure (default: the layer's own socket ``timeout``
    plus its ``connect_timeout``, as :class:`~cachechain.resilience.ResilientLayer`
    computes it).
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
        if self.timeout is not None:
            _positive("layer", "timeout", self.timeout)


@dataclass(frozen=True)
class ChainConfig:
    """A whole chain: the seed's ``ChainConfig`` (``Chain.from_config`` builds it).

    ``layers`` are ordered fastest first; each is a layer or a :class:`LayerConfig`.
    ``name`` labels the chain's metrics. ``metrics_collector`` receives the metrics
    (``None``: none are recorded, at no cost). ``breaker`` and ``writer`` are the
    defaults for every layer that does not set its own. ``owns_collector``: the chain
    closes the collector (if it has ``close()``) when the chain closes; set by
    :func:`cachechain.settings.chain_config_from_mapping`, which creates it.
    """

    layers: Sequence[CacheLayer | LayerConfig]
    name: str = "default"
    metrics_collector: Any = None
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    owns_collector: bool = False
