"""MemoryCollector: every metric in memory, for tests, admin pages and the demo.

It records through the lock-free accumulating engine (:mod:`cachechain.metrics._engine`)
and builds its snapshot from the catalogue: every series of every chain is added into
the snapshot fields its metric names (:attr:`~cachechain.metrics.Metric.fields`).
"""

from __future__ import annotations

from typing import Any

from ._base import DEFAULT_SAMPLE_HITS
from ._catalogue import CIRCUIT_STATES, DROP_REASONS, OPERATIONS, Field
from ._engine import MAX_LAYERS, AccumulatingCollector, ChainView
from ._layout import Hist
from ._series import Series, ViewData, series
from ._types import (
    BUCKET_BOUNDS,
    CacheMetrics,
    ChainMetrics,
    LatencyHistogram,
    MetricsSnapshot,
)

# The names the 0.1 module cachechain.metrics.memory exported: its deprecated stub
# reads them here until 0.3.
__all__ = [
    "CIRCUIT_STATES",
    "DROP_REASONS",
    "MAX_LAYERS",
    "OPERATIONS",
    "AccumulatingCollector",
    "ChainView",
    "Hist",
    "MemoryCollector",
    "ViewData",
]


class MemoryCollector(AccumulatingCollector):
    """Collects every metric in memory: :meth:`snapshot` for a copy to assert on or to
    display, :meth:`reset` to start over.

    Thread-safe and cheap on the request path (see :mod:`cachechain.metrics._engine`);
    memory is fixed per chain and layer whatever the traffic. One collector may serve
    several chains: figures of layers with the same name add up, and so do the chain
    figures. Latency percentiles are accurate to one bucket of
    :data:`~cachechain.metrics._types.BUCKET_BOUNDS` (about 15%); maxima are exact
    among the durations timed. ``hits_by_layer`` counts positions past the chain's
    layers (and past 8) together under that last position. ``sample_hits`` (default
    :data:`~cachechain.metrics.DEFAULT_SAMPLE_HITS`, as
    :class:`~cachechain.PrometheusCollector`) times one first-layer hit of a chain's
    ``get`` in that many, counted for the hits since the one before in the latency
    figures; hit counts stay exact either way. ``sample_hits=1`` times every hit, so
    that latency counts and maxima are exact too (a test that asserts on them). Raises
    ``ValueError`` for a ``sample_hits`` that is not an int of at least 1.
    """

    def __init__(self, *, sample_hits: int = DEFAULT_SAMPLE_HITS) -> None:
        super().__init__(BUCKET_BOUNDS, track_max=True, track_sum=False, sample_hits=sample_hits)

    def snapshot(self) -> MetricsSnapshot:
        """Run the refresh hooks and return every figure: per layer name (layers of
        every chain, first-layer hits included) and for the chains together."""
        layers: dict[str, dict[str, Any]] = {}
        chain: dict[str, Any] = {}
        for data in self.read():
            for name in data.layers:
                layers.setdefault(name, {})
            for s in series(data):
                _add(layers[s.layer] if s.layer is not None else chain, s)
        return MetricsSnapshot(
            layer_metrics={name: CacheMetrics(**self._finish(f)) for name, f in layers.items()},
            chain_metrics=ChainMetrics(**self._finish(chain)),
        )

    def _finish(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Histograms as latency statistics."""
        return {
            name: _stats(value, self.bounds) if isinstance(value, Hist) else value
            for name, value in fields.items()
        }


def _add(fields: dict[str, Any], s: Series) -> None:
    """Add ``s`` into the snapshot fields its metric fills."""
    labels = dict(zip(s.metric.extra_labels, s.cell, strict=True))
    for f in s.metric.fields:
        if all(labels[k] == v for k, v in f.where.items()):
            _add_field(fields, f, s, labels)


def _add_field(fields: dict[str, Any], f: Field, s: Series, labels: dict[str, Any]) -> None:
    value = s.value
    if f.by is not None:
        if value.count if isinstance(value, Hist) else value:
            by: dict[Any, Any] = fields.setdefault(f.name, {})
            key = labels[f.by]
            by[key] = value if key not in by else by[key] + value
        return
    old = fields.get(f.name)
    if old is None:
        fields[f.name] = value
    elif s.metric.merge == "max":
        fields[f.name] = max(old, value)
    else:
        fields[f.name] = old + value


def _stats(h: Hist, bounds: tuple[float, ...]) -> Any:
    return LatencyHistogram.from_counts(h.counts, h.total, h.max, bounds).stats()
