"""Coherence: a chain's in-process layers kept in step with every other process.

A chain has a :class:`Coherence` when it has a shared layer (one not ``local``) that
can hold a namespace generation (``add`` and counters) and
:class:`~cachechain.CoherenceConfig` does not turn it off. It owns:

- the :class:`~cachechain._namespace.Namespace` of the shared layers, whose generation
  is part of every key they are sent (:func:`namespaced`), so :meth:`Coherence.clear`
  empties the cache for every process with one ``incr``;
- the :class:`~cachechain._backplane.Backplane` (by default a
  :class:`~cachechain._journal.MemcachedJournal`), to which each mutation of this
  process publishes its keys, and for which it is the
  :class:`~cachechain._backplane.Receiver`: another process's keys are removed from the
  in-process layers above the shared one through the chain's
  :class:`~cachechain._fence.MutationFence` (a read that began before cannot backfill
  the old value after), and a clear or a loss of track drops every entry there.

Without in-process layers above the shared one the journal reads only the generation
(one ``get`` per interval), and publishes this process's keys all the same: the other
processes' in-process layers must drop what it changes. See docs/coherence.md.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _fork
from ._backplane import Backplane
from ._chain_clear import clear_layer, clear_layers
from ._chain_metrics import Reporter
from ._config import CoherenceConfig, LayerConfig
from ._fence import MutationFence, Tickets
from ._journal import MemcachedJournal
from ._namespace import Namespace, NamespacedLayer
from ._resilience import ResilientLayer, unwrapped
from ._tier import Tier
from .layers._base import CacheLayer, SupportsAdd, SupportsCounters

__all__ = ["Coherence", "namespaced", "shared_index"]

#: Entries set aside brought back per hold of the fence's lock (see Coherence.caught_up).
_CHUNK = 512


def shared_index(configs: Sequence[LayerConfig]) -> int | None:
    """The position of the lowest layer that is not ``local``, or None."""
    for i in range(len(configs) - 1, -1, -1):
        if not configs[i].layer.local:
            return i
    return None


def namespaced(
    configs: Sequence[LayerConfig], config: CoherenceConfig
) -> tuple[list[LayerConfig], Namespace | None]:
    """``configs`` with every shared layer wrapped in a
    :class:`~cachechain._namespace.NamespacedLayer` of the lowest one's namespace, and
    that namespace; unchanged and None when ``config`` turns namespaces off or no
    shared layer can hold a generation."""
    at = shared_index(configs)
    if at is None or not config.namespace:
        return list(configs), None
    shared = unwrapped(configs[at].layer)
    if not (isinstance(shared, SupportsAdd) and isinstance(shared, SupportsCounters)):
        return list(configs), None
    ns = Namespace(shared)
    out = [
        c if c.layer.local else dataclasses.replace(c, layer=_inside(c.layer, ns)) for c in configs
    ]
    return out, ns


def _inside(layer: CacheLayer, ns: Namespace) -> CacheLayer:
    """``layer`` namespaced, the namespace inside a breaker the user wrapped it in (so
    the breaker guards the generation's fetch too)."""
    if isinstance(layer, ResilientLayer):
        return layer.around(_inside(layer.layer, ns))
    return NamespacedLayer(layer, ns)


class Coherence:
    """The coherence of one chain: its namespace, its backplane, and the receiver that
    applies other processes' changes to ``tiers`` (the chain's tiers) under ``fence``.

    The journal lives in the shared layer that holds ``namespace`` (unwrapped);
    ``held(key)`` says whether a write of ``key`` has not reached it yet, and
    ``overflowed()`` whether its writer gave up key by key. Never raises once built.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        shared_at: int,
        namespace: Namespace,
        fence: MutationFence,
        report: Reporter,
        config: CoherenceConfig,
        held: Callable[[str], bool],
        overflowed: Callable[[], bool],
    ) -> None:
        local = [t for t in tiers[:shared_at] if t.layer.local]
        self._breaker = tiers[shared_at].breaker
        self.namespace = namespace
        self._fence = fence
        self._report = report
        self._local = local
        self._first = local[0] if local and local[0].index == 0 else None
        self._others = [t for t in local if t is not self._first]
        track_keys = config.enabled and bool(local)
        self.backplane: Backplane = MemcachedJournal(
            namespace.layer,
            namespace,
            keys=config.enabled,
            follow=track_keys,
            interval=config.interval,
            bound=config.bound,
            slots=config.slots,
            held=held,
            overflowed=overflowed,
        )
        #: Whether other processes' changes reach the in-process layers.
        self.tracking = track_keys
        #: The first layer's entries set aside while the backplane is late (see
        #: :meth:`lost`), with the fence's tickets taken then; None otherwise.
        self._aside: tuple[Mapping[str, object], Tickets] | None = None
        self._lock = threading.Lock()  # taken before the fence's, never after
        _fork.track(self)
        #: Whether this process's changes are published (whenever coherence is on).
        self.publishing = config.enabled
        self.backplane.start(self)

    # -- this process's changes -----------------------------------------------------
    def publish(self, keys: Sequence[str]) -> None:
        """Tell the other processes that ``keys`` changed in the shared layer."""
        if self.publishing:
            self.backplane.publish(keys)
            m = self._report.m
            if m is not None:
                m.record_invalidations_published(len(keys))

    def clear(self) -> bool:
        """Move the namespace generation (every process stops reading what was
        written before) and drop every in-process entry. Return whether the
        generation moved; a failure is counted against the shared layer."""
        try:
            moved = self.namespace.move()
        except Exception as exc:
            self._report.failed(self.namespace.layer.name, "clear", exc)
            moved = False
        self.drop_all()
        return moved

    def handle_overflow(self) -> bool:
        """A shared layer's async writer gave up repairing key by key (too many
        pending): make every value written before invisible in every process, by
        :meth:`clear`. Return whether it was done (False at once while the shared
        layer's breaker refuses calls). Never raises."""
        breaker = self._breaker
        if breaker is not None and breaker.refusing():
            return False
        try:
            return self.clear()
        except Exception:
            return False

    # -- the receiver -----------------------------------------------------------------
    def invalidate(self, keys: Sequence[str], lag: float) -> None:
        """Another process changed ``keys``: drop them from the in-process layers."""
        first = self._first

        def then() -> None:
            if first is not None:
                _quietly(self._report, first, keys)

        with self._fence.mutating(keys, then):
            for tier in self._others:
                _quietly(self._report, tier, keys)
        m = self._report.m
        if m is not None:
            m.record_invalidations_applied(len(keys), lag)

    def cleared(self) -> None:
        """Another process cleared the cache: drop every in-process entry."""
        self.drop_all()

    def lost(self, reason: str) -> None:
        """Track was lost (``reason``): drop every in-process entry and count it. For
        ``unreachable`` (the backplane could not poll in time: no change is known to
        be missed, only late) the first layer's entries are set aside instead, when
        it can (:meth:`MemoryLayer.set_aside <cachechain.MemoryLayer.set_aside>`), for
        :meth:`caught_up` to bring back those no change touched since."""
        if reason != "unreachable" or not self._set_aside():
            self.drop_all()
        m = self._report.m
        if m is not None:
            m.record_coherence_lost(reason)

    def caught_up(self) -> None:
        """After ``lost("unreachable")``: every change published until after it was
        delivered. The entries set aside come back, but those of a stripe of the
        chain's fence that a mutation touched since (a change of any key of a stripe,
        here or delivered from another process, sends back none of the stripe's
        entries); each comes back only where its key has no newer entry and room is
        left, with its own expiry."""
        with self._lock:
            aside, self._aside = self._aside, None
        first = self._first
        if aside is None or first is None:
            return
        entries, tickets = aside
        layer: Any = first.layer  # one that could set its entries aside: it brings back
        items = list(entries.items())  # least recent first
        try:  # in chunks, the most recent first: writers wait for one chunk at most
            for end in range(len(items), 0, -_CHUNK):
                chunk = dict(items[max(0, end - _CHUNK) : end])
                self._fence.if_unchanged_many(tickets, chunk, layer.bring_back)
        except Exception as exc:
            self._report.failed(first.name, "set", exc)

    def drop_all(self) -> None:
        """Empty the in-process layers above the shared one, as one mutation of every
        key (no read in flight backfills after it); what was set aside goes too (were
        entries set aside again meanwhile, their tickets were taken after this
        mutation began: they are entries read since)."""
        with self._lock:
            self._aside = None
        clear_layers(self._fence, self._report, self._local)

    def _set_aside(self) -> bool:
        """:meth:`lost` for ``unreachable``: empty the in-process layers as
        :meth:`drop_all` does, but the first layer's entries are kept aside, with the
        fence's tickets as the mutation ends (a later mutation of a stripe then keeps
        its entries out). False, to drop them instead, when the first layer cannot set
        its entries aside, or when it has already (stalled again before
        :meth:`caught_up`: late for a second bound, as in an outage)."""
        first = self._first
        if first is None or not callable(getattr(first.layer, "set_aside", None)):
            return False
        with self._lock:
            if self._aside is not None:  # late for two bounds: an outage, not a hiccup
                return False
            fence = self._fence

            def aside(tier: Tier) -> bool:
                layer: Any = tier.layer
                try:
                    self._aside = (layer.set_aside(), fence.tickets())
                except Exception as exc:  # empty it as drop_all would
                    self._report.failed(tier.name, "clear", exc)
                    return clear_layer(self._report, tier)
                return True

            clear_layers(fence, self._report, self._local, first=aside)
        return True

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock; nothing set aside (the journal reads its
        ring again from the head, which drops every entry)."""
        self._lock = threading.Lock()
        self._aside = None

    def close(self, timeout: float) -> None:
        """Publish what is pending and stop the backplane (``timeout`` seconds)."""
        self.backplane.close(timeout)


def _quietly(report: Reporter, tier: Tier, keys: Sequence[str]) -> None:
    try:
        tier.layer.delete_many(keys)
    except Exception as exc:
        report.failed(tier.name, "delete_many", exc)
