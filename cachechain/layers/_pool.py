"""The connections of a :class:`~cachechain.layers._memcached.MemcachedLayer`.

- Each server (:class:`Node`) has its own thread-safe pool of at most ``pool_size``
  :class:`._wire.Connection` objects, created lazily (each connects on first use with
  ``TCP_NODELAY``). A caller waits at most ``pool_timeout`` seconds for a free one, then
  gets :class:`~cachechain.PoolExhaustedError`. A connection whose call failed
  (including a call that passed its deadline) is closed and dropped, never reused.
- With several servers, rendezvous (highest random weight) hashing with BLAKE2b picks
  a key's node, the same in every process. A node that fails with a connection error or
  a timeout is marked down for ``dead_timeout`` seconds: calls for it raise
  :class:`NodeDownError` without any I/O, until one call probes it again. With a single
  node there is no down-marking: the chain's circuit breaker does that job.
- :meth:`Pool.call` runs one command and maps its failures to cachechain's errors; a
  connection that was open before the call and turns out dead (the server restarted)
  is retried once on a new one, within the same deadline (the command's last
  argument). :meth:`Pool.call_once` runs a command that must not run twice (``incr``,
  ``add``, ``cas``...): never retried, on a connection checked first (unless it
  answered one less than :data:`RECENT` seconds before).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, Final

from pymemcache.exceptions import (
    MemcacheError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)

from .._close import close_quietly
from .._errors import (
    CacheError,
    ChainClosedError,
    CorruptValueError,
    InvalidValueError,
    LayerError,
    LayerTimeoutError,
    LayerUnavailableError,
    PoolExhaustedError,
)
from ._fates import Fates, Reaper, reaper
from ._wire import Connection, ValueTooLargeError, stale

#: Seconds after a command that must not run twice was answered on a connection
#: during which the next one skips the poll for a closed connection (see
#: :meth:`Pool.call_once`): a system call saved on each command of a burst.
RECENT: Final = 0.005

__all__ = ["Node", "NodeDownError", "Pool"]


class NodeDownError(LayerUnavailableError):
    """The key's memcached node was marked down after a recent connection failure or
    timeout; the call was refused without any I/O.

    Raised only when the layer has several nodes. It does not trip the circuit breaker:
    the failure that marked the node down was counted already.
    """

    error_type = "connection"
    trips_breaker = False


#: Writes whose keys are deleted right behind them when their fate is unknown: they
#: store unconditionally, so the value they leave is theirs alone.
_RETRACTED = frozenset({"set", "set_many"})
#: Writes retracted only once their reply says they stored: when they did not, the
#: key holds another client's value (a lock) that a delete would remove.
_RETRACTED_IF_STORED = frozenset({"add", "cas"})

#: Failures of a connection that was open before the call: the server went away (or
#: restarted) since. Timeouts are not among them: a slow server is not retried.
_STALE_CONNECTION = (
    MemcacheUnexpectedCloseError,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
)


class Node:
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

    def drop_idle(self) -> None:
        """Close every idle connection (they outlived their server, or the layer is
        closing) and wake whoever waits for one."""
        stale = self.take_idle()
        with self.cond:
            for client in stale:
                self.clients.discard(client)
            self.cond.notify_all()
        for client in stale:
            close_quietly(client)

    def discard(self, client: Any) -> None:
        """Drop a client whose call failed (its stream is at an unknown point)."""
        with self.cond:
            self.clients.discard(client)
            self.cond.notify()
        close_quietly(client)

    def reset_after_fork(self) -> None:
        """Forget inherited clients (closing this process's copies of their sockets)."""
        self.cond = threading.Condition(threading.Lock())
        for client in self.clients:
            close_quietly(client)
        self.clients = set()
        self.idle = []
        self.waiting = 0
        self.down_until = None


class Pool:
    """The nodes of the layer named ``name``, and how a call runs on one of them.

    ``connect_timeout``, ``timeout`` (seconds) and ``max_value_size`` (bytes) go to
    each new :class:`._wire.Connection`; at most ``pool_size`` clients per node; a
    caller waits at most ``pool_timeout`` seconds for one; a node that fails in a
    cluster is skipped for ``dead_timeout`` seconds, timed by ``monotonic``. The
    settings are checked by the layer. Thread-safe.
    """

    def __init__(
        self,
        name: str,
        nodes: tuple[Node, ...],
        *,
        connect_timeout: float,
        timeout: float,
        pool_size: int,
        pool_timeout: float,
        dead_timeout: float,
        max_value_size: int,
        monotonic: Callable[[], float],
    ) -> None:
        self.name = name
        self.nodes = nodes
        #: The only node when there is one (the read path's shortcut).
        self.first = nodes[0]
        #: Whether there are several nodes (and so rendezvous hashing and down-marking).
        self.cluster = len(nodes) > 1
        #: Set by :meth:`close`; every later call raises ChainClosedError.
        self.closed = False
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self.dead_timeout = dead_timeout
        self.max_value_size = max_value_size
        self._monotonic = monotonic
        self._stats_lock = threading.Lock()
        #: The keys of this pool's writes in doubt (see :mod:`._fates`).
        self.fates = Fates()
        #: Who learns the fate of a write that timed out (the process's reaper).
        self.reaper: Reaper = reaper()
        #: Calls refused because no client became free within pool_timeout.
        self.exhausted = 0
        #: Replies that announced a value larger than ``max_value_size``.
        self.oversized = 0

    # -- nodes ---------------------------------------------------------------------

    def node_for(self, mkey: bytes) -> Node:
        """Rendezvous hashing: the node with the highest BLAKE2b score for ``mkey``."""
        nodes = self.nodes
        if not self.cluster:
            return nodes[0]
        best = nodes[0]
        best_score = b""
        for node in nodes:
            score = hashlib.blake2b(node.weight + mkey, digest_size=8).digest()
            if score > best_score:
                best, best_score = node, score
        return best

    def counts(self) -> tuple[int, int]:
        """``(connections_open, nodes_down)``: the clients with an open socket, and the
        nodes marked down (always 0 with one node)."""
        open_connections = 0
        down = 0
        for node in self.nodes:
            with node.cond:
                open_connections += sum(1 for c in node.clients if c.sock is not None)
                if self.cluster and node.down_until is not None:
                    down += 1
        return open_connections, down

    def deadline(self) -> float:
        """The deadline of a call starting now: ``timeout`` seconds from now, on
        :func:`time.monotonic` (the clock the connections wait by)."""
        return time.monotonic() + self.timeout

    def check_open(self) -> None:
        """Raise :class:`~cachechain.ChainClosedError` once :meth:`close` ran."""
        if self.closed:
            raise ChainClosedError(f"memcached layer {self.name!r} is closed")

    # -- calls ---------------------------------------------------------------------

    def call(
        self,
        node: Node,
        op: str | Callable[..., Any],
        *args: Any,
        keys: Collection[bytes] = (),
    ) -> Any:
        """Run the :class:`._wire.Connection` method named ``op`` with ``args`` (or
        ``op(client, *args)`` for a function such as :func:`._wire.get`) on a pooled
        connection of ``node``, mapping failures (and raising :class:`NodeDownError` for
        a node marked down). The command's last argument is the call's deadline
        (monotonic seconds): a retry keeps it.

        For idempotent operations only (everything but those :meth:`call_once` runs):
        when a connection that was already open turns out to be dead (the server
        restarted since it was last used), the node's idle connections are dropped and
        the call is tried once more on a new one.

        A write names the memcached ``keys`` it changes: it waits for earlier writes of
        them in doubt (:class:`._fates.Fates`, raising
        :class:`~cachechain.WriteInDoubtError` at the deadline), and if it times out
        itself, its connection goes to the reaper and its keys are held.
        """
        if self.cluster:
            self._check_node_up(node)
        if keys and self.fates.held:
            self.fates.wait(keys, args[-1], self.name)
        return self.attempt(node, op, args, True, keys)

    def attempt(
        self,
        node: Node,
        op: str | Callable[..., Any],
        args: tuple[Any, ...],
        retry: bool,
        keys: Collection[bytes] = (),
    ) -> Any:
        """:meth:`call` without the down check and the wait for ``keys`` (what it does
        for one node)."""
        # Kept flat (no helper calls on success): this is every L2 read's path.
        try:
            client = node.idle.pop()  # the common case: no lock
        except IndexError:
            if retry:
                client, args = self._acquire_slow_for(node, args)
            else:  # a retry: its wait comes out of the timeout (the deadline moved once)
                client = self._acquire_slow(node)
        reused = client.sock is not None
        try:
            result = getattr(client, op)(*args) if isinstance(op, str) else op(client, *args)
        except Exception as exc:
            self._drop(node, client, exc, keys, op)
            if retry and reused and isinstance(exc, _STALE_CONNECTION):
                node.drop_idle()
                return self.attempt(node, op, args, False, keys)
            raise self._failed(exc, node) from exc
        except BaseException:
            self._drop(node, client, None, keys, op)
            raise
        node.idle.append(client)
        if self.closed or node.waiting:
            self._returned(node)
        if self.cluster:
            self.mark(node, down=False)
        return result

    def call_once(
        self,
        node: Node,
        op: str | Callable[..., Any],
        *args: Any,
        keys: Collection[bytes] = (),
    ) -> Any:
        """:meth:`call` for an operation that must not run twice (``incr``, ``decr``,
        ``add``, ``cas``; ``args[-1]`` is its deadline): it is never retried. A pooled
        connection that the server has closed since its last use (a restart) is found
        without waiting, by a zero-timeout poll, and replaced before the command is
        sent, unless such a command was answered on it less than :data:`RECENT`
        seconds before it is taken for this one (by the pool's ``monotonic`` clock,
        after any wait for the connection or for an earlier write of the key: a burst
        of commands pays one poll, and a restart in so short an idle gap is as likely
        as one during the command itself); a connection that
        fails after sending it raises, and the command may or may not have run (a
        timeout holds ``keys`` until memcached says, as in :meth:`call`)."""
        if self.cluster:
            self._check_node_up(node)
        if keys and self.fates.held:
            self.fates.wait(keys, args[-1], self.name)
        try:
            client = node.idle.pop()
        except IndexError:
            client, args = self._acquire_slow_for(node, args)
        if client.sock is not None and self._monotonic() - client.used > RECENT and stale(client):
            node.discard(client)  # its server went away: the others are as stale
            node.drop_idle()
            client = self._acquire_slow(node)  # out of the timeout: the deadline moved once
        try:
            result = getattr(client, op)(*args) if isinstance(op, str) else op(client, *args)
        except Exception as exc:
            self._drop(node, client, exc, keys, op)
            raise self._failed(exc, node) from exc
        except BaseException:
            self._drop(node, client, None, keys, op)
            raise
        client.used = self._monotonic()  # answered: idle from now
        node.idle.append(client)
        if self.closed or node.waiting:
            self._returned(node)
        if self.cluster:
            self.mark(node, down=False)
        return result

    def _drop(
        self,
        node: Node,
        client: Any,
        exc: BaseException | None,
        keys: Collection[bytes],
        op: object,
    ) -> None:
        """After a failed call: discard ``client``, unless it carried a write of
        ``keys`` that timed out (or was interrupted) after being sent: then hold the
        keys and hand the connection to the reaper, which discards it once memcached
        has answered (see :mod:`._fates`). A ``set`` in doubt is retracted: the reaper
        sends a delete of its keys right behind it, on the same connection, so that a
        set that lands late is gone once that delete has run (its caller was told it
        failed); an ``add`` or ``cas`` once its reply says it stored."""
        if not (keys and client.pending and (exc is None or isinstance(exc, TimeoutError))):
            node.discard(client)
            return
        if len(keys) == 1 and client.sent < len(client.out):
            # One command cut short: memcached drops an incomplete command with its
            # connection, so closing it settles its fate (and frees the unsent bytes).
            node.discard(client)
            return
        keys = tuple(keys)
        fates = self.fates
        fates.hold(keys)

        def resolved() -> None:
            node.discard(client)
            fates.release(keys)

        self.reaper.adopt(
            client,
            resolved,
            retract=keys if op in _RETRACTED else (),
            if_stored=keys if op in _RETRACTED_IF_STORED else (),
        )

    def _failed(self, exc: Exception, node: Node) -> Exception:
        """The cachechain error for ``exc`` raised by a call on ``node``; in a cluster a
        node that timed out or is unreachable is marked down."""
        error = self._translate(exc, node)
        if self.cluster:
            self.mark(node, down=isinstance(error, (LayerTimeoutError, LayerUnavailableError)))
        return error

    def _acquire_slow_for(self, node: Node, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        """:meth:`_acquire_slow` for a command whose last argument is its deadline:
        the client, and the arguments with the deadline moved by the time waited for
        it (a caller waits at most ``pool_timeout`` for a client before its
        ``timeout`` starts: a busy pool must not make a healthy node time out). Once
        per call: a second wait (a retry, a stale connection replaced) comes out of the
        timeout, so that no call lasts longer than ``pool_timeout + timeout``."""
        began = time.monotonic()
        client = self._acquire_slow(node)
        waited = time.monotonic() - began
        return client, (*args[:-1], args[-1] + waited)

    def _acquire_slow(self, node: Node) -> Any:
        """Wait for an idle client or room for a new one, at most ``pool_timeout`` s."""
        cond = node.cond
        deadline: float | None = None
        with cond:
            node.waiting += 1  # before looking at idle again: see _returned
            try:
                while True:
                    self.check_open()
                    try:
                        return node.idle.pop()
                    except IndexError:
                        pass
                    if len(node.clients) < self.pool_size:
                        return self._connect(node)
                    now = time.monotonic()  # a real wait, not a modelled one
                    if deadline is None:
                        deadline = now + self.pool_timeout
                    if now >= deadline:
                        break
                    cond.wait(deadline - now)
            finally:
                node.waiting -= 1
        with self._stats_lock:
            self.exhausted += 1
        raise PoolExhaustedError(
            f"no free connection to {node.node_id} within {self.pool_timeout}s "
            f"(pool_size={self.pool_size})",
            layer=self.name,
        )

    def _connect(self, node: Node) -> Any:
        """A new client of ``node`` (it connects on first use), counted in its pool."""
        client = Connection(
            (node.host, node.port),
            connect_timeout=self.connect_timeout,
            timeout=self.timeout,
            max_value=self.max_value_size,
        )
        node.clients.add(client)
        return client

    def _returned(self, node: Node) -> None:
        """After a healthy client went back to ``node.idle`` with ``close()`` run or a
        caller waiting: close it, or wake the waiter. A waiter counts itself under the
        lock before it looks at idle again, so either it sees the client or the releaser
        sees it waiting."""
        if self.closed:  # close() ran meanwhile and may have missed this client
            node.drop_idle()
        elif node.waiting:
            with node.cond:
                node.cond.notify()

    # -- down-marking and errors ---------------------------------------------------

    def _check_node_up(self, node: Node) -> None:
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
            node.down_until = now + self.dead_timeout

    def mark(self, node: Node, *, down: bool) -> None:
        """Mark ``node`` down for ``dead_timeout`` seconds, or up."""
        if down:
            with node.cond:
                node.down_until = self._monotonic() + self.dead_timeout
        elif node.down_until is not None:
            with node.cond:
                node.down_until = None

    def _translate(self, exc: Exception, node: Node) -> CacheError:
        """Map a client failure to cachechain's errors."""
        where = f"memcached {node.node_id}"
        if isinstance(exc, ValueTooLargeError):  # a value we never store: a corrupt read
            with self._stats_lock:
                self.oversized += 1
            return CorruptValueError(f"{where} sent a value too large: {exc}", layer=self.name)
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

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close every idle connection; busy ones close when their call ends. Later
        calls raise :class:`~cachechain.ChainClosedError`. Idempotent."""
        self.closed = True
        for node in self.nodes:
            node.drop_idle()

    def reset_after_fork(self) -> None:
        """In a forked child: new locks, no inherited connections, no down-marks."""
        self._stats_lock = threading.Lock()
        self.fates = Fates()
        for node in self.nodes:
            node.reset_after_fork()


def _as_bytes(exc: BaseException) -> bytes:
    """The first argument of a pymemcache error as bytes (its server message)."""
    arg = exc.args[0] if exc.args else b""
    return arg if isinstance(arg, bytes) else str(arg).encode("utf-8", "replace")
