"""PrometheusCollector: the catalogue's names, types and labels, histograms, gauges,
registries, promtool, bounded series, multiprocess mode, the example and the dashboard."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import values as prom_values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from cachechain import (
    Chain,
    CircuitBreaker,
    ConfigError,
    LayerUnavailableError,
    MemoryLayer,
)
from cachechain._resilience import ResilientLayer
from cachechain.metrics import _prometheus as prom
from cachechain.metrics._fanout import FanoutCollector
from cachechain.metrics._memory import MemoryCollector
from cachechain.metrics._prometheus import (
    DEFAULT_BUCKETS,
    FAMILIES,
    PrometheusCollector,
    serve_metrics,
    start_demo_exporter,
)
from tests.support.dashboard import substitute
from tests.support.fakes import FakeClock, FakeLayer

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = "/usr/bin/promtool"

#: The catalogue of ../shared/reference/metrics.md: name -> (type, labels).
CATALOGUE: dict[str, tuple[str, set[str]]] = {
    "cache_chain_hits_total": ("counter", {"chain", "layer"}),
    "cache_chain_misses_total": ("counter", {"chain", "layer"}),
    "cache_chain_errors_total": ("counter", {"chain", "layer", "operation", "error_type"}),
    "cache_chain_operation_duration_seconds": ("histogram", {"chain", "layer", "operation"}),
    "cache_chain_operations_total": ("counter", {"chain", "layer", "operation", "result"}),
    "cache_chain_requests_total": ("counter", {"chain", "result", "served_by"}),
    "cache_chain_request_duration_seconds": ("histogram", {"chain", "result"}),
    "cache_chain_loads_total": ("counter", {"chain", "result"}),
    "cache_chain_load_duration_seconds": ("histogram", {"chain"}),
    "cache_chain_singleflight_shared_total": ("counter", {"chain"}),
    "cache_chain_queue_depth": ("gauge", {"chain", "layer"}),
    "cache_chain_queue_capacity": ("gauge", {"chain", "layer"}),
    "cache_chain_writes_dropped_total": ("counter", {"chain", "layer", "reason"}),
    "cache_chain_async_writes_total": ("counter", {"chain", "layer", "result"}),
    "cache_chain_async_write_duration_seconds": ("histogram", {"chain", "layer"}),
    "cache_chain_circuit_state": ("gauge", {"chain", "layer"}),
    "cache_chain_circuit_transitions_total": ("counter", {"chain", "layer", "to"}),
    "cache_chain_circuit_rejected_total": ("counter", {"chain", "layer"}),
    "cache_chain_evictions_total": ("counter", {"chain", "layer"}),
    "cache_chain_entries": ("gauge", {"chain", "layer"}),
    "cache_chain_invalidations_published_total": ("counter", {"chain"}),
    "cache_chain_invalidations_applied_total": ("counter", {"chain"}),
    "cache_chain_invalidation_lag_seconds": ("histogram", {"chain"}),
    "cache_chain_coherence_lost_total": ("counter", {"chain", "reason"}),
    "cache_chain_fail_safe_served_total": ("counter", {"chain", "reason"}),
    "cache_chain_background_loads_total": ("counter", {"chain", "outcome"}),
    "cache_chain_eager_refreshes_total": ("counter", {"chain"}),
    "cache_chain_leases_total": ("counter", {"chain", "outcome"}),
    "cache_chain_lease_wait_duration_seconds": ("histogram", {"chain"}),
    "cache_chain_repairs_pending": ("gauge", {"chain", "layer"}),
    "cache_chain_circuit_breaker_state": ("gauge", {"chain", "layer", "state"}),
    "cache_chain_backfills_skipped_total": ("counter", {"chain", "layer", "reason"}),
    "cache_chain_layer_nodes_down": ("gauge", {"chain", "layer"}),
    "cache_chain_layer_connections": ("gauge", {"chain", "layer"}),
    "cache_chain_layer_pool_exhausted_total": ("counter", {"chain", "layer"}),
    "cache_chain_layer_corrupt_values_total": ("counter", {"chain", "layer"}),
    "cache_chain_info": ("gauge", {"chain", "version", "layers"}),
    "cache_chain_layer_info": (
        "gauge",
        {
            "chain",
            "layer",
            "type",
            "timeout_seconds",
            "breaker_max_failures",
            "breaker_reset_timeout_seconds",
        },
    ),
}
#: Kept for compatibility only: the dashboard shows its successor, circuit_breaker_state.
NOT_ON_THE_DASHBOARD = {"cache_chain_circuit_state"}


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def families(text: str) -> dict[str, Any]:
    """Parsed families by exposition name (counters with their ``_total``)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = fam
    return out


def series_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def promtool_check(text: str) -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def exercise_everything(collector: PrometheusCollector, *, coherence: bool = True) -> Chain:
    """Drive a chain so that every family of the catalogue has samples (``coherence``:
    the chain's own; its families are fed by hand either way)."""
    clock = FakeClock()
    fake = FakeLayer("L2")
    breaker = CircuitBreaker("L2", max_failures=1, reset_timeout=10, clock=clock)
    chain = Chain(
        [MemoryLayer("L1", maxsize=2), ResilientLayer(fake, breaker=breaker)],
        name="web",
        metrics=collector,
        coherence=coherence,
    )
    chain.set("a", 1)
    chain.get("a")
    chain.get("absent")
    chain.delete("a")
    chain.get_or_load("loaded", lambda: 1)
    fake.fail = LayerUnavailableError("down", layer="L2")
    chain.get("x")  # an error that opens the breaker
    chain.get("y")  # refused by the open breaker
    chain.delete("y")  # a delete L2 could not take (a repair is queued for it)
    fake.fail = None
    view = collector.bind_chain("web", ("L1", "L2"))
    view.record_queue_depth("L2", 3)
    view.record_write_dropped("L2", "queue_full")
    view.record_async_write("L2", True, 0.004)
    view.record_singleflight_shared()
    view.record_evictions("L1", 2)
    view.record_entries("L1", 2)
    view.record_connections("L2", 2)  # a memcached layer's polled figures
    view.record_nodes_down("L2", 0)
    view.record_pool_exhausted("L2", 1)
    view.record_corrupt_values("L2", 1)
    view.record_invalidations_applied(2, 0.03)
    # The journal's own poll fails while the fake does: once it stays failed for the
    # bound, that is lost track; recorded here so the series exist whatever the timing.
    view.record_coherence_lost("unreachable")
    view.record_fail_safe("soft_timeout")
    view.record_background_load("stored")
    view.record_eager_refresh()
    view.record_lease("waited")
    view.record_lease_wait(0.03)
    return chain


def test_seed_prometheus_export() -> None:
    """The seed's exporter test: record, gather, the three families are there."""
    collector = PrometheusCollector("cache_chain")
    registry = CollectorRegistry()
    collector.register(registry)
    collector.record_get("L1", False, 0.010)
    collector.record_get("L2", True, 0.050)
    found = set(families(exposition(registry)))
    for name in (
        "cache_chain_hits_total",
        "cache_chain_misses_total",
        "cache_chain_operation_duration_seconds",
    ):
        assert name in found
    labels = {"chain": "default", "layer": "L2"}
    assert registry.get_sample_value("cache_chain_hits_total", labels) == 1
    assert registry.get_sample_value("cache_chain_misses_total", {**labels, "layer": "L1"}) == 1


def test_names_types_and_labels_are_the_catalogues() -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    chain = exercise_everything(collector)
    fams = families(exposition(registry))
    assert set(fams) == set(CATALOGUE)
    assert {f"cache_chain_{f.name}" for f in FAMILIES} == set(CATALOGUE)
    for name, (kind, labels) in CATALOGUE.items():
        fam = fams[name]
        assert fam.type == kind, name
        assert fam.samples, f"{name} has no samples"
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    get = registry.get_sample_value
    assert get("cache_chain_requests_total", {"chain": "web", "result": "hit", "served_by": "L1"})
    assert get("cache_chain_circuit_state", {"chain": "web", "layer": "L2"}) == 1
    assert get(
        "cache_chain_circuit_transitions_total", {"chain": "web", "layer": "L2", "to": "open"}
    )
    err = {"chain": "web", "layer": "L2", "operation": "get", "error_type": "connection"}
    assert get("cache_chain_errors_total", err) == 1
    assert (
        get("cache_chain_circuit_rejected_total", {"chain": "web", "layer": "L2"}) == 2
    )  # the get of "y" and its delete
    assert get("cache_chain_loads_total", {"chain": "web", "result": "success"}) == 1
    chain.close()


def test_exposition_passes_promtool() -> None:
    registry = CollectorRegistry()
    chain = exercise_everything(PrometheusCollector(registry=registry))
    promtool_check(exposition(registry))
    chain.close()


def test_histograms_collect_latency() -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    view = collector.bind_chain("c", ("L1", "L2"))
    view.record_first_layer_hit("L1", 0.000_003)  # <= 10 us
    view.record_get("L2", True, 0.003)  # <= 5 ms
    view.record_get("L2", False, 0.000_010)  # exactly on a bound: le is inclusive
    view.record_get("L2", True, 7.0)  # above every bound: +Inf only
    get = registry.get_sample_value
    l2 = {"chain": "c", "layer": "L2", "operation": "get"}
    assert get("cache_chain_operation_duration_seconds_bucket", {**l2, "le": "1e-05"}) == 1
    assert get("cache_chain_operation_duration_seconds_bucket", {**l2, "le": "0.0025"}) == 1
    assert get("cache_chain_operation_duration_seconds_bucket", {**l2, "le": "0.005"}) == 2
    assert get("cache_chain_operation_duration_seconds_bucket", {**l2, "le": "1.0"}) == 2
    assert get("cache_chain_operation_duration_seconds_bucket", {**l2, "le": "+Inf"}) == 3
    assert get("cache_chain_operation_duration_seconds_count", l2) == 3
    assert get("cache_chain_operation_duration_seconds_sum", l2) == pytest.approx(7.00301)
    l1 = {**l2, "layer": "L1"}
    assert get("cache_chain_operation_duration_seconds_bucket", {**l1, "le": "1e-05"}) == 1
    hit = {"chain": "c", "result": "hit"}
    assert get("cache_chain_request_duration_seconds_count", hit) == 1
    assert get("cache_chain_request_duration_seconds_sum", hit) == pytest.approx(0.000_003)
    les = [
        s.labels["le"]
        for s in families(exposition(registry))["cache_chain_request_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["result"] == "hit"
    ]
    assert les == [*(repr(b) if b < 1e-4 else str(b) for b in DEFAULT_BUCKETS), "+Inf"]


def test_gauges_reflect_the_current_state() -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    view = collector.bind_chain("c", ("L1", "L2"))
    get = registry.get_sample_value
    labels = {"chain": "c", "layer": "L2"}
    view.record_queue_capacity("L2", 100)
    view.record_queue_depth("L2", 42)
    assert get("cache_chain_queue_depth", labels) == 42
    view.record_queue_depth("L2", 0)
    assert get("cache_chain_queue_depth", labels) == 0
    assert get("cache_chain_queue_capacity", labels) == 100
    for state in (1, 2, 0):
        view.record_circuit_state("L2", state)
        assert get("cache_chain_circuit_state", labels) == state
    assert get("cache_chain_circuit_transitions_total", {**labels, "to": "half_open"}) == 1
    view.record_entries("L1", 7)
    assert get("cache_chain_entries", {"chain": "c", "layer": "L1"}) == 7


def test_refresh_hooks_run_before_each_scrape() -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    layer = MemoryLayer("L1", maxsize=3)
    view = collector.bind_chain("c", ("L1",))
    seen = {"evictions": 0}

    def refresh() -> None:
        stats = layer.stats()
        view.record_entries("L1", stats.entries)
        view.record_evictions("L1", stats.evictions - seen["evictions"])
        seen["evictions"] = stats.evictions

    view.add_refresh_hook(refresh)
    for i in range(5):
        layer.set(f"k{i}", i, 60)
    labels = {"chain": "c", "layer": "L1"}
    text = exposition(registry)
    assert 'cache_chain_entries{chain="c",layer="L1"} 3.0' in text
    assert 'cache_chain_evictions_total{chain="c",layer="L1"} 2.0' in text
    layer.set("k9", 9, 60)
    assert registry.get_sample_value("cache_chain_evictions_total", labels) == 3


def test_two_collectors_on_one_registry_and_one_on_two() -> None:
    registry, other = CollectorRegistry(), CollectorRegistry()
    first = PrometheusCollector(registry=registry)
    second = PrometheusCollector(registry=registry)
    first.register(other)
    first.register(registry)  # idempotent
    a = Chain([MemoryLayer("L1"), MemoryLayer("L2")], name="a", metrics=first)
    b = Chain([MemoryLayer("L1"), MemoryLayer("L2")], name="b", metrics=first)
    c = Chain([MemoryLayer("L1"), MemoryLayer("L2")], name="a", metrics=second)
    for chain in (a, b, c):
        chain.set("k", 1)
        chain.get("k")
    text = exposition(registry)
    promtool_check(text)
    get = registry.get_sample_value
    assert get("cache_chain_hits_total", {"chain": "a", "layer": "L1"}) == 2  # a and c add up
    assert get("cache_chain_hits_total", {"chain": "b", "layer": "L1"}) == 1
    assert other.get_sample_value("cache_chain_hits_total", {"chain": "a", "layer": "L1"}) == 1
    first.unregister(registry)
    assert get("cache_chain_hits_total", {"chain": "a", "layer": "L1"}) == 1  # second's only
    first.unregister(registry)  # not registered any more: nothing happens
    second.unregister(registry)
    assert "cache_chain" not in exposition(registry)
    PrometheusCollector(registry=registry)  # the namespace is free again
    for chain in (a, b, c):
        chain.close()


def test_namespaces_and_conflicts() -> None:
    registry = CollectorRegistry()
    mine = PrometheusCollector("myapp", registry=registry)
    mine.record_get("L1", True, 0.001)
    assert registry.get_sample_value("myapp_hits_total", {"chain": "default", "layer": "L1"}) == 1
    with pytest.raises(ConfigError, match="buckets"):
        PrometheusCollector("myapp", buckets=(0.1, 1.0), registry=registry)
    Counter("clash_hits_total", "someone else's", registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusCollector("clash", registry=registry)
    for bad in ("", "1abc", "has-dash", 7):
        with pytest.raises(ConfigError):
            PrometheusCollector(bad)  # type: ignore[arg-type]
    for buckets in ((), (0.5, 0.1), ("x",)):
        with pytest.raises(ConfigError):
            PrometheusCollector(buckets=buckets)  # type: ignore[arg-type]
    for interval in (0, -1, float("inf"), True, "1"):
        with pytest.raises(ConfigError):
            PrometheusCollector(flush_interval=interval)  # type: ignore[arg-type]
    assert len(PrometheusCollector(buckets=(0.001, float("inf"))).bounds) == 1


def test_distinct_keys_add_no_series() -> None:
    registry = CollectorRegistry()
    # Without the journal's thread: what it records depends on timing, not on keys.
    chain = exercise_everything(PrometheusCollector(registry=registry), coherence=False)

    def traffic(keys: range) -> int:
        for i in keys:
            chain.set(f"user:{i}", i)
            chain.get(f"user:{i}")
            chain.get(f"nobody:{i}")
            chain.get_many([f"user:{i}", f"many:{i}"])
            if i % 100 == 0:
                chain.delete(f"user:{i}")
        return series_count(exposition(registry))

    before = traffic(range(10))  # every kind of call made once
    assert traffic(range(10, 10_010)) == before
    chain.close()


@pytest.mark.parametrize("sample_hits", [1, 64])
def test_counts_are_exact_under_eight_threads(sample_hits: int) -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry, sample_hits=sample_hits)
    chain = Chain([MemoryLayer("L1"), MemoryLayer("L2")], metrics=collector)
    chain.set("hot", 1)
    threads, n = 8, 3000
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for _ in range(n):
            chain.get("hot")
            chain.get("cold")

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    get = registry.get_sample_value
    total = threads * n
    assert get("cache_chain_hits_total", {"chain": "default", "layer": "L1"}) == total
    assert get("cache_chain_misses_total", {"chain": "default", "layer": "L2"}) == total
    hit = {"chain": "default", "result": "hit", "served_by": "L1"}
    assert get("cache_chain_requests_total", hit) == total
    miss = {"chain": "default", "result": "miss", "served_by": "none"}
    assert get("cache_chain_requests_total", miss) == total
    count = get("cache_chain_request_duration_seconds_count", {"chain": "default", "result": "hit"})
    if sample_hits == 1:
        assert count == total
    else:  # the samples stand for the hits up to the last one: never more
        assert total - sample_hits - threads < count <= total
    chain.close()


def test_collect_and_describe_for_direct_registration() -> None:
    collector = PrometheusCollector()
    collector.record_chain_get(True, 3, 0.001)  # no layer known at position 3
    collector.record_load(False, 0.2)
    names = {m.name for m in collector.describe()}
    assert "cache_chain_hits" in names and all(not m.samples for m in collector.describe())
    by_name = {m.name: m for m in collector.collect()}
    req = by_name["cache_chain_requests"].samples
    assert [(s.labels["served_by"], s.value) for s in req] == [("unknown", 1.0)]
    loads = by_name["cache_chain_loads"].samples
    assert [(s.labels["result"], s.value) for s in loads if s.name.endswith("_total")] == [
        ("failure", 1.0)
    ]
    registry = CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value(
        "cache_chain_load_duration_seconds_count", {"chain": "default"}
    )
    assert collector.flush() is False  # single-process mode: nothing to write
    collector.close()
    collector.close()
    assert "single process" in repr(collector)


def test_a_closed_collector_leaves_its_registries() -> None:
    """A chain built from config owns its collector and closes it; a new chain built
    again (Django's close_chains(), another Flask app) registers a new one. The closed
    one must not stay in the registry: its last gauges would add to the live ones."""
    registry = CollectorRegistry()
    config = {
        "name": "web",
        "layers": [{"type": "memory", "name": "L1"}, {"type": "memory", "name": "L2"}],
        "metrics": {"exporter": "prometheus", "options": {"registry": registry}},
    }
    first = Chain.from_config(config)
    assert first.get("k") is None
    assert registry.get_sample_value("cache_chain_entries", {"chain": "web", "layer": "L1"}) == 0
    first.close()
    assert "cache_chain_" not in exposition(registry)
    second = Chain.from_config(config)
    get = registry.get_sample_value
    assert get("cache_chain_queue_capacity", {"chain": "web", "layer": "L2"}) == 1000
    assert get("cache_chain_misses_total", {"chain": "web", "layer": "L1"}) == 0
    second.close()


def test_a_failing_collector_does_not_break_the_scrape(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    good, bad = PrometheusCollector(registry=registry), PrometheusCollector(registry=registry)
    good.record_get("L1", True, 0.001)

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(bad, "read", broken)
    with caplog.at_level(logging.ERROR, "cachechain.metrics"):
        assert registry.get_sample_value(
            "cache_chain_hits_total", {"chain": "default", "layer": "L1"}
        )
    assert any("failed" in r.getMessage() for r in caplog.records)


# -- multiprocess mode ------------------------------------------------------------------

CHILD = """
import sys
from cachechain import Chain, MemoryLayer
from cachechain.metrics._prometheus import PrometheusCollector

n, hold = int(sys.argv[1]), sys.argv[2] == "hold"
# Every hit timed: the latency counts are summed exactly (sampling: test_hit_sampling.py).
collector = PrometheusCollector(flush_interval=0.02, sample_hits=1)
assert collector.multiprocess
chain = Chain([MemoryLayer("L1"), MemoryLayer("L2")], name="web", metrics=collector)
view = collector.bind_chain("web", ("L1", "L2"))
chain.set("k", 1)
for _ in range(n):
    chain.get("k")
chain.get("absent")
view.record_queue_depth("R", n)  # a layer of its own: the chain reports L2's depth
view.record_circuit_state("R", 1 if n > 100 else 0)
if hold:
    calls = []
    def announce():
        calls.append(1)
        if len(calls) == 2:  # the first background flush is complete
            print("flushed", flush=True)
    collector.add_refresh_hook(announce)
    sys.stdin.read()
"""


def run_child(tmp: Path, n: int, hold: bool = False) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(n), "hold" if hold else "exit"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def scrape_dir(tmp: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    cast(Any, MultiProcessCollector)(registry, path=str(tmp))
    return registry


def test_multiprocess_mode_sums_processes(tmp_path: Path) -> None:
    children = [run_child(tmp_path, n) for n in (50, 200, 1000)]
    for child in children:
        assert child.wait(60) == 0
    registry = scrape_dir(tmp_path)
    text = exposition(registry)
    promtool_check(text)
    get = registry.get_sample_value
    l1 = {"chain": "web", "layer": "L1"}
    assert get("cache_chain_hits_total", l1) == 1250
    assert get("cache_chain_misses_total", {"chain": "web", "layer": "L2"}) == 3
    hit = {"chain": "web", "result": "hit", "served_by": "L1"}
    assert get("cache_chain_requests_total", hit) == 1250
    assert (
        get("cache_chain_request_duration_seconds_count", {"chain": "web", "result": "hit"}) == 1250
    )
    get_l1 = {**l1, "operation": "get"}
    assert get("cache_chain_operation_duration_seconds_bucket", {**get_l1, "le": "+Inf"}) == 1253
    assert get("cache_chain_queue_depth", {"chain": "web", "layer": "R"}) == 1250  # livesum
    assert get("cache_chain_circuit_state", {"chain": "web", "layer": "R"}) == 1  # livemax
    assert get("cache_chain_queue_depth", {"chain": "web", "layer": "L2"}) == 0
    assert families(text)["cache_chain_hits_total"].type == "counter"
    assert families(text)["cache_chain_operation_duration_seconds"].type == "histogram"


def test_multiprocess_background_flush_while_the_process_lives(tmp_path: Path) -> None:
    child = run_child(tmp_path, 300, hold=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "flushed"
        hits = scrape_dir(tmp_path).get_sample_value(
            "cache_chain_hits_total", {"chain": "web", "layer": "L1"}
        )
        assert hits == 300
    finally:
        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(60) == 0


@pytest.fixture()
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    yield tmp_path
    cast(Any, prom_values).close_all_multiprocess_files()
    prom._MP_CLASSES.clear()


def test_multiprocess_mode_in_process(multiproc_dir: Path) -> None:
    collector = PrometheusCollector(flush_interval=0.01)
    assert collector.multiprocess and "multiprocess" in repr(collector)
    flushed = threading.Event()
    calls: list[int] = []

    def hook() -> None:
        calls.append(1)
        if len(calls) >= 2:
            flushed.set()

    collector.add_refresh_hook(hook)
    registry = CollectorRegistry()
    collector.register(registry)  # multiprocess: not registered, scraped from files
    assert "cache_chain" not in exposition(registry)
    view = collector.bind_chain("web", ("L1", "L2"))
    for _ in range(10):
        view.record_first_layer_hit("L1", 0.000_002)
    view.record_queue_depth("L2", 4)
    view.record_circuit_state("L2", 2)
    assert flushed.wait(30)
    collector.close()  # joins the flusher, then a last flush
    get = scrape_dir(multiproc_dir).get_sample_value
    assert get("cache_chain_hits_total", {"chain": "web", "layer": "L1"}) == 10
    assert get("cache_chain_queue_depth", {"chain": "web", "layer": "L2"}) == 4
    assert get("cache_chain_circuit_state", {"chain": "web", "layer": "L2"}) == 2
    view.record_first_layer_hit("L1", 0.000_002)
    assert collector.flush() is True  # only what changed is written again
    assert (
        scrape_dir(multiproc_dir).get_sample_value(
            "cache_chain_hits_total", {"chain": "web", "layer": "L1"}
        )
        == 11
    )
    promtool_check(exposition(scrape_dir(multiproc_dir)))


def test_concurrent_flushes_never_write_older_figures_over_newer(multiproc_dir: Path) -> None:
    """A flush that read the figures, then waited for the file lock while another flush
    wrote newer ones, must not write its older figures: a counter that goes back in the
    files reads as a counter reset, and rate() turns it into a spike."""
    collector = PrometheusCollector(flush_interval=3600)  # no background flush here
    view = collector.bind_chain("web", ("L1",))
    view.record_first_layer_hit("L1", 0.000_002)
    lock = collector._flush_lock
    at_lock, go = threading.Event(), threading.Event()

    class Gate:
        """The flush lock; the thread named "slow" pauses before taking it."""

        def __enter__(self) -> None:
            if threading.current_thread().name == "slow":
                at_lock.set()
                assert go.wait(10)
            lock.acquire()

        def __exit__(self, *exc: object) -> None:
            lock.release()

    collector._flush_lock = Gate()  # type: ignore[assignment]
    slow = threading.Thread(target=collector.flush, name="slow")
    slow.start()
    assert at_lock.wait(10)
    for _ in range(4):
        view.record_first_layer_hit("L1", 0.000_002)
    assert collector.flush()  # writes 5 hits
    go.set()
    slow.join(10)
    hits = scrape_dir(multiproc_dir).get_sample_value(
        "cache_chain_hits_total", {"chain": "web", "layer": "L1"}
    )
    assert hits == 5
    collector.close()


def test_multiprocess_flush_failure_is_logged_once(
    multiproc_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    collector = PrometheusCollector(multiprocess=True, flush_interval=3600)
    assert collector._writer is not None

    def broken(table: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(collector._writer, "write", broken)
    with caplog.at_level(logging.WARNING, "cachechain.metrics"):
        assert collector.flush() is False
        assert collector.flush() is False
    assert len([r for r in caplog.records if "disk full" in r.getMessage()]) == 1
    monkeypatch.undo()
    collector.close()


def test_multiprocess_needs_a_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR"):
        PrometheusCollector(multiprocess=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="existing directory"):
        PrometheusCollector()


def test_multiprocess_uses_prometheus_clients_own_files_when_it_is_in_that_mode(
    multiproc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = cast(Any, prom_values).MultiProcessValue()
    monkeypatch.setattr(prom_values, "ValueClass", shared)
    assert prom._value_class() is shared


def test_after_fork_the_child_restarts_its_flusher(multiproc_dir: Path) -> None:
    """What the at-fork hook does in a child, run in this process."""
    collector = PrometheusCollector(flush_interval=3600)
    collector.record_get("L1", True, 0.001)
    assert collector.flush()
    old, old_stop = collector._flusher, collector._stop
    collector._after_fork()
    assert collector._flusher is not old and collector._flusher is not None
    assert collector._flusher.is_alive()
    assert collector.collect()[0].samples == []  # hits start again at zero
    assert collector._writer is not None and collector._writer.values == {}
    collector.close()
    assert old is not None and old.is_alive()  # in a real child it would not exist
    old_stop.set()
    old.join(5)
    assert not old.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_worker_reports_only_its_own_counts(tmp_path: Path) -> None:
    """gunicorn --preload: the app (and collector) is built in the master, then forked."""
    script = """
import os, sys
from cachechain.metrics._prometheus import PrometheusCollector
collector = PrometheusCollector(flush_interval=3600)
view = collector.bind_chain("web", ("L1",))
for _ in range(7):
    view.record_first_layer_hit("L1", 1e-6)
collector.flush()
pid = os.fork()
if pid == 0:
    for _ in range(3):
        view.record_first_layer_hit("L1", 1e-6)
    sys.exit(0)  # atexit flushes the child's own file
os.waitpid(pid, 0)
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    assert len(list(tmp_path.glob("counter_*.db"))) == 2
    hits = scrape_dir(tmp_path).get_sample_value(
        "cache_chain_hits_total", {"chain": "web", "layer": "L1"}
    )
    assert hits == 10


# -- serving ------------------------------------------------------------------------------


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def test_start_demo_exporter_finds_the_chains_collector() -> None:
    prom_collector = PrometheusCollector()
    memory = MemoryCollector()
    for metrics, expect_buckets in (
        (prom_collector, len(DEFAULT_BUCKETS) + 1),
        (FanoutCollector(memory, prom_collector), len(DEFAULT_BUCKETS) + 1),
        (MemoryCollector(), 130),
    ):
        chain = Chain([MemoryLayer("L1"), MemoryLayer("L2")], name="demo", metrics=metrics)
        chain.set("k", 1)
        chain.get("k")
        out = io.StringIO()
        server = start_demo_exporter(chain, 0, out)
        try:
            assert server.url in out.getvalue()
            text = fetch(server.url)
        finally:
            server.shutdown()
            chain.close()
        assert 'cache_chain_hits_total{chain="demo",layer="L1"}' in text
        le = re.findall(
            r'request_duration_seconds_bucket\{chain="demo",le="[^"]+",result="hit"', text
        )
        assert len(le) == expect_buckets
        promtool_check(text)
    with pytest.raises(ConfigError, match="no collector"):
        start_demo_exporter(Chain([MemoryLayer("L1")]), 0, io.StringIO())
    server = start_demo_exporter(object(), 0, io.StringIO(), collector=memory)
    server.shutdown()


def test_serve_metrics_url() -> None:
    registry = CollectorRegistry()
    server = serve_metrics(registry, 0)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        fetch(server.url)
    finally:
        server.shutdown()


def test_the_example_serves_its_metrics(tmp_path: Path) -> None:
    """End to end: run examples/metrics/prometheus.py, scrape it over HTTP."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "metrics" / "prometheus.py"),
            "--port",
            "0",
            "--seconds",
            "0.5",
            "--threads",
            "3",
            "--hold",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.match(r"serving (http://\S+/metrics)", first)
        assert match, first
        assert proc.stdout.readline().startswith("traffic done:")
        text = fetch(match.group(1))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(60) == 0
    promtool_check(text)
    fams = families(text)
    for name in (
        "cache_chain_hits_total",
        "cache_chain_misses_total",
        "cache_chain_requests_total",
        "cache_chain_operation_duration_seconds",
        "cache_chain_request_duration_seconds",
        "cache_chain_loads_total",
        "cache_chain_queue_capacity",
    ):
        assert fams[name].samples, name
    hits = {s.labels["layer"]: s.value for s in fams["cache_chain_hits_total"].samples}
    assert hits["L1"] > 0 and set(hits) == {"L1", "L2"}


# -- the dashboard ------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    with open(ROOT / "examples" / "metrics" / "dashboard.json") as f:
        data: dict[str, Any] = json.load(f)
    return data


#: What the dashboard's template variables stand for in the PromQL checks.
DASHBOARD_VALUES = {"namespace": "cache_chain", "job": ".*", "instance": ".*", "chain": ".*"}


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", []) if "expr" in t]


def test_dashboard_has_the_panels_and_a_datasource_variable() -> None:
    data = dashboard()
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in data["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in (
        "hit rate by layer",
        "p50, p95, p99",
        "circuit breaker state",
        "queue depth",
        "dropped writes",
        "error rate",
        "single-flight",
    ):
        assert topic in titles, topic
    used = set()
    for expr in dashboard_exprs():
        assert "cache_chain_" not in expr, expr  # the prefix is the $namespace variable
        for name in re.findall(r"\$\{namespace\}_([a-z_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", "cache_chain_" + name)
            assert base in CATALOGUE, name
            used.add(base)
    assert used == set(CATALOGUE) - NOT_ON_THE_DASHBOARD  # every other metric is on it


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"cachechain:dashboard:{i}",
                        "expr": substitute(expr, DASHBOARD_VALUES),
                    }
                    for i, expr in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_direct_calls_and_a_chain_named_default_share_series() -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    view = collector.bind_chain("default", ("L1", "L2"))
    view.record_get("L1", True, 0.001)
    collector.record_get("L1", True, 0.001)
    view.record_queue_depth("L2", 3)
    collector.record_queue_depth("L2", 4)
    view.record_circuit_state("L2", 1)
    collector.record_circuit_state("L2", 2)
    get = registry.get_sample_value
    labels = {"chain": "default", "layer": "L2"}
    assert get("cache_chain_hits_total", {**labels, "layer": "L1"}) == 2
    assert get("cache_chain_queue_depth", labels) == 7  # summed
    assert get("cache_chain_circuit_state", labels) == 2  # the worst
    promtool_check(exposition(registry))


def test_a_zero_miss_count_is_exported_beside_hits_of_an_undeclared_layer() -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry, multiprocess=False)
    collector.record_get("L1", True, 0.001)  # the collector's own chain, layer not declared
    text = generate_latest(registry).decode()
    assert 'cache_chain_hits_total{chain="default",layer="L1"} 1.0' in text
    assert 'cache_chain_misses_total{chain="default",layer="L1"} 0.0' in text


def test_the_circuit_state_help_text_says_state() -> None:
    registry = CollectorRegistry()
    PrometheusCollector(registry=registry, multiprocess=False)
    text = generate_latest(registry).decode()
    assert "# HELP cache_chain_circuit_state State of the layer's circuit breaker" in text
