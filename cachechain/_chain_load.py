"""``Chain.get_or_load``: read through the chain, or load once per process and cache.

The loader runs inside the chain's single flight (one call per key in this process,
however many threads miss it together). Its result is cached in every layer only if
no mutation of the key's stripe began since the load started (the mutation fence's
ticket, taken before the loader runs), so a ``set`` or ``delete`` made while the
loader ran is never overwritten by the value it loaded.

With a :class:`~cachechain._load_policy.LoadPolicy` (the chain's
:class:`~cachechain.LoadConfig` or the call's options) three features join in:

- **fail-safe** (:mod:`cachechain._failsafe`): values are stored stamped, kept
  ``fail_safe_max_age`` past their TTL; when the loader raises or times out, the
  youngest expired copy (if any, and not older than that) is served instead, and the
  loader of that key is not called again for ``fail_safe_throttle`` seconds;
- **loader timeouts**: a load that a caller may stop waiting for runs on a background
  thread (:class:`~cachechain._loads.Loads`); each caller, leader or not, waits
  ``soft_timeout`` (when it has a fail-safe value) or ``hard_timeout`` at most, counted
  from the start of the load; the load goes on and its value is stored when it
  arrives (through the fence);
- **eager refresh** (:mod:`cachechain._refresh`): a hit past the refresh point starts
  one background reload.

And across processes, the **lease** (:mod:`cachechain._lease`, on by default): a load
after a miss in every layer (not an eager refresh, whose value is still served) first
takes the shared layer's lease, so that one process of all those sharing memcached
runs the loader; the others wait for its value, then serve their fail-safe value (if
any) or load themselves.

Every loader call goes through :func:`invoke_loader`, the one place a loader runs.
:class:`LoaderOps` (a base class of :class:`~cachechain.Chain`) holds the public
methods, ``get_or_load`` and ``cached``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from . import _chain_cached, _failsafe, _lease, _refresh
from ._config import LeaseConfig
from ._errors import ChainClosedError, InvalidValueError, Uncacheable
from ._failsafe import Candidate
from ._load_policy import DEFAULT, Default, LoadPolicy
from ._loads import LoadJob
from ._singleflight import LoadTimeoutError, ReentrantLoadError
from ._validate import check_key, check_ttl
from .layers._base import MISSING, Lease
from .metrics._base import CollectorGuard

if TYPE_CHECKING:
    from ._chain import Chain
    from ._tier import Tier

log = logging.getLogger("cachechain")

__all__ = [
    "LoaderOps",
    "Uncacheable",
    "get_or_load",
    "invoke_loader",
    "load_and_store",
    "load_leased",
]

P = ParamSpec("P")
R = TypeVar("R")

_perf = time.perf_counter

#: Errors that are never the loader's failure: no fail-safe value replaces them.
_NOT_FAILURES = (ReentrantLoadError, ChainClosedError, Uncacheable)


class LoaderOps:
    """``get_or_load`` and ``cached`` of :class:`~cachechain.Chain` (a base class of it)."""

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], Any],
        ttl: float | None = None,
        *,
        wait_timeout: float | None = None,
        fail_safe: bool | Default = DEFAULT,
        soft_timeout: float | Default | None = DEFAULT,
        hard_timeout: float | Default | None = DEFAULT,
        eager_refresh: float | Default | None = DEFAULT,
        lease: bool | Default = DEFAULT,
    ) -> Any:
        """Return the cached value of ``key``, or call ``loader()`` once, cache its
        result for ``ttl`` seconds (``None``: each layer's default) and return it.

        However many threads miss the same key at once, the loader runs once in this
        process and every one of them gets its result or its exception (nothing is
        cached then). However many processes miss it, the loader runs once among all
        those that share the chain's memcached layer, with ``lease`` on (the chain's
        ``LoadConfig.lease``, on by default): the others wait for its value, at most
        ``lease.wait`` seconds, then serve a fail-safe value or load themselves. A
        ``None`` result is cached like any other value. A thread that joined another's
        load waits at most ``wait_timeout`` seconds, then raises
        :class:`~cachechain.LoadTimeoutError`; a wait for another process's load is
        bounded by ``LeaseConfig.wait`` instead (cutting it short would run the loader
        a second time, and make the call slower). If the key is set or deleted while the
        loader runs, the loaded value is returned but not cached.

        The other options default to the chain's :class:`~cachechain.LoadConfig`
        (its ``load``; all off unless set there, but ``lease``); ``None`` turns one off
        for this call.

        - ``fail_safe`` (bool): when the loader raises or times out, serve the key's
          previous value if it expired at most ``fail_safe_max_age`` seconds ago (and
          do not call the loader of the key again for ``fail_safe_throttle`` seconds).
          Values loaded with it on are kept that much longer in the layers, for that
          purpose only: no other read sees them past ``ttl``.
        - ``soft_timeout`` (seconds): with such a value, wait no longer for the
          loader: serve it, and let the load finish in the background (its value is
          stored when it arrives, unless the key was set or deleted meanwhile).
        - ``hard_timeout`` (seconds): never wait longer: then the fail-safe value, or
          :class:`~cachechain.LoadTimeoutError`. Timeouts count from the start of the
          load, for every thread waiting for it.
        - ``eager_refresh`` (in ``(0, 1)``): a hit on a value past that share of its
          TTL returns it and starts one background reload of the key.
        - ``lease`` (bool): take the shared layer's lease before loading (True: the
          chain's ``LoadConfig.lease``, turned on with its ``ttl`` and ``wait`` if the
          chain's is off).

        Raises :class:`~cachechain.InvalidValueError` naming the option for a bad
        value (before anything is read), :class:`~cachechain.InvalidKeyError` for a
        non-``str`` key, :class:`~cachechain.ChainClosedError` after ``close``, and
        :class:`~cachechain.ReentrantLoadError` for a loader that asks for its own key.
        """
        ttl = check_ttl(ttl, error=InvalidValueError)
        options = (fail_safe, soft_timeout, hard_timeout, eager_refresh, lease)
        return get_or_load(cast("Chain", self), key, loader, ttl, wait_timeout, *options)

    def cached(
        self,
        ttl: float | None = None,
        *,
        key: Callable[..., str] | None = None,
        prefix: str | None = None,
        fail_safe: bool | Default = DEFAULT,
        soft_timeout: float | Default | None = DEFAULT,
        hard_timeout: float | Default | None = DEFAULT,
        eager_refresh: float | Default | None = DEFAULT,
        lease: bool | Default = DEFAULT,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a function so its results are cached through :meth:`get_or_load`.

        The cache key is ``key(*args, **kwargs)`` when given, else the function's
        ``prefix`` (default: its module and qualified name) followed by the ``repr`` of
        its arguments. The wrapper gains ``invalidate(*args, **kwargs)``, which deletes
        the entry of those arguments. ``fail_safe``, ``soft_timeout``,
        ``hard_timeout``, ``eager_refresh`` and ``lease`` are :meth:`get_or_load`'s,
        given to every call; a bad one raises :class:`~cachechain.InvalidValueError`
        here.
        """
        ttl = check_ttl(ttl, error=InvalidValueError)
        options = (fail_safe, soft_timeout, hard_timeout, eager_refresh, lease)
        chain = cast("Chain", self)
        chain._loads.policies.resolve(*options[:4])  # raises for a bad option, here
        chain._loads.lease_for(lease)
        return _chain_cached.cached(chain, ttl, key, prefix, options)


def get_or_load(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None,
    wait_timeout: float | None,
    fail_safe: bool | Default = DEFAULT,
    soft_timeout: float | Default | None = DEFAULT,
    hard_timeout: float | Default | None = DEFAULT,
    eager_refresh: float | Default | None = DEFAULT,
    lease: bool | Default = DEFAULT,
) -> Any:
    """What :meth:`Chain.get_or_load <cachechain.Chain.get_or_load>` does; see there."""
    loads = chain._loads
    leasing = loads.lease if lease is DEFAULT else loads.lease_for(lease)
    policies = loads.policies
    if soft_timeout is DEFAULT and hard_timeout is DEFAULT and eager_refresh is DEFAULT:
        if fail_safe is DEFAULT:
            policy = policies.default
        elif fail_safe is True:  # the common override, without a lookup
            policy = policies.fail_safe_on
        else:
            policy = policies.resolve(fail_safe, soft_timeout, hard_timeout, eager_refresh)
    else:
        policy = policies.resolve(fail_safe, soft_timeout, hard_timeout, eager_refresh)
    if policy is not None:
        if policy.stamps:
            read = loads.read
            if read is not None and chain._m is None:  # a fresh hit, the short way
                value = _fresh_hit(read, key, ttl, policy)
                if value is not MISSING:
                    return value
            return _with_stamps(chain, key, loader, ttl, wait_timeout, policy, leasing)
        return _timed_only(chain, key, loader, ttl, wait_timeout, policy, leasing)
    value = chain.get(key, MISSING)
    if value is not MISSING:
        return value

    def load() -> Any:
        return load_leased(chain, key, loader, ttl, None, lease=leasing)[0]

    value, shared = chain._flight.do(key, load, wait_timeout)
    if shared and chain._m is not None:
        chain._m.record_singleflight_shared()
    return value


def invoke_loader(chain: Chain, key: str, loader: Callable[[], Any]) -> Any:
    """Call ``loader()`` for ``key`` (the one place a loader runs), its outcome and
    duration recorded; return its value or raise what it raises."""
    return _timed_load(chain._m, loader)


def load_and_store(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None,
    policy: LoadPolicy | None,
    *,
    recheck: bool = True,
    lease: Lease | None = None,
) -> tuple[Any, bool]:
    """Load ``key`` and store the value in every layer unless the fence saw a mutation
    of it since the load began; return ``(value, stored)``. ``recheck``: first look in
    the first layer again (a load that just ended may have filled it; not for an eager
    refresh, whose point is to replace that value). ``lease``: the shared layer's
    lease this process won for the key; when it :attr:`stores
    <cachechain.layers.Lease.stores>`, see :func:`_store_over`."""
    fence = chain._fence
    ticket = fence.ticket(key)
    if recheck:
        try:
            again = chain._l1_get(key)  # a load that just finished may have filled it
        except Exception:
            again = MISSING
        if again is not MISSING:
            return again, False
    loaded = invoke_loader(chain, key, loader)
    if ticket is None:
        return loaded, False
    if lease is not None and lease.stores:
        return loaded, _store_over(chain, key, loaded, ttl, policy, ticket, lease)
    return loaded, _fenced_store(chain, ticket, key, loaded, ttl, policy)


def load_leased(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None,
    policy: LoadPolicy | None,
    *,
    recheck: bool = True,
    lease: LeaseConfig,
    fallback: Any = MISSING,
) -> tuple[Any, bool]:
    """:func:`load_and_store` under the shared layer's lease (``lease``; none when it
    is off): this process loads if it wins the lease (or none can be had), else it
    waits for the winner's value (then ``stored`` is False: another process stored
    it) and, when the wait ends without one, serves ``fallback`` (a fail-safe value,
    counted as served for ``lease_wait``) or loads here. Returns ``(value, stored)``."""
    if not lease.enabled:
        return load_and_store(chain, key, loader, ttl, policy, recheck=recheck)
    outcome: list[Any] = [MISSING, False]

    def here(won: Lease | None) -> tuple[Any, bool]:
        outcome[0], outcome[1] = load_and_store(
            chain, key, loader, ttl, policy, recheck=recheck, lease=won
        )
        return outcome[0], outcome[1]

    serve = None
    if fallback is not MISSING:

        def serve() -> Any:
            chain._loads.served("lease_wait", key)
            return fallback

    value = _lease.leased_load(chain, key, here, config=lease, fallback=serve)
    return value, bool(outcome[1])


def _store(
    chain: Chain, key: str, value: Any, ttl: float | None, tiers: tuple[Tier, ...] | None = None
) -> None:
    """Store a loaded ``value`` in every layer (or those of ``tiers``), lowest first
    (call it through the fence); nothing once background loads were abandoned."""
    if chain._loads.abandoned:  # a background load that outlived close() stores nothing
        return
    for tier in reversed(chain._tiers if tiers is None else tiers):  # the first: a set
        tier.fill(key, value, ttl)


def _store_over(
    chain: Chain,
    key: str,
    value: Any,
    ttl: float | None,
    policy: LoadPolicy | None,
    ticket: int,
    lease: Lease,
) -> bool:
    """Store a value loaded under ``lease`` (won on the shared layer): first in the
    shared layer over the lease, at once and outside the fence's lock (a round trip
    must not hold up this process's writes), then, if it took the value, in the other
    layers through the fence under ``ticket``. Return whether the shared layer took
    it. Nothing is stored when the fence saw a mutation of the key's stripe since
    ``ticket``, when a write or a delete of the key by any process ended the lease
    (the value may be older than that change), or when the store failed (counted and
    logged: whether it landed is not known); the caller then releases the lease. A
    value the shared layer refuses (its codec cannot encode it) is kept by the other
    layers, as a ``set`` of it would be; so is a value whose store the shared layer's
    breaker refuses (its fill skipped and counted, as without the lease)."""
    shared = chain._shared
    if chain._loads.abandoned or chain._fence.ticket(key) != ticket:
        return False
    breaker = shared.breaker
    if breaker is not None and breaker.refusing():  # as without the lease: the shared
        return _fenced_store(chain, ticket, key, value, ttl, policy)  # layer's fill skipped
    form = (value, ttl)
    if policy is not None and policy.stamps:
        form = _failsafe.stored_form(shared, value, ttl, policy)
    taken = _stored_over(chain, shared, key, lease, form)
    if taken is False:
        return False
    others = tuple(tier for tier in chain._tiers if tier is not shared)
    _fenced_store(chain, ticket, key, value, ttl, policy, others)
    return taken is True


def _fenced_store(
    chain: Chain,
    ticket: int,
    key: str,
    value: Any,
    ttl: float | None,
    policy: LoadPolicy | None,
    tiers: tuple[Tier, ...] | None = None,
) -> bool:
    """Store a loaded ``value`` in every layer (or those of ``tiers``) through the
    fence, unless it saw a mutation of the key's stripe since ``ticket``: plain, or
    stamped for fail-safe when ``policy`` keeps stamps. Return whether it stored."""
    if policy is None or not policy.stamps:
        return chain._fence.if_unchanged(ticket, _store, chain, key, value, ttl, tiers)
    return chain._fence.if_unchanged(ticket, _failsafe.store, chain, key, value, ttl, policy, tiers)


def _stored_over(
    chain: Chain, shared: Tier, key: str, lease: Lease, form: tuple[Any, float | None]
) -> bool | None:
    """``lease.store(*form)``, timed and recorded as a set of the shared layer: whether
    the layer took the value (False too when the store failed: counted and logged),
    or None for a value its codec refuses (the value's fault, not the layer's)."""
    m = chain._m
    t0 = _perf() if m is not None else 0.0
    try:
        taken = lease.store(*form)
    except Exception as exc:
        if m is not None:
            m.record_set(shared.name, False, _perf() - t0)
        chain._report.failed(shared.name, "set", exc)
        return None if isinstance(exc, InvalidValueError) else False
    if m is not None:  # a set answered, whether the lease still held or not
        m.record_set(shared.name, True, _perf() - t0)
    if not taken:
        log.debug("get_or_load of %r: the key changed during the load; not stored", key)
    return taken


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


# -- with a policy --------------------------------------------------------------------


def _timed_only(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None,
    wait_timeout: float | None,
    policy: LoadPolicy,
    lease: LeaseConfig,
) -> Any:
    """``get_or_load`` with loader timeouts alone: an ordinary read, then a load."""
    value = chain.get(key, MISSING)
    if value is not MISSING:
        return value
    return _load(chain, key, loader, ttl, wait_timeout, policy, lease, MISSING)


def _fresh_hit(read: Any, key: str, ttl: float | None, policy: LoadPolicy) -> Any:
    """The first layer's fresh value of ``key`` that needs no refresh, or MISSING for
    anything else (a miss, a refresh due, a failed read: :func:`_with_stamps` reads
    again and handles it). For a chain without metrics: nothing is recorded."""
    try:
        value, fresh_left, origin = read(key)
    except Exception:
        return MISSING
    share = policy.refresh_at
    if share is None or fresh_left is None or fresh_left > (origin or ttl or 0.0) * share:
        return value
    return MISSING


def _with_stamps(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None,
    wait_timeout: float | None,
    policy: LoadPolicy,
    lease: LeaseConfig,
) -> Any:
    """``get_or_load`` with fail-safe or eager refresh: the first layer's stamped read
    (a fresh hit returns here, starting a refresh past its point), then the layers
    below and a load (:func:`_miss`)."""
    read = chain._loads.read or chain._loads.bind(chain)  # after close(): raises
    m = chain._m
    start = _perf() if m is not None else 0.0
    try:
        value, fresh_left, origin = read(key)
    except ChainClosedError:
        raise
    except Exception as exc:
        check_key(key)  # an unhashable key is the caller's error, not the layer's
        chain._report.failed(chain._l1_name, "get", exc)
        value, fresh_left, origin = MISSING, None, None
    if value is not MISSING:
        if m is not None:
            m.record_first_layer_hit(chain._l1_name, _perf() - start)
        share = policy.refresh_at
        # Past the refresh point of its TTL (the entry's, else the call's): reload it.
        if (
            share is not None
            and fresh_left is not None
            and fresh_left <= (origin or ttl or 0.0) * share
        ):
            _refresh.refresh(chain, key, loader, ttl, policy, load_and_store)
        return value
    if type(key) is not str:  # a key that cannot be in the first layer: checked here
        check_key(key)
    found = _read_below(chain, key, policy, m, start)
    return _miss(chain, key, loader, ttl, wait_timeout, policy, lease, found)


def _miss(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None,
    wait_timeout: float | None,
    policy: LoadPolicy,
    lease: LeaseConfig,
    found: Candidate,
) -> Any:
    """After a first-layer miss: a fresh value found below, or a load with the
    fail-safe value found, if any (served at once while the key's loader is
    throttled)."""
    if found.value is not MISSING:
        if policy.refresh_at is not None and _refresh.due(
            policy, found.fresh_left, found.origin, ttl
        ):
            _refresh.refresh(chain, key, loader, ttl, policy, load_and_store)
        return found.value
    fallback = MISSING
    if policy.fail_safe and found.stale is not MISSING and found.stale_age <= policy.max_age:
        fallback = found.stale
        if chain._loads.throttle.holds(key):
            chain._loads.served("throttled", key)
            return fallback
    return _load(chain, key, loader, ttl, wait_timeout, policy, lease, fallback)


def _read_below(
    chain: Chain, key: str, policy: LoadPolicy, m: CollectorGuard | None, start: float
) -> Candidate:
    """After a first-layer miss: the first layer's expired copy (with fail-safe on) and
    the layers below, as a :class:`Candidate`, metrics recorded as ``Chain.get``
    records them."""
    found = Candidate(MISSING, 0.0)
    if policy.fail_safe:
        _failsafe.first_copy(chain, key, found)
    if m is not None:
        m.record_get(chain._l1_name, False, _perf() - start)
    _failsafe.read_below(chain, key, m, found)
    if m is not None:
        m.record_chain_get(found.index >= 0, found.index, _perf() - start)
    return found


def _load(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None,
    wait_timeout: float | None,
    policy: LoadPolicy,
    lease: LeaseConfig,
    fallback: Any,
) -> Any:
    """Load ``key`` in the single flight, under ``lease``; ``fallback`` (or MISSING) is
    the fail-safe value to serve if the loader fails or takes too long, or another
    process's load does not arrive in time."""
    if policy.timed(fallback is not MISSING):
        return _timed(chain, key, loader, ttl, wait_timeout, policy, lease, fallback)
    load = functools.partial(load_leased, lease=lease, fallback=fallback)
    job = LoadJob(load, chain, key, loader, ttl, policy)
    try:
        value, shared = chain._flight.do(key, job.run, wait_timeout)
    except _NOT_FAILURES:
        raise
    except Exception as exc:  # LoadTimeoutError: a wait_timeout, or the loader's own
        return _instead(chain, key, fallback, exc)
    if shared and chain._m is not None:
        chain._m.record_singleflight_shared()
    return value


def _timed(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None,
    wait_timeout: float | None,
    policy: LoadPolicy,
    lease: LeaseConfig,
    fallback: Any,
) -> Any:
    """Load ``key`` on a background thread (or join the load in flight) and wait for it
    as the policy says; on a timeout, serve ``fallback`` or raise LoadTimeoutError. The
    load takes ``lease`` (a wait for another process counts against the budget; when
    it ends without a value, the background load runs here)."""
    flight = chain._flight
    loads = chain._loads
    call, leader = flight.join(key)
    if leader:
        load = functools.partial(load_leased, lease=lease)
        loads.start(chain, call, LoadJob(load, chain, key, loader, ttl, policy))
    elif chain._m is not None:
        chain._m.record_singleflight_shared()
    elapsed = loads.clock() - call.started
    budget, reason = _budget(policy, fallback is not MISSING, leader, wait_timeout, elapsed)
    assert call.done is not None  # join() gives every call its event
    if call.done.wait(budget):
        try:
            return flight.outcome(call)
        except _NOT_FAILURES:
            raise
        except Exception as exc:  # LoadTimeoutError: no room to run it, or the loader's own
            return _instead(chain, key, fallback, exc)
    if fallback is not MISSING:
        loads.served(reason if reason == "soft_timeout" else "hard_timeout", key)
        return fallback
    raise LoadTimeoutError(
        f"gave up after {budget} s waiting for the load of {key!r} ({reason}); the load "
        "goes on in the background and its value is stored when it arrives"
    )


def _instead(chain: Chain, key: str, fallback: Any, exc: Exception) -> Any:
    """What a load of ``key`` that failed with ``exc`` gives its caller: ``fallback``,
    counted as served for a ``hard_timeout`` (a LoadTimeoutError) or a
    ``loader_error``; ``exc`` raised again when there is no fallback (MISSING)."""
    if fallback is MISSING:
        raise exc
    reason = "hard_timeout" if isinstance(exc, LoadTimeoutError) else "loader_error"
    chain._loads.served(reason, key, exc)
    return fallback


def _budget(
    policy: LoadPolicy,
    has_fallback: bool,
    leader: bool,
    wait_timeout: float | None,
    elapsed: float,
) -> tuple[float | None, str]:
    """How long a caller waits for a load that began ``elapsed`` seconds ago (None: as
    long as it takes), and which limit that is: ``soft_timeout`` (only with a
    fail-safe value), ``hard_timeout``, or a joining caller's own ``wait_timeout``."""
    budget: float | None = None
    reason = "hard_timeout"
    if policy.hard_timeout is not None:
        budget = policy.hard_timeout - elapsed
    if has_fallback and policy.soft_timeout is not None:
        soft = policy.soft_timeout - elapsed
        if budget is None or soft < budget:
            budget, reason = soft, "soft_timeout"
    if not leader and wait_timeout is not None and (budget is None or wait_timeout < budget):
        budget, reason = wait_timeout, "wait_timeout"
    return (None if budget is None else max(0.0, budget)), reason
