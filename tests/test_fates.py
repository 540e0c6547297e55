"""Writes of unknown fate (issue 11, item 1): a write that timed out after it was sent
must not land after a later write of the same key was acknowledged.

:meth:`tests.support.faultproxy.FaultProxy.hold_requests` holds one segment a client
sends for 0.6 s,
longer than the layer's 0.25 s timeout: the abandoned ``set`` reaches memcached after
the caller was told it failed, as on a congested network or a paused server. Before the
fix the connection was dropped and the next write went out on a new one, which
memcached ran first: an acknowledged delete was undone 0.35 s later.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from cachechain import Chain, MemoryLayer, WriteInDoubtError
from cachechain._errors import LayerError, LayerTimeoutError
from cachechain.layers._base import MISSING
from cachechain.layers._fates import Fates, Reaper
from cachechain.layers._memcached import MemcachedLayer
from cachechain.layers._memcached_keys import map_key
from cachechain.layers._wire import Connection
from tests.support.faultproxy import FaultProxy
from tests.support.servers import MemcachedProcess

TIMEOUT = 0.25
HOLD = 0.6
#: How long a test watches for the abandoned write to show up (it lands after HOLD).
WATCH = HOLD + 0.6


@pytest.fixture()
def proxy(memcached: MemcachedProcess) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", memcached.port)) as p:
        yield p


def hold_next(proxy: FaultProxy) -> None:
    """Deliver the next segment any client sends HOLD seconds late (what that client
    sends after it waits behind it, as TCP orders it)."""
    proxy.hold_requests(lambda _: True, HOLD)


def answered(proxy: FaultProxy, held: int = 1) -> bool:
    """Wait until memcached has answered ``held`` held segments (so it ran them)."""
    return proxy.wait_until(lambda s: s.held_replies >= held, 5.0)


def via(proxy: FaultProxy, name: str = "L2") -> MemcachedLayer:
    return MemcachedLayer(name, proxy.address, timeout=TIMEOUT, connect_timeout=TIMEOUT)


def never_seen(read: object, value: object, seconds: float = WATCH) -> bool:
    """Read ``read()`` until ``seconds`` pass; False as soon as it returns ``value``.
    The value would come from memcached running another connection's command:
    nothing in this process to wait on."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if read() == value:  # type: ignore[operator]
            return False
        time.sleep(0.01)
    return True


def acknowledged(call: object, seconds: float = 5.0) -> int:
    """Call ``call()`` until it succeeds (returns without raising, and not False);
    return how many attempts were refused first."""
    refused = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if call() is not False:  # type: ignore[operator]
                return refused
        except LayerError:
            pass
        refused += 1
        time.sleep(0.02)
    raise AssertionError(f"not acknowledged within {seconds}s")


def test_an_abandoned_set_cannot_undo_a_later_delete(
    proxy: FaultProxy, memcached: MemcachedProcess
) -> None:
    layer = via(proxy)
    direct = MemcachedLayer("D", memcached.address)
    try:
        layer.set("k", "v0")
        hold_next(proxy)
        with pytest.raises(LayerTimeoutError):
            layer.set("k", "v1")
        assert proxy.stats().held == 1
        # The delete is refused while the set is in doubt, then acknowledged.
        refused = acknowledged(lambda: layer.delete("k"))
        assert never_seen(lambda: direct.get("k"), "v1")
        assert refused >= 1
        assert proxy.stats().held_replies == 1  # memcached ran the set before the delete
        assert layer.get("k") is MISSING
        assert layer._pool.fates.held == {}
    finally:
        layer.close()
        direct.close()


def test_a_set_in_doubt_is_deleted_right_behind_itself(
    proxy: FaultProxy, memcached: MemcachedProcess
) -> None:
    """Another process's acknowledged write is not ordered by this one's holds: the
    late set is retracted on its own connection, so it cannot outlive that write."""
    layer = via(proxy)
    other = MemcachedLayer("B", memcached.address)
    try:
        hold_next(proxy)
        with pytest.raises(LayerTimeoutError):
            layer.set("k", "late")
        other.set("k", "theirs")  # acknowledged while the set is on its way
        assert answered(proxy)
        layer._pool.fates.wait([map_key("k", "")], time.monotonic() + 5.0, "L2")
        assert never_seen(lambda: other.get("k"), "late", 0.3)
        assert other.get("k") is MISSING  # the late set, then its delete: a miss
    finally:
        layer.close()
        other.close()


def test_an_add_in_doubt_is_retracted_only_if_it_stored(
    proxy: FaultProxy, memcached: MemcachedProcess
) -> None:
    """A late ``add`` that found the key absent is deleted behind itself (its caller was
    told it failed: no phantom lock, no value older than a later write); one that found
    another client's value leaves it alone."""
    layer = via(proxy)
    other = MemcachedLayer("B", memcached.address)
    try:
        hold_next(proxy)
        with pytest.raises(LayerTimeoutError):
            layer.add("free", "phantom")
        layer._pool.fates.wait([map_key("free", "")], time.monotonic() + 5.0, "L2")
        assert other.get("free") is MISSING  # stored late, then retracted
        other.set("taken", "theirs")
        hold_next(proxy)
        with pytest.raises(LayerTimeoutError):
            layer.add("taken", "mine")
        layer._pool.fates.wait([map_key("taken", "")], time.monotonic() + 5.0, "L2")
        assert other.get("taken") == "theirs"  # NOT_STORED: nothing to retract
    finally:
        layer.close()
        other.close()


def test_a_refused_write_is_never_sent(proxy: FaultProxy) -> None:
    layer = via(proxy)
    try:
        hold_next(proxy)
        with pytest.raises(LayerTimeoutError):
            layer.set("k", "v1")
        start = time.monotonic()
        with pytest.raises(WriteInDoubtError) as info:
            layer.add("k", "mine")
        # It waited for the fate until its own deadline, no longer.
        assert TIMEOUT - 0.05 <= time.monotonic() - start < TIMEOUT + 0.2
        assert not info.value.trips_breaker
        assert info.value.layer == "L2"
        # Another key is not held.
        layer.set("other", 1)
        assert layer.get("other") == 1
    finally:
        layer.close()


def test_chains_never_read_the_abandoned_value_after_the_delete(
    proxy: FaultProxy, memcached: MemcachedProcess
) -> None:
    """The issue's sequence: ``set -> False``, ``delete``, ``flush() -> True``, then no
    read in this process or in another one returns the abandoned value."""
    here = Chain([MemoryLayer("L1"), via(proxy)], coherence=False)
    there = Chain([MemcachedLayer("L2", memcached.address)], coherence=False)
    try:
        assert here.set("k", "v0")
        hold_next(proxy)
        assert here.set("k", "v1") is False
        here.delete("k")
        assert here.flush(5.0) is True
        assert answered(proxy)
        assert never_seen(lambda: here.get("k"), "v1")
        assert never_seen(lambda: there.get("k"), "v1", 0.2)
        assert here.get("k") is None and there.get("k") is None
    finally:
        here.close()
        there.close()


def test_an_abandoned_delete_cannot_free_a_later_lock(
    proxy: FaultProxy, memcached: MemcachedProcess
) -> None:
    """A delete in doubt holds the key: the process's next ``add`` (a lock) waits for
    it, so the late delete cannot remove the lock it then takes."""
    layer = via(proxy)
    direct = MemcachedLayer("D", memcached.address)
    try:
        hold_next(proxy)
        with pytest.raises(LayerTimeoutError):
            layer.delete("lock")  # a release that timed out
        acknowledged(lambda: layer.add("lock", "mine"))  # taken again
        assert never_seen(lambda: direct.get("lock"), MISSING)
        assert direct.get("lock") == "mine"
    finally:
        layer.close()
        direct.close()


def test_an_add_whose_stored_reply_came_split_by_its_timeout_is_still_retracted(
    proxy: FaultProxy, memcached: MemcachedProcess
) -> None:
    """The caller of an ``add`` read "STO" of its reply, then timed out, and was told
    the lock was not taken. The reaper read on from "RED" and did not recognize a
    ``STORED``, so nothing retracted the add: memcached kept a lock nobody held, and
    every process's ``add`` failed until its TTL."""
    layer = via(proxy)
    direct = MemcachedLayer("D", memcached.address)
    try:
        layer.get("warm")  # connected before the trickle
        proxy.trickle(3, 2 * TIMEOUT)  # "STORED\r\n" as "STO", "RED", "\r\n"
        with pytest.raises(LayerTimeoutError):
            layer.add("lock", "mine", 60)
        proxy.pass_through()
        layer._pool.fates.wait([map_key("lock", "")], time.monotonic() + 10.0, "L2")
        assert direct.get("lock") is MISSING, "the add the caller was told failed holds"
    finally:
        layer.close()
        direct.close()


def test_a_lease_waits_for_a_set_in_doubt_whose_retraction_would_free_it(
    proxy: FaultProxy, memcached: MemcachedProcess
) -> None:
    """The meta lease (``mg <key> N``) creates the stub it wins: a write, which must
    wait for an earlier write of the key in doubt, as the classic lease's ``add`` does.
    It did not: the late set then replaced the stub and its retraction deleted it, so
    another process won the lease too (two loaders) and the winner's store failed."""
    layer = via(proxy)
    other = MemcachedLayer("B", memcached.address)
    try:
        hold_next(proxy)
        with pytest.raises(LayerTimeoutError):
            layer.set("k", "late")
        won: list[object] = []
        acknowledged(lambda: won.append(layer.lease("k", 10)))
        mine = won[-1]
        assert mine is not None and mine.won  # type: ignore[attr-defined]
        assert answered(proxy)
        layer._pool.fates.wait([map_key("k", "")], time.monotonic() + 5.0, "L2")
        theirs = other.lease("k", 10)
        assert theirs is not None and not theirs.won, "the stub this process won is gone"
    finally:
        layer.close()
        other.close()


def test_the_wait_for_a_pooled_connection_does_not_eat_the_commands_timeout(
    proxy: FaultProxy,
) -> None:
    """A caller waits up to ``pool_timeout`` for a client, then its command gets its own
    ``timeout``. The deadline used to start before the wait: with one client busy for
    0.3 s, the next caller's 0.3 s command timed out at 0.5 s on a healthy server (in
    a cluster, the node was marked down for ``dead_timeout``)."""
    layer = MemcachedLayer(
        "L2", proxy.address, timeout=0.5, connect_timeout=0.5, pool_size=1, pool_timeout=5.0
    )
    try:
        layer.set("a", 1)
        layer.set("b", 2)
        proxy.hold_requests(lambda seg: seg.startswith(b"get "), 0.3, count=2)
        got: dict[str, object] = {}

        def read(key: str) -> None:
            try:
                got[key] = layer.get(key)
            except LayerError as exc:
                got[key] = exc

        first = threading.Thread(target=read, args=("a",))
        first.start()
        assert proxy.wait_until(lambda s: s.held >= 1, 5.0)  # it has the one client
        second = threading.Thread(target=read, args=("b",))
        second.start()
        first.join(5.0)
        second.join(5.0)
        assert got == {"a": 1, "b": 2}
    finally:
        layer.close()


class _WaitingPool:
    """Makes every wait of ``layer``'s pool for a client last ``WAITED`` seconds on a
    fake monotonic clock (the one the pool measures its waits by), the first one
    ending with the pool's one idle client (connected: a reused one), and records the
    deadline each command is sent with."""

    WAITED = 0.4

    def __init__(self, layer: MemcachedLayer, monkeypatch: pytest.MonkeyPatch) -> None:
        import cachechain.layers._pool as pool_module

        self.pool = pool = layer._pool
        self.now = 100.0
        self.deadlines: list[float] = []
        fake_time = type("FakeTime", (), {"monotonic": staticmethod(lambda: self.now)})
        monkeypatch.setattr(pool_module, "time", fake_time)
        acquire = pool._acquire_slow
        kept = [pool.first.idle.pop()]  # busy: the next call waits for it
        assert kept[0].sock is not None

        def waited(node: object) -> object:
            self.now += self.WAITED
            return kept.pop() if kept else acquire(node)

        monkeypatch.setattr(pool, "_acquire_slow", waited)

    def op(self, fail_once: BaseException | None = None) -> object:
        """A command that records its deadline (and raises ``fail_once`` once)."""

        def command(client: object, deadline: float) -> str:
            self.deadlines.append(deadline)
            nonlocal fail_once
            if fail_once is not None:
                error, fail_once = fail_once, None
                raise error
            return "ok"

        return command


@pytest.mark.parametrize("path", ["stale before sending", "retry after a reset"])
def test_a_call_moves_its_deadline_by_one_wait_for_the_pool(
    memcached: MemcachedProcess, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The deadline moves by the first wait for a pooled connection only. A second one
    (a stale connection replaced before an ``add``, a read retried after a reset) came
    out of the timeout no more: a call could last ``timeout + 2 * pool_timeout``, past
    the breaker's slow-call threshold (found by review)."""
    import cachechain.layers._pool as pool_module

    layer = MemcachedLayer("L2", memcached.address, pool_size=1, pool_timeout=1.0)
    try:
        layer.set("k", 1)  # one pooled client, connected
        spy = _WaitingPool(layer, monkeypatch)
        pool, node = spy.pool, spy.pool.first
        if path == "stale before sending":
            checks = iter([True])  # the client it waited for looks stale, once
            monkeypatch.setattr(pool_module, "stale", lambda client: next(checks, False))
            monkeypatch.setattr(pool_module, "RECENT", -1.0)  # always checked
            assert pool.call_once(node, spy.op(), 10.0) == "ok"
        else:
            reset = ConnectionResetError("reset by peer")
            assert pool.attempt(node, spy.op(fail_once=reset), (10.0,), True) == "ok"
            assert len(spy.deadlines) == 2  # sent, reset, sent again on a new client
        assert spy.now == pytest.approx(100.0 + 2 * spy.WAITED)  # it waited twice
        assert spy.deadlines[-1] == pytest.approx(10.0 + spy.WAITED)
    finally:
        layer.close()


# -- the reaper ---------------------------------------------------------------------------


class Silent:
    """A server that accepts and reads but never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


def connected(port: int) -> Connection:
    conn = Connection(("127.0.0.1", port), connect_timeout=1.0, timeout=1.0, max_value=1024)
    conn.connect(time.monotonic() + 1.0)
    return conn


def test_a_silent_connection_is_released_at_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    server = Silent()
    reaper = Reaper(limit=0.2)
    done = threading.Event()
    try:
        conn = connected(server.port)
        with pytest.raises(TimeoutError):
            conn.set(b"k", b"v", 0, time.monotonic() + 0.05)
        assert conn.pending
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="cachechain.memcached"):
            reaper.adopt(conn, done.set)
            assert done.wait(5.0)
        assert time.monotonic() - start >= 0.19
        assert reaper.expired == 1 and reaper.pending() == 0
        assert "may still run that write" in caplog.text
    finally:
        server.close()


def test_the_reaper_sends_the_rest_of_a_command_then_waits_for_the_answer(
    memcached: MemcachedProcess,
) -> None:
    """A command whose send was cut short: the reaper sends what was left (memcached
    runs it whole) before its ``version``, and the fate is known at the answer."""
    reaper = Reaper()
    done = threading.Event()
    conn = connected(memcached.port)
    command = b"set half 0 0 5\r\nhello\r\n"
    conn.out, conn.sent, conn.pending = command, 10, True
    assert conn.sock is not None
    conn.sock.sendall(command[:10])
    reaper.adopt(conn, lambda: (conn.close(), done.set()))
    assert done.wait(5.0)
    assert reaper.expired == 0
    assert memcached.raw(b"get half\r\n").startswith(b"VALUE half 0 5\r\nhello")


def test_fates_count_each_write_in_doubt() -> None:
    fates = Fates()
    fates.hold([b"a", b"b"])
    fates.hold([b"a"])
    fates.release([b"a", b"b"])
    assert fates.held == {b"a": 1}
    with pytest.raises(WriteInDoubtError):
        fates.wait([b"b", b"a"], time.monotonic() + 0.01, "L2")
    released = threading.Event()

    def later() -> None:
        fates.wait([b"a"], time.monotonic() + 5.0, "L2")
        released.set()

    waiter = threading.Thread(target=later)
    waiter.start()
    fates.release([b"a"])
    waiter.join(5.0)
    assert released.is_set() and fates.held == {}


def test_mapped_keys_are_what_is_held(proxy: FaultProxy) -> None:
    layer = via(proxy)
    try:
        hold_next(proxy)
        with pytest.raises(LayerTimeoutError):
            layer.set_many({"a": 1, "b": 2})
        assert set(layer._pool.fates.held) == {map_key("a", ""), map_key("b", "")}
        layer._pool.fates.wait([map_key("a", "")], time.monotonic() + 5.0, "L2")
        assert layer._pool.fates.held == {}
        layer.set("a", 3)
        assert layer.get("a") == 3
    finally:
        layer.close()
