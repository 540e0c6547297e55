"""MemcachedLayer: a remote layer over one or more memcached servers (pymemcache).

Design, and why:

- Connections (:mod:`._pool`): plain ``pymemcache.client.base.Client`` objects, with no
  serde (values are bytes), ``default_noreply=False`` (a write returns only once
  memcached answered), ``no_delay=True`` and both timeouts set (pymemcache's defaults
  are "forever"). Each node has its own thread-safe pool of at most ``pool_size``
  clients, created lazily; a caller waits at most ``pool_timeout`` seconds for a free
  one, then gets :class:`~cachechain.PoolExhaustedError`. pymemcache's
  ``PooledClient`` raises ``RuntimeError`` instead of waiting, and ``HashClient`` keeps
  its dead-server bookkeeping without a lock: neither is used. A client whose call
  failed is closed and dropped, never reused.
- Several servers: rendezvous (highest random weight) hashing of the memcached key
  with BLAKE2b, stable across processes, so losing a node moves only that node's keys.
  In a cluster a node that fails with a connection error or a timeout is marked down
  for ``dead_timeout`` seconds: calls for its keys raise :class:`NodeDownError` without
  any I/O and batch reads miss its keys. After ``dead_timeout`` one call probes it
  again. With a single node there is no down-marking: the circuit breaker that the
  chain puts around a remote layer does that job.
- Keys: see :func:`memcached_key` (:mod:`._memcached_keys`). A key that memcached's
  text protocol could misread (spaces, CR/LF, control characters, non-ASCII, too long)
  is never sent raw.
- Values: a :mod:`cachechain._codecs` envelope (``JsonCodec`` by default) that carries
  the entry's wall-clock expiry, so sub-second TTLs work and the remaining TTL can be
  read back. A codec that signs binds its payload to the envelope's header and the
  memcached key (:class:`~cachechain._codecs.Envelope`, detected once, here): a signed
  entry whose expiry was edited, or copied under another key, reads as corrupt.
  Memcached gets the TTL rounded up to whole seconds. Counters (a key once
  ``incr``/``decr`` made it one) are memcached's own decimal numbers, flagged
  (:mod:`._counters`), with no envelope: their remaining TTL reads as unknown (0.0).
- Leases (:mod:`._memcached_lease`): ``mg <key> N<ttl>`` (``add`` of an empty stub on a
  server without the meta protocol) hands the filling of a missing key to one client;
  the stub reads as a miss everywhere.
- Atomic operations (:mod:`._memcached_atomic`): ``add``, ``incr``/``decr`` and
  ``touch`` with memcached's commands, and a compare-and-set loop where the envelope
  needs it (the first ``incr`` of a value ``set`` stored, a ``touch`` of an envelope).
- The wire (:mod:`._wire`): the layer speaks memcached's text protocol itself, on
  its own pooled connections (pymemcache's exception types are kept). A call has ONE
  deadline, ``timeout`` seconds from its start, for connecting, sending and every read
  (a compare-and-set loop included): a server that answers slowly, a byte at a time,
  cannot hold it longer; the call raises :class:`~cachechain.LayerTimeoutError` and its
  connection is dropped. A reply is read on the layer's word, never the server's,
  and the connection dropped before anything larger is allocated: a value announced
  larger than ``max_value_size`` (a value this layer never stores) is a corrupt read,
  :class:`~cachechain.CorruptValueError` (counted in ``stats``; says nothing of the
  server's health), a reply line over 2 KiB a :class:`~cachechain.LayerError`. No
  ``select()``: past 1,024 open descriptors it fails.
- Fork safety: a forked child (gunicorn ``--preload``) drops the connections and locks
  it inherited and opens its own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import _fork
from .._codecs import Codec, Envelope, JsonCodec
from .._errors import (
    CacheError,
    InvalidKeyError,
    InvalidValueError,
    LayerError,
    LayerTimeoutError,
    LayerUnavailableError,
    PoolExhaustedError,
)
from .._validate import check_callable, check_count, check_seconds
from . import _wire
from ._base import MISSING, BaseLayer
from ._memcached_atomic import MemcachedAtomicOps
from ._memcached_keys import (
    HASHED_KEY_MARKER,
    MAX_KEY_LENGTH,
    MAX_PREFIX_LENGTH,
    check_prefix,
    map_key,
    map_many,
    memcached_key,
    raw_key,
)
from ._memcached_lease import MemcachedLeaseOps
from ._memcached_values import MemcachedValues, exptime
from ._pool import Node, NodeDownError, Pool
from ._servers import parse_servers

log = logging.getLogger("cachechain.memcached")
_monotonic = time.monotonic

__all__ = [
    "HASHED_KEY_MARKER",
    "MAX_KEY_LENGTH",
    "MAX_PREFIX_LENGTH",
    "MemcachedLayer",
    "MemcachedLayerStats",
    "NodeDownError",
    "memcached_key",
]


@dataclass(frozen=True)
class MemcachedLayerStats:
    """A point-in-time view of a :class:`MemcachedLayer`.

    ``corrupt_values`` counts reads of stored bytes that could not be decoded, or that
    memcached announced larger than ``max_value_size`` (since the layer was created);
    ``nodes`` is the number of configured servers and ``nodes_down`` how many are
    marked down (always 0 with one server);
    ``connections_open`` counts pooled clients with an open socket (a connection whose
    write timed out is among them until memcached answers it); ``pool_exhausted``
    counts calls refused because no client became free within ``pool_timeout``;
    ``keys_in_doubt`` is how many keys are held now because a write of them timed out
    after it was sent and memcached has not answered it yet (their next writes wait,
    see ``docs/design.md``, "Writes in doubt").
    """

    corrupt_values: int
    nodes: int
    nodes_down: int
    connections_open: int
    pool_exhausted: int
    keys_in_doubt: int = 0


class MemcachedLayer(MemcachedLeaseOps, MemcachedAtomicOps, MemcachedValues, BaseLayer):
    """A remote cache layer on memcached; thread-safe and fork-safe.

    ``servers``: ``"HOST:PORT"`` strings (``"[::1]:11211"`` for IPv6; the port defaults to
    11211), as a sequence or one comma-separated string. ``key_prefix`` namespaces every key
    (see :func:`memcached_key`). ``codec`` turns values into bytes
    (:class:`~cachechain.JsonCodec` by default). ``default_ttl`` applies to writes without a
    TTL (``None``: no expiry); ``max_ttl`` caps every TTL. ``timeout`` bounds a whole call
    (connecting, at most ``connect_timeout``; sending; reading the whole reply; every
    compare-and-set round), per server for a batch over several. ``pool_size`` connections
    at most per server; a caller waits at most ``pool_timeout`` for one, before its
    ``timeout`` starts. A server that fails in a cluster is skipped for ``dead_timeout``.
    Encoded values (envelope included) over ``max_value_size`` bytes are refused before any
    I/O; a reply announcing one is a corrupt reply. All durations are seconds. ``clock``
    gives unix wall-clock seconds (entries' expiry, shared between processes); ``monotonic``
    times the down-marking.

    Raises :class:`~cachechain.ConfigError`, naming the field, for a bad setting.
    Operations raise :class:`~cachechain.InvalidKeyError` for a non-``str`` key,
    :class:`~cachechain.InvalidValueError` for a value the codec refuses or that
    is too large, :class:`~cachechain.LayerTimeoutError`,
    :class:`~cachechain.LayerUnavailableError` (including
    :class:`NodeDownError` and :class:`~cachechain.PoolExhaustedError`) or
    :class:`~cachechain.LayerError` when memcached fails, and
    :class:`~cachechain.ChainClosedError` after :meth:`close`.

    It supports the atomic operations (``add``, ``incr``, ``decr``, ``touch``: see
    :class:`~cachechain.layers._memcached_atomic.MemcachedAtomicOps`) that a chain runs
    on its shared layer, and leases (``lease``: one filler of a missing key across
    processes, :mod:`~cachechain.layers._memcached_lease`).
    """

    local = False

    def __init__(
        self,
        name: str = "L2",
        servers: str | Sequence[str] = "127.0.0.1:11211",
        *,
        key_prefix: str = "",
        codec: Codec | None = None,
        default_ttl: float | None = 300.0,
        max_ttl: float | None = None,
        connect_timeout: float = 0.25,
        timeout: float = 0.25,
        pool_size: int = 8,
        pool_timeout: float = 0.05,
        dead_timeout: float = 5.0,
        max_value_size: int = 1_000_000,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, default_ttl=default_ttl, max_ttl=max_ttl)
        nodes = tuple(Node(*spec) for spec in parse_servers(servers))
        self._prefix = check_prefix(key_prefix)
        self._raw_key_limit = MAX_KEY_LENGTH - len(self._prefix)
        self._envelope = Envelope(JsonCodec() if codec is None else codec)
        self._codec = self._envelope.codec
        connect_timeout = check_seconds(connect_timeout, "connect_timeout")
        timeout = check_seconds(timeout, "timeout")
        pool_size = check_count(pool_size, "pool_size")
        pool_timeout = check_seconds(pool_timeout, "pool_timeout", zero_ok=True)
        dead_timeout = check_seconds(dead_timeout, "dead_timeout")
        self._max_value_size = check_count(max_value_size, "max_value_size")
        self._clock = check_callable(clock, "clock")
        #: The nodes' connections, their down-marking and how a call runs.
        self._pool = Pool(
            self.name,
            nodes,
            connect_timeout=connect_timeout,
            timeout=timeout,
            pool_size=pool_size,
            pool_timeout=pool_timeout,
            dead_timeout=dead_timeout,
            max_value_size=self._max_value_size,
            monotonic=check_callable(monotonic, "monotonic"),
        )
        self._stats_lock = threading.Lock()
        self._corrupt = 0
        self._meta_nodes: dict[str, bool] = {}  # nodes that speak the meta protocol (leases)
        _fork.track(self)

    # -- read-only configuration -------------------------------------------------

    @property
    def timeout(self) -> float:
        """Seconds a whole call may take: connect, send, reply (per server in a batch)."""
        return self._pool.timeout

    @property
    def connect_timeout(self) -> float:
        """Seconds a connection attempt may take (within the call's ``timeout``)."""
        return self._pool.connect_timeout

    @property
    def pool_timeout(self) -> float:
        """Seconds a call may wait for a pooled connection before its ``timeout``
        starts."""
        return self._pool.pool_timeout

    @property
    def codec(self) -> Codec:
        """The codec that encodes this layer's values."""
        return self._codec

    @property
    def key_prefix(self) -> str:
        """The prefix of every memcached key of this layer."""
        return self._prefix

    @property
    def servers(self) -> tuple[str, ...]:
        """The configured servers, normalized to ``"HOST:PORT"`` / ``"[IPv6]:PORT"``."""
        return tuple(node.node_id for node in self._pool.nodes)

    # -- keys and nodes ------------------------------------------------------------

    def _group(self, keys: Iterable[str], inner: str = "") -> dict[Node, dict[bytes, str]]:
        """Map each ``inner + key``, and group the memcached keys by node (duplicates
        merged), each mapped back to its key."""
        prefix = self._prefix
        if not self._pool.cluster:  # one node: map_many, a batch in one loop
            return {self._pool.first: map_many(keys, prefix, inner)}
        node_for = self._pool.node_for
        groups: dict[Node, dict[bytes, str]] = {}
        for key in keys:
            mkey = map_key(inner + key if isinstance(key, str) else key, prefix)
            node = node_for(mkey)
            group = groups.get(node)
            if group is None:
                groups[node] = {mkey: key}
            else:
                group[mkey] = key
        return groups

    # -- reads ---------------------------------------------------------------------

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """Return ``(value, remaining_seconds)``, ``(value, None)`` for an entry that
        never expires, ``(value, 0.0)`` for a counter (its remaining TTL is unknown), or
        ``(MISSING, None)`` on a miss.

        Raises :class:`~cachechain.CorruptValueError` (counted in
        :meth:`stats`) for stored bytes that cannot be decoded, and :class:`NodeDownError`
        for a key whose node is marked down.
        """
        pool = self._pool
        if pool.closed:
            pool.check_open()
        prefix = self._prefix
        if key.__class__ is str and len(key) <= self._raw_key_limit and raw_key(key):
            mkey = (prefix + key).encode("ascii")  # map_key, one call shorter
        else:
            mkey = map_key(key, prefix)
        if pool.cluster:  # the deadline: pool.deadline(), one call shorter
            data = pool.call(pool.node_for(mkey), _wire.get, mkey, _monotonic() + pool.timeout)
        else:  # what call does for one node, one call shorter: every L2 read's path
            data = pool.attempt(pool.first, _wire.get, (mkey, _monotonic() + pool.timeout), True)
        if data is None:
            return MISSING, None
        return self._decode(data, mkey, self._clock())

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Return the live entries among ``keys`` with their remaining TTLs (seconds).

        One round trip per node. Corrupt entries are left out and counted. In a cluster
        the keys of a node marked down (or that fails during this call) are misses,
        unless no node answered at all: then the first failure is raised.
        """
        return self.get_many_under("", keys)

    def get_many_under(
        self, inner: str, keys: Sequence[str]
    ) -> dict[str, tuple[Any, float | None]]:
        """:meth:`get_many_with_ttl` of ``inner + key`` for each of ``keys``, by key
        (``inner``: a prefix such as a namespace generation, added as each key is
        mapped, so a wrapper that prefixes keys makes no batch of its own). Raises as
        :meth:`get_many_with_ttl` does."""
        self._pool.check_open()
        if isinstance(keys, str):
            raise InvalidKeyError("keys must be a sequence of str, not a str")
        groups = self._group(keys, inner)
        found: dict[str, tuple[Any, float | None]] = {}
        first_error: CacheError | None = None
        answered = False
        for node, group in groups.items():
            try:
                raw = self._pool.call(node, "get_many", list(group), self._pool.deadline())
            except NodeDownError:
                continue
            except (LayerTimeoutError, LayerUnavailableError) as exc:
                if not self._pool.cluster:
                    raise
                first_error = first_error or exc
                continue
            answered = True
            self._decode_many(raw, group, found, self._clock())
        if first_error is not None and not answered:
            raise first_error
        return found

    # -- writes --------------------------------------------------------------------

    def _expiry(self, ttl: float | None) -> tuple[float | None, int]:
        """Resolve ``ttl``: return the envelope's ``expires_at`` and memcached's exptime."""
        cap = self._max_ttl
        if ttl.__class__ is not float or not 0.0 < ttl < math.inf or (cap and ttl > cap):
            ttl = self.effective_ttl(ttl)  # the usual float needs none of its steps
        if ttl is None:
            return None, 0
        if not math.isfinite(ttl):
            raise InvalidValueError(f"ttl must be a finite number of seconds, got {ttl!r}")
        expires_at = self._clock() + ttl
        return expires_at, exptime(ttl, expires_at)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (``None``: ``default_ttl``) and wait for
        memcached's reply.

        Raises :class:`~cachechain.InvalidValueError` for a value the codec
        refuses or whose encoding exceeds ``max_value_size`` (and when the server
        answers "object too large"); the key's older value, if any, is deleted first,
        so that a refused write never leaves a stale value behind.
        """
        self._pool.check_open()
        mkey = map_key(key, self._prefix)
        expires_at, exptime = self._expiry(ttl)
        node = self._pool.node_for(mkey)
        deadline = self._pool.deadline()
        try:
            data = self._encode(value, mkey, expires_at)
            stored = self._pool.call(node, "set", mkey, data, exptime, deadline, keys=(mkey,))
        except InvalidValueError:
            self._forget(node, [mkey], deadline)
            raise
        if not stored:
            raise LayerError(f"memcached did not store key {key!r}", layer=self.name)

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store every item (one round trip per node); return the keys whose values were
        invalid for this layer (not encodable, too large): their older values are
        deleted, so no stale value outlives a refused write.

        Nodes are written in turn; if one fails (or is marked down) the others are still
        written and the first failure is raised at the end.
        """
        self._pool.check_open()
        expires_at, exptime = self._expiry(ttl)
        groups = self._group(items)
        rejected: list[str] = []
        first_error: CacheError | None = None
        for node, group in groups.items():
            batch: dict[bytes, bytes] = {}
            for mkey, key in group.items():
                try:
                    batch[mkey] = self._encode(items[key], mkey, expires_at)
                except InvalidValueError:
                    rejected.append(key)
            if not batch:
                continue
            try:
                failed = self._store_batch(node, batch, exptime, group, rejected)
            except (LayerError, PoolExhaustedError) as exc:
                first_error = first_error or exc
                continue
            if failed and first_error is None:
                first_error = LayerError(
                    f"memcached {node.node_id} did not store {len(failed)} keys",
                    layer=self.name,
                )
        if rejected:  # their older values must not outlive the refused writes
            for node, mkeys in self._group(rejected).items():
                self._forget(node, list(mkeys), self._pool.deadline())
        if first_error is not None:
            raise first_error
        return rejected

    def _forget(self, node: Node, mkeys: list[bytes], deadline: float) -> None:
        """Delete ``mkeys`` (refused new values) by ``deadline``; best effort: a failure
        here is the one the write would have hit anyway, so it is not raised."""
        try:
            self._pool.call(node, "delete_many", mkeys, deadline, keys=mkeys)
        except (LayerError, PoolExhaustedError):
            log.debug("memcached layer %r: could not delete refused keys", self.name)

    def _store_batch(
        self,
        node: Node,
        batch: dict[bytes, bytes],
        exptime: int,
        group: dict[bytes, str],
        rejected: list[str],
    ) -> list[bytes]:
        """Store one node's batch within one deadline; return memcached keys not stored.

        If memcached refuses an item as too large, the batch's connection is gone and
        its later items unconfirmed: store them one by one, rejecting the large ones.
        """
        deadline = self._pool.deadline()
        try:
            failed: list[bytes] = self._pool.call(
                node, "set_many", batch, exptime, deadline, keys=batch
            )
            return failed
        except InvalidValueError:
            pass
        failed = []
        for mkey, data in batch.items():
            try:
                if not self._pool.call(node, "set", mkey, data, exptime, deadline, keys=(mkey,)):
                    failed.append(mkey)
            except InvalidValueError:
                rejected.append(group[mkey])
        return failed

    def delete(self, key: str) -> None:
        """Remove ``key`` and wait for memcached's reply; an absent key is fine."""
        self._pool.check_open()
        mkey = map_key(key, self._prefix)
        pool = self._pool
        pool.call(pool.node_for(mkey), "delete", mkey, pool.deadline(), keys=(mkey,))

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key in ``keys``: one pipelined round trip per node.

        If one node fails (or is marked down) the others are still handled and the
        first failure is raised at the end.
        """
        self._pool.check_open()
        if isinstance(keys, str):
            raise InvalidKeyError("keys must be an iterable of str, not a str")
        first_error: CacheError | None = None
        for node, group in self._group(keys).items():
            mkeys = list(group)
            try:
                self._pool.call(node, "delete_many", mkeys, self._pool.deadline(), keys=mkeys)
            except (LayerError, PoolExhaustedError) as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def clear(self) -> None:
        """Empty every node with memcached's ``flush_all``: every key on those servers,
        other applications' included (a chain's ``clear()`` moves its namespace
        generation instead; ``clear(flush=True)`` calls this). Every node is tried;
        the first failure is raised at the end."""
        self._pool.check_open()
        first_error: CacheError | None = None
        for node in self._pool.nodes:
            try:
                self._pool.call(node, "flush_all", self._pool.deadline())
            except (LayerError, PoolExhaustedError) as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    # -- lifecycle -----------------------------------------------------------------

    def stats(self) -> MemcachedLayerStats:
        """Return the layer's counters and connection state (see
        :class:`MemcachedLayerStats`)."""
        pool = self._pool
        open_connections, down = pool.counts()
        with self._stats_lock:
            corrupt = self._corrupt
        return MemcachedLayerStats(
            corrupt_values=corrupt + pool.oversized,
            nodes=len(pool.nodes),
            nodes_down=down,
            connections_open=open_connections,
            pool_exhausted=pool.exhausted,
            keys_in_doubt=len(pool.fates.held),
        )

    def close(self) -> None:
        """Close every idle connection; busy ones close when their call ends. Later
        calls raise :class:`~cachechain.ChainClosedError`. Idempotent."""
        self._pool.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._pool.closed

    def _after_fork(self) -> None:
        """In a forked child: new locks, no inherited connections, no down-marks."""
        self._stats_lock = threading.Lock()
        self._pool.reset_after_fork()

    def __repr__(self) -> str:
        return f"<MemcachedLayer {self.name!r} servers={list(self.servers)!r}>"
