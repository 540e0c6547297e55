"""How a chain reads a batch of keys through its tiers (``Chain.get_many``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._chain_metrics import Reporter
from ._fence import MutationFence, Ticket
from ._namespace import Namespace, NamespacedLayer, batch_under
from ._resilience import ResilientLayer, unwrapped
from ._tier import Tier
from .metrics._base import CollectorGuard

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker

__all__ = ["Backfill", "Backfiller", "PairBatch", "read_through"]

#: ``backfill(ticket, index, key, value, ttl, skip)``: copy a hit from the tier at
#: ``index`` into the tiers above it but those in ``skip``, if the fence allows.
Backfill = Callable[[Ticket, int, str, Any, "float | None", tuple[int, ...]], None]


def read_through(
    tiers: Sequence[Tier],
    wanted: list[str],
    tickets: Mapping[str, Ticket],
    backfill: Backfill,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Ask each of ``tiers``, fastest first and once, for those of ``wanted`` that the
    tiers above it missed and that its writer does not hold (checked after the
    ``tickets`` were taken), and ``backfill`` each hit of a lower tier, into no tier
    whose writer held the key. Return the values found and the index of the tier that
    served each key. Never raises for a layer failure (a failing tier has no hits)."""
    found: dict[str, Any] = {}
    served: dict[str, int] = {}
    remaining = wanted
    held_by: dict[int, frozenset[str]] = {}  # tier index -> keys its writer holds
    for tier in tiers:
        if not remaining:
            break
        ask = remaining
        held = tier.held(remaining)
        if held:
            held_by[tier.index] = held
            ask = [k for k in remaining if k not in held]
        hits = tier.read_many(ask)
        for key, (value, _) in hits.items():
            found[key] = value
            served[key] = tier.index
        if tier.index and hits:
            _backfill_hits(tier.index, hits, tickets, held_by, backfill)
        remaining = [k for k in remaining if k not in hits]
    return found, served


def _backfill_hits(
    index: int,
    hits: Mapping[str, tuple[Any, float | None]],
    tickets: Mapping[str, Ticket],
    held_by: Mapping[int, frozenset[str]],
    backfill: Backfill,
) -> None:
    many = getattr(backfill, "many", None)
    if many is not None and not held_by and many(index, hits, tickets):
        return
    for key, (value, ttl) in hits.items():  # a key mutated since its ticket: skipped
        skip = tuple([at for at, held in held_by.items() if key in held]) if held_by else ()
        backfill(tickets[key], index, key, value, ttl, skip)


class Backfiller:
    """A chain's :data:`Backfill`: copies a hit from the tier at ``index`` into the
    ``tiers`` above it but those in ``skip`` (their writers hold the key), unless
    ``fence`` saw a mutation of the key's stripe since ``ticket`` was taken, and never
    a value whose remaining TTL the layer cannot tell (``0.0``: a memcached counter),
    which must not outlive it. Failures go to ``report``; ``m``: the chain's metrics."""

    __slots__ = (
        "_fence",
        "_l1_fill_many",
        "_l1_name",
        "_l1_set",
        "_m",
        "_plain",
        "_report",
        "_tiers",
    )

    def __init__(
        self,
        tiers: Sequence[Tier],
        fence: MutationFence,
        report: Reporter,
        m: CollectorGuard | None,
    ) -> None:
        self._tiers = tiers
        self._fence = fence
        self._report = report
        # The first layer's one-item fill for a backfill (MemoryLayer.fill: set without
        # re-checking the TTL a lower layer gave), else its set.
        layer = tiers[0].layer
        self._l1_set = getattr(layer, "fill", None) or layer.set
        #: The first layer's batch fill (``MemoryLayer.fill_many``), if it has one.
        self._l1_fill_many = getattr(tiers[0].layer, "fill_many", None)
        self._l1_name = tiers[0].name
        self._plain = m is None  # nothing recorded: an L2 hit's fill is L1's set alone
        self._m = m

    def __call__(
        self,
        ticket: Ticket,
        index: int,
        key: str,
        value: Any,
        ttl: float | None,
        skip: tuple[int, ...],
    ) -> None:
        """Backfill ``key``'s ``value`` (``ttl`` seconds left) found at ``index``."""
        if ttl is not None and ttl <= 0.0:
            return
        if index == 1 and self._plain:
            # The usual L2 hit: only the first layer to fill, nothing to record. Its set
            # is called straight from the fence (the first layer has no writer).
            try:
                self._fence.if_unchanged(ticket, self._l1_set, key, value, ttl)
            except Exception as exc:
                self._report.failed(self._l1_name, "set", exc)
            return
        if not self._fence.if_unchanged(ticket, self._fill, index, key, value, ttl, skip):
            m = self._m
            if m is not None:  # a mutation of the key's stripe since the read began
                tiers = self._tiers
                for upper in range(index):
                    if upper not in skip:
                        m.record_backfill_skipped(tiers[upper].name, "mutated")

    def many(
        self,
        index: int,
        hits: Mapping[str, tuple[Any, float | None]],
        tickets: Mapping[str, Ticket],
    ) -> bool:
        """Backfill a batch of hits of the second tier into the first in one step (one
        fence lock, one layer lock), when that is the whole job: nothing to record, the
        first layer fills in batches. Return False to be told key by key instead."""
        fill_many = self._l1_fill_many
        if index != 1 or not self._plain or fill_many is None:
            return False
        items = [
            (tickets[key], (key, value, ttl))
            for key, (value, ttl) in hits.items()
            if ttl is None or ttl > 0.0
        ]
        try:
            self._fence.if_unchanged_many(items, fill_many)
        except Exception as exc:
            self._report.failed(self._l1_name, "set", exc)
        return True

    def _fill(
        self, index: int, key: str, value: Any, ttl: float | None, skip: tuple[int, ...]
    ) -> None:
        tiers = self._tiers
        for upper in range(index):
            if upper not in skip:
                tiers[upper].fill(key, value, ttl)


class PairBatch:
    """:func:`read_through` in one step for the usual chain: two tiers, no metrics, the
    first an in-process layer that fills in batches (``fill_many``), the second a layer
    that maps a key prefix itself (``get_many_under``: a
    :class:`~cachechain.MemcachedLayer`), behind the chain's own wrappers only (a
    :class:`~cachechain._resilience.ResilientLayer`, a
    :class:`~cachechain._namespace.NamespacedLayer`), whose forwarding it makes itself
    as :class:`~cachechain._atomic_plan.AtomicPlan` does: the same breaker permit, the
    same timing against the same timeout, the generation's prefix read inside the
    breaker. The batch is copied once per step instead of once per wrapper, and the
    hits go to the first layer under one hold of the fence's lock, as
    :meth:`Backfiller.many` puts them. Keys the second tier's writer holds send the
    batch through :func:`read_through` (they are neither read nor backfilled there).
    Built by :meth:`of`; immutable."""

    __slots__ = (
        "_breaker",
        "_clock",
        "_fence",
        "_fill_many",
        "_first",
        "_namespace",
        "_report",
        "_second",
        "_timeout",
        "_under",
    )

    def __init__(self, tiers: Sequence[Tier], fence: MutationFence, report: Reporter) -> None:
        first, second = tiers
        self._first = first
        self._second = second
        self._fence = fence
        self._report = report
        fill: Any = first.layer  # a layer with fill_many (checked by of())
        self._fill_many: Callable[[list[tuple[str, Any, float | None]]], object] = fill.fill_many
        layer = second.layer
        self._breaker: CircuitBreaker | None = None
        self._timeout: float | None = None
        self._clock: Callable[[], float] | None = None
        if type(layer) is ResilientLayer:
            self._breaker, self._timeout, self._clock = layer.breaker, layer.timeout, layer._clock
            layer = layer.layer
        self._namespace: Namespace | None = None
        if type(layer) is NamespacedLayer:
            self._namespace = layer.namespace
            layer = layer.layer
        self._under: Callable[[str, Sequence[str]], dict[str, tuple[Any, float | None]]] = (
            batch_under(layer)  # type: ignore[assignment]  # checked by of()
        )

    @classmethod
    def of(
        cls, tiers: Sequence[Tier], fence: MutationFence, report: Reporter, metered: bool
    ) -> PairBatch | None:
        """The reader of a chain of ``tiers``, or None when it is not the usual one
        (see the class docstring; ``metered``: the chain records metrics)."""
        if metered or len(tiers) != 2 or type(tiers[0]) is not Tier:
            return None
        if getattr(tiers[0].layer, "fill_many", None) is None:
            return None
        layer = tiers[1].layer
        inner = layer.layer if type(layer) is ResilientLayer else layer
        inner = inner.layer if type(inner) is NamespacedLayer else inner
        if inner is not unwrapped(layer) or batch_under(inner) is None:
            return None  # wrappers the reader does not know
        return cls(tiers, fence, report)

    def read(
        self, wanted: list[str], tickets: Mapping[str, Ticket], backfill: Backfill
    ) -> dict[str, Any]:
        """The values of ``wanted`` found in either tier (see :func:`read_through`,
        whose result it returns). Never raises for a layer failure."""
        if not wanted:
            return {}  # no layer is asked (nor its breaker)
        first = self._first
        found = self._near(wanted)
        if found:
            remaining = [key for key in wanted if key not in found]
            if not remaining:
                return found
        else:
            remaining = wanted
        second = self._second
        if second.held(remaining):  # the writer's keys: read_through skips them
            more, _ = read_through((second,), remaining, tickets, backfill)
            found.update(more)
            return found
        try:
            hits = self._read(remaining)
        except Exception as exc:
            self._report.failed(second.name, "get_many", exc)
            return found
        fills = []
        for key, pair in hits.items():
            found[key] = pair[0]
            ttl = pair[1]
            if ttl is None or ttl > 0.0:  # never a counter's copy (0.0: TTL unknown)
                fills.append((tickets[key], (key, pair[0], ttl)))
        if fills:
            try:
                self._fence.if_unchanged_many(fills, self._fill_many)
            except Exception as exc:
                self._report.failed(first.name, "set", exc)
        return found

    def _near(self, wanted: list[str]) -> dict[str, Any]:
        """The first layer's values among ``wanted``, taken as :meth:`Tier.read_many
        <cachechain._tier.Tier.read_many>` takes them (asked keys only, ``(value,
        ttl)`` pairs, anything else a failure of the layer: counted, no hits)."""
        try:
            near = self._first.layer.get_many_with_ttl(wanted)
            if not near:
                return {}
            asked = set(wanted)
            return {key: value for key, (value, _) in near.items() if key in asked}
        except Exception as exc:
            self._report.failed(self._first.name, "get_many", exc)
            return {}

    def _read(self, keys: list[str]) -> dict[str, tuple[Any, float | None]]:
        """The second layer's hits among ``keys``, read as its wrappers would."""
        ns = self._namespace
        breaker = self._breaker
        if breaker is None:
            return self._under("" if ns is None else ns.current(), keys)
        permit = breaker.acquire()
        timeout = self._timeout
        clock: Any = self._clock
        start = clock() if timeout is not None else 0.0
        try:
            hits = self._under("" if ns is None else ns.prefix or ns.current(), keys)
        except BaseException as exc:
            breaker.on_error(permit, exc)
            raise
        if timeout is not None and clock() - start > timeout:
            breaker.on_failure(permit)
        else:
            breaker.on_success(permit)
        return hits
