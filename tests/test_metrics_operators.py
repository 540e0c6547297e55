"""Issue 13, the operators' view: every bounded series from zero, buckets that resolve an
L1 hit, a breaker gauge that aggregates, the invisible work counted (skipped backfills,
pending repairs, a memcached layer's own figures), the info series, ``Chain.health()``
and multiprocess mode's rough edges (a pre-forking master, a missing directory)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pymemcache.client.base import Client

import cachechain
from cachechain import (
    BreakerConfig,
    Chain,
    ChainHealth,
    CircuitBreaker,
    ConfigError,
    LayerConfig,
    LayerFailure,
    LayerHealth,
    LayerUnavailableError,
    MemcachedLayer,
    MemoryCollector,
    MemoryLayer,
    PrometheusCollector,
)
from cachechain._errors import ERROR_TYPES
from cachechain._resilience import ResilientLayer
from cachechain.metrics import (
    BACKFILL_SKIP_REASONS,
    CIRCUIT_STATES,
    DEFAULT_BUCKETS,
    DROP_REASONS,
    OPERATIONS,
)
from cachechain.metrics._prometheus import MultiprocessFamilies, multiprocess_registry
from cachechain.testing import FakeClock, FakeLayer
from tests.support.servers import MemcachedProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = "/usr/bin/promtool"


def promtool_check(text: str) -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (name, labels) -> value."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def breaker_chain(collector: Any, clock: FakeClock) -> tuple[Chain, FakeLayer]:
    """L1 in memory, L2 a fake behind a breaker that opens at the first failure."""
    fake = FakeLayer("L2")
    breaker = CircuitBreaker("L2", max_failures=1, reset_timeout=10, clock=clock)
    chain = Chain(
        [MemoryLayer("L1"), ResilientLayer(fake, breaker=breaker)],
        name="web",
        metrics=collector,
        coherence=False,
    )
    return chain, fake


# -- item 2: every bounded label set from zero ----------------------------------------------
def test_every_bounded_series_is_exported_at_zero_before_any_event() -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    chain, _ = breaker_chain(collector, FakeClock())
    try:
        text = generate_latest(registry).decode()
    finally:
        chain.close()
    promtool_check(text)
    web = {"chain": "web"}
    for to in CIRCUIT_STATES:  # the breaker's first close and open are seen by increase()
        assert value(text, "cache_chain_circuit_transitions_total", **web, layer="L2", to=to) == 0
    for layer in ("L1", "L2"):
        for operation in OPERATIONS:
            for error_type in ERROR_TYPES:
                labels = {**web, "layer": layer, "operation": operation}
                assert value(text, "cache_chain_errors_total", **labels, error_type=error_type) == 0
        for reason in BACKFILL_SKIP_REASONS:
            name = "cache_chain_backfills_skipped_total"
            assert value(text, name, **web, layer=layer, reason=reason) == 0
        for operation in ("get", "set", "delete"):
            name = "cache_chain_operation_duration_seconds_count"
            assert value(text, name, **web, layer=layer, operation=operation) == 0
    for reason in DROP_REASONS:  # the layer with a writer
        name = "cache_chain_writes_dropped_total"
        assert value(text, name, **web, layer="L2", reason=reason) == 0
    no_writer = {**web, "layer": "L1", "reason": "closed"}
    assert value(text, "cache_chain_writes_dropped_total", **no_writer) is None
    for served_by in ("L1", "L2"):
        name = "cache_chain_requests_total"
        assert value(text, name, **web, result="hit", served_by=served_by) == 0
    assert value(text, "cache_chain_requests_total", **web, result="miss", served_by="none") == 0
    assert value(text, "cache_chain_circuit_rejected_total", **web, layer="L2") == 0
    for name, label, values in (
        ("cache_chain_fail_safe_served_total", "reason", ("loader_error", "throttled")),
        ("cache_chain_leases_total", "outcome", ("won", "timed_out")),
        ("cache_chain_loads_total", "result", ("success", "failure")),
    ):
        for v in values:
            assert value(text, name, **web, **{label: v}) == 0, (name, v)


def test_multiprocess_mode_exports_the_zeros_and_describes_every_family(tmp_path: Path) -> None:
    """In a process of its own (prometheus-client reads PROMETHEUS_MULTIPROC_DIR when it
    is imported): a chain that did nothing but get built, flushed, then scraped through
    multiprocess_registry()."""
    script = textwrap.dedent(
        """
        from cachechain import Chain, MemoryLayer, PrometheusCollector
        from cachechain.testing import FakeLayer
        from cachechain._resilience import ResilientLayer
        collector = PrometheusCollector()
        chain = Chain([MemoryLayer("L1"), ResilientLayer(FakeLayer("L2"))], name="web",
                      metrics=collector, coherence=False)
        assert collector.flush()
        collector.close()
        """
    )
    run_in_multiprocess_dir(script, tmp_path)
    text = generate_latest(multiprocess_registry(str(tmp_path))).decode()
    promtool_check(text)
    described = {f.name for f in text_string_to_metric_families(text)}
    expected = {f"cache_chain_{m.name}".removesuffix("_total") for m in cachechain.metrics.METRICS}
    assert described == expected
    web = {"chain": "web", "layer": "L2"}
    for to in CIRCUIT_STATES:
        assert value(text, "cache_chain_circuit_transitions_total", **web, to=to) == 0
    assert value(text, "cache_chain_circuit_breaker_state", **web, state="closed") == 1
    assert value(text, "cache_chain_circuit_breaker_state", **web, state="open") == 0
    name = "cache_chain_errors_total"
    assert value(text, name, **web, operation="get", error_type="timeout") == 0
    # A family no process wrote (the chain has no memcached layer) is described alone.
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["cache_chain_layer_connections"].samples == []


def run_in_multiprocess_dir(script: str, directory: Path, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


# -- item 3: buckets --------------------------------------------------------------------------
def test_buckets_resolve_an_in_process_hit_and_a_remote_call_at_its_timeout() -> None:
    assert DEFAULT_BUCKETS[0] == 0.0000005 and DEFAULT_BUCKETS[1] == 0.000001
    assert DEFAULT_BUCKETS[-1] >= 5.0
    for low, high in itertools.pairwise(DEFAULT_BUCKETS):
        assert high / low <= 2.5 + 1e-9  # 1-2.5-5 steps: no decade in one bucket
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    view = collector.bind_chain("b", ("L1", "L2"))
    for duration in (0.0000003, 0.0000007, 0.0000018, 0.0000042, 0.8):
        view.record_first_layer_hit("L1", duration)
    view.record_get("L2", True, 0.0000007)
    text = generate_latest(registry).decode()
    name = "cache_chain_operation_duration_seconds_bucket"
    labels = {"chain": "b", "layer": "L1", "operation": "get"}
    assert value(text, name, **labels, le="5e-07") == 1
    assert value(text, name, **labels, le="1e-06") == 2
    assert value(text, name, **labels, le="2.5e-06") == 3
    assert value(text, name, **labels, le="5e-06") == 4
    assert value(text, name, **labels, le="0.5") == 4
    assert value(text, name, **labels, le="1.0") == 5
    assert value(text, name, **{**labels, "layer": "L2"}, le="5e-07") == 0
    assert value(text, name, **{**labels, "layer": "L2"}, le="1e-06") == 1
    promtool_check(text)


def test_a_real_l1_hit_lands_below_ten_microseconds() -> None:
    registry = CollectorRegistry()
    chain = Chain([MemoryLayer("L1")], metrics=PrometheusCollector(registry=registry))
    chain.set("k", 1)
    for _ in range(1000):
        chain.get("k")
    chain.close()
    text = generate_latest(registry).decode()
    name = "cache_chain_operation_duration_seconds_bucket"
    labels = {"chain": "default", "layer": "L1", "operation": "get"}
    under_10us = value(text, name, **labels, le="1e-05")
    finest = value(text, name, **labels, le="5e-07")
    # Most hits land below 10 us (not 90%: one timed hit stands for 64, and a loaded CI
    # machine preempts a few), and the buckets below it exist and split them.
    assert under_10us is not None and under_10us >= 500
    assert finest is not None and finest != under_10us


# -- item 4: the state-labelled breaker gauge ------------------------------------------------
def test_the_breaker_state_gauge_is_one_for_the_current_state_only() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    memory = MemoryCollector()
    chain, fake = breaker_chain(cachechain.FanoutCollector(collector, memory), clock)

    def states() -> dict[str, float | None]:
        text = generate_latest(registry).decode()
        return {
            s: value(text, "cache_chain_circuit_breaker_state", chain="web", layer="L2", state=s)
            for s in CIRCUIT_STATES
        }

    assert states() == {"closed": 1, "open": 0, "half_open": 0}
    fake.fail = LayerUnavailableError("down", layer="L2")
    chain.get("x")
    assert states() == {"closed": 0, "open": 1, "half_open": 0}
    clock.advance(11)
    assert chain.breakers["L2"].state is cachechain.CircuitState.HALF_OPEN
    assert states() == {"closed": 0, "open": 0, "half_open": 1}
    text = generate_latest(registry).decode()
    assert value(text, "cache_chain_circuit_state", chain="web", layer="L2") == 2  # kept
    chain.close()


def test_breaker_states_of_several_chains_merge_per_state() -> None:
    """Two chains of one name on one collector (or two workers): an open one and a
    half-open one show open=1 and half_open=1, never hidden behind the larger code."""
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    first = collector.bind_chain("web", ("L1", "L2"))
    second = collector.bind_chain("web", ("L1", "L2", "L3"))
    first.record_circuit_state("L2", 1)
    second.record_circuit_state("L2", 2)
    text = generate_latest(registry).decode()
    got = {
        s: value(text, "cache_chain_circuit_breaker_state", chain="web", layer="L2", state=s)
        for s in CIRCUIT_STATES
    }
    assert got == {"closed": 0, "open": 1, "half_open": 1}
    assert value(text, "cache_chain_circuit_state", chain="web", layer="L2") == 2


def test_breaker_states_across_processes_aggregate_with_livemax(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from cachechain import PrometheusCollector
        collector = PrometheusCollector()
        view = collector.bind_chain("web", ("L1", "L2"))
        view.record_circuit_state("L2", int(sys.argv[1]))
        assert collector.flush()
        import time; time.sleep(0.2)
        collector.close()
        """
    )
    # Two live processes at once: one open, one half-open.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script + "\nimport time; time.sleep(30)\n", state],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
        )
        for state in ("1", "2")
    ]
    try:
        for proc in procs:  # wait until both wrote their files
            for _ in range(600):
                names = os.listdir(tmp_path)
                if any(str(proc.pid) in n and "livemax" in n for n in names):
                    break
                subprocess.run(["sleep", "0.05"], check=True)
        text = generate_latest(multiprocess_registry(str(tmp_path))).decode()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    got = {
        s: value(text, "cache_chain_circuit_breaker_state", chain="web", layer="L2", state=s)
        for s in CIRCUIT_STATES
    }
    assert got == {"closed": 0, "open": 1, "half_open": 1}
    promtool_check(text)


# -- item 5: invisible work -------------------------------------------------------------------
def test_a_backfill_skipped_while_the_breaker_is_open_is_counted() -> None:
    clock = FakeClock()
    collector = MemoryCollector()
    fake = FakeLayer("L2")
    breaker = CircuitBreaker("L2", max_failures=1, reset_timeout=10, clock=clock)
    l3 = FakeLayer("L3", local=True)
    chain = Chain(
        [MemoryLayer("L1"), ResilientLayer(fake, breaker=breaker), l3],
        metrics=collector,
        coherence=False,
    )
    try:
        fake.fail = LayerUnavailableError("down", layer="L2")
        assert chain.get("x") is None  # opens L2's breaker
        l3.data["k"] = ("v", None)
        assert chain.get("k") == "v"  # from L3: L1 filled, L2 skipped (open)
        snap = collector.snapshot().layer_metrics
        assert snap["L2"].backfills_skipped == 1
        assert snap["L2"].backfills_skipped_by_reason == {"circuit_open": 1}
        assert snap["L1"].backfills_skipped == 0
        assert snap["L2"].circuit_rejected >= 1  # the get of "k" refused at L2
    finally:
        chain.close()


def test_repairs_pending_are_apart_from_the_queue_depth() -> None:
    collector = MemoryCollector()
    l2 = FakeLayer("L2")
    chain = Chain(
        [MemoryLayer("L1"), LayerConfig(layer=l2, resilient=False)],
        metrics=collector,
        coherence=False,
    )
    try:
        l2.fail = LayerUnavailableError("down")
        assert chain.delete("a") is False and chain.delete("b") is False
        assert not chain.flush(10)  # both repairs failed again: they wait
        layer = collector.snapshot().layer_metrics["L2"]
        assert (layer.repairs_pending, layer.queue_depth) == (2, 0)
        l2.fail = None
        assert chain.flush(10)
        layer = collector.snapshot().layer_metrics["L2"]
        assert (layer.repairs_pending, layer.queue_depth) == (0, 0)
    finally:
        chain.close()


def test_a_memcached_layers_own_figures_are_exported(memcached: MemcachedProcess) -> None:
    """Real memcached, and a second server that is not there (a cluster node down)."""
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    dead = f"127.0.0.1:{free_port()}"
    l2 = MemcachedLayer("L2", [memcached.address, dead], timeout=0.5, connect_timeout=0.2)
    # The dead node's misses must not open L2's breaker: the corrupt read below must
    # reach the layer (which keys fall on the dead node depends on the hash seed).
    never_opens = BreakerConfig(max_failures=10_000)
    chain = Chain(
        [MemoryLayer("L1"), l2], name="mc", metrics=collector, coherence=False, breaker=never_opens
    )
    try:
        for i in range(40):  # some of these keys live on the dead node
            chain.get(f"k{i}")
        bad = next(k for k in (f"bad{i}" for i in range(100)) if _stored(l2, k))
        other = Client(("127.0.0.1", memcached.port))  # another program, waiting for its
        other.set(bad.encode(), b"written by another program", noreply=False)  # reply
        corrupt_before = l2.stats().corrupt_values
        chain.get(bad)
        assert l2.stats().corrupt_values == corrupt_before + 1
        text = generate_latest(registry).decode()
        stats = l2.stats()
    finally:
        chain.close()
    labels = {"chain": "mc", "layer": "L2"}
    assert stats.nodes_down == 1
    assert value(text, "cache_chain_layer_nodes_down", **labels) == 1
    assert value(text, "cache_chain_layer_connections", **labels) == stats.connections_open >= 1
    assert value(text, "cache_chain_layer_corrupt_values_total", **labels) == 1
    assert value(text, "cache_chain_layer_pool_exhausted_total", **labels) == 0
    assert value(text, "cache_chain_layer_connections", chain="mc", layer="L1") is None
    promtool_check(text)


def _stored(layer: MemcachedLayer, key: str) -> bool:
    """Whether ``key`` lives on a live server of ``layer`` (a set of it works)."""
    try:
        layer.set(key, 1)
    except LayerUnavailableError:
        return False
    return True


class _Wrapper(cachechain.layers.LayerProxy):
    """An application's proxy (as the demo's fault injector is): no stats of its own."""

    @property
    def local(self) -> bool:
        return False


def test_a_memcached_layer_behind_a_proxy_is_still_seen(memcached: MemcachedProcess) -> None:
    registry = CollectorRegistry()
    l2 = MemcachedLayer("L2", memcached.address, timeout=0.5)
    chain = Chain(
        [MemoryLayer("L1"), _Wrapper(l2)],
        name="px",
        metrics=PrometheusCollector(registry=registry),
        coherence=False,  # the journal's polls share the pool: one connection, exactly
    )
    try:
        chain.set("k", 1)
        text = generate_latest(registry).decode()
        health = chain.health().layer("L2")
    finally:
        chain.close()
    assert value(text, "cache_chain_layer_connections", chain="px", layer="L2") == 1
    assert value(text, "cache_chain_layer_nodes_down", chain="px", layer="L2") == 0
    assert (health.type, health.nodes, health.nodes_down) == ("MemcachedLayer", 1, 0)
    info = [labels for name, labels in samples(text) if name == "cache_chain_layer_info"]
    layer2 = [dict(labels) for labels in info if ("layer", "L2") in labels]
    assert [labels["type"] for labels in layer2] == ["MemcachedLayer"]  # not the proxy


class _PoolFigures:
    """A stats() that counts what a memcached layer counts (the fault is the point)."""

    def __init__(self) -> None:
        self.pool_exhausted = 0
        self.corrupt_values = 0
        self.connections_open = 3
        self.nodes_down = 0


class _StatsLayer(FakeLayer):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.figures = _PoolFigures()

    def stats(self) -> _PoolFigures:
        return self.figures


def test_polled_counters_are_reported_as_increments_once() -> None:
    collector = MemoryCollector()
    l2 = _StatsLayer("L2")
    chain = Chain([MemoryLayer("L1"), l2], metrics=collector, coherence=False)
    try:
        l2.figures.pool_exhausted = 4
        assert collector.snapshot().layer_metrics["L2"].pool_exhausted == 4
        assert collector.snapshot().layer_metrics["L2"].pool_exhausted == 4  # not again
        l2.figures.pool_exhausted, l2.figures.corrupt_values = 6, 2
        l2.figures.nodes_down = 1
        layer = collector.snapshot().layer_metrics["L2"]
        assert (layer.pool_exhausted, layer.corrupt_values) == (6, 2)
        assert (layer.connections, layer.nodes_down) == (3, 1)
    finally:
        chain.close()


# -- item 7: info series and health ----------------------------------------------------------
def test_the_info_series_describe_the_chain_and_its_layers(memcached: MemcachedProcess) -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(registry=registry)
    l2 = MemcachedLayer("L2", memcached.address, timeout=0.25)
    chain = Chain(
        [MemoryLayer("L1"), l2],
        name="web",
        metrics=collector,
        breaker=cachechain.BreakerConfig(max_failures=7, reset_timeout=2.5),
    )
    try:
        text = generate_latest(registry).decode()
    finally:
        chain.close()
    info = {
        "chain": "web",
        "version": cachechain.__version__,
        "layers": "MemoryLayer,MemcachedLayer",
    }
    assert value(text, "cache_chain_info", **info) == 1
    layer2 = {
        "chain": "web",
        "layer": "L2",
        "type": "MemcachedLayer",
        "timeout_seconds": "0.25",
        "breaker_max_failures": "7",
        "breaker_reset_timeout_seconds": "2.5",
    }
    assert value(text, "cache_chain_layer_info", **layer2) == 1
    layer1 = {
        "chain": "web",
        "layer": "L1",
        "type": "MemoryLayer",
        "timeout_seconds": "none",
        "breaker_max_failures": "none",
        "breaker_reset_timeout_seconds": "none",
    }
    assert value(text, "cache_chain_layer_info", **layer1) == 1
    promtool_check(text)


def test_health_reports_breakers_errors_queues_and_repairs() -> None:
    clock = FakeClock()
    chain, fake = breaker_chain(None, clock)  # no metrics: health needs none
    try:
        health = chain.health()
        assert isinstance(health, ChainHealth) and health.healthy
        assert [layer.name for layer in health.layers] == ["L1", "L2"]
        l1, l2 = health.layers
        assert (l1.breaker, l1.queue_depth, l1.last_error) == (None, None, None)
        assert (l2.breaker, l2.queue_depth, l2.repairs_pending) == ("closed", 0, 0)
        assert l2.queue_capacity is not None and l2.queue_capacity > 0
        fake.fail = LayerUnavailableError("memcached went away", layer="L2")
        chain.get("x")  # opens the breaker
        chain.delete("y")  # refused: a repair is queued
        health = chain.health()
        l2 = health.layer("L2")
        assert isinstance(l2, LayerHealth) and not health.healthy and not l2.healthy
        assert l2.breaker == "open"
        assert isinstance(l2.last_error, LayerFailure)
        assert l2.last_error.type == "LayerUnavailableError"
        assert "memcached went away" in l2.last_error.message
        assert l2.repairs_pending == 1
        doc = json.loads(json.dumps(health.as_dict(now=l2.last_error.at + 5)))
        assert doc["healthy"] is False and doc["name"] == "web"
        assert doc["layers"][1]["breaker"] == "open"
        assert doc["layers"][1]["last_error"]["age_seconds"] == 5
        assert doc["layers"][1]["repairs_pending"] == 1
        with pytest.raises(KeyError):
            health.layer("L9")
    finally:
        chain.close()
    assert chain.health().closed and not chain.health().healthy


class _BrokenStats(FakeLayer):
    def stats(self) -> Any:
        raise RuntimeError("stats broke")


def test_health_never_raises_for_a_layer_that_cannot_tell() -> None:
    chain = Chain([MemoryLayer("L1"), _BrokenStats("L2", local=True)], coherence=False)
    try:
        health = chain.health()
        assert health.layer("L2").nodes_down is None and health.healthy
    finally:
        chain.close()


def test_health_of_a_memcached_layer_counts_nodes_down(memcached: MemcachedProcess) -> None:
    dead = f"127.0.0.1:{free_port()}"
    l2 = MemcachedLayer("L2", [memcached.address, dead], timeout=0.5, connect_timeout=0.2)
    chain = Chain([MemoryLayer("L1"), l2], coherence=False)
    try:
        for i in range(40):
            chain.get(f"k{i}")
        layer = chain.health().layer("L2")
        assert (layer.type, layer.nodes, layer.nodes_down) == ("MemcachedLayer", 2, 1)
        assert not layer.healthy
    finally:
        chain.close()


# -- item 8: multiprocess rough edges ---------------------------------------------------------
def test_a_pre_forking_master_does_not_count_among_live_processes(tmp_path: Path) -> None:
    """gunicorn --preload: the master builds and uses a chain at import time, then forks
    a worker. Only the worker's gauges may count in livesum/livemax."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from cachechain import Chain, MemoryLayer, PrometheusCollector
        from cachechain.testing import FakeLayer
        collector = PrometheusCollector(flush_interval=60)
        chain = Chain([MemoryLayer("L1"), FakeLayer("L2", local=True)], name="web",
                      metrics=collector, coherence=False)
        chain.get("used at import time")
        assert collector.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            assert collector.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        assert collector.flush()  # the master goes on living (and flushing)
        print("worker", pid)
        """
    )
    out = run_in_multiprocess_dir(script, tmp_path)
    # Python 3.12+ warns that a multi-threaded process forks (on stderr, in ``out``).
    found = re.search(r"^worker (\d+)$", out, re.M)
    assert found is not None, out
    worker = int(found.group(1))
    # The worker has exited: its live gauges are dropped, as gunicorn's child_exit does.
    from prometheus_client import multiprocess

    cast(Any, multiprocess).mark_process_dead(worker, str(tmp_path))
    text = generate_latest(multiprocess_registry(str(tmp_path))).decode()
    labels = {"chain": "web", "layer": "L2"}
    # Only the (dead) worker had the queue: the master's capacity no longer counts.
    assert value(text, "cache_chain_queue_capacity", **labels) == 0
    # Counters the master recorded at import time are real and stay.
    miss = {"chain": "web", "result": "miss", "served_by": "none"}
    assert value(text, "cache_chain_requests_total", **miss) == 1


def test_a_missing_multiprocess_directory_fails_loudly(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    script = textwrap.dedent(
        """
        from cachechain import PrometheusCollector, ConfigError
        try:
            PrometheusCollector()
        except ConfigError as exc:
            print("refused:", exc)
        """
    )
    out = run_in_multiprocess_dir(script, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(missing))
    assert "refused:" in out and "not-there" in out


def test_a_directory_removed_later_is_warned_about_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    from cachechain.metrics import _prometheus

    collector = PrometheusCollector(multiprocess=True, flush_interval=3600)
    try:
        assert collector.flush()
        for f in directory.iterdir():
            f.unlink()
        directory.rmdir()
        with caplog.at_level(logging.WARNING, "cachechain.metrics"):
            assert not collector.flush()
            assert not collector.flush()  # within WARN_EVERY: not warned again
            monkeypatch.setattr(_prometheus, "WARN_EVERY", 0.0)
            assert not collector.flush()
        warned = [r for r in caplog.records if "not exported" in r.getMessage()]
        assert len(warned) == 2 and collector.flush_failures == 3
        directory.mkdir()
        collector._writer.forget()  # type: ignore[union-attr]
        assert collector.flush()
    finally:
        collector.close()
    with pytest.raises(ConfigError):
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "gone"))
        PrometheusCollector(multiprocess=True)


def test_multiprocess_families_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MultiprocessFamilies(str(tmp_path / "nope"))


def test_the_documented_flask_view_sends_one_charset() -> None:
    flask = pytest.importorskip("flask")
    from prometheus_client import CONTENT_TYPE_LATEST

    text = (ROOT / "docs" / "metrics.md").read_text()
    assert "mimetype=CONTENT_TYPE_LATEST" not in text
    assert "content_type=CONTENT_TYPE_LATEST" in text
    app = flask.Flask("metrics")
    registry = CollectorRegistry()

    @app.get("/metrics")  # type: ignore[untyped-decorator]
    def metrics_view() -> Any:  # as docs/metrics.md writes it
        return flask.Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    response = app.test_client().get("/metrics")
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert response.headers["Content-Type"].count("charset") == 1


EXAMPLE_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("flask_example_app", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
client = module.app.test_client()
assert client.get("/square/3").text == "3 squared is 9"
metrics = client.get("/metrics")
health = client.get("/healthz")
print(json.dumps({
    "status": metrics.status_code,
    "content_type": metrics.headers["Content-Type"],
    "body": metrics.text,
    "health_status": health.status_code,
    "health": health.json,
}))
module.app.extensions["cache"][module.cache].close()
"""


@pytest.mark.parametrize("multiprocess", [False, True])
def test_the_flask_example_serves_metrics_and_health(
    memcached: MemcachedProcess, tmp_path: Path, multiprocess: bool
) -> None:
    pytest.importorskip("flask_caching")
    from prometheus_client import CONTENT_TYPE_LATEST

    env = {**os.environ, "CACHECHAIN_MEMCACHED": memcached.address}
    env["CACHECHAIN_EXAMPLE_METRICS"] = "1"
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if multiprocess:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    app = ROOT / "examples" / "flask_app" / "app.py"
    result = subprocess.run(
        [sys.executable, "-c", EXAMPLE_SCRIPT, str(app)],
        env=env,
        cwd=ROOT / "examples" / "flask_app",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["status"] == 200
    assert got["content_type"] == CONTENT_TYPE_LATEST  # one charset
    assert got["content_type"].count("charset") == 1
    if not multiprocess:  # in multiprocess mode the figures are flushed every second
        layers = {"chain": "flask-example", "layer": "L2", "type": "MemcachedLayer"}
        assert any(
            name == "cache_chain_layer_info" and set(layers.items()) <= labels
            for name, labels in samples(got["body"])
        )
    assert "# TYPE cache_chain_circuit_breaker_state gauge" in got["body"]
    promtool_check(got["body"])
    assert got["health_status"] == 200 and got["health"]["healthy"] is True
    assert [layer["name"] for layer in got["health"]["layers"]] == ["L1", "L2"]
    assert got["health"]["layers"][1]["breaker"] == "closed"


@pytest.mark.parametrize(
    "buckets", [(0.001,), (0.001, 0.01), (0.001, 0.01, 0.1), (0.001, 0.01, 0.1, 1.0)]
)
def test_the_bucket_search_is_exact_for_few_buckets(buckets: tuple[float, ...]) -> None:
    """The first buckets are found by comparisons, the others by a binary search: every
    duration lands where ``le`` says, bounds themselves included, however few buckets."""
    registry = CollectorRegistry()
    view = PrometheusCollector(registry=registry, buckets=buckets).bind_chain("f", ("L1",))
    durations = [0.0, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]
    for d in durations:
        view.record_first_layer_hit("L1", d)
        view.record_get("L1", False, d)
    text = generate_latest(registry).decode()
    name = "cache_chain_operation_duration_seconds_bucket"
    labels = {"chain": "f", "layer": "L1", "operation": "get"}
    for bound in buckets:
        expected = 2 * sum(1 for d in durations if d <= bound)
        assert value(text, name, **labels, le=str(bound)) == expected, bound
    assert value(text, name, **labels, le="+Inf") == 2 * len(durations)
