"""MemoryCollector and the accumulating engine: what is recorded, isolation, exact
counts under threads, bounded memory, refresh hooks, reset and fork."""

from __future__ import annotations

import gc
import json
import logging
import os
import threading

import pytest

from cachechain import (
    Chain,
    ChainConfig,
    CircuitBreaker,
    LayerUnavailableError,
    MemoryLayer,
)
from cachechain._errors import LayerTimeoutError
from cachechain._resilience import ResilientLayer
from cachechain.metrics._memory import (
    MAX_LAYERS,
    AccumulatingCollector,
    ChainView,
    Hist,
    MemoryCollector,
)
from cachechain.metrics._types import (
    BUCKET_BOUNDS,
    ChainMetrics,
    LatencyHistogram,
    LatencyStats,
)
from tests.support.fakes import FakeClock, FakeLayer


def test_seed_chain_metrics_collection() -> None:
    """The seed's integration test, as written there."""
    collector = MemoryCollector()
    l1, l2 = MemoryLayer(name="L1"), MemoryLayer(name="L2")
    l2.set("key", "value", 60)
    chain = Chain.from_config(ChainConfig(layers=[l1, l2], metrics_collector=collector))
    chain.get("key")
    snap = collector.snapshot()
    assert snap.layer_metrics["L1"].misses == 1
    assert snap.layer_metrics["L2"].hits == 1
    assert snap.chain_metrics.total_hits == 1
    chain.close()


def test_every_chain_operation_is_recorded() -> None:
    collector = MemoryCollector(sample_hits=1)  # every hit timed: exact latency counts
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2", local=True)
    with Chain([l1, l2], metrics=collector) as chain:
        assert chain.set("a", 1)  # L2 then L1, synchronously
        assert chain.get("a") == 1  # L1 hit
        l2.data["b"] = ("B", None)
        assert chain.get("b") == "B"  # L1 miss, L2 hit, backfilled into L1
        assert chain.get("zz") is None  # missed everywhere
        assert chain.delete("a")
        assert chain.get_many(["b", "c"]) == {"b": "B"}  # L1: b hit, c miss; L2: c miss
        assert chain.set_many({"x": 1, "y": 2})
        assert chain.delete_many(["x", "y"])
        assert chain.get_or_load("loaded", lambda: 42) == 42
        l2.fail = LayerUnavailableError("down", layer="L2")
        assert chain.get("q") is None  # L2 failed: an error, not a miss
        assert chain.set("s", 1) is False
        l2.fail = LayerTimeoutError("slow", layer="L2")
        assert chain.get_many(["r"]) == {}

    snap = collector.snapshot()
    m1, m2 = snap.layer_metrics["L1"], snap.layer_metrics["L2"]
    # L1 gets: a hit, b miss, zz miss, many(b hit, c miss), loaded miss, q miss, r miss.
    assert (m1.hits, m1.misses) == (2, 6)
    assert (m2.hits, m2.misses) == (1, 3)  # b hit; zz, c, loaded missed; q, r failed
    assert m1.sets == 5  # a, b (backfill), x/y (one set_many), loaded, s
    assert m2.sets == 3  # a, set_many, loaded (backfill through the writer is async)
    assert (m1.deletes, m2.deletes) == (2, 2)
    assert m2.errors_by_type == {"connection": 2, "timeout": 1}
    assert m2.errors == 3 and m1.errors == 0
    assert m1.get_latency.count == 8 and m2.get_latency.count == 4
    assert m1.set_latency.count == 5
    ch = snap.chain_metrics
    assert (ch.total_hits, ch.total_misses) == (3, 5)  # a, b, many b / zz, c, loaded, q, r
    assert ch.hits_by_layer == {0: 2, 1: 1}
    assert ch.loads == 1 and ch.load_failures == 0
    assert ch.latency.count == 8 and ch.load_latency.count == 1
    assert ch.hit_ratio == pytest.approx(3 / 8)
    assert m2.queue_capacity == 1000  # reported when the chain was built


def test_breaker_transitions_and_rejections_are_recorded() -> None:
    clock = FakeClock()
    fake = FakeLayer("L2")
    breaker = CircuitBreaker("L2", max_failures=2, reset_timeout=10, clock=clock)
    collector = MemoryCollector()
    chain2 = Chain(
        [MemoryLayer("L1"), ResilientLayer(fake, breaker=breaker)],
        metrics=collector,
    )
    fake.fail = LayerUnavailableError("down", layer="L2")
    for key in ("a", "b"):  # two failures open the breaker
        assert chain2.get(key) is None
    m2 = collector.snapshot().layer_metrics["L2"]
    assert (m2.circuit_state, m2.circuit_opens, m2.errors) == (1, 1, 2)
    for key in ("c", "d", "e"):
        assert chain2.get(key) is None
    assert collector.snapshot().layer_metrics["L2"].circuit_rejected == 3
    fake.fail = None
    clock.advance(11)
    assert chain2.get("f") is None  # a trial call that succeeds closes it again
    m2 = collector.snapshot().layer_metrics["L2"]
    assert (m2.circuit_state, m2.circuit_opens, m2.circuit_rejected) == (0, 1, 3)
    transitions = next(d for d in collector.read() if d.bound).transitions
    assert transitions == {("L2", 1): 1, ("L2", 2): 1, ("L2", 0): 1}
    chain2.close()


def test_writer_events_reported_to_a_bound_view() -> None:
    """What the chain's async-writer observer sends, through the chain's view."""
    collector = MemoryCollector()
    view = collector.bind_chain("web", ("L1", "L2"))
    view.record_queue_capacity("L2", 100)
    view.record_queue_depth("L2", 7)
    view.record_queue_depth("L2", 3)
    for reason in ("queue_full", "queue_full", "circuit_open", "closed", "strange"):
        view.record_write_dropped("L2", reason)
    view.record_async_write("L2", True, 0.002)
    view.record_async_write("L2", False, 0.3)
    view.record_evictions("L1", 4)
    view.record_evictions("L1", 0)
    view.record_evictions("L1", -2)  # a counter never goes back
    view.record_entries("L1", 10)
    view.record_singleflight_shared()
    view.record_load(False, 0.01)
    view.record_circuit_rejected("L2")
    view.record_error("L2", "frobnicate", "weird")
    snap = collector.snapshot()
    m1, m2 = snap.layer_metrics["L1"], snap.layer_metrics["L2"]
    assert (m2.queue_capacity, m2.queue_depth) == (100, 3)
    assert m2.dropped_by_reason == {"queue_full": 2, "circuit_open": 1, "closed": 1, "other": 1}
    assert m2.dropped_writes == 5
    assert (m2.async_writes, m2.failed_writes) == (2, 1)
    assert (m1.evictions, m1.entries) == (4, 10)
    assert m2.circuit_rejected == 1
    assert m2.errors_by_type == {"other": 1}
    ch = snap.chain_metrics
    assert (ch.singleflight_shared, ch.loads, ch.load_failures) == (1, 1, 1)


def test_per_layer_metrics_are_isolated() -> None:
    collector = MemoryCollector()
    view = collector.bind_chain("c", ("L1", "L2", "L3"))
    for _ in range(5):
        view.record_get("L2", True, 0.001)
    view.record_set("L3", True, 0.002)
    view.record_delete("L1", False, 0.003)
    snap = collector.snapshot().layer_metrics
    assert list(snap) == ["L1", "L2", "L3"]
    assert (snap["L1"].hits, snap["L1"].misses, snap["L1"].deletes) == (0, 0, 1)
    assert (snap["L2"].hits, snap["L2"].sets, snap["L2"].deletes) == (5, 0, 0)
    assert (snap["L3"].hits, snap["L3"].sets) == (0, 1)
    assert snap["L1"].get_latency == LatencyStats()


def test_layers_of_the_same_name_in_two_chains_add_up() -> None:
    collector = MemoryCollector()
    a = Chain([MemoryLayer("L1"), MemoryLayer("L2")], name="a", metrics=collector)
    b = Chain([MemoryLayer("L1"), MemoryLayer("X")], name="b", metrics=collector)
    a.set("k", 1)
    b.set("k", 1)
    for chain in (a, b):
        assert chain.get("k") == 1
        assert chain.get("nope") is None
    snap = collector.snapshot()
    assert list(snap.layer_metrics) == ["L1", "L2", "X"]
    assert snap.layer_metrics["L1"].hits == 2 and snap.layer_metrics["L1"].misses == 2
    assert snap.layer_metrics["X"].misses == 1 and snap.layer_metrics["L2"].misses == 1
    assert snap.chain_metrics.total_hits == 2 and snap.chain_metrics.total_misses == 2
    a.close()
    b.close()


def test_direct_calls_record_for_the_default_chain() -> None:
    """The collector itself takes the seed's calls (no chain bound)."""
    collector = MemoryCollector()
    collector.record_get("L1", False, 0.001)
    collector.record_get("L2", True, 0.004)
    collector.record_set("L2", True, 0.001)
    collector.record_delete("L2", True, 0.001)
    collector.record_chain_get(True, 1, 0.005)
    collector.record_chain_get(True, 12, 0.005)  # a position past the slots
    collector.record_chain_get(False, -1, 0.005)
    collector.record_first_layer_hit("L1", 0.000002)  # no first layer known: both counts
    collector.record_error("L2", "get", "timeout")
    collector.record_circuit_state("L2", 1)
    collector.record_circuit_state("L2", 1)  # not a transition
    collector.record_circuit_state("L2", 9)  # not a state: ignored
    collector.record_circuit_rejected("L2")
    collector.record_queue_depth("L2", 2)
    collector.record_queue_capacity("L2", 8)
    collector.record_write_dropped("L2")
    collector.record_async_write("L2", True, 0.001)
    collector.record_load(True, 0.02)
    collector.record_singleflight_shared()
    collector.record_evictions("L1", 3)
    collector.record_entries("L1", 5)
    snap = collector.snapshot()
    m1, m2 = snap.layer_metrics["L1"], snap.layer_metrics["L2"]
    assert (m1.hits, m1.misses, m1.evictions, m1.entries) == (1, 1, 3, 5)
    assert (m2.hits, m2.sets, m2.deletes, m2.errors) == (1, 1, 1, 1)
    assert (m2.circuit_state, m2.circuit_opens, m2.circuit_rejected) == (1, 1, 1)
    assert (m2.queue_depth, m2.queue_capacity, m2.dropped_by_reason) == (2, 8, {"queue_full": 1})
    ch = snap.chain_metrics
    assert ch.hits_by_layer == {0: 1, 1: 1, 8: 1}
    assert (ch.total_hits, ch.total_misses, ch.loads, ch.singleflight_shared) == (3, 1, 1, 1)


def test_counts_are_exact_under_eight_concurrent_threads() -> None:
    collector = MemoryCollector(sample_hits=1)  # every hit timed: exact latency counts
    chain = Chain([MemoryLayer("L1"), MemoryLayer("L2")], metrics=collector)
    chain.set("hot", 1)
    view = collector.bind_chain("default", ("L1", "L2"))
    threads, n = 8, 3000
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            for i in range(n):
                assert chain.get("hot") == 1  # an L1 hit: the fused path
                assert chain.get("cold") is None  # a miss in both layers
                view.record_error("L2", "get", "timeout")
                if i % 3 == 0:
                    collector.record_get("other", True, 0.001)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    snap = collector.snapshot()
    m1, m2 = snap.layer_metrics["L1"], snap.layer_metrics["L2"]
    total = threads * n
    assert (m1.hits, m1.misses) == (total, total)
    assert (m2.hits, m2.misses) == (0, total)
    assert m2.errors_by_type == {"timeout": total}
    assert m1.get_latency.count == 2 * total
    assert snap.layer_metrics["other"].hits == threads * len(range(0, n, 3))
    ch = snap.chain_metrics
    assert (ch.total_hits, ch.total_misses, ch.latency.count) == (total, total, 2 * total)
    chain.close()


def test_ended_threads_are_folded_in_so_memory_follows_live_threads() -> None:
    collector = MemoryCollector()
    view = collector.bind_chain("c", ("L1",))
    for _ in range(40):  # one thread at a time, each recording then ending
        t = threading.Thread(target=lambda: view.record_first_layer_hit("L1", 1e-6))
        t.start()
        t.join()
    assert collector.live_threads() <= 1  # the last one, until the next read
    assert collector.snapshot().layer_metrics["L1"].hits == 40
    assert collector.live_threads() == 0
    view.record_get("L1", False, 0.001)
    assert collector.live_threads() == 1  # this thread, until it ends


def test_distinct_keys_add_no_memory() -> None:
    collector = MemoryCollector()
    chain = Chain([MemoryLayer("L1", maxsize=100), MemoryLayer("L2")], metrics=collector)
    chain.set("warm", 1)
    chain.get("warm")
    chain.get("cold")
    view = collector.bind_chain("default", ("L1", "L2"))
    assert isinstance(view, ChainView)
    before = (view.size, len(collector.snapshot().layer_metrics), len(view.accs))
    for i in range(10_000):
        chain.set(f"key:{i}", i)
        chain.get(f"key:{i}")
        chain.get(f"absent:{i}")
    after = (view.size, len(collector.snapshot().layer_metrics), len(view.accs))
    assert before == after
    chain.close()


def test_latency_statistics() -> None:
    collector = MemoryCollector()
    view = collector.bind_chain("c", ("L1",))
    for _ in range(98):
        view.record_get("L1", True, 0.000_010)
    view.record_get("L1", True, 0.002)
    view.record_get("L1", True, 0.5)
    stats = collector.snapshot().layer_metrics["L1"].get_latency
    assert stats.count == 100
    assert 0.000_010 <= stats.p50 < 0.000_0116  # the bucket's upper bound, within 16%
    assert 0.002 <= stats.p99 < 0.0024
    assert stats.max == 0.5


def test_first_layer_hits_count_as_a_layer_hit_and_a_chain_hit() -> None:
    collector = MemoryCollector()
    view = collector.bind_chain("c", ("L1", "L2"))
    view.record_first_layer_hit("L1", 0.000_003)
    view.record_first_layer_hit("L1", 0.000_000_5)  # below the first bucket
    view.record_first_layer_hit("L2", 0.000_004)  # not the first layer: recorded as asked
    snap = collector.snapshot()
    assert snap.layer_metrics["L1"].hits == 2 and snap.layer_metrics["L2"].hits == 1
    assert snap.layer_metrics["L1"].get_latency.max == 0.000_003
    assert snap.chain_metrics.hits_by_layer == {0: 3}  # as reported: position 0
    assert snap.chain_metrics.latency.count == 3


def test_reset_starts_every_figure_again() -> None:
    collector = MemoryCollector()
    chain = Chain([MemoryLayer("L1"), MemoryLayer("L2")], metrics=collector)
    chain.set("k", 1)
    chain.get("k")
    chain.get("x")
    collector.record_queue_depth("L2", 4)
    collector.reset()
    snap = collector.snapshot()
    assert snap.layer_metrics["L1"].hits == 0 and snap.layer_metrics["L1"].get_latency.max == 0
    assert snap.layer_metrics["L2"].queue_depth == 0
    assert snap.chain_metrics == ChainMetrics()
    chain.get("k")
    snap = collector.snapshot()
    assert snap.layer_metrics["L1"].hits == 1 and snap.chain_metrics.total_hits == 1
    chain.close()


def test_binding_again_reuses_the_view() -> None:
    collector = MemoryCollector()
    first = collector.bind_chain("c", ["L1", "L2"])
    assert collector.bind_chain("c", ("L1", "L2")) is first
    assert first.bind_chain("c", ("L1", "L2")) is first
    assert first.bind_chain("d", ("L1",)) is not first
    assert "ChainView 'c'" in repr(first)
    for _ in range(50):
        Chain([MemoryLayer("L1"), MemoryLayer("L2")], name="c", metrics=collector).close()
    assert len(collector.read()) == 3  # default, c, d


def test_layer_names_past_the_limit_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    collector = MemoryCollector()
    view = collector.bind_chain("c", ())
    with caplog.at_level(logging.WARNING, "cachechain.metrics"):
        for i in range(MAX_LAYERS + 5):
            view.record_get(f"L{i}", True, 0.001)
            view.record_set(f"L{i}", True, 0.001)
            view.record_queue_depth(f"L{i}", 1)
    snap = collector.snapshot()
    assert len(snap.layer_metrics) == MAX_LAYERS
    assert sum(m.hits for m in snap.layer_metrics.values()) == MAX_LAYERS
    assert len([r for r in caplog.records if "more than" in r.getMessage()]) == 1


def test_a_subclass_override_is_what_the_chain_calls() -> None:
    class Counting(MemoryCollector):
        def __init__(self) -> None:
            super().__init__()
            self.gets: list[tuple[str, bool]] = []

        def record_get(self, layer: str, hit: bool, duration: float) -> None:
            self.gets.append((layer, hit))
            super().record_get(layer, hit, duration)

    collector = Counting()
    with Chain([MemoryLayer("L1"), MemoryLayer("L2")], metrics=collector) as chain:
        chain.set("k", 1)
        chain.get("k")
        chain.get("x")
    assert collector.gets == [("L1", True), ("L1", False), ("L2", False)]
    snap = collector.snapshot()
    assert snap.layer_metrics["L1"].hits == 1 and snap.chain_metrics.total_hits == 1


def test_refresh_hooks_run_before_each_read(caplog: pytest.LogCaptureFixture) -> None:
    collector = MemoryCollector()
    layer = MemoryLayer("L1", maxsize=2)
    view = collector.bind_chain("c", ("L1",))
    calls: list[int] = []

    class Owner:
        def refresh(self) -> None:
            calls.append(1)
            stats = layer.stats()
            view.record_entries("L1", stats.entries)

    owner = Owner()
    view.add_refresh_hook(owner.refresh)

    def broken() -> None:
        raise RuntimeError("hook down")

    collector.add_refresh_hook(broken)
    once: list[int] = []

    def done() -> bool:
        once.append(1)
        return False  # dropped after this call

    collector.add_refresh_hook(done)
    for key in "abc":
        layer.set(key, 1, 60)
    with caplog.at_level(logging.WARNING, "cachechain.metrics"):
        assert collector.snapshot().layer_metrics["L1"].entries == 2
        collector.snapshot()
    assert len(calls) == 2 and len(once) == 1
    assert len([r for r in caplog.records if "refresh hook" in r.getMessage()]) == 1
    del owner
    gc.collect()
    collector.snapshot()  # the bound method went with its object
    assert len(calls) == 2


def test_bounds_are_checked() -> None:
    for bad in ([], [0.1, 0.1], [0.2, 0.1], [-1.0, 1.0], [float("nan")]):
        with pytest.raises(ValueError):
            AccumulatingCollector(bad, track_max=False, track_sum=True)
    engine = AccumulatingCollector([0.1, 1.0, float("inf")], track_max=True, track_sum=True)
    assert engine.bounds == (0.1, 1.0)
    view = engine.bind_chain("c", ("L1",))
    view.record_first_layer_hit("L1", 0.5)
    view.record_first_layer_hit("L1", 5.0)
    data = engine.read()[1]
    get = data.hist("operation_duration_seconds", "L1", operation="get")
    assert get == Hist([0, 1, 1], 5.5, 5.0)
    assert get.count == 2


def test_latency_histogram_from_counts() -> None:
    hist = LatencyHistogram.from_counts([0] * len(BUCKET_BOUNDS) + [2], 20.0, 12.0)
    assert hist.stats() == LatencyStats(p50=12.0, p95=12.0, p99=12.0, max=12.0, count=2)
    with pytest.raises(ValueError, match="bucket counts"):
        LatencyHistogram.from_counts([1, 2], 1.0, 1.0)
    own = LatencyHistogram()
    own.add(0.001)
    own.add(0.003)
    assert own.stats().count == 2 and own.quantile(0.5) == pytest.approx(0.001, rel=0.16)
    assert LatencyHistogram().quantile(0.5) == 0.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_from_zero() -> None:
    collector = MemoryCollector()
    view = collector.bind_chain("c", ("L1",))
    for _ in range(5):
        view.record_first_layer_hit("L1", 1e-6)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            view.record_first_layer_hit("L1", 1e-6)
            snap = collector.snapshot()
            os.write(write_end, json.dumps(snap.layer_metrics["L1"].hits).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        child_hits = json.loads(f.read())
    os.waitpid(pid, 0)
    assert child_hits == 1
    assert collector.snapshot().layer_metrics["L1"].hits == 5


def test_values_held_per_thread_are_exact_when_read_while_recording() -> None:
    """A reader racing writers never sees a count go backwards, and the final read is
    exact."""
    collector = MemoryCollector()
    view = collector.bind_chain("c", ("L1",))
    stop = threading.Event()
    started = threading.Barrier(5)
    seen: list[int] = []

    def writer() -> None:
        started.wait()
        for _ in range(20_000):
            view.record_first_layer_hit("L1", 1e-6)

    def reader() -> None:
        started.wait()
        while not stop.is_set():
            seen.append(collector.snapshot().layer_metrics["L1"].hits)

    writers = [threading.Thread(target=writer) for _ in range(4)]
    watcher = threading.Thread(target=reader)
    for t in [*writers, watcher]:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    watcher.join()
    assert seen == sorted(seen)
    assert collector.snapshot().layer_metrics["L1"].hits == 80_000


def test_a_thread_that_cannot_say_whether_it_lives_counts_as_ended() -> None:
    class Odd(threading.Thread):
        def is_alive(self) -> bool:
            raise AssertionError("a dummy thread after fork")

    from cachechain.metrics._engine import _alive

    assert _alive(Odd()) is False
    assert _alive(threading.current_thread()) is True
