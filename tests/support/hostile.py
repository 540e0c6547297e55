"""A hostile fake memcached for the tests: a threaded TCP server on loopback that
answers every command from a script.

:class:`HostileServer` parses memcached's text protocol as a client sends it (a command
line, and the data block of a storage command), hands each command to its script as a
:class:`Request`, and performs the :data:`Reply` the script returns:

- :class:`Send`: the bytes at once;
- :class:`Drip`: the bytes in ``chunk``-byte pieces, waiting ``interval`` seconds
  before each (a server that is slow but never silent for long);
- :class:`Flood`: ``head``, then ``size`` filler bytes as fast as the client reads
  them, then it closes (a reply far larger than anything asked for);
- :class:`Hang`: nothing, ever (the connection stays open);
- :class:`Close`: closes the connection.

The script can be changed at any time (:meth:`HostileServer.answer`); it applies from
the next command. Waits are on the server's stop :class:`threading.Event`, and
:meth:`HostileServer.stop` shuts every socket down, so stopping never hangs. A send that
fails because the client went away ends that connection quietly; any other exception
in a server thread is kept in :attr:`HostileServer.errors` for the test to check.

Helpers build replies: :func:`value_reply` (a ``get`` hit), :data:`MISS`, and
:func:`honest` (a script that answers like an empty memcached that stores nothing).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

__all__ = [
    "MISS",
    "Close",
    "Drip",
    "Flood",
    "Hang",
    "HostileServer",
    "Reply",
    "Request",
    "Script",
    "Send",
    "honest",
    "value_reply",
]

_HOST = "127.0.0.1"
#: Commands followed by a data block (its size is their 4th argument).
_STORAGE = frozenset({b"set", b"add", b"replace", b"append", b"prepend", b"cas"})


@dataclass(frozen=True)
class Request:
    """One command as the client sent it: its name (``b"get"``), the words after it,
    and the data block of a storage command (None for the others)."""

    command: bytes
    args: tuple[bytes, ...]
    data: bytes | None = None


@dataclass(frozen=True)
class Send:
    """Send ``data`` at once."""

    data: bytes


@dataclass(frozen=True)
class Drip:
    """Send ``data`` in pieces of ``chunk`` bytes, waiting ``interval`` seconds before
    each piece."""

    data: bytes
    interval: float
    chunk: int = 1


@dataclass(frozen=True)
class Flood:
    """Send ``head``, then ``size`` bytes of ``filler`` (repeated) as fast as the client
    reads, then close the connection."""

    head: bytes
    size: int
    filler: bytes = b"x" * 65536


@dataclass(frozen=True)
class Hang:
    """Never answer (until the server stops)."""


@dataclass(frozen=True)
class Close:
    """Close the connection."""


Reply = Send | Drip | Flood | Hang | Close
#: What answers each command.
Script = Callable[[Request], Reply]

#: memcached's answer to a ``get`` of absent keys.
MISS = b"END\r\n"


def value_reply(key: bytes, data: bytes, flags: int = 0) -> bytes:
    """The reply to ``get <key>`` when it holds ``data``."""
    return b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (key, flags, len(data), data)


_HONEST: dict[bytes, bytes] = {
    b"get": MISS,
    b"gets": MISS,
    b"set": b"STORED\r\n",
    b"add": b"STORED\r\n",
    b"cas": b"NOT_FOUND\r\n",
    b"delete": b"NOT_FOUND\r\n",
    b"incr": b"NOT_FOUND\r\n",
    b"decr": b"NOT_FOUND\r\n",
    b"touch": b"NOT_FOUND\r\n",
    b"flush_all": b"OK\r\n",
    b"version": b"VERSION 1.6.0-hostile\r\n",
}


def honest(request: Request) -> Reply:
    """A script that answers like an empty memcached that keeps nothing: every read
    misses, every store is acknowledged (and forgotten)."""
    return Send(_HONEST.get(request.command, b"ERROR\r\n"))


class _Gone(Exception):
    """The client closed its end, or the server is stopping."""


class HostileServer:
    """A fake memcached on ``127.0.0.1:<free port>`` that answers from ``script``
    (:func:`honest` by default). Use it as a context manager, or call :meth:`start`
    and :meth:`stop`. Thread-safe. :attr:`requests` lists every command received, in
    order; :attr:`connections` counts the connections accepted."""

    def __init__(self, script: Script = honest) -> None:
        self._script = script
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self.port = 0
        self.requests: list[Request] = []
        self.connections = 0
        self.errors: list[BaseException] = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> HostileServer:
        """Listen on a free loopback port and start accepting; return ``self``."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((_HOST, 0))
        listener.listen(64)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._spawn(self._accept_loop, "accept")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection (waking any wait) and join the
        threads. Raises ``RuntimeError`` naming threads still alive after ``timeout``
        seconds. Idempotent."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept on Linux
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout)
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"HostileServer.stop(): threads still alive: {alive}")

    def __enter__(self) -> HostileServer:
        """Start the server; return it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server (see :meth:`stop`)."""
        self.stop()

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``, as a layer's ``servers`` setting takes it."""
        return f"{_HOST}:{self.port}"

    def answer(self, script: Script) -> None:
        """Answer the next commands (on every connection) from ``script``."""
        with self._lock:
            self._script = script

    # -- threads ---------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(
            target=target, args=args, name=f"hostile-{self.port}-{name}", daemon=True
        )
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # shut down by stop()
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._conns.add(conn)
            self._spawn(self._serve, f"c{number}", conn)

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                request, buf = self._read_request(conn, buf)
                with self._lock:
                    self.requests.append(request)
                    script = self._script
                self._perform(conn, script(request))
        except (_Gone, OSError):
            pass  # the client went away, or stop() shut the socket down
        except BaseException as exc:  # a bug in a script or here: keep it for the test
            self.errors.append(exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _read_request(self, conn: socket.socket, buf: bytes) -> tuple[Request, bytes]:
        """The next command on ``conn`` (``buf``: bytes already received), and what
        was received after it."""
        while b"\r\n" not in buf:
            buf += self._recv(conn)
        line, buf = buf.split(b"\r\n", 1)
        command, *args = line.split(b" ")
        data = None
        if command in _STORAGE and len(args) >= 4 and args[3].isdigit():
            size = int(args[3])
            while len(buf) < size + 2:
                buf += self._recv(conn)
            data, buf = buf[:size], buf[size + 2 :]
        return Request(command, tuple(args), data), buf

    def _recv(self, conn: socket.socket) -> bytes:
        data = conn.recv(65536)
        if not data:
            raise _Gone
        return data

    def _perform(self, conn: socket.socket, reply: Reply) -> None:
        if isinstance(reply, Send):
            conn.sendall(reply.data)
        elif isinstance(reply, Drip):
            for start in range(0, len(reply.data), reply.chunk):
                if self._stop.wait(reply.interval):
                    raise _Gone
                conn.sendall(reply.data[start : start + reply.chunk])
        elif isinstance(reply, Flood):
            conn.sendall(reply.head)
            left = reply.size
            while left > 0:
                piece = reply.filler[:left]
                conn.sendall(piece)
                left -= len(piece)
            raise _Gone  # closes the connection
        elif isinstance(reply, Hang):
            self._stop.wait()
            raise _Gone
        else:
            raise _Gone
