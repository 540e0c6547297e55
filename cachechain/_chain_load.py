"""``Chain.get_or_load``: read through the chain, or load once per process and cache.

The loader runs inside the chain's single flight (one call per key in this process,
however many threads miss it together). Its result is cached in every layer only if
no mutation of the key's stripe began since the load started (the mutation fence's
ticket, taken before the loader runs), so a ``set`` or ``delete`` made while the
loader ran is never overwritten by the value it loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .layers._base import MISSING
from .metrics._base import CollectorGuard

if TYPE_CHECKING:
    from ._chain import Chain

__all__ = ["get_or_load"]

_perf = time.perf_counter


def get_or_load(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None,
    wait_timeout: float | None,
) -> Any:
    """What :meth:`Chain.get_or_load <cachechain.Chain.get_or_load>` does; see there."""
    value = chain.get(key, MISSING)
    if value is not MISSING:
        return value
    fence = chain._fence

    def load() -> Any:
        ticket = fence.ticket(key)
        try:
            again = chain._l1_get(key)  # a load that just finished may have filled it
        except Exception:
            again = MISSING
        if again is not MISSING:
            return again
        loaded = _timed_load(chain._m, loader)
        if ticket is not None:
            fence.if_unchanged(ticket, _store, chain, key, loaded, ttl)
        return loaded

    value, shared = chain._flight.do(key, load, wait_timeout)
    if shared and chain._m is not None:
        chain._m.record_singleflight_shared()
    return value


def _store(chain: Chain, key: str, value: Any, ttl: float | None) -> None:
    for tier in reversed(chain._tiers):  # the first tier's fill is a set
        tier.fill(key, value, ttl)


def _timed_load(m: CollectorGuard | None, loader: Callable[[], Any]) -> Any:
    """``loader()``, its outcome and duration recorded in ``m``."""
    t0 = _perf() if m is not None else 0.0
    try:
        loaded = loader()
    except BaseException:
        if m is not None:
            m.record_load(False, _perf() - t0)
        raise
    if m is not None:
        m.record_load(True, _perf() - t0)
    return loaded
