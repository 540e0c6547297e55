"""The atomic operations of :class:`~cachechain.MemcachedLayer`: ``add``, ``incr``,
``decr`` and ``touch``, with memcached's own commands.

- ``add`` is memcached's ``add``. When memcached still holds the key but its envelope
  has expired (an expiry finer than memcached's whole seconds), the stale entry is
  replaced by compare-and-set (``gets``/``cas``), so ``add`` means "absent for a
  reader of this layer".
- ``incr``/``decr`` are memcached's commands on a counter (see :mod:`._counters`).
  When memcached answers that the value is not a number (an envelope: a value ``set``
  stored), a compare-and-set loop reads it, makes it a counter if it can be one (an
  ``int``, or a ``str`` of decimal digits), applies the change and stores the counter
  with the expiry the envelope had; the next call is native. Another value is refused
  with :class:`~cachechain.InvalidValueError`.
- ``touch`` is memcached's ``touch`` for a counter. An envelope carries its own expiry,
  which reads honour, so it is rewritten by compare-and-set with the new expiry (the
  payload is not decoded, unless the codec binds it to the header: a signed payload
  is verified and signed again for the new expiry).

Every command that must not run twice (``add``, ``incr``, ``decr``, ``cas``) goes
through :meth:`Pool.call_once <._pool.Pool.call_once>`: never retried, so a reply lost
to a timeout or a dropped connection is an error, and the change may or may not have
been made. Every round of a loop shares the call's one deadline (``timeout`` seconds
from its start): a server that answers each command slowly, but within the timeout,
cannot stretch the call over its 32 rounds. Errors are mapped as for every other call
of the layer.

The first round of ``add`` and ``incr`` (the common case: the key absent, a counter
already native) runs in the method itself, every other round apart (:func:`_add_over`,
:func:`_count_over`): these are every ``Chain.add``/``Chain.incr``'s path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from pymemcache.exceptions import MemcacheClientError

from .._codecs import CorruptValueError, expiry_of
from .._errors import InvalidValueError, LayerError
from ._base import MISSING
from ._counters import RawCounter, check_delta, countable, decr_value, incr_value, raw
from ._memcached_keys import map_key
from ._pool import Node

if TYPE_CHECKING:
    from ._memcached import MemcachedLayer

__all__ = ["ContendedError", "MemcachedAtomicOps"]

#: Rounds of a compare-and-set loop before it gives up (each lost round means another
#: client changed the key in between; a conversion to a counter is contended once).
_ROUNDS: Final = 32


class _Again:
    """A compare-and-set round lost to another client: try again."""


_AGAIN: Final = _Again()
#: What :func:`_native` returns when memcached says the value is not a number.
_NOT_A_NUMBER: Final = object()
_MOD: Final = 1 << 64
_HALF: Final = 1 << 63
_monotonic = time.monotonic


class ContendedError(LayerError):
    """A compare-and-set loop lost every round to other clients changing the key. Says
    nothing about the server's health: it does not trip the circuit breaker."""

    trips_breaker = False


class MemcachedAtomicOps:
    """The atomic operations of :class:`~cachechain.MemcachedLayer` (a base class of
    it; see the module docstring). Each raises
    :class:`~cachechain.ChainClosedError` after ``close``, and a layer error
    (:class:`~cachechain.LayerTimeoutError`, :class:`~cachechain.LayerUnavailableError`,
    :class:`~cachechain.LayerError`) when memcached fails."""

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` for ``ttl`` seconds (``None``: ``default_ttl``) unless the
        layer holds a live value of ``key``, atomically for every client of the
        server; return whether it was stored. Raises
        :class:`~cachechain.InvalidValueError` for a value the codec refuses, one too
        large, or an invalid TTL (nothing is stored then)."""
        # The first round of _add, one call shorter: every Chain.add's path.
        layer: Any = self  # a MemcachedLayer (this is one of its bases)
        pool = layer._pool
        if pool.closed:
            pool.check_open()
        mkey = map_key(key, layer._prefix)
        expires_at, exptime = layer._expiry(ttl)
        data = layer._encode(value, mkey, expires_at)
        node = pool.node_for(mkey) if pool.cluster else pool.first
        deadline = _monotonic() + pool.timeout  # pool.deadline(), one call shorter
        if pool.call_once(node, "add", mkey, data, exptime, deadline, keys=(mkey,)):
            return True  # the common case: the key was absent
        return _add_over(layer, key, node, mkey, data, exptime, deadline)

    def incr(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` (an ``int``, ``0 <= delta < 2**64``) to the counter ``key`` and
        return the new value (signed 64-bit, wrapping modulo 2**64, see
        :class:`~cachechain.layers.SupportsCounters`); None when the key is absent.
        The counter keeps its expiry. Raises :class:`~cachechain.InvalidValueError`
        for a bad ``delta`` or a value that cannot be a counter."""
        if delta.__class__ is not int or not 0 <= delta < _MOD:
            delta = check_delta(delta)
        # _count, one call shorter: every Chain.incr's path.
        layer: Any = self  # a MemcachedLayer (this is one of its bases)
        pool = layer._pool
        if pool.closed:
            pool.check_open()
        mkey = map_key(key, layer._prefix)
        node = pool.node_for(mkey) if pool.cluster else pool.first
        deadline = _monotonic() + pool.timeout  # pool.deadline(), one call shorter
        result = pool.call_once(node, _native, "incr", mkey, delta, deadline, keys=(mkey,))
        if result is None:
            return None
        if result is not _NOT_A_NUMBER:
            result = int(result) % _MOD  # memcached's unsigned number, read signed
            return result - _MOD if result >= _HALF else result
        return _count_over(layer, key, node, mkey, delta, "incr", deadline)

    def decr(self, key: str, delta: int = 1) -> int | None:
        """Subtract ``delta`` from the counter ``key`` (one that is not negative stops at
        0, as memcached's ``decr``) and return the new value; None when the key is
        absent. Raises as :meth:`incr` does."""
        if delta.__class__ is not int or not 0 <= delta < _MOD:
            delta = check_delta(delta)
        layer: Any = self  # a MemcachedLayer (this is one of its bases)
        return _count(layer, key, delta, "decr")

    def touch(self, key: str, ttl: float | None = None) -> bool:
        """Make the live entry ``key`` expire ``ttl`` seconds from now (``None``:
        ``default_ttl``; memcached keeps it to the next whole second); return False
        when the layer holds no live entry of ``key``. Raises
        :class:`~cachechain.InvalidValueError` for an invalid TTL and
        :class:`~cachechain.CorruptValueError` (counted in ``stats``) for stored bytes
        that are neither an envelope nor a counter."""
        return _touch(cast("MemcachedLayer", self), key, ttl)


def _add_over(
    layer: MemcachedLayer,
    key: str,
    node: Node,
    mkey: bytes,
    data: bytes,
    exptime: int,
    deadline: float,
) -> bool:
    """The rest of an ``add`` (:meth:`MemcachedAtomicOps.add`) that memcached refused:
    False when the key holds a live value, else (its envelope expired for us) the entry
    replaced by compare-and-set, and ``add`` tried again when it went meanwhile; the
    first round's ``add`` made."""
    pool = layer._pool
    for round_ in range(_ROUNDS):
        if round_ and pool.call_once(node, "add", mkey, data, exptime, deadline, keys=(mkey,)):
            return True
        found, cas = pool.call(node, "gets", mkey, deadline)
        if found is None:
            continue  # gone since: add again
        if not _expired(found, layer._clock()):
            return False
        if pool.call_once(node, "cas", mkey, data, cas, exptime, deadline, keys=(mkey,)):
            return True  # replaced the entry that had expired for us
    raise _contended(layer, key, "add")


def _expired(data: bytes, now: float) -> bool:
    """Whether stored bytes are an envelope whose expiry has passed. A counter, or
    bytes that are not an envelope, are a value held: an ``add`` must not replace them
    (a lock must never have two owners). Empty bytes, a lease's stub, are absent."""
    if not data:
        return True
    if data.__class__ is RawCounter:
        return False
    try:
        expires_at = expiry_of(data)
    except CorruptValueError:
        return False
    return expires_at is not None and expires_at <= now


def _native(client: Any, command: str, mkey: bytes, delta: int, *deadline: float) -> Any:
    """memcached's ``incr``/``decr`` (``deadline``: the call's, passed on): the new
    unsigned value, None for a missing key, or :data:`_NOT_A_NUMBER` when the value is
    not a number (the connection is still in step: the error line was read whole)."""
    try:
        return getattr(client, command)(mkey, delta, *deadline)
    except MemcacheClientError as exc:
        if b"non-numeric" in (exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else b""):
            return _NOT_A_NUMBER
        raise


def _count(layer: MemcachedLayer, key: str, delta: int, command: str) -> int | None:
    pool = layer._pool
    if pool.closed:
        pool.check_open()
    mkey = map_key(key, layer._prefix)
    node = pool.node_for(mkey) if pool.cluster else pool.first
    deadline = _monotonic() + pool.timeout  # pool.deadline(), one call shorter
    result = pool.call_once(node, _native, command, mkey, delta, deadline, keys=(mkey,))
    if result is None:
        return None
    if result is not _NOT_A_NUMBER:
        result = int(result) % _MOD  # memcached's unsigned number, read signed (incr_value)
        return result - _MOD if result >= _HALF else result
    return _count_over(layer, key, node, mkey, delta, command, deadline)


def _count_over(
    layer: MemcachedLayer,
    key: str,
    node: Node,
    mkey: bytes,
    delta: int,
    command: str,
    deadline: float,
) -> int | None:
    """The rest of an ``incr``/``decr`` whose first command found a value that is not a
    number: the compare-and-set rounds that make it a counter (see :func:`_convert`),
    memcached's command tried again when another client made it one meanwhile."""
    pool = layer._pool
    apply = incr_value if command == "incr" else decr_value
    for round_ in range(_ROUNDS):
        if round_:
            result = pool.call_once(node, _native, command, mkey, delta, deadline, keys=(mkey,))
            if result is None:
                return None
            if result is not _NOT_A_NUMBER:
                return incr_value(int(result), 0)  # memcached's unsigned number, read signed
        outcome = _convert(layer, node, mkey, key, delta, apply, deadline)
        if outcome is not _AGAIN:
            return cast("int | None", outcome)
    raise _contended(layer, key, command)


def _convert(
    layer: MemcachedLayer,
    node: Node,
    mkey: bytes,
    key: str,
    delta: int,
    apply: Callable[[int, int], int],
    deadline: float,
) -> int | _Again | None:
    """One compare-and-set round that makes the envelope of ``key`` a counter with the
    change applied, by ``deadline``: the new value, None when the key is absent (or
    expired for us), or :data:`_AGAIN` when another client changed it meanwhile."""
    pool = layer._pool
    found, cas = pool.call(node, "gets", mkey, deadline)
    if found is None:
        return None
    now = layer._clock()
    value, remaining = layer._decode(found, mkey, now)  # counts and raises a corrupt value
    if found.__class__ is RawCounter:  # a number (decoded above): made a counter
        return _AGAIN  # meanwhile, so memcached's command works now
    if value is MISSING:
        return None
    current = countable(value)
    if current is None:
        raise InvalidValueError(
            f"the value of {key!r} is not a counter (an int or a decimal str in "
            f"[-2**63, 2**63)): {type(value).__name__}"
        )
    new = apply(current, delta)
    # The counter lives as long as the envelope would have (to memcached's next second).
    exptime = 0 if remaining is None else layer._expiry(remaining)[1]
    if pool.call_once(node, "cas", mkey, raw(new), cas, exptime, deadline, keys=(mkey,)):
        return new
    return _AGAIN


def _touch(layer: MemcachedLayer, key: str, ttl: float | None) -> bool:
    pool = layer._pool
    pool.check_open()
    mkey = map_key(key, layer._prefix)
    expires_at, exptime = layer._expiry(ttl)
    node = pool.node_for(mkey)
    deadline = pool.deadline()
    for _ in range(_ROUNDS):
        found, cas = pool.call(node, "gets", mkey, deadline)
        if not found:
            return False  # absent, or a lease's stub
        if found.__class__ is RawCounter:
            layer._decode(found, mkey, 0.0)  # counts and raises bytes a get would not read
            return bool(pool.call(node, "touch", mkey, exptime, deadline, keys=(mkey,)))
        try:
            data, old = layer._envelope.restamp(found, expires_at, mkey)
        except CorruptValueError as exc:
            layer._corrupted(exc)
            raise
        if old is not None and old <= layer._clock():
            return False  # expired for us: absent
        stored = pool.call_once(node, "cas", mkey, data, cas, exptime, deadline, keys=(mkey,))
        if stored is None:
            return False  # deleted meanwhile
        if stored:
            return True
    raise _contended(layer, key, "touch")


def _contended(layer: MemcachedLayer, key: str, operation: str) -> ContendedError:
    return ContendedError(
        f"memcached layer {layer.name!r}: key {key!r} kept changing during {operation} "
        f"({_ROUNDS} compare-and-set rounds lost)",
        layer=layer.name,
    )
