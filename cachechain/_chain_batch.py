"""How a chain reads a batch of keys through its tiers (``Chain.get_many``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._fence import Ticket
from ._tier import Tier

__all__ = ["Backfill", "read_through"]

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
    for key, (value, ttl) in hits.items():
        ticket = tickets[key]
        if ticket is not None:
            skip = tuple([at for at, held in held_by.items() if key in held]) if held_by else ()
            backfill(ticket, index, key, value, ttl, skip)
