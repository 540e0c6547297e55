"""Atomic operations (issue 10, point 1): ``add``, ``incr``, ``decr``, ``touch`` on each
layer, on the chain (its shared layer, the fence, the writers, outages, validation) and
across real processes over one real memcached."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymemcache.exceptions import MemcacheClientError

from cachechain import (
    MISSING,
    Chain,
    ChainClosedError,
    CoherenceConfig,
    ConfigError,
    CorruptValueError,
    InvalidKeyError,
    InvalidValueError,
    LayerConfig,
    LayerUnavailableError,
    MemcachedLayer,
    MemoryLayer,
)
from cachechain._resilience import ResilientLayer
from cachechain.layers import SupportsAdd, SupportsCounters, SupportsTouch
from cachechain.layers._counters import countable, decr_value, incr_value, raw, read_raw
from cachechain.layers._memcached_atomic import ContendedError, _native
from cachechain.metrics import MetricsCollector
from tests.support.fakes import FakeClock, FakeLayer
from tests.support.faultproxy import FaultProxy
from tests.support.processes import WAIT, reported, run_processes
from tests.support.servers import MemcachedProcess, just_stored

TOP = 2**63  # counters are signed 64-bit: [-TOP, TOP)
NOT_COUNTERS: tuple[Any, ...] = (1.5, True, "abc", "", " 5", "5.0", [1], None, TOP, -TOP - 1)


def mc_get(server: MemcachedProcess, mkey: bytes) -> bytes:
    """memcached's own reply to ``get`` (flags and bytes as stored)."""
    return server.raw(b"get " + mkey + b"\r\n")


def make_layer(server: MemcachedProcess | str, **kwargs: Any) -> MemcachedLayer:
    kwargs.setdefault("timeout", 0.5)
    kwargs.setdefault("connect_timeout", 0.5)
    address = server if isinstance(server, str) else server.address
    return MemcachedLayer("L2", address, **kwargs)


@pytest.fixture()
def layer(memcached: MemcachedProcess) -> Iterator[MemcachedLayer]:
    lay = make_layer(memcached)
    yield lay
    lay.close()


# -- the counter arithmetic --------------------------------------------------------------


def test_counter_arithmetic_is_memcached_read_as_signed_64_bit() -> None:
    assert incr_value(5, 3) == 8
    assert incr_value(TOP - 1, 1) == -TOP  # wraps modulo 2**64
    assert incr_value(6, 2**64 - 10) == -4  # an incr of 2**64 - d subtracts d
    assert incr_value(-1, 1) == 0
    assert decr_value(5, 3) == 2
    assert decr_value(5, 30) == 0  # memcached's decr stops at 0
    assert decr_value(-4, 1) == -5  # a negative counter goes down
    assert read_raw(raw(-4)) == -4 and raw(-4) == b"18446744073709551612"
    assert read_raw(b"9 ") == 9  # memcached pads a shrunk number with spaces
    for bad in (b"", b"x", b"-1", b"1" * 21, str(2**64).encode()):
        with pytest.raises(CorruptValueError):
            read_raw(bad)
    assert [countable(v) for v in (7, "7", "-7", -TOP, TOP - 1)] == [7, 7, -7, -TOP, TOP - 1]
    assert all(countable(v) is None for v in NOT_COUNTERS)
    assert countable("٣") is None  # a non-ASCII digit


# -- MemoryLayer (and FakeLayer, the same contract) ---------------------------------------


@pytest.fixture(params=["memory", "fake"])
def local_layer(request: pytest.FixtureRequest) -> tuple[Any, FakeClock]:
    clock = FakeClock()
    if request.param == "memory":
        return MemoryLayer("L1", clock=clock, default_ttl=60), clock
    return FakeLayer("F", clock=clock, default_ttl=60), clock


def test_in_process_layers_have_the_atomic_capabilities(local_layer: Any) -> None:
    lay, _ = local_layer
    assert isinstance(lay, SupportsAdd)
    assert isinstance(lay, SupportsCounters)
    assert isinstance(lay, SupportsTouch)


def test_in_process_add(local_layer: Any) -> None:
    lay, clock = local_layer
    assert lay.add("k", "first", 10) is True
    assert lay.add("k", "second", 10) is False
    assert lay.get("k") == "first"
    clock.advance(10)  # expired: absent again
    assert lay.add("k", "third") is True
    assert lay.get_with_ttl("k") == ("third", pytest.approx(60))
    with pytest.raises(InvalidValueError):
        lay.add("other", 1, 0)
    assert lay.get("other") is MISSING


def test_in_process_counters(local_layer: Any) -> None:
    lay, clock = local_layer
    assert lay.incr("n") is None and lay.get("n") is MISSING  # nothing is created
    lay.set("n", "5", 30)
    assert lay.incr("n") == 6 and lay.get("n") == 6  # a decimal str becomes an int
    assert lay.incr("n", 4) == 10
    assert lay.decr("n", 3) == 7
    assert lay.decr("n", 100) == 0  # stops at 0
    assert lay.incr("n", 2**64 - 5) == -5  # wraps: a subtraction below 0
    assert lay.decr("n", 2) == -7
    assert lay.get_with_ttl("n") == (-7, pytest.approx(30))  # the counter keeps its TTL
    clock.advance(30)
    assert lay.incr("n") is None
    for i, value in enumerate(NOT_COUNTERS):
        lay.set(f"x{i}", value)
        with pytest.raises(InvalidValueError):
            lay.incr(f"x{i}")
        assert lay.get(f"x{i}") == value  # unchanged
    lay.set("n", 1)
    for bad in (-1, 1.0, True, 2**64, "1"):
        with pytest.raises(InvalidValueError, match="delta"):
            lay.incr("n", bad)
        with pytest.raises(InvalidValueError, match="delta"):
            lay.decr("n", bad)
    assert lay.get("n") == 1


def test_in_process_touch(local_layer: Any) -> None:
    lay, clock = local_layer
    assert lay.touch("k", 10) is False
    lay.set("k", "v", 5)
    assert lay.touch("k", 100) is True
    clock.advance(50)
    assert lay.get_with_ttl("k") == ("v", pytest.approx(50))
    assert lay.touch("k") is True  # the layer's default TTL
    assert lay.get_with_ttl("k")[1] == pytest.approx(60)
    clock.advance(60)
    assert lay.touch("k", 10) is False


def test_the_fake_layer_records_and_fails_atomic_operations() -> None:
    fake = FakeLayer("F")
    fake.add("a", 1)
    fake.incr("a")
    fake.decr("a")
    fake.touch("a", 5)
    assert [fake.ops(op) for op in ("add", "incr", "decr", "touch")] == [["a"]] * 4
    fake.fail = LayerUnavailableError("down", layer="F")
    for call in (
        lambda: fake.add("b", 1),
        lambda: fake.incr("a"),
        lambda: fake.decr("a"),
        lambda: fake.touch("a"),
    ):
        with pytest.raises(LayerUnavailableError):
            call()


def test_memory_layer_add_and_incr_are_atomic_between_threads() -> None:
    lay = MemoryLayer("L1")
    lay.set("n", 0)
    start = threading.Barrier(8)
    won: list[int] = []
    counts: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        start.wait(10)
        for round_ in range(50):
            got = lay.incr("n")
            ok = lay.add(f"lock:{round_}", i)
            with lock:
                counts.append(got)  # type: ignore[arg-type]
                if ok:
                    won.append(round_)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(counts) == list(range(1, 401))
    assert sorted(won) == list(range(50))


# -- MemcachedLayer ----------------------------------------------------------------------


def test_memcached_add(layer: MemcachedLayer, memcached: MemcachedProcess) -> None:
    assert isinstance(layer, SupportsAdd | SupportsCounters | SupportsTouch)
    assert layer.add("k", {"v": 1}, 30) is True
    assert layer.add("k", {"v": 2}, 30) is False
    assert layer.get("k") == {"v": 1}
    assert memcached.ttl(b"k") in just_stored(30)
    with pytest.raises(InvalidValueError):
        layer.add("bad", {1, 2})  # JSON cannot encode it: nothing stored
    assert memcached.ttl(b"bad") is None
    with pytest.raises(InvalidValueError):
        layer.add("bad", 1, -1)
    # bytes that are not cachechain's are a value held: never a second lock owner
    assert memcached.raw(b"set foreign 0 0 3\r\nabc\r\n") == b"STORED\r\n"
    assert layer.add("foreign", 1) is False


def test_memcached_add_replaces_an_entry_expired_for_its_readers(
    memcached: MemcachedProcess,
) -> None:
    clock = FakeClock(time.time())
    lay = make_layer(memcached, clock=clock)
    lay.set("k", "old", 0.5)  # memcached keeps it for a whole second
    clock.advance(0.6)
    assert lay.get("k") is MISSING
    assert lay.add("k", "new", 10) is True
    assert lay.get("k") == "new"
    lay.close()


def test_memcached_counters_are_native_after_the_first_change(
    layer: MemcachedLayer, memcached: MemcachedProcess
) -> None:
    assert layer.incr("n") is None and memcached.ttl(b"n") is None
    layer.set("n", "5", 100)  # an envelope: memcached cannot count it...
    assert layer.incr("n") == 6  # ...so it is made a counter by compare-and-set
    assert mc_get(memcached, b"n") == b"VALUE n 2 1\r\n6\r\nEND\r\n"  # flag 2, digits
    assert 99 <= memcached.ttl(b"n") <= 100  # type: ignore[operator]  # TTL kept
    assert layer.get("n") == 6
    assert layer.get_with_ttl("n") == (6, 0.0)  # a counter's remaining TTL is unknown
    assert layer.get_many_with_ttl(["n"]) == {"n": (6, 0.0)}
    assert layer.incr("n", 10) == 16
    assert layer.decr("n", 7) == 9
    assert mc_get(memcached, b"n") == b"VALUE n 2 2\r\n9 \r\nEND\r\n"  # padded by memcached
    assert layer.get("n") == 9
    assert layer.decr("n", 100) == 0
    assert layer.incr("n", 2**64 - 4) == -4  # two's complement: below 0, natively
    assert layer.get("n") == -4 and layer.decr("n", 1) == -5
    assert layer.incr("n", 5) == 0
    layer.set("neg", -3)
    assert layer.incr("neg") == -2  # an envelope int of any sign becomes a counter
    layer.set("max", TOP - 1)
    assert layer.incr("max") == -TOP  # wraps as memcached does
    for i, value in enumerate(NOT_COUNTERS):
        layer.set(f"x{i}", value)
        with pytest.raises(InvalidValueError):
            layer.incr(f"x{i}")
        assert layer.get(f"x{i}") == value
    for bad in (-1, 1.5, False, 2**64):
        with pytest.raises(InvalidValueError, match="delta"):
            layer.incr("n", bad)


def test_memcached_counter_of_an_expired_envelope_is_absent(memcached: MemcachedProcess) -> None:
    clock = FakeClock(time.time())
    lay = make_layer(memcached, clock=clock)
    lay.set("n", 1, 0.5)
    clock.advance(0.6)
    assert lay.incr("n") is None
    lay.close()


def test_memcached_touch(layer: MemcachedLayer, memcached: MemcachedProcess) -> None:
    assert layer.touch("missing", 10) is False
    layer.set("k", {"v": 1}, 5)
    assert layer.touch("k", 100) is True
    assert layer.get_with_ttl("k")[1] == pytest.approx(100, abs=1)  # the envelope's
    assert memcached.ttl(b"k") in just_stored(100)  # and memcached's
    layer.set("n", 1)
    layer.incr("n")
    assert layer.touch("n", 50) is True and memcached.ttl(b"n") in just_stored(50)
    assert layer.get("n") == 2
    assert memcached.raw(b"set foreign 0 0 3\r\nabc\r\n") == b"STORED\r\n"
    with pytest.raises(CorruptValueError):
        layer.touch("foreign", 5)
    assert layer.stats().corrupt_values == 1


def test_memcached_touch_of_an_entry_expired_for_its_readers(memcached: MemcachedProcess) -> None:
    clock = FakeClock(time.time())
    lay = make_layer(memcached, clock=clock)
    lay.set("k", "v", 0.5)
    clock.advance(0.6)
    assert lay.touch("k", 10) is False
    assert lay.get("k") is MISSING
    lay.close()


def test_memcached_incr_is_never_sent_twice(memcached: MemcachedProcess) -> None:
    """A command whose reply is lost is not retried on a new connection (memcached ran
    it): an error, and the count moved once."""
    with FaultProxy(("127.0.0.1", memcached.port)) as proxy:
        lay = make_layer(proxy.address)
        lay.set("n", 0)
        assert lay.incr("n") == 1  # now a counter, on a pooled connection
        proxy.close_mid_reply(0)
        with pytest.raises(LayerUnavailableError):
            lay.incr("n")
        proxy.pass_through()
        assert lay.incr("n", 0) == 2  # ran exactly once
        lay.close()


def test_memcached_atomic_ops_survive_a_restart(own_memcached: MemcachedProcess) -> None:
    lay = make_layer(own_memcached)
    lay.set("n", 1)
    assert lay.incr("n") == 2
    own_memcached.restart()  # every pooled connection is now dead
    assert lay.add("n", 10) is True  # the dead connection is found before sending
    assert lay.incr("n") == 11
    lay.close()


def test_memcached_atomic_ops_after_close(layer: MemcachedLayer) -> None:
    layer.close()
    for call in (
        lambda: layer.add("k", 1),
        lambda: layer.incr("k"),
        lambda: layer.decr("k"),
        lambda: layer.touch("k"),
    ):
        with pytest.raises(ChainClosedError):
            call()


class Scripted:
    """Makes a layer's pool answer some commands from a script (a list of replies per
    command name, used first), as if other clients changed the key in between."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, lay: MemcachedLayer, **script: Any):
        self.script = {name: list(replies) for name, replies in script.items()}
        pool = lay._pool
        for method in ("call", "call_once"):
            real = getattr(pool, method)
            monkeypatch.setattr(pool, method, self._wrap(real))

    def _wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(node: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
            name = op if isinstance(op, str) else args[0]  # _native(client, command, ...)
            replies = self.script.get(name)
            if replies:
                reply = replies.pop(0)
                if reply is not REAL:
                    return reply
            return real(node, op, *args, **kwargs)

        return call


REAL = object()  # in a script: let this call through


def test_memcached_compare_and_set_loops_give_up_when_always_beaten(
    layer: MemcachedLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(time.time())
    layer._clock = clock
    layer.set("k", "v", 30)  # not 1 s: memcached may end that at once, at its tick
    layer.set("n", 1)
    clock.advance(31)  # "k" expired for us, still in memcached
    Scripted(monkeypatch, layer, cas=[False] * 1000)  # every cas loses
    for call in (lambda: layer.add("k", 1), lambda: layer.incr("n"), lambda: layer.touch("n")):
        with pytest.raises(ContendedError, match="kept changing") as info:
            call()
        assert info.value.trips_breaker is False
    assert layer.get("n") == 1


def test_memcached_atomic_ops_follow_a_key_changed_in_between(
    layer: MemcachedLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer.set("n", 1)
    layer.set("t", "v")
    # add found the key, which was gone when read: it adds again
    Scripted(monkeypatch, layer, add=[False], gets=[(None, None)])
    assert layer.add("a", 1) is True
    # incr met an envelope that was deleted, then one made a counter, before its read
    Scripted(monkeypatch, layer, gets=[(None, None)])
    assert layer.incr("n") is None
    Scripted(monkeypatch, layer, gets=[(raw(7), b"1")], incr=[REAL, 8])
    assert layer.incr("n") == 8
    # touch lost its key between the read and the write
    Scripted(monkeypatch, layer, cas=[None])
    assert layer.touch("t", 5) is False


def test_another_client_error_than_not_a_number_is_raised() -> None:
    class Client:
        def incr(self, key: bytes, delta: int) -> int:
            raise MemcacheClientError(b"bad command line format")

    with pytest.raises(MemcacheClientError):
        _native(Client(), "incr", b"k", 1)


def test_resilient_layer_forwards_atomic_ops_through_its_breaker() -> None:
    fake = FakeLayer("F")
    guarded = ResilientLayer(fake)
    assert guarded.add("k", 1) is True and guarded.incr("k") == 2
    assert guarded.decr("k", 5) == 0 and guarded.touch("k", 5) is True
    fake.fail = LayerUnavailableError("down", layer="F")
    for _ in range(5):
        with pytest.raises(LayerUnavailableError):
            guarded.incr("k")
    assert guarded.breaker.state.name == "OPEN"

    class Plain(FakeLayer):
        add = incr = decr = touch = None  # type: ignore[assignment]

    plain = ResilientLayer(Plain("P"))
    for call in (
        lambda: plain.add("k", 1),
        lambda: plain.incr("k"),
        lambda: plain.decr("k"),
        lambda: plain.touch("k"),
    ):
        with pytest.raises(ConfigError, match="does not support"):
            call()


# -- the chain ----------------------------------------------------------------------------


class ErrorLog(MetricsCollector):
    """Records the failures the chain reports."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str, str]] = []
        self.rejected: list[str] = []

    def record_error(self, layer: str, operation: str, error_type: str) -> None:
        self.errors.append((layer, operation, error_type))

    def record_circuit_rejected(self, layer: str) -> None:
        self.rejected.append(layer)


def two_layers(**l2: Any) -> tuple[Chain, MemoryLayer, FakeLayer, ErrorLog]:
    """L1 over a fake shared layer. Coherence is off in these tests: they read the
    shared layer's keys as the chain sent them, without a namespace generation."""
    clock = FakeClock()
    l1 = MemoryLayer("L1", clock=clock)
    fake = FakeLayer("L2", clock=clock, **l2)
    log = ErrorLog()
    return Chain([l1, fake], metrics=log, coherence=False), l1, fake, log


def test_the_shared_layer_is_the_lowest_remote_one() -> None:
    local = [MemoryLayer("A"), MemoryLayer("B")]
    with Chain(local, coherence=False) as chain:
        assert chain._shared.name == "B"  # every layer local: the last one
        local[0].set("k", "stale")
        assert chain.add("k", 1) is True
        assert local[1].get("k") == 1 and local[0].get("k") is MISSING
    with Chain([MemoryLayer("A")]) as chain:
        assert chain.add("k", 1) is True and chain.incr("k") == 2 and chain.get("k") == 2
    remote, below = FakeLayer("R"), MemoryLayer("C")
    below.set("k", "stale")
    with Chain([MemoryLayer("A"), remote, below], coherence=False) as chain:
        assert chain._shared.name == "R"
        assert chain.add("k", 1) is True
        assert remote.get("k") == 1
        assert below.get("k") is MISSING  # a layer below the shared one loses the key


def test_a_lock_released_by_another_process_is_free_here_at_once(
    memcached: MemcachedProcess,
) -> None:
    """An ``add`` that won keeps no copy in this process's L1: the lock's holder is known
    only to memcached. Before, L1 kept the lock's value and this process read the lock
    as held after another process released it, until coherence's poll (here: a bound of
    30 s and a poll every 20 s: no poll, not even the first journal read, which empties
    L1, comes within the test to hide it)."""
    loose = CoherenceConfig(bound=30.0, interval=20.0)
    here = Chain([MemoryLayer("L1"), MemcachedLayer("L2", memcached.address)], coherence=loose)
    there = Chain([MemoryLayer("L1"), MemcachedLayer("L2", memcached.address)], coherence=loose)
    try:
        assert here.add("lock:job", "here", 30) is True
        assert there.get("lock:job") == "here"
        assert there.delete("lock:job") is True  # released (its holder crashed, say)
        assert here.get("lock:job") is None
        assert here.add("lock:job", "here again", 30) is True
    finally:
        here.close()
        there.close()


def test_chain_add() -> None:
    chain, l1, l2, _ = two_layers()
    with chain:
        l1.set("k", "stale local copy")  # memcached evicted the key, L1 still has it
        assert chain.add("k", "v", 30) is True
        # The value stays in the shared layer only: an add is a lock or a first write,
        # whose holder only the shared layer knows; the next get reads it from there.
        assert l2.get("k") == "v" and l1.get("k") is MISSING
        assert chain.get("k") == "v" and l1.get_with_ttl("k") == ("v", pytest.approx(30))
        l1.set("k", "stale local copy")
        assert chain.add("k", "w", 30) is False
        assert l1.get("k") is MISSING  # removed: the next get reads the shared value
        assert chain.get("k") == "v"
        assert l2.ops("add") == ["k", "k"]


def test_chain_counters_drop_the_other_copies() -> None:
    chain, l1, l2, _ = two_layers()
    with chain:
        assert chain.incr("n") is None and l2.get("n") is MISSING
        chain.set("n", 5)
        assert l1.get("n") == 5
        assert chain.incr("n", 2) == 7
        assert l1.get("n") is MISSING
        assert chain.get("n") == 7
        assert chain.decr("n", 10) == 0  # floor=True: memcached's decr
        assert chain.decr("n", 3, floor=False) == -3  # signed
        assert chain.get("n") == -3
        assert chain.incr("n", 0) == -3
        assert l2.ops("incr") == ["n", "n", "n", "n"] and l2.ops("decr") == ["n"]


def test_chain_touch_retimes_the_first_layer() -> None:
    chain, l1, l2, _ = two_layers()
    with chain:
        chain.set("k", "v", 10)
        assert chain.touch("k", 100) is True
        assert l1.get_with_ttl("k")[1] == pytest.approx(100)
        assert l2.get_with_ttl("k")[1] == pytest.approx(100)
        assert chain.touch("missing", 5) is False
        l1.set("gone", "stale")
        assert chain.touch("gone", 5) is False and l1.get("gone") is MISSING


def test_touch_drops_the_first_layers_copy_when_it_cannot_retime_it() -> None:
    class NoTouch(FakeLayer):
        touch = None  # type: ignore[assignment]

    l1, l2 = NoTouch("L1", local=True), FakeLayer("L2")
    with Chain([l1, l2], coherence=False) as chain:
        chain.set("k", "v")
        assert chain.touch("k", 50) is True and l1.get("k") is MISSING
    l1b, log = MemoryLayer("L1"), ErrorLog()
    with Chain([l1b, FakeLayer("L2")], metrics=log, coherence=False) as chain:
        chain.set("k", "v")

        def broken(key: str, ttl: float | None = None) -> bool:
            raise RuntimeError("boom")

        l1b.touch = broken  # type: ignore[method-assign]
        assert chain.touch("k", 50) is True
        assert l1b.get("k") is MISSING and ("L1", "touch", "other") in log.errors


def test_chain_atomic_ops_validate_before_anything_changes() -> None:
    chain, l1, l2, _ = two_layers()
    with chain:
        for bad_key in (1, None, b"k"):
            for call in (chain.add, chain.incr, chain.decr, chain.touch):
                with pytest.raises(InvalidKeyError):
                    call(bad_key, 1)  # type: ignore[operator]
        for bad in (-1, 1.5, True, 2**64, "2"):
            with pytest.raises(InvalidValueError, match="delta"):
                chain.incr("k", bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidValueError, match="delta"):
                chain.decr("k", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidValueError, match="floor"):
            chain.decr("k", 1, floor=0)  # type: ignore[arg-type]
        for bad_ttl in (0, -1, float("nan"), float("inf"), "10", True):
            with pytest.raises(InvalidValueError, match="ttl"):
                chain.add("k", 1, bad_ttl)
            with pytest.raises(InvalidValueError, match="ttl"):
                chain.touch("k", bad_ttl)
        assert l2.calls == [] and len(l1) == 0
    for call in (chain.add, chain.incr, chain.decr, chain.touch):
        with pytest.raises(ChainClosedError):
            call("k", 1)  # type: ignore[operator]


def test_a_value_that_is_not_a_counter_is_the_callers_error() -> None:
    chain, l1, l2, _ = two_layers()
    with chain:
        chain.set("f", 1.5)
        with pytest.raises(InvalidValueError, match="not a counter"):
            chain.incr("f")
        assert l1.get("f") == 1.5 and l2.get("f") == 1.5  # nothing changed
        chain.set("f", 2)  # the fence ended the failed mutation
        assert chain.incr("f") == 3


def test_a_shared_layer_without_the_operation_is_a_config_error() -> None:
    class NoAtomics(FakeLayer):
        add = incr = decr = touch = None  # type: ignore[assignment]

    with Chain([MemoryLayer("L1"), NoAtomics("L2")]) as chain:
        for call, name in (
            (chain.add, "add"),
            (chain.incr, "incr"),
            (chain.decr, "decr"),
            (chain.touch, "touch"),
        ):
            with pytest.raises(ConfigError, match=f"'L2' does not support {name}"):
                call("k", 1)  # type: ignore[operator]


def test_an_unreachable_shared_layer_makes_nothing_up(caplog: pytest.LogCaptureFixture) -> None:
    chain, l1, l2, log = two_layers()
    with chain:
        chain.set("k", "v")
        chain.set("n", 1)
        l2.fail = LayerUnavailableError("memcached is down", layer="L2")
        with caplog.at_level(logging.DEBUG, logger="cachechain"):
            assert chain.add("new", 1) is False  # no lock granted
            assert chain.add("new", 1) is False
            assert chain.incr("n") is None  # no count invented
            assert chain.decr("n", floor=False) is None
            assert chain.touch("k", 10) is False
        assert l1.get("new") is MISSING  # nothing stored here either
        assert l1.get("n") is MISSING and l1.get("k") is MISSING  # stale copies dropped
        assert log.errors == [
            ("L2", "add", "connection"),
            ("L2", "add", "connection"),
            ("L2", "incr", "connection"),
            ("L2", "decr", "connection"),
            ("L2", "touch", "connection"),
        ]
        warned = [
            r for r in caplog.records if r.levelno == logging.WARNING and "add" in r.msg % r.args
        ]
        assert len(warned) == 1  # logged once per (layer, operation, error type)
        # the breaker opens after 5 failures: then the calls are refused without I/O
        calls = len(l2.calls)
        assert chain.incr("n") is None and chain.add("x", 1) is False
        assert len(l2.calls) == calls and log.rejected == ["L2", "L2"]
        assert chain.breakers["L2"].state.name == "OPEN"


def test_a_failed_atomic_op_owes_no_repair_and_drops_only_its_key() -> None:
    """The shared layer down, and a remote layer above it down too: a failed ``add``
    wrote nothing, so it leaves no repair delete on that layer's writer (Django's
    session ``create()`` retries ``add`` 10,000 times per login), and the in-process
    layer loses the key's copy only."""
    clock = FakeClock()
    l1, l2, l3 = MemoryLayer("L1", clock=clock), FakeLayer("L2", clock=clock), FakeLayer("L3")
    layers: list[MemoryLayer | LayerConfig] = [l1, LayerConfig(l2, resilient=False)]
    layers.append(LayerConfig(l3, resilient=False))
    with Chain(layers, coherence=False) as chain:  # no breakers: every call is made
        assert chain._shared.name == "L3"
        for i in range(50):
            chain.set(f"other:{i}", i)
        l1.set("k", "stale")
        l2.fail = l3.fail = LayerUnavailableError("down", layer="L2/L3")
        for _ in range(100):
            assert chain.add("k", "v") is False
            assert chain.incr("k") is None and chain.touch("k") is False
        writer = chain.writers["L2"]
        assert writer.stats().repairing == 0 and not writer.holds("k")
        assert chain.writers["L3"].stats().repairing == 0
        assert l1.get("k") is MISSING  # its copy is dropped, as documented
        assert [l1.get(f"other:{i}") for i in range(50)] == list(range(50))
        assert l2.ops("delete") == ["k"] * 300  # tried, best effort, never owed
        l2.fail = l3.fail = None
        assert chain.add("k", "v") is True and chain.get("k") == "v"


def test_an_atomic_op_on_a_held_key_does_not_flush_a_layer_whose_breaker_is_open() -> None:
    chain, _, l2, log = two_layers()
    with chain:
        l2.fail = LayerUnavailableError("down", layer="L2")
        for i in range(5):
            chain.set(f"k{i}", i)  # five failures: the breaker opens; five repairs wait
        writer = chain.writers["L2"]
        assert chain.breakers["L2"].state.name == "OPEN" and writer.holds("k0")
        flushes: list[float | None] = []
        writer.flush = flushes.append  # type: ignore[assignment,method-assign]
        assert chain.incr("k0") is None  # not made: the layer owes it a delete
        assert flushes == []  # and the waiting repairs were not all requeued, refused
        assert ("L2", "incr", "connection") in log.errors


def test_the_hook_for_cross_process_invalidation(monkeypatch: pytest.MonkeyPatch) -> None:
    chain, _, l2, _ = two_layers()
    published: list[tuple[str, ...]] = []
    monkeypatch.setattr(chain, "_publish_invalidation", lambda keys: published.append(tuple(keys)))
    with chain:
        chain.add("a", 1)
        chain.add("a", 1)  # not stored: nothing to publish
        chain.incr("a")
        chain.incr("absent")
        chain.touch("a", 5)
        chain.touch("absent", 5)
        l2.fail = LayerUnavailableError("down", layer="L2")
        for _ in range(5):  # it may have been made (a lost reply): published each time
            chain.incr("a")
        assert chain.breakers["L2"].state.name == "OPEN"
        chain.incr("a")  # refused without I/O: certainly not made, not published
    assert published == [("a",)] * 8
    Chain([MemoryLayer("L1")])._publish_invalidation(["k"])  # a no-op for now


def test_no_backfill_slips_past_an_atomic_op() -> None:
    """A read that found the old value below before an incr may not copy it up after."""
    chain, l1, l2, _ = two_layers(local=True)  # local: no breaker to time the blocked read
    with chain:
        l2.set("n", 1)
        l2.block_get = threading.Event()
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(chain.get("n")))
        reader.start()
        assert l2.entered.wait(10)  # the reader holds the old value, 1
        assert chain.incr("n") == 2
        l2.block_get.set()
        reader.join(10)
        assert got == [1]  # served, as any read racing a write may be...
        assert l1.get("n") is MISSING  # ...but not backfilled
        assert chain.get("n") == 2


def test_a_queued_write_of_the_key_lands_before_the_atomic_op() -> None:
    """A write-behind set still queued is written first, not cancelled."""
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    with Chain([l1, LayerConfig(l2, write_behind=True)], coherence=False) as chain:
        writer = chain.writers["L2"]
        l2.block_set = threading.Event()
        assert chain.set("other", 0)
        assert l2.write_entered.wait(10)  # the writer is busy with "other"...
        assert chain.set("n", 5)  # ...so this set waits in its queue
        assert writer.holds("n")
        flushing = threading.Event()
        flush = writer.flush

        def flush_spy(timeout: float | None = None) -> bool:
            flushing.set()
            return flush(timeout)

        writer.flush = flush_spy  # type: ignore[method-assign]
        result: list[int | None] = []
        counter = threading.Thread(target=lambda: result.append(chain.incr("n")))
        counter.start()
        assert flushing.wait(10)  # the incr waits for the queued writes of "n"
        l2.block_set.set()
        counter.join(10)
        assert result == [6]
        assert l2.get("n") == 6


def test_an_atomic_op_is_not_made_while_the_shared_layer_owes_a_write() -> None:
    chain, _, l2, log = two_layers()
    with chain:
        l2.fail = LayerUnavailableError("down", layer="L2")
        assert chain.set("n", 5) is False  # L2 missed it: a repair delete is pending
        assert chain.incr("n") is None  # made nowhere: L2 may hold an older value
        assert l2.ops("incr") == []
        assert ("L2", "incr", "connection") in log.errors
        l2.fail = None
        assert chain.incr("n") is None  # the repair landed first: "n" is gone from L2
        assert l2.ops("incr") == ["n"]


def test_a_counter_read_from_memcached_is_not_copied_up(memcached: MemcachedProcess) -> None:
    l1 = MemoryLayer("L1")
    # Without coherence: its first read or a late poll could empty L1 after a backfill.
    with Chain([l1, make_layer(memcached)], coherence=False) as chain:
        chain.set("n", 1)
        assert chain.incr("n") == 2
        assert chain.get("n") == 2
        assert chain.get_many(["n"]) == {"n": 2}
        assert l1.get("n") is MISSING  # its remaining TTL is unknown: never backfilled
        chain.set("v", "value")
        l1.clear()
        assert chain.get("v") == "value" and l1.get("v") == "value"  # envelopes are


# -- many processes, one memcached --------------------------------------------------------


def _memcached_chain(address: str) -> Chain:
    return Chain(
        [
            MemoryLayer("L1"),
            MemcachedLayer("L2", [address], key_prefix="mp:", timeout=2.0, connect_timeout=2.0),
        ]
    )


def _lock_contender(barrier: Any, results: Any, index: int, address: str, keys: int) -> None:
    def work() -> tuple[int, list[int]]:
        with _memcached_chain(address) as chain:
            won = []
            for k in range(keys):
                barrier.wait(WAIT)  # every process asks for the same key at once
                if chain.add(f"lock:{k}", index, ttl=30):
                    won.append(k)
            return index, won

    reported(results, index, work)


def _counter(barrier: Any, results: Any, index: int, address: str, rounds: int) -> None:
    def work() -> tuple[list[int | None], int | None, Any]:
        with _memcached_chain(address) as chain:
            assert chain.get("count") == 0  # in this process's L1 from now on
            barrier.wait(WAIT)
            seen = [chain.incr("count") for _ in range(rounds)]
            barrier.wait(WAIT)  # every process has counted
            return seen, chain.incr("count", 0), chain.get("count")

    reported(results, index, work)


@pytest.mark.memcached
def test_add_as_a_lock_has_exactly_one_winner_per_key_across_processes(
    memcached: MemcachedProcess,
) -> None:
    got = run_processes(_lock_contender, 16, memcached.address, 25)
    winners: dict[int, list[int]] = {}
    for index, won in got:
        for k in won:
            winners.setdefault(k, []).append(index)
    assert sorted(winners) == list(range(25))
    assert all(len(owners) == 1 for owners in winners.values()), winners
    with _memcached_chain(memcached.address) as chain:
        assert [chain.get(f"lock:{k}") for k in range(25)] == [winners[k][0] for k in range(25)]


@pytest.mark.memcached
def test_incr_across_processes_loses_no_count(memcached: MemcachedProcess) -> None:
    with _memcached_chain(memcached.address) as chain:
        chain.set("count", 0)  # an envelope: the first increments race to convert it
    got = run_processes(_counter, 4, memcached.address, 100)
    seen = sorted(n for counts, _, _ in got for n in counts)
    assert seen == list(range(1, 401))  # each count was handed out exactly once
    assert [(final, read) for _, final, read in got] == [(400, 400)] * 4
