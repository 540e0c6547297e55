"""Eager refresh: a hit on a value past a share of its TTL reloads it in the background.

With ``eager_refresh=0.8``, a ``get_or_load`` hit whose value has less than 20% of its
TTL left returns that value at once and starts one background load of the key: one
per key per process (the single flight's: none starts while a load of the key is in
flight), on the chain's bounded background threads. Its value is stored as any load's
(through the fence: a ``set`` or ``delete`` of the key meanwhile wins). The TTL a value
was stored with comes from its entry (stamped entries keep it); for an entry that does
not say, the call's own ``ttl``; with neither, nothing is refreshed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._load_policy import LoadPolicy
from ._loads import LoadJob

if TYPE_CHECKING:
    from ._chain import Chain

__all__ = ["due", "refresh"]


def due(
    policy: LoadPolicy, fresh_left: float | None, origin: float | None, ttl: float | None
) -> bool:
    """Whether a hit with ``fresh_left`` seconds left of ``origin`` (the entry's TTL;
    None: unknown, ``ttl`` stands for it) is past the policy's eager-refresh point."""
    share = policy.refresh_at
    if share is None or fresh_left is None:
        return False
    total = origin if origin is not None else ttl
    return total is not None and fresh_left <= total * share


def refresh(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None,
    policy: LoadPolicy,
    load: Callable[..., tuple[Any, bool]],
) -> None:
    """Start the background reload of ``key`` (``load`` is the chain's
    ``load_and_store``) unless a load of it is in flight; never waits, never raises
    for the load (its failure is counted and logged, and holds the key's throttle:
    no other refresh of it for ``fail_safe_throttle`` seconds)."""
    loads = chain._loads
    if loads.throttle.holds(key):  # the last refresh (or load) failed: not yet
        return
    call = chain._flight.lead(key)
    if call is None:
        return
    if loads.m is not None:
        loads.m.record_eager_refresh()
    loads.start(chain, call, LoadJob(load, chain, key, loader, ttl, policy, recheck=False))
