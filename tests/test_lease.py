"""One loader across processes (issue 12, item 4): memcached leases and ``leased_load``.

The layer's lease (``mg <key> N<ttl>``, or an ``add``-based stub on a server without
the meta protocol) over a real memcached; the stub read as a miss by every reader; the
chain side (``cachechain._lease.leased_load``) with an injected clock and sleep, so a
wait is counted in polls, not slept; and threads of several chains (stand-ins for
processes: each has its own pool and namespace copy) over one memcached. The real
processes are in ``tests/test_lease_processes.py``.

``get_or_load`` itself takes the lease once the chain integrates it; until then
:func:`leased_get_or_load` is ``_chain_load.get_or_load`` with the one change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cachechain import (
    MISSING,
    Chain,
    CoherenceConfig,
    ConfigError,
    InvalidValueError,
    LayerConfig,
    LoadConfig,
    MemcachedLayer,
    MemoryCollector,
    MemoryLayer,
    _chain_load,
)
from cachechain._lease import DEFAULT, FIRST_POLL, MAX_POLL, OFF, LeaseConfig, leased_load
from cachechain.layers._base import Lease, SupportsLease
from cachechain.layers._memcached_keys import map_key
from cachechain.layers._memcached_lease import MAX_LEASE_TTL, _Won, lease_exptime
from cachechain.metrics._catalogue import LEASE_OUTCOMES, OPERATIONS
from tests.support.fakes import FakeClock
from tests.support.hostile import Flood, HostileServer, Request, Send, honest
from tests.support.servers import MemcachedProcess, free_port

pytestmark = pytest.mark.memcached


def make_layer(server: MemcachedProcess | str, **kwargs: Any) -> MemcachedLayer:
    kwargs.setdefault("timeout", 0.5)
    kwargs.setdefault("connect_timeout", 0.5)
    address = server if isinstance(server, str) else server.address
    return MemcachedLayer("L2", address, **kwargs)


def make_chain(
    server: MemcachedProcess | str,
    load: LoadConfig | None = None,
    coherence: CoherenceConfig | None = None,
    **kwargs: Any,
) -> Chain:
    """A default chain (L1 over memcached, coherence and its namespace on: ``coherence``
    or the default config), with ``load`` (its ``get_or_load`` defaults) and
    ``kwargs`` for the memcached layer."""
    layers = [MemoryLayer("L1"), make_layer(server, **kwargs)]
    return Chain(
        layers, metrics=MemoryCollector(), load=load, coherence=coherence or CoherenceConfig()
    )


def settled(chain: Chain) -> Chain:
    """``chain`` once its journal has read memcached for the first time: that read drops
    every in-process entry (a mutation of every key), so a load in flight across it is
    not stored (its lease is released and another process loads again). A chain that
    serves traffic is past it within one poll (0.04 s)."""
    assert chain.coherence is not None
    journal: Any = chain.coherence.backplane

    def past_it() -> bool:
        # The poll sets ``_last`` before it drops the entries, and clears
        # ``_troubled`` once it has returned (found by review: ``_last`` alone let a
        # test write L1 just before the drop).
        return journal._last is not None and not journal._troubled

    deadline = time.monotonic() + 5
    while not past_it() and time.monotonic() < deadline:
        time.sleep(0.005)  # the journal's poller has no event to wait on: bounded
    assert past_it()
    return chain


def classic(layer: MemcachedLayer) -> MemcachedLayer:
    """``layer`` made to use the add-based lease (as on a server without ``mn``)."""
    for server in layer.servers:
        layer._meta_nodes[server] = False
    return layer


def mkey(chain: Chain, key: str) -> bytes:
    """The memcached key the chain stores ``key`` under (namespaced)."""
    ns = chain.coherence.namespace if chain.coherence is not None else None
    prefix = "" if ns is None else ns.current()
    return map_key(prefix + key, "")


def raw_item(server: MemcachedProcess, key: bytes) -> bytes:
    return server.raw(b"get " + key + b"\r\n")


def lease_figures(chain: Chain) -> dict[str, int]:
    return dict(chain.metrics_collector.snapshot().chain_metrics.leases_by_outcome)


def errors(chain: Chain) -> dict[str, int]:
    snap = chain.metrics_collector.snapshot()
    return {n: m.errors for n, m in snap.layer_metrics.items() if m.errors}


class Polls:
    """An injected clock and sleep: each sleep moves the clock and may run a hook
    (another process acting while this one waits)."""

    def __init__(self) -> None:
        self.clock = FakeClock(100.0)
        self.slept: list[float] = []
        self.hooks: dict[int, Callable[[], object]] = {}

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.advance(seconds)
        hook = self.hooks.get(len(self.slept))
        if hook is not None:
            hook()


def leased_get_or_load(
    chain: Chain,
    key: str,
    loader: Callable[[], Any],
    ttl: float | None = None,
    **options: Any,
) -> Any:
    """``Chain.get_or_load`` with the lease: ``_chain_load.get_or_load`` with the change
    ``docs/design.md`` gives ("One loader across processes")."""
    value = chain.get(key, MISSING)
    if value is not MISSING:
        return value

    def load() -> Any:
        again = chain._l1_get(key)
        if again is not MISSING:
            return again
        return leased_load(
            chain, key, lambda won: load_and_store(chain, key, loader, ttl, won), **options
        )

    return chain._flight.do(key, load, None)[0]


def load_and_store(
    chain: Chain, key: str, loader: Callable[[], Any], ttl: float | None, won: Lease | None
) -> tuple[Any, bool]:
    """What ``get_or_load`` does on a miss: load (timed), store the value (over the
    lease ``won``, if any, then through the fence); ``(value, stored)``."""
    return _chain_load.load_and_store(chain, key, loader, ttl, None, recheck=False, lease=won)


@pytest.fixture()
def layers(memcached: MemcachedProcess) -> Iterator[tuple[MemcachedLayer, MemcachedLayer]]:
    """Two layers over one memcached, each with its own pool (two processes' view)."""
    a, b = make_layer(memcached), make_layer(memcached)
    yield a, b
    a.close()
    b.close()


@pytest.fixture()
def chains(memcached: MemcachedProcess) -> Iterator[tuple[Chain, Chain]]:
    a, b = settled(make_chain(memcached)), settled(make_chain(memcached))
    yield a, b
    a.close()
    b.close()


# -- the layer's lease -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["meta", "classic"])
def test_one_client_wins_the_others_see_it_held_until_the_value_is_stored(
    layers: tuple[MemcachedLayer, MemcachedLayer], mode: str
) -> None:
    a, b = layers
    if mode == "classic":
        classic(a), classic(b)
    won = a.lease("k", 5)
    assert won is not None and won.won and not won.held
    for _ in range(3):
        held = b.lease("k", 5)
        assert held is not None and held.held and not held.won
    again = a.lease("k", 5)  # the winner too: one win per stub
    assert again is not None and again.held
    b.set("k", {"v": 1}, 30)  # the write ends the lease
    found = a.lease("k", 5)
    assert found is not None and not found.won and not found.held
    assert found.value == {"v": 1} and 29 < found.ttl <= 30  # type: ignore[operator]
    assert a.get("k") == {"v": 1}
    assert a.stats().corrupt_values == b.stats().corrupt_values == 0


def test_the_meta_protocol_is_detected_once_per_node(
    layers: tuple[MemcachedLayer, MemcachedLayer],
) -> None:
    a, _ = layers
    assert a._meta_nodes == {}
    a.lease("k", 1)
    assert a._meta_nodes == {a.servers[0]: True}
    with HostileServer() as old:  # answers ERROR to mn, as memcached < 1.6 does
        layer = make_layer(old.address)
        lease = layer.lease("k", 1)
        assert lease is not None and lease.won  # add stored (the fake keeps nothing)
        layer.lease("k", 1)
        commands = [r.command for r in old.requests]
        assert commands.count(b"mn") == 1 and b"mg" not in commands
        assert commands[:2] == [b"mn", b"add"]
        assert old.requests[1].data == b""  # an empty stub
        layer.close()


@pytest.mark.parametrize("mode", ["meta", "classic"])
def test_the_stub_is_a_miss_for_every_reader(
    memcached: MemcachedProcess, layers: tuple[MemcachedLayer, MemcachedLayer], mode: str
) -> None:
    a, b = layers
    if mode == "classic":
        classic(a)
    for key in ("get", "many", "add", "incr", "touch"):
        lease = a.lease(key, 30)
        assert lease is not None and lease.won
    assert raw_item(memcached, b"get").startswith(b"VALUE get 0 0\r\n\r\n")
    assert b.get("get") is MISSING
    assert b.get_with_ttl("get") == (MISSING, None)
    assert b.get_many(["many", "get"]) == {}
    assert b.get_many_with_ttl(["many"]) == {}
    assert b.incr("incr") is None and b.decr("incr", 1) is None
    assert b.touch("touch", 10) is False
    assert b.add("add", "mine", 10) is True  # absent for a reader: add takes it
    assert b.get("add") == "mine"
    assert a.stats().corrupt_values == b.stats().corrupt_values == 0


def test_a_stub_made_by_another_client_is_a_miss_for_every_reader(
    memcached: MemcachedProcess,
) -> None:
    """Stubs made with memcached's own command (another client's lease, any version of
    this library): before leases, the layer counted them as corrupt values, ``add``
    took one for a held lock and ``touch`` raised."""
    layer = make_layer(memcached)
    try:
        for key in (b"get", b"many", b"add", b"incr", b"touch"):
            assert memcached.raw(b"mg " + key + b" N30\r\n").startswith(b"HD W")
        assert layer.get("get") is MISSING
        assert layer.get_many(["many", "get"]) == {}
        assert layer.add("add", "mine", 10) is True and layer.get("add") == "mine"
        assert layer.incr("incr") is None
        assert layer.touch("touch", 10) is False
        assert layer.stats().corrupt_values == 0
    finally:
        layer.close()


def test_the_stub_is_a_miss_for_the_chain_and_its_namespace(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    a, b = chains
    shared = a.layers[1]
    assert isinstance(shared, SupportsLease)
    for key in ("g", "m", "add", "n", "t"):
        lease = shared.lease(key, 30)
        assert lease is not None and lease.won
    stub = mkey(a, "g")
    assert stub != b"g" and raw_item(memcached, stub).startswith(b"VALUE " + stub + b" 0 0\r\n")
    assert b.get("g", "default") == "default"
    assert b.get_many(["g", "m"]) == {}
    assert b.incr("n") is None
    assert b.touch("t", 10) is False
    assert b.add("add", 1, 10) is True and a.get("add") == 1
    assert errors(a) == errors(b) == {}
    assert b.layers[1].layer.layer.stats().corrupt_values == 0  # type: ignore[attr-defined]


def test_a_stub_on_the_generation_key_starts_a_namespace(memcached: MemcachedProcess) -> None:
    probe = make_chain(memcached)
    gen = map_key(probe.coherence.namespace.generation_key, "")  # type: ignore[union-attr]
    probe.close()
    memcached.raw(b"flush_all\r\n")
    assert memcached.raw(b"mg " + gen + b" N30\r\n").startswith(b"HD W")  # a stub there
    chain = make_chain(memcached)
    try:
        assert chain.set("k", 1) and chain.get("k") == 1
        assert chain.coherence.namespace.generation is not None  # type: ignore[union-attr]
        assert errors(chain) == {}
    finally:
        chain.close()


@pytest.mark.parametrize("mode", ["meta", "classic"])
def test_release_ends_only_the_lease_won(
    layers: tuple[MemcachedLayer, MemcachedLayer], mode: str
) -> None:
    a, b = layers
    if mode == "classic":
        classic(a), classic(b)
    first = a.lease("k", 30)
    assert first is not None and first.won
    first.release()
    second = b.lease("k", 30)  # at once, not after 30 s
    assert second is not None and second.won
    first.release()  # a late release of the first: the second's lease stays
    held = a.lease("k", 30)
    assert held is not None and held.held
    b.set("k", "v", 30)
    second.release()  # after the value was stored: the value stays
    assert a.get("k") == "v"
    Lease().release()  # a lease not won: nothing


@pytest.mark.parametrize("mode", ["meta", "classic"])
def test_a_value_past_its_expiry_is_leased_to_one_client(
    memcached: MemcachedProcess, mode: str
) -> None:
    clock = FakeClock(time.time())
    a, b = make_layer(memcached, clock=clock), make_layer(memcached, clock=clock)
    if mode == "classic":
        classic(a), classic(b)
    a.set("k", "old", 60)
    fresh = b.lease("k", 5)
    assert fresh is not None and fresh.value == "old"  # live: a hit
    clock.advance(61)  # expired for the layers; memcached still holds it
    won = a.lease("k", 5)
    assert won is not None and won.won
    held = b.lease("k", 5)
    assert held is not None and held.held
    if mode == "meta":  # the stale copy stays readable (for a fail-safe reader)
        assert b"old" in raw_item(memcached, b"k")
        won.release()
        again = b.lease("k", 5)
        assert again is not None and again.won
        assert b"old" in raw_item(memcached, b"k")
    a.close()
    b.close()


@pytest.mark.parametrize("mode", ["meta", "classic"])
def test_the_winner_stores_over_its_lease_only_while_the_key_is_unchanged(
    layers: tuple[MemcachedLayer, MemcachedLayer], mode: str
) -> None:
    """Leases against stale sets: a delete or a write of the key by another client
    while the winner loads ends the lease, and the winner's value, loaded before it,
    is not stored (it was stored over them before)."""
    a, b = layers
    if mode == "classic":
        classic(a), classic(b)
    won = a.lease("k", 5)
    assert won is not None and won.won and won.stores
    assert won.store({"v": 1}, 30) is True  # nothing came between: stored
    assert b.get("k") == {"v": 1}
    assert b.lease("k", 5).value == {"v": 1}  # type: ignore[union-attr]  # the lease ended
    deleted = a.lease("gone", 5)
    assert deleted is not None and deleted.won
    b.delete("gone")  # the source changed: its key invalidated
    assert deleted.store("loaded before the delete", 30) is False
    assert b.get("gone") is MISSING
    overwritten = a.lease("newer", 5)
    assert overwritten is not None and overwritten.won
    b.set("newer", "written during the load", 30)
    assert overwritten.store("loaded before the write", 30) is False
    assert a.get("newer") == "written during the load"


def test_the_winner_stores_over_a_stale_copy_it_won(memcached: MemcachedProcess) -> None:
    clock = FakeClock(time.time())
    a, b = make_layer(memcached, clock=clock), make_layer(memcached, clock=clock)
    try:
        a.set("k", "old", 60)
        clock.advance(61)  # expired for the layers; memcached still holds it
        won = a.lease("k", 5)
        assert won is not None and won.won and b"old" in raw_item(memcached, b"k")
        assert won.store("new", 60) is True
        assert b.get("k") == "new"
    finally:
        a.close()
        b.close()


def test_a_server_without_cas_gives_leases_that_do_not_store(
    layers: tuple[MemcachedLayer, MemcachedLayer],
) -> None:
    """Found by review: memcached started with ``-C`` gives every item the token 0 and
    answers EXISTS to every ``cas``: the winner's value was never stored. Such a lease
    leaves the store to a plain write."""
    a, _ = layers
    mkey = map_key("k", a._prefix)
    node = a._pool.node_for(mkey)
    assert not _Won(a, node, mkey, b"0", 2).lease(None).stores
    assert _Won(a, node, mkey, b"17", 2).lease(None).stores


def test_a_lease_of_a_layer_that_gives_no_store_says_so() -> None:
    lease = Lease(won=True, release=lambda: None)
    assert not lease.stores
    with pytest.raises(TypeError, match="does not store"):
        lease.store("v", 1.0)


def test_a_lease_ends_at_its_ttl(layers: tuple[MemcachedLayer, MemcachedLayer]) -> None:
    a, b = layers
    won = a.lease("k", 1)
    assert won is not None and won.won
    start = time.monotonic()
    deadline = start + 4.0
    while time.monotonic() < deadline:  # polling memcached's clock: bounded
        lease = b.lease("k", 1)
        assert lease is not None
        if lease.won:
            break
        assert lease.held
        time.sleep(0.01)
    took = time.monotonic() - start
    # memcached's second: at most ceil(ttl) after the win, plus a poll and a loaded
    # machine's delays (1.1 s was exceeded under load)
    assert lease is not None and lease.won and took <= 2.0


def test_lease_ttls_are_checked_and_rounded_up() -> None:
    assert lease_exptime(0.2) == 1 and lease_exptime(2) == 2 and lease_exptime(2.5) == 3
    assert lease_exptime(MAX_LEASE_TTL) == MAX_LEASE_TTL
    for bad in (0, -1, float("nan"), float("inf"), True, "1", MAX_LEASE_TTL + 1):
        with pytest.raises(InvalidValueError):
            lease_exptime(bad)


def test_a_lease_reply_is_bounded_by_the_layer() -> None:
    """mg's value is read on the layer's word (max_value_size) and within one deadline."""

    def script(request: Request) -> Any:
        if request.command == b"mn":
            return Send(b"MN\r\n")
        if request.command == b"mg" and request.args[0] == b"big":
            return Flood(b"VA 5000000 c1\r\n", 5_000_000)
        if request.command == b"mg" and request.args[0] == b"junk":
            return Send(b"VA 1 c1 Q\r\nx\r\n")
        if request.command == b"mg":
            return Send(b"SERVER_ERROR out of memory\r\n")
        return honest(request)

    from cachechain import CorruptValueError, LayerError

    with HostileServer(script) as server:
        layer = make_layer(server.address, max_value_size=1000)
        with pytest.raises(CorruptValueError):
            layer.lease("big", 1)
        assert layer.stats().corrupt_values == 1
        with pytest.raises(LayerError):
            layer.lease("junk", 1)
        with pytest.raises(LayerError):
            layer.lease("other", 1)
        layer.close()


def scripted(replies: dict[bytes, list[bytes]]) -> Callable[[Request], Any]:
    """A hostile script answering each command from its list of replies, in turn (the
    last one repeated); ``mn`` answers ``MN`` unless the list says otherwise."""
    given: dict[bytes, int] = {}

    def script(request: Request) -> Any:
        answers = replies.get(request.command)
        if answers is None:
            return Send(b"MN\r\n") if request.command == b"mn" else honest(request)
        n = given.get(request.command, 0)
        given[request.command] = n + 1
        return Send(answers[min(n, len(answers) - 1)])

    return script


def test_protocol_edges_of_the_lease() -> None:
    from cachechain import LayerError

    envelope = make_layer("127.0.0.1:1")._encode("v", b"k", None)
    hit = b"VALUE k 0 %d 7\r\n%s\r\nEND\r\n" % (len(envelope), envelope)
    cases: list[tuple[dict[bytes, list[bytes]], Any]] = [
        ({b"mg": [b"EN\r\n"]}, None),  # no item despite N: no lease
        ({b"mg": [b"VA 0 c1\r\n\r\n"], b"md": [b"HD\r\n"]}, None),  # never won: none
        ({b"mg": [b"VA x c1\r\n"]}, LayerError),
        ({b"mg": [b"VA 0 W\r\n\r\n"]}, LayerError),  # no cas
        ({b"mg": [b"VA 0 c1\r\n\r\n"], b"md": [b"WHAT\r\n"]}, LayerError),
        ({b"mn": [b"OK\r\n"]}, LayerError),  # neither meta nor classic
        ({b"mn": [b"ERROR\r\n"], b"add": [b"NOT_STORED\r\n"]}, None),  # gone every round
        ({b"mn": [b"ERROR\r\n"], b"add": [b"STORED\r\n"], b"gets": [hit]}, "v"),
    ]
    for replies, expected in cases:
        with HostileServer(scripted(replies)) as server:
            layer = make_layer(server.address)
            if isinstance(expected, type):
                with pytest.raises(expected):
                    layer.lease("k", 1)
            elif expected is None:
                assert layer.lease("k", 1) is None, replies
            else:
                found = layer.lease("k", 1)
                assert found is not None and found.value == expected
            layer.close()


@pytest.mark.parametrize("mode", ["meta", "classic"])
def test_corrupt_bytes_under_the_key_are_leased_over(
    memcached: MemcachedProcess, layers: tuple[MemcachedLayer, MemcachedLayer], mode: str
) -> None:
    a, b = layers
    if mode == "classic":
        classic(a), classic(b)
    memcached.raw(b"set k 0 60 5\r\njunk!\r\n")
    won = a.lease("k", 5)
    assert won is not None and won.won
    assert a.stats().corrupt_values == 1  # counted, as any read of them
    held = b.lease("k", 5)
    assert held is not None and held.held


# -- the chain side: leased_load -------------------------------------------------------


def loader_counting(value: Any) -> tuple[Callable[[], Any], list[int]]:
    calls: list[int] = []

    def load(won: Lease | None = None) -> Any:  # a loader, or leased_load's load_and_store
        calls.append(1)
        return value

    return load, calls


def test_the_winner_loads_and_its_store_ends_the_lease(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    a, b = chains
    load, calls = loader_counting({"v": 1})
    assert leased_get_or_load(a, "k", load, 30) == {"v": 1}
    assert calls == [1]
    assert lease_figures(a) == {"won": 1}
    a.flush()
    assert b.get("k") == {"v": 1}  # stored in memcached: the stub replaced
    assert leased_get_or_load(b, "k", lambda: pytest.fail("loaded twice")) == {"v": 1}


def test_a_waiter_gets_the_holders_value_without_writing_it_back(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    a, b = chains
    holder = a.layers[1].lease("k", 30)  # type: ignore[attr-defined]
    assert holder.won
    polls = Polls()
    # The holder stores, mid-wait: on the shared layer alone, as a.set's publication
    # would make b's poller drop b's copy whenever its next poll lands (after the fill).
    polls.hooks[3] = lambda: a.layers[1].set("k", "theirs", 60)
    got = leased_get_or_load(
        b, "k", lambda: pytest.fail("the waiter loaded"), 30, clock=polls.clock, sleep=polls.sleep
    )
    assert got == "theirs"
    assert polls.slept == [FIRST_POLL, FIRST_POLL * 2, FIRST_POLL * 4]
    assert b.layers[0].get("k") == "theirs"  # the caller's L1 filled ...
    remaining = b.layers[0].get_with_ttl("k")[1]
    assert remaining is not None and 59 < remaining <= 60  # ... with the remaining TTL
    snap = b.metrics_collector.snapshot()
    assert snap.chain_metrics.leases_by_outcome == {"waited": 1}
    assert snap.chain_metrics.lease_wait_latency.count == 1
    assert snap.layer_metrics["L2"].sets == 0  # nothing written back to memcached
    assert b.flush() and snap.layer_metrics["L2"].async_writes == 0


def test_polls_back_off_and_a_wait_is_bounded(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    a, b = chains
    assert a.layers[1].lease("k", 30).won  # type: ignore[attr-defined]
    polls = Polls()
    load, calls = loader_counting("mine")
    config = LeaseConfig(ttl=30, wait=0.5)
    got = leased_get_or_load(b, "k", load, 30, config=config, clock=polls.clock, sleep=polls.sleep)
    assert got == "mine" and calls == [1]  # waited 0.5 s, then loaded itself
    assert sum(polls.slept) == pytest.approx(0.5)
    assert max(polls.slept) == MAX_POLL
    assert polls.slept[:4] == [FIRST_POLL, FIRST_POLL * 2, FIRST_POLL * 4, FIRST_POLL * 8]
    assert lease_figures(b) == {"timed_out": 1}


def test_a_wait_that_times_out_serves_the_fallback(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    a, b = chains
    assert a.layers[1].lease("k", 30).won  # type: ignore[attr-defined]
    polls = Polls()
    config = LeaseConfig(ttl=30, wait=0.1)
    got = leased_load(
        b,
        "k",
        lambda won: pytest.fail("loaded"),
        config=config,
        fallback=lambda: "stale",
        clock=polls.clock,
        sleep=polls.sleep,
    )
    assert got == "stale"  # served, not stored
    load, calls = loader_counting(("fresh", True))
    got = leased_load(
        b, "k", load, config=config, fallback=lambda: MISSING,
        clock=polls.clock, sleep=polls.sleep,
    )  # fmt: skip
    assert got == "fresh" and calls == [1]  # no fail-safe value: loaded itself


def test_a_waiter_takes_over_a_lease_that_ended_without_a_value(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    a, b = chains
    holder = a.layers[1].lease("k", 30)  # type: ignore[attr-defined]
    polls = Polls()
    polls.hooks[2] = holder.release  # the holder's load failed
    load, calls = loader_counting("mine")
    got = leased_get_or_load(b, "k", load, 30, clock=polls.clock, sleep=polls.sleep)
    assert got == "mine" and calls == [1] and len(polls.slept) == 2
    assert lease_figures(b) == {"won": 1}
    b.flush()
    assert a.get("k") == "mine"


def test_a_failed_load_releases_the_lease(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    a, b = chains

    def boom() -> Any:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError, match="database down"):
        leased_get_or_load(a, "k", boom)
    lease = b.layers[1].lease("k", 30)  # type: ignore[attr-defined]
    assert lease.won  # at once: the stub was deleted


def test_a_value_not_stored_releases_the_lease(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    """The caller's fence saw a mutation of the key's stripe during the load (any key of
    the 64th of keys sharing it, or an invalidation from another process): the value is
    not stored, so the stub would stay until the lease's TTL, and every other process
    with it. It is released instead."""
    a, b = chains
    got = leased_load(a, "k", lambda won: ("v", False))
    assert got == "v" and lease_figures(a) == {"won": 1}
    lease = b.layers[1].lease("k", 30)  # type: ignore[attr-defined]
    assert lease.won  # at once


def test_a_store_skipped_by_a_mutation_during_the_load_frees_the_waiters(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    """End to end: a set of another key of the same fence stripe lands while the
    winner loads; its store is skipped, and the waiter takes over at its next poll."""
    a, b = chains
    other = next(k for k in (f"o{i}" for i in range(10_000)) if hash(k) % 64 == hash("k") % 64)

    def loader() -> Any:
        a.set(other, 1)  # a mutation of the stripe, as the journal's would be
        return "first"

    assert leased_get_or_load(a, "k", loader) == "first"
    polls = Polls()
    load, calls = loader_counting("second")
    got = leased_get_or_load(b, "k", load, clock=polls.clock, sleep=polls.sleep)
    assert got == "second" and calls == [1] and polls.slept == []  # the lease was free


def test_memcached_down_means_no_lease_and_no_wait() -> None:
    chain = make_chain(f"127.0.0.1:{free_port()}", timeout=0.2, connect_timeout=0.2)
    try:
        polls = Polls()
        load, calls = loader_counting("local")
        start = time.monotonic()
        got = leased_get_or_load(chain, "k", load, clock=polls.clock, sleep=polls.sleep)
        assert got == "local" and calls == [1] and polls.slept == []
        assert time.monotonic() - start < 1.0
        assert lease_figures(chain) == {"unavailable": 1}
        errs = chain.metrics_collector.snapshot().layer_metrics["L2"].errors
        assert errs >= 1
    finally:
        chain.close()


def test_an_open_breaker_means_no_lease(memcached: MemcachedProcess) -> None:
    shared = make_layer(memcached)
    asked: list[str] = []
    real = shared.lease

    def lease(key: str, ttl: float) -> Lease | None:
        asked.append(key)
        return real(key, ttl)

    shared.lease = lease  # type: ignore[method-assign]
    chain = Chain([MemoryLayer("L1"), shared], metrics=MemoryCollector())
    try:
        breaker = chain.breakers["L2"]
        while not breaker.refusing():
            breaker.on_failure(breaker.acquire())
        polls = Polls()
        load, calls = loader_counting("local")
        got = leased_get_or_load(chain, "k", load, clock=polls.clock, sleep=polls.sleep)
        assert got == "local" and calls == [1] and polls.slept == [] and asked == []
        assert lease_figures(chain) == {"unavailable": 1}
        assert chain.metrics_collector.snapshot().layer_metrics["L2"].circuit_rejected >= 1
    finally:
        chain.close()


def test_no_lease_when_off_unsupported_or_the_writer_holds_the_key(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    a, b = chains
    load, calls = loader_counting((1, True))
    assert leased_load(a, "k", load, config=OFF) == 1
    local = Chain([MemoryLayer("L1"), MemoryLayer("L2")], metrics=MemoryCollector())
    assert leased_load(local, "k", load) == 1
    local.close()
    writer = a._shared.writer
    assert writer is not None
    writer.repair("held")  # a delete this process still owes memcached
    assert leased_load(a, "held", load) == 1
    assert calls == [1, 1, 1]
    assert lease_figures(a) == {}
    assert b.layers[1].lease("held", 30).won  # type: ignore[attr-defined]  # nobody took it


def test_a_value_that_arrived_since_the_read_is_served(
    memcached: MemcachedProcess, chains: tuple[Chain, Chain]
) -> None:
    a, b = chains
    a.layers[1].set("k", "there", 60)  # not a.set: its publication could empty b's L1
    got = leased_load(b, "k", lambda won: pytest.fail("loaded"))
    assert got == "there" and b.layers[0].get("k") == "there"
    assert lease_figures(b) == {"hit": 1}


def test_a_closed_chain_raises(memcached: MemcachedProcess) -> None:
    from cachechain import ChainClosedError

    chain = make_chain(memcached)
    chain.get("k")  # the namespace generation is known
    chain.close()
    with pytest.raises(ChainClosedError):
        leased_load(chain, "k", lambda won: pytest.fail("loaded"))


def test_a_release_that_cannot_be_made_is_counted(own_memcached: MemcachedProcess) -> None:
    """The winner's load fails while memcached is gone: the release fails (counted and
    logged), the load's error reaches the caller, the stub ends at its TTL. With the
    breaker open the release is not even tried."""
    chain = settled(make_chain(own_memcached, timeout=0.2, connect_timeout=0.2))
    try:

        def fails_and_stops() -> Any:
            own_memcached.stop()
            raise RuntimeError("database down")

        with pytest.raises(RuntimeError, match="database down"):
            leased_get_or_load(chain, "k", fails_and_stops)
        snap = chain.metrics_collector.snapshot()
        assert snap.chain_metrics.leases_by_outcome == {"won": 1}
        assert snap.layer_metrics["L2"].errors_by_type
        own_memcached.start()
        breaker = chain.breakers["L2"]
        breaker.reset()
        lease = chain._shared.layer.lease("k2", 30)  # type: ignore[attr-defined]
        assert lease.won
        while not breaker.refusing():
            breaker.on_failure(breaker.acquire())
        from cachechain._lease import _Load, _release

        job = _Load(chain, "k2", lambda: ("x", True), DEFAULT)
        _release(job, lease)  # refused by the breaker: not tried
        breaker.reset()
        other = make_layer(own_memcached)
        assert other.lease(mkey(chain, "k2").decode(), 30).held  # type: ignore[union-attr]
        other.close()
    finally:
        chain.close()


def test_lease_config_is_checked() -> None:
    config = LeaseConfig(ttl=3)
    assert LeaseConfig.of(config) is config
    assert LeaseConfig().max_wait == DEFAULT.ttl == 2.0
    assert LeaseConfig(ttl=5).max_wait == 5 and LeaseConfig(ttl=5, wait=0).max_wait == 0
    assert LeaseConfig.of(None) == DEFAULT and LeaseConfig.of(True) == DEFAULT
    assert LeaseConfig.of(False) == OFF and not OFF.enabled
    for bad in (
        {"ttl": 0},
        {"ttl": float("inf")},
        {"ttl": 31 * 24 * 3600},
        {"wait": -1},
        {"enabled": 1},
    ):
        with pytest.raises(ConfigError):
            LeaseConfig(**bad)
    with pytest.raises(ConfigError):
        LeaseConfig.of("yes")  # type: ignore[arg-type]


def test_the_lease_is_in_the_metrics_catalogue() -> None:
    assert "lease" in OPERATIONS
    assert LEASE_OUTCOMES[:5] == ("won", "hit", "waited", "timed_out", "unavailable")


# -- threads of several chains over one memcached ------------------------------------------


def test_sixteen_threads_of_four_chains_load_once(memcached: MemcachedProcess) -> None:
    # 64 threads on a loaded machine (the full suite with coverage): a call deadline of
    # 0.5 s, or a poll in flight past the 100 ms coherence bound (the watchdog then drops
    # every L1 entry, a mutation of every key: the load in flight is not stored, and
    # another chain loads again), would make a second load that says nothing about the
    # lease. Both are loosened; the lease is what is tested.
    chains = [
        settled(
            Chain(
                [MemoryLayer("L1"), make_layer(memcached, timeout=10.0, connect_timeout=10.0)],
                metrics=MemoryCollector(),
                coherence=CoherenceConfig(bound=5.0),
            )
        )
        for _ in range(4)
    ]
    loads: list[int] = []
    asked: set[int] = set()
    everyone_asked = threading.Event()
    barrier = threading.Barrier(64)
    results: list[Any] = []

    for i, chain in enumerate(chains):  # report each chain's first lease call
        shared: Any = chain._shared.layer
        real = shared.lease

        def lease(key: str, ttl: float, i: int = i, real: Any = real) -> Lease | None:
            found: Lease | None = real(key, ttl)
            asked.add(i)
            if len(asked) == len(chains):
                everyone_asked.set()
            return found

        shared.lease = lease

    def loader() -> Any:
        loads.append(1)
        assert everyone_asked.wait(10)  # every chain asked before the value exists
        return "v"

    def work(chain: Chain) -> None:
        barrier.wait(10)
        # A lease of 30 s: the winner's load waits for every chain to ask, and on a
        # loaded machine that outlasted the default 2 s lease (memcached ended it, a
        # waiter won it and loaded again: failed on 3.13 under a loaded matrix).
        results.append(leased_get_or_load(chain, "hot", loader, 30, config=LeaseConfig(ttl=30)))

    threads = [threading.Thread(target=work, args=(c,)) for c in chains for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["v"] * 64 and loads == [1]
    outcomes: dict[str, int] = {}
    for c in chains:
        for k, n in lease_figures(c).items():
            outcomes[k] = outcomes.get(k, 0) + n
        c.close()
    assert outcomes == {"won": 1, "waited": 3}


def test_the_lease_travels_through_the_namespace_and_the_breaker(
    memcached: MemcachedProcess,
) -> None:
    config = LayerConfig(make_layer(memcached))
    chain = Chain([MemoryLayer("L1"), config])
    try:
        shared = chain._shared.layer
        assert type(shared).__name__ == "ResilientLayer"
        assert type(shared.layer).__name__ == "NamespacedLayer"  # type: ignore[attr-defined]
        lease = shared.lease("k", 5)  # type: ignore[attr-defined]
        assert lease.won
        assert raw_item(memcached, mkey(chain, "k")).startswith(b"VALUE")
        assert raw_item(memcached, b"k") == b"END\r\n"
    finally:
        chain.close()
