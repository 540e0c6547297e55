"""The single-key ``get`` that MemcachedLayer sends on a pooled client's socket
(cachechain.layers._wire): the same answers as pymemcache's ``Client.get`` against a real
memcached, whatever the value and however the reply is cut; every malformed reply an
error of pymemcache's types."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
    MemcacheUnknownError,
)

from cachechain._errors import LayerError, LayerUnavailableError
from cachechain.layers import _wire
from cachechain.layers._memcached import MemcachedLayer
from tests.support.faultproxy import FaultProxy
from tests.support.servers import MemcachedProcess


class ScriptedSocket:
    """A connected socket stand-in: what is written to it is recorded in ``sent``, and
    reads hand out the scripted reply in the given pieces (then EOF). Its ``fileno`` is
    a real socket, so ``os.write`` and ``select`` work on it: ``select`` finds it
    readable exactly while scripted bytes remain unread."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)
        self._mine, self._peer = socket.socketpair()
        self._mine.setblocking(False)
        self._peer.setblocking(False)
        self._signalled = False
        self._sent = b""
        self._sync()

    def _sync(self) -> None:
        if self.pieces and not self._signalled:
            self._peer.send(b"!")
            self._signalled = True
        elif not self.pieces and self._signalled:
            assert self._mine.recv(1) == b"!"
            self._signalled = False

    @property
    def sent(self) -> bytes:
        with contextlib.suppress(BlockingIOError):
            while chunk := self._peer.recv(65536):
                self._sent += chunk
        return self._sent

    def fileno(self) -> int:
        return self._mine.fileno()

    def sendall(self, data: bytes) -> None:
        self._mine.sendall(data)

    def recv(self, size: int) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        head, rest = piece[:size], piece[size:]
        if rest:
            self.pieces.insert(0, rest)
        self._sync()
        return head

    def recv_into(self, view: memoryview) -> int:
        data = self.recv(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._mine.close()
        self._peer.close()


def scripted(*pieces: bytes) -> Client:
    client = Client(("127.0.0.1", 1))  # never connects: the socket is given
    client.sock = ScriptedSocket(*pieces)
    return client


def split_every_way(reply: bytes) -> Iterator[tuple[bytes, ...]]:
    """The reply whole, byte by byte, and cut in two at every position."""
    yield (reply,)
    yield tuple(reply[i : i + 1] for i in range(len(reply)))
    for cut in range(1, len(reply)):
        yield (reply[:cut], reply[cut:])


@pytest.fixture()
def connected(memcached: MemcachedProcess) -> Iterator[Client]:
    client = Client(("127.0.0.1", memcached.port), default_noreply=False, timeout=2)
    client.version()  # connects: _wire.get then reads on this socket
    assert client.sock is not None
    yield client
    client.close()


# -- against a real memcached ------------------------------------------------------------


# The connection is meant to be shared by the examples: the stream must stay in step.
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    value=st.one_of(
        st.binary(max_size=300),
        st.sampled_from([b"", b"END\r\n", b"\r\nEND\r\n", b"VALUE k 0 1\r\nx\r\nEND\r\n"]),
        st.integers(60_000, 300_000).map(lambda n: bytes(range(256)) * (n // 256)),
    )
)
def test_reads_what_pymemcache_reads(connected: Client, value: bytes) -> None:
    assert connected.set(b"k", value) is True
    assert _wire.get(connected, b"k") == value == connected.get(b"k")
    assert _wire.get(connected, b"absent") is None
    assert connected.get(b"k") == value  # the stream is still in step


def test_an_unconnected_client_is_connected_by_pymemcache(memcached: MemcachedProcess) -> None:
    client = Client(("127.0.0.1", memcached.port), default_noreply=False, timeout=2)
    client.set(b"k", b"v")
    client.close()
    assert client.sock is None
    assert _wire.get(client, b"k") == b"v"
    assert client.sock is not None  # later reads take the short path
    assert _wire.get(client, b"k") == b"v"
    client.close()


def test_a_reply_in_tiny_pieces_from_a_real_server(memcached: MemcachedProcess) -> None:
    value = b"0123456789" * 7
    with FaultProxy(("127.0.0.1", memcached.port)) as proxy:
        client = Client(("127.0.0.1", proxy.port), default_noreply=False, timeout=2)
        assert client.set(b"k", value) is True
        proxy.trickle(3, 0.0)
        assert _wire.get(client, b"k") == value
        assert _wire.get(client, b"nope") is None
        client.close()
    assert proxy.errors == []


@pytest.mark.parametrize("after_bytes", [0, 5, 20, 90])
def test_a_connection_closed_mid_reply_discards_the_client(
    memcached: MemcachedProcess, after_bytes: int
) -> None:
    with FaultProxy(("127.0.0.1", memcached.port)) as proxy:
        layer = MemcachedLayer("L2", proxy.address, timeout=2)
        layer.set("k", "x" * 100)  # the pooled client is now connected
        proxy.close_mid_reply(after_bytes)
        with pytest.raises(LayerUnavailableError) as info:
            layer.get("k")
        assert isinstance(info.value.__cause__, (MemcacheUnexpectedCloseError, OSError))
        assert layer.stats().connections_open == 0
        proxy.pass_through()
        assert layer.get("k") == "x" * 100
        layer.close()


# -- every way a reply can be cut ----------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"END\r\n", None),
        (b"VALUE k 0 3\r\nabc\r\nEND\r\n", b"abc"),
        (b"VALUE k 7 0\r\n\r\nEND\r\n", b""),
        (b"VALUE k 0 5 99\r\nEND\r\n\r\nEND\r\n", b"END\r\n"),  # with a CAS column
    ],
)
def test_any_split_of_a_reply_reads_the_same(reply: bytes, expected: bytes | None) -> None:
    for pieces in split_every_way(reply):
        client = scripted(*pieces)
        assert _wire.get(client, b"k") == expected, pieces
        assert client.sock.sent == b"get k\r\n"


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        (b"ERROR\r\n", MemcacheUnknownCommandError, None),
        (b"CLIENT_ERROR bad command line format\r\n", MemcacheClientError, "bad command"),
        (b"SERVER_ERROR out of memory\r\n", MemcacheServerError, "out of memory"),
        (b"HELLO\r\n", MemcacheUnknownError, "unexpected reply"),
        (b"VALUE other 0 1\r\nx\r\nEND\r\n", MemcacheUnknownError, "unexpected reply"),
        (b"VALUE k 0\r\n", MemcacheUnknownError, "unexpected reply"),
        (b"VALUE k 0 x\r\nabc\r\nEND\r\n", MemcacheUnknownError, "bad flags or value size"),
        (b"VALUE k 0 -2\r\nEND\r\n", MemcacheUnknownError, "bad flags or value size"),
        (b"VALUE k 0 +3\r\nabc\r\nEND\r\n", MemcacheUnknownError, "bad flags or value size"),
        (b"VALUE k x 3\r\nabc\r\nEND\r\n", MemcacheUnknownError, "bad flags or value size"),
        (b"VALUE k 0 99999999999\r\n", MemcacheUnknownError, "bad flags or value size"),
        (b"VALUE k 0 2000000000\r\n", MemcacheUnknownError, "out of range"),
        (b"VALUE k 0 3\r\nabcd\r\nEND\r\n", MemcacheUnknownError, "not followed by END"),
        (b"VALUE k 0 3\r\nabc\r\nEND\r\nEND\r\n", MemcacheUnknownError, "END alone"),
        (b"END\r\nEND\r\n", MemcacheUnknownError, "miss of"),
        (b"VALUE k 0 3\r\nabc\r\nXYZ\r\n", MemcacheUnknownError, "not followed by END"),
        (b"x" * 5000, MemcacheUnknownError, "too long"),
        (  # a value larger than one read, with a bad trailer
            b"VALUE k 0 70000\r\n" + b"x" * 70000 + b"\r\nXYZ\r\n",
            MemcacheUnknownError,
            "not followed by END",
        ),
        (b"", MemcacheUnexpectedCloseError, None),
        (b"VALU", MemcacheUnexpectedCloseError, None),
        (b"VALUE k 0 3\r\nab", MemcacheUnexpectedCloseError, None),
    ],
)
def test_malformed_replies_raise_pymemcache_errors(
    reply: bytes, error: type[Exception], match: str | None
) -> None:
    with pytest.raises(error, match=match):
        _wire.get(scripted(reply), b"k")


def test_a_large_value_followed_by_more_is_a_desync() -> None:
    pieces = (b"VALUE k 0 3\r\nab", b"c\r\nEND\r\n", b"JUNK")
    with pytest.raises(MemcacheUnknownError, match="followed by more data"):
        _wire.get(scripted(*pieces), b"k")
    assert _wire.get(scripted(*pieces[:2]), b"k") == b"abc"


def test_a_partial_miss_followed_by_more_is_a_desync() -> None:
    with pytest.raises(MemcacheUnknownError, match="miss of"):
        _wire.get(scripted(b"EN", b"D\r\nVALUE"), b"k")


def test_the_layer_maps_a_bad_reply_and_drops_the_client(memcached: MemcachedProcess) -> None:
    layer = MemcachedLayer("L2", memcached.address)
    layer.set("k", 1)
    (client,) = layer._pool.nodes[0].idle
    real: Any = client.sock
    client.sock = ScriptedSocket(b"SERVER_ERROR busy\r\n")
    with pytest.raises(LayerError) as info:
        layer.get("k")
    assert isinstance(info.value.__cause__, MemcacheServerError)
    assert layer.stats().connections_open == 0
    real.close()
    assert layer.get("k") == 1  # a new connection
    layer.close()


class JammedSocket(ScriptedSocket):
    """A ScriptedSocket whose descriptor has a full send buffer: a direct write of the
    command fails with EAGAIN, so it must go through ``sendall`` (recorded here)."""

    def __init__(self, *pieces: bytes) -> None:
        super().__init__(*pieces)
        self._jam, self._jam_peer = socket.socketpair()
        self._jam.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._jam.send(b"x" * 65536)
        self.through_sendall = b""

    def fileno(self) -> int:
        return self._jam.fileno()

    def sendall(self, data: bytes) -> None:
        self.through_sendall += data

    def close(self) -> None:
        super().close()
        self._jam.close()
        self._jam_peer.close()


def test_a_command_that_does_not_fit_the_send_buffer_goes_through_sendall() -> None:
    sock = JammedSocket(b"VALUE k 0 2\r\nhi\r\nEND\r\n")
    client = Client(("127.0.0.1", 1))
    client.sock = sock
    assert _wire.get(client, b"k") == b"hi"
    assert sock.through_sendall == b"get k\r\n"
    sock.close()
