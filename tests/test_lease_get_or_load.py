"""The lease inside ``Chain.get_or_load`` (issue 12, items 4 and 5): on by default, per
call and per chain, in settings, and with fail-safe values.

Two chains over one real memcached stand for two processes (each has its own L1 and
its own connections). Clocks are injected (the chain's monotonic one and the memcached
layer's wall clock move together); a lease wait is real time, bounded by
``LeaseConfig.wait``. Thread hand-offs use events.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cachechain import (
    MISSING,
    Chain,
    ConfigError,
    InvalidValueError,
    LayerUnavailableError,
    LoadConfig,
    MemcachedLayer,
    MemoryCollector,
    MemoryLayer,
)
from cachechain._config import LeaseConfig
from cachechain._load_policy import DEFAULT
from cachechain._resilience import unwrapped
from cachechain._settings import chain_config_from_mapping
from cachechain.layers._base import Lease
from cachechain.testing import FakeClock
from tests.support.servers import MemcachedProcess
from tests.test_lease import classic, errors, lease_figures

pytestmark = pytest.mark.memcached

WAIT = 10.0  # the most any event wait may take before the test fails
#: The lease of a chain that holds one while another waits. memcached ends a lease of
#: the default TTL (2 s) as soon as a second after it was won, to the tick of its clock:
#: a loaded machine could take that long between the holder's win and the waiter's
#: poll, and the waiter then won and loaded (failed on 3.13 under CI's matrix).
HELD = LeaseConfig(ttl=60.0)


class Clocks:
    """The chain's monotonic clock and the memcached layer's wall clock, moved together."""

    def __init__(self) -> None:
        self.mono = FakeClock(1000.0)
        self.wall = FakeClock(time.time())

    def advance(self, seconds: float) -> None:
        self.mono.advance(seconds)
        self.wall.advance(seconds)


@pytest.fixture()
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture()
def make(memcached: MemcachedProcess, clocks: Clocks) -> Iterator[Callable[..., Chain]]:
    """Builds "processes": chains over the test's memcached, closed at the end."""
    made: list[Chain] = []
    prefix = f"{uuid.uuid4().hex[:8]}:"  # this test's keys: none left by another

    def build(**load: Any) -> Chain:
        l1 = MemoryLayer("L1", clock=clocks.mono)
        l2 = MemcachedLayer(
            "L2",
            memcached.address,
            key_prefix=prefix,
            timeout=0.5,
            connect_timeout=0.5,
            clock=clocks.wall,
        )
        chain = Chain(
            [l1, l2],
            load=LoadConfig(**load),
            clock=clocks.mono,
            coherence=False,
            metrics=MemoryCollector(),
        )
        made.append(chain)
        return chain

    yield build
    for chain in made:
        chain.close()


def _prefix() -> str:
    return f"{uuid.uuid4().hex[:8]}:"


def b_key(chain: Chain, key: str) -> bytes:
    """The memcached key ``chain`` stores ``key`` under."""
    layer: Any = unwrapped(chain.layers[1])
    return layer._prefix.encode() + key.encode()


def asked(chain: Chain) -> threading.Event:
    """An event set once ``chain`` has asked its shared layer for a lease."""
    shared: Any = chain._shared.layer
    real = shared.lease
    done = threading.Event()

    def lease(key: str, ttl: float) -> Any:
        try:
            return real(key, ttl)
        finally:
            done.set()

    shared.lease = lease
    return done


class Holder:
    """A chain's ``get_or_load`` of ``key`` on a thread, its loader blocked until
    :meth:`finish`: the lease is held meanwhile."""

    #: The value's TTL defaults to a minute: memcached's clock ticks once a second, so
    #: an item stored for 1 s may end at once, and a waiter that polled after it then
    #: won the lease and loaded itself (failed in CI under load).
    def __init__(self, chain: Chain, key: str, value: Any, ttl: float = 60.0) -> None:
        self.loading = threading.Event()
        self.release = threading.Event()
        self.result: list[Any] = []

        def loader() -> Any:
            self.loading.set()
            assert self.release.wait(WAIT)
            return value

        def run() -> None:
            self.result.append(chain.get_or_load(key, loader, ttl))

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.loading.wait(WAIT)

    def finish(self) -> Any:
        self.release.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        return self.result[0]


def boom() -> Any:
    raise ConnectionError("the database is down")


def item_ttl(memcached: MemcachedProcess, chain: Chain, key: str) -> int:
    """memcached's remaining TTL of ``chain``'s ``key`` in seconds (-1: none), by
    ``mg <key> t``."""
    layer: Any = unwrapped(chain.layers[1])
    reply = memcached.raw(b"mg " + layer._prefix.encode() + key.encode() + b" t\r\n")
    assert reply.startswith(b"HD "), reply
    return int(reply.split(b" t", 1)[1].split()[0])


# -- on by default ---------------------------------------------------------------------


def test_a_miss_waits_for_the_process_that_holds_the_lease(make: Callable[..., Chain]) -> None:
    assert make()._loads.lease == LeaseConfig()  # on by default
    a, b = make(lease=HELD), make(lease=HELD)
    holder = Holder(a, "k", "from a")
    got: list[Any] = []
    waits = asked(b)
    waiting = threading.Thread(
        target=lambda: got.append(b.get_or_load("k", lambda: pytest.fail("b loaded"), 1))
    )
    waiting.start()
    assert waits.wait(WAIT)  # b found the lease held
    assert holder.finish() == "from a"
    waiting.join(WAIT)
    assert got == ["from a"]  # b's loader never ran: it waited for a's value
    assert lease_figures(a) == {"won": 1}
    assert lease_figures(b) == {"waited": 1}
    assert b.layers[0].get("k") == "from a"  # copied into b's L1


@pytest.mark.parametrize("mode", ["meta", "classic"])
@pytest.mark.parametrize("change", ["delete", "set"])
def test_a_change_during_the_winners_load_keeps_its_older_value_out(
    make: Callable[..., Chain], mode: str, change: str
) -> None:
    """Leases against stale sets: process b changes the source and writes or deletes
    the key while a, the lease's winner, is still loading the older value. a's caller
    gets what a loaded; no layer of any process keeps it (a stored it over b's change
    before: memcached then served the older value until its TTL)."""
    a, b = make(lease=HELD), make()
    if mode == "classic":
        classic(unwrapped(a.layers[1]))  # type: ignore[arg-type]
    holder = Holder(a, "k", "loaded before the change", ttl=60)
    if change == "delete":
        assert b.delete("k")
    else:
        assert b.set("k", "written during the load", 60)
    assert b.flush()
    assert holder.finish() == "loaded before the change"
    assert a.flush()
    assert a.layers[0].get("k") is MISSING  # not in a's L1 either
    expected = MISSING if change == "delete" else "written during the load"
    assert unwrapped(b.layers[1]).get("k") == expected
    assert a.get("k", MISSING) == expected
    assert lease_figures(a) == {"won": 1}
    assert a.metrics_collector.snapshot().layer_metrics["L2"].sets == 1  # type: ignore[union-attr]
    if change == "delete":  # the next load stores as usual
        assert b.get_or_load("k", lambda: "reloaded", 60) == "reloaded"
        assert b.flush() and a.get("k") == "reloaded"


def test_a_load_slower_than_the_lease_is_still_stored_once(
    make: Callable[..., Chain],
) -> None:
    """Found by review: memcached ends a lease at its TTL, so the winner of a load
    slower than that found its stub gone, and stored nothing, anywhere: every call
    loaded again. The load's slowness is the database's own, real time."""
    a = make(lease=LeaseConfig(ttl=1.0))
    calls: list[int] = []

    def slow() -> str:
        calls.append(1)
        time.sleep(1.2)  # past the lease's TTL (memcached's clock: 1 s, to the second)
        return "slow"

    assert a.get_or_load("k", slow, 60) == "slow"
    assert a.flush() and a.layers[0].get("k") == "slow"
    assert unwrapped(a.layers[1]).get("k") == "slow"
    assert a.get_or_load("k", slow, 60) == "slow" and calls == [1]
    assert make().get_or_load("k", slow, 60) == "slow" and calls == [1]  # another process


def test_a_stale_copy_deleted_during_the_reload_is_not_put_back(
    make: Callable[..., Chain], clocks: Clocks, memcached: MemcachedProcess
) -> None:
    """Found by review: the winner's store, refused because another process deleted
    the key, released the lease, and the release put the fail-safe copy the lease was
    won on back with ``add``: the delete was undone for every process."""
    options = {"fail_safe": True, "fail_safe_max_age": 60.0}
    a = make(**options)
    assert a.get_or_load("k", lambda: "v1", 1) == "v1"
    assert a.flush()
    clocks.advance(2)  # past its TTL: memcached keeps the copy for the fail-safe
    b, c = make(**options, lease=HELD), make(**options)
    holder = Holder(b, "k", "v2", ttl=1)  # b won the lease on the stale copy
    assert c.delete("k") and c.flush()
    assert holder.finish() == "v2"
    assert b.flush()
    assert memcached.raw(b"mg " + b_key(b, "k") + b" v\r\n").startswith(b"EN")
    with pytest.raises(ConnectionError):  # no copy left to serve: the delete stands
        make(**options).get_or_load("k", boom, 1)


def test_every_layer_but_the_shared_one_gets_the_value_once_it_took_it(
    memcached: MemcachedProcess,
) -> None:
    """Found by review: a layer below the shared one (an in-process layer at the
    bottom of the chain) was left out of the winner's store."""
    bottom = MemoryLayer("L3")
    chain = Chain(
        [MemoryLayer("L1"), MemcachedLayer("L2", memcached.address, key_prefix=_prefix()), bottom],
        coherence=False,
    )
    try:
        assert chain.get_or_load("k", lambda: "v", 60) == "v"
        assert chain.flush()
        assert [layer.get("k") for layer in chain.layers] == ["v", "v", "v"]
    finally:
        chain.close()


@pytest.mark.parametrize("module", ["its own", "the layer's"])
def test_a_memcached_layer_subclass_set_stores_the_winners_value(
    memcached: MemcachedProcess, module: str
) -> None:
    """A subclass's ``set`` is used for the winner's store wherever the subclass was
    defined. The override used to be judged by the module of the class defining
    ``set``, so one that named the layer's own module (a vendored copy, a class made
    with ``type()``) was taken for the layer itself and bypassed."""
    written: list[str] = []

    def set_(self: MemcachedLayer, key: str, value: Any, ttl: float | None = None) -> None:
        written.append(key)
        MemcachedLayer.set(self, key, value, ttl)

    body: dict[str, Any] = {"set": set_}
    if module == "the layer's":
        body["__module__"] = MemcachedLayer.__module__
    audited = type("Audited", (MemcachedLayer,), body)
    chain = Chain(
        [MemoryLayer("L1"), audited("L2", memcached.address, key_prefix=_prefix())],
        coherence=False,
    )
    try:
        assert chain.get_or_load("k", lambda: "v", 60) == "v"
        assert chain.flush() and written == ["k"]
    finally:
        chain.close()


def test_a_winner_whose_breaker_opened_during_the_load_keeps_the_value_in_l1(
    make: Callable[..., Chain],
) -> None:
    a = make()
    breaker = a.breakers["L2"]

    def load() -> str:
        for _ in range(breaker.max_failures):  # memcached failed for other requests
            breaker.on_failure(breaker.acquire())
        return "v"

    assert a.get_or_load("k", load, 60) == "v"
    assert breaker.refusing() and a.layers[0].get("k") == "v"  # as without the lease


def test_a_value_memcached_cannot_take_stays_in_the_winners_l1_and_frees_the_lease(
    make: Callable[..., Chain],
) -> None:
    a, b = make(), make(lease=LeaseConfig(wait=0.0))
    unencodable = object()  # the default codec is JSON
    assert a.get_or_load("k", lambda: unencodable, 60) is unencodable
    assert a.layers[0].get("k") is unencodable  # as a set of it would leave it
    assert errors(a) == {"L2": 1}
    assert b.get_or_load("k", lambda: "b's", 60) == "b's"  # the lease was released
    assert lease_figures(b) == {"won": 1}


def test_a_store_over_the_lease_that_fails_is_counted_and_frees_the_lease(
    make: Callable[..., Chain],
) -> None:
    a, b = make(), make(lease=LeaseConfig(wait=0.0))
    shared: Any = a._shared.layer
    real = shared.lease

    def failing(key: str, ttl: float) -> Any:
        won = real(key, ttl)

        def store(value: Any, ttl: float | None) -> bool:
            raise LayerUnavailableError("memcached went away", layer="L2")

        return Lease(won=True, release=won.release, store=store)

    shared.lease = failing
    assert a.get_or_load("k", lambda: "a's", 60) == "a's"  # the caller still gets it
    assert a.layers[0].get("k") is MISSING  # nothing kept on a guess
    assert errors(a) == {"L2": 1}
    assert b.get_or_load("k", lambda: "b's", 60) == "b's"  # released: b won at once
    assert lease_figures(b) == {"won": 1}


def test_lease_false_loads_at_once_while_another_process_holds_it(
    make: Callable[..., Chain],
) -> None:
    a, b = make(lease=HELD), make()
    holder = Holder(a, "k", "from a")
    try:
        assert b.get_or_load("k", lambda: "from b", 1, lease=False) == "from b"
        assert lease_figures(b) == {}
    finally:
        holder.finish()


def test_a_chain_with_leases_off_loads_at_once_and_a_call_can_turn_them_on(
    make: Callable[..., Chain],
) -> None:
    a, b = make(lease=HELD), make(lease=False)
    assert not b._loads.lease.enabled
    assert b._loads.lease_for(True) == LeaseConfig()
    assert b._loads.lease_for(DEFAULT) is b._loads.lease
    assert not make()._loads.lease_for(False).enabled
    holder = Holder(a, "k", "from a")
    try:
        assert b.get_or_load("k", lambda: "from b", 1) == "from b"
        assert lease_figures(b) == {}
    finally:
        holder.finish()
    # A call's ``lease=True`` keeps the chain's lease TTL and wait: the one below waits
    # a minute (with the default 2 s, a loaded machine's holder outlasted it: failed in
    # CI, the waiter loaded "from b").
    c = make(lease=LeaseConfig(enabled=False, ttl=HELD.ttl))
    assert c._loads.lease_for(True) == HELD
    holder = Holder(a, "k2", "from a")
    got: list[Any] = []
    waits = asked(c)
    waiting = threading.Thread(
        target=lambda: got.append(c.get_or_load("k2", lambda: "from c", 1, lease=True))
    )
    waiting.start()
    assert waits.wait(WAIT)
    assert holder.finish() == "from a"
    waiting.join(WAIT)
    assert got == ["from a"] and lease_figures(c) == {"waited": 1}


def test_the_decorator_passes_the_lease_option(make: Callable[..., Chain]) -> None:
    a, b = make(lease=HELD), make()
    calls: list[int] = []

    @b.cached(60, key=lambda n: f"n{n}", lease=False)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    holder = Holder(a, "n3", -1)
    try:
        assert square(3) == 9 and calls == [3]  # no wait for a's lease
    finally:
        holder.finish()


def test_a_bad_lease_option_is_refused_before_anything_is_read(
    make: Callable[..., Chain],
) -> None:
    chain = make()
    for bad in ("yes", 1, None):
        with pytest.raises(InvalidValueError, match="lease must be a bool"):
            chain.get_or_load("k", lambda: pytest.fail("loaded"), lease=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidValueError, match="lease must be a bool"):
            chain.cached(lease=bad)  # type: ignore[arg-type]


def test_the_lease_in_load_config_and_settings() -> None:
    assert LoadConfig().lease == LeaseConfig()
    assert LoadConfig(lease=False).lease == LeaseConfig(enabled=False)
    assert LoadConfig(lease=LeaseConfig(ttl=5)).lease == LeaseConfig(ttl=5)
    layers = [{"type": "memory"}]
    config = chain_config_from_mapping({"layers": layers, "load": {"lease": {"ttl": 5, "wait": 1}}})
    assert config.load is not None and config.load.lease == LeaseConfig(ttl=5, wait=1)
    config = chain_config_from_mapping({"layers": layers, "load": {"lease": False}})
    assert config.load is not None and config.load.lease == LeaseConfig(enabled=False)
    for bad, match in (
        ({"tll": 1}, "unknown setting 'tll'"),
        ({"ttl": 0}, "lease.ttl"),
        ("on", "lease must be a LeaseConfig or a bool"),
    ):
        with pytest.raises(ConfigError, match=match):
            chain_config_from_mapping({"layers": layers, "load": {"lease": bad}})


# -- with fail-safe values -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["meta", "classic"])
def test_a_failed_load_under_the_lease_keeps_the_fail_safe_copy_for_every_process(
    make: Callable[..., Chain], clocks: Clocks, memcached: MemcachedProcess, mode: str
) -> None:
    options = {"fail_safe": True, "fail_safe_max_age": 60.0}
    a = make(**options)
    assert a.get_or_load("k", lambda: "v1", 1) == "v1"
    assert a.flush()  # its store reached memcached (fills go through the writer)
    clocks.advance(2)  # past its TTL; memcached keeps it 61 s for the fail-safe
    b = make(**options)  # another process: nothing in its L1
    if mode == "classic":
        classic(unwrapped(b.layers[1]))  # type: ignore[arg-type]
    assert b.get_or_load("k", boom, 1) == "v1"  # the database is down: the copy
    # Marked for the lease, the copy got the lease's TTL (2 s); the failed load gave
    # it back its own (61 s) on release (classic: it was never replaced by a stub).
    assert item_ttl(memcached, b, "k") > 30
    c = make(**options)  # a third process, later: it still has the copy
    assert c.get_or_load("k", boom, 1) == "v1"
    expected = {"won": 1} if mode == "meta" else {"unavailable": 1}
    assert lease_figures(b) == expected


def test_a_wait_that_ends_without_a_value_serves_the_fail_safe_copy(
    make: Callable[..., Chain], clocks: Clocks
) -> None:
    options = {"fail_safe": True, "fail_safe_max_age": 60.0}
    a = make(**options, lease=HELD)
    assert a.get_or_load("k", lambda: "v1", 1) == "v1"
    assert a.flush()  # its store reached memcached (fills go through the writer)
    clocks.advance(2)
    b = make(**options, lease=LeaseConfig(wait=0.2))
    holder = Holder(a, "k", "v2")  # a reloads, slowly, holding the lease
    try:
        started = time.monotonic()
        assert b.get_or_load("k", lambda: pytest.fail("b loaded"), 1) == "v1"
        assert time.monotonic() - started < WAIT
    finally:
        assert holder.finish() == "v2"
    figures: Any = b.metrics_collector.snapshot().chain_metrics  # type: ignore[union-attr]
    assert figures.fail_safe_by_reason == {"lease_wait": 1}
    assert lease_figures(b) == {"timed_out": 1}
    assert b.get_or_load("k", lambda: pytest.fail("b loaded"), 1) == "v2"  # a's, from memcached


@pytest.mark.parametrize("max_age", [60.0, 40 * 24 * 3600.0])
def test_a_failed_load_gives_back_a_copy_kept_past_30_days(
    make: Callable[..., Chain], clocks: Clocks, memcached: MemcachedProcess, max_age: float
) -> None:
    """memcached reads a TTL above 30 days as a unix time: the release gives such a copy
    its time back as one (found by review: a 40-day copy was deleted at once)."""
    options = {"fail_safe": True, "fail_safe_max_age": max_age}
    a = make(**options)
    assert a.get_or_load("k", lambda: "v1", 1) == "v1"
    assert a.flush()
    clocks.advance(2)
    b = make(**options)
    assert b.get_or_load("k", boom, 1) == "v1"
    assert lease_figures(b) == {"won": 1}
    assert item_ttl(memcached, b, "k") > 30
    c = make(**options)
    assert c.get_or_load("k", boom, 1) == "v1"


def test_a_copy_that_expired_during_a_slow_failed_load_is_put_back(
    make: Callable[..., Chain], clocks: Clocks, memcached: MemcachedProcess
) -> None:
    """Marked for the lease, the copy lives the lease's TTL (1 s here); a load slower
    than that which then fails must not leave every process without the copy (found
    by review). The load's slowness is the database's own, real time."""
    options = {"fail_safe": True, "fail_safe_max_age": 600.0}
    a = make(**options)
    assert a.get_or_load("k", lambda: "v1", 1) == "v1"
    assert a.flush()
    clocks.advance(2)
    b = make(**options, lease=LeaseConfig(ttl=1.0))

    def slow_then_down() -> Any:
        time.sleep(2.2)  # past the lease's TTL (memcached's clock: 1 s, to the second)
        raise ConnectionError("the database is down")

    assert b.get_or_load("k", slow_then_down, 1) == "v1"
    assert item_ttl(memcached, b, "k") > 30  # put back, with its own time
    c = make(**options)
    assert c.get_or_load("k", boom, 1) == "v1"
