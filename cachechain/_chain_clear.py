"""``Chain.clear()``: the cache emptied for this process and, through the namespace
generation, for every process sharing the chain's shared layer.

The whole clear is one mutation of every key in the chain's fence: no read or load in
flight stores what it read or loaded while the clear runs, nor after it.

1. The async writers make what they hold (at most :data:`FLUSH_TIMEOUT` seconds); the
   sets still queued then are turned into deletes of their keys, so that no write
   queued before the clear lands after it (in the new generation).
2. With ``flush=True``, every shared layer that can be emptied is (memcached's
   ``flush_all``).
3. With a :class:`~cachechain._coherence.Coherence`, the namespace generation moves
   and the in-process layers are emptied; without one, the in-process layers are
   emptied and a shared layer counts as cleared only when it was flushed.

Emptying in-process layers is one mutation of every key in the chain's fence
(:func:`clear_layers`), so no read in flight backfills an old value after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from . import _tier
from ._chain_metrics import Reporter
from ._errors import ChainClosedError, InvalidValueError
from ._fence import MutationFence
from ._resilience import unwrapped
from ._tier import Tier
from .layers._base import SupportsClear

if TYPE_CHECKING:
    from ._chain import Chain

__all__ = ["FLUSH_TIMEOUT", "clear", "clear_layer", "clear_layers"]

#: Seconds ``clear()`` waits for the async writers to make what they hold.
FLUSH_TIMEOUT = 1.0


def clear(chain: Chain, flush: bool) -> bool:
    """What :meth:`Chain.clear <cachechain.Chain.clear>` does; see there."""
    if not isinstance(flush, bool):
        raise InvalidValueError(f"flush must be a bool, got {flush!r}")
    if chain._closed:
        raise ChainClosedError("the chain is closed")
    with chain._fence.mutating_all(_nothing):
        _tier.flush(chain._tiers, FLUSH_TIMEOUT)
        _tier.delete_queued_sets(chain._tiers)  # what is left was written before
        chain._flight.forget_all()  # no load begun before the clear is joined after it
        ok = _flush_shared(chain._tiers, chain._report) if flush else True
        if chain._coherence is not None:
            return chain._coherence.clear() and ok
        local = [t for t in chain._tiers if t.layer.local]
        cleared = clear_layers(chain._fence, chain._report, local)
        return cleared and (flush or len(local) == len(chain._tiers)) and ok


def _nothing() -> None:
    """The end of the clear's outer mutation: its layers were emptied inside it."""


def clear_layers(
    fence: MutationFence,
    report: Reporter,
    tiers: Sequence[Tier],
    *,
    first: Callable[[Tier], bool] | None = None,
) -> bool:
    """Empty the layers of ``tiers`` as one mutation of every key (the first layer's,
    if among them, under the fence's lock as the mutation ends: by ``first(tier)``,
    which returns whether it was emptied, when given). Return whether every one could
    be emptied (a failure, or a layer without ``clear()``, is counted)."""
    empty = first or partial(clear_layer, report)
    done: list[bool] = []

    def then() -> None:
        done.extend(empty(t) for t in tiers if t.index == 0)

    with fence.mutating_all(then):
        done.extend(clear_layer(report, t) for t in tiers if t.index != 0)
    return all(done)


def _flush_shared(tiers: Sequence[Tier], report: Reporter) -> bool:
    """``clear()`` every shared layer that has one (memcached: ``flush_all``)."""
    ok = True
    for tier in tiers:
        if not tier.layer.local:
            ok = clear_layer(report, tier, unwrapped(tier.layer)) and ok
    return ok


def clear_layer(report: Reporter, tier: Tier, layer: object = None) -> bool:
    """``clear()`` ``layer`` (default: the tier's); False, counted, when it cannot."""
    target = tier.layer if layer is None else layer
    try:
        if not isinstance(target, SupportsClear):
            raise TypeError(f"layer {tier.name!r} has no clear()")
        target.clear()
    except Exception as exc:
        report.failed(tier.name, "clear", exc)
        return False
    return True
