"""Name lookups of memcached servers within the call's deadline (``layers/_resolve.py``).

``socket.getaddrinfo`` waits as long as the system's resolver does (5 s per attempt by
default), past any deadline of the layer's. These tests drive :class:`Resolver` with a
fake resolver that can hang (an ``Event`` it waits on) or fail, and a real
``MemcachedLayer`` through it: a hanging resolver costs a call its timeout and no
more, and a server's last good answer stands in for a resolver that fails or hangs.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cachechain import MISSING, Chain, MemcachedLayer
from cachechain._errors import LayerTimeoutError, LayerUnavailableError
from cachechain.layers import _wire
from cachechain.layers._resolve import Resolver
from tests.support.servers import MemcachedProcess

#: A call must end within its timeout plus this much (a loaded machine schedules late);
#: the resolver below hangs until the test ends, and the real one for 5 s or more.
SLACK = 1.0


class FakeDNS:
    """``socket.getaddrinfo`` over ``table`` (name -> IP literal). While ``gate`` is
    clear a lookup of a name waits on it; ``failure`` makes it raise. A numeric host is
    parsed by the real ``getaddrinfo`` with ``AI_NUMERICHOST`` (no resolver)."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self.names: list[str] = []  # the names looked up, in order
        self.gate = threading.Event()
        self.gate.set()
        self.failure: OSError | None = None

    def __call__(
        self, host: str, port: int, family: int, kind: int, proto: int, flags: int = 0
    ) -> list[Any]:
        if flags & socket.AI_NUMERICHOST:
            return socket.getaddrinfo(host, port, family, kind, proto, flags)
        self.names.append(host)
        self.gate.wait(30)
        if self.failure is not None:
            raise self.failure
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return socket.getaddrinfo(
            self.table[host], port, family, kind, proto, socket.AI_NUMERICHOST
        )


@pytest.fixture()
def dns() -> Iterator[FakeDNS]:
    fake = FakeDNS({"cache.test": "127.0.0.1"})
    yield fake
    fake.gate.set()  # let a hanging lookup's thread end


def soon(seconds: float) -> float:
    return time.monotonic() + seconds


def test_a_numeric_host_never_asks_the_resolver(dns: FakeDNS) -> None:
    resolver = Resolver(dns)
    dns.gate.clear()  # a lookup would hang
    for host in ("127.0.0.1", "::1"):
        found = resolver.addresses(host, 11211, soon(0.0))
        assert found and found[0][4][1] == 11211
    assert dns.names == []


def test_a_name_is_looked_up_again_at_each_connect(dns: FakeDNS) -> None:
    resolver = Resolver(dns)
    assert resolver.addresses("cache.test", 1, soon(5))[0][4] == ("127.0.0.1", 1)
    dns.table["cache.test"] = "127.0.0.2"  # the server moved
    assert resolver.addresses("cache.test", 1, soon(5))[0][4] == ("127.0.0.2", 1)
    assert dns.names == ["cache.test", "cache.test"]


def test_a_hanging_resolver_costs_the_deadline_and_no_more(dns: FakeDNS) -> None:
    """Found by review of the connect path: ``getaddrinfo`` ran outside any bound."""
    resolver = Resolver(dns)
    dns.gate.clear()
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        resolver.addresses("cache.test", 1, soon(0.1))
    assert time.monotonic() - began < 0.1 + SLACK
    with pytest.raises(TimeoutError):  # joins the lookup in flight: no second thread
        resolver.addresses("cache.test", 1, soon(0.05))
    assert dns.names == ["cache.test"]
    dns.gate.set()  # it answers at last: the next connect has its answer
    assert resolver.addresses("cache.test", 1, soon(5))[0][4] == ("127.0.0.1", 1)


def test_the_last_good_answer_stands_in_for_a_hanging_resolver(dns: FakeDNS) -> None:
    resolver = Resolver(dns)
    assert resolver.addresses("cache.test", 1, soon(5))[0][4] == ("127.0.0.1", 1)
    dns.gate.clear()
    began = time.monotonic()
    # A fresh lookup gets half the time left; then the last answer is used.
    assert resolver.addresses("cache.test", 1, soon(0.2))[0][4] == ("127.0.0.1", 1)
    assert time.monotonic() - began < 0.2 + SLACK
    # That lookup still hangs: the next connect does not wait for it at all.
    began = time.monotonic()
    assert resolver.addresses("cache.test", 1, soon(30))[0][4] == ("127.0.0.1", 1)
    assert time.monotonic() - began < SLACK
    assert dns.names == ["cache.test", "cache.test"]


def test_the_last_good_answer_stands_in_for_a_failing_resolver(dns: FakeDNS) -> None:
    resolver = Resolver(dns)
    dns.failure = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    with pytest.raises(socket.gaierror):  # nothing known yet: the resolver's error
        resolver.addresses("cache.test", 1, soon(5))
    dns.failure = None
    resolver.addresses("cache.test", 1, soon(5))
    dns.failure = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert resolver.addresses("cache.test", 1, soon(5))[0][4] == ("127.0.0.1", 1)
    with pytest.raises(socket.gaierror):  # an unknown name is never made up
        resolver.addresses("other.test", 1, soon(5))


def test_concurrent_connects_share_one_lookup(dns: FakeDNS) -> None:
    resolver = Resolver(dns)
    dns.gate.clear()
    threads = 8
    started = threading.Barrier(threads + 1)
    answers: list[Any] = []

    def connect() -> None:
        started.wait()
        answers.append(resolver.addresses("cache.test", 1, soon(30))[0][4])

    workers = [threading.Thread(target=connect) for _ in range(threads)]
    for worker in workers:
        worker.start()
    started.wait()
    # Every connect waits on the one lookup in flight before it answers (one that came
    # after it ended would rightly look the name up again).
    deadline = time.monotonic() + 30
    while not waiting_on_the_lookup(resolver, ("cache.test", 1), threads):
        assert time.monotonic() < deadline, "the connects never all waited"
        time.sleep(0.001)
    dns.gate.set()
    for worker in workers:
        worker.join(30)
    assert answers == [("127.0.0.1", 1)] * threads
    assert dns.names == ["cache.test"]


def waiting_on_the_lookup(resolver: Resolver, server: tuple[str, int], count: int) -> bool:
    """Whether ``count`` threads wait on the lookup of ``server`` in flight (CPython's
    ``Event``: a ``Condition`` whose waiters are a deque)."""
    flight = resolver._flights.get(server)
    return flight is not None and len(flight.done._cond._waiters) == count  # type: ignore[attr-defined]


def test_a_forked_child_forgets_the_lookup_in_flight_and_keeps_the_answers(
    dns: FakeDNS,
) -> None:
    resolver = Resolver(dns)
    resolver.addresses("cache.test", 1, soon(5))
    dns.gate.clear()
    resolver.addresses("cache.test", 1, soon(0.02))  # leaves a lookup in flight
    resolver._after_fork()  # what a forked child runs: that thread is not there
    dns.gate.set()
    assert resolver.addresses("cache.test", 1, soon(5))[0][4] == ("127.0.0.1", 1)
    assert dns.names == ["cache.test"] * 3  # a lookup of its own, not the parent's


def test_a_layer_behind_a_hanging_resolver_misses_within_its_timeout(
    dns: FakeDNS, memcached: MemcachedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never fail the caller, within the call's bound: the whole get, name lookup
    included, takes its timeout, and the failure is a timeout; once the name is known
    the layer keeps working while the resolver hangs."""
    monkeypatch.setattr(_wire, "RESOLVER", Resolver(dns))
    dns.gate.clear()
    layer = MemcachedLayer("L2", f"cache.test:{memcached.port}", timeout=0.2, connect_timeout=0.2)
    try:
        began = time.monotonic()
        with pytest.raises(LayerTimeoutError):
            layer.get("k")
        assert time.monotonic() - began < 0.2 + SLACK
        dns.gate.set()
        layer.set("k", "v", 60)  # the lookup answered: connected
        for node in layer._pool.nodes:
            node.drop_idle()  # the next call connects again...
        dns.gate.clear()  # ...while the resolver hangs
        began = time.monotonic()
        assert layer.get("k") == "v"
        assert time.monotonic() - began < 0.2 + SLACK
    finally:
        layer.close()


def test_an_unknown_name_is_an_unreachable_layer_and_a_chain_miss(
    dns: FakeDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_wire, "RESOLVER", Resolver(dns))
    layer = MemcachedLayer("L2", "nowhere.test:11211", timeout=0.2, connect_timeout=0.2)
    try:
        with pytest.raises(LayerUnavailableError):
            layer.get("k")
    finally:
        layer.close()
    chain = Chain([MemcachedLayer("L2", "nowhere.test:11211", timeout=0.2)], coherence=False)
    try:
        assert chain.get("k", MISSING) is MISSING
        failure = chain.health().layers[0].last_error
        assert failure is not None and failure.type == "LayerUnavailableError"
        assert "nowhere.test" in failure.message
    finally:
        chain.close()


def test_with_no_thread_to_start_the_lookup_runs_in_the_caller(
    dns: FakeDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At interpreter shutdown no thread starts (``RuntimeError``); a last ``close()``
    that connects to drain its writes still finds its server."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    resolver = Resolver(dns)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert resolver.addresses("cache.test", 1, soon(5))[0][4] == ("127.0.0.1", 1)
