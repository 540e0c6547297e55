"""The hot path of a memcached read: one ``get`` on a pooled pymemcache client's socket.

pymemcache's ``Client.get`` spends about 4 µs of Python per call on top of the round
trip (its key check, command assembly, a reply parser built for multi-key fetches, the
serde dispatch): a fifth of a 22 µs loopback hit on the benchmark machine. An L2 hit is
the chain's most common slow path, so :func:`get` sends the single-key ``get`` itself on
the client's connected socket (pymemcache's public ``Client.sock``) and parses the one
reply it can receive: one whole raw read costs 0.81x a ``Client.get`` with memcached
pinned to the client's CPU, 0.86x unpinned (measured side by side on loopback; see
``docs/design.md``).

pymemcache still does everything else: it connects (with its timeouts and
``TCP_NODELAY``), runs every other command, and closes. A client with no connection yet
is asked through ``Client.get``, which connects first.

Errors keep pymemcache's types so the layer maps them in one place:
``MemcacheUnexpectedCloseError`` when the server closes the connection,
``MemcacheUnknownCommandError``, ``MemcacheClientError`` or ``MemcacheServerError`` for
an error line, ``MemcacheUnknownError`` for a reply that is not the protocol, and the
socket's own ``OSError`` (a timeout included). After any exception the caller must
discard the client: its stream is at an unknown point.
"""

from __future__ import annotations

import os
import select
from typing import Any

from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
    MemcacheUnknownError,
)

from ._counters import COUNTER_FLAG_BYTES, RawCounter

_MISS = b"END\r\n"
_TRAILER = b"\r\nEND\r\n"  # after a value's data block
_RECV_SIZE = 65536
#: A reply line longer than this without CRLF is not memcached talking.
_MAX_LINE = 2048
#: The type a value read with these client flags is returned as (others: bytes).
_BY_FLAGS: dict[bytes, type[bytes]] = {COUNTER_FLAG_BYTES: RawCounter}
#: memcached's own ceiling for an item (``-I`` at most 1 GiB): a larger size is garbage.
_MAX_SIZE = 1 << 30


def get(client: Any, key: bytes) -> bytes | None:
    """Send ``get <key>`` on ``client`` (a ``pymemcache.client.base.Client`` whose serde
    is :class:`._counters.CounterSerde`) and return the stored bytes (a
    :class:`._counters.RawCounter` for a value stored with the counter flag), or None on
    a miss. ``key`` must already be a valid memcached key (see ``memcached_key``).
    Raises as the module docstring says."""
    # Kept in one piece for the reply that fits one read (every L2 hit and miss): each
    # rarer case (a line or a value in pieces, an error) is a call of its own.
    sock = client.sock
    if sock is None:  # not connected yet: pymemcache connects, then reads the same way
        value: bytes | None = client.get(key)
        return value
    command = b"get " + key + b"\r\n"
    # A socket with a timeout polls before every send; a command this small always fits
    # in the send buffer, so write it straight to the descriptor (one system call) and
    # leave only a rare remainder to sendall, which waits within the timeout.
    try:
        sent = os.write(sock.fileno(), command)
    except BlockingIOError:
        sent = 0
    if sent < len(command):
        sock.sendall(command[sent:])
    buf: bytes = sock.recv(_RECV_SIZE)
    if buf == _MISS:
        return None
    eol = buf.find(b"\r\n")
    if eol < 0:  # the reply line arrived in pieces
        buf, eol = _read_line(sock, buf)
    line = buf[:eol]
    if line == b"END":  # a miss that arrived in pieces
        _check_miss(buf, eol, key)
        return None
    parts = line.split(b" ")
    if parts[0] != b"VALUE" or len(parts) not in (4, 5) or parts[1] != key:
        _raise_for(line)
    if not (parts[2].isdigit() and parts[3].isdigit()) or len(parts[3]) > 10:
        raise MemcacheUnknownError(f"bad flags or value size in {line[:80]!r}")
    size = int(parts[3])
    start = eol + 2
    end = start + size
    if len(buf) < end + len(_TRAILER):  # a value larger than the first read
        data = _read_large(sock, buf, start, size, key)
    # A value that fits one read is at most the read's size (far below _MAX_SIZE).
    elif buf[end:] != _TRAILER:  # more or other than one value: desync
        raise MemcacheUnknownError(f"value of {key!r} not followed by END alone")
    else:
        data = buf[start:end]
    # A counter (stored without an envelope) comes back marked; bytes(data) is data.
    return _BY_FLAGS.get(parts[2], bytes)(data)


def _read_line(sock: Any, buf: bytes) -> tuple[bytes, int]:
    """Read until ``buf`` holds a whole reply line; return it and the line's end."""
    eol = -1
    while eol < 0:
        if len(buf) > _MAX_LINE:
            raise MemcacheUnknownError(f"reply line too long: {buf[:80]!r}")
        buf += _recv(sock, _RECV_SIZE)
        eol = buf.find(b"\r\n")
    return buf, eol


def _check_miss(buf: bytes, eol: int, key: bytes) -> None:
    """A miss whose ``END`` line ends at ``eol``: nothing may follow it."""
    if len(buf) != eol + 2:
        raise MemcacheUnknownError(f"miss of {key!r} followed by {buf[eol + 2 :][:80]!r}")


def _read_large(sock: Any, buf: bytes, start: int, size: int, key: bytes) -> bytes:
    """Read the rest of a value of ``size`` bytes starting at ``start`` in ``buf`` (all
    the first read returned) into one buffer filled in place, and its trailer."""
    if size > _MAX_SIZE:
        raise MemcacheUnknownError(f"value size out of range in {buf[: start - 2][:80]!r}")
    end = start + size
    need = end + len(_TRAILER)
    got = len(buf)
    whole = bytearray(need)
    whole[:got] = buf
    view = memoryview(whole)
    while got < need:
        n = sock.recv_into(view[got:])
        if not n:
            raise MemcacheUnexpectedCloseError()
        got += n
    view.release()
    if whole[end:] != _TRAILER:
        raise MemcacheUnknownError(f"value of {key!r} not followed by END")
    # Exactly one reply was read: anything after it means the stream is out of step.
    if select.select([sock], [], [], 0)[0]:
        raise MemcacheUnknownError(f"value of {key!r} followed by more data")
    return memoryview(whole)[start:end].tobytes()


def _recv(sock: Any, size: int) -> bytes:
    data: bytes = sock.recv(size)
    if not data:
        raise MemcacheUnexpectedCloseError()
    return data


def _raise_for(line: bytes) -> None:
    """Raise the error that a reply line other than ``VALUE <key> ...`` stands for."""
    if line == b"ERROR":
        raise MemcacheUnknownCommandError(b"get")
    if line.startswith(b"CLIENT_ERROR"):
        raise MemcacheClientError(line[13:])
    if line.startswith(b"SERVER_ERROR"):
        raise MemcacheServerError(line[13:])
    raise MemcacheUnknownError(f"unexpected reply to get: {line[:80]!r}")
