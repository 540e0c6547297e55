"""What a chain's atomic operations resolve once: :class:`AtomicPlan`.

Every ``add``/``incr``/``decr``/``touch`` of a :class:`~cachechain.Chain` runs on its
shared layer, as the chain wraps it: a :class:`~cachechain._resilience.ResilientLayer`
(the breaker and the slow-call timeout) around a
:class:`~cachechain._namespace.NamespacedLayer` (the generation's key prefix) around
the layer itself. Both wrappers forward the operation to the layer with nothing more
than that: a permit asked of the breaker and the call timed, the key prefixed. The
plan resolves those wrappers once per chain, so each call makes what they make itself
(:meth:`AtomicPlan.call`), in one frame instead of four: the same permit, the same
timing against the same clock and timeout, the same outcome reported to the breaker
(:meth:`~cachechain._breaker.CircuitBreaker.on_error` for what the call raised,
``on_failure`` for a slow call, else ``on_success``), the same prefix, read inside the
breaker (a generation that cannot be fetched is a failure of the call). A wrapper
that is a subclass, or a stack the plan does not know, is not resolved: the
operation then goes through the wrappers themselves, as before.

The plan also holds the tiers the operation settles (the first one's layer ``delete``,
when it is a plain :class:`~cachechain._tier.Tier`, whose policy always writes
synchronously and owes no repair) and the shared tier's ``drain`` (None for a tier
that never holds writes).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ._namespace import Namespace, NamespacedLayer
from ._resilience import ResilientLayer, unwrapped
from ._tier import SettlingTier, Tier
from .layers._base import SupportsAdd, SupportsCounters, SupportsTouch

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker
    from ._chain import Chain
    from ._fence import MutationFence

__all__ = ["AtomicPlan", "chain_wrappers"]

_CAPABILITIES: dict[str, type] = {
    "add": SupportsAdd,
    "incr": SupportsCounters,
    "decr": SupportsCounters,
    "touch": SupportsTouch,
}


class AtomicPlan:
    """A chain's shared layer and tiers as its atomic operations use them (see the
    module docstring). Built by :meth:`of` from an open chain; immutable after."""

    __slots__ = (
        "add",
        "breaker",
        "clock",
        "decr",
        "fence",
        "first",
        "held",
        "incr",
        "l1_drop",
        "namespace",
        "others",
        "shared",
        "timeout",
        "touch",
    )

    def __init__(self, chain: Chain) -> None:
        shared = chain._shared
        #: The chain's fence.
        self.fence: MutationFence = chain._fence
        #: The shared tier, and the first one (the same tier in a chain of one layer).
        self.shared: Tier = shared
        self.first: Tier = chain._first
        #: The other tiers below the first, bottom up (settled in the mutation).
        self.others: tuple[Tier, ...] = tuple(t for t in chain._up if t is not shared)
        #: Whether the shared tier may hold a write of a key its ``drain`` must make
        #: first: its writer's ``holds`` (the test ``SettlingTier.drain`` starts with),
        #: or None for a tier without a writer (its ``drain`` is always True).
        self.held: Callable[[str], bool] | None = _held(shared)
        #: What deletes the key from the first layer, under the fence's lock (see
        #: :func:`_first`).
        self.l1_drop: Callable[[str], Any] = _first(chain)
        self.breaker: CircuitBreaker | None = None
        self.timeout: float | None = None
        self.clock: Callable[[], float] | None = None
        self.namespace: Namespace | None = None
        target = _resolve(self, shared.layer)
        #: The layer's bound operations (None: the layer lacks the capability).
        self.add: Callable[..., Any] | None = _bound(shared, target, "add")
        self.incr: Callable[..., Any] | None = _bound(shared, target, "incr")
        self.decr: Callable[..., Any] | None = _bound(shared, target, "decr")
        self.touch: Callable[..., Any] | None = _bound(shared, target, "touch")

    @classmethod
    def of(cls, chain: Chain) -> AtomicPlan:
        """The plan of ``chain``, made on its first atomic operation and kept (two
        threads may both make one: they are equal)."""
        plan = chain._atomic_plan
        if plan is None:
            plan = chain._atomic_plan = cls(chain)
        return plan


def chain_wrappers(layer: Any) -> tuple[ResilientLayer | None, Namespace | None, Any]:
    """The chain's own wrappers around ``layer`` (a tier's layer), outermost first: a
    :class:`~cachechain._resilience.ResilientLayer` or None, the namespace of a
    :class:`~cachechain._namespace.NamespacedLayer` inside it or None, and the layer
    they wrap; that last is None for a stack the chain did not build (a subclass of
    either, another proxy, wrappers nested otherwise), whose forwarding must not be
    made in their place."""
    resilient = layer if type(layer) is ResilientLayer else None
    inner = layer.layer if resilient is not None else layer
    ns: Namespace | None = None
    if type(inner) is NamespacedLayer:
        ns = inner.namespace
        inner = inner.layer
    return resilient, ns, (inner if inner is unwrapped(layer) else None)


def _resolve(plan: AtomicPlan, layer: Any) -> Any:
    """Take the breaker and the namespace of the wrappers around the shared layer into
    ``plan`` and return the layer they wrap; or, for a stack of wrappers the plan does
    not know (no breaker outside, see :func:`chain_wrappers`), ``layer`` itself,
    resolving nothing."""
    resilient, ns, inner = chain_wrappers(layer)
    if resilient is None or inner is None:
        return layer
    plan.breaker = resilient.breaker
    plan.timeout = resilient.timeout
    plan.clock = resilient._clock
    plan.namespace = ns
    return inner


def _bound(shared: Tier, target: Any, operation: str) -> Callable[..., Any] | None:
    """``target``'s bound ``operation`` when the shared layer has its capability."""
    if not shared.supports(_CAPABILITIES[operation]):
        return None
    method: Callable[..., Any] = getattr(target, operation)
    return method


def _held(shared: Tier) -> Callable[[str], bool] | None:
    """What :attr:`AtomicPlan.held` is for ``shared``."""
    drain = type(shared).drain
    if drain is Tier.drain:
        return None
    if drain is SettlingTier.drain and shared.writer is not None:
        return shared.writer.holds
    return _always  # a drain of its own: always asked


def _always(key: str) -> bool:
    return True


def _first(chain: Chain) -> Callable[[str], Any]:
    """What :attr:`AtomicPlan.l1_drop` is for the first tier of ``chain``. For a plain
    :class:`~cachechain._tier.Tier` (every write synchronous, no repair owed): the
    layer's own ``delete`` when the chain has no collector (nothing to time; the caller
    reports what it raises, as :meth:`Tier.call <cachechain._tier.Tier.call>` would),
    else through ``Tier.call``, which times and records it. Otherwise the tier's
    ``delete``."""
    first = chain._first
    if type(first) is not Tier:
        return first.delete
    layer = first.layer
    if chain._report.m is None:
        return layer.delete
    return partial(first.call, "delete", layer.delete)
