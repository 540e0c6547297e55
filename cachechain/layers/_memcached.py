"""MemcachedLayer: a remote layer over one or more memcached servers (pymemcache).

Design, and why:

- Connections: plain ``pymemcache.client.base.Client`` objects, with no serde (values
  are bytes), ``default_noreply=False`` (a write returns only once memcached answered),
  ``no_delay=True`` and both timeouts set (pymemcache's defaults are "forever"). Each
  node has its own thread-safe pool of at most ``pool_size`` clients, created lazily;
  a caller waits at most ``pool_timeout`` seconds for a free one, then gets
  :class:`~cachechain.errors.PoolExhaustedError`. pymemcache's ``PooledClient`` raises
  ``RuntimeError`` instead of waiting, and ``HashClient`` keeps its dead-server
  bookkeeping without a lock: neither is used. A client whose call failed is closed and
  dropped, never reused.
- Several servers: rendezvous (highest random weight) hashing of the memcached key
  with BLAKE2b, stable across processes, so losing a node moves only that node's keys.
  In a cluster a node that fails with a connection error or a timeout is marked down
  for ``dead_timeout`` seconds: calls for its keys raise :class:`NodeDownError` without
  any I/O and batch reads miss its keys. After ``dead_timeout`` one call probes it
  again. With a single node there is no down-marking: the circuit breaker that the
  chain puts around a remote layer does that job.
- Keys: see :func:`memcached_key`. A key that memcached's text protocol could misread
  (spaces, CR/LF, control characters, non-ASCII, too long) is never sent raw.
- Values: a :mod:`cachechain.codecs` envelope (``JsonCodec`` by default) that carries
  the entry's wall-clock expiry, so sub-second TTLs work and the remaining TTL can be
  read back. Memcached gets the TTL rounded up to whole seconds.
- Fork safety: a forked child (gunicorn ``--preload``) drops the connections and locks
  it inherited and opens its own.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)

from .. import _fork
from .._codecs import Codec, CorruptValueError, JsonCodec, pack, unpack
from .._errors import (
    CacheError,
    ChainClosedError,
    ConfigError,
    InvalidKeyError,
    InvalidValueError,
    LayerError,
    LayerTimeoutError,
    LayerUnavailableError,
    PoolExhaustedError,
)
from . import _wire
from ._base import MISSING, BaseLayer

log = logging.getLogger("cachechain.memcached")

__all__ = [
    "HASHED_KEY_MARKER",
    "MAX_KEY_LENGTH",
    "MAX_PREFIX_LENGTH",
    "MemcachedLayer",
    "MemcachedLayerStats",
    "NodeDownError",
    "memcached_key",
]

#: The longest key memcached accepts, in bytes.
MAX_KEY_LENGTH = 250
#: The longest ``key_prefix`` accepted, in bytes.
MAX_PREFIX_LENGTH = 64
#: Marks a hashed key: follows the prefix in every hashed key, never starts a raw one.
HASHED_KEY_MARKER = "~"

#: memcached reads an expiry above 30 days (in seconds) as an absolute unix time.
_RELATIVE_EXPIRY_LIMIT = 30 * 24 * 3600
#: The largest absolute expiry memcached parses (a signed 32-bit time).
_MAX_ABSOLUTE_EXPIRY = 2**31 - 1

#: A key sent raw: printable ASCII without space, not starting with the marker.
_RAW_KEY = re.compile(r"[!-}][!-~]*")
_PREFIX = re.compile(r"(?:[!-}][!-~]*)?")

_T = TypeVar("_T")


class NodeDownError(LayerUnavailableError):
    """The key's memcached node was marked down after a recent connection failure or
    timeout; the call was refused without any I/O.

    Raised only when the layer has several nodes. It does not trip the circuit breaker:
    the failure that marked the node down was counted already.
    """

    error_type = "connection"
    trips_breaker = False


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise ConfigError(f"key_prefix must be a str, got {type(prefix).__name__}")
    if len(prefix) > MAX_PREFIX_LENGTH or not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            "key_prefix must be at most 64 printable ASCII characters without spaces, "
            f"not starting with {HASHED_KEY_MARKER!r}; got {prefix!r}"
        )
    return prefix


def _map_key(key: str, prefix: str) -> bytes:
    """The mapping of :func:`memcached_key`, for an already validated ``prefix``."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a str, got {type(key).__name__}")
    if len(key) + len(prefix) <= MAX_KEY_LENGTH and _RAW_KEY.fullmatch(key):
        return (prefix + key).encode("ascii")
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    hashed = base64.urlsafe_b64encode(digest).rstrip(b"=")
    return (prefix + HASHED_KEY_MARKER).encode("ascii") + hashed


def memcached_key(key: str, prefix: str = "") -> bytes:
    """Return the memcached key under which ``key`` is stored, as bytes.

    A key of printable ASCII (0x21-0x7e) that does not start with ``~`` and fits in
    250 bytes with ``prefix`` is sent as ``prefix + key``. Every other ``str`` (empty,
    with spaces, CR/LF, tabs, NUL or other control characters, non-ASCII, too long, or
    starting with ``~``) is sent as ``prefix + "~" + urlsafe_b64(sha256(utf8(key)))``
    without padding (43 characters). The mapping is the same in every process, distinct
    keys never share a memcached key (barring a SHA-256 collision), and the result is
    always safe for the text protocol.

    Raises :class:`~cachechain.errors.InvalidKeyError` when ``key`` is not a ``str``,
    and :class:`~cachechain.errors.ConfigError` for an invalid ``prefix`` (at most 64
    printable ASCII characters, not starting with ``~``).
    """
    return _map_key(key, _check_prefix(prefix))


def _parse_server(spec: object) -> tuple[str, str, int]:
    """Parse ``"HOST:PORT"`` (``"[IPv6]:PORT"``; the port defaults to 11211).

    Returns ``(node_id, host, port)``; raises ConfigError naming ``servers``.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"servers entries must be 'HOST:PORT' strings, got {spec!r}")
    text = spec.strip()
    port_text = "11211"
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[1:close], text[close + 1 :]
        if close < 0 or not host or (rest and not rest.startswith(":")):
            raise ConfigError(f"servers entry {spec!r} is not '[IPv6]:PORT'")
        if rest:
            port_text = rest[1:]
    elif text.count(":") > 1:
        raise ConfigError(f"servers entry {spec!r}: write an IPv6 address as '[ADDR]:PORT'")
    else:
        host, sep, port_part = text.partition(":")
        if sep:
            port_text = port_part
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ConfigError(f"servers entry {spec!r} has no valid host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"servers entry {spec!r} has an invalid port {port_text!r}")
    port = int(port_text)
    node_id = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return node_id, host, port


def _check_seconds(value: object, field: str, *, allow_zero: bool = False) -> float:
    """Validate a duration in seconds: a finite number > 0 (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field} must be a number of seconds, got {value!r}")
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field} must be a finite number of seconds {bound}, got {value!r}")
    return float(value)


def _check_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field} must be an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class MemcachedLayerStats:
    """A point-in-time view of a :class:`MemcachedLayer`.

    ``corrupt_values`` counts reads of stored bytes that could not be decoded (since
    the layer was created); ``nodes`` is the number of configured servers and
    ``nodes_down`` how many are marked down (always 0 with one server);
    ``connections_open`` counts pooled clients with an open socket; ``pool_exhausted``
    counts calls refused because no client became free within ``pool_timeout``.
    """

    corrupt_values: int
    nodes: int
    nodes_down: int
    connections_open: int
    pool_exhausted: int


class _Node:
    """One memcached server: its pool of clients and its down-marking."""

    __slots__ = (
        "clients",
        "cond",
        "down_until",
        "host",
        "idle",
        "node_id",
        "port",
        "waiting",
        "weight",
    )

    def __init__(self, node_id: str, host: str, port: int) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        #: Salt of this node's rendezvous score.
        self.weight = node_id.encode("utf-8") + b"\x00"
        self.cond = threading.Condition(threading.Lock())
        #: Every client this node created and has not discarded (idle or in use).
        self.clients: set[Any] = set()
        #: Idle clients. ``pop``/``append`` on a list are atomic, so the common case
        #: (a client is free) takes no lock; ``cond`` serves only callers that wait.
        self.idle: list[Any] = []
        #: Callers waiting in ``cond`` for a client (changed under its lock).
        self.waiting = 0
        #: Monotonic time until which the node is down; None while it is up.
        self.down_until: float | None = None

    def take_idle(self) -> list[Any]:
        """Remove and return every idle client (one at a time: a client released
        concurrently is either taken here or stays idle, never lost)."""
        taken = []
        while True:
            try:
                taken.append(self.idle.pop())
            except IndexError:
                return taken

    def reset_after_fork(self) -> None:
        """Forget inherited clients (closing this process's copies of their sockets)."""
        self.cond = threading.Condition(threading.Lock())
        for client in self.clients:
            _close_quietly(client)
        self.clients = set()
        self.idle = []
        self.waiting = 0
        self.down_until = None


def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):  # closing a broken socket may fail: no matter
        client.close()


#: Failures of a connection that was open before the call: the server went away (or
#: restarted) since. Timeouts are not among them: a slow server is not retried.
_STALE_CONNECTION = (
    MemcacheUnexpectedCloseError,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
)


class MemcachedLayer(BaseLayer):
    """A remote cache layer on memcached; thread-safe and fork-safe.

    ``servers``: ``"HOST:PORT"`` strings (``"[::1]:11211"`` for IPv6; the port defaults
    to 11211), as a sequence or one comma-separated string. ``key_prefix`` namespaces
    every key (see :func:`memcached_key`). ``codec`` turns values into bytes
    (:class:`~cachechain.codecs.JsonCodec` by default). ``default_ttl`` applies to writes
    without a TTL (``None``: no expiry); ``max_ttl`` caps every TTL. ``connect_timeout``
    bounds connecting and ``timeout`` each socket read or write (not a whole
    operation). ``pool_size`` clients at most per server; a caller waits at most
    ``pool_timeout`` for one. A server that fails in a cluster is skipped for
    ``dead_timeout``. Encoded values larger than ``max_value_size`` bytes are refused
    before any I/O. All durations are seconds. ``clock`` gives unix wall-clock seconds
    (entries' expiry, shared between processes); ``monotonic`` times the down-marking.

    Raises :class:`~cachechain.errors.ConfigError`, naming the field, for a bad setting.
    Operations raise :class:`~cachechain.errors.InvalidKeyError` for a non-``str`` key,
    :class:`~cachechain.errors.InvalidValueError` for a value the codec refuses or that
    is too large, :class:`~cachechain.errors.LayerTimeoutError`,
    :class:`~cachechain.errors.LayerUnavailableError` (including
    :class:`NodeDownError` and :class:`~cachechain.errors.PoolExhaustedError`) or
    :class:`~cachechain.errors.LayerError` when memcached fails, and
    :class:`~cachechain.errors.ChainClosedError` after :meth:`close`.
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
        specs = servers.split(",") if isinstance(servers, str) else servers
        if isinstance(specs, (bytes, bytearray)) or not isinstance(specs, Sequence):
            raise ConfigError(f"servers must be a str or a sequence of str, got {servers!r}")
        nodes: list[_Node] = []
        for spec in specs:
            node_id, host, port = _parse_server(spec)
            if any(n.node_id == node_id for n in nodes):
                raise ConfigError(f"servers lists {node_id} twice")
            nodes.append(_Node(node_id, host, port))
        if not nodes:
            raise ConfigError("servers must name at least one server")
        self._prefix = _check_prefix(key_prefix)
        if codec is None:
            codec = JsonCodec()
        if not isinstance(codec, Codec):
            raise ConfigError(f"codec must provide codec_id, encode and decode, got {codec!r}")
        codec_id = codec.codec_id
        if isinstance(codec_id, bool) or not isinstance(codec_id, int) or not 0 <= codec_id < 256:
            raise ConfigError(f"codec.codec_id must be an int in 0-255, got {codec_id!r}")
        self._codec = codec
        self._connect_timeout = _check_seconds(connect_timeout, "connect_timeout")
        self._timeout = _check_seconds(timeout, "timeout")
        self._pool_size = _check_int(pool_size, "pool_size")
        self._pool_timeout = _check_seconds(pool_timeout, "pool_timeout", allow_zero=True)
        self._dead_timeout = _check_seconds(dead_timeout, "dead_timeout")
        self._max_value_size = _check_int(max_value_size, "max_value_size")
        if not callable(clock):
            raise ConfigError("clock must be callable")
        if not callable(monotonic):
            raise ConfigError("monotonic must be callable")
        self._clock = clock
        self._monotonic = monotonic
        self._nodes: tuple[_Node, ...] = tuple(nodes)
        self._cluster = len(nodes) > 1
        self._closed = False
        self._stats_lock = threading.Lock()
        self._corrupt = 0
        self._exhausted = 0
        _fork.track(self)

    # -- read-only configuration -------------------------------------------------

    @property
    def timeout(self) -> float:
        """Seconds each socket read or write may take (not a bound on a whole call)."""
        return self._timeout

    @property
    def connect_timeout(self) -> float:
        """Seconds a connection attempt may take."""
        return self._connect_timeout

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
        return tuple(node.node_id for node in self._nodes)

    # -- keys and nodes ------------------------------------------------------------

    def _node_for(self, mkey: bytes) -> _Node:
        """Rendezvous hashing: the node with the highest BLAKE2b score for ``mkey``."""
        nodes = self._nodes
        if not self._cluster:
            return nodes[0]
        best = nodes[0]
        best_score = b""
        for node in nodes:
            score = hashlib.blake2b(node.weight + mkey, digest_size=8).digest()
            if score > best_score:
                best, best_score = node, score
        return best

    def _group(self, keys: Iterable[str]) -> dict[_Node, dict[bytes, str]]:
        """Map each key, and group the memcached keys by node (duplicates merged)."""
        prefix = self._prefix
        groups: dict[_Node, dict[bytes, str]] = {}
        for key in keys:
            mkey = _map_key(key, prefix)
            node = self._node_for(mkey)
            group = groups.get(node)
            if group is None:
                groups[node] = {mkey: key}
            else:
                group[mkey] = key
        return groups

    # -- pool, down-marking and errors ---------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ChainClosedError(f"memcached layer {self.name!r} is closed")

    def _acquire_slow(self, node: _Node) -> Any:
        """Wait for an idle client or room for a new one, at most ``pool_timeout`` s."""
        cond = node.cond
        deadline: float | None = None
        with cond:
            node.waiting += 1  # before looking at idle again: see _returned
            try:
                while True:
                    if self._closed:
                        raise ChainClosedError(f"memcached layer {self.name!r} is closed")
                    try:
                        return node.idle.pop()
                    except IndexError:
                        pass
                    if len(node.clients) < self._pool_size:
                        client = Client(
                            (node.host, node.port),
                            default_noreply=False,
                            connect_timeout=self._connect_timeout,
                            timeout=self._timeout,
                            no_delay=True,
                        )
                        node.clients.add(client)
                        return client
                    now = time.monotonic()  # a real wait, not a modelled one
                    if deadline is None:
                        deadline = now + self._pool_timeout
                    if now >= deadline:
                        break
                    cond.wait(deadline - now)
            finally:
                node.waiting -= 1
        with self._stats_lock:
            self._exhausted += 1
        raise PoolExhaustedError(
            f"no free connection to {node.node_id} within {self._pool_timeout}s "
            f"(pool_size={self._pool_size})",
            layer=self.name,
        )

    def _discard(self, node: _Node, client: Any) -> None:
        """Drop a client whose call failed (its stream is at an unknown point)."""
        with node.cond:
            node.clients.discard(client)
            node.cond.notify()
        _close_quietly(client)

    def _returned(self, node: _Node) -> None:
        """After a healthy client went back to ``node.idle`` with ``close()`` run or a
        caller waiting: close it, or wake the waiter. A waiter counts itself under the
        lock before it looks at idle again, so either it sees the client or the releaser
        sees it waiting."""
        if self._closed:  # close() ran meanwhile and may have missed this client
            self._drop_idle(node)
        elif node.waiting:
            with node.cond:
                node.cond.notify()

    def _check_node_up(self, node: _Node) -> None:
        """In a cluster, raise NodeDownError for a node marked down, or let one caller
        through to probe it once ``dead_timeout`` has passed."""
        if node.down_until is None:
            return
        with node.cond:
            until = node.down_until
            if until is None:
                return
            now = self._monotonic()
            if now < until:
                raise NodeDownError(
                    f"memcached node {node.node_id} is marked down for another {until - now:.3f}s",
                    layer=self.name,
                )
            # This caller probes the node; the others still skip it meanwhile.
            node.down_until = now + self._dead_timeout

    def _mark(self, node: _Node, *, down: bool) -> None:
        if down:
            with node.cond:
                node.down_until = self._monotonic() + self._dead_timeout
        elif node.down_until is not None:
            with node.cond:
                node.down_until = None

    def _translate(self, exc: Exception, node: _Node) -> CacheError:
        """Map a client failure to cachechain's errors."""
        where = f"memcached {node.node_id}"
        if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
            return LayerTimeoutError(f"{where} timed out: {exc!r}", layer=self.name)
        if isinstance(exc, MemcacheUnexpectedCloseError):
            return LayerUnavailableError(f"{where} closed the connection", layer=self.name)
        if isinstance(exc, MemcacheServerError) and b"too large" in _as_bytes(exc):
            return InvalidValueError(
                f"layer {self.name!r}: {where} refused the value: object too large"
            )
        if isinstance(exc, OSError):  # refused, reset, unreachable, name lookup
            return LayerUnavailableError(f"{where} is unreachable: {exc!r}", layer=self.name)
        if isinstance(exc, MemcacheError):
            return LayerError(f"{where} failed: {exc!r}", layer=self.name)
        # A reply pymemcache could not parse (ValueError, KeyError...): protocol error.
        return LayerError(f"{where} sent an unexpected reply: {exc!r}", layer=self.name)

    def _call(self, node: _Node, op: str | Callable[..., Any], *args: Any) -> Any:
        """Run the client method named ``op`` with ``args`` (or ``op(client, *args)``
        for a function such as :func:`._wire.get`) on a pooled client of ``node``,
        mapping failures.

        Every operation is idempotent, so when a connection that was already open
        turns out to be dead (the server restarted since it was last used), the node's
        idle connections are dropped and the call is tried once more on a new one.
        """
        if self._cluster:
            self._check_node_up(node)
        return self._attempt(node, op, args, True)

    def _attempt(
        self, node: _Node, op: str | Callable[..., Any], args: tuple[Any, ...], retry: bool
    ) -> Any:
        # Kept flat (no helper calls on success): this is every L2 read's path.
        try:
            client = node.idle.pop()  # the common case: no lock
        except IndexError:
            client = self._acquire_slow(node)
        reused = client.sock is not None
        try:
            result = getattr(client, op)(*args) if isinstance(op, str) else op(client, *args)
        except Exception as exc:
            self._discard(node, client)
            if retry and reused and isinstance(exc, _STALE_CONNECTION):
                self._drop_idle(node)
                return self._attempt(node, op, args, False)
            error = self._translate(exc, node)
            if self._cluster:
                self._mark(node, down=isinstance(error, (LayerTimeoutError, LayerUnavailableError)))
            raise error from exc
        except BaseException:
            self._discard(node, client)
            raise
        node.idle.append(client)
        if self._closed or node.waiting:
            self._returned(node)
        if self._cluster:
            self._mark(node, down=False)
        return result

    def _drop_idle(self, node: _Node) -> None:
        """Close every idle connection of ``node`` (they outlived their server, or the
        layer is closing) and wake whoever waits for one."""
        stale = node.take_idle()
        with node.cond:
            for client in stale:
                node.clients.discard(client)
            node.cond.notify_all()
        for client in stale:
            _close_quietly(client)

    # -- reads ---------------------------------------------------------------------

    def _decode(self, data: bytes, now: float) -> tuple[Any, float | None]:
        """Unpack an envelope; ``(MISSING, None)`` if its expiry has passed."""
        try:
            value, expires_at = unpack(self._codec, data)
        except CorruptValueError as exc:
            with self._stats_lock:
                self._corrupt += 1
            exc.layer = self.name
            raise
        if expires_at is None:
            return value, None
        remaining = expires_at - now
        if remaining <= 0:
            return MISSING, None
        return value, remaining

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """Return ``(value, remaining_seconds)``, ``(value, None)`` for an entry that
        never expires, or ``(MISSING, None)`` on a miss.

        Raises :class:`~cachechain.codecs.CorruptValueError` (counted in
        :meth:`stats`) for stored bytes that cannot be decoded, and :class:`NodeDownError`
        for a key whose node is marked down.
        """
        if self._closed:
            self._check_open()
        mkey = _map_key(key, self._prefix)
        if self._cluster:
            data = self._call(self._node_for(mkey), _wire.get, mkey)
        else:  # what _call does for one node, two calls shorter: every L2 read's path
            data = self._attempt(self._nodes[0], _wire.get, (mkey,), True)
        if data is None:
            return MISSING, None
        return self._decode(data, self._clock())

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Return the live entries among ``keys`` with their remaining TTLs (seconds).

        One round trip per node. Corrupt entries are left out and counted. In a cluster
        the keys of a node marked down (or that fails during this call) are misses,
        unless no node answered at all: then the first failure is raised.
        """
        self._check_open()
        if isinstance(keys, str):
            raise InvalidKeyError("keys must be a sequence of str, not a str")
        groups = self._group(keys)
        found: dict[str, tuple[Any, float | None]] = {}
        first_error: CacheError | None = None
        answered = False
        for node, group in groups.items():
            mkeys = list(group)
            try:
                raw: dict[bytes, bytes] = self._call(node, "get_many", mkeys)
            except NodeDownError:
                continue
            except (LayerTimeoutError, LayerUnavailableError) as exc:
                if not self._cluster:
                    raise
                first_error = first_error or exc
                continue
            answered = True
            now = self._clock()
            for mkey, data in raw.items():
                try:
                    entry = self._decode(data, now)
                except CorruptValueError:
                    continue
                if entry[0] is not MISSING:
                    found[group[mkey]] = entry
        if first_error is not None and not answered:
            raise first_error
        return found

    # -- writes --------------------------------------------------------------------

    def _expiry(self, ttl: float | None) -> tuple[float | None, int]:
        """Resolve ``ttl``: return the envelope's ``expires_at`` and memcached's exptime."""
        ttl = self.effective_ttl(ttl)
        if ttl is None:
            return None, 0
        if not math.isfinite(ttl):
            raise InvalidValueError(f"ttl must be a finite number of seconds, got {ttl!r}")
        now = self._clock()
        expires_at = now + ttl
        if ttl <= _RELATIVE_EXPIRY_LIMIT:
            return expires_at, math.ceil(ttl)
        absolute = math.ceil(expires_at)
        # Past 2038 memcached cannot take the time: it keeps the item, the envelope
        # still expires it.
        return expires_at, absolute if absolute <= _MAX_ABSOLUTE_EXPIRY else 0

    def _encode(self, value: Any, expires_at: float | None) -> bytes:
        data = pack(self._codec, value, expires_at)
        if len(data) > self._max_value_size:
            raise InvalidValueError(
                f"layer {self.name!r}: encoded value is {len(data)} bytes, "
                f"more than max_value_size={self._max_value_size}"
            )
        return data

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (``None``: ``default_ttl``) and wait for
        memcached's reply.

        Raises :class:`~cachechain.errors.InvalidValueError` for a value the codec
        refuses or whose encoding exceeds ``max_value_size`` (and when the server
        answers "object too large"); the key's older value, if any, is deleted first,
        so that a refused write never leaves a stale value behind.
        """
        self._check_open()
        mkey = _map_key(key, self._prefix)
        expires_at, exptime = self._expiry(ttl)
        node = self._node_for(mkey)
        try:
            data = self._encode(value, expires_at)
            stored = self._call(node, "set", mkey, data, exptime)
        except InvalidValueError:
            self._forget(node, [mkey])
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
        self._check_open()
        expires_at, exptime = self._expiry(ttl)
        groups = self._group(items)
        rejected: list[str] = []
        first_error: CacheError | None = None
        for node, group in groups.items():
            batch: dict[bytes, bytes] = {}
            for mkey, key in group.items():
                try:
                    batch[mkey] = self._encode(items[key], expires_at)
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
                self._forget(node, list(mkeys))
        if first_error is not None:
            raise first_error
        return rejected

    def _forget(self, node: _Node, mkeys: list[bytes]) -> None:
        """Delete ``mkeys`` after their new values were refused; best effort: a failure
        here is the one the write would have hit anyway, so it is not raised."""
        try:
            self._call(node, "delete_many", mkeys)
        except (LayerError, PoolExhaustedError):
            log.debug("memcached layer %r: could not delete refused keys", self.name)

    def _store_batch(
        self,
        node: _Node,
        batch: dict[bytes, bytes],
        exptime: int,
        group: dict[bytes, str],
        rejected: list[str],
    ) -> list[bytes]:
        """Store one node's batch; return memcached keys not stored.

        If memcached refuses an item as too large, the batch's connection is gone and
        its later items unconfirmed: store them one by one, rejecting the large ones.
        """
        try:
            failed: list[bytes] = self._call(node, "set_many", batch, exptime)
            return failed
        except InvalidValueError:
            pass
        failed = []
        for mkey, data in batch.items():
            try:
                if not self._call(node, "set", mkey, data, exptime):
                    failed.append(mkey)
            except InvalidValueError:
                rejected.append(group[mkey])
        return failed

    def delete(self, key: str) -> None:
        """Remove ``key`` and wait for memcached's reply; an absent key is fine."""
        self._check_open()
        mkey = _map_key(key, self._prefix)
        self._call(self._node_for(mkey), "delete", mkey)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key in ``keys``: one pipelined round trip per node.

        If one node fails (or is marked down) the others are still handled and the
        first failure is raised at the end.
        """
        self._check_open()
        if isinstance(keys, str):
            raise InvalidKeyError("keys must be an iterable of str, not a str")
        first_error: CacheError | None = None
        for node, group in self._group(keys).items():
            mkeys = list(group)
            try:
                self._call(node, "delete_many", mkeys)
            except (LayerError, PoolExhaustedError) as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    # -- lifecycle -----------------------------------------------------------------

    def stats(self) -> MemcachedLayerStats:
        """Return the layer's counters and connection state (see
        :class:`MemcachedLayerStats`)."""
        down = 0
        open_connections = 0
        for node in self._nodes:
            with node.cond:
                open_connections += sum(1 for c in node.clients if c.sock is not None)
                if self._cluster and node.down_until is not None:
                    down += 1
        with self._stats_lock:
            return MemcachedLayerStats(
                corrupt_values=self._corrupt,
                nodes=len(self._nodes),
                nodes_down=down,
                connections_open=open_connections,
                pool_exhausted=self._exhausted,
            )

    def close(self) -> None:
        """Close every idle connection; busy ones close when their call ends. Later
        calls raise :class:`~cachechain.errors.ChainClosedError`. Idempotent."""
        self._closed = True
        for node in self._nodes:
            self._drop_idle(node)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _after_fork(self) -> None:
        """In a forked child: new locks, no inherited connections, no down-marks."""
        self._stats_lock = threading.Lock()
        for node in self._nodes:
            node.reset_after_fork()

    def __repr__(self) -> str:
        return f"<MemcachedLayer {self.name!r} servers={list(self.servers)!r}>"


def _as_bytes(exc: BaseException) -> bytes:
    """The first argument of a pymemcache error as bytes (its server message)."""
    arg = exc.args[0] if exc.args else b""
    return arg if isinstance(arg, bytes) else str(arg).encode("utf-8", "replace")
