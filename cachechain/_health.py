"""A chain's health summary: what :meth:`Chain.health` returns.

:class:`ChainHealth` (with one :class:`LayerHealth` per layer, fastest first) is a frozen
snapshot an application can log or serve as JSON (:meth:`ChainHealth.as_dict`), for
example from a ``/healthz`` view. It is built from what the chain already holds: each
breaker's state, each layer's last failure (kept by the chain's failure reporter), each
async writer's queue and repairs, and the figures of a layer's ``stats()`` (a memcached
layer's servers marked down). Building it makes no I/O and never raises for a layer
failure: a figure that cannot be read is ``None``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ._breaker import CircuitBreaker
from ._chain_metrics import LastError, layer_type, stats_of
from ._writer import AsyncWriter
from .layers._base import CacheLayer

__all__ = ["ChainHealth", "LayerFailure", "LayerHealth", "chain_health"]

#: Breaker states by value (0 closed, 1 open, 2 half-open), as :class:`LayerHealth` names
#: them.
_STATES = ("closed", "open", "half_open")


@dataclass(frozen=True)
class LayerFailure:
    """A layer's last failure: the exception's ``type`` name, its ``message`` (at most
    200 characters) and ``at``, when it happened (seconds since the epoch,
    ``time.time()``). A refusal of an open breaker is not a failure."""

    type: str
    message: str
    at: float

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """The error as a JSON-ready dict, with ``age_seconds`` (seconds since it
        happened, as of ``now``, default ``time.time()``)."""
        now = time.time() if now is None else now
        return {
            "type": self.type,
            "message": self.message,
            "at": self.at,
            "age_seconds": max(0.0, now - self.at),
        }


@dataclass(frozen=True)
class LayerHealth:
    """One layer of a chain, at one point.

    ``name`` and ``type`` (the layer's class, unwrapped from its breaker);
    ``breaker``: ``"closed"``, ``"open"`` or ``"half_open"``, ``None`` for a layer without
    a breaker; ``last_error``: its last failure (``None`` if it never failed);
    ``queue_depth`` and ``queue_capacity``: writes waiting in its async writer and that
    queue's bound, ``repairs_pending``: keys whose repair delete waits for a retry (the
    layer may hold an older value of each); the three are ``None`` for a layer without a
    writer (the first). ``nodes`` and ``nodes_down``: its servers and those marked down,
    ``None`` for a layer that does not report them (an in-process layer).
    """

    name: str
    type: str
    breaker: str | None
    last_error: LayerFailure | None
    queue_depth: int | None
    queue_capacity: int | None
    repairs_pending: int | None
    nodes: int | None
    nodes_down: int | None

    @property
    def healthy(self) -> bool:
        """Whether the layer takes calls: its breaker (if any) is closed and none of its
        servers is marked down. A past error alone does not make it unhealthy."""
        return self.breaker in (None, "closed") and not self.nodes_down

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """The layer as a JSON-ready dict (``healthy`` included; see
        :meth:`LayerFailure.as_dict` for ``now``)."""
        return {
            "name": self.name,
            "type": self.type,
            "healthy": self.healthy,
            "breaker": self.breaker,
            "last_error": None if self.last_error is None else self.last_error.as_dict(now),
            "queue_depth": self.queue_depth,
            "queue_capacity": self.queue_capacity,
            "repairs_pending": self.repairs_pending,
            "nodes": self.nodes,
            "nodes_down": self.nodes_down,
        }


@dataclass(frozen=True)
class ChainHealth:
    """A chain at one point: its ``name``, whether it is ``closed``, and its ``layers``
    (:class:`LayerHealth`, fastest first)."""

    name: str
    closed: bool
    layers: tuple[LayerHealth, ...]

    @property
    def healthy(self) -> bool:
        """Whether the chain is open and every layer is healthy (a chain keeps answering
        when a layer is not: reads skip it as a miss)."""
        return not self.closed and all(layer.healthy for layer in self.layers)

    def layer(self, name: str) -> LayerHealth:
        """The layer called ``name``; raises ``KeyError`` for another name."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """The chain as a JSON-ready dict (``json.dumps`` takes it as is): ``name``,
        ``healthy``, ``closed`` and ``layers``; ``now`` (seconds since the epoch,
        default ``time.time()``) dates the errors' ``age_seconds``."""
        now = time.time() if now is None else now
        return {
            "name": self.name,
            "healthy": self.healthy,
            "closed": self.closed,
            "layers": [layer.as_dict(now) for layer in self.layers],
        }


class _Tier(Protocol):
    """What :func:`chain_health` reads of each layer of a chain (a tier)."""

    name: str
    layer: CacheLayer
    breaker: CircuitBreaker | None
    writer: AsyncWriter | None


def chain_health(
    name: str, tiers: Sequence[_Tier], last_errors: Mapping[str, LastError], *, closed: bool
) -> ChainHealth:
    """The health of the chain ``name`` of ``tiers``, whose layers' last failures are
    ``last_errors`` (by layer name). No I/O; never raises for a layer failure."""
    return ChainHealth(
        name=name,
        closed=closed,
        layers=tuple(_layer_health(tier, last_errors.get(tier.name)) for tier in tiers),
    )


def _layer_health(tier: _Tier, error: LastError | None) -> LayerHealth:
    breaker: str | None = None
    if tier.breaker is not None:
        try:
            breaker = _STATES[int(tier.breaker.state)]
        except Exception:  # a breaker that cannot tell: reported as unknown
            breaker = "unknown"
    depth = capacity = repairs = None
    if tier.writer is not None:
        try:
            queued = tier.writer.stats()
            depth, capacity, repairs = queued.depth, queued.capacity, queued.repairing
        except Exception:
            pass
    nodes = down = None
    stats = stats_of(tier.layer)
    if stats is not None:
        try:
            figures = stats()
            nodes = _int_or_none(getattr(figures, "nodes", None))
            down = _int_or_none(getattr(figures, "nodes_down", None))
        except Exception:
            pass
    return LayerHealth(
        name=tier.name,
        type=layer_type(tier.layer),
        breaker=breaker,
        last_error=None if error is None else LayerFailure(*error),
        queue_depth=depth,
        queue_capacity=capacity,
        repairs_pending=repairs,
        nodes=nodes,
        nodes_down=down,
    )


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
