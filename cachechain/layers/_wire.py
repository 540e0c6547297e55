"""memcached's text protocol as a :class:`~cachechain.MemcachedLayer` speaks it: its
pooled :class:`Connection` objects and every command the layer sends (but the meta
commands of leases, ``mn``/``mg``/``md``, which :mod:`._memcached_lease` sends on the same
connections through :meth:`Connection._command` and its reply stream, under the same
bounds).

Three bounds hold for every command, whatever the server does:

- **One deadline per call.** Each command takes ``deadline``, a :func:`time.monotonic`
  time computed once by the layer call (so a compare-and-set loop shares it). The
  server's name lookup waits for the resolver until then at most (:mod:`._resolve`).
  Before every socket operation (connect, send, each read) the socket's timeout is set
  to the time left; a call with no time left raises ``TimeoutError`` (``socket.timeout``). A
  server that answers one byte at a time cannot stretch a call past its deadline.
- **Memory on the layer's word, not the server's.** A reply line longer than
  :data:`MAX_LINE` bytes, or a ``get`` reply with a key not asked for (or twice), is
  not the protocol: ``MemcacheUnknownError``. A value announced larger than the
  connection's ``max_value`` (the layer's ``max_value_size``: it never stores more)
  raises :class:`ValueTooLargeError` (a ``MemcacheUnknownError``) from its header line.
  Either is raised before anything that size is allocated.
- **No** ``select()``. Waiting is the socket's own timeout (``poll`` inside CPython,
  the hub under gevent); the zero-time readability check is :func:`readable_now`
  (``poll``). ``select()`` refuses descriptors above 1023, which a process with many
  files open hands out.

Python's socket timeout stays the only way a call waits (see ``docs/design.md``: kernel
timeouts vanish under gevent and restart on every signal). Setting it costs a system
call, so it is changed only when the time left differs from the one set by more than
:data:`_SLACK` (the millisecond resolution of ``poll``): a fresh call on an idle
connection, whose time left is the full ``timeout`` already set, changes nothing.

:func:`get` is the hot path (every L2 read): for the reply that arrives in one read it
is one ``os.write`` of the command on the descriptor and one ``recv``, parsed inline;
each rarer case is a function of its own.

Errors keep pymemcache's types so the layer maps them in one place:
``MemcacheUnexpectedCloseError`` when the server closes the connection,
``MemcacheUnknownCommandError``, ``MemcacheClientError`` or ``MemcacheServerError`` for
an error line, ``MemcacheUnknownError`` for a reply that is not the protocol (or is
out of bounds), and the socket's own ``OSError`` (``TimeoutError`` included). After
any exception the caller must discard the connection: its stream is at an unknown
point.
"""

from __future__ import annotations

# Imported now, not on a thread's first connect: getaddrinfo of a str host encodes it
# with the "idna" codec, imported lazily on first use, and several threads importing
# it at once (gunicorn gthread workers forked from a --preload master, all connecting
# on their first requests) can fail with LookupError('unknown encoding: idna').
import codecs
import encodings.idna  # noqa: F401
import math
import os
import re
import select
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final, NoReturn

from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
    MemcacheUnknownError,
)

from ._counters import COUNTER_FLAG_BYTES, RawCounter
from ._resolve import RESOLVER

codecs.lookup("idna")  # and in the codec registry's cache (see the import above)

__all__ = [
    "MAX_LINE",
    "MAX_VALUE",
    "Connection",
    "ValueTooLargeError",
    "get",
    "readable_now",
    "stale",
]

#: The longest reply line accepted, CRLF excluded: a ``VALUE`` line (a 250-byte key,
#: flags, size and CAS) or an error message is far shorter.
MAX_LINE: Final = 2048
#: memcached's own ceiling for an item (``-I`` at most 1 GiB): no connection reads more.
MAX_VALUE: Final = 1 << 30

_MISS: Final = b"END\r\n"
_TRAILER: Final = b"\r\nEND\r\n"  # after a value's data block
_RECV_SIZE: Final = 65536
#: A ``get`` reply's item with flags 0 (not a counter): key, then the size, of at most
#: 10 digits (what :func:`_header` accepts), then the item's data.
_VALUE: Final = re.compile(rb"VALUE (\S+) 0 ([0-9]{1,10})\r\n")
#: The socket's timeout is left alone while it is within this many seconds of the
#: time left (poll, which enforces it, counts in milliseconds).
_SLACK: Final = 0.001
#: The type a value read with these client flags is returned as (others: bytes).
_BY_FLAGS: dict[bytes, type[bytes]] = {COUNTER_FLAG_BYTES: RawCounter}
_monotonic = time.monotonic
_poll = getattr(select, "poll", None)


class ValueTooLargeError(MemcacheUnknownError):  # type: ignore[misc]
    """A reply announced a value larger than the connection's ``max_value``: nothing of
    it was read (the stream is left mid-reply, so the connection must be dropped)."""


class Connection:
    """One connection to the memcached server at ``server`` (``(host, port)``),
    opened on first use.

    ``connect_timeout`` bounds connecting (within the call's deadline); ``timeout`` is
    the time a fresh call has (the socket's timeout between calls); ``max_value``
    (bytes) is the largest value a reply may carry. Not thread-safe: a pool hands it to
    one caller at a time. Every command takes the call's ``deadline`` (monotonic
    seconds) last and raises as the module docstring says.
    """

    __slots__ = (
        "armed",
        "connect_timeout",
        "max_value",
        "out",
        "pending",
        "poller",
        "sent",
        "server",
        "sock",
        "timeout",
        "unread",
        "used",
    )

    def __init__(
        self, server: tuple[str, int], *, connect_timeout: float, timeout: float, max_value: int
    ) -> None:
        self.server = server
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_value = min(max_value, MAX_VALUE)
        #: The connected socket, or None before the first command and after close.
        self.sock: socket.socket | None = None
        #: The timeout currently set on ``sock`` (seconds).
        self.armed = timeout
        #: Whether bytes of a command (not ``get``) may have reached the server and its
        #: whole reply has not been read: after a timeout, the server may still run it.
        self.pending = False
        #: The last command sent by :meth:`_command`, and how many of its bytes went
        #: out: what is left to send if the send itself timed out.
        self.out = b""
        self.sent = 0
        #: The start of a reply line read before a read of its rest timed out (the
        #: reaper reads on from it: a split ``STORED`` must still be recognized).
        self.unread = b""
        #: The ``poll`` object :func:`stale` asks about ``sock`` (made on its first
        #: use, dropped with the socket), or None.
        self.poller: Any = None
        #: When the last command that must not run twice was answered on this
        #: connection (the pool's monotonic clock; see :meth:`Pool.call_once
        #: <._pool.Pool.call_once>`).
        self.used = -math.inf

    def connect(self, deadline: float) -> socket.socket:
        """Open the connection (``TCP_NODELAY``), trying each address of the host in
        turn, within ``connect_timeout`` and the deadline, the name lookup included
        (:mod:`._resolve`: a last good answer stands in for a resolver that fails or
        hangs); return its socket."""
        self.close()
        host, port = self.server
        error: OSError = OSError(f"no address found for {host!r}")
        found = RESOLVER.addresses(host, port, min(deadline, _monotonic() + self.connect_timeout))
        for family, kind, proto, _, address in found:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(min(self.connect_timeout, _left(deadline)))
                sock.connect(address)
                sock.settimeout(self.timeout)
            except OSError as exc:
                sock.close()
                if isinstance(exc, TimeoutError):
                    raise
                error = exc
                continue
            self.sock, self.armed = sock, self.timeout
            return sock
        raise error

    def close(self) -> None:
        """Close the socket, if open (the next command connects again)."""
        sock, self.sock = self.sock, None
        self.poller = None
        if sock is not None:
            sock.close()

    # -- retrieval -------------------------------------------------------------------

    def get_many(self, keys: Iterable[bytes], deadline: float) -> dict[bytes, bytes]:
        """``get k1 k2 ...``: the stored bytes of each key found (a
        :class:`._counters.RawCounter` for a counter), in one round trip."""
        wanted = set(keys)
        if not wanted:
            return {}
        reply = self._command(b"get " + b" ".join(wanted) + b"\r\n", deadline)
        found: dict[bytes, bytes] = {}
        match, max_value = _VALUE.match, self.max_value
        buf, pos = reply.buf, reply.pos
        while True:
            # A whole plain item already read: one regex match and two slices (a
            # batch's usual case; each item through line() and _header() cost twice as
            # much), the position kept here. Anything else (END, an item in pieces, a
            # flag, an error or a malformed line) takes the careful path below.
            m = match(buf, pos)
            if m is not None:
                key, size = m[1], int(m[2])
                start = m.end()
                end = start + size
                if (
                    size <= max_value
                    and buf[end : end + 2] == b"\r\n"
                    and key in wanted
                    and key not in found
                ):
                    found[key] = buf[start:end]
                    pos = end + 2
                    continue
            reply.pos = pos
            line = reply.line()
            if line == b"END":
                break
            key, flags, size, _ = _header(line, b"get", max_value)
            if key not in wanted or key in found:
                raise MemcacheUnknownError(f"unexpected key in reply to get: {line[:80]!r}")
            found[key] = _BY_FLAGS.get(flags, bytes)(reply.block(size))
            buf, pos = reply.buf, reply.pos
        reply.finish()
        return found

    def gets(self, key: bytes, deadline: float) -> tuple[bytes | None, bytes | None]:
        """``gets key``: ``(stored bytes, cas token)``, or ``(None, None)`` on a miss."""
        reply = self._command(b"gets " + key + b"\r\n", deadline)
        line = reply.line()
        if line == b"END":
            reply.finish()
            return None, None
        found, flags, size, cas = _header(line, b"gets", self.max_value)
        if found != key or cas is None:
            raise MemcacheUnknownError(f"unexpected reply to gets: {line[:80]!r}")
        data = _BY_FLAGS.get(flags, bytes)(reply.block(size))
        if reply.line() != b"END":
            raise MemcacheUnknownError(f"value of {key!r} not followed by END")
        reply.finish()
        return data, cas

    # -- storage ---------------------------------------------------------------------

    def set(self, key: bytes, value: bytes, expire: int, deadline: float) -> bool:
        """``set``: whether memcached stored the value."""
        return self._store(b"set", key, value, expire, b"", deadline) == b"STORED"

    def add(self, key: bytes, value: bytes, expire: int, deadline: float) -> bool:
        """``add``: whether the value was stored (False: the key exists)."""
        # _store, two calls shorter: every Chain.add's path.
        line, rest = _line_reply(self, _storage(b"add", key, value, expire), deadline)
        if line != b"STORED":
            _stored(line, b"add")
        if rest is not None:
            rest.finish()
        return line == b"STORED"

    def cas(
        self, key: bytes, value: bytes, cas: bytes, expire: int, deadline: float
    ) -> bool | None:
        """``cas``: True when stored, False when the key changed since ``cas`` was
        read, None when it is gone."""
        line = self._store(b"cas", key, value, expire, b" " + cas, deadline)
        if line not in _CAS_RESULTS:
            _raise_for(line, b"cas")
        return _CAS_RESULTS[line]

    def set_many(self, values: Mapping[bytes, bytes], expire: int, deadline: float) -> list[bytes]:
        """One pipelined ``set`` per item, in one round trip; return the keys memcached
        did not store."""
        reply = self._command(
            b"".join(_storage(b"set", k, v, expire) for k, v in values.items()), deadline
        )
        failed = [key for key in values if _stored(reply.line(), b"set") != b"STORED"]
        reply.finish()
        return failed

    def _store(
        self, name: bytes, key: bytes, value: bytes, expire: int, extra: bytes, deadline: float
    ) -> bytes:
        line, rest = _line_reply(self, _storage(name, key, value, expire, extra), deadline)
        _stored(line, name)
        if rest is not None:
            rest.finish()
        return line

    # -- other commands --------------------------------------------------------------

    def delete(self, key: bytes, deadline: float) -> bool:
        """``delete``: whether the key existed."""
        return self._one_line(b"delete " + key + b"\r\n", b"delete", _DELETE_RESULTS, deadline)

    def delete_many(self, keys: Iterable[bytes], deadline: float) -> bool:
        """One pipelined ``delete`` per key, in one round trip; True once all answered."""
        keys = list(keys)
        reply = self._command(b"".join(b"delete " + key + b"\r\n" for key in keys), deadline)
        for _ in keys:
            _expect(reply.line(), b"delete", _DELETE_RESULTS)
        reply.finish()
        return True

    def incr(self, key: bytes, delta: int, deadline: float) -> int | None:
        """``incr``: the new (unsigned) value, or None when the key is absent."""
        # _count, one call shorter: every Chain.incr's path.
        line, rest = _line_reply(self, b"incr %s %d\r\n" % (key, delta), deadline)
        if rest is not None:
            rest.finish()
        if line.isdigit() and len(line) <= 20:
            return int(line)
        if line == b"NOT_FOUND":
            return None
        _raise_for(line, b"incr")

    def decr(self, key: bytes, delta: int, deadline: float) -> int | None:
        """``decr``: the new value (memcached stops at 0), or None when absent."""
        return self._count(b"decr", key, delta, deadline)

    def touch(self, key: bytes, expire: int, deadline: float) -> bool:
        """``touch``: whether the key existed (and now expires after ``expire``)."""
        command = b"touch %s %d\r\n" % (key, expire)
        return self._one_line(command, b"touch", _TOUCH_RESULTS, deadline)

    def flush_all(self, deadline: float) -> bool:
        """``flush_all``: empty the server (every key, every application's)."""
        return self._one_line(b"flush_all\r\n", b"flush_all", {b"OK": True}, deadline)

    def _count(self, name: bytes, key: bytes, delta: int, deadline: float) -> int | None:
        line, rest = _line_reply(self, b"%s %s %d\r\n" % (name, key, delta), deadline)
        if rest is not None:
            rest.finish()
        if line == b"NOT_FOUND":
            return None
        if not line.isdigit() or len(line) > 20:
            _raise_for(line, name)
        return int(line)

    def _one_line(
        self, command: bytes, name: bytes, results: Mapping[bytes, bool], deadline: float
    ) -> bool:
        line, rest = _line_reply(self, command, deadline)
        result = _expect(line, name, results)
        if rest is not None:
            rest.finish()
        return result

    def _command(self, command: bytes, deadline: float) -> _Reply:
        """Send ``command`` and return its reply stream, to read within ``deadline``."""
        sock = _ready(self, deadline)
        self.pending = True
        _send_counted(self, sock, command, deadline)
        return _Reply(self, sock, deadline)


_CAS_RESULTS: dict[bytes, bool | None] = {b"STORED": True, b"EXISTS": False, b"NOT_FOUND": None}
_STORE_LINES: Final = frozenset({b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND"})
_DELETE_RESULTS: dict[bytes, bool] = {b"DELETED": True, b"NOT_FOUND": False}
_TOUCH_RESULTS: dict[bytes, bool] = {b"TOUCHED": True, b"NOT_FOUND": False}


def _storage(name: bytes, key: bytes, value: bytes, expire: int, extra: bytes = b"") -> bytes:
    """A storage command and its data block; a :class:`RawCounter` gets its flag."""
    flags = COUNTER_FLAG_BYTES if value.__class__ is RawCounter else b"0"
    header = b"%s %s %s %d %d%s\r\n" % (name, key, flags, expire, len(value), extra)
    return b"".join((header, value, b"\r\n"))


def _stored(line: bytes, name: bytes) -> bytes:
    """The reply line of a storage command, if it is one."""
    if line not in _STORE_LINES:
        _raise_for(line, name)
    return line


def _expect(line: bytes, name: bytes, results: Mapping[bytes, bool]) -> bool:
    """What reply ``line`` to command ``name`` means, per ``results``."""
    result = results.get(line)
    if result is None:
        _raise_for(line, name)
    return bool(result)


# -- the hot path ------------------------------------------------------------------------


def get(conn: Connection, key: bytes, deadline: float) -> bytes | None:
    """Send ``get <key>`` on ``conn`` and return the stored bytes (a
    :class:`._counters.RawCounter` for a value stored with the counter flag), or None on
    a miss, within ``deadline``. ``key`` must already be a valid memcached key (see
    ``memcached_key``). Raises as the module docstring says."""
    # Kept in one piece for the reply that fits one read (every L2 hit and miss): each
    # rarer case (a line or a value in pieces, an error) is a call of its own.
    sock = conn.sock
    if sock is None or not -_SLACK < conn.armed - (deadline - _monotonic()) < _SLACK:
        sock = _ready(conn, deadline)
    _send(sock, b"get " + key + b"\r\n")
    buf: bytes = sock.recv(_RECV_SIZE)
    if buf == _MISS:
        return None
    eol = buf.find(b"\r\n")
    if eol < 0:  # the reply line arrived in pieces
        buf, eol = _read_line(conn, sock, buf, deadline)
    m = _VALUE.match(buf)  # a plain item (flags 0): one match instead of _header's steps
    if m is not None and m[1] == key and m.end() == eol + 2:
        flags, size = b"0", int(m[2])
        if size > conn.max_value:  # _header raises what this is
            _header(buf[:eol], b"get", conn.max_value)
    else:
        line = buf[:eol]
        if line == b"END":  # a miss that arrived in pieces
            _check_miss(buf, eol, key)
            return None
        found, flags, size, _ = _header(line, b"get", conn.max_value)
        if found != key:
            raise MemcacheUnknownError(f"unexpected reply to get: {line[:80]!r}")
    start = eol + 2
    end = start + size
    if len(buf) < end + len(_TRAILER):  # a value larger than the first read
        data = _read_large(conn, sock, buf, start, size, key, deadline)
    elif buf[end:] != _TRAILER:  # more or other than one value: desync
        raise MemcacheUnknownError(f"value of {key!r} not followed by END alone")
    else:
        data = buf[start:end]
    # A counter (stored without an envelope) comes back marked; bytes(data) is data.
    return _BY_FLAGS.get(flags, bytes)(data)


def _line_reply(conn: Connection, command: bytes, deadline: float) -> tuple[bytes, _Reply | None]:
    """Send ``command`` (counted, as :meth:`Connection._command` sends it), whose reply
    is one line, and read that line (without its CRLF) within ``deadline``. Return it
    with None when it came alone in one read (the reply is complete: the command is no
    longer pending), or else with the :class:`_Reply` it was read from, for the caller
    to :meth:`~_Reply.finish` once it has checked the line: every write's path (set,
    add, cas, incr, decr, delete, touch), one frame for the reply that fits one read."""
    sock = conn.sock
    if sock is None or not -_SLACK < conn.armed - (deadline - _monotonic()) < _SLACK:
        sock = _ready(conn, deadline)
    conn.pending = True
    conn.out = command  # _send_counted, one call shorter
    try:
        sent = os.write(sock.fileno(), command)
    except BlockingIOError:
        sent = 0
    conn.sent = sent
    if sent < len(command):
        _send_rest(conn, sock, command, sent, deadline)
        _arm(conn, sock, deadline)  # for the reply, after a send that took a while
    buf: bytes = sock.recv(_RECV_SIZE)
    eol = buf.find(b"\r\n")
    if eol + 2 == len(buf) and 0 <= eol <= MAX_LINE:
        conn.pending, conn.out = False, b""
        return buf[:eol], None
    if not buf:
        raise MemcacheUnexpectedCloseError()
    reply = _Reply(conn, sock, deadline)  # in pieces, too long or followed by more
    reply.buf = buf
    return reply.line(), reply


def _ready(conn: Connection, deadline: float) -> socket.socket:
    """``conn``'s socket, connected, its timeout the time left before ``deadline``."""
    sock = conn.sock
    if sock is None:
        sock = conn.connect(deadline)
    _arm(conn, sock, deadline)
    return sock


def _read_line(conn: Connection, sock: Any, buf: bytes, deadline: float) -> tuple[bytes, int]:
    """Read until ``buf`` holds a whole reply line; return it and the line's end."""
    eol = -1
    while eol < 0:
        if len(buf) > MAX_LINE:
            raise MemcacheUnknownError(f"reply line too long: {buf[:80]!r}")
        buf += _recv(conn, sock, deadline)
        eol = buf.find(b"\r\n")
    return buf, eol


def _check_miss(buf: bytes, eol: int, key: bytes) -> None:
    """A miss whose ``END`` line ends at ``eol``: nothing may follow it."""
    if len(buf) != eol + 2:
        raise MemcacheUnknownError(f"miss of {key!r} followed by {buf[eol + 2 :][:80]!r}")


def _read_large(
    conn: Connection, sock: Any, buf: bytes, start: int, size: int, key: bytes, deadline: float
) -> bytes:
    """Read the rest of a value of ``size`` bytes (at most ``conn.max_value``: checked)
    starting at ``start`` in ``buf`` (all the first read returned) into one buffer
    filled in place, and its trailer."""
    end = start + size
    need = end + len(_TRAILER)
    got = len(buf)
    whole = bytearray(need)
    whole[:got] = buf
    with memoryview(whole) as view:
        while got < need:
            _arm(conn, sock, deadline)
            n = sock.recv_into(view[got:])
            if not n:
                raise MemcacheUnexpectedCloseError()
            got += n
    if whole[end:] != _TRAILER:
        raise MemcacheUnknownError(f"value of {key!r} not followed by END")
    # Exactly one reply was read: anything after it means the stream is out of step.
    if readable_now(sock):
        raise MemcacheUnknownError(f"value of {key!r} followed by more data")
    return bytes(memoryview(whole)[start:end])


# -- the reply stream of the other commands ------------------------------------------


class _Reply:
    """The reply to one command: lines and data blocks read from ``sock`` within
    ``deadline``, at most :data:`MAX_LINE` bytes a line."""

    __slots__ = ("buf", "conn", "deadline", "pos", "sock")

    def __init__(self, conn: Connection, sock: Any, deadline: float) -> None:
        self.conn = conn
        self.sock = sock
        self.deadline = deadline
        self.buf = b""
        self.pos = 0

    def line(self) -> bytes:
        """The next reply line, without its CRLF."""
        buf, pos = self.buf, self.pos
        eol = buf.find(b"\r\n", pos)
        while eol < 0:
            if len(buf) - pos > MAX_LINE:
                raise MemcacheUnknownError(f"reply line too long: {buf[pos : pos + 80]!r}")
            rest = self.conn.unread = buf[pos:]  # for the reaper, if this read times out
            buf = rest + _recv(self.conn, self.sock, self.deadline)
            self.conn.unread = b""
            pos = 0
            eol = buf.find(b"\r\n")
        if eol - pos > MAX_LINE:
            raise MemcacheUnknownError(f"reply line too long: {buf[pos : pos + 80]!r}")
        self.buf, self.pos = buf, eol + 2
        return buf[pos:eol]

    def block(self, size: int) -> bytes:
        """The next ``size`` bytes (a value's data, already checked against
        ``max_value``) and the CRLF after them."""
        start = self.pos
        end = start + size
        buf = self.buf
        if len(buf) >= end + 2:
            data, trailer = buf[start:end], buf[end : end + 2]
            self.pos = end + 2
        else:
            data, trailer = self._read_block(size)
        if trailer != b"\r\n":
            raise MemcacheUnknownError(f"value of {size} bytes not followed by CRLF")
        return data

    def _read_block(self, size: int) -> tuple[bytes, bytes]:
        """Read the rest of a block into one buffer of its size, filled in place (never
        reading past it)."""
        need = size + 2
        have = self.buf[self.pos :]
        whole = bytearray(need)
        got = len(have)
        whole[:got] = have
        with memoryview(whole) as view:
            while got < need:
                _arm(self.conn, self.sock, self.deadline)
                n = self.sock.recv_into(view[got:])
                if not n:
                    raise MemcacheUnexpectedCloseError()
                got += n
        self.buf, self.pos = b"", 0
        return bytes(memoryview(whole)[:size]), bytes(whole[size:])

    def finish(self) -> None:
        """Check that nothing read follows the reply (a stream out of step); the
        command is no longer pending."""
        if self.pos != len(self.buf):
            raise MemcacheUnknownError(f"reply followed by {self.buf[self.pos :][:80]!r}")
        conn = self.conn
        conn.pending, conn.out = False, b""


def _header(line: bytes, name: bytes, max_value: int) -> tuple[bytes, bytes, int, bytes | None]:
    """``(key, flags, size, cas)`` of a ``VALUE`` line (``cas`` None without one);
    raises for an error line, a malformed one, or a size above ``max_value``."""
    parts = line.split(b" ")
    if parts[0] != b"VALUE" or len(parts) not in (4, 5):
        _raise_for(line, name)
    if not (parts[2].isdigit() and parts[3].isdigit()) or len(parts[3]) > 10:
        raise MemcacheUnknownError(f"bad flags or value size in {line[:80]!r}")
    if len(parts) == 5 and not parts[4].isdigit():
        raise MemcacheUnknownError(f"bad cas token in {line[:80]!r}")
    size = int(parts[3])
    if size > max_value:
        raise ValueTooLargeError(f"value size out of range (max {max_value}) in {line[:80]!r}")
    return parts[1], parts[2], size, parts[4] if len(parts) == 5 else None


# -- sockets ---------------------------------------------------------------------------


def _left(deadline: float) -> float:
    """Seconds left before ``deadline``; raises ``TimeoutError`` when none are."""
    left = deadline - _monotonic()
    if left <= 0:
        raise TimeoutError("memcached call passed its deadline")
    return left


def _arm(conn: Connection, sock: Any, deadline: float) -> None:
    """Make the socket's timeout the time left before ``deadline`` (unless it is within
    :data:`_SLACK` of it already); raises ``TimeoutError`` when no time is left."""
    left = _left(deadline)
    if not -_SLACK < conn.armed - left < _SLACK:
        sock.settimeout(left)
        conn.armed = left


def _send(sock: Any, data: bytes) -> None:
    """Send ``data`` within the socket's timeout (set by :func:`_arm`). A socket with a
    timeout polls before every send; a command usually fits in the send buffer, so it
    is written straight to the descriptor (one system call), and only a remainder goes
    through ``sendall``, which waits within the timeout."""
    try:
        sent = os.write(sock.fileno(), data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        with memoryview(data) as view:
            sock.sendall(view[sent:])


def _send_counted(conn: Connection, sock: Any, data: bytes, deadline: float) -> None:
    """:func:`_send` for a command whose fate matters (a write): ``conn.out`` and
    ``conn.sent`` say how much of ``data`` went out, even when a send times out (then
    :mod:`._fates` sends the rest). Sends in parts within ``deadline``."""
    conn.out = data
    try:
        sent = os.write(sock.fileno(), data)
    except BlockingIOError:
        sent = 0
    conn.sent = sent
    if sent < len(data):
        _send_rest(conn, sock, data, sent, deadline)


def _send_rest(conn: Connection, sock: Any, data: bytes, sent: int, deadline: float) -> None:
    """Send what is left of ``data`` after its first ``sent`` bytes, in parts within
    ``deadline``, counting them in ``conn.sent`` (see :func:`_send_counted`)."""
    with memoryview(data) as view:
        while sent < len(data):
            _arm(conn, sock, deadline)
            sent += sock.send(view[sent:])
            conn.sent = sent


def _recv(conn: Connection, sock: Any, deadline: float) -> bytes:
    _arm(conn, sock, deadline)
    data: bytes = sock.recv(_RECV_SIZE)
    if not data:
        raise MemcacheUnexpectedCloseError()
    return data


def readable_now(sock: Any) -> bool:
    """Whether ``sock`` has bytes (or an end of stream, or an error) to read right now,
    without waiting. Uses ``poll`` where there is one: ``select()`` refuses descriptors
    above 1023. Raises ``OSError``/``ValueError`` for a closed socket."""
    if _poll is None:  # Windows: its select() has no ceiling on descriptor numbers
        return bool(select.select([sock], [], [], 0)[0])
    poller = _poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def stale(conn: Connection) -> bool:
    """Whether the idle connection ``conn`` (its socket open) cannot be used: its
    socket is readable before any command was sent (the server closed it, or sent
    bytes nobody asked for), or cannot be polled (closed, an invalid descriptor). No
    waiting: :func:`readable_now`, with one ``poll`` object kept by the connection
    instead of one made and registered at each call (the pool checks the idle
    connections it hands to a write that must not run twice: see
    :meth:`Pool.call_once <._pool.Pool.call_once>`)."""
    try:
        poller = conn.poller
        if poller is None:
            if _poll is None:
                return readable_now(conn.sock)
            poller = _poll()
            poller.register(conn.sock, select.POLLIN)
            conn.poller = poller
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed or invalid descriptor
        return True


def _raise_for(line: bytes, name: bytes) -> NoReturn:
    """Raise the error that reply ``line`` to command ``name`` stands for (an error
    line, or anything the command does not answer)."""
    if line == b"ERROR":
        raise MemcacheUnknownCommandError(name)
    if line.startswith(b"CLIENT_ERROR"):
        raise MemcacheClientError(line[13:])
    if line.startswith(b"SERVER_ERROR"):
        raise MemcacheServerError(line[13:])
    raise MemcacheUnknownError(f"unexpected reply to {name.decode()}: {line[:80]!r}")
