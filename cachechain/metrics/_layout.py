"""Where each series sits in a thread's flat list of numbers, derived from the catalogue.

A chain's list is its chain block (one histogram per fused record, one more per fused
record for the weighted samples of a :class:`~cachechain.metrics.HitSampler`, then the
cells of the metrics without a ``layer`` label) followed by one layer block per layer (the cells
of the metrics with one). A counter cell is one slot; a histogram cell is ``nb`` bucket
slots (the last above every bound), then its sum and its maximum. Gauges are not kept
in the lists (they are the latest value reported, not a count).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._catalogue import COUNTER, GAUGE, HISTOGRAM, METRICS, RECORDS, Arg, Feed, Metric, find_record

__all__ = ["Block", "Hist", "Layout", "Slot"]

#: Kinds of step a record call makes on a slot.
INC, ADD, OBSERVE = "inc", "add", "observe"


@dataclass(frozen=True)
class Hist:
    """One histogram read from the accumulators: per-bucket counts (not cumulative,
    the last one above every bound), the sum and the largest value (seconds)."""

    counts: list[int]
    total: float
    max: float

    @property
    def count(self) -> int:
        """How many durations were counted."""
        return sum(self.counts)

    def __add__(self, other: Hist) -> Hist:
        return Hist(
            list(map(operator.add, self.counts, other.counts)),
            self.total + other.total,
            max(self.max, other.max),
        )


@dataclass(frozen=True)
class Slot:
    """What one record call does to one cell: ``step`` is :data:`INC` (count one),
    :data:`ADD` (add the argument at ``arg``) or :data:`OBSERVE` (count the duration at
    ``arg`` in a histogram); ``offset`` is relative to the layer's block when
    ``per_layer``, else to the chain's block."""

    metric: Metric
    step: str
    offset: int
    per_layer: bool
    arg: int = -1


class Block:
    """The slots of the cells of ``metrics`` (counters and histograms), relative to the
    block's start; position labels take ``0`` to ``positions``. ``fused`` records get
    two histograms each, before the cells: one for their calls, one for the weighted
    samples of the hits a :class:`~cachechain.metrics.HitSampler` counts."""

    def __init__(
        self, metrics: Iterable[Metric], positions: int, hsize: int, fused: Sequence[str] = ()
    ) -> None:
        self.positions = positions
        #: Offset of each (metric name, cell).
        self.slots: dict[tuple[str, tuple[Any, ...]], int] = {}
        #: Every (metric, cell, offset), in order.
        self.cells: list[tuple[Metric, tuple[Any, ...], int]] = []
        #: Where every histogram starts.
        self.histograms: list[int] = []
        #: Where the histogram of each fused record starts.
        self.fused: dict[str, int] = {}
        #: Where the histogram of each fused record's weighted samples starts.
        self.sampled: dict[str, int] = {}
        size = 0
        for name in fused:  # first: small offsets are ints Python does not allocate
            self.fused[name] = size
            self.sampled[name] = size + hsize
            self.histograms += [size, size + hsize]
            size += 2 * hsize
        for m in metrics:
            if m.kind == GAUGE:
                continue
            for cell in m.cells(positions):
                self.slots[(m.name, cell)] = size
                self.cells.append((m, cell, size))
                if m.kind == HISTOGRAM:
                    self.histograms.append(size)
                size += hsize if m.kind == HISTOGRAM else 1
        self.size = size

    def slot(self, m: Metric, cell: tuple[Any, ...]) -> int | None:
        """The offset of ``cell`` of ``m``, its values folded as the accumulators keep
        them (an unknown value as ``other`` when the label has it, a position past the
        last as the last); ``None`` when the cell cannot be kept."""
        found = self.slots.get((m.name, cell))
        if found is not None:
            return found
        pairs = zip(m.extra_labels, cell, strict=True)
        folded = tuple(self._fold(m, label, value) for label, value in pairs)
        return self.slots.get((m.name, folded))

    def _fold(self, m: Metric, label: str, value: Any) -> Any:
        if label == m.positions and isinstance(value, int):
            return value if 0 <= value < self.positions else self.positions
        values = m.values.get(label, ())
        if value in values or "other" not in values:
            return value
        return "other"


class Layout:
    """The blocks of the accumulators for histograms of ``bounds`` (seconds)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.nb = len(self.bounds) + 1
        self.hsize = self.nb + 2
        #: The block of one layer.
        self.layer = Block((m for m in METRICS if m.per_layer), 0, self.hsize)
        self._fused = tuple(r.name for r in RECORDS if r.stands_for)

    def chain(self, positions: int) -> Block:
        """The block of a chain whose position labels take ``0`` to ``positions``."""
        metrics = (m for m in METRICS if not m.per_layer)
        return Block(metrics, positions, self.hsize, self._fused)

    def hist(self, totals: Sequence[Any], offset: int) -> Hist:
        """The histogram whose slots start at ``offset`` of ``totals``."""
        end = offset + self.nb
        return Hist(list(totals[offset:end]), totals[end], totals[end + 1])

    def slots(self, chain: Block, name: str, args: Mapping[str, Any]) -> list[Slot]:
        """What a call of the ``record_*`` method ``name`` with ``args`` (by parameter
        name; only those that choose label values are needed) does to the counters and
        histograms, values folded (see :meth:`Block.slot`); gauges are left out."""
        rec = find_record(name)
        out: list[Slot] = []
        for m in METRICS:
            for feed in m.feeds:
                if feed.record != name or m.kind == GAUGE or not feed.applies(args):
                    continue
                block = self.layer if m.per_layer else chain
                offset = block.slot(m, m.cell(feed, args))
                if offset is not None:
                    out.append(_slot(m, feed, offset, rec.param_names))
        return out

    def fused_targets(self, chain: Block, name: str) -> list[Slot]:
        """The slots the fused record ``name`` stands for (see
        :attr:`~cachechain.metrics.Record.stands_for`)."""
        out: list[Slot] = []
        for target, fixed in find_record(name).stands_for:
            args = {k: v for k, v in fixed.items() if not isinstance(v, Arg)}
            out += self.slots(chain, target, args)
        return out

    def fold_fused(
        self,
        totals: list[Any],
        chain: Block,
        first: int | None,
        sampled: Mapping[str, int] | None = None,
    ) -> None:
        """Add each fused histogram of ``totals`` into the cells it stands for (the
        layer cells of the layer block at ``first``; nothing without one). The hits
        of a fused record that a sampler counted (``sampled``, by record name) are
        added to its counters, and its weighted samples to its histograms."""
        if first is None:
            return
        for name, start in chain.fused.items():
            own = self.hist(totals, start)
            h = own + self.hist(totals, chain.sampled[name])
            counted = own.count + (sampled or {}).get(name, 0)
            self._fold_one(totals, chain, name, first, h, counted)

    def _fold_one(
        self, totals: list[Any], chain: Block, name: str, first: int, h: Hist, counted: int
    ) -> None:
        nb = self.nb
        for target in self.fused_targets(chain, name):
            at = target.offset + (first if target.per_layer else 0)
            if target.metric.kind == COUNTER:
                totals[at] += counted
                continue
            for i, n in enumerate(h.counts):
                totals[at + i] += n
            totals[at + nb] += h.total
            totals[at + nb + 1] = max(totals[at + nb + 1], h.max)


def _slot(m: Metric, feed: Feed, offset: int, params: tuple[str, ...]) -> Slot:
    arg = params.index(feed.value) if feed.value is not None else -1
    if m.kind == HISTOGRAM:
        return Slot(m, OBSERVE, offset, m.per_layer, arg)
    return Slot(m, INC if arg < 0 else ADD, offset, m.per_layer, arg)
