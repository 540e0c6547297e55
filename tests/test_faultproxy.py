"""Tests of the fault proxy and the stuck listener, against the real memcached."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pymemcache.client.base import Client  # type: ignore[import-untyped]
from pymemcache.exceptions import MemcacheUnexpectedCloseError  # type: ignore[import-untyped]

from tests.support.faultproxy import BacklogListener, FaultProxy, ProxyStats
from tests.support.servers import MemcachedProcess, free_port

pytestmark = pytest.mark.memcached

TIMEOUT = 0.2  # pymemcache connect_timeout and timeout, seconds
MARGIN = 0.3  # scheduling slack allowed on top of a timeout, seconds
WAIT = 2.0  # bound for waiting on the proxy to see something; never reached when passing

MakeClient = Callable[[], Client]


def _proxy_threads(proxy: FaultProxy) -> list[str]:
    """The live threads of ``proxy`` (other tests' proxies may still be winding down)."""
    prefix = f"faultproxy-{proxy.port}-"
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.fixture()
def proxy(memcached: MemcachedProcess) -> Iterator[FaultProxy]:
    """A started proxy in front of the session memcached; checked for thread bugs."""
    with FaultProxy(("127.0.0.1", memcached.port)) as p:
        yield p
    assert p.errors == []


@pytest.fixture()
def make_client(proxy: FaultProxy) -> Iterator[MakeClient]:
    """Make plain pymemcache clients to the proxy; all closed after the test."""
    clients: list[Client] = []

    def make() -> Client:
        client = Client(
            ("127.0.0.1", proxy.port),
            connect_timeout=TIMEOUT,
            timeout=TIMEOUT,
            default_noreply=False,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _mc_stat(memcached: MemcachedProcess, name: str) -> int:
    """One counter from memcached's ``stats``."""
    for line in memcached.raw(b"stats\r\n").decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == name:
            return int(parts[2])
    raise AssertionError(f"no stat {name}")


def _recv_all(sock: socket.socket) -> bytes:
    """Read until EOF (raises ``OSError`` on a reset or a timeout)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _raw_connection(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- pass-through and counters --------------------------------------------------------


def test_pass_through_round_trip(
    proxy: FaultProxy, make_client: MakeClient, memcached: MemcachedProcess
) -> None:
    client = make_client()
    assert client.set("k", b"v1") is True
    assert client.get("k") == b"v1"
    # It really went to the upstream memcached.
    assert memcached.raw(b"get k\r\n") == b"VALUE k 0 2\r\nv1\r\nEND\r\n"
    stats = proxy.stats()
    assert stats.connections == 1
    assert stats.upstream_connections == 1
    assert stats.bytes_to_upstream > 0
    assert stats.bytes_to_clients > 0
    assert stats.bytes_forwarded == stats.bytes_to_upstream + stats.bytes_to_clients
    assert proxy.bytes_forwarded == stats.bytes_forwarded
    assert proxy.connections == 1
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    assert proxy.mode.kind == "pass_through"


def test_counters_are_exact(proxy: FaultProxy, memcached: MemcachedProcess) -> None:
    request = b"get nothing\r\n"
    with _raw_connection(proxy) as a, _raw_connection(proxy) as b:
        a.sendall(request)
        assert a.recv(100) == b"END\r\n"
        b.sendall(request)
        assert b.recv(100) == b"END\r\n"
    assert proxy.wait_until(lambda s: s.open_connections == 0, WAIT)
    stats = proxy.stats()
    assert stats.connections == 2
    assert stats.upstream_connections == 2
    assert stats.bytes_received == stats.bytes_to_upstream == 2 * len(request)
    assert stats.bytes_to_clients == 2 * len(b"END\r\n")
    assert stats.resets == stats.upstream_failures == stats.waiting == 0


# -- latency --------------------------------------------------------------------------


def test_latency_adds_at_least_the_delay(proxy: FaultProxy, make_client: MakeClient) -> None:
    client = make_client()
    assert client.set("k", b"v") is True
    delay = 0.12  # below the client's read timeout, so the call succeeds
    proxy.latency(delay)
    assert proxy.mode.delay == delay
    started = time.monotonic()
    assert client.get("k") == b"v"  # an existing connection
    elapsed = time.monotonic() - started
    assert delay <= elapsed < delay + MARGIN
    proxy.pass_through()
    started = time.monotonic()
    assert client.get("k") == b"v"
    assert time.monotonic() - started < delay


# -- black hole -----------------------------------------------------------------------


def test_black_hole_times_out_and_nothing_reaches_memcached(
    proxy: FaultProxy, make_client: MakeClient, memcached: MemcachedProcess
) -> None:
    gets_before = _mc_stat(memcached, "cmd_get")
    proxy.black_hole()
    client = make_client()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.get("k")
    elapsed = time.monotonic() - started
    assert TIMEOUT - 0.01 <= elapsed < TIMEOUT + MARGIN
    assert proxy.wait_until(lambda s: s.bytes_received == len(b"get k\r\n"), WAIT)
    stats = proxy.stats()
    assert stats.connections == 1
    assert stats.bytes_forwarded == 0
    assert stats.upstream_connections == 0
    assert _mc_stat(memcached, "cmd_get") == gets_before


def test_black_hole_swallows_replies_on_existing_connections(proxy: FaultProxy) -> None:
    with _raw_connection(proxy) as sock:
        sock.sendall(b"version\r\n")
        assert sock.recv(100).startswith(b"VERSION")
        proxy.black_hole()
        sock.sendall(b"version\r\n")
        sock.settimeout(TIMEOUT)
        with pytest.raises(TimeoutError):
            sock.recv(100)
    assert proxy.stats().bytes_to_upstream == len(b"version\r\n")


# -- reset ----------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["new-connection", "existing"])
def test_reset_gives_a_connection_reset(
    proxy: FaultProxy, make_client: MakeClient, existing: bool
) -> None:
    client = make_client()
    if existing:
        assert client.get("k") is None
    forwarded = proxy.bytes_forwarded
    proxy.reset()
    started = time.monotonic()
    with pytest.raises(ConnectionResetError):
        client.get("k")
    assert time.monotonic() - started < TIMEOUT  # a reset, not a timeout
    assert proxy.wait_until(lambda s: s.resets == 1 and s.open_connections == 0, WAIT)
    assert proxy.bytes_forwarded == forwarded


def test_reset_leaves_idle_connections_open_until_they_send(proxy: FaultProxy) -> None:
    with _raw_connection(proxy) as sock:
        proxy.reset()
        assert not proxy.wait_until(lambda s: s.resets > 0, 0.05)
        assert proxy.stats().open_connections == 1
        sock.sendall(b"version\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)


# -- close mid-reply ------------------------------------------------------------------


def test_close_mid_reply_sends_exactly_the_prefix(
    proxy: FaultProxy, memcached: MemcachedProcess
) -> None:
    assert memcached.raw(b"set k 0 0 10\r\n0123456789\r\n") == b"STORED\r\n"
    proxy.close_mid_reply(12)
    with _raw_connection(proxy) as sock:
        sock.sendall(b"get k\r\n")
        assert _recv_all(sock) == b"VALUE k 0 10"  # then EOF
    # Counting starts again on each connection.
    with _raw_connection(proxy) as sock:
        sock.sendall(b"get k\r\n")
        assert _recv_all(sock) == b"VALUE k 0 10"


def test_close_mid_reply_is_an_error_and_pass_through_recovers(
    proxy: FaultProxy, make_client: MakeClient
) -> None:
    client = make_client()
    assert client.set("k", b"x" * 100) is True
    proxy.close_mid_reply(20)
    with pytest.raises((MemcacheUnexpectedCloseError, OSError)):
        client.get("k")
    proxy.pass_through()
    assert client.get("k") == b"x" * 100  # the same client reconnects
    assert make_client().get("k") == b"x" * 100


def test_close_mid_reply_zero_closes_before_any_byte(proxy: FaultProxy) -> None:
    proxy.close_mid_reply(0)
    with _raw_connection(proxy) as sock:
        sock.sendall(b"version\r\n")
        assert _recv_all(sock) == b""
    assert proxy.stats().bytes_to_clients == 0


# -- trickle --------------------------------------------------------------------------


def test_trickle_makes_a_successful_get_far_slower_than_its_timeout(
    proxy: FaultProxy, make_client: MakeClient
) -> None:
    client = make_client()
    value = b"y" * 20
    assert client.set("k", value) is True
    # The reply "VALUE k 0 20\r\n" + 20 bytes + "\r\nEND\r\n" is 41 bytes: 11 pieces of
    # 4 bytes, 10 intervals of 0.08 s, each well under the 0.2 s read timeout.
    proxy.trickle(4, 0.08)
    started = time.monotonic()
    assert client.get("k") == value
    elapsed = time.monotonic() - started
    assert elapsed > 3 * TIMEOUT
    assert elapsed < 10 * 0.08 + 1.0
    proxy.pass_through()
    started = time.monotonic()
    assert make_client().get("k") == value
    assert time.monotonic() - started < TIMEOUT


# -- switching, stopping and lifecycle ------------------------------------------------


def test_switching_back_to_pass_through_works_with_a_new_client(
    proxy: FaultProxy, make_client: MakeClient
) -> None:
    assert make_client().set("k", b"v") is True
    proxy.black_hole()
    with pytest.raises(TimeoutError):
        make_client().get("k")
    proxy.reset()
    with pytest.raises(ConnectionResetError):
        make_client().get("k")
    proxy.pass_through()
    assert make_client().get("k") == b"v"


def test_stop_returns_promptly_with_connections_open(memcached: MemcachedProcess) -> None:
    proxy = FaultProxy(("127.0.0.1", memcached.port)).start()
    socks = [_raw_connection(proxy) for _ in range(4)]
    try:
        idle, delayed, trickled, swallowed = socks
        idle.sendall(b"version\r\n")
        assert idle.recv(100).startswith(b"VERSION")
        # Two pumps parked in long delays ...
        proxy.latency(30.0)
        delayed.sendall(b"version\r\n")
        assert proxy.wait_until(lambda s: s.waiting == 1, WAIT)
        proxy.trickle(1, 30.0)
        trickled.sendall(b"version\r\n")
        assert trickled.recv(1) == b"V"
        assert proxy.wait_until(lambda s: s.waiting == 2, WAIT)
        # ... and one blocked reading a client whose bytes go nowhere.
        proxy.black_hole()
        swallowed.sendall(b"version\r\n")
        assert proxy.wait_until(lambda s: s.bytes_received == 4 * len(b"version\r\n"), WAIT)
        assert proxy.stats().open_connections == 4

        started = time.monotonic()
        proxy.stop(timeout=2.0)
        assert time.monotonic() - started < 0.5
        assert _proxy_threads(proxy) == []
        assert proxy.stats().open_connections == 0
        for sock in socks:  # every client sees its connection closed
            sock.settimeout(WAIT)
            _recv_all(sock)
        proxy.stop()  # idempotent
        assert proxy.errors == []
    finally:
        for sock in socks:
            sock.close()


def test_lifecycle_errors(memcached: MemcachedProcess) -> None:
    proxy = FaultProxy(("127.0.0.1", memcached.port))
    with pytest.raises(RuntimeError):
        _ = proxy.port
    with proxy, pytest.raises(RuntimeError):
        proxy.start()
    with pytest.raises(RuntimeError):
        proxy.start()  # no restart after stop
    FaultProxy(("127.0.0.1", memcached.port)).stop()  # never started: no error
    assert _proxy_threads(proxy) == []


@pytest.mark.parametrize(
    "set_mode",
    [
        lambda p: p.latency(-0.1),
        lambda p: p.close_mid_reply(-1),
        lambda p: p.trickle(0, 0.1),
        lambda p: p.trickle(1, -0.1),
    ],
    ids=["latency", "close_mid_reply", "trickle-chunk", "trickle-interval"],
)
def test_bad_mode_arguments(set_mode: Callable[[FaultProxy], None]) -> None:
    proxy = FaultProxy(("127.0.0.1", 1))
    with pytest.raises(ValueError):
        set_mode(proxy)
    assert proxy.mode.kind == "pass_through"


def test_unreachable_upstream_closes_the_client() -> None:
    with FaultProxy(("127.0.0.1", free_port())) as proxy:
        with _raw_connection(proxy) as sock:
            sock.sendall(b"version\r\n")
            assert _recv_all(sock) == b""
        client = Client(("127.0.0.1", proxy.port), connect_timeout=TIMEOUT, timeout=TIMEOUT)
        try:
            with pytest.raises(MemcacheUnexpectedCloseError):
                client.get("k")
        finally:
            client.close()
        stats: ProxyStats = proxy.stats()
        assert stats.upstream_failures == 2
        assert stats.bytes_forwarded == 0
    assert proxy.errors == []


# -- the stuck listener ---------------------------------------------------------------


@pytest.mark.parametrize("backlog", [1, 3])
def test_backlog_listener_connect_never_completes(backlog: int) -> None:
    with BacklogListener(backlog=backlog) as listener:
        assert listener.is_full()
        assert len(listener.fillers) == listener.backlog + 1  # Linux: backlog + 1 queued
        client = Client(("127.0.0.1", listener.port), connect_timeout=TIMEOUT, timeout=TIMEOUT)
        try:
            for _ in range(2):  # and again: nothing drains the queue
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    client.get("k")
                elapsed = time.monotonic() - started
                assert TIMEOUT - 0.01 <= elapsed < TIMEOUT + MARGIN
        finally:
            client.close()
        assert not listener.connect_completes(0.05)
        assert len(listener.fillers) == listener.backlog + 1
    assert listener.fillers == []
