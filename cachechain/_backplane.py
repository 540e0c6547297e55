"""The backplane: how a chain tells other processes which keys changed, and hears theirs.

A chain whose in-process layers sit above a shared one keeps them coherent with every
other process sharing that layer: each key a mutation changed is *published*, and
each key another process published is removed from this process's in-process layers
(through the chain's mutation fence, so a read in flight cannot bring the old value
back). The transport is a :class:`Backplane`; the chain is its :class:`Receiver`.

The default transport is :class:`~cachechain._journal.MemcachedJournal`, a ring in
the shared memcached that each process polls (no new server). A push transport
(Redis pub/sub, a message bus) implements the same protocol: it calls the receiver
from its own thread and promises the same thing, that a key published in one process
is invalidated in every other within its ``bound``, or the receiver is told that
track was lost (:meth:`Receiver.lost`), which drops every local entry (or, for a
transport merely late, sets them aside until :meth:`Receiver.caught_up`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .metrics._catalogue import LOST_REASONS

__all__ = ["LOST_REASONS", "Backplane", "Receiver"]

# Why a process lost track of the invalidations (LOST_REASONS, the ``reason`` label of
# ``cache_chain_coherence_lost_total``): ``overrun``, the ring wrapped past the entries
# not read yet; ``gap``, an entry reserved but never written (its publisher died);
# ``unreachable``, no successful poll for ``bound`` seconds; ``reset``, the journal
# vanished (a ``flush_all``, a restart, an eviction); ``overflow``, a publisher had
# more changes pending than it keeps and published "drop everything" instead.


@runtime_checkable
class Receiver(Protocol):
    """What a backplane calls (from its own thread). None of these may block for
    long; none raises."""

    def invalidate(self, keys: Sequence[str], lag: float) -> None:
        """Another process changed ``keys``: drop them from the in-process layers.
        ``lag``: seconds from the publication to now (by the wall clocks of both)."""

    def cleared(self) -> None:
        """Another process cleared the cache (the namespace generation moved, already
        adopted): drop every in-process entry."""

    def lost(self, reason: str) -> None:
        """Track of the invalidations was lost (``reason`` in :data:`LOST_REASONS`):
        drop every in-process entry, since any of them may be stale. For
        ``unreachable`` no change is known to be missed, only late: the entries may be
        set aside instead (not served), until :meth:`caught_up`."""

    def caught_up(self) -> None:
        """After ``lost("unreachable")``: every change published until after it has
        now been delivered (:meth:`invalidate`); the entries set aside that no change
        touched since may be served again."""


@runtime_checkable
class Backplane(Protocol):
    """A transport of invalidations between the processes that share a layer."""

    @property
    def bound(self) -> float:
        """Seconds within which a published key is invalidated in every other
        process, or track is lost and everything dropped."""

    def start(self, receiver: Receiver) -> None:
        """Begin delivering other processes' invalidations to ``receiver``."""

    def publish(self, keys: Sequence[str]) -> None:
        """``keys`` changed in the shared layer: tell the other processes. Never
        blocks on I/O and never raises."""

    def close(self, timeout: float) -> None:
        """Publish what is pending (within ``timeout`` seconds) and stop."""
