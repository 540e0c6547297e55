"""FanoutCollector: every call reaches every child; a failing child stops nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cachechain import Chain, MemoryLayer
from cachechain.metrics._base import MetricsCollector
from cachechain.metrics._catalogue import RECORD_METHODS
from cachechain.metrics._fanout import FanoutCollector
from cachechain.metrics._memory import MemoryCollector
from cachechain.metrics._prometheus import PrometheusCollector

ARGS: dict[str, tuple[Any, ...]] = {
    "record_get": ("L1", True, 0.001),
    "record_set": ("L1", True, 0.001),
    "record_delete": ("L1", False, 0.001),
    "record_circuit_state": ("L2", 1),
    "record_queue_depth": ("L2", 3),
    "record_write_dropped": ("L2", "closed"),
    "record_async_write": ("L2", True, 0.002),
    "record_chain_get": (True, 1, 0.003),
    "record_first_layer_hit": ("L1", 0.000_002),
    "record_error": ("L2", "get", "timeout"),
    "record_circuit_rejected": ("L2",),
    "record_queue_capacity": ("L2", 10),
    "record_load": (True, 0.01),
    "record_singleflight_shared": (),
    "record_evictions": ("L1", 2),
    "record_entries": ("L1", 5),
    "record_invalidations_published": (4,),
    "record_invalidations_applied": (3, 0.02),
    "record_coherence_lost": ("gap",),
    "record_fail_safe": ("loader_error",),
    "record_background_load": ("stored",),
    "record_eager_refresh": (),
    "record_lease": ("won",),
    "record_lease_wait": (0.03,),
    "record_backfill_skipped": ("L1", "circuit_open"),
    "record_repairs_pending": ("L2", 2),
    "record_nodes_down": ("L2", 1),
    "record_connections": ("L2", 4),
    "record_pool_exhausted": ("L2", 3),
    "record_corrupt_values": ("L2", 1),
}


class Recorder(MetricsCollector):
    """Records every call it gets."""

    def __init__(self, name: str = "r") -> None:
        self.name = name
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.hooks: list[Callable[[], object]] = []
        self.bound: list[tuple[str, tuple[str, ...]]] = []
        for method in RECORD_METHODS:
            setattr(self, method, self._recording(method))

    def _recording(self, method: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            self.calls.append((method, args))

        return record

    def bind_chain(self, chain: str, layers: Sequence[str]) -> MetricsCollector:
        self.bound.append((chain, tuple(layers)))
        return self

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        self.hooks.append(fn)


class Raising(Recorder):
    """Raises from every record method, from bind_chain and from add_refresh_hook."""

    def _recording(self, method: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            raise RuntimeError(f"{method} down")

        return record

    def bind_chain(self, chain: str, layers: Sequence[str]) -> MetricsCollector:
        raise RuntimeError("bind down")

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        raise RuntimeError("hook down")


class SeedOnly:
    """A duck-typed collector with the seed's eight methods, the one-argument
    ``record_write_dropped`` included, and nothing else."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def record_get(self, layer: str, hit: bool, duration: float) -> None:
        self.calls.append("get")

    def record_set(self, layer: str, success: bool, duration: float) -> None:
        self.calls.append("set")

    def record_delete(self, layer: str, success: bool, duration: float) -> None:
        self.calls.append("delete")

    def record_circuit_state(self, layer: str, state: int) -> None:
        self.calls.append("state")

    def record_queue_depth(self, layer: str, depth: int) -> None:
        self.calls.append("depth")

    def record_write_dropped(self, layer: str) -> None:
        self.calls.append("dropped")

    def record_async_write(self, layer: str, success: bool, duration: float) -> None:
        self.calls.append("async")

    def record_chain_get(self, hit: bool, layer_index: int, total_duration: float) -> None:
        self.calls.append("chain_get")


@pytest.mark.parametrize("children", [1, 2, 3])
def test_every_call_reaches_every_child(children: int) -> None:
    recorders = [Recorder(str(i)) for i in range(children)]
    fan = FanoutCollector(*recorders)
    for method in RECORD_METHODS:
        getattr(fan, method)(*ARGS[method])
    for recorder in recorders:
        assert recorder.calls == [(m, ARGS[m]) for m in RECORD_METHODS]
    assert fan.failures == 0
    assert "FanoutCollector" in repr(fan)


def test_a_failing_child_stops_nothing(caplog: pytest.LogCaptureFixture) -> None:
    before, after = Recorder("before"), Recorder("after")
    fan = FanoutCollector(before, Raising("bad"), after)
    with caplog.at_level(logging.WARNING, "cachechain.metrics"):
        for method in RECORD_METHODS:
            getattr(fan, method)(*ARGS[method])
        bound = fan.bind_chain("c", ("L1", "L2"))
        fan.add_refresh_hook(lambda: None)
    assert before.calls == after.calls == [(m, ARGS[m]) for m in RECORD_METHODS]
    assert fan.failures == len(RECORD_METHODS) + 2
    assert len([r for r in caplog.records if "raised" in r.getMessage()]) == 1
    assert before.bound == after.bound == [("c", ("L1", "L2"))]
    assert len(before.hooks) == len(after.hooks) == 1
    assert isinstance(bound, FanoutCollector)
    assert isinstance(bound.collectors[1], Raising)  # used unbound after its bind failed


def test_seed_style_children_work() -> None:
    seed = SeedOnly()
    fan = FanoutCollector(seed, Recorder())
    fan.record_write_dropped("L2", "queue_full")
    fan.record_first_layer_hit("L1", 0.000_001)
    fan.record_load(True, 0.1)  # not a seed method: skipped for this child
    fan.add_refresh_hook(lambda: None)
    fan.bind_chain("c", ("L1",))
    assert seed.calls == ["dropped", "get", "chain_get"]
    assert fan.failures == 0


def test_a_child_without_a_seed_method_is_refused() -> None:
    class Incomplete:
        def record_get(self, layer: str, hit: bool, duration: float) -> None:
            return None

    with pytest.raises(TypeError, match="record_set"):
        FanoutCollector(Incomplete())


def test_a_chain_reports_to_memory_and_prometheus_at_once() -> None:
    memory = MemoryCollector()
    registry = CollectorRegistry()
    prometheus = PrometheusCollector(registry=registry)
    with Chain(
        [MemoryLayer("L1", maxsize=2), MemoryLayer("L2")],
        name="shop",
        metrics=FanoutCollector(memory, prometheus),
    ) as chain:
        chain.set("k", 1)
        for _ in range(3):
            assert chain.get("k") == 1
        assert chain.get("absent") is None
        for key in "abc":
            chain.set(key, 1)  # L1 holds 2: one eviction
        snap = memory.snapshot()
        assert snap.layer_metrics["L1"].hits == 3 and snap.chain_metrics.total_misses == 1
        get = registry.get_sample_value
        assert get("cache_chain_hits_total", {"chain": "shop", "layer": "L1"}) == 3
        assert get("cache_chain_misses_total", {"chain": "shop", "layer": "L2"}) == 1
        # the chain's refresh hook reached both collectors through the fan-out
        assert get("cache_chain_entries", {"chain": "shop", "layer": "L1"}) == 2
        assert memory.snapshot().layer_metrics["L1"].entries == 2
        evictions = get("cache_chain_evictions_total", {"chain": "shop", "layer": "L1"})
        assert evictions == memory.snapshot().layer_metrics["L1"].evictions == 2


def test_failures_through_a_chain_are_counted_on_the_collector_given_to_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chain binds the fan-out; what its children raise there must still be counted
    in the ``failures`` of the fan-out the user holds, and logged once per child."""
    memory, twin = MemoryCollector(), Recorder()
    fan = FanoutCollector(memory, Raising("bad"), twin)
    with caplog.at_level(logging.WARNING, "cachechain.metrics"):
        chains = [Chain([MemoryLayer("L1")], name=n, metrics=fan) for n in ("a", "b")]
        for chain in chains:
            chain.set("k", 1)
            assert chain.get("k") == 1
            chain.close()
    assert memory.snapshot().layer_metrics["L1"].hits == 2
    # Every record call the twin got raised in the failing child; so did bind_chain and
    # add_refresh_hook, once per chain.
    assert len(twin.calls) >= 4
    assert fan.failures == len(twin.calls) + 2 * 2
    assert len([r for r in caplog.records if "raised" in r.getMessage()]) == 1


def test_a_collector_whose_bind_chain_raises_does_not_stop_the_chain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As a fan-out does for its children: the collector is used unbound, the failure
    is counted and logged once, and the chain is built and works."""

    class BindFails(Recorder):
        def bind_chain(self, chain: str, layers: Sequence[str]) -> MetricsCollector:
            raise RuntimeError("bind down")

    collector = BindFails()
    with caplog.at_level(logging.WARNING, "cachechain.metrics"):
        chain = Chain([MemoryLayer("L1")], name="c", metrics=collector)
    assert chain.set("k", 1) and chain.get("k") == 1
    assert [name for name, _ in collector.calls] == ["record_set", "record_first_layer_hit"]
    assert chain._m is not None and chain._m.failures == 1
    assert len([r for r in caplog.records if "bind down" in r.getMessage()]) == 1
    chain.close()
