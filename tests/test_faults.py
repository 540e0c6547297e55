"""The fault matrix of reliability.md at the chain level, against a real memcached.

Each test names the rows it covers. Sockets use 100-200 ms timeouts; breakers use an
injected clock wherever a test would otherwise wait for the open period to pass.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cachechain import (
    Chain,
    CircuitBreaker,
    CircuitState,
    LayerConfig,
    LayerUnavailableError,
    MemcachedLayer,
    MemoryLayer,
)
from cachechain._resilience import ResilientLayer
from cachechain.metrics._memory import MemoryCollector
from tests.support.fakes import FakeClock
from tests.support.faultproxy import BacklogListener, FaultProxy
from tests.support.servers import MemcachedProcess

pytestmark = pytest.mark.memcached

TIMEOUT = 0.1


def guarded(
    address: str,
    clock: FakeClock,
    *,
    max_failures: int = 3,
    timeout: float = TIMEOUT,
    slow: float | None = None,
) -> ResilientLayer:
    """memcached at ``address`` behind a breaker on ``clock``; ``slow``: the slow-call
    threshold (seconds; None: the layer's default)."""
    layer = MemcachedLayer("L2", address, timeout=timeout, connect_timeout=timeout)
    breaker = CircuitBreaker("L2", max_failures=max_failures, reset_timeout=5.0, clock=clock)
    return ResilientLayer(layer, breaker=breaker, timeout=slow)


class StateWatch:
    """Events set when a breaker enters each state."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.entered = {s: threading.Event() for s in CircuitState}
        self.transitions: list[tuple[CircuitState, CircuitState]] = []
        breaker.add_listener(self)

    def __call__(self, name: str, old: CircuitState, new: CircuitState) -> None:
        self.transitions.append((old, new))
        self.entered[new].set()


@pytest.fixture()
def proxy(memcached: MemcachedProcess) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", memcached.port)).start() as p:
        yield p
        assert p.errors == []


def test_memcached_killed_and_restarted_under_8_threads(own_memcached: MemcachedProcess) -> None:
    """Rows 1 and 2: kill memcached under load, then restart it."""
    clock = FakeClock()
    # A slow call (one that returns, but late) is a failure of the breaker that no
    # metric counts. On a starved machine a call that waited for the GIL can take
    # longer than the default threshold (0.25 s here): CI's 3.12 run once saw a
    # 0.283 s call open the breaker with one error counted. This test checks that
    # the metrics count the failures that opened it, so a call is never slow here.
    l2 = guarded(own_memcached.address, clock, slow=60.0)
    watch = StateWatch(l2.breaker)
    collector = MemoryCollector()
    chain = Chain([MemoryLayer("L1", maxsize=20), l2], metrics=collector)
    keys = [f"item:{i}" for i in range(200)]
    for i, key in enumerate(keys):
        l2.set(key, f"v{i}", 300)
    baseline_threads = threading.active_count()

    stop = threading.Event()
    progress = [threading.Semaphore(0) for _ in range(8)]
    errors: list[BaseException] = []
    wrong: list[tuple[str, Any]] = []

    def worker(n: int) -> None:
        i = n
        try:
            while not stop.is_set():
                i = (i * 31 + 7) % len(keys)
                value = chain.get_or_load(keys[i], lambda i=i: f"v{i}")
                if value != f"v{i}":
                    wrong.append((keys[i], value))
                progress[n].release()
        except BaseException as exc:
            errors.append(exc)

    def run_a_while() -> None:
        for sem in progress:
            for _ in range(200):
                assert sem.acquire(timeout=10), "a worker is stuck"

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        run_a_while()
        own_memcached.stop()
        assert watch.entered[CircuitState.OPEN].wait(10), "the breaker never opened"
        run_a_while()
        # Read once the failing calls have been counted (listeners hear of the opening
        # before the call that opened it returns); no call reaches L2 while it is open.
        l2_metrics = collector.snapshot().layer_metrics["L2"]
        failures_before_open = sum(l2_metrics.errors_by_type.values()) + l2_metrics.failed_writes
        assert threading.active_count() <= baseline_threads + 8 + 2, "threads piled up"
        rejected = collector.snapshot().layer_metrics["L2"].circuit_rejected
        assert rejected > 0
        own_memcached.start()
        clock.advance(5.0)  # the open period is over: the next call is a trial
        assert watch.entered[CircuitState.CLOSED].wait(10), "the breaker never closed"
        run_a_while()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        chain.close()
    assert errors == []
    assert wrong == []
    # 3 consecutive failures (reads, or writes of loaded values) open it. Calls already
    # in flight at the opening may fail too (8 callers besides: 7 readers, 1 writer),
    # and each of the 9 callers may have had one call in flight at the kill whose late
    # success reset the count after up to 2 failures.
    assert 3 <= failures_before_open <= 3 + 8 + 2 * 9, l2_metrics
    assert watch.transitions[:3] == [
        (CircuitState.CLOSED, CircuitState.OPEN),
        (CircuitState.OPEN, CircuitState.HALF_OPEN),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]


def test_black_hole_bounds_every_get_and_the_open_breaker_costs_no_io(
    proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    """Row 3: a server that accepts and never answers."""
    clock = FakeClock()
    l2 = guarded(proxy.address, clock, max_failures=5)
    watch = StateWatch(l2.breaker)
    l1 = MemoryLayer("L1")
    # The request path alone: coherence's poller does its own (bounded) I/O in the
    # background, which the byte counts below would include.
    chain = Chain([l1, l2], coherence=False)

    def loader() -> str:
        return "loaded"

    for i in range(10):
        l2.set(f"k{i}", i, 60)
    proxy.black_hole()
    latencies = []
    for i in range(10):
        start = time.perf_counter()
        assert chain.get_or_load(f"k{i}", loader) == "loaded"
        latencies.append(time.perf_counter() - start)
        l1.clear()
    assert watch.entered[CircuitState.OPEN].is_set()
    latencies.sort()
    worst = latencies[-1]
    assert worst <= TIMEOUT + 0.1, f"a get took {worst:.3f} s under a black hole"

    # The backfills queued by the loads above may still be in flight (a timeout each);
    # those that timed out went to the reaper, which sends their retraction and its
    # ``version`` on their own connections: bytes of those earlier calls, not of the
    # refused ones below. (flush() answers False: the repairs wait for the breaker.)
    chain.flush(4 * TIMEOUT)
    # flush() may return while a backfill is still in flight on a loaded machine: it
    # then times out during the loop below and its retraction (20 bytes: a delete and
    # a version) was counted there (failed on 3.12 under a loaded matrix). Wait for the
    # writer to have nothing in flight, then for the reaper to have sent everything.
    writer = chain.writers["L2"]
    deadline = time.monotonic() + 5.0
    while writer.stats().inflight and time.monotonic() < deadline:
        time.sleep(0.01)  # a write bounded by its own timeout: polled, bounded
    assert writer.stats().inflight == 0
    assert l2.layer._pool.reaper.wait_sent(5.0)  # type: ignore[attr-defined]
    # Sent is not yet counted: the proxy's pump thread reads those bytes when it gets
    # the GIL (a retraction's 20 bytes were counted inside the loop below on a loaded
    # 3.10 run). Nothing signals that a kernel buffer was drained, so wait until the
    # count holds still for 0.2 s (at most 5 s).
    before = proxy.stats()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        time.sleep(0.2)
        settled = proxy.stats()
        if settled.bytes_received == before.bytes_received:
            break
        before = settled
    open_costs = []
    for i in range(2000):
        start = time.perf_counter()
        chain.get_or_load(f"open{i}", loader)
        open_costs.append(time.perf_counter() - start)
    after = proxy.stats()
    assert after.connections == before.connections
    assert after.bytes_received == before.bytes_received

    baseline = Chain([MemoryLayer("L1")])
    base_costs = []
    for i in range(2000):
        start = time.perf_counter()
        baseline.get_or_load(f"open{i}", loader)
        base_costs.append(time.perf_counter() - start)
    chain.close()
    baseline.close()
    open_us = statistics.median(open_costs) * 1e6
    base_us = statistics.median(base_costs) * 1e6
    with capsys.disabled():
        print(
            f"\n[black hole] worst get {worst * 1000:.1f} ms (timeout {TIMEOUT * 1000:.0f} ms);"
            f" open breaker: miss+load {open_us:.1f} us vs L1-only chain {base_us:.1f} us"
        )
    assert open_us < 1000, "with the breaker open a miss must not touch the network"


def test_slow_trickle_counts_as_failures_and_opens_the_breaker(proxy: FaultProxy) -> None:
    """Row 5: every read comes within the timeout, but the whole reply would take far
    longer: the call is cut at its deadline (a miss), and counted as a failure."""
    clock = FakeClock()
    l2 = guarded(proxy.address, clock, max_failures=2)
    with Chain([MemoryLayer("L1"), l2], coherence=False) as chain:
        l2.set("k", "x" * 64, 60)
        proxy.trickle(8, 0.03)
        assert chain.get("k") is None  # one deadline for the whole call (issue 11)
        assert l2.breaker.stats().consecutive_failures == 1
        chain.layers[0].delete("k")  # type: ignore[attr-defined]
        chain.get("k")
        assert l2.breaker.state is CircuitState.OPEN


@pytest.mark.parametrize("fault", ["reset", "close_mid_reply"])
def test_a_broken_connection_is_a_miss_and_the_next_call_is_correct(
    proxy: FaultProxy, fault: str
) -> None:
    """Row 6: connection reset, or closed in the middle of a reply."""
    clock = FakeClock()
    # Each fault is immediate: a timeout of 1 s only keeps the seeding set from timing
    # out through the proxy on a loaded machine (it did at 0.1 s on 3.12 under load).
    l2 = guarded(proxy.address, clock, timeout=1.0)
    collector = MemoryCollector()
    with Chain([MemoryLayer("L1", maxsize=1), l2], metrics=collector, coherence=False) as chain:
        l2.set("k", "value", 60)
        if fault == "reset":
            proxy.reset()
        else:
            proxy.close_mid_reply(10)
        assert chain.get("k", "miss") == "miss"
        assert sum(collector.snapshot().layer_metrics["L2"].errors_by_type.values()) == 1
        proxy.pass_through()
        assert chain.get("k") == "value"
        assert l2.breaker.state is CircuitState.CLOSED


def test_a_connect_that_never_completes_is_bounded_by_the_connect_timeout() -> None:
    """Row 4: a listener whose accept queue is full."""
    with BacklogListener().start() as listener:
        clock = FakeClock()
        l2 = guarded(listener.address, clock)
        with Chain([MemoryLayer("L1"), l2]) as chain:
            start = time.perf_counter()
            assert chain.get("k", "dflt") == "dflt"
            elapsed = time.perf_counter() - start
    assert elapsed < TIMEOUT + 0.2


def test_writes_queued_for_a_dead_layer_fail_fast_and_are_counted(
    own_memcached: MemcachedProcess,
) -> None:
    """Row 19: a lower layer dies while write-behind sets are queued."""
    clock = FakeClock()
    l2 = guarded(own_memcached.address, clock, max_failures=2)
    collector = MemoryCollector()
    chain = Chain(
        [MemoryLayer("L1"), LayerConfig(layer=l2, write_behind=True)],
        metrics=collector,
        coherence=False,
    )
    own_memcached.stop()
    threads_before = threading.active_count()
    for i in range(300):
        chain.set(f"k{i}", i, 60)
    assert not chain.flush(10)  # memcached is gone: every key awaits a repair delete
    writer_stats = chain.writers["L2"].stats()
    assert writer_stats.depth == 0
    assert writer_stats.repairing == 300
    assert writer_stats.dropped_by_reason.get("circuit_open", 0) > 250
    assert writer_stats.failed <= 3
    assert threading.active_count() <= threads_before + 1
    snap = collector.snapshot().layer_metrics["L2"]
    assert (
        snap.dropped_by_reason.get("circuit_open", 0)
        == writer_stats.dropped_by_reason["circuit_open"]
    )
    assert chain.get("k299") == 299  # L1 still serves
    chain.close(timeout=1)


def test_close_drains_pending_writes_to_memcached_within_its_deadline(
    memcached: MemcachedProcess,
) -> None:
    """Row 20: close(timeout) with pending writes."""
    l2 = MemcachedLayer("L2", memcached.address)
    chain = Chain([MemoryLayer("L1"), LayerConfig(layer=l2, write_behind=True)], coherence=False)
    for i in range(1000):
        chain.set(f"k{i}", i, 60)
    start = time.monotonic()
    assert chain.close(timeout=10) == 0
    assert time.monotonic() - start < 10
    check = MemcachedLayer("check", memcached.address)
    assert check.get_many([f"k{i}" for i in range(1000)]) == {f"k{i}": i for i in range(1000)}
    check.close()


def test_a_collector_that_raises_changes_no_result(caplog: pytest.LogCaptureFixture) -> None:
    """Row 23: an exporter that raises is counted and logged once."""

    class Broken(MemoryCollector):
        def record_chain_get(self, hit: bool, layer_index: int, total_duration: float) -> None:
            raise RuntimeError("exporter down")

        def record_first_layer_hit(self, layer: str, duration: float) -> None:
            raise OSError("exporter down")

    with caplog.at_level(logging.WARNING):
        chain = Chain([MemoryLayer("L1"), MemoryLayer("L2")], metrics=Broken())
        chain.set("k", 1)
        for _ in range(5):
            assert chain.get("k") == 1
            assert chain.get("absent", 2) == 2
        assert chain._m is not None
        assert chain._m.failures == 10
        chain.close()
    assert len([r for r in caplog.records if "metrics collector" in r.getMessage()]) == 1


# -- row 3: one timeout per call, not one per round trip of the call ---------------------


def test_get_or_load_under_a_black_hole_asks_no_lease_after_its_read_failed(
    proxy: FaultProxy,
) -> None:
    """Found by review: a ``get_or_load`` miss read memcached (a timeout) and then asked
    it for the lease (a second timeout): 2x the timeout per call, 3x with the namespace.
    The lease is skipped once the layer's last call failed, and counted unavailable."""
    chain = Chain(
        [MemoryLayer("L1"), MemcachedLayer("L2", proxy.address, timeout=TIMEOUT)],
        coherence=False,
        metrics=MemoryCollector(),
    )
    shared: Any = chain._shared.layer
    asked: list[str] = []
    real = shared.lease

    def lease(key: str, ttl: float) -> Any:
        asked.append(key)
        return real(key, ttl)

    shared.lease = lease
    try:
        proxy.black_hole()
        assert chain.get_or_load("k", lambda: "loaded") == "loaded"
        assert asked == []
        snap: Any = chain.metrics_collector.snapshot()
        assert dict(snap.chain_metrics.leases_by_outcome) == {"unavailable": 1}
    finally:
        chain.close(0.5)


class _ArrivalLock:
    """A lock that sets ``waiting`` when a second caller starts to wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting = threading.Event()

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            self.waiting.set()
            self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_callers_waiting_for_a_generation_fetch_that_fails_take_its_answer() -> None:
    """Found by review: a caller that waited for another thread's fetch of the
    namespace generation (memcached unreachable) fetched again once it failed: 2x the
    timeout per call."""
    from cachechain._namespace import Namespace
    from tests.support.fakes import FakeLayer

    entered, release = threading.Event(), threading.Event()
    fetches: list[int] = []

    class Unreachable(FakeLayer):
        def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
            raise AssertionError("a fetch that failed creates nothing")

        def incr(self, key: str, delta: int = 1) -> int | None:
            raise AssertionError("not moved")

        def decr(self, key: str, delta: int = 1) -> int | None:
            raise AssertionError("not moved")

        def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
            fetches.append(1)
            entered.set()
            assert release.wait(10)
            raise LayerUnavailableError("timed out", layer="L2")

    ns = Namespace(Unreachable("L2"))
    ns._lock = arrival = _ArrivalLock()  # type: ignore[assignment]
    errors: list[BaseException] = []

    def current() -> None:
        try:
            ns.current()
        except LayerUnavailableError as exc:
            errors.append(exc)

    first = threading.Thread(target=current)
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=current)
    second.start()
    assert arrival.waiting.wait(10)  # the second caller waits for the first's fetch
    release.set()
    first.join(10)
    second.join(10)
    assert len(errors) == 2 and fetches == [1]  # one fetch, one timeout, both told
    release.clear()
    entered.clear()
    threading.Thread(target=release.set).start()
    with pytest.raises(LayerUnavailableError):
        ns.current()  # a later call fetches again
    assert fetches == [1, 1]
    # What is kept of a failure is its text: an exception would keep its traceback's
    # frames, and with them the callers' objects, alive (found by review).
    assert isinstance(ns._failed, str) and "timed out" in ns._failed


def test_a_fetch_interrupted_by_a_base_exception_tells_the_waiters_nothing_stale() -> None:
    """Found by review: an interrupted fetch (a gevent timeout, a KeyboardInterrupt)
    counted as ended while the last failure stayed recorded, so a caller that waited
    for it raised an older failure instead of fetching."""
    from cachechain._namespace import Namespace
    from tests.support.fakes import FakeLayer

    outcomes: list[BaseException | None] = [
        LayerUnavailableError("timed out", layer="L2"),
        KeyboardInterrupt(),
        None,
    ]

    class Flaky(FakeLayer):
        def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
            return True

        def incr(self, key: str, delta: int = 1) -> int | None:
            raise AssertionError("not moved")

        def decr(self, key: str, delta: int = 1) -> int | None:
            raise AssertionError("not moved")

        def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
            outcome = outcomes.pop(0)
            if outcome is not None:
                raise outcome
            return 7, None

    ns = Namespace(Flaky("L2"))
    with pytest.raises(LayerUnavailableError):
        ns.current()
    fetches = ns._fetches
    with pytest.raises(KeyboardInterrupt):
        ns.current()
    assert ns._fetches == fetches  # not an ended fetch: nobody takes its answer
    assert ns.current() == "7/" and ns._failed is None
