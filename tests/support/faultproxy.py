"""Fault injection over real TCP for the tests: a forwarding proxy and a stuck listener.

:class:`FaultProxy` listens on ``127.0.0.1`` and forwards bytes between its clients and
one upstream (a real memcached in the tests). Its mode can be changed at any time, and
the new mode applies to new connections and to the next chunk of data on existing ones:
pass-through, latency, black hole, reset, close mid-reply and trickle. Counters
(:meth:`FaultProxy.stats`) let a test prove that nothing reached the upstream, and
:meth:`FaultProxy.wait_until` lets it wait for the proxy to see something without
sleeping.

Threads: one accept thread, and per connection one pump from the client and, once the
first bytes are forwarded, one pump from the upstream. The upstream connection is made
lazily, so in the black-hole and reset modes the upstream never sees a connection.
Delays (latency, trickle) wait on the proxy's stop :class:`threading.Event`, and
:meth:`FaultProxy.stop` shuts every socket down, which wakes blocked reads and writes:
stopping never hangs.

:class:`BacklogListener` is a listening socket whose ``accept`` is never called, with
its accept queue filled, so that a new connect to it never completes. What was found on
Linux loopback (kernel 6.x, Python 3.11; reproduced here):

- The accept queue holds ``backlog + 1`` established connections (the kernel tests
  ``queued > backlog``): with ``listen(1)`` two connects complete, the third and every
  later one time out after the client's connect timeout (0.2 s measured: 0.200-0.201 s).
- When the accept queue is full the kernel drops incoming SYNs (``ListenOverflows``)
  whatever ``net.ipv4.tcp_syncookies`` says, so the client stays in ``SYN_SENT`` and
  retransmits after its initial RTO of 1 s; it is never refused and never reset.
- With ``listen(0)`` the SYN queue counts as full from the start (``0 >= 0``), so even
  the first connection completes only through a SYN cookie: with syncookies off (not
  the default; not changeable here) nothing would complete and filling would fail.
  ``listen(1)`` does not depend on syncookies, hence the default ``backlog=1``.
- The listener's fill level is read exactly with ``getsockopt(TCP_INFO)``: for a
  listening socket ``tcpi_unacked`` is the accept queue length and ``tcpi_sacked`` the
  backlog. :meth:`BacklogListener.is_full` uses it, so filling needs no timed probes.

Loopback only: nothing here connects to any other address.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

__all__ = ["BacklogListener", "FaultProxy", "Mode", "ModeKind", "ProxyStats"]

ModeKind = Literal["pass_through", "latency", "black_hole", "reset", "close_mid_reply", "trickle"]

_HOST = "127.0.0.1"
_RECV_SIZE = 65536
_LINGER_RST = struct.pack("ii", 1, 0)
# struct tcp_info: 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked.
_TCP_INFO_SIZE = 104
_TCP_INFO_UNACKED_OFFSET = 24


@dataclass(frozen=True)
class Mode:
    """The proxy's current fault, as set by one of the mode methods of :class:`FaultProxy`.

    ``kind`` names the mode; ``delay`` (seconds) is used by ``latency``,
    ``after_bytes`` by ``close_mid_reply``, ``chunk`` (bytes) and ``interval``
    (seconds) by ``trickle``; unused fields are zero. Each call to a mode method makes a
    new ``Mode`` object, which restarts the byte count of ``close_mid_reply``.
    """

    kind: ModeKind
    delay: float = 0.0
    after_bytes: int = 0
    chunk: int = 0
    interval: float = 0.0


@dataclass(frozen=True)
class ProxyStats:
    """A point-in-time view of a :class:`FaultProxy`'s counters (all since start).

    ``connections``: client connections accepted. ``open_connections``: those not yet
    closed. ``bytes_received``: bytes read from clients, forwarded or not (a black hole
    reads them too). ``bytes_to_upstream`` / ``bytes_to_clients``: bytes forwarded each
    way, counted just before the send, so a client that has its reply always finds it
    counted (a send that then fails is counted too). ``upstream_connections``:
    connections made to the upstream; ``upstream_failures``: attempts that failed (the
    client is then closed). ``resets``: client connections closed with RST.
    ``waiting``: pump threads that are inside a latency or trickle delay right now.
    ``held``: client segments held back by :meth:`FaultProxy.hold_requests`;
    ``held_released``: those forwarded to the upstream since (counted before the send);
    ``held_replies``: held connections that got their first upstream bytes after the
    release (the upstream answered the held segment, so it ran it).
    """

    connections: int
    open_connections: int
    bytes_received: int
    bytes_to_upstream: int
    bytes_to_clients: int
    upstream_connections: int
    upstream_failures: int
    resets: int
    waiting: int
    held: int = 0
    held_released: int = 0
    held_replies: int = 0

    @property
    def bytes_forwarded(self) -> int:
        """Bytes sent in either direction: ``bytes_to_upstream + bytes_to_clients``."""
        return self.bytes_to_upstream + self.bytes_to_clients


@dataclass
class _Hold:
    """One rule of :meth:`FaultProxy.hold_requests`: segments that ``match`` wait
    ``seconds``; ``count`` more matches to go."""

    match: Callable[[bytes], bool]
    seconds: float
    count: int


def _shutdown(sock: socket.socket | None, how: int) -> None:
    """Shut ``sock`` down, ignoring a socket that is closed or not connected."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def _close(sock: socket.socket | None) -> None:
    """Close ``sock``, ignoring errors (a close with SO_LINGER 0 sends an RST)."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.close()


class _Connection:
    """One client connection and its upstream peer.

    ``lock`` guards ``closing``, ``upstream`` and ``users`` and every shutdown or close
    of the two sockets, so a socket is never shut down after another thread closed it
    (its descriptor could already belong to another socket). The sockets are closed by
    the last pump thread to finish (``users`` counts them): closing a socket that
    another thread is blocked on would not wake that thread, and an RST is only sent
    when the last reference to the socket goes away.
    """

    def __init__(self, client: socket.socket, number: int) -> None:
        self.client = client
        self.number = number
        self.upstream: socket.socket | None = None
        self.lock = threading.Lock()
        self.closing = False
        self.users = 1  # the pump from the client
        # Pump-from-upstream state (only that thread touches it):
        self.counted_mode: Mode | None = None
        self.counted_bytes = 0
        self.next_piece_at = 0.0
        #: Set by the pump from the client once it forwarded a held segment; the pump
        #: from the upstream counts the first reply after it (``held_replies``).
        self.awaiting_held_reply = False

    def abort(self, *, rst: bool) -> bool:
        """Start closing; ``rst`` makes the client see a reset. False if already closing.

        For an RST the client socket gets SO_LINGER 0 and only a read shutdown (which
        sends nothing but wakes a reader): a write shutdown would send a FIN first.
        """
        with self.lock:
            if self.closing:
                return False
            self.closing = True
            if rst:
                with contextlib.suppress(OSError):
                    self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                _shutdown(self.client, socket.SHUT_RD)
            else:
                _shutdown(self.client, socket.SHUT_RDWR)
            _shutdown(self.upstream, socket.SHUT_RDWR)
            return True

    def force_close(self) -> None:
        """Shut both sockets down both ways, waking every blocked read and write."""
        with self.lock:
            self.closing = True
            _shutdown(self.client, socket.SHUT_RDWR)
            _shutdown(self.upstream, socket.SHUT_RDWR)

    def client_eof(self) -> None:
        """The client closed its sending side: pass the FIN on, or close if no upstream."""
        with self.lock:
            if self.closing:
                return
            if self.upstream is not None:
                _shutdown(self.upstream, socket.SHUT_WR)
                return
        self.abort(rst=False)

    def release(self) -> bool:
        """A pump thread is done; the last one closes both sockets. True if it closed."""
        with self.lock:
            self.users -= 1
            if self.users > 0:
                return False
            self.closing = True
            _close(self.client)
            _close(self.upstream)
            return True


class FaultProxy:
    """A threaded TCP proxy from ``127.0.0.1:<free port>`` to ``upstream``, with faults.

    ``upstream`` is ``(host, port)``; ``upstream_connect_timeout`` (seconds) bounds each
    connect to it. ``clock`` returns monotonic seconds; it schedules trickled pieces,
    while the delays themselves are real waits on an
    :class:`threading.Event`, so it must advance in real time. Use it as a context
    manager, or call :meth:`start` and :meth:`stop`. Modes change at any time (from any
    thread) and apply to new connections and to the next chunk on existing ones.
    Starts in pass-through. Errors: :meth:`start` raises ``RuntimeError`` if called
    twice and ``OSError`` if it cannot listen; :meth:`stop` raises ``RuntimeError`` if
    threads are still alive after its timeout. Mode methods raise ``ValueError`` for
    negative or zero-size arguments.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        upstream_connect_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self._upstream_connect_timeout = upstream_connect_timeout
        self._clock = clock
        self._mode = Mode("pass_through")
        self._cond = threading.Condition()  # guards everything below; RLock inside
        self._stop_event = threading.Event()
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._port = 0
        self._started = False
        self._stopped = False
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[_Connection] = set()
        self._errors: list[BaseException] = []
        self._connections = 0
        self._bytes_received = 0
        self._bytes_to_upstream = 0
        self._bytes_to_clients = 0
        self._upstream_connections = 0
        self._upstream_failures = 0
        self._resets = 0
        self._waiting = 0
        self._holds: list[_Hold] = []
        self._held = 0
        self._held_released = 0
        self._held_replies = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen on a free loopback port and start accepting; return ``self``.

        Raises ``RuntimeError`` if already started or stopped (a stopped proxy cannot
        restart: make a new one) and ``OSError`` if the socket cannot be opened.
        """
        with self._cond:
            if self._started or self._stopped:
                raise RuntimeError("FaultProxy.start() called twice or after stop()")
            self._started = True
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((_HOST, 0))
            listener.listen(64)
            listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        thread = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-{self._port}-accept", daemon=True
        )
        self._accept_thread = thread
        thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Close the listener and every connection, and join all threads.

        Returns within about ``timeout`` seconds whatever the connections are doing:
        delays are interrupted and blocked socket calls are woken by shutting the
        sockets down; clients see the connection closed. Idempotent; a never-started
        proxy just becomes stopped. Raises ``RuntimeError`` naming the threads still
        alive after ``timeout`` (they are daemon threads, so they cannot block exit).
        """
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._stop_event.set()
            self._cond.notify_all()
        if not self._started:
            return
        deadline = time.monotonic() + timeout  # a real bound, whatever the clock
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            conn.force_close()
        alive: list[threading.Thread] = []
        while True:
            with self._cond:
                pending = [t for t in self._threads if t.is_alive()]
            if not pending:
                break
            for thread in pending:
                thread.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                alive = [t for t in pending if t.is_alive()]
                if alive:
                    break
        if self._accept_thread is not None and self._accept_thread.is_alive():
            alive.append(self._accept_thread)
        else:
            _close(self._listener)
            _close(self._wake_r)
            _close(self._wake_w)
        if alive:
            names = ", ".join(t.name for t in alive)
            raise RuntimeError(f"FaultProxy.stop(): threads still alive after {timeout}s: {names}")

    def __enter__(self) -> FaultProxy:
        """Start the proxy unless it is started already; return it."""
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the proxy (see :meth:`stop`)."""
        self.stop()

    # -- addresses and counters -------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port. Raises ``RuntimeError`` before :meth:`start`."""
        if not self._port:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``. Raises ``RuntimeError`` before :meth:`start`."""
        return f"{_HOST}:{self.port}"

    @property
    def mode(self) -> Mode:
        """The current mode."""
        return self._mode

    def stats(self) -> ProxyStats:
        """Return a consistent snapshot of all counters."""
        with self._cond:
            return ProxyStats(
                connections=self._connections,
                open_connections=len(self._conns),
                bytes_received=self._bytes_received,
                bytes_to_upstream=self._bytes_to_upstream,
                bytes_to_clients=self._bytes_to_clients,
                upstream_connections=self._upstream_connections,
                upstream_failures=self._upstream_failures,
                resets=self._resets,
                waiting=self._waiting,
                held=self._held,
                held_released=self._held_released,
                held_replies=self._held_replies,
            )

    @property
    def connections(self) -> int:
        """Client connections accepted since start."""
        return self.stats().connections

    @property
    def bytes_forwarded(self) -> int:
        """Bytes sent to the upstream plus bytes sent to clients, since start."""
        return self.stats().bytes_forwarded

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions caught in the proxy's threads (a bug if not empty).

        Socket errors (``OSError``) are expected in fault modes and are not recorded.
        """
        with self._cond:
            return list(self._errors)

    def wait_until(self, predicate: Callable[[ProxyStats], bool], timeout: float) -> bool:
        """Block until ``predicate(stats())`` is true, for at most ``timeout`` seconds.

        Woken by every counter change, so no polling. Returns whether the predicate
        became true.
        """
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.stats()), timeout)

    # -- modes ------------------------------------------------------------------------

    def _set_mode(self, mode: Mode) -> None:
        with self._cond:
            self._mode = mode
            self._cond.notify_all()

    def pass_through(self) -> None:
        """Forward bytes both ways unchanged."""
        self._set_mode(Mode("pass_through"))

    def latency(self, seconds: float) -> None:
        """Delay each chunk forwarded from the upstream by ``seconds`` (>= 0).

        Requests go upstream at once. A reply that arrives in several chunks is delayed
        once per chunk, so the added time is at least ``seconds``. Raises ``ValueError``
        if ``seconds`` is negative.
        """
        if seconds < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {seconds!r}")
        self._set_mode(Mode("latency", delay=float(seconds)))

    def black_hole(self) -> None:
        """Accept connections and read client bytes, but never forward or answer.

        New connections never reach the upstream; replies still in flight on existing
        connections are discarded. Swallowed bytes are not replayed if the mode changes.
        """
        self._set_mode(Mode("black_hole"))

    def reset(self) -> None:
        """Close client connections with an RST (SO_LINGER 0) as soon as they send.

        A reply arriving from the upstream in this mode resets its client too. Idle
        connections stay open until they send. The bytes are not forwarded.
        """
        self._set_mode(Mode("reset"))

    def close_mid_reply(self, after_bytes: int) -> None:
        """Forward ``after_bytes`` (>= 0) more upstream bytes, then close the client.

        Counted per connection from the first upstream chunk seen after this call (for
        a new connection: the first reply), so the client gets the reply's first
        ``after_bytes`` bytes and then a FIN (an RST if it had sent bytes the proxy had
        not read yet). The rest of the reply is dropped. Raises ``ValueError`` if
        ``after_bytes`` is negative.
        """
        if after_bytes < 0:
            raise ValueError(f"after_bytes must be >= 0, got {after_bytes!r}")
        self._set_mode(Mode("close_mid_reply", after_bytes=int(after_bytes)))

    def trickle(self, chunk: int, interval: float) -> None:
        """Forward upstream bytes ``chunk`` bytes at a time, one piece every ``interval`` s.

        Pieces on one connection are spaced at least ``interval`` seconds apart, across
        replies too; the first piece after an idle period goes at once. Each client
        read succeeds if ``interval`` is below its timeout, yet a whole reply of ``n``
        bytes takes about ``(ceil(n / chunk) - 1) * interval`` seconds. Switching to
        another mode applies to the rest of a reply being trickled. Raises
        ``ValueError`` if ``chunk`` < 1 or ``interval`` < 0.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 byte, got {chunk!r}")
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
        self._set_mode(Mode("trickle", chunk=int(chunk), interval=float(interval)))

    def hold_requests(self, match: Callable[[bytes], bool], seconds: float, count: int = 1) -> None:
        """Hold back the next ``count`` client segments for which ``match(segment)`` is
        true: each waits ``seconds`` (>= 0) before it goes upstream, whatever the mode
        (a write that a client timed out on, still delivered late, as a congested
        network does). The connection's later segments wait behind it. A segment is
        what one read from the client returned (a small command sent with one
        ``sendall`` over loopback is one). Rules add up; each ends after ``count``
        matches. :attr:`ProxyStats.held`, ``held_released`` and ``held_replies``
        count what happened. Raises ``ValueError`` if ``seconds`` < 0 or ``count`` < 1.
        """
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        with self._cond:
            self._holds.append(_Hold(match, float(seconds), int(count)))

    # -- internals --------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._cond:
            for name, delta in deltas.items():
                attr = f"_{name}"
                setattr(self, attr, getattr(self, attr) + delta)
            self._cond.notify_all()

    def _record_error(self, exc: BaseException) -> None:
        with self._cond:
            self._errors.append(exc)
            self._cond.notify_all()

    def _start_thread(
        self, target: Callable[[_Connection], None], conn: _Connection, role: str
    ) -> None:
        thread = threading.Thread(
            target=target,
            args=(conn,),
            name=f"faultproxy-{self._port}-c{conn.number}-{role}",
            daemon=True,
        )
        # Started under the lock: a thread listed but not started yet is not alive, so
        # another start's sweep of finished threads would drop it from the list, and
        # stop() would neither join it nor report it (found under CI's load).
        with self._cond:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _hold_delay(self, data: bytes) -> float | None:
        """The hold for client segment ``data`` (seconds), counted; None if none."""
        with self._cond:
            for rule in self._holds:
                if rule.match(data):
                    rule.count -= 1
                    if rule.count == 0:
                        self._holds.remove(rule)
                    self._held += 1
                    self._cond.notify_all()
                    return rule.seconds
        return None

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` unless stopped first; True if the proxy is stopping."""
        self._count(waiting=1)
        try:
            return self._stop_event.wait(seconds)
        finally:
            self._count(waiting=-1)

    def _accept_loop(self) -> None:
        listener, wake_r = self._listener, self._wake_r
        assert listener is not None and wake_r is not None
        selector = selectors.DefaultSelector()
        try:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake_r, selectors.EVENT_READ)
            while not self._stop_event.is_set():
                for key, _ in selector.select():
                    if key.fileobj is wake_r:
                        return
                    try:
                        client, _ = listener.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    self._register(client)
        except Exception as exc:  # a bug: keep it for the test to see
            self._record_error(exc)
        finally:
            selector.close()

    def _register(self, client: socket.socket) -> None:
        client.setblocking(True)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cond:
            if self._stop_event.is_set():
                _close(client)
                return
            self._connections += 1
            conn = _Connection(client, self._connections)
            self._conns.add(conn)
            # Started under the lock so stop() cannot miss the thread.
            self._start_thread(self._pump_from_client, conn, "up")
            self._cond.notify_all()

    def _forget(self, conn: _Connection) -> None:
        with self._cond:
            self._conns.discard(conn)
            self._cond.notify_all()

    def _release(self, conn: _Connection) -> None:
        if conn.release():
            self._forget(conn)

    def _reset_client(self, conn: _Connection) -> None:
        if conn.abort(rst=True):
            self._count(resets=1)

    def _connect_upstream(self, conn: _Connection) -> socket.socket | None:
        """Connect to the upstream and start the pump from it; None if that failed."""
        try:
            upstream = socket.create_connection(
                self.upstream, timeout=self._upstream_connect_timeout
            )
        except OSError:
            self._count(upstream_failures=1)
            conn.abort(rst=False)
            return None
        upstream.settimeout(None)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn.lock:
            if conn.closing:
                _close(upstream)
                return None
            conn.upstream = upstream
            conn.users += 1
            # Started under the connection's lock, so force_close() cannot miss it.
            self._start_thread(self._pump_from_upstream, conn, "down")
        self._count(upstream_connections=1)
        return upstream

    def _pump_from_client(self, conn: _Connection) -> None:
        try:
            while True:
                data = conn.client.recv(_RECV_SIZE)
                if not data:
                    conn.client_eof()
                    return
                self._count(bytes_received=len(data))
                kind = self._mode.kind
                if kind == "reset":
                    self._reset_client(conn)
                    return
                if kind == "black_hole":
                    continue
                held = self._hold_delay(data) if self._holds else None
                if held is not None and self._pause(held):
                    return
                upstream = conn.upstream or self._connect_upstream(conn)
                if upstream is None:
                    return
                if held is not None:
                    conn.awaiting_held_reply = True
                    self._count(held_released=1)
                self._count(bytes_to_upstream=len(data))  # before: see ProxyStats
                upstream.sendall(data)
        except OSError:
            conn.abort(rst=False)
        except Exception as exc:  # a bug: keep it for the test to see
            self._record_error(exc)
            conn.abort(rst=False)
        finally:
            self._release(conn)

    def _pump_from_upstream(self, conn: _Connection) -> None:
        try:
            upstream = conn.upstream
            assert upstream is not None
            while True:
                data = upstream.recv(_RECV_SIZE)
                if not data:
                    conn.abort(rst=False)
                    return
                if conn.awaiting_held_reply:
                    conn.awaiting_held_reply = False
                    self._count(held_replies=1)
                if not self._deliver(conn, data):
                    return
        except OSError:
            conn.abort(rst=False)
        except Exception as exc:  # a bug: keep it for the test to see
            self._record_error(exc)
            conn.abort(rst=False)
        finally:
            self._release(conn)

    def _send_to_client(self, conn: _Connection, data: bytes) -> None:
        self._count(bytes_to_clients=len(data))  # before: see ProxyStats
        conn.client.sendall(data)

    def _deliver(self, conn: _Connection, data: bytes) -> bool:
        """Send one upstream chunk to the client per the mode; False ends the pump."""
        while data:
            mode = self._mode
            if mode.kind == "pass_through":
                self._send_to_client(conn, data)
                return True
            if mode.kind == "latency":
                if self._pause(mode.delay):
                    return False
                self._send_to_client(conn, data)
                return True
            if mode.kind == "black_hole":
                return True
            if mode.kind == "reset":
                self._reset_client(conn)
                return False
            if mode.kind == "close_mid_reply":
                if conn.counted_mode is not mode:
                    conn.counted_mode, conn.counted_bytes = mode, 0
                piece = data[: mode.after_bytes - conn.counted_bytes]
                if piece:
                    self._send_to_client(conn, piece)
                    conn.counted_bytes += len(piece)
                if conn.counted_bytes >= mode.after_bytes:
                    conn.abort(rst=False)
                    return False
                return True
            # trickle
            now = self._clock()
            if conn.next_piece_at > now:
                if self._pause(conn.next_piece_at - now):
                    return False
                continue  # the mode may have changed while waiting
            piece, data = data[: mode.chunk], data[mode.chunk :]
            self._send_to_client(conn, piece)
            conn.next_piece_at = self._clock() + mode.interval
        return True


class BacklogListener:
    """A loopback listener that never accepts, its queue full: connects never complete.

    ``backlog`` is passed to ``listen``; the default 1 does not depend on SYN cookies
    (see the module docstring). :meth:`start` opens connections of its own until the
    accept queue is full (at most ``max_fillers``, each connect bounded by
    ``fill_timeout`` seconds); after that the kernel drops every SYN, so a client's
    connect ends only by its own connect timeout (``TimeoutError``). Use it as a
    context manager, or call :meth:`start` and :meth:`stop`. Raises ``RuntimeError``
    if the queue cannot be filled.
    """

    def __init__(
        self, *, backlog: int = 1, max_fillers: int = 16, fill_timeout: float = 1.0
    ) -> None:
        self.backlog = backlog
        self.max_fillers = max_fillers
        self.fill_timeout = fill_timeout
        self.fillers: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._port = 0

    def start(self) -> BacklogListener:
        """Listen on a free loopback port and fill the accept queue; return ``self``.

        Raises ``RuntimeError`` if started twice or if the queue is not full after
        ``max_fillers`` connections, ``OSError`` if the socket cannot be opened.
        """
        if self._listener is not None:
            raise RuntimeError("BacklogListener.start() called twice")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener = listener
        try:
            listener.bind((_HOST, 0))
            listener.listen(self.backlog)
            self._port = int(listener.getsockname()[1])
            self._fill()
        except BaseException:
            self.stop()
            raise
        return self

    def _fill(self) -> None:
        while not self.is_full():
            if len(self.fillers) >= self.max_fillers:
                raise RuntimeError(f"accept queue not full after {len(self.fillers)} connections")
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(self.fill_timeout)
            try:
                filler.connect((_HOST, self._port))
            except TimeoutError as exc:
                # The queue filled up as the kernel processed the previous handshake.
                filler.close()
                if self.is_full():
                    return
                raise RuntimeError("a filler connect timed out but the queue is not full") from exc
            except BaseException:
                filler.close()
                raise
            self.fillers.append(filler)
            self._settle(len(self.fillers))

    def _queue_length(self) -> int | None:
        """Connections waiting in the accept queue, or None where TCP_INFO is missing."""
        tcp_info = getattr(socket, "TCP_INFO", None)
        if tcp_info is None or self._listener is None:
            return None
        info = self._listener.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_SIZE)
        return int(struct.unpack_from("I", info, _TCP_INFO_UNACKED_OFFSET)[0])

    def _settle(self, expected: int) -> None:
        """Wait (at most 0.2 s) until the kernel has queued ``expected`` connections.

        The client's connect returns when the SYN-ACK arrives; the listener queues the
        connection when it processes the final ACK, a moment later on loopback.
        """
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            queued = self._queue_length()
            if queued is None or queued >= expected:
                return
            time.sleep(0.001)  # kernel-side state; there is no event to wait on

    def is_full(self) -> bool:
        """Whether the accept queue is full (a new SYN would be dropped).

        Exact on Linux (``TCP_INFO``). Elsewhere, a probe connect of up to 0.1 s: a
        probe that completes is kept as one more filler.
        """
        if self._listener is None:
            raise RuntimeError("BacklogListener is not started")
        queued = self._queue_length()
        if queued is not None:
            return queued > self.backlog
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.1)
        try:
            probe.connect((_HOST, self._port))
        except TimeoutError:
            probe.close()
            return True
        self.fillers.append(probe)
        return False

    def connect_completes(self, timeout: float) -> bool:
        """Try one connect bounded by ``timeout`` seconds; whether it completed.

        False is what a full listener gives. A connect that completes is kept as a
        filler (the queue then has one fewer free slot, if any).
        """
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(timeout)
        try:
            probe.connect((_HOST, self.port))
        except TimeoutError:
            probe.close()
            return False
        self.fillers.append(probe)
        return True

    @property
    def port(self) -> int:
        """The listening port. Raises ``RuntimeError`` before :meth:`start`."""
        if not self._port:
            raise RuntimeError("BacklogListener is not started")
        return self._port

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``. Raises ``RuntimeError`` before :meth:`start`."""
        return f"{_HOST}:{self.port}"

    def stop(self) -> None:
        """Close the fillers and the listener. Idempotent; never blocks."""
        for filler in self.fillers:
            _close(filler)
        self.fillers.clear()
        _close(self._listener)

    def __enter__(self) -> BacklogListener:
        """Start the listener unless it is started already; return it."""
        if self._listener is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the listener (see :meth:`stop`)."""
        self.stop()
