"""The lean path of the chain's atomic operations (issue 10, the 1.2x goal): the
wrappers of the shared layer resolved once per chain (cachechain._atomic_plan) and
called as they would call themselves (breaker, slow-call timing, namespace), the first
layer updated as before (metrics, failures counted and logged once), and the wire's
one-line replies and kept ``poll`` object (cachechain.layers._wire)."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest
from pymemcache.exceptions import MemcacheServerError, MemcacheUnknownError

from cachechain import Chain, LayerError, MemcachedLayer, MemoryLayer
from cachechain._resilience import ResilientLayer, unwrapped
from cachechain.layers import _pool
from cachechain.layers._wire import Connection, stale
from cachechain.metrics import MetricsCollector
from tests.support.fakes import FakeClock, FakeLayer
from tests.support.servers import MemcachedProcess
from tests.test_wire import scripted, soon


class Recorder(MetricsCollector):
    """Records the first layers' writes and the failures the chain reports."""

    def __init__(self) -> None:
        self.sets: list[tuple[str, bool]] = []
        self.deletes: list[tuple[str, bool]] = []
        self.errors: list[tuple[str, str, str]] = []

    def record_set(self, layer: str, ok: bool, duration: float) -> None:
        self.sets.append((layer, ok))

    def record_delete(self, layer: str, ok: bool, duration: float) -> None:
        self.deletes.append((layer, ok))

    def record_error(self, layer: str, operation: str, error_type: str) -> None:
        self.errors.append((layer, operation, error_type))


class SlowAdds(FakeLayer):
    """A fake shared layer whose ``add`` takes ``slow`` seconds of ``timer``."""

    def __init__(self, name: str, timer: FakeClock) -> None:
        super().__init__(name)
        self.timer = timer
        self.slow = 0.0

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        self.timer.advance(self.slow)
        return super().add(key, value, ttl)


class CountingResilient(ResilientLayer):
    """A ResilientLayer subclass: the chain must call it, not what it wraps."""

    def __init__(self, layer: Any) -> None:
        super().__init__(layer)
        self.seen: list[str] = []

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        self.seen.append(key)
        return super().add(key, value, ttl)


def test_the_plan_resolves_the_chain_s_own_wrappers(memcached: MemcachedProcess) -> None:
    chain = Chain([MemoryLayer("L1"), MemcachedLayer("L2", memcached.address)])
    plain = Chain([MemoryLayer("L1"), MemcachedLayer("L2", memcached.address)], coherence=False)
    try:
        assert chain.add("plan:k", 1) is True
        plan = chain._atomic_plan
        assert plan is not None
        wrapper: Any = chain._shared.layer
        layer = unwrapped(wrapper)
        assert plan.breaker is wrapper.breaker and plan.timeout == wrapper.timeout
        assert chain._coherence is not None and plan.namespace is chain._coherence.namespace
        assert getattr(plan.add, "__self__", None) is layer
        # The key went to memcached under the namespace's generation, as before.
        assert layer.get(plan.namespace.current() + "plan:k") == 1
        assert chain.incr("plan:k") == 2 and chain.get("plan:k") == 2

        assert plain.add("plan:p", 1) is True
        other = plain._atomic_plan
        assert other is not None and other.namespace is None and other.breaker is not None
        assert unwrapped(plain._shared.layer).get("plan:p") == 1
    finally:
        chain.close()
        plain.close()


def test_a_wrapper_the_plan_does_not_know_is_called_as_it_is() -> None:
    fake = FakeLayer("F")
    mine = CountingResilient(fake)
    chain = Chain([MemoryLayer("L1"), mine], coherence=False)
    try:
        assert chain.add("k", 1) is True and chain.add("k", 2) is False
        assert mine.seen == ["k", "k"]  # through the subclass's own add
        assert chain._atomic_plan is not None and chain._atomic_plan.breaker is None
        assert chain.incr("k") == 2 and fake.ops("incr") == ["k"]
    finally:
        chain.close()


def test_a_slow_atomic_call_counts_against_the_breaker_and_still_answers() -> None:
    timer = FakeClock()
    fake = SlowAdds("F", timer)
    guarded = ResilientLayer(fake, timeout=1.0, clock=timer)
    chain = Chain([MemoryLayer("L1"), guarded])
    try:
        assert chain._coherence is not None  # the namespace sits inside the breaker
        fake.slow = 2.0
        assert chain.add("a", 1) is True  # slower than the timeout: a failure, answered
        assert guarded.breaker.stats().consecutive_failures == 1
        fake.slow = 0.5
        assert chain.add("b", 1) is True  # within it: a success
        assert guarded.breaker.stats().consecutive_failures == 0
        generation = chain._coherence.namespace.current()
        assert {k for k, _ in fake.data.items() if k.startswith(generation)} == {
            generation + "a",
            generation + "b",
        }
    finally:
        chain.close()


@pytest.mark.parametrize("collector", [False, True], ids=["no collector", "collector"])
def test_the_first_layer_is_updated_recorded_and_its_failure_counted_once(
    collector: bool, caplog: pytest.LogCaptureFixture
) -> None:
    l1 = FakeLayer("L1", local=True)
    l2 = FakeLayer("L2")
    recorder = Recorder()
    chain = Chain([l1, l2], coherence=False, metrics=recorder if collector else None)
    try:
        l1.set("a", "stale")
        assert chain.add("a", "v", 30) is True
        assert "a" not in l1.data  # the first layer's copy dropped: "v" is in L2 only
        l2.set("n", 5)
        l1.set("n", 5)
        assert chain.incr("n") == 6
        assert "n" not in l1.data  # the first layer's copy dropped
        if collector:
            assert recorder.deletes == [("L1", True)] * 2
        l1.fail = LayerError("L1 is down", layer="L1")
        with caplog.at_level(logging.WARNING, logger="cachechain"):
            assert chain.incr("n") == 7  # the shared layer's answer stands
            assert chain.incr("n") == 8
            assert chain.add("b", 1) is True
        warned = [r for r in caplog.records if "'L1'" in r.getMessage()]
        assert len(warned) == 1  # three failed deletes, logged once
        assert "on delete" in warned[0].getMessage()
        if collector:
            assert recorder.errors == [("L1", "delete", "backend")] * 3
            assert recorder.deletes[2:] == [("L1", False)] * 3
        health = chain.health().layers[0]
        assert health.name == "L1" and health.last_error is not None
        assert l2.data["n"][0] == 8 and l2.data["b"][0] == 1
    finally:
        chain.close()


def test_stale_keeps_one_poll_object_per_socket() -> None:
    conn = Connection(("127.0.0.1", 1), connect_timeout=1.0, timeout=1.0, max_value=1024)
    mine, peer = socket.socketpair()
    conn.sock = mine
    assert stale(conn) is False
    poller = conn.poller
    assert poller is not None
    assert stale(conn) is False and conn.poller is poller  # kept, not made again
    peer.sendall(b"x")  # bytes nobody asked for: the stream is out of step
    assert stale(conn) is True
    mine.recv(1)  # read: the socket is quiet again
    assert stale(conn) is False
    peer.close()  # the server closed the connection
    assert stale(conn) is True
    conn.close()
    assert conn.poller is None and conn.sock is None  # dropped with its socket
    again, peer2 = socket.socketpair()
    conn.sock = again
    assert stale(conn) is False and conn.poller is not poller  # polls the new socket
    peer2.close()
    assert stale(conn) is True
    conn.close()


def test_stale_on_a_closed_descriptor_is_true() -> None:
    conn = Connection(("127.0.0.1", 1), connect_timeout=1.0, timeout=1.0, max_value=1024)
    sock, peer = socket.socketpair()
    conn.sock = sock
    sock.close()  # closed behind the connection's back: no descriptor to poll
    assert stale(conn) is True
    peer.close()


def test_a_server_restart_is_found_before_an_atomic_command(
    own_memcached: MemcachedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_pool, "RECENT", -1.0)  # every command polls its connection
    layer = MemcachedLayer("L2", own_memcached.address, timeout=1.0, connect_timeout=1.0)
    try:
        assert layer.add("k", 1) is True
        assert layer.incr("k") == 2  # an int's envelope: made a counter
        client = layer._pool.first.idle[0]
        assert client.poller is not None  # the check ran with the connection's poller
        own_memcached.restart()
        assert layer.add("k", 2) is True  # the stale connection was replaced, not used
        assert layer.incr("k") == 3 and layer.incr("n") is None
    finally:
        layer.close()


def test_a_burst_of_atomic_commands_polls_once_then_a_gap_polls_again(
    memcached: MemcachedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command that must not run twice skips the poll for a closed connection when
    one was answered on the connection less than RECENT seconds before it is taken,
    by the pool's clock: an idle gap, whatever the commands' deadlines say."""
    polled: list[int] = []

    def spy(conn: Connection) -> bool:
        polled.append(1)
        return stale(conn)

    monkeypatch.setattr(_pool, "stale", spy)
    clock = FakeClock()
    layer = MemcachedLayer(
        "L2", memcached.address, timeout=1.0, connect_timeout=1.0, monotonic=clock
    )
    try:
        layer.set("warm", 1)  # connects: the socket exists, no atomic command answered
        assert layer.add("a", 1) is True
        assert polled == [1]  # the first atomic command on it polls
        assert layer.add("b", 1) is True and layer.incr("a") == 2
        assert layer.decr("a") == 1 and layer.touch("b", 60.0) is True
        assert polled == [1]  # the burst: no more polls
        clock.advance(_pool.RECENT)  # idle as long as the window: still a burst
        assert layer.incr("a") == 2 and polled == [1]
        clock.advance(_pool.RECENT + 0.001)  # idle longer (a wait for the key, say)
        assert layer.add("c", 1) is True
        assert polled == [1, 1]
    finally:
        layer.close()


@pytest.mark.parametrize(
    ("call", "reply", "error", "match"),
    [
        (lambda c: c.add(b"k", b"v", 0, soon()), b"STORED\r\nJUNK", MemcacheUnknownError, "by"),
        (lambda c: c.add(b"k", b"v", 0, soon()), b"NOT_STORED\r\nX", MemcacheUnknownError, "by"),
        # An error line is raised as such, whatever follows it (as set's is).
        (
            lambda c: c.add(b"k", b"v", 0, soon()),
            b"SERVER_ERROR object too large for cache\r\nERROR\r\n",
            MemcacheServerError,
            "large",
        ),
        (lambda c: c.incr(b"k", 1, soon()), b"5\r\nJUNK", MemcacheUnknownError, "followed by"),
        # A stream out of step is never read as "not a number" (the conversion's cue).
        (
            lambda c: c.incr(b"k", 1, soon()),
            b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n5\r\n",
            MemcacheUnknownError,
            "followed by",
        ),
    ],
    ids=["add stored", "add not stored", "add error", "incr", "incr not a number"],
)
def test_a_one_line_reply_followed_by_more_is_an_error(
    call: Any, reply: bytes, error: type[Exception], match: str
) -> None:
    conn = scripted(reply)
    with pytest.raises(error, match=match):
        call(conn)
