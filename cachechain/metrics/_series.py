"""What one chain recorded, read at one point, as series of the catalogue's metrics.

The accumulating collectors read their figures as :class:`ViewData` and turn them into
:class:`Series` with :func:`series`; the Prometheus collector exports the series that
are shown, the memory collector adds every series up into its snapshot. Which series
are shown (zeros included) follows :attr:`~cachechain.metrics.Metric.always` and
:attr:`~cachechain.metrics.Metric.shown_with`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._catalogue import GAUGE, HISTOGRAM, METRICS, Metric, find_metric
from ._layout import Block, Hist, Layout

__all__ = ["Series", "ViewData", "series"]


@dataclass
class ViewData:
    """What one chain recorded, read at one point: the merged numbers and the gauges.

    ``layers`` lists the layer names in order (bound first), ``offsets`` where each
    layer's block starts in ``totals``; ``bound`` is how many of them the chain was
    built with. ``totals`` has the fused histograms folded into the cells they stand
    for already. ``gauges`` maps a gauge's name to its latest value by layer name;
    ``info`` an info metric's name to the label values (after ``chain``) of its
    series.
    """

    chain: str
    layers: list[str]
    bound: int
    offsets: dict[str, int]
    totals: list[Any]
    layout: Layout
    block: Block
    gauges: dict[str, dict[str, int]] = field(default_factory=dict)
    info: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)

    def value(self, m: Metric, cell: tuple[Any, ...], layer: str | None = None) -> Any:
        """The count (a counter) or :class:`Hist` (a histogram) of ``cell`` of ``m``, for
        ``layer`` when ``m`` is per layer; zero for a cell that is not kept."""
        base = self.offsets[layer] if layer is not None else 0
        block = self.layout.layer if layer is not None else self.block
        offset = block.slot(m, cell)
        if m.kind == HISTOGRAM:
            if offset is None:
                return Hist([0] * self.layout.nb, 0.0, 0.0)
            return self.layout.hist(self.totals, base + offset)
        return 0 if offset is None else self.totals[base + offset]

    def hist(self, name: str, layer: str | None = None, **labels: str) -> Hist:
        """The histogram ``name`` (a metric of the catalogue) of ``layer`` with the
        ``labels`` given (the other labels after ``chain`` and ``layer``)."""
        m = find_metric(name)
        value: Hist = self.value(m, tuple(labels[n] for n in m.extra_labels), layer)
        return value

    @property
    def transitions(self) -> dict[tuple[str, int], int]:
        """Breaker transitions counted, by (layer, state entered)."""
        m = find_metric("circuit_transitions_total")
        states = m.values["to"]
        out = {}
        for layer in self.layers:
            for index, state in enumerate(states):
                n = self.value(m, (state,), layer)
                if n:
                    out[(layer, index)] = n
        return out


@dataclass(frozen=True)
class Series:
    """One series: ``metric``, ``layer`` (``None`` for a metric of the chain), ``cell``
    (the values of the labels after ``chain`` and ``layer``; a position is an int, see
    :meth:`labels`), its ``value`` (an int, or a :class:`Hist`), and whether it is
    ``shown`` (exported) even when zero."""

    metric: Metric
    layer: str | None
    cell: tuple[Any, ...]
    value: Any
    shown: bool

    def labels(self, data: ViewData) -> tuple[str, ...]:
        """Every label value, ``chain`` first; a position is shown as the name of the
        layer there, or ``unknown`` past the layers the chain was built with."""
        head = (data.chain,) if self.layer is None else (data.chain, self.layer)
        return (*head, *(_shown_value(v, data) for v in self.cell))


def _shown_value(value: Any, data: ViewData) -> str:
    if isinstance(value, int):
        return data.layers[value] if value < data.bound else "unknown"
    return str(value)


_PAIRS = {"hits_total": "misses_total", "misses_total": "hits_total"}


def series(data: ViewData) -> Iterator[Series]:
    """Every series of ``data``: every cell kept for each of its layers and for the
    chain (zeros included), every gauge reported (a one-hot gauge as one series per
    state, see :attr:`Metric.one_hot_of`) and every info series."""
    yield from _layer_series(data)
    for m, cell, offset in data.block.cells:
        value = _read(data, m, offset)
        yield Series(m, None, cell, value, _nonzero(value) or _always(m, cell, data, True))
    for m in METRICS:
        if m.info:
            yield from _info_series(data, m)
        elif m.one_hot_of is not None:
            yield from _one_hot_series(data, m)
        elif m.kind == GAUGE:
            for layer, value in data.gauges[m.name].items():
                yield Series(m, layer, (), value, True)


def _layer_series(data: ViewData) -> Iterator[Series]:
    """The per-layer cells of ``data``, each shown when non-zero, always exported, the
    partner of a non-zero hit or miss count, or shown with a gauge the layer reports."""
    bound = set(data.layers[: data.bound])
    paired = _nonzero_pairs(data)
    for m, cell, offset in data.layout.layer.cells:
        for layer in data.layers:
            value = _read(data, m, data.offsets[layer] + offset)
            shown = (
                _nonzero(value)
                or _always(m, cell, data, layer in bound)
                or (layer, _PAIRS.get(m.name)) in paired
                or (m.shown_with is not None and layer in data.gauges[m.shown_with])
            )
            yield Series(m, layer, cell, value, shown)


def _info_series(data: ViewData, m: Metric) -> Iterator[Series]:
    """The series of the info metric ``m`` (always 1)."""
    for values in data.info.get(m.name, ()):
        if m.per_layer:
            yield Series(m, values[0], values[1:], 1, True)
        else:
            yield Series(m, None, values, 1, True)


def _one_hot_series(data: ViewData, m: Metric) -> Iterator[Series]:
    """One 0/1 series per state of each layer's gauge ``m.one_hot_of``."""
    assert m.one_hot_of is not None
    choices = m.values[m.extra_labels[-1]]
    for layer, value in data.gauges[m.one_hot_of].items():
        for index, choice in enumerate(choices):
            yield Series(m, layer, (choice,), int(index == value), True)


def _nonzero_pairs(data: ViewData) -> set[tuple[str, str]]:
    """The (layer, metric) cells of :data:`_PAIRS` metrics that are non-zero. A hit
    ratio needs both counts: on a layer the chain did not declare (the default view's,
    or one reported later), a zero hits or misses count is shown beside a non-zero
    partner."""
    return {
        (layer, m.name)
        for m, _, offset in data.layout.layer.cells
        if m.name in _PAIRS
        for layer in data.layers
        if _nonzero(_read(data, m, data.offsets[layer] + offset))
    }


def _read(data: ViewData, m: Metric, at: int) -> Any:
    return data.layout.hist(data.totals, at) if m.kind == HISTOGRAM else data.totals[at]


def _nonzero(value: Any) -> bool:
    return bool(value.count if isinstance(value, Hist) else value)


def _always(m: Metric, cell: tuple[Any, ...], data: ViewData, declared: bool) -> bool:
    """Whether ``cell`` is exported with zeros: the chain and layer were declared, no
    position lies past the declared layers, and it matches a pattern of ``always``."""
    if not (declared and data.bound and m.always):
        return False
    values = dict(zip(m.extra_labels, cell, strict=True))
    position = values.get(m.positions) if m.positions is not None else None
    if isinstance(position, int) and position >= data.bound:
        return False
    return any(_matches(values, pattern) for pattern in m.always)


def _matches(values: Mapping[str, Any], pattern: Mapping[str, str]) -> bool:
    return all(values[k] == v for k, v in pattern.items())
