"""Fail-safe values for ``get_or_load``: stamped stores, stamped reads, the throttle.

With fail-safe on (:class:`~cachechain.LoadConfig`), a loaded value is stored as a
*stamped* entry (:mod:`cachechain.layers._stamps`) in every layer that keeps them: kept
``ttl + fail_safe_max_age`` seconds, fresh for ``ttl``. Ordinary reads never see it
past ``ttl``; :func:`read_below` (and the first layer's stamped read) do, and hand
``get_or_load`` a fresh value, or else the youngest expired copy as a *fail-safe
candidate* with its age past its logical expiry. Layers that do not keep stamps get
the plain value with the plain TTL, as without fail-safe.

:class:`Throttle` remembers, per key and per process, until when the loader is not to
be called again after it failed and a fail-safe value was served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _fork
from ._chain_metrics import Reporter
from ._resilience import unwrapped
from .layers._base import MISSING
from .layers._stamps import Found, Stamped, keeps_stamps, reading
from .metrics._base import CollectorGuard

if TYPE_CHECKING:
    from ._chain import Chain
    from ._fence import Ticket
    from ._load_policy import LoadPolicy
    from ._tier import Tier

__all__ = ["Candidate", "Throttle", "first_copy", "first_reader", "read_below", "store"]

_perf = time.perf_counter

#: ``(value, fresh_left, origin)``: a fresh read of one layer (see ``first_reader``).
FirstRead = Callable[[str], "tuple[Any, float | None, float | None]"]


class Throttle:
    """Keys whose loader must not be called again before a time on ``clock``
    (monotonic seconds). At most ``limit`` keys are remembered: past it, those whose
    time has passed are dropped, then the oldest. Thread-safe."""

    __slots__ = ("__weakref__", "_clock", "_limit", "_lock", "_until")

    def __init__(self, clock: Callable[[], float], limit: int = 10_000) -> None:
        self._clock = clock
        self._limit = limit
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()
        _fork.track(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (the keys held are kept)."""
        self._lock = threading.Lock()

    def hold(self, key: str, seconds: float) -> None:
        """Do not call the loader of ``key`` for ``seconds``."""
        with self._lock:
            self._until.pop(key, None)  # re-inserted last: the dict stays in time order
            self._until[key] = self._clock() + seconds
            if len(self._until) > self._limit:
                self._prune()

    def _prune(self) -> None:
        now = self._clock()
        until = self._until
        for key in [k for k, t in until.items() if t <= now]:
            del until[key]
        while len(until) > self._limit:
            del until[next(iter(until))]

    def holds(self, key: str) -> bool:
        """Whether the loader of ``key`` is not to be called now."""
        until = self._until.get(key)
        if until is None:
            return False
        if until > self._clock():
            return True
        self.release(key)
        return False

    def release(self, key: str) -> None:
        """Forget ``key`` (its loader succeeded)."""
        if self._until:
            with self._lock:
                self._until.pop(key, None)

    def __len__(self) -> int:
        return len(self._until)


class Candidate:
    """What :func:`read_below` found: a fresh ``value`` (or :data:`MISSING`) with its
    seconds left (``fresh_left``, None: no expiry) and ``origin`` TTL, the index of the
    layer that served it, and the youngest expired copy (``stale``, or MISSING) with
    how long ago it expired (``stale_age``, seconds)."""

    __slots__ = ("fresh_left", "index", "origin", "stale", "stale_age", "value")

    def __init__(self, stale: Any, stale_age: float) -> None:
        self.value: Any = MISSING
        self.fresh_left: float | None = None
        self.origin: float | None = None
        self.index = -1
        self.stale = stale
        self.stale_age = stale_age

    def offer(self, value: Any, age: float) -> None:
        """An expired copy ``age`` seconds past its expiry: kept if it is younger."""
        if self.stale is MISSING or age < self.stale_age:
            self.stale, self.stale_age = value, age


def first_reader(chain: Chain) -> FirstRead:
    """The fresh read of ``chain``'s first layer, with the TTL its value was stored with:
    the layer's own ``get_fresh`` when it is not wrapped (a
    :class:`~cachechain.MemoryLayer`), else ``get_with_ttl`` in stamp reading mode.
    Returns ``(value or MISSING, fresh_left, origin)``, MISSING for an expired copy;
    raises what the layer raises."""
    layer = chain._first.layer
    direct = getattr(layer, "get_fresh", None)
    if direct is not None and keeps_stamps(layer):
        return direct  # type: ignore[no-any-return]

    def read(key: str) -> tuple[Any, float | None, float | None]:
        with reading:
            value, ttl = layer.get_with_ttl(key)
        if value.__class__ is not Found:
            return value, ttl, None
        if value.fresh_left <= 0:
            return MISSING, None, None
        return value.value, value.fresh_left, value.origin

    return read


def first_copy(chain: Chain, key: str, found: Candidate) -> None:
    """Offer ``found`` the expired copy of ``key`` the first layer keeps, if any (read
    in stamp reading mode; a failure is no copy: it was counted by the fresh read)."""
    try:
        with reading:
            value = chain._first.layer.get_with_ttl(key)[0]
    except Exception:
        return
    if value.__class__ is Found and value.fresh_left <= 0:
        found.offer(value.value, -value.fresh_left)


def read_below(chain: Chain, key: str, m: CollectorGuard | None, found: Candidate) -> Candidate:
    """Read ``key`` from the layers below the first, as ``Chain.get`` does (a layer whose
    writer holds the key is skipped; failures are misses, counted), but seeing stamped
    entries: the first fresh value is returned in ``found`` and copied into the layers
    above it (through the fence, stamped where they keep stamps); expired copies are
    offered to ``found`` as fail-safe candidates."""
    ticket = chain._fence.ticket(key)
    skip = tuple(at for at, holds in chain._held_by if holds(key))
    report: Reporter = chain._report
    for tier in chain._below:
        if tier.index in skip:
            continue
        t0 = _perf() if m is not None else 0.0
        try:
            with reading:
                value, ttl = tier.get_with_ttl(key)
        except Exception as exc:
            report.failed(tier.name, "get", exc)
            continue
        fresh = value is not MISSING and (value.__class__ is not Found or value.fresh_left > 0)
        if m is not None:
            m.record_get(tier.name, fresh, _perf() - t0)
        if value is MISSING:
            continue
        if not fresh:
            found.offer(value.value, -value.fresh_left)
            continue
        _serve(chain, found, tier.index, key, value, ttl, ticket, skip)
        return found
    return found


def _serve(
    chain: Chain,
    found: Candidate,
    index: int,
    key: str,
    value: Any,
    ttl: float | None,
    ticket: Ticket,
    skip: tuple[int, ...],
) -> None:
    """Put a fresh hit of the layer at ``index`` in ``found`` and backfill it."""
    found.index = index
    if value.__class__ is not Found:
        found.value, found.fresh_left = value, ttl
        if ticket is not None:
            chain._backfill(ticket, index, key, value, ttl, skip)
        return
    found.value, found.fresh_left, found.origin = value.value, value.fresh_left, value.origin
    if ticket is not None:
        chain._fence.if_unchanged(
            ticket, _fill, chain._tiers[:index], skip, key, value.value, value.fresh_left,
            value.origin, ttl,
        )  # fmt: skip


def _fill(
    tiers: tuple[Tier, ...],
    skip: tuple[int, ...],
    key: str,
    value: Any,
    fresh: float,
    origin: float,
    physical: float | None,
) -> None:
    """Copy a stamped entry (``fresh`` seconds left of ``origin``, ``physical`` seconds
    kept) into ``tiers`` but those in ``skip``."""
    for tier in tiers:
        if tier.index in skip:
            continue
        if physical is not None and keeps_stamps(unwrapped(tier.layer)):
            tier.fill(key, Stamped(value, fresh, origin), physical)
        else:
            tier.fill(key, value, fresh)


def store(
    chain: Chain,
    key: str,
    value: Any,
    ttl: float | None,
    policy: LoadPolicy,
    tiers: tuple[Tier, ...] | None = None,
) -> None:
    """Store a loaded ``value`` in every layer (or those of ``tiers``), lowest first
    (call it through the fence), each in the form :func:`stored_form` gives. Nothing
    once the chain's background loads were abandoned (``close``)."""
    if chain._loads.abandoned:  # a background load that outlived close() stores nothing
        return
    for tier in reversed(chain._tiers if tiers is None else tiers):
        tier.fill(key, *stored_form(tier, value, ttl, policy))


def stored_form(
    tier: Tier, value: Any, ttl: float | None, policy: LoadPolicy
) -> tuple[Any, float | None]:
    """``(value, ttl)`` as ``tier`` stores a loaded value: stamped where its layer keeps
    stamps and the TTL is known (``ttl``, or the layer's ``default_ttl``), kept
    ``policy.grace`` seconds past it; plain elsewhere."""
    layer = unwrapped(tier.layer)
    fresh = ttl if ttl is not None else getattr(layer, "default_ttl", None)
    if fresh is None or not keeps_stamps(layer):
        return value, ttl
    return Stamped(value, fresh, fresh), fresh + policy.grace
