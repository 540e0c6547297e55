"""How a chain reads a batch of keys through its tiers (``Chain.get_many``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._atomic_plan import chain_wrappers
from ._chain_metrics import Reporter
from ._fence import MutationFence, Ticket, Tickets
from ._namespace import Namespace, batch_under
from ._resilience import ResilientLayer
from ._tier import Tier, fill_of, shortcut
from .metrics._base import CollectorGuard

__all__ = ["Backfill", "Backfiller", "PairBatch", "read_through"]

#: ``backfill(ticket, index, key, value, ttl, skip)``: copy a hit from the tier at
#: ``index`` into the tiers above it but those in ``skip``, if the fence allows.
Backfill = Callable[[Ticket, int, str, Any, "float | None", tuple[int, ...]], None]


def read_through(
    tiers: Sequence[Tier],
    wanted: list[str],
    tickets: Tickets,
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
    tickets: Tickets,
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
        self._l1_set = fill_of(tiers[0].layer)  # the first layer's one-item backfill
        #: The first layer's batch fill (``MemoryLayer.fill_many``), if it has one that
        #: bypasses no override of its writes.
        self._l1_fill_many = shortcut(tiers[0].layer, "fill_many", "set", "set_many", "fill")
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
        if ttl is not None and not ttl > 0.0:  # unknown (0.0), or none left (NaN too)
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

    @property
    def batches(self) -> bool:
        """Whether :meth:`many` backfills a batch of the second tier in one step."""
        return self._plain and self._l1_fill_many is not None

    def many(
        self,
        index: int,
        hits: Mapping[str, tuple[Any, float | None]],
        tickets: Tickets,
    ) -> bool:
        """Backfill a batch of hits of the second tier into the first in one step (one
        fence lock, one layer lock), when that is the whole job: nothing to record, the
        first layer fills in batches. Return False to be told key by key instead."""
        fill_many = self._l1_fill_many
        if index != 1 or not self._plain or fill_many is None:
            return False
        try:  # fill_many skips what a counter's 0.0 says: a TTL it cannot tell
            self._fence.if_unchanged_many(tickets, hits, fill_many)
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
    :class:`~cachechain._resilience.ResilientLayer`, whose breaker and timing it goes
    through, a :class:`~cachechain._namespace.NamespacedLayer`, whose generation's
    prefix it gives the layer inside the breaker). The batch is copied once per step
    instead of once per wrapper, and the hits are backfilled by
    :meth:`Backfiller.many`. Keys the second tier's writer holds send the batch
    through :func:`read_through` (they are neither read nor backfilled there). Built
    by :meth:`of`; immutable."""

    __slots__ = ("_backfill", "_first", "_namespace", "_report", "_resilient", "_second", "_under")

    def __init__(
        self,
        tiers: Sequence[Tier],
        report: Reporter,
        backfill: Backfiller,
        resilient: ResilientLayer | None,
        namespace: Namespace | None,
        under: Callable[[str, Sequence[str]], dict[str, tuple[Any, float | None]]],
    ) -> None:
        self._first, self._second = tiers
        self._report = report
        self._backfill = backfill
        self._resilient = resilient
        self._namespace = namespace
        self._under = under

    @classmethod
    def of(cls, tiers: Sequence[Tier], report: Reporter, backfill: Backfiller) -> PairBatch | None:
        """The reader of a chain of ``tiers`` backfilled by ``backfill``, or None when
        it is not the usual one (see the class docstring)."""
        if len(tiers) != 2 or type(tiers[0]) is not Tier or not backfill.batches:
            return None
        resilient, namespace, inner = chain_wrappers(tiers[1].layer)
        under = None if inner is None else batch_under(inner)
        if under is None:
            return None  # wrappers the reader does not know, or no get_many_under
        return cls(tiers, report, backfill, resilient, namespace, under)

    def read(self, wanted: list[str], tickets: Tickets) -> dict[str, Any]:
        """The values of ``wanted`` found in either tier (see :func:`read_through`,
        whose result it returns). Never raises for a layer failure."""
        if not wanted:
            return {}  # no layer is asked (nor its breaker)
        found = self._near(wanted)
        if found:
            remaining = [key for key in wanted if key not in found]
            if not remaining:
                return found
        else:
            remaining = wanted
        second = self._second
        if second.held(remaining):  # the writer's keys: read_through skips them
            more, _ = read_through((second,), remaining, tickets, self._backfill)
            found.update(more)
            return found
        try:
            resilient = self._resilient
            if resilient is None:
                hits = self._read(remaining)
            else:
                hits = resilient._forward(self._read, remaining)
        except Exception as exc:
            self._report.failed(second.name, "get_many", exc)
            return found
        found.update({key: value for key, (value, _) in hits.items()})
        self._backfill.many(1, hits, tickets)
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
        """The second layer's hits among ``keys``, in the current generation."""
        ns = self._namespace
        return self._under("" if ns is None else ns.current(), keys)
