"""The hot path of a memcached read: one ``get`` on a pooled pymemcache client's socket.

pymemcache's ``Client.get`` spends about 4 µs of Python per call on top of the round
trip (its key check, command assembly, a reply parser built for multi-key fetches, the
serde dispatch): a fifth of a 22 µs loopback hit on the benchmark machine. An L2 hit is
the chain's most common slow path, so :func:`get` sends the single-key ``get`` itself on
the client's connected socket (pymemcache's public ``Client.sock``) and parses the one
reply it can receive. Measured side by side, it costs 0.81x ``Client.get`` (pinned) to
0.86x (unpinned); see ``benchmarks/`` and ``docs/design.md``.

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

from typing import Any

from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
    MemcacheUnknownError,
)

_MISS = b"END\r\n"
_TRAILER = b"\r\nEND\r\n"  # after a value's data block
_RECV_SIZE = 65536
#: A reply line longer than this without CRLF is not memcached talking.
_MAX_LINE = 2048


def get(client: Any, key: bytes) -> bytes | None:
    """Send ``get <key>`` on ``client`` (a ``pymemcache.client.base.Client`` without
    serde) and return the stored bytes, or None on a miss. ``key`` must already be a
    valid memcached key (see ``memcached_key``). Raises as the module docstring says."""
    sock = client.sock
    if sock is None:  # not connected yet: pymemcache connects, then reads the same way
        value: bytes | None = client.get(key)
        return value
    sock.sendall(b"get " + key + b"\r\n")
    buf: bytes = sock.recv(_RECV_SIZE)
    if buf == _MISS:
        return None
    eol = buf.find(b"\r\n")
    while eol < 0:  # the reply line arrived in pieces
        if len(buf) > _MAX_LINE:
            raise MemcacheUnknownError(f"reply line too long: {buf[:80]!r}")
        buf += _recv(sock, _RECV_SIZE)
        eol = buf.find(b"\r\n")
    line = buf[:eol]
    if line == b"END":  # a miss that arrived in pieces
        if len(buf) != eol + 2:
            raise MemcacheUnknownError(f"miss of {key!r} followed by {buf[eol + 2 :][:80]!r}")
        return None
    parts = line.split(b" ")
    if parts[0] != b"VALUE" or len(parts) not in (4, 5) or parts[1] != key:
        _raise_for(line)
    try:
        size = int(parts[3])
    except ValueError:
        raise MemcacheUnknownError(f"bad value size in {line[:80]!r}") from None
    start = eol + 2
    end = start + size
    need = end + len(_TRAILER)
    got = len(buf)
    if got < need:  # a value larger than the first read: fill one buffer in place
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
        return bytes(whole[start:end])
    if got != need or buf[end:] != _TRAILER:  # more or other than one value: desync
        raise MemcacheUnknownError(f"value of {key!r} not followed by END alone")
    return buf[start:end]


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
