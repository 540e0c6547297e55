"""The chain's atomic operations: ``add``, ``incr``, ``decr`` and ``touch``.

Each runs once, on the chain's *shared layer*: its lowest layer that is not ``local``
(the last layer when every layer is local), whose own ``add``/``incr``/``decr``/``touch``
(:class:`~cachechain.layers.SupportsAdd`, :class:`~cachechain.layers.SupportsCounters`,
:class:`~cachechain.layers.SupportsTouch`) make it atomic for every process that
shares that layer. The other layers only keep what the shared layer confirmed.

The operation is a mutation of its key in the chain's
:class:`~cachechain._fence.MutationFence`, like ``set`` and ``delete``: no read that
began before it can backfill an older value after it. Inside the mutation:

1. the shared layer's writer writes what it still holds of the key (a queued set or
   delete, a write in flight, a repair; :meth:`Tier.drain <cachechain._tier.Tier.drain>`),
   so no older write can land after the operation; if some remain, the operation is
   not made (the layer is slow or down);
2. the operation runs on the shared layer, behind its circuit breaker;
3. the other layers are updated, bottom up, the first layer last under the fence's
   lock: after an ``add`` that stored its value, the layers above get the value; after
   anything else the key is deleted there (a ``touch`` that found the key re-times it
   in the first layer instead, when that layer can ``touch``). Layers below the shared
   one lose the key.

A shared layer that fails (an error, a timeout, its breaker open) makes nothing up:
``add`` returns False, ``incr``/``decr`` None, ``touch`` False, and the failure is
counted and logged once like any layer failure. The other layers then only drop their
copy of the key (:meth:`Tier.forget <cachechain._tier.Tier.forget>`), best effort:
the operation wrote nothing there, so no layer is owed a repair for it, and nothing
else in them changes. (An operation retried in a loop while the shared layer is down,
as Django's session ``create()`` retries ``add`` 10,000 times, costs no memory.) A
call that failed other than by its breaker's refusal may still have been made (a
reply lost to a timeout), so the key is published to the other processes as after a
change; a remote layer above the shared one that could not drop its copy may then
serve it until it expires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from ._errors import (
    ChainClosedError,
    CircuitOpenError,
    ConfigError,
    InvalidValueError,
    LayerUnavailableError,
)
from ._resilience import unwrapped
from ._tier import Tier
from ._validate import check_key, check_ttl
from .layers._base import SupportsAdd, SupportsCounters, SupportsTouch
from .layers._counters import check_delta

if TYPE_CHECKING:
    from ._chain import Chain

__all__ = ["AtomicOps", "shared_tier"]

_MOD: Final = 1 << 64
#: What _on_shared returns when the operation was not made: the shared layer owed an
#: earlier write of the key, or its breaker refused the call.
_UNASKED: Final[Any] = object()
#: What _on_shared returns when the call failed: it may still have been made (a reply
#: lost to a timeout), so other processes must drop their copies of the key.
_MAYBE: Final[Any] = object()

#: What the other tiers do once the shared layer answered: ``update(tier)``.
Update = Callable[[Tier], object]


def shared_tier(tiers: Sequence[Tier]) -> Tier:
    """The tier whose layer a chain's atomic operations run on: the lowest layer that
    is not ``local``, or the last one when every layer is local."""
    for tier in reversed(tiers):
        if not tier.layer.local:
            return tier
    return tiers[-1]


class AtomicOps:
    """The atomic operations of :class:`~cachechain.Chain` (a base class of it)."""

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``: each layer's
        default) only if the chain's shared layer does not hold ``key``: atomic across
        every process sharing that layer (on memcached: its ``add``), so it can serve
        as a lock (``add("lock:job", owner, ttl=30)``: exactly one caller wins).

        Returns True when the shared layer stored the value; the layers above then get
        it too. Returns False when the key was there, and also when the shared layer
        could not be asked (down, timed out, its breaker open; counted and logged
        once) or refused the value: no lock is granted and nothing is stored in this
        process, whose copies of ``key`` are removed. Raises
        :class:`~cachechain.InvalidKeyError` for a non-``str`` key,
        :class:`~cachechain.InvalidValueError` for an invalid ``ttl`` (before
        anything changes), :class:`~cachechain.ConfigError` when the shared layer
        has no ``add``, :class:`~cachechain.ChainClosedError` after ``close``.
        """
        chain = _checked(self, key, SupportsAdd, "add")
        ttl = check_ttl(ttl, error=InvalidValueError)

        def update(ok: bool) -> Update:
            below = chain._shared.index
            if ok:
                return lambda t: t.set(key, value, ttl) if t.index < below else t.delete(key)
            return lambda t: t.delete(key)

        return cast(
            bool, _run(chain, "add", key, lambda layer: layer.add(key, value, ttl), False, update)
        )

    def incr(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` (an ``int``, ``0 <= delta < 2**64``) to the counter ``key`` on
        the chain's shared layer, atomically across every process sharing it (on
        memcached: its ``incr``), and return the new value. Counters are signed 64-bit
        integers with memcached's arithmetic: ``incr`` wraps modulo 2**64 (past
        ``2**63 - 1`` to ``-2**63``). A stored ``int`` or decimal ``str`` becomes a
        counter on its first ``incr``; the counter keeps its TTL.

        Returns None when the key is absent (nothing is created), and when the shared
        layer could not be asked (down, timed out, its breaker open; counted and logged
        once): never a count it did not make. After a timeout the increment may still
        have been made. Either way the key is removed from the other layers of this
        chain, so the next ``get`` reads the shared count. Raises
        :class:`~cachechain.InvalidValueError` for a bad ``delta`` (before anything
        changes) or a stored value that cannot be a counter (a float, a ``bool``, a
        non-numeric ``str``...; nothing changes), :class:`~cachechain.InvalidKeyError`,
        :class:`~cachechain.ConfigError` and :class:`~cachechain.ChainClosedError` as
        :meth:`add` does.
        """
        chain = _checked(self, key, SupportsCounters, "incr")
        delta = check_delta(delta)
        return _count(chain, "incr", key, lambda layer: layer.incr(key, delta))

    def decr(self, key: str, delta: int = 1, *, floor: bool = True) -> int | None:
        """Subtract ``delta`` (``0 <= delta < 2**64``) from the counter ``key`` on the
        chain's shared layer, atomically, and return the new value; as :meth:`incr`
        otherwise (None when absent or unreachable, the same errors).

        With ``floor`` (the default) a counter that is not negative stops at 0, as
        memcached's ``decr`` does. ``floor=False`` lets it go below 0 (plain signed
        arithmetic, what Django's and Flask's backends need): made as an ``incr`` of
        ``2**64 - delta``, which memcached wraps to the difference, still atomic and in
        one command.
        """
        chain = _checked(self, key, SupportsCounters, "decr")
        delta = check_delta(delta)
        if not isinstance(floor, bool):
            raise InvalidValueError(f"floor must be a bool, got {floor!r}")
        if floor:
            return _count(chain, "decr", key, lambda layer: layer.decr(key, delta))
        return _count(chain, "decr", key, lambda layer: layer.incr(key, (-delta) % _MOD))

    def touch(self, key: str, ttl: float | None = None) -> bool:
        """Make ``key`` expire ``ttl`` seconds from now (``None``: each layer's default)
        on the chain's shared layer, without rewriting its value, and return whether
        the shared layer held it. The first layer's copy, if any, is re-timed the same
        way (capped by its ``max_ttl``); other layers drop theirs.

        Returns False when the key is absent, and when the shared layer could not be
        asked (counted and logged once); this process's copies are then removed.
        Raises as :meth:`add` does.
        """
        chain = _checked(self, key, SupportsTouch, "touch")
        ttl = check_ttl(ttl, error=InvalidValueError)

        def update(found: bool) -> Update:
            if found:
                return lambda t: _retime(chain, t, key, ttl) if t.index == 0 else t.delete(key)
            return lambda t: t.delete(key)

        return cast(
            bool, _run(chain, "touch", key, lambda layer: layer.touch(key, ttl), False, update)
        )

    def _publish_invalidation(self, keys: Sequence[str]) -> None:
        """Hook for cross-process invalidation (issue 10, point 3): called once the
        shared layer confirmed a change of ``keys`` by an atomic operation (an ``add``
        that stored, an ``incr``/``decr`` that counted, a ``touch`` that found the
        key), after this process's own layers were updated and outside the fence.
        Other processes' in-process copies of ``keys`` are stale from then on. A no-op
        for now; it must never raise nor block for long."""


def _checked(chain: object, key: str, capability: type, operation: str) -> Chain:
    """The chain, once ``key`` is checked, the chain is open and its shared layer (as
    wrapped by the chain) has ``capability``. Raises before anything changes."""
    check_key(key)
    owner = cast("Chain", chain)
    if owner._closed:
        raise ChainClosedError("the chain is closed")
    if not owner._shared.supports(capability):
        layer = unwrapped(owner._shared.layer)
        raise ConfigError(
            f"Chain.{operation}: the shared layer {layer.name!r} does not support "
            f"{operation} (cachechain.layers.{capability.__name__})"
        )
    return owner


def _count(chain: Chain, operation: str, key: str, call: Callable[[Any], Any]) -> int | None:
    """An ``incr``/``decr``: every other layer loses the key, whatever the outcome."""
    return cast("int | None", _run(chain, operation, key, call, None, lambda _: _drop(key)))


def _drop(key: str) -> Update:
    return lambda t: t.delete(key)


def _forget(key: str) -> Update:
    return lambda t: t.forget(key)


def _retime(chain: Chain, tier: Tier, key: str, ttl: float | None) -> None:
    """Give the first layer's copy of ``key`` the new TTL (``touch``), or drop it when
    that layer cannot touch; a failure is counted and the copy dropped."""
    layer = tier.layer
    if not (isinstance(layer, SupportsTouch) and isinstance(unwrapped(layer), SupportsTouch)):
        tier.delete(key)
        return
    try:
        layer.touch(key, ttl)
    except Exception as exc:
        chain._report.failed(tier.name, "touch", exc)
        tier.delete(key)


def _run(
    chain: Chain,
    operation: str,
    key: str,
    call: Callable[[Any], Any],
    failed: Any,
    update: Callable[[Any], Update],
) -> Any:
    """Run ``call(layer)`` on the shared layer as a mutation of ``key`` (see the module
    docstring): ``failed`` is the result when the shared layer could not be asked (the
    other tiers then forget the key); ``update(result)`` says what each other tier does
    otherwise. What ``call`` raises for the caller's data (a value that is not a
    counter) propagates, changing nothing."""
    shared, first = chain._shared, chain._first
    acts: list[Update] = []

    def then() -> None:  # the first layer, under the fence's lock, as the mutation ends
        if acts and first is not shared:
            acts[0](first)

    with chain._fence.mutating((key,), then):
        result = _on_shared(chain, shared, operation, key, call)
        failure = result is _UNASKED or result is _MAYBE
        # Failed, the operation wrote nothing here: the other layers forget their copy.
        act = _forget(key) if failure else update(result)
        acts.append(act)
        for tier in chain._up:  # the lower tiers, bottom up
            if tier is not shared:
                act(tier)
    if result is _UNASKED:
        return failed
    if result is not None and result is not False:  # the key may have changed there
        chain._publish_invalidation((key,))
    return failed if failure else result


def _on_shared(
    chain: Chain,
    shared: Tier,
    operation: str,
    key: str,
    call: Callable[[Any], Any],
) -> Any:
    """``call(shared.layer)``; :data:`_UNASKED` when it was not made (the layer owes an
    earlier write of ``key``, or its breaker refused), :data:`_MAYBE` when it failed
    otherwise; either is counted and logged through the chain's reporter. A value that
    is not a counter is the caller's error: it is raised."""
    if not shared.drain(key):
        chain._report.failed(
            shared.name,
            operation,
            LayerUnavailableError(
                f"layer {shared.name!r} has not taken an earlier write of key {key!r} "
                "yet: the operation was not made",
                layer=shared.name,
            ),
        )
        return _UNASKED
    try:
        return call(shared.layer)
    except Exception as exc:
        if isinstance(exc, InvalidValueError) and operation in ("incr", "decr"):
            raise  # not a counter: the stored value is the caller's, nothing changed
        chain._report.failed(shared.name, operation, exc)
        return _UNASKED if isinstance(exc, CircuitOpenError) else _MAYBE
