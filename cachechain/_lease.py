"""One loader across processes: ``get_or_load``'s lease on the shared layer (issue 12,
item 4).

The chain's single flight runs a loader once per key per process. On a miss in every
layer, :func:`leased_load` also asks the chain's *shared layer* (its lowest remote one:
memcached) for the lease to fill the key
(:class:`~cachechain.layers.SupportsLease`; memcached's ``mg <key> N<ttl>``, see
:mod:`cachechain.layers._memcached_lease`), so that one process in the whole cluster
runs the loader:

- **won**: this process loads and stores the value, and that write ends the lease.
  The shared layer's store is made over the lease (:meth:`Lease.store
  <cachechain.layers.Lease.store>`, memcached's ``cas`` with the lease's token), at
  once and outside the fence's lock: a delete or a write of the key by any process
  during the load ends the lease, and the value, loaded before that change and maybe
  older, is then stored nowhere ("stale sets" in the paper). Only once the shared
  layer took it do the layers above get it (through the fence). A load that raises,
  or a value not stored (the fence saw a mutation of the key's stripe meanwhile: a
  write of the key, of another key of its 64th, or the drop of every in-process
  entry when the coherence journal starts or loses track; the lease was ended by
  another process; the store failed), releases the lease at once: the next process
  wins then, instead of waiting for the lease's TTL.
- **held** by another process: wait for its value, polling the shared layer (each poll
  one lease call: a value that arrived is returned; a lease that ended without one, its
  holder dead past the TTL or its load failed, is won by the first poller, which
  loads). Polls back off from :data:`FIRST_POLL` to :data:`MAX_POLL` seconds, for at
  most ``wait`` seconds in all. The value found is copied into the layers above the
  shared one with its remaining TTL (a backfill through the fence), never written back
  to the shared layer. A wait that ends without a value calls ``fallback`` (a fail-safe
  value, if the caller has one), else this process loads.
- **the value was there** (stored since the caller's read): returned, backfilled.
- **no lease**: the chain has no shared layer that leases, its writer still holds a
  write of the key (the layer's value may be older than this process's), the layer
  failed (counted and logged once, as any layer failure), its last call failed (the
  breaker's :meth:`~cachechain.CircuitBreaker.failing`: most likely the read that just
  missed; a lease call would wait out a second timeout in the same ``get_or_load``) or
  its breaker refuses calls: this process loads at once, with no wait.

Only the process's flight leader asks or waits: the other threads of the process wait
on the single flight, so a cluster of N processes polls N times per interval at most.
A lease that lives ``ttl`` seconds bounds how long a dead holder blocks the others:
memcached's clock ticks once a second, so the lease ends between ``ceil(ttl) - 1`` and
``ceil(ttl)`` seconds after it was won. Defaults: :data:`LEASE_TTL`; the wait defaults
to the lease's TTL (a waiter waits no longer than a lease can be held, then loads).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ._config import LEASE_TTL, LeaseConfig
from ._errors import ChainClosedError
from .layers._base import MISSING, Lease, SupportsLease

if TYPE_CHECKING:
    from ._chain import Chain
    from ._fence import Ticket
    from ._tier import Tier

__all__ = ["FIRST_POLL", "LEASE_TTL", "MAX_POLL", "LeaseConfig", "leased_load"]

#: Seconds before a waiter's first poll of the shared layer; each poll doubles it ...
FIRST_POLL: Final = 0.005
#: ... up to this many seconds between polls (what a value's arrival may wait to be seen).
MAX_POLL: Final = 0.05

#: A lease call that failed (counted and logged): load here.
_FAILED: Final = Lease()

#: Loads a key here and stores it through the fence, over the lease won if one is
#: given (:meth:`Lease.store <cachechain.layers.Lease.store>`): ``(value, stored)``.
LoadAndStore = Callable[["Lease | None"], "tuple[Any, bool]"]


#: The default lease settings, and leases off.
DEFAULT: Final = LeaseConfig()
OFF: Final = LeaseConfig(enabled=False)


class _Load:
    """One ``get_or_load`` miss: the chain and its shared tier, the key, how it loads
    and stores a value here, and the lease's settings."""

    __slots__ = ("chain", "config", "fence", "key", "load", "tier")

    def __init__(self, chain: Chain, key: str, load: LoadAndStore, config: LeaseConfig) -> None:
        self.chain = chain
        self.fence = chain._fence
        self.tier: Tier = chain._shared
        self.key = key
        self.load = load
        self.config = config

    def here(self) -> Any:
        """Load and store here, with no lease."""
        return self.load(None)[0]


def leased_load(
    chain: Chain,
    key: str,
    load_and_store: LoadAndStore,
    *,
    config: LeaseConfig = DEFAULT,
    fallback: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> Any:
    """Load ``key`` once across the processes sharing ``chain``'s shared layer and
    return its value.

    ``load_and_store(lease)`` loads the key here as the chain does (the loader timed,
    its value stored in every layer through the fence under a ticket taken before the
    load; over ``lease`` in the shared layer when it is given and :attr:`stores
    <cachechain.layers.Lease.stores>`) and returns ``(value, stored)``; it is called
    after the lease is won (or without a lease), so a write of the key made while
    this process waited is never overwritten. A value another process loaded is copied
    into the layers above the shared one (under a ticket taken before the poll that
    found it), never stored again. ``fallback`` is called when a wait ends without a
    value: it returns a value to serve (a fail-safe value, not stored) or
    :data:`~cachechain.MISSING` to load here. ``config`` (:class:`LeaseConfig`) sets
    the lease; ``clock`` (monotonic seconds) and ``sleep`` time the wait.

    Raises what ``load_and_store()`` raises (a lease won is released first), and
    :class:`~cachechain.ChainClosedError` when the chain closes meanwhile; never a
    layer failure.
    """
    job = _Load(chain, key, load_and_store, config)
    tier = job.tier
    if not config.enabled or not tier.supports(SupportsLease) or _writing(tier, key):
        return job.here()
    breaker = tier.breaker
    if breaker is not None and breaker.failing():  # the read that missed, most likely:
        m = chain._m  # a lease call would wait out a second timeout in this call
        if m is not None:
            m.record_lease("unavailable")
        return job.here()
    ticket = job.fence.ticket(key)
    lease = _ask(job)
    if lease.held and lease is not _FAILED:
        return _wait(job, fallback, clock, sleep)
    return _settle(job, lease, ticket)


def _settle(job: _Load, lease: Lease, ticket: Ticket) -> Any:
    """What a lease that is not held means: won (load and store, release if the load
    raised or its value was not stored), a value found (backfill it under ``ticket``),
    or none (load here)."""
    m = job.chain._m
    if lease.won:
        if m is not None:
            m.record_lease("won")
        stored = False
        try:
            value, stored = job.load(lease)
        finally:
            if not stored:
                _release(job, lease)
        return value
    if lease is _FAILED:
        if m is not None:
            m.record_lease("unavailable")
        return job.here()
    if m is not None:
        m.record_lease("hit")
    _backfill(job, lease, ticket)
    return lease.value


def _wait(
    job: _Load,
    fallback: Callable[[], Any] | None,
    clock: Callable[[], float],
    sleep: Callable[[float], object],
) -> Any:
    """Poll the shared layer until the lease's holder stored the value, the lease
    ends (then the first poller wins it and loads), the layer fails, or
    ``config.max_wait`` seconds have passed (then ``fallback``, else load here)."""
    m = job.chain._m
    start = clock()
    deadline = start + job.config.max_wait
    delay = FIRST_POLL
    while True:
        left = deadline - clock()
        if left <= 0:
            break
        sleep(min(delay, left))
        delay = min(delay * 2, MAX_POLL)
        ticket = job.fence.ticket(job.key)
        lease = _ask(job)
        if lease is _FAILED or lease.won:  # load here: the layer failed, or took over
            if m is not None:
                m.record_lease_wait(clock() - start)
            return _settle(job, lease, ticket)
        if not lease.held:  # the holder's value arrived
            if m is not None:
                m.record_lease_wait(clock() - start)
                m.record_lease("waited")
            _backfill(job, lease, ticket)
            return lease.value
    if m is not None:
        m.record_lease_wait(clock() - start)
        m.record_lease("timed_out")
    if fallback is not None:
        value = fallback()
        if value is not MISSING:
            return value
    return job.here()


def _ask(job: _Load) -> Lease:
    """The shared layer's lease of the key (through its breaker and namespace);
    :data:`_FAILED` when it failed or refused (counted and logged as a layer failure),
    or could lease nothing."""
    tier = job.tier
    try:
        lease: Lease | None = tier.layer.lease(job.key, job.config.ttl)  # type: ignore[attr-defined]
    except ChainClosedError:
        raise
    except Exception as exc:
        job.chain._report.failed(tier.name, "lease", exc)
        return _FAILED
    return _FAILED if lease is None else lease


def _release(job: _Load, lease: Lease) -> None:
    """Release a won lease, best effort: not while the layer's breaker refuses calls
    (the lease then ends at its TTL); a failure is counted and logged."""
    tier = job.tier
    breaker = tier.breaker
    if breaker is not None and breaker.refusing():
        return
    try:
        lease.release()
    except Exception as exc:
        job.chain._report.failed(tier.name, "lease", exc)


def _backfill(job: _Load, lease: Lease, ticket: Ticket) -> None:
    """Copy the value ``lease`` found into the layers above the shared one, with its
    remaining TTL, unless the key's stripe was mutated since ``ticket`` (taken before
    the lease call that found it, as a read's backfill)."""
    if ticket is None:
        return
    chain, key = job.chain, job.key
    skip = tuple(at for at, holds in chain._held_by if holds(key))
    chain._backfill(ticket, job.tier.index, key, lease.value, lease.ttl, skip)


def _writing(tier: Tier, key: str) -> bool:
    """Whether the shared layer's writer still holds a write of ``key`` (its value
    there may be older than this process's: it is neither leased nor read)."""
    writer = tier.writer
    return writer is not None and writer.holds(key)
