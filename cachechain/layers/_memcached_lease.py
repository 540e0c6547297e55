"""Leases on memcached: one client at a time fills a missing key (issue 12, item 4).

:meth:`MemcachedLeaseOps.lease` asks memcached who fills a key that readers miss, as
in "Scaling Memcache at Facebook" (NSDI 2013, 3.2.1), with memcached's own commands:

- **Meta protocol** (memcached 1.6+, found once per node with ``mn``): ``mg <key> v c f
  N<ttl>``. On a miss memcached creates an empty *stub* item living ``ttl`` seconds and
  answers ``W`` (won) to this client alone; every other client then gets ``Z`` (a win
  was handed out) with the empty stub, until a write replaces it (the winner's store
  ends the lease) or it expires (a winner that died blocks nobody past ``ttl``). A live
  value comes back instead (the call doubles as a read). A value memcached still holds
  but whose envelope has expired (memcached keeps an entry to its next whole second, and
  longer when values are kept past their expiry) gets no ``W`` by itself: it is marked
  stale with ``md <key> I T<ttl> C<cas>`` (only if unchanged), after which memcached
  hands ``W`` to one client and ``Z`` to the others, and the stale copy stays readable.
- **Classic protocol** (a server that answers ``ERROR`` to ``mn``): ``add`` of an empty
  stub with the lease's TTL; the winner reads the stub's CAS (``gets``) as its token. A
  stub found means another client holds the lease; a value whose envelope expired is
  replaced by a stub with ``cas``, except a fail-safe copy (a stamped envelope
  memcached still keeps, see :mod:`._stamps`): a stub would destroy it, so there is no
  lease then (each process loads; the meta protocol has no such gap).
- **Store** (:meth:`Lease.store <cachechain.layers.Lease.store>`, the winner's
  value): ``cas`` with the token of the item the lease was won on (the stub, or the
  stale copy; the classic ``cas`` works on a meta stub), so a delete or a write of the
  key by any client since the win ends the lease and the value, loaded before that
  change, is not stored (leases against stale sets, the paper's 3.2.1). A lease that
  may have ended by its TTL (a slow load) stores with ``add`` instead; a server without
  CAS (``-C``, every token 0) leaves the store to the plain write.
- **Release** (the winner's load failed): ``md <key> C<cas>`` (meta) or ``cas <key> 0
  -1 0 <cas>`` (classic: stored already expired): only the stub this caller won, never
  a later lease or a value someone stored since. A stale copy is marked stale again
  instead (``md <key> I C<cas> T<ttl>``): it stays readable, goes to the next client,
  and gets back the time its envelope says it is kept, which the mark for the lease
  had cut to the lease's TTL (so a winner that dies blocks nobody past it; a fail-safe
  copy then lives on only in the processes' in-process layers). A copy that expired
  while the load ran (a load slower than the lease's TTL, then failed) is put back with
  ``add``, so only if nothing was stored since.

The stub is an empty value. The layer never stores one (every value is an envelope,
with a header), so every reader of the layer takes an empty value for a miss
(:meth:`MemcachedValues._decode <._memcached_values.MemcachedValues._decode>`; ``add``
replaces it, ``incr``/``touch`` find the key absent).

Why not pymemcache's ``raw_command`` or a meta-protocol client (``meta-memcache``):
the commands run on the layer's own pooled :class:`._wire.Connection` objects, through
:meth:`Pool.call_once <._pool.Pool.call_once>`, so they keep the call's one deadline,
replies bounded by :data:`._wire.MAX_LINE` and ``max_value_size``, the pool's accounting
and error mapping, and the namespaced memcached key. ``raw_command`` reads a reply up to
an end token, which cannot frame ``mg``'s value block, without a bound on what the
server sends, on pymemcache's own sockets and timeouts; a second client would open its
own connections outside the pool. What this takes of the wire is its reply stream
(``_command``, ``line``, ``block``, ``finish``), unchanged: ``_wire.py`` is not widened.
See ``docs/design.md``, "One loader across processes".

``mg`` is never retried on another connection (a retry after a lost ``W`` would see
``Z`` for its own stub and wait for nobody until the TTL): it goes through
``call_once``. ``md``/``cas`` with a CAS act on one item version only, so they are safe
to retry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

from pymemcache.exceptions import MemcacheUnknownError

from .._codecs import CorruptValueError, kept_until
from .._errors import InvalidValueError
from .._validate import check_seconds
from ._base import MISSING, Lease
from ._counters import COUNTER_FLAG_BYTES, RawCounter
from ._memcached_keys import map_key
from ._memcached_values import exptime
from ._wire import Connection, ValueTooLargeError, _raise_for

if TYPE_CHECKING:
    from ._memcached import MemcachedLayer
    from ._pool import Node

__all__ = ["MAX_LEASE_TTL", "MemcachedLeaseOps", "lease_exptime"]

#: The longest lease, seconds: memcached reads a larger exptime as a unix time.
MAX_LEASE_TTL: Final = 30 * 24 * 3600
#: Rounds of one lease call: a stale or expired value is marked (or replaced) and asked
#: again; each round is one or two round trips, all within the call's deadline.
_ROUNDS: Final = 3
#: What another client holding the lease looks like.
_HELD: Final = Lease()


class _Got(NamedTuple):
    """An ``mg`` reply: the flags returned and the item (``data`` None: no item)."""

    won: bool  # W: this client fills the key
    held: bool  # Z: a win was handed out already
    cas: bytes
    data: bytes | None


def lease_exptime(ttl: object) -> int:
    """memcached's exptime for a lease of ``ttl`` seconds: rounded up to whole seconds
    (memcached's clock ticks once a second, so a stub lives between ``ceil(ttl) - 1``
    and ``ceil(ttl)`` seconds). Raises :class:`~cachechain.InvalidValueError` for a
    ``ttl`` that is not a finite number of seconds in ``(0, 30 days]``."""
    seconds = check_seconds(ttl, "lease ttl", error=InvalidValueError)
    if seconds > MAX_LEASE_TTL:
        raise InvalidValueError(f"lease ttl must be at most {MAX_LEASE_TTL} s, got {ttl!r}")
    return math.ceil(seconds)


class MemcachedLeaseOps:
    """The lease of :class:`~cachechain.MemcachedLayer` (a base class of it; see the
    module docstring). The layer sets ``_meta_nodes``, the nodes known to speak the
    meta protocol (True) or not (False), by node id."""

    _meta_nodes: dict[str, bool]

    def lease(self, key: str, ttl: float) -> Lease | None:
        """Ask for the lease to fill ``key`` for ``ttl`` seconds (see
        :class:`~cachechain.layers.SupportsLease`): won, held by another client, or the
        key's live value (with its remaining TTL) found instead. None when no lease can
        be had now (the key kept changing between rounds). One deadline, the layer's
        ``timeout``, covers every round trip. Raises
        :class:`~cachechain.InvalidValueError` for a bad ``ttl``,
        :class:`~cachechain.ChainClosedError` after ``close``, and a layer error when
        memcached fails."""
        layer = cast("MemcachedLayer", self)
        exptime = lease_exptime(ttl)
        pool = layer._pool
        pool.check_open()
        mkey = map_key(key, layer._prefix)
        node = pool.node_for(mkey)
        deadline = pool.deadline()
        meta = self._meta_nodes.get(node.node_id)
        if meta is None:
            meta = self._meta_nodes[node.node_id] = bool(pool.call(node, _speaks_meta, deadline))
        if meta:
            return _meta_lease(layer, node, mkey, exptime, deadline)
        return _classic_lease(layer, node, mkey, exptime, deadline)


# -- the meta protocol -------------------------------------------------------------------


def _meta_lease(
    layer: MemcachedLayer, node: Node, mkey: bytes, exptime: int, deadline: float
) -> Lease | None:
    pool = layer._pool
    for _ in range(_ROUNDS):
        got: _Got = pool.call_once(node, _mg, mkey, exptime, deadline, keys=(mkey,))
        if got.won:
            return _won_meta(layer, node, mkey, got, exptime)
        if got.data is None:
            return None  # no item despite N: nothing to hold
        found = _live(layer, got.data, mkey)
        if found is not None:
            return found
        if got.held:
            return _HELD
        # Held by nobody, expired for us: mark it stale (if unchanged), so that the
        # next mg hands W to one client.
        pool.call(node, _md_command, mkey, b"I T%d C%s" % (exptime, got.cas), deadline)
    return None


def _won_meta(layer: MemcachedLayer, node: Node, mkey: bytes, got: _Got, exptime: int) -> Lease:
    """The lease ``got`` won. Its release deletes the stub; a stale copy (``data`` not
    empty) is marked stale again instead, so it stays readable and goes to the next
    client, and gets back the time it had to live (marking it for the lease gave it the
    lease's TTL, so that a winner that dies blocks nobody past it): a fail-safe copy
    outlives a failed load, for every process."""
    won = _Won(layer, node, mkey, got.cas, exptime)
    data = got.data
    if not data:
        return won.lease(lambda: _md(layer, node, mkey, b"C" + got.cas))

    def release() -> None:
        # Its TTL given back (it is read now: the load took a while); a copy that
        # expired meanwhile (the load outlived the lease's TTL) is put back, if absent.
        # Not a copy deleted meanwhile: gone before the lease could end, it was deleted.
        keep = _kept_exptime(data, layer._clock())
        flags = b"I C" + got.cas + (b"" if keep is None else b" T%d" % keep)
        if not _md(layer, node, mkey, flags) and keep is not None and won.may_have_ended():
            _restore(layer, node, mkey, data, keep)

    return won.lease(release)


class _Won:
    """A lease this client won on the item whose CAS token is ``cas`` (the stub, or a
    stale copy) for ``exptime`` seconds, from now (:func:`time.monotonic`: memcached's
    own clock ends it)."""

    __slots__ = ("cas", "exptime", "layer", "mkey", "node", "won_at")

    def __init__(
        self, layer: MemcachedLayer, node: Node, mkey: bytes, cas: bytes, exptime: int
    ) -> None:
        self.layer, self.node, self.mkey, self.cas = layer, node, mkey, cas
        self.exptime = exptime
        self.won_at = time.monotonic()

    def lease(self, release: Callable[[], object] | None) -> Lease:
        """The :class:`Lease` won, released by ``release``; it stores over the item
        unless the server gives no CAS (``memcached -C``: every token is 0) or a
        subclass of the layer overrides ``set`` (the plain write then goes through it)."""
        store = None if self.cas == b"0" or _set_overridden(self.layer) else self.store
        return Lease(won=True, release=release, store=store)

    def may_have_ended(self) -> bool:
        """Whether memcached may have ended the lease by its TTL: it does so between
        ``exptime - 1`` and ``exptime`` seconds after the win (its clock ticks once a
        second). Before that, a lease's item that is gone was deleted."""
        return time.monotonic() - self.won_at >= self.exptime - 1

    def store(self, value: Any, ttl: float | None) -> bool:
        """:meth:`Lease.store <cachechain.layers.Lease.store>`: ``cas`` with the lease's
        token, so the value replaces the lease's item only: a write since (``EXISTS``)
        or a delete (``NOT_FOUND`` before the lease could end) leaves it unstored. A
        lease that may have ended by its TTL (a load slower than it) stores with
        ``add`` instead, if the key is absent: a delete made during such a load is then
        not told from the lease's end. Sent once: a store whose reply is lost is
        deleted behind it if it turns out to have landed (the pool's fates)."""
        layer, node, mkey = self.layer, self.node, self.mkey
        pool = layer._pool
        pool.check_open()
        expires_at, exptime = layer._expiry(ttl)
        data = layer._encode(value, mkey, expires_at)
        keys = (mkey,)
        stored = pool.call_once(
            node, "cas", mkey, data, self.cas, exptime, pool.deadline(), keys=keys
        )
        if stored is None and self.may_have_ended():
            stored = pool.call_once(node, "add", mkey, data, exptime, pool.deadline(), keys=keys)
        return bool(stored)


def _set_overridden(layer: MemcachedLayer) -> bool:
    """Whether a subclass of ``MemcachedLayer`` overrides its ``set``: the class's
    ``set`` is not the one of the class that mixes these operations in (the layer)."""
    cls = type(layer)
    base = next(c for c in cls.__mro__ if MemcachedLeaseOps in c.__bases__)
    return cls.set is not base.set  # type: ignore[attr-defined]


def _stub_gone(value: Any, ttl: float | None) -> bool:
    """The store of a lease whose stub was gone or replaced before its token was read:
    a write or a delete came since, so nothing is stored."""
    return False


def _kept_exptime(data: bytes, now: float) -> int | None:
    """memcached's exptime that gives the entry ``data`` back the time its envelope
    says it is kept (``0``: for ever; past 30 days a unix time, as every write of the
    layer), or None when there is none to give back (a counter, bytes that are not an
    envelope, an entry past its time)."""
    if data.__class__ is RawCounter:
        return None
    try:
        expires_at, _ = kept_until(data)
    except CorruptValueError:
        return None
    if expires_at is None:
        return 0
    left = expires_at - now
    return exptime(left, expires_at) if left > 0 else None


def _restore(layer: MemcachedLayer, node: Node, mkey: bytes, data: bytes, keep: int) -> None:
    """Put a stale copy that expired during a failed load back, only if the key is
    absent (``add``: a value or a lease stored since wins)."""
    pool = layer._pool
    pool.call_once(node, "add", mkey, data, keep, pool.deadline(), keys=(mkey,))


def _live(layer: MemcachedLayer, data: bytes, mkey: bytes) -> Lease | None:
    """A lease carrying the live value ``data`` holds, or None when it holds none for
    this layer (a stub, an expired envelope, corrupt bytes: counted, as any read)."""
    if not data:
        return None
    try:
        value, remaining = layer._decode(data, mkey, layer._clock())
    except CorruptValueError:
        return None
    return None if value is MISSING else Lease(value=value, ttl=remaining)


def _md(layer: MemcachedLayer, node: Node, mkey: bytes, flags: bytes) -> bool:
    """Release a won lease with ``md <key> <flags>`` (their ``C`` names the version this
    caller won: a later lease or value is never touched); return whether memcached
    still held that version."""
    pool = layer._pool
    pool.check_open()
    return bool(pool.call(node, _md_command, mkey, flags, pool.deadline()))


def _speaks_meta(conn: Connection, deadline: float) -> bool:
    """``mn``: True when the server answers ``MN`` (meta protocol), False for ``ERROR``
    (an older server: the stream stays in step)."""
    reply = conn._command(b"mn\r\n", deadline)
    line = reply.line()
    reply.finish()
    if line == b"MN":
        return True
    if line == b"ERROR":
        return False
    _raise_for(line, b"mn")


def _mg(conn: Connection, key: bytes, exptime: int, deadline: float) -> _Got:
    """``mg <key> v c f N<exptime>``: the reply's flags and the item's bytes (a
    :class:`RawCounter` for a counter; None for ``EN``). The value block is read only
    once its size is checked against ``conn.max_value``."""
    reply = conn._command(b"mg %s v c f N%d\r\n" % (key, exptime), deadline)
    line = reply.line()
    if line == b"EN":
        reply.finish()
        return _Got(False, False, b"", None)
    parts = line.split(b" ")
    if parts[0] != b"VA" or len(parts) < 2:
        _raise_for(line, b"mg")
    size, cas, flags, marks = _parse_va(parts, line, conn.max_value)
    data = reply.block(size)
    reply.finish()
    item = RawCounter(data) if flags == COUNTER_FLAG_BYTES else bytes(data)
    return _Got(b"W" in marks, b"Z" in marks, cas, item)


def _parse_va(
    parts: list[bytes], line: bytes, max_value: int
) -> tuple[int, bytes, bytes, set[bytes]]:
    """``(size, cas, client flags, W/Z/X marks)`` of a ``VA`` line split in ``parts``;
    raises for a malformed line or a size above ``max_value``."""
    if not parts[1].isdigit() or len(parts[1]) > 10:
        raise MemcacheUnknownError(f"bad value size in {line[:80]!r}")
    size = int(parts[1])
    if size > max_value:
        raise ValueTooLargeError(f"value size out of range (max {max_value}) in {line[:80]!r}")
    cas = flags = b""
    marks: set[bytes] = set()
    for token in parts[2:]:
        head, arg = token[:1], token[1:]
        if head in (b"W", b"Z", b"X") and not arg:
            marks.add(head)
        elif head == b"c" and arg.isdigit():
            cas = arg
        elif head == b"f" and arg.isdigit():
            flags = arg
        else:
            raise MemcacheUnknownError(f"unexpected flag in reply to mg: {line[:80]!r}")
    if not cas:
        raise MemcacheUnknownError(f"no cas in reply to mg: {line[:80]!r}")
    return size, cas, flags, marks


def _md_command(conn: Connection, key: bytes, flags: bytes, deadline: float) -> bool:
    """``md <key> <flags>``: True when it acted (``HD``), False when the key is absent
    (``NF``) or not the version named by its ``C`` flag (``EX``)."""
    reply = conn._command(b"md %s %s\r\n" % (key, flags), deadline)
    line = reply.line()
    reply.finish()
    if line == b"HD":
        return True
    if line in (b"NF", b"EX"):
        return False
    _raise_for(line, b"md")


# -- the classic protocol ----------------------------------------------------------------


def _classic_lease(
    layer: MemcachedLayer, node: Node, mkey: bytes, exptime: int, deadline: float
) -> Lease | None:
    pool = layer._pool
    keys = (mkey,)
    for _ in range(_ROUNDS):
        if pool.call_once(node, "add", mkey, b"", exptime, deadline, keys=keys):
            return _won_classic(layer, node, mkey, exptime, deadline)
        data, cas = pool.call(node, "gets", mkey, deadline)
        if data is None:
            continue  # gone since: add again
        if not data:
            return _HELD
        found = _live(layer, data, mkey)
        if found is not None:
            return found
        if _fail_safe_copy(data, layer._clock()):
            return None  # a stub would destroy it: no lease (the meta protocol keeps it)
        # Expired for us: replace it with a stub, if unchanged.
        if pool.call_once(node, "cas", mkey, b"", cas, exptime, deadline, keys=keys):
            return _won_classic(layer, node, mkey, exptime, deadline)
    return None


def _fail_safe_copy(data: bytes, now: float) -> bool:
    """Whether ``data`` is a stamped envelope memcached should still keep: a value past
    its logical expiry kept for ``get_or_load``'s fail-safe."""
    if data.__class__ is RawCounter:
        return False
    try:
        expires_at, stamped = kept_until(data)
    except CorruptValueError:
        return False
    return stamped and (expires_at is None or expires_at > now)


def _won_classic(
    layer: MemcachedLayer, node: Node, mkey: bytes, exptime: int, deadline: float
) -> Lease:
    """The lease on the stub this caller just stored, its CAS read as the token (a
    value stored since ended the lease: it is returned instead)."""
    data, cas = layer._pool.call(node, "gets", mkey, deadline)
    if data:  # replaced: nothing to release, nothing to store over
        return _live(layer, data, mkey) or Lease(won=True, store=_stub_gone)
    if data is None or cas is None:
        return Lease(won=True, store=_stub_gone)  # gone already: deleted since
    won = _Won(layer, node, mkey, cas, exptime)
    return won.lease(lambda: _cas_expire(layer, node, mkey, cas))


def _cas_expire(layer: MemcachedLayer, node: Node, mkey: bytes, cas: bytes) -> None:
    """Release a classic lease: store its stub already expired, if it is still the
    version this caller won."""
    pool = layer._pool
    pool.check_open()
    pool.call_once(node, "cas", mkey, b"", cas, -1, pool.deadline(), keys=(mkey,))
