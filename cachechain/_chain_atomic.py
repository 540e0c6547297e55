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
   lock: the key is deleted there (a ``touch`` that found the key re-times it in the
   first layer instead, when that layer can ``touch``). An ``add`` that stored leaves
   its value in the shared layer alone: an ``add`` is most often a lock or a first
   write, whose holder is known only there (a lock released by another process must
   not stay "held" in this one's copy), and the next ``get`` of the key reads it from
   there and backfills it.

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

``strict=True`` tells the two apart where the caller must: each operation then raises
:class:`UnconfirmedError` instead of returning False or None when the shared layer
could not be asked or failed, so an answer of False (``add``: the key was there;
``touch``: absent) or None (``incr``/``decr``: absent) is one the shared layer gave.
A caller that creates a missing counter (Flask-Caching's ``inc``) must not take a
failed ``incr``, which may have counted, for an absent key and count again. The
default (``strict=False``) keeps the answers above.

The path is kept lean (every call pays it, next to one memcached round trip; issue
10 asks ``add`` and ``incr`` for at most 1.2x pymemcache's own): one stripe of the
fence taken and released (:meth:`MutationFence.begin
<cachechain._fence.MutationFence.begin>`/``end``), no closures, the arguments checked
inline for the common types, and what does not change between calls resolved once
per chain in its :class:`~cachechain._atomic_plan.AtomicPlan`: the shared layer's
breaker, timeout and namespace, whose forwarding the call makes itself (as
:class:`~cachechain._resilience.ResilientLayer` and
:class:`~cachechain._namespace.NamespacedLayer` would), the layer's own bound
operation, and the first layer's ``delete``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from ._atomic_plan import AtomicPlan
from ._errors import (
    ChainClosedError,
    CircuitOpenError,
    ConfigError,
    CorruptValueError,
    InvalidValueError,
    LayerError,
    LayerUnavailableError,
    classify_error,
)
from ._resilience import unwrapped
from ._tier import Tier
from ._validate import check_key, check_ttl
from .layers._base import SupportsAdd, SupportsCounters, SupportsTouch
from .layers._counters import check_delta

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._chain import Chain

__all__ = ["AtomicOps", "UnconfirmedError", "shared_tier"]

_MOD: Final = 1 << 64
_INF: Final = float("inf")
_BIG: Final = 10**300  # an int below it is a finite float
_COUNTERS: Final = ("incr", "decr")

# What the other tiers do once the shared layer answered (see _settle).
_FORGET: Final = 0  # the call failed: drop the copy, owe nothing
_DROP: Final = 1  # delete the key
_RETIME: Final = 2  # a touch that found the key: re-time the first layer's copy


class UnconfirmedError(LayerError):
    """An atomic operation of a :class:`~cachechain.Chain` called with ``strict=True``
    (``add``, ``incr``, ``decr``, ``touch``) that the chain's shared layer did not
    confirm: it could not be asked (its circuit breaker open, an earlier write of the
    key not taken yet; the operation was not made), or it failed (an error, a timeout:
    the operation may still have been made there, its reply lost).

    The caller cannot tell whether the operation happened, so it must neither take it
    for "absent" nor make it again (a counter would count twice). ``__cause__`` is the
    layer's error and ``error_type`` its metrics label (``timeout``, ``connection``...);
    ``layer`` names the shared layer. The failure was already counted and logged once
    by the chain, so this error never trips a circuit breaker.
    """

    trips_breaker = False

    def __init__(self, message: str, *, layer: str | None = None, error_type: str = "backend"):
        super().__init__(message, layer=layer)
        self.error_type = error_type


class _Failure:
    """What :func:`_on_shared` returns when the shared layer did not answer:
    ``error``, and whether the call was ``sent`` (it may have been made then)."""

    __slots__ = ("error", "sent")

    def __init__(self, error: Exception, sent: bool) -> None:
        self.error = error
        self.sent = sent


def shared_tier(tiers: Sequence[Tier]) -> Tier:
    """The tier whose layer a chain's atomic operations run on: the lowest layer that
    is not ``local``, or the last one when every layer is local."""
    for tier in reversed(tiers):
        if not tier.layer.local:
            return tier
    return tiers[-1]


class AtomicOps:
    """The atomic operations of :class:`~cachechain.Chain` (a base class of it)."""

    #: The chain's :class:`~cachechain._atomic_plan.AtomicPlan`, made on its first
    #: atomic operation.
    _atomic_plan: AtomicPlan | None = None

    def add(self, key: str, value: Any, ttl: float | None = None, *, strict: bool = False) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``: each layer's
        default) only if the chain's shared layer does not hold ``key``: atomic across
        every process sharing that layer (on memcached: its ``add``), so it can serve
        as a lock (``add("lock:job", owner, ttl=30)``: exactly one caller wins).

        Returns True when the shared layer stored the value; the layers above drop any
        copy of ``key`` (the next ``get`` reads the value from the shared layer and
        backfills it). Returns False when the key was there or the shared layer refused
        the value (its codec cannot encode it, it is too large), and also, unless
        ``strict``, when the shared layer could not be asked (down, timed out, its
        breaker open; counted and logged once): no lock is granted and nothing is
        stored in this process, whose copies of ``key`` are removed. With
        ``strict=True`` that last case raises :class:`UnconfirmedError` instead (after
        a timeout the value may have been stored). Raises
        :class:`~cachechain.InvalidKeyError` for a non-``str`` key,
        :class:`~cachechain.InvalidValueError` for an invalid ``ttl`` or ``strict``
        (before anything changes), :class:`~cachechain.ConfigError` when the shared
        layer has no ``add``, :class:`~cachechain.ChainClosedError` after ``close``.
        """
        chain: Any = self  # a Chain (AtomicOps is one of its bases)
        plan: AtomicPlan = chain._atomic_plan or AtomicPlan.of(chain)
        method = plan.add
        if key.__class__ is not str or chain._closed or strict.__class__ is not bool or not method:
            _checked(chain, key, SupportsAdd, "add", strict)
        if ttl is not None and not (ttl.__class__ is float and 0.0 < ttl < _INF):
            ttl = float(ttl) if ttl.__class__ is int and 0 < ttl < _BIG else _ttl(ttl)
        stored: bool = _run(chain, plan, "add", key, method, (value, ttl), _DROP, ttl, strict)
        return stored

    def incr(self, key: str, delta: int = 1, *, strict: bool = False) -> int | None:
        """Add ``delta`` (an ``int``, ``0 <= delta < 2**64``) to the counter ``key`` on
        the chain's shared layer, atomically across every process sharing it (on
        memcached: its ``incr``), and return the new value. Counters are signed 64-bit
        integers with memcached's arithmetic: ``incr`` wraps modulo 2**64 (past
        ``2**63 - 1`` to ``-2**63``). A stored ``int`` or decimal ``str`` becomes a
        counter on its first ``incr``; the counter keeps its TTL.

        Returns None when the key is absent (nothing is created), and, unless
        ``strict``, when the shared layer could not be asked (down, timed out, its
        breaker open; counted and logged once): never a count it did not make. After a
        timeout the increment may still have been made, so a caller that creates
        missing counters must pass ``strict=True``: then such a failure raises
        :class:`UnconfirmedError`, and None always means absent. Either way the key is
        removed from the other layers of this chain, so the next ``get`` reads the
        shared count. Raises :class:`~cachechain.InvalidValueError` for a bad
        ``delta`` or ``strict`` (before anything changes) or a stored value that
        cannot be a counter (a float, a ``bool``, a non-numeric ``str``...; nothing
        changes), :class:`~cachechain.InvalidKeyError`,
        :class:`~cachechain.ConfigError` and :class:`~cachechain.ChainClosedError`
        as :meth:`add` does.
        """
        chain: Any = self  # a Chain (AtomicOps is one of its bases)
        plan: AtomicPlan = chain._atomic_plan or AtomicPlan.of(chain)
        method = plan.incr
        if key.__class__ is not str or chain._closed or strict.__class__ is not bool or not method:
            _checked(chain, key, SupportsCounters, "incr", strict)
        if delta.__class__ is not int or not 0 <= delta < _MOD:
            delta = check_delta(delta)
        count: int | None = _run(chain, plan, "incr", key, method, (delta,), _DROP, None, strict)
        return count

    def decr(
        self, key: str, delta: int = 1, *, floor: bool = True, strict: bool = False
    ) -> int | None:
        """Subtract ``delta`` (``0 <= delta < 2**64``) from the counter ``key`` on the
        chain's shared layer, atomically, and return the new value; as :meth:`incr`
        otherwise (None when absent, or unreachable unless ``strict``; the same
        errors).

        With ``floor`` (the default) a counter that is not negative stops at 0, as
        memcached's ``decr`` does. ``floor=False`` lets it go below 0 (plain signed
        arithmetic, what Django's and Flask's backends need): made as an ``incr`` of
        ``2**64 - delta``, which memcached wraps to the difference, still atomic and in
        one command.
        """
        chain = _checked(self, key, SupportsCounters, "decr", strict)
        delta = check_delta(delta)
        if floor.__class__ is not bool:
            raise InvalidValueError(f"floor must be a bool, got {floor!r}")
        plan = AtomicPlan.of(chain)
        if floor:
            fn, args = plan.decr, (delta,)
        else:
            fn, args = plan.incr, ((-delta) % _MOD,)
        count: int | None = _run(chain, plan, "decr", key, fn, args, _DROP, None, strict)
        return count

    def touch(self, key: str, ttl: float | None = None, *, strict: bool = False) -> bool:
        """Make ``key`` expire ``ttl`` seconds from now (``None``: each layer's default)
        on the chain's shared layer, without rewriting its value, and return whether
        the shared layer held it. The first layer's copy, if any, is re-timed the same
        way (capped by its ``max_ttl``); other layers drop theirs.

        Returns False when the key is absent, and, unless ``strict`` (then
        :class:`UnconfirmedError`), when the shared layer could not be asked (counted
        and logged once); this process's copies are then removed. Raises as
        :meth:`add` does.
        """
        chain = _checked(self, key, SupportsTouch, "touch", strict)
        ttl = check_ttl(ttl, error=InvalidValueError)
        plan = AtomicPlan.of(chain)
        found: bool = _run(chain, plan, "touch", key, plan.touch, (ttl,), _RETIME, ttl, strict)
        return found

    def _publish_invalidation(self, keys: Sequence[str]) -> None:
        """Called once ``keys`` may have changed on the shared layer (an ``add`` that
        stored, an ``incr``/``decr`` that counted, a ``touch`` that found the key, a
        call that failed after it was sent), after this process's own layers were
        updated and outside the fence: :class:`~cachechain.Chain` detaches loads of
        them and tells the other processes. Must never raise nor block for long."""


def _ttl(ttl: object) -> float | None:
    """``ttl`` checked by :func:`~cachechain._validate.check_ttl` (what ``add`` does for
    a ``ttl`` that is neither a ``float`` in ``(0, inf)`` nor an ``int`` in ``(0,
    10**300)``, which it takes as they are: as a ``float``)."""
    return check_ttl(ttl, error=InvalidValueError)


def _checked(chain: Any, key: str, capability: type, operation: str, strict: object) -> Chain:
    """The chain, once ``key`` and ``strict`` are checked, the chain is open and its
    shared layer (as wrapped by the chain) has ``capability``. Raises before anything
    changes."""
    if key.__class__ is not str:
        check_key(key)
    owner: Chain = chain
    if owner._closed:
        raise ChainClosedError("the chain is closed")
    if strict.__class__ is not bool:
        raise InvalidValueError(f"strict must be a bool, got {strict!r}")
    if not owner._shared.supports(capability):
        layer = unwrapped(owner._shared.layer)
        raise ConfigError(
            f"Chain.{operation}: the shared layer {layer.name!r} does not support "
            f"{operation} (cachechain.layers.{capability.__name__})"
        )
    return owner


def _run(
    chain: Chain,
    plan: AtomicPlan,
    operation: str,
    key: str,
    fn: Any,
    args: tuple[Any, ...],
    hit: int,
    ttl: float | None,
    strict: bool,
) -> Any:
    """Run ``fn(key, *args)`` (the shared layer's operation, through ``plan``) as a
    mutation of ``key`` (see the module docstring), then settle the other tiers:
    ``hit`` when it answered True, a delete otherwise, a forget when it failed. What
    ``fn`` raises for the caller's data (a value that is not a counter) propagates,
    changing nothing."""
    fence = plan.fence
    stripe = fence.begin(key)
    kind = -1
    try:
        result = _on_shared(chain, plan, operation, key, fn, args)
        failure = result.__class__ is _Failure
        kind = _FORGET if failure else (hit if result else _DROP)
        for tier in plan.others:  # the lower tiers but the shared one, bottom up
            _settle(chain, tier, key, kind, ttl)
    finally:
        # The first layer, under the fence's lock, as the mutation ends.
        first = plan.first
        try:
            if kind < 0 or first is plan.shared:
                fence.end(stripe)
            elif kind == _DROP:
                fence.end(stripe, plan.l1_drop, key)
            else:
                fence.end(stripe, _settle, chain, first, key, kind, ttl)
        except Exception as exc:  # only the first layer's own delete raises
            chain._report.failed(first.name, "delete", exc)
    if failure:
        return _failed(chain, operation, key, result, strict)
    if result is not None and result is not False:  # the key may have changed there
        chain._publish_invalidation((key,))
    return result


def _settle(chain: Chain, tier: Tier, key: str, kind: int, ttl: float | None) -> None:
    """Update ``tier`` (not the shared one) after the shared layer's answer."""
    if kind == _DROP:
        tier.delete(key)
    elif kind == _FORGET:
        tier.forget(key)  # nothing was written: nothing is owed
    elif kind == _RETIME and tier.index == 0:
        _retime(chain, tier, key, ttl)
    else:
        tier.delete(key)


def _failed(chain: Chain, operation: str, key: str, failure: _Failure, strict: bool) -> Any:
    """The answer of an operation the shared layer did not confirm: False (``add``,
    ``touch``) or None (counters), or with ``strict`` :class:`UnconfirmedError`. A
    call that was sent may have been made: the key is published as changed."""
    if failure.sent:
        chain._publish_invalidation((key,))
    error = failure.error
    if strict and not isinstance(error, InvalidValueError):  # a refused value: not stored
        name = chain._shared.name
        raise UnconfirmedError(
            f"Chain.{operation} of {key!r}: the shared layer {name!r} did not confirm it "
            f"({type(error).__name__}: {error}); it "
            + ("may have been made" if failure.sent else "was not made"),
            layer=name,
            error_type=classify_error(error),
        ) from error
    return None if operation in _COUNTERS else False


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


def _on_shared(
    chain: Chain,
    plan: AtomicPlan,
    operation: str,
    key: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> Any:
    """``fn(key, *args)`` on the shared layer, or a :class:`_Failure` when it was not
    made (the layer owes an earlier write of ``key``, or its breaker refused) or
    failed; either is counted and logged through the chain's reporter. A value that is
    not a counter is the caller's error: it is raised.

    ``fn`` is the operation of the layer inside the wrappers ``plan`` resolved: the
    call is made as they make it (see :mod:`cachechain._atomic_plan`), the key
    prefixed by the namespace's generation, inside the breaker, timed against the
    slow-call timeout (:meth:`ResilientLayer._forward
    <cachechain._resilience.ResilientLayer>`)."""
    held = plan.held
    if held is not None and held(key) and not plan.shared.drain(key):
        return _undrained(chain, plan.shared, operation, key)
    ns = plan.namespace
    breaker = plan.breaker
    try:
        if breaker is None:  # the plan resolved no wrapper: ``fn`` is the layer's own
            return fn(key, *args)
        permit = breaker.acquire()
        timeout = plan.timeout
        clock: Any = plan.clock
        start = clock() if timeout is not None else 0.0
        try:
            result = fn(key if ns is None else (ns.prefix or ns.current()) + key, *args)
        except BaseException as exc:
            breaker.on_error(permit, exc)
            raise
        if timeout is not None and clock() - start > timeout:
            breaker.on_failure(permit)
        else:
            breaker.on_success(permit)
        return result
    except Exception as exc:
        if isinstance(exc, InvalidValueError) and operation in _COUNTERS:
            raise  # not a counter: the stored value is the caller's, nothing changed
        return _shared_failed(chain, plan.shared, operation, exc)


def _shared_failed(chain: Chain, shared: Tier, operation: str, exc: Exception) -> Any:
    """What :func:`_on_shared` answers for ``exc`` (counted and logged): bytes the layer
    cannot read are absent, as a ``get`` finds them (nothing was changed); anything
    else is a :class:`_Failure`."""
    chain._report.failed(shared.name, operation, exc)
    if isinstance(exc, CorruptValueError):
        return None if operation in _COUNTERS else False
    return _Failure(exc, sent=not isinstance(exc, CircuitOpenError))


def _undrained(chain: Chain, shared: Tier, operation: str, key: str) -> _Failure:
    """The failure of an operation not made: ``shared`` still owes a write of ``key``
    (counted and logged)."""
    error = LayerUnavailableError(
        f"layer {shared.name!r} has not taken an earlier write of key {key!r} "
        "yet: the operation was not made",
        layer=shared.name,
    )
    chain._report.failed(shared.name, operation, error)
    return _Failure(error, sent=False)
