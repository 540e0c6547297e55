"""The memcached protocol that MemcachedLayer speaks on its own connections
(cachechain.layers._wire): the same answers as pymemcache's ``Client`` against a real
memcached, whatever the value and however a reply is cut; every malformed reply an
error of pymemcache's types; each command within its deadline, the socket's timeout
changed only when a call has less time left than it says."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
from cachechain.layers._counters import RawCounter
from cachechain.layers._memcached import MemcachedLayer
from cachechain.layers._wire import Connection
from tests.support.faultproxy import FaultProxy
from tests.support.servers import MemcachedProcess

TIMEOUT = 5.0


def soon() -> float:
    """A deadline no test here reaches."""
    return time.monotonic() + TIMEOUT


class ScriptedSocket:
    """A connected socket stand-in: what is written to it is recorded in ``sent``, and
    reads hand out the scripted reply in the given pieces (then EOF). Its ``fileno`` is
    a real socket, so ``os.write`` and ``poll`` work on it: ``poll`` finds it readable
    exactly while scripted bytes remain unread. Timeouts set are recorded."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)
        self._mine, self._peer = socket.socketpair()
        self._mine.setblocking(False)
        self._peer.setblocking(False)
        self._signalled = False
        self._sent = b""
        self.timeouts: list[float] = []
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

    def settimeout(self, timeout: float) -> None:
        self.timeouts.append(timeout)

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


def scripted(*pieces: bytes, max_value: int = 1 << 20) -> Connection:
    """A connection (never connected: its socket is given) reading ``pieces``."""
    conn = Connection(
        ("127.0.0.1", 1), connect_timeout=TIMEOUT, timeout=TIMEOUT, max_value=max_value
    )
    conn.sock = ScriptedSocket(*pieces)  # type: ignore[assignment]
    return conn


def sent(conn: Connection) -> bytes:
    sock: Any = conn.sock
    return bytes(sock.sent)


def split_every_way(reply: bytes) -> Iterator[tuple[bytes, ...]]:
    """The reply whole, byte by byte, and cut in two at every position."""
    yield (reply,)
    yield tuple(reply[i : i + 1] for i in range(len(reply)))
    for cut in range(1, len(reply)):
        yield (reply[:cut], reply[cut:])


def new_connection(server: MemcachedProcess, **kwargs: Any) -> Connection:
    kwargs.setdefault("connect_timeout", TIMEOUT)
    kwargs.setdefault("timeout", TIMEOUT)
    kwargs.setdefault("max_value", 1 << 20)
    return Connection(("127.0.0.1", server.port), **kwargs)


@pytest.fixture()
def oracle(memcached: MemcachedProcess) -> Iterator[Client]:
    """pymemcache's own client on the same server: the reference answers."""
    client = Client(("127.0.0.1", memcached.port), default_noreply=False, timeout=2)
    yield client
    client.close()


@pytest.fixture()
def connected(memcached: MemcachedProcess) -> Iterator[Connection]:
    conn = new_connection(memcached)
    conn.connect(soon())
    yield conn
    conn.close()


# -- against a real memcached ------------------------------------------------------------


# The connection is meant to be shared by the examples: the stream must stay in step.
@pytest.mark.memcached
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
def test_reads_what_pymemcache_reads(connected: Connection, oracle: Client, value: bytes) -> None:
    assert connected.set(b"k", value, 0, soon()) is True
    assert _wire.get(connected, b"k", soon()) == value == oracle.get(b"k")
    assert connected.get_many([b"k", b"absent"], soon()) == {b"k": value}
    assert connected.gets(b"k", soon())[0] == value
    assert _wire.get(connected, b"absent", soon()) is None
    assert _wire.get(connected, b"k", soon()) == value  # the stream is still in step


@pytest.mark.memcached
def test_every_command_against_a_real_memcached(connected: Connection, oracle: Client) -> None:
    d = soon()
    assert connected.set(b"a", b"one", 0, d) is True
    assert connected.add(b"a", b"2", 0, d) is False
    assert connected.add(b"b", RawCounter(b"5"), 0, d) is True
    assert connected.get_many([b"a", b"b", b"c"], d) == {b"a": b"one", b"b": b"5"}
    assert type(connected.get_many([b"b"], d)[b"b"]) is RawCounter
    assert connected.incr(b"b", 10, d) == 15
    assert connected.decr(b"b", 100, d) == 0
    assert connected.incr(b"none", 1, d) is None
    with pytest.raises(MemcacheClientError, match="non-numeric"):
        connected.incr(b"a", 1, d)
    value, cas = connected.gets(b"a", d)
    assert value == b"one" and cas is not None and cas.isdigit()
    assert connected.cas(b"a", b"3", cas, 0, d) is True
    assert connected.cas(b"a", b"4", cas, 0, d) is False  # changed since
    assert connected.cas(b"gone", b"4", cas, 0, d) is None
    assert connected.gets(b"gone", d) == (None, None)
    assert connected.touch(b"a", 100, d) is True
    assert connected.touch(b"gone", 100, d) is False
    assert connected.set_many({b"x": b"1", b"y": b"2"}, 0, d) == []
    assert oracle.get_many([b"a", b"x", b"y"]) == {b"a": b"3", b"x": b"1", b"y": b"2"}
    assert connected.delete(b"x", d) is True
    assert connected.delete(b"x", d) is False
    assert connected.delete_many([b"y", b"gone"], d) is True
    assert connected.flush_all(d) is True
    assert oracle.get_many([b"a", b"b"]) == {}


@pytest.mark.memcached
def test_an_unconnected_connection_connects_on_first_use(memcached: MemcachedProcess) -> None:
    conn = new_connection(memcached)
    assert conn.sock is None
    assert _wire.get(conn, b"k", soon()) is None
    assert conn.sock is not None
    # The time left of the call's deadline (set just before the send): at most the
    # layer's timeout, and a little less on a loaded machine.
    assert TIMEOUT - 0.5 < conn.sock.gettimeout() <= TIMEOUT
    assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    conn.close()
    assert conn.sock is None
    assert conn.set(b"k", b"v", 0, soon()) is True  # any command connects
    conn.close()


def test_a_refused_connection_raises_the_socket_error() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    conn = Connection(("127.0.0.1", port), connect_timeout=1, timeout=1, max_value=100)
    with pytest.raises(ConnectionRefusedError):
        conn.connect(soon())
    assert conn.sock is None


@pytest.mark.memcached
def test_a_reply_in_tiny_pieces_from_a_real_server(memcached: MemcachedProcess) -> None:
    value = b"0123456789" * 7
    with FaultProxy(("127.0.0.1", memcached.port)) as proxy:
        conn = Connection(("127.0.0.1", proxy.port), connect_timeout=2, timeout=2, max_value=1000)
        assert conn.set(b"k", value, 0, soon()) is True
        proxy.trickle(3, 0.0)
        assert _wire.get(conn, b"k", soon()) == value
        assert _wire.get(conn, b"nope", soon()) is None
        assert conn.get_many([b"k", b"nope"], soon()) == {b"k": value}
        conn.close()
    assert proxy.errors == []


@pytest.mark.memcached
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
def test_any_split_of_a_get_reply_reads_the_same(reply: bytes, expected: bytes | None) -> None:
    for pieces in split_every_way(reply):
        conn = scripted(*pieces)
        assert _wire.get(conn, b"k", soon()) == expected, pieces
        assert sent(conn) == b"get k\r\n"


Command = Callable[[Connection, float], Any]

#: (the call, the reply, what it returns, what it sends)
COMMANDS: dict[str, tuple[Command, bytes, Any, bytes]] = {
    "get_many": (
        lambda c, d: c.get_many([b"k", b"j"], d),
        b"VALUE k 0 3\r\nabc\r\nVALUE j 2 2\r\n12\r\nEND\r\n",
        {b"k": b"abc", b"j": RawCounter(b"12")},
        b"get ",  # the keys' order is the set's
    ),
    "get_many miss": (lambda c, d: c.get_many([b"k"], d), b"END\r\n", {}, b"get k\r\n"),
    "gets": (
        lambda c, d: c.gets(b"k", d),
        b"VALUE k 0 3 42\r\nabc\r\nEND\r\n",
        (b"abc", b"42"),
        b"gets k\r\n",
    ),
    "gets miss": (lambda c, d: c.gets(b"k", d), b"END\r\n", (None, None), b"gets k\r\n"),
    "set": (
        lambda c, d: c.set(b"k", b"abc", 10, d),
        b"STORED\r\n",
        True,
        b"set k 0 10 3\r\nabc\r\n",
    ),
    "set counter": (
        lambda c, d: c.set(b"k", RawCounter(b"12"), 0, d),
        b"NOT_STORED\r\n",
        False,
        b"set k 2 0 2\r\n12\r\n",
    ),
    "add": (
        lambda c, d: c.add(b"k", b"v", 0, d),
        b"NOT_STORED\r\n",
        False,
        b"add k 0 0 1\r\nv\r\n",
    ),
    "cas": (
        lambda c, d: c.cas(b"k", b"v", b"42", 5, d),
        b"EXISTS\r\n",
        False,
        b"cas k 0 5 1 42\r\nv\r\n",
    ),
    "cas gone": (lambda c, d: c.cas(b"k", b"v", b"42", 5, d), b"NOT_FOUND\r\n", None, b"cas "),
    "cas stored": (lambda c, d: c.cas(b"k", b"v", b"42", 5, d), b"STORED\r\n", True, b"cas "),
    "set_many": (
        lambda c, d: c.set_many({b"k": b"1", b"j": b"2"}, 7, d),
        b"STORED\r\nNOT_STORED\r\n",
        [b"j"],
        b"set k 0 7 1\r\n1\r\nset j 0 7 1\r\n2\r\n",
    ),
    "delete": (lambda c, d: c.delete(b"k", d), b"DELETED\r\n", True, b"delete k\r\n"),
    "delete absent": (lambda c, d: c.delete(b"k", d), b"NOT_FOUND\r\n", False, b"delete k\r\n"),
    "delete_many": (
        lambda c, d: c.delete_many([b"k", b"j"], d),
        b"DELETED\r\nNOT_FOUND\r\n",
        True,
        b"delete k\r\ndelete j\r\n",
    ),
    "incr": (lambda c, d: c.incr(b"k", 5, d), b"43\r\n", 43, b"incr k 5\r\n"),
    "decr absent": (lambda c, d: c.decr(b"k", 5, d), b"NOT_FOUND\r\n", None, b"decr k 5\r\n"),
    "touch": (lambda c, d: c.touch(b"k", 9, d), b"TOUCHED\r\n", True, b"touch k 9\r\n"),
    "touch absent": (lambda c, d: c.touch(b"k", 9, d), b"NOT_FOUND\r\n", False, b"touch k 9\r\n"),
    "flush_all": (lambda c, d: c.flush_all(d), b"OK\r\n", True, b"flush_all\r\n"),
}
#: Each command by name.
CALLS: dict[str, Command] = {name: case[0] for name, case in COMMANDS.items()}


@pytest.mark.parametrize(
    ("call", "reply", "expected", "command"),
    list(COMMANDS.values()),
    ids=list(COMMANDS),
)
def test_any_split_of_any_reply_reads_the_same(
    call: Command, reply: bytes, expected: Any, command: bytes
) -> None:
    for pieces in split_every_way(reply):
        conn = scripted(*pieces)
        result = call(conn, soon())
        assert result == expected, pieces
        if isinstance(expected, dict):
            assert [type(v) for v in result.values()] == [type(v) for v in expected.values()]
        assert sent(conn).startswith(command)


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
        (b"VALUE k 0 1048577\r\n", MemcacheUnknownError, "out of range"),  # > max_value
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
    ids=lambda v: repr(v)[:30] if isinstance(v, bytes) else None,
)
def test_malformed_get_replies_raise_pymemcache_errors(
    reply: bytes, error: type[Exception], match: str | None
) -> None:
    with pytest.raises(error, match=match):
        _wire.get(scripted(reply), b"k", soon())


@pytest.mark.parametrize(
    ("call", "reply", "error", "match"),
    [
        (CALLS["get_many"], b"VALUE z 0 1\r\nx\r\nEND\r\n", MemcacheUnknownError, "unexpected key"),
        (
            CALLS["get_many"],
            b"VALUE k 0 1\r\nx\r\nVALUE k 0 1\r\nx\r\nEND\r\n",
            MemcacheUnknownError,
            "unexpected key",
        ),
        (CALLS["get_many"], b"VALUE k 0 1\r\nxy\r\nEND\r\n", MemcacheUnknownError, "CRLF"),
        (CALLS["get_many"], b"VALUE k 0 1 x\r\nx\r\nEND\r\n", MemcacheUnknownError, "cas token"),
        (CALLS["get_many"], b"VALUE k 0 2000000\r\n", MemcacheUnknownError, "out of range"),
        (CALLS["get_many"], b"END\r\nEND\r\n", MemcacheUnknownError, "followed by"),
        (CALLS["get_many"], b"y" * 3000, MemcacheUnknownError, "too long"),
        (CALLS["get_many"], b"VALUE k 0 3\r\nab", MemcacheUnexpectedCloseError, None),
        (CALLS["get_many"], b"SERVER_ERROR busy\r\n", MemcacheServerError, "busy"),
        (CALLS["gets"], b"VALUE k 0 3\r\nabc\r\nEND\r\n", MemcacheUnknownError, "gets"),
        (CALLS["gets"], b"VALUE j 0 3 1\r\nabc\r\nEND\r\n", MemcacheUnknownError, "gets"),
        (CALLS["gets"], b"VALUE k 0 3 1\r\nabc\r\nXYZ\r\n", MemcacheUnknownError, "END"),
        (CALLS["set"], b"HELLO\r\n", MemcacheUnknownError, "unexpected reply to set"),
        (CALLS["set"], b"STORED\r\nJUNK", MemcacheUnknownError, "followed by"),
        (
            CALLS["set"],
            b"SERVER_ERROR object too large for cache\r\n",
            MemcacheServerError,
            "large",
        ),
        (CALLS["set"], b"CLIENT_ERROR bad data chunk\r\n", MemcacheClientError, "bad data"),
        (CALLS["cas gone"], b"NOT_STORED\r\n", MemcacheUnknownError, "unexpected reply to cas"),
        (CALLS["set_many"], b"STORED\r\n", MemcacheUnexpectedCloseError, None),
        (CALLS["delete"], b"STORED\r\n", MemcacheUnknownError, "unexpected reply to delete"),
        (CALLS["delete_many"], b"DELETED\r\n", MemcacheUnexpectedCloseError, None),
        (
            CALLS["incr"],
            b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
            MemcacheClientError,
            "non-numeric",
        ),
        (CALLS["incr"], b"12a\r\n", MemcacheUnknownError, "unexpected reply to incr"),
        (CALLS["incr"], b"1" * 21 + b"\r\n", MemcacheUnknownError, "unexpected reply"),
        (CALLS["touch"], b"ERROR\r\n", MemcacheUnknownCommandError, None),
        (CALLS["flush_all"], b"y" * 3000 + b"\r\n", MemcacheUnknownError, "too long"),
        (CALLS["delete"], b"y" * 3000, MemcacheUnknownError, "too long"),
    ],
    ids=lambda v: repr(v)[:30] if isinstance(v, bytes) else None,
)
def test_malformed_replies_to_any_command_raise_pymemcache_errors(
    call: Command, reply: bytes, error: type[Exception], match: str | None
) -> None:
    with pytest.raises(error, match=match):
        call(scripted(reply), soon())


def test_the_error_of_a_client_error_line_is_its_message() -> None:
    line = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    with pytest.raises(MemcacheClientError) as info:
        scripted(line).incr(b"k", 1, soon())
    assert info.value.args[0] == b"cannot increment or decrement non-numeric value"


def test_a_large_value_followed_by_more_is_a_desync() -> None:
    pieces = (b"VALUE k 0 3\r\nab", b"c\r\nEND\r\n", b"JUNK")
    with pytest.raises(MemcacheUnknownError, match="followed by more data"):
        _wire.get(scripted(*pieces), b"k", soon())
    assert _wire.get(scripted(*pieces[:2]), b"k", soon()) == b"abc"
    many = (b"VALUE k 0 3\r\nab", b"c\r\n", b"END\r\nJUNK")
    with pytest.raises(MemcacheUnknownError, match="followed by"):
        scripted(*many).get_many([b"k"], soon())


def test_a_block_read_in_place_never_reads_past_it() -> None:
    """A value larger than what was buffered is read into a buffer of its size: the
    line after it is read separately."""
    value = b"v" * 100_000
    reply = b"VALUE k 0 100000\r\n" + value + b"\r\nVALUE j 0 1\r\nx\r\nEND\r\n"
    pieces = (reply[:50], reply[50:70_000], reply[70_000:])
    assert scripted(*pieces).get_many([b"k", b"j"], soon()) == {b"k": value, b"j": b"x"}


def test_a_partial_miss_followed_by_more_is_a_desync() -> None:
    with pytest.raises(MemcacheUnknownError, match="miss of"):
        _wire.get(scripted(b"EN", b"D\r\nVALUE"), b"k", soon())


# -- deadlines -----------------------------------------------------------------------------


def test_a_fresh_call_leaves_the_socket_timeout_alone() -> None:
    """The hot path: a call starting now has its full timeout, which the socket has
    already: no system call to set it."""
    conn = scripted(b"VALUE k 0 3\r\nabc\r\nEND\r\n")
    sock: Any = conn.sock
    assert _wire.get(conn, b"k", time.monotonic() + TIMEOUT) == b"abc"
    assert sock.timeouts == []


def test_a_call_with_less_time_left_shortens_the_socket_timeout_then_restores_it() -> None:
    conn = scripted(b"VALUE k 0 3\r\nabc\r\nEND\r\n", b"END\r\n")
    sock: Any = conn.sock
    assert _wire.get(conn, b"k", time.monotonic() + 1.0) == b"abc"
    assert len(sock.timeouts) == 1 and 0.9 < sock.timeouts[0] <= 1.0
    assert _wire.get(conn, b"k", time.monotonic() + TIMEOUT) is None  # a fresh call
    assert len(sock.timeouts) == 2 and TIMEOUT - 0.1 < sock.timeouts[1] <= TIMEOUT


def test_a_call_past_its_deadline_sends_nothing() -> None:
    for call in (
        lambda c, d: _wire.get(c, b"k", d),
        CALLS["get_many"],
        CALLS["set"],
        CALLS["delete_many"],
    ):
        conn = scripted(b"END\r\n")
        with pytest.raises(TimeoutError):
            call(conn, time.monotonic() - 0.001)
        assert sent(conn) == b""


def test_a_connect_with_no_time_left_is_not_attempted() -> None:
    conn = Connection(("127.0.0.1", 1), connect_timeout=1, timeout=1, max_value=1)
    with pytest.raises(TimeoutError):
        conn.connect(time.monotonic())
    assert conn.sock is None


def test_max_value_caps_every_read_at_memcached_ceiling() -> None:
    conn = Connection(("127.0.0.1", 1), connect_timeout=1, timeout=1, max_value=1 << 40)
    assert conn.max_value == _wire.MAX_VALUE == 1 << 30


# -- through the layer ---------------------------------------------------------------------


@pytest.mark.memcached
def test_the_layer_maps_a_bad_reply_and_drops_the_client(memcached: MemcachedProcess) -> None:
    layer = MemcachedLayer("L2", memcached.address)
    layer.set("k", 1)
    (client,) = layer._pool.nodes[0].idle
    real: Any = client.sock
    client.sock = ScriptedSocket(b"SERVER_ERROR busy\r\n")  # type: ignore[assignment]
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
        self.through_sendall += bytes(data)

    def send(self, data: bytes) -> int:
        """What a write command sends in parts (it counts what went out)."""
        self.through_sendall += bytes(data)
        return len(data)

    def close(self) -> None:
        super().close()
        self._jam.close()
        self._jam_peer.close()


def test_a_command_that_does_not_fit_the_send_buffer_goes_through_sendall() -> None:
    for call, reply, command in (
        (lambda c, d: _wire.get(c, b"k", d), b"VALUE k 0 2\r\nhi\r\nEND\r\n", b"get k\r\n"),
        (CALLS["set"], b"STORED\r\n", COMMANDS["set"][3]),
    ):
        conn = scripted()
        conn.close()
        sock = JammedSocket(reply)
        conn.sock = sock  # type: ignore[assignment]
        call(conn, soon())
        assert sock.through_sendall == command
        sock.close()


def test_the_idna_codec_is_loaded_before_any_thread_connects() -> None:
    """getaddrinfo of a str host encodes it with the "idna" codec, imported lazily on
    first use; threads importing it at once fail with ``LookupError('unknown encoding:
    idna')``: seen in gunicorn gthread workers forked from a ``--preload`` master, all
    connecting on their first requests (the memcached layer failed, its breaker
    opened). Importing the wire loads it first; checked in a fresh interpreter."""
    code = (
        "import sys; import cachechain.layers._wire; "
        "sys.exit(0 if 'encodings.idna' in sys.modules else 1)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert done.returncode == 0
