"""``Chain.close()``: one deadline for the last publications, the writers and the layers.

The first call marks the chain closed (every later read or write raises
:class:`~cachechain.ChainClosedError`), then, within ``timeout`` seconds in all: the
background loads end (their values are stored; those still running at the deadline
are abandoned, and store nothing), the async writers drain (what they cannot write in
time is counted as dropped), the backplane publishes what is pending (the writes that
just landed included: a key is published only once its write reached the shared
layer) and stops, the layers close, and a collector the chain's config made is closed
last (the writers' last events are in). A concurrent call waits for that same drain,
at most its own ``timeout``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import _tier
from ._errors import ChainClosedError, InvalidValueError
from ._loads import closed_stamped_read
from ._validate import check_seconds
from .metrics._base import CollectorGuard

if TYPE_CHECKING:
    from ._chain import Chain

__all__ = ["close", "closed_get"]


def closed_get(key: str) -> Any:
    """A closed chain's first-layer read: raises :class:`ChainClosedError`."""
    raise ChainClosedError("the chain is closed")


def close(chain: Chain, timeout: float) -> int:
    """What :meth:`Chain.close <cachechain.Chain.close>` does; see there."""
    timeout = check_seconds(timeout, "timeout", zero_ok=True, error=InvalidValueError)
    deadline = time.monotonic() + timeout
    with chain._close_lock:
        first = not chain._closed
        chain._closed = True
        chain._l1_get = closed_get
        chain._loads.read = closed_stamped_read
        if chain._figures is not None:
            chain._figures.stopped = True
    if not first:
        chain._drained.wait(timeout)
        return 0
    try:
        chain._loads.close(_left(deadline))  # background loads' values reach the writers
        lost = _tier.close_writers(chain._tiers, _left(deadline))
        if chain._coherence is not None:  # the keys whose writes landed, the last ones too
            chain._coherence.close(_left(deadline))
        _tier.close_layers(chain._tiers)
        if chain._owned_collector is not None:  # after the writers: their events are in
            _close_collector(chain._owned_collector, chain._m)
    finally:
        chain._drained.set()
    return lost


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _close_collector(collector: Any, m: CollectorGuard | None) -> None:
    """Close a collector the chain made; a failure is counted as the collector's."""
    close = getattr(collector, "close", None)
    if close is not None:
        try:
            close()
        except Exception as exc:
            if m is not None:
                m.failed(exc)
