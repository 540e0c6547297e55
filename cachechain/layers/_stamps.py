"""Stamped entries: a value kept past its logical expiry, for ``get_or_load``'s fail-safe.

A chain that serves fail-safe values (see :mod:`cachechain._failsafe`) stores a loaded
value for longer than its TTL: the layer keeps it ``ttl + fail_safe_max_age`` seconds
(its *physical* TTL), and marks in the entry when it stops being fresh (its *logical*
expiry) and the TTL it was given (its *origin*, for eager refresh). Every ordinary read
(``get``, ``get_with_ttl``, ``get_many``...) treats an entry past its logical expiry
as absent and reports the logical remaining TTL: nothing but ``get_or_load`` with
fail-safe on ever sees such a value.

A layer that keeps stamps says so with a class attribute ``keeps_stamps = True``
(:class:`~cachechain.MemoryLayer` and :class:`~cachechain.MemcachedLayer` do), and
then:

- its ``set`` (and ``set_many``) takes a :class:`Stamped` value: it stores
  ``stamped.value`` for the ``ttl`` given (the physical TTL, capped by ``max_ttl`` as
  usual), fresh for ``stamped.fresh`` seconds at most;
- while :data:`reading` is on in the calling thread, its ``get_with_ttl`` answers a
  stamped entry, fresh or past its logical expiry, with ``(Found(...), physical
  seconds left)``; unstamped entries read as always.

Layers that do not keep stamps are never given a :class:`Stamped` value (the chain
writes the plain value with the logical TTL there) and never see the read mode.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["Found", "Stamped", "keeps_stamps", "reading", "stamps_wanted"]


class Stamped:
    """A value to store fresh for ``fresh`` seconds (the logical TTL) within the entry's
    physical TTL (the ``ttl`` of the ``set`` that carries it); ``origin`` is the TTL
    the value was loaded with (seconds; it is kept in the entry for eager refresh)."""

    __slots__ = ("fresh", "origin", "value")

    def __init__(self, value: Any, fresh: float, origin: float) -> None:
        self.value = value
        self.fresh = fresh
        self.origin = origin

    def __repr__(self) -> str:
        return f"Stamped({self.value!r}, fresh={self.fresh}, origin={self.origin})"


class Found:
    """A stamped entry read in :data:`reading` mode: its ``value``, the seconds until its
    logical expiry (``fresh_left``; ``<= 0``: it expired that long ago, a fail-safe
    candidate) and the TTL it was stored with (``origin``, seconds)."""

    __slots__ = ("fresh_left", "origin", "value")

    def __init__(self, value: Any, fresh_left: float, origin: float) -> None:
        self.value = value
        self.fresh_left = fresh_left
        self.origin = origin

    def __repr__(self) -> str:
        return f"Found({self.value!r}, fresh_left={self.fresh_left}, origin={self.origin})"


class _Mode(threading.local):
    on = False


_mode = _Mode()


def stamps_wanted() -> bool:
    """Whether the calling thread reads in :data:`reading` mode (layers ask it only
    for stamped entries)."""
    return _mode.on


class _Reading:
    """The type of :data:`reading`."""

    __slots__ = ()

    def __enter__(self) -> None:
        _mode.on = True

    def __exit__(self, *exc_info: object) -> None:
        _mode.on = False


#: ``with reading:`` layers that keep stamps answer ``get_with_ttl`` of a stamped entry
#: with ``(Found, physical seconds left)`` in this thread (see the module). Not
#: reentrant (the outer block's mode ends with an inner one); costs a thread-local flag.
reading = _Reading()


def keeps_stamps(layer: object) -> bool:
    """Whether ``layer`` (unwrapped from the chain's wrappers) keeps stamped entries."""
    return getattr(type(layer), "keeps_stamps", False) is True
