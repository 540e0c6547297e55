"""Issue 13, "keep it cheap": a collector that counts first-layer hits itself
(:class:`~cachechain.metrics.HitSampler`) has one hit in ``sample_hits`` timed. Hit
counts stay exact; the latency histograms count each sample for the hits since the
one before it, never more hits than were counted; misses and failures are timed as
before; a collector that cannot sample, or fails to, gets every hit timed."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cachechain import Chain, MemoryCollector, MemoryLayer, PrometheusCollector
from cachechain import _chain as chain_module
from cachechain.metrics import HitSampler, MetricsCollector
from tests.support.fakes import FakeLayer

L1 = {"chain": "default", "layer": "L1"}
GET_L1 = {**L1, "operation": "get"}
HIT = {"chain": "default", "result": "hit"}


class CountingClock:
    """``perf_counter`` for the chain: counts its reads, each one 1 us after the last."""

    def __init__(self) -> None:
        self.reads = 0
        self.now = 1000.0

    def __call__(self) -> float:
        self.reads += 1
        self.now += 1e-6
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> CountingClock:
    fake = CountingClock()
    monkeypatch.setattr(chain_module, "_perf", fake)
    return fake


def prometheus_chain(every: int, **kw: Any) -> tuple[Chain, Any]:
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry, sample_hits=every)
    chain = Chain([MemoryLayer("L1"), *kw.get("below", [])], metrics=collector, coherence=False)
    return chain, registry.get_sample_value


def expected_sampled(hits: int, every: int) -> int:
    """The hits the samples stand for after ``hits`` hits of one thread: a hit whose
    count (from 0) is a multiple of ``every`` makes the next one timed, and that one
    stands for every hit up to itself."""
    sampled = 0
    timed_next = False
    for n in range(hits):
        if timed_next:
            sampled, timed_next = n + 1, False
        elif n % every == 0:
            timed_next = True
    return sampled


def test_one_hit_in_every_reads_the_clock_and_every_hit_is_counted(
    clock: CountingClock,
) -> None:
    chain, get = prometheus_chain(8)
    chain.set("k", 1)
    reads = clock.reads
    for _ in range(800):
        assert chain.get("k") == 1
    # 1 untimed hit asks for a sample, the next is timed (2 reads), 7 more untimed...
    assert clock.reads - reads == 2 * 100
    assert get("cache_chain_hits_total", L1) == 800
    assert get("cache_chain_requests_total", {**HIT, "served_by": "L1"}) == 800
    chain.close()


@pytest.mark.parametrize("hits", [0, 1, 2, 3, 9, 10, 11, 64, 100])
def test_the_latency_counts_are_the_hits_up_to_the_last_sample(
    clock: CountingClock, hits: int
) -> None:
    chain, get = prometheus_chain(4)
    chain.set("k", 1)
    for _ in range(hits):
        chain.get("k")
    sampled = expected_sampled(hits, 4)
    assert get("cache_chain_hits_total", L1) == hits
    assert get("cache_chain_request_duration_seconds_count", HIT) == sampled
    assert get("cache_chain_operation_duration_seconds_count", GET_L1) == sampled
    bucket = get("cache_chain_operation_duration_seconds_bucket", {**GET_L1, "le": "+Inf"})
    assert bucket == sampled
    # Each timed hit took 1 us on the fake clock and stands for its weight in hits.
    total = get("cache_chain_request_duration_seconds_sum", HIT)
    assert total == pytest.approx(sampled * 1e-6)
    chain.close()


def test_the_samples_never_stand_for_more_hits_than_sixteen_threads_counted() -> None:
    chain, get = prometheus_chain(16)
    chain.set("k", 1)
    threads, n = 16, 2000
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for _ in range(n):
            chain.get("k")

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    total = threads * n
    assert get("cache_chain_hits_total", L1) == total
    count = get("cache_chain_request_duration_seconds_count", HIT)
    assert total - 16 - threads < count <= total
    chain.close()


def test_a_miss_is_read_again_under_the_clock(clock: CountingClock) -> None:
    l1, below = FakeLayer("L1", local=True), FakeLayer("L2", local=True)
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry, sample_hits=8)
    chain = Chain([l1, below], metrics=collector, coherence=False)
    get = registry.get_sample_value
    below.data["k"] = (1, None)
    assert chain.get("k") == 1  # L1 misses: read twice, the second time timed
    assert l1.ops("get") == ["k", "k"]
    assert below.ops("get") == ["k"]
    assert get("cache_chain_misses_total", L1) == 1
    assert get("cache_chain_hits_total", L1) == 0
    assert get("cache_chain_operation_duration_seconds_count", GET_L1) == 1  # the miss
    served = get("cache_chain_requests_total", {**HIT, "served_by": "L2"})
    assert served == 1
    assert get("cache_chain_request_duration_seconds_count", HIT) == 1
    chain.close()


@pytest.mark.parametrize(("sample_hits", "reads", "timed"), [(None, 2, 2), (1, 20, 10)])
def test_memory_collector_samples_unless_told_to_time_every_hit(
    clock: CountingClock, sample_hits: int | None, reads: int, timed: int
) -> None:
    collector = MemoryCollector() if sample_hits is None else MemoryCollector(sample_hits=1)
    chain = Chain([MemoryLayer("L1")], metrics=collector, coherence=False)
    chain.set("k", 1)
    before = clock.reads
    for _ in range(10):
        chain.get("k")
    assert clock.reads - before == reads  # sampled: the 2nd hit only (asked by the 1st)
    snap = collector.snapshot()
    assert snap.layer_metrics["L1"].hits == 10
    assert snap.chain_metrics.latency.count == timed  # the hits up to the last sample
    chain.close()


def test_reset_starts_the_hits_and_the_samples_from_zero(clock: CountingClock) -> None:
    collector = MemoryCollector(sample_hits=4)
    chain = Chain([MemoryLayer("L1")], metrics=collector, coherence=False)
    chain.set("k", 1)
    for _ in range(7):
        chain.get("k")
    collector.reset()
    for _ in range(10):
        chain.get("k")
    snap = collector.snapshot()
    assert snap.layer_metrics["L1"].hits == 10
    assert snap.chain_metrics.total_hits == 10
    # The hit timed before the reset (the 8th, asked for by the 5th) came after it:
    # every sample after the reset stands for hits after it only.
    assert 0 < snap.chain_metrics.latency.count <= 10
    chain.close()


def test_a_remote_first_layer_is_timed_on_every_hit(clock: CountingClock) -> None:
    remote = FakeLayer("L1", local=False)
    collector = PrometheusCollector(registry=CollectorRegistry(), sample_hits=8)
    chain = Chain([remote], metrics=collector, coherence=False)
    chain.set("k", 1)
    reads = clock.reads
    for _ in range(8):
        assert chain.get("k") == 1
    assert clock.reads - reads == 16
    assert remote.ops("get") == ["k"] * 8  # never read twice
    chain.close()


def test_an_engine_whose_subclass_wants_every_hit_gets_every_hit() -> None:
    seen: list[float] = []

    class Mine(PrometheusCollector):
        def record_first_layer_hit(self, layer: str, duration: float) -> None:
            seen.append(duration)

    collector = Mine(registry=CollectorRegistry(), sample_hits=8)
    chain = Chain([MemoryLayer("L1")], metrics=collector, coherence=False)
    chain.set("k", 1)
    for _ in range(20):
        chain.get("k")
    assert len(seen) == 20
    chain.close()


class Offering(MetricsCollector):
    """A duck collector that offers a sampler of its own making."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.hits: list[float] = []

    def hit_sampler(self, layer: str) -> Any:
        if isinstance(self.sampler, Exception):
            raise self.sampler
        return self.sampler

    def record_first_layer_hit(self, layer: str, duration: float) -> None:
        self.hits.append(duration)


@pytest.mark.parametrize(
    "offer",
    [
        RuntimeError("no sampler today"),
        "not a sampler",
        HitSampler(itertools.count().__next__, 1, lambda d, n: None),
        HitSampler(itertools.count().__next__, True, lambda d, n: None),  # type: ignore[arg-type]
    ],
)
def test_a_sampler_that_fails_or_is_wrong_means_every_hit_is_timed(offer: Any) -> None:
    collector = Offering(offer)
    chain = Chain([MemoryLayer("L1")], metrics=collector, coherence=False)
    chain.set("k", 1)
    for _ in range(5):
        chain.get("k")
    assert len(collector.hits) == 5
    chain.close()


def test_a_counting_function_that_raises_never_reaches_the_caller() -> None:
    calls: list[int] = []

    def count() -> int:
        calls.append(1)
        if len(calls) % 3 == 0:
            raise RuntimeError("count broke")
        return len(calls) - 1

    samples: list[tuple[float, int]] = []
    collector = Offering(HitSampler(count, 2, lambda d, n: samples.append((d, n))))
    chain = Chain([MemoryLayer("L1")], metrics=collector, coherence=False)
    chain.set("k", 1)
    for _ in range(12):
        assert chain.get("k") == 1
    assert len(calls) == 12  # every hit counted through the guard
    assert chain._m is not None and chain._m.failures == 4
    assert samples and all(d >= 0 for d, _ in samples)
    chain.close()


def test_a_timed_function_that_raises_is_counted_not_raised() -> None:
    def timed(duration: float, n: int) -> None:
        raise RuntimeError("timed broke")

    collector = Offering(HitSampler(itertools.count().__next__, 2, timed))
    chain = Chain([MemoryLayer("L1")], metrics=collector, coherence=False)
    chain.set("k", 1)
    for _ in range(6):
        assert chain.get("k") == 1
    assert chain._m is not None and chain._m.failures >= 2
    chain.close()


def test_sample_hits_is_checked() -> None:
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="sample_hits"):
            MemoryCollector(sample_hits=bad)  # type: ignore[arg-type]


def test_a_failed_first_layer_read_is_counted_and_the_layers_below_are_timed() -> None:
    l1, below = FakeLayer("L1", local=True), FakeLayer("L2", local=True)
    registry = CollectorRegistry()
    chain = Chain(
        [l1, below],
        metrics=PrometheusCollector(registry=registry, sample_hits=8),
        coherence=False,
    )
    get = registry.get_sample_value
    below.data["k"] = (1, None)
    l1.fail = RuntimeError("L1 is broken")
    assert chain.get("k") == 1
    assert l1.ops("get") == ["k"]  # a failed read is not read again
    errors = {**L1, "operation": "get", "error_type": "other"}
    assert get("cache_chain_errors_total", errors) == 1
    assert get("cache_chain_misses_total", L1) == 0
    assert get("cache_chain_request_duration_seconds_count", HIT) == 1
    chain.close()


def test_a_closed_chain_raises_on_the_untimed_path() -> None:
    from cachechain import ChainClosedError

    chain, _ = prometheus_chain(8)
    chain.set("k", 1)
    assert chain._untimed is not None
    chain.close()
    with pytest.raises(ChainClosedError):
        chain.get("k")


class ResetOnRelease:
    """An engine's lock that, once armed, lets another caller ``reset()`` the engine
    right after its next release (what another thread may do at that instant)."""

    def __init__(self, engine: Any) -> None:
        self.real = threading.Lock()
        self.engine = engine
        self.armed = False

    def __enter__(self) -> ResetOnRelease:
        self.real.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.release()
        if self.armed:
            self.armed = False
            self.engine.reset()

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        return self.real.acquire(*args, **kwargs)

    def release(self) -> None:
        self.real.release()


def test_a_reset_beside_a_sample_never_leaves_more_latency_counts_than_hits() -> None:
    """Found by review: the sample's weight was taken under the lock and observed after
    it, so a reset in between kept up to ``every`` hits of before it in the histograms."""
    collector = MemoryCollector(sample_hits=4)
    chain = Chain([MemoryLayer("L1")], metrics=collector, coherence=False)
    chain.set("k", 1)
    for _ in range(10):
        chain.get("k")
    lock = ResetOnRelease(collector)
    collector._lock = lock  # type: ignore[assignment]
    while chain._untimed is not None:  # up to the hit that will be timed
        chain.get("k")
    lock.armed = True
    chain.get("k")  # the timed hit: its weight, the reset, its observation
    assert not lock.armed
    snap = collector.snapshot()
    layer = snap.layer_metrics["L1"]
    assert layer.get_latency.count <= layer.hits
    assert snap.chain_metrics.latency.count <= snap.chain_metrics.total_hits
    chain.close()


def test_prometheus_names_a_bad_sample_hits() -> None:
    from cachechain import ConfigError

    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match=r"^sample_hits must be"):
            PrometheusCollector(registry=None, sample_hits=bad)  # type: ignore[arg-type]
