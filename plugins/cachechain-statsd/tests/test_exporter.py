"""StatsdExporter against a plain UDP receiver: names, batching, bounds, failures."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import pytest
from cachechain import Chain, MemoryLayer
from cachechain._errors import ConfigError
from cachechain.metrics import COUNTER, GAUGE, HISTOGRAM, METRICS, RECORDS
from cachechain.metrics._base import MetricsCollector

import cachechain_statsd
from cachechain_statsd import _series as series_module
from cachechain_statsd import exporter as exporter_module
from cachechain_statsd.exporter import StatsdExporter

from .conftest import Receiver


def make(receiver: Receiver, **options: Any) -> StatsdExporter:
    """An exporter sending to ``receiver``, without its thread unless asked."""
    options.setdefault("start", False)
    options.setdefault("environ", {})
    return StatsdExporter("127.0.0.1", receiver.port, **options)


def flushed(x: StatsdExporter, receiver: Receiver) -> list[str]:
    """Flush ``x`` and return every line ``receiver`` got from this flush."""
    before = x.stats().packets_sent
    assert x.flush()
    got = receiver.receive(x.stats().packets_sent - before)
    return [line for d in got for line in d.decode("ascii").split("\n") if line]


def parse(lines: list[str]) -> dict[str, list[str]]:
    """``{"name": ["3|c", ...]}`` for the lines given."""
    out: dict[str, list[str]] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        out.setdefault(name, []).append(rest)
    return out


# -- names ---------------------------------------------------------------------------------


def test_plain_names_cover_every_record_method(receiver: Receiver) -> None:
    x = make(receiver, timer_sample_rate=1.0)
    m = x.bind_chain("web", ["L1", "L2"])
    m.record_get("L1", True, 0.001)
    m.record_get("L1", False, 0.002)
    m.record_get("L2", True, 0.003)
    m.record_chain_get(True, 1, 0.004)
    m.record_chain_get(False, -1, 0.005)
    m.record_first_layer_hit("L1", 0.0005)
    m.record_set("L2", True, 0.001)
    m.record_set("L2", False, 0.001)
    m.record_delete("L2", True, 0.001)
    m.record_delete("L2", False, 0.001)
    m.record_async_write("L2", True, 0.002)
    m.record_async_write("L2", False, 0.002)
    m.record_error("L2", "get", "timeout")
    m.record_write_dropped("L2", "queue_full")
    m.record_queue_depth("L2", 7)
    m.record_queue_capacity("L2", 100)
    m.record_circuit_state("L2", 0)
    m.record_circuit_state("L2", 1)
    m.record_circuit_rejected("L2")
    m.record_load(True, 0.01)
    m.record_load(False, 0.01)
    m.record_singleflight_shared()
    m.record_evictions("L1", 3)
    m.record_entries("L1", 42)
    got = parse(flushed(x, receiver))
    p = "cache_chain.web"
    expected_counters = {
        f"{p}.L1.hits": "2|c",
        f"{p}.L1.misses": "1|c",
        f"{p}.L2.hits": "1|c",
        f"{p}.requests.hit.L1": "1|c",
        f"{p}.requests.hit.L2": "1|c",
        f"{p}.requests.miss.none": "1|c",
        f"{p}.L2.operations.set.success": "1|c",
        f"{p}.L2.operations.set.failure": "1|c",
        f"{p}.L2.operations.delete.success": "1|c",
        f"{p}.L2.operations.delete.failure": "1|c",
        f"{p}.L2.async_writes.success": "1|c",
        f"{p}.L2.async_writes.failure": "1|c",
        f"{p}.L2.errors.get.timeout": "1|c",
        f"{p}.L2.writes_dropped.queue_full": "1|c",
        f"{p}.L2.circuit_transitions.open": "1|c",
        f"{p}.L2.circuit_rejected": "1|c",
        f"{p}.loads.success": "1|c",
        f"{p}.loads.failure": "1|c",
        f"{p}.singleflight_shared": "1|c",
        f"{p}.L1.evictions": "3|c",
    }
    for name, line in expected_counters.items():
        assert got.get(name) == [line], name
    assert got[f"{p}.L2.queue_depth"] == ["7|g"]
    assert got[f"{p}.L2.queue_capacity"] == ["100|g"]
    assert got[f"{p}.L2.circuit_state"] == ["1|g"]
    assert got[f"{p}.L1.entries"] == ["42|g"]
    # Timers in milliseconds; the first-layer hit feeds both timers it stands for.
    assert sorted(got[f"{p}.L1.operation_duration.get"]) == [
        "0.500000|ms",
        "1.000000|ms",
        "2.000000|ms",
    ]
    assert sorted(got[f"{p}.request_duration.hit"]) == ["0.500000|ms", "4.000000|ms"]
    assert got[f"{p}.request_duration.miss"] == ["5.000000|ms"]
    assert got[f"{p}.L2.operation_duration.set"] == ["1.000000|ms"] * 2
    assert got[f"{p}.L2.operation_duration.delete"] == ["1.000000|ms"] * 2
    assert got[f"{p}.L2.async_write_duration"] == ["2.000000|ms"] * 2
    assert got[f"{p}.load_duration"] == ["10.000000|ms"] * 2
    # Nothing else: every line is one of the above.
    assert all(name.startswith(p) for name in got)
    x.close()


def test_every_metric_of_the_catalogue_is_sent_under_its_statsd_name(receiver: Receiver) -> None:
    """The names and kinds come from cachechain's catalogue: a counter is ``|c``, a
    histogram a timer, a gauge ``|g``, each under the metric's StatsD name."""
    x = make(receiver, tags=True, timer_sample_rate=1.0)
    m = x.bind_chain("web", ["L1", "L2"])
    named = {"layer": "L2", "hit": True, "success": True, "state": 1, "layer_index": 1}
    named |= {"reason": "closed", "operation": "get", "error_type": "timeout"}
    named |= {"outcome": "stored"}
    m.record_circuit_state("L2", 0)  # a transition needs a state before it
    m.record_get("L2", False, 0.001)  # a miss
    for rec in RECORDS:  # every method once, its arguments made from its parameters
        by_type = {float: 0.001, int: 3}
        getattr(m, rec.name)(*[named.get(p.name, by_type.get(p.type)) for p in rec.params])
    sent = {
        line.split(":")[0].removeprefix("cache_chain."): line.split("|")[1]
        for line in flushed(x, receiver)
    }
    kinds = {COUNTER: "c", GAUGE: "g", HISTOGRAM: "ms"}
    assert sent.pop("statsd_exporter.dropped_samples", "c") == "c"
    # Metrics no record feeds (info metrics, series derived by the Prometheus side)
    # have nothing for a StatsD exporter to send.
    assert sent == {metric.statsd: kinds[metric.kind] for metric in METRICS if metric.feeds}
    x.close()


def test_a_second_flush_sends_only_what_changed(receiver: Receiver) -> None:
    x = make(receiver, timer_sample_rate=0)
    m = x.bind_chain("c", ["L1"])
    m.record_get("L1", True, 0.001)
    m.record_queue_depth("L1", 3)
    assert parse(flushed(x, receiver)) == {
        "cache_chain.c.L1.hits": ["1|c"],
        "cache_chain.c.L1.queue_depth": ["3|g"],
    }
    m.record_get("L1", True, 0.001)
    m.record_get("L1", True, 0.001)
    # Counters are sent as their increase; gauges are sent again at every flush.
    assert parse(flushed(x, receiver)) == {
        "cache_chain.c.L1.hits": ["2|c"],
        "cache_chain.c.L1.queue_depth": ["3|g"],
    }
    x.close()


def test_tags_mode_puts_labels_in_dogstatsd_tags(receiver: Receiver) -> None:
    x = make(receiver, tags=True, prefix="app", timer_sample_rate=0.5)
    m = x.bind_chain("web", ["L1"])
    m.record_first_layer_hit("L1", 0.002)
    m.record_first_layer_hit("L1", 0.002)
    m.record_error("L1", "get", "other")
    lines = set(flushed(x, receiver))
    assert "app.hits:2|c|#chain:web,layer:L1" in lines
    assert "app.requests:2|c|#chain:web,result:hit,served_by:L1" in lines
    assert "app.errors:1|c|#chain:web,layer:L1,operation:get,error_type:other" in lines
    # One hit in two keeps its duration, sent with the rate for StatsD to scale by.
    assert "app.operation_duration:2.000000|ms|@0.5|#chain:web,layer:L1,operation:get" in lines
    assert "app.request_duration:2.000000|ms|@0.5|#chain:web,result:hit" in lines
    assert len(lines) == 5
    x.close()


def test_names_are_sanitized(receiver: Receiver) -> None:
    x = make(receiver, prefix=" my-app..cache ", timer_sample_rate=0)
    m = x.bind_chain("shop front", ["L1:mem"])
    m.record_get("L1:mem", False, 0.0)
    assert flushed(x, receiver) == ["my_app.cache.shop_front.L1_mem.misses:1|c"]
    x.close()


def test_empty_prefix_and_root_level_records_go_to_the_default_chain(receiver: Receiver) -> None:
    x = make(receiver, prefix="", timer_sample_rate=0)
    x.record_get("L1", True, 0.0)
    x.record_set("L1", True, 0.0)
    x.record_delete("L1", True, 0.0)
    x.record_first_layer_hit("L1", 0.0)
    x.record_chain_get(True, 0, 0.0)
    x.record_circuit_state("L1", 2)
    x.record_queue_depth("L1", 1)
    x.record_queue_capacity("L1", 2)
    x.record_write_dropped("L1", "closed")
    x.record_async_write("L1", True, 0.0)
    x.record_error("L1", "set", "backend")
    x.record_circuit_rejected("L1")
    x.record_load(True, 0.0)
    x.record_singleflight_shared()
    x.record_evictions("L1", 0)  # nothing to add
    x.record_entries("L1", 5)
    got = parse(flushed(x, receiver))
    assert got["default.L1.hits"] == ["2|c"]
    # Layer index 0 of a chain bound without layers has no name: the index stands in.
    assert got["default.requests.hit.0"] == ["2|c"]
    assert got["default.L1.circuit_state"] == ["2|g"]
    assert got["default.L1.writes_dropped.closed"] == ["1|c"]
    assert "default.L1.evictions" not in got
    x.close()


def test_a_chains_polled_figures_are_sent_at_each_flush(receiver: Receiver) -> None:
    """Entries, evictions and queue depth are polled: the chain's refresh hook must run
    before each flush, or a real chain never reports them."""
    x = make(receiver, timer_sample_rate=0)
    chain = Chain([MemoryLayer("L1", maxsize=2), MemoryLayer("L2")], name="web", metrics=x)
    for key in "abcd":
        chain.set(key, 1)  # L1 holds 2: two evictions
    got = parse(flushed(x, receiver))
    assert got["cache_chain.web.L1.entries"] == ["2|g"]
    assert got["cache_chain.web.L2.entries"] == ["4|g"]
    assert got["cache_chain.web.L1.evictions"] == ["2|c"]
    assert got["cache_chain.web.L2.queue_depth"] == ["0|g"]
    chain.set("e", 1)  # one more eviction, sent as the increase
    got = parse(flushed(x, receiver))
    assert got["cache_chain.web.L1.evictions"] == ["1|c"]
    chain.close()  # a closed chain's hook is dropped; the flush still works
    x.add_refresh_hook(lambda: 1 / 0)  # a failing hook is logged once, sends go on
    assert x.flush() and x.flush()
    x.close()


def test_bind_chain_returns_one_view_per_chain_and_layers(receiver: Receiver) -> None:
    x = make(receiver, timer_sample_rate=0)
    a = x.bind_chain("a", ["L1"])
    assert x.bind_chain("a", ["L1"]) is a
    b = x.bind_chain("b", ["L1"])
    assert b is not a and "'b'" in repr(b)
    a.record_first_layer_hit("L1", 0.0)
    b.record_first_layer_hit("L1", 0.0)
    b.record_first_layer_hit("other", 0.0)  # not the first layer: counted the long way
    got = parse(flushed(x, receiver))
    assert got["cache_chain.a.L1.hits"] == ["1|c"]
    assert got["cache_chain.b.L1.hits"] == ["1|c"]
    assert got["cache_chain.b.other.hits"] == ["1|c"]
    assert got["cache_chain.b.requests.hit.L1"] == ["2|c"]
    x.close()


def test_circuit_transitions_are_counted_only_on_change(receiver: Receiver) -> None:
    x = make(receiver)
    m = x.bind_chain("c", ["L2"])
    for state in (0, 0, 1, 1, 2, 0, 7):
        m.record_circuit_state("L2", state)
    got = parse(flushed(x, receiver))
    assert got["cache_chain.c.L2.circuit_transitions.open"] == ["1|c"]
    assert got["cache_chain.c.L2.circuit_transitions.half_open"] == ["1|c"]
    assert got["cache_chain.c.L2.circuit_transitions.closed"] == ["1|c"]
    assert got["cache_chain.c.L2.circuit_transitions.7"] == ["1|c"]
    assert got["cache_chain.c.L2.circuit_state"] == ["7|g"]
    x.close()


# -- counts are exact, timers are sampled and bounded --------------------------------------


def test_counters_are_exact_under_threads(receiver: Receiver) -> None:
    x = make(receiver, timer_sample_rate=0.001)
    m = x.bind_chain("c", ["L1", "L2"])
    threads, per_thread = 8, 20_000
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for _ in range(per_thread):
            m.record_first_layer_hit("L1", 0.0)
            m.record_get("L2", False, 0.0)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    got = parse(flushed(x, receiver))
    total = threads * per_thread
    assert got["cache_chain.c.L1.hits"] == [f"{total}|c"]
    assert got["cache_chain.c.requests.hit.L1"] == [f"{total}|c"]
    assert got["cache_chain.c.L2.misses"] == [f"{total}|c"]
    # Every 1000th event keeps its duration.
    assert len(got["cache_chain.c.L1.operation_duration.get"]) == total // 1000
    assert len(got["cache_chain.c.L2.operation_duration.get"]) == total // 1000
    x.close()


def test_sample_rate_is_rounded_to_one_in_n_and_zero_turns_timers_off(receiver: Receiver) -> None:
    x = make(receiver, timer_sample_rate=0.3)
    assert x.sample_period == 3
    assert x.timer_sample_rate == pytest.approx(1 / 3)
    m = x.bind_chain("c", ["L1"])
    for _ in range(9):
        m.record_first_layer_hit("L1", 0.001)
    got = parse(flushed(x, receiver))
    # 3 values standing for 9 events: StatsD counts 3 / (1/3) = 9.
    assert got["cache_chain.c.L1.operation_duration.get"] == ["1.000000|ms|@0.3333333333"] * 3
    x.close()

    off = make(receiver, timer_sample_rate=0)
    m = off.bind_chain("c", ["L1"])
    for _ in range(5):
        m.record_first_layer_hit("L1", 0.001)
        m.record_get("L1", False, 0.001)
    assert parse(flushed(off, receiver)) == {
        "cache_chain.c.L1.hits": ["5|c"],
        "cache_chain.c.L1.misses": ["5|c"],
        "cache_chain.c.requests.hit.L1": ["5|c"],
    }
    off.close()


def test_a_full_buffer_drops_samples_and_counts_them(receiver: Receiver) -> None:
    x = make(receiver, timer_sample_rate=1.0, max_samples=5)
    m = x.bind_chain("c", ["L1"])
    for _ in range(20):
        m.record_first_layer_hit("L1", 0.001)
        m.record_get("L1", False, 0.001)
    assert x.stats().dropped_samples == 15 + 15
    got = parse(flushed(x, receiver))
    assert got["cache_chain.c.L1.hits"] == ["20|c"]  # counts stay exact
    assert len(got["cache_chain.c.L1.operation_duration.get"]) == 5 + 5
    assert got["cache_chain.statsd_exporter.dropped_samples"] == ["30|c"]
    # The buffers are empty again after the flush.
    m.record_first_layer_hit("L1", 0.001)
    got = parse(flushed(x, receiver))
    assert got["cache_chain.c.L1.operation_duration.get"] == ["1.000000|ms"]
    x.close()


def test_too_many_series_are_dropped_and_counted(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(series_module, "MAX_SERIES", 30)
    x = make(receiver, timer_sample_rate=1.0)
    m = x.bind_chain("c", ["L1"])  # about 20 series
    for i in range(40):
        m.record_error(f"X{i}", "get", "other")
        m.record_load(True, 0.0)
        m.record_queue_depth(f"X{i}", i)
    for i in range(40):
        x._gauge(f"g{i}", i)
    stats = x.stats()
    assert stats.dropped_series > 0
    names = parse(flushed(x, receiver))
    assert len(names) <= 30 + 30 + 1
    x.close()


def test_lines_are_packed_into_datagrams_of_at_most_max_udp_size(receiver: Receiver) -> None:
    x = make(receiver, timer_sample_rate=1.0, max_udp_size=200, max_packets=1000)
    m = x.bind_chain("c", ["L1"])
    for _ in range(100):
        m.record_first_layer_hit("L1", 0.001)
    before = x.stats()
    lines = flushed(x, receiver)
    assert len(lines) == 2 + 2 * 100  # two counters, two timers of 100 values
    assert all(len(d) <= 200 for d in receiver.datagrams)
    stats = x.stats()
    # Batched: several lines per datagram, far fewer datagrams than operations.
    assert 10 < stats.packets_sent - before.packets_sent < 100
    assert stats.lines_sent - before.lines_sent == len(lines)
    x.close()


def kinds_in_order(datagrams: list[bytes]) -> list[str]:
    """The kind (``c``, ``g``, ``ms``) of every line of ``datagrams``, in sending order."""
    lines = [line for d in datagrams for line in d.decode("ascii").split("\n")]
    return [line.split("|")[1] for line in lines]


def test_a_flush_of_many_series_is_split_into_datagrams_counters_first(
    receiver: Receiver,
) -> None:
    """Issue 13: a flush packs every line into datagrams of at most ``max_udp_size``
    bytes, counters first, then gauges, then timer values; counts stay exact."""
    x = make(receiver, timer_sample_rate=1.0, max_udp_size=512, max_packets=10_000)
    m = x.bind_chain("c", ["L1", "L2"])
    for i in range(300):  # 300 counter series, recorded between the timed calls
        m.record_get("L1", True, 0.001)
        m.record_error("L2", "get", f"Err{i}")
        m.record_queue_depth(f"Q{i % 40}", i)
        m.record_error("L2", "get", f"Err{i}")
    before = len(receiver.datagrams)
    lines = flushed(x, receiver)
    datagrams = receiver.datagrams[before:]
    assert len(datagrams) > 10 and all(len(d) <= 512 for d in datagrams)
    kinds = kinds_in_order(datagrams)
    assert kinds == sorted(kinds, key=["c", "g", "ms"].index), kinds
    assert kinds.count("ms") == 300 and kinds.count("g") == 40
    got = parse(lines)
    assert all(got[f"cache_chain.c.L2.errors.get.Err{i}"] == ["2|c"] for i in range(300))
    assert got["cache_chain.c.L1.hits"] == ["300|c"]
    x.close()


def test_the_datagram_budget_leaves_timer_values_out_counts_them_and_warns_once(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """At most ``max_packets`` datagrams a flush interval: timer values beyond it are
    left out, counted (stats, and a counter of the exporter's own sent later), warned
    about once; the values sent carry the |@rate that keeps each timer's count right."""
    x = make(receiver, timer_sample_rate=1.0, max_packets=5, flush_interval=1.0)
    m = x.bind_chain("c", ["L1"])
    for _ in range(5000):
        m.record_first_layer_hit("L1", 0.001)
    with caplog.at_level(logging.DEBUG, logger="cachechain.statsd"):
        lines = flushed(x, receiver)
        stats = x.stats()
        assert stats.packets_sent <= 5
        timer = [line for line in lines if ".operation_duration.get:" in line]
        assert 0 < len(timer) < 5000
        assert stats.dropped_samples == 5000 - len(timer)
        # StatsD's count of the timer: each value stands for 1 / rate events.
        rates = [float(line.rpartition("|@")[2]) for line in timer]
        assert sum(1 / r for r in rates) == pytest.approx(5000, rel=1e-6)
        assert parse(lines)["cache_chain.c.L1.hits"] == ["5000|c"]  # exact
        for _ in range(100):
            m.record_first_layer_hit("L1", 0.001)
        lines = flushed(x, receiver)  # the budget is spent: few values if any now
    got = parse(lines)
    assert got["cache_chain.statsd_exporter.dropped_samples"] == [f"{5000 - len(timer)}|c"]
    assert got["cache_chain.c.L1.hits"] == ["100|c"]
    later = len(got.get("cache_chain.c.L1.operation_duration.get", []))
    assert later < 100
    assert x.stats().dropped_samples == 5100 - len(timer) - later
    said = [r for r in caplog.records if "left out of a flush" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG]
    x.close()


def test_a_budget_is_shared_so_that_a_rare_timer_keeps_its_values(receiver: Receiver) -> None:
    assert series_module.share([3, 1000, 1000], [10, 10, 10], 1030) == [3, 50, 50]
    assert series_module.share([5, 5], [10, 20], 1000) == [5, 5]
    assert series_module.share([5, 5], [10, 20], 0) == [0, 0]
    # Names longer than a datagram: one line a datagram, the budget counted in lines.
    x = make(receiver, timer_sample_rate=1.0, max_udp_size=64, max_packets=4)
    m = x.bind_chain("a_chain_with_a_name_long_enough_to_fill_a_datagram", ["L1"])
    for _ in range(50):
        m.record_load(True, 0.001)
    lines = flushed(x, receiver)
    timer = [line for line in lines if "load_duration" in line]
    assert 0 < len(timer) < 50
    assert x.stats().packets_sent <= 4
    x.close()


def test_a_flush_is_sent_in_paced_bursts(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exporter_module, "BURST_BYTES", 2000)  # 3 datagrams of 600 bytes
    monkeypatch.setattr(exporter_module, "BURST_PAUSE", 0.0)
    x = make(receiver, timer_sample_rate=1.0, max_udp_size=600, max_packets=1000)
    m = x.bind_chain("c", ["L1"])
    for _ in range(400):
        m.record_first_layer_hit("L1", 0.001)
    flushed(x, receiver)
    stats = x.stats()
    assert stats.packets_sent > 9
    assert stats.pauses == (stats.packets_sent - 1) // 3
    x.close()


class FailingSocket:
    """A socket whose ``sendto`` raises ``ENOBUFS`` for the first ``failures`` calls."""

    def __init__(self, real: socket.socket, failures: int) -> None:
        self.real = real
        self.failures = failures

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise OSError(105, "No buffer space available")
        return self.real.sendto(data, addr)

    def close(self) -> None:
        self.real.close()


@pytest.mark.parametrize("tags", [False, True], ids=["plain", "tags"])
def test_counts_of_a_refused_datagram_are_sent_by_the_next_flush(
    receiver: Receiver, caplog: pytest.LogCaptureFixture, tags: bool
) -> None:
    x = make(receiver, timer_sample_rate=0, tags=tags)
    m = x.bind_chain("c", ["L1"])
    assert x.flush()  # resolved: the socket exists
    assert x._sock is not None
    x._sock = FailingSocket(x._sock, failures=2)  # type: ignore[assignment]
    with caplog.at_level(logging.DEBUG, logger="cachechain.statsd"):
        for _ in range(7):
            m.record_get("L1", True, 0.0)
        assert x.flush()  # refused
        m.record_get("L1", True, 0.0)
        assert x.flush()  # refused again
        m.record_get("L1", False, 0.0)
        lines = flushed(x, receiver)
    stats = x.stats()
    assert stats.send_errors == 2
    got = parse(lines)
    if tags:
        assert got["cache_chain.hits"] == ["8|c|#chain:c,layer:L1"]  # 7 + 1: none lost
    else:
        assert got["cache_chain.c.L1.hits"] == ["8|c"]
    assert got["cache_chain.statsd_exporter.send_errors"] == ["2|c"]
    said = [r for r in caplog.records if "a send failed" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG]
    x.close()


def test_a_record_that_fails_inside_the_exporter_is_counted_not_raised(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    x = make(receiver)
    m = x.bind_chain("c", ["L1"])
    with caplog.at_level(logging.WARNING, logger="cachechain.statsd"):
        m.record_evictions("L1", "many")  # not a number: the exporter's own error
        m.record_evictions("L1", object())
    assert x.stats().record_errors == 2
    assert len([r for r in caplog.records if "record_evictions raised" in r.getMessage()]) == 1
    # Methods that catch their own errors: the chain calls them without a guard.
    chain = Chain([MemoryLayer("L1")], metrics=x)
    assert chain._m is not None
    view = x.bind_chain("default", ["L1"])
    assert chain._m.record_first_layer_hit is view.record_first_layer_hit
    chain.close()
    x.close()


# -- the sending thread --------------------------------------------------------------------


def test_the_thread_flushes_at_the_interval(receiver: Receiver) -> None:
    x = make(receiver, start=True, flush_interval=0.05, timer_sample_rate=0)
    m = x.bind_chain("c", ["L1"])
    m.record_get("L1", True, 0.0)
    got = receiver.receive(1)  # blocks until the thread sent it
    assert got == [b"cache_chain.c.L1.hits:1|c"]
    x.close()
    assert x.closed


def test_a_half_full_buffer_wakes_the_thread_before_the_interval(receiver: Receiver) -> None:
    x = make(receiver, start=True, flush_interval=3600, timer_sample_rate=1.0, max_samples=10)
    m = x.bind_chain("c", ["L1"])
    for _ in range(6):  # the 6th value finds 5 = max_samples // 2 in the buffer
        m.record_get("L1", True, 0.001)
    counted, timed = (d.decode().split("\n") for d in receiver.receive(2))
    assert "cache_chain.c.L1.hits:6|c" in counted  # counters first, timers after
    got = counted + timed
    assert got.count("cache_chain.c.L1.operation_duration.get:1.000000|ms") == 6
    x.close(timeout=5)


def test_close_sends_what_is_pending_and_is_idempotent(receiver: Receiver) -> None:
    x = make(receiver, start=True, flush_interval=3600, timer_sample_rate=0)
    x.bind_chain("c", ["L1"]).record_get("L1", False, 0.0)
    x.close(timeout=5)
    assert receiver.receive(1) == [b"cache_chain.c.L1.misses:1|c"]
    x.close()
    x.start()  # a closed exporter does not start again
    assert x._thread is not None and not x._thread.is_alive()
    x.bind_chain("c", ["L1"]).record_get("L1", False, 0.0)  # kept, never sent, no error
    assert x.flush() is False


def test_close_without_a_thread_flushes_in_the_caller(receiver: Receiver) -> None:
    x = make(receiver, timer_sample_rate=0)
    x.bind_chain("c", ["L1"]).record_get("L1", True, 0.0)
    x.close()
    assert receiver.receive(1) == [b"cache_chain.c.L1.hits:1|c"]


def test_start_twice_keeps_one_thread(receiver: Receiver) -> None:
    x = make(receiver, start=True, flush_interval=3600)
    first = x._thread
    x.start()
    assert x._thread is first
    x.close(timeout=5)


# -- failures never reach the caller -------------------------------------------------------


class FlakyResolver:
    """``socket.getaddrinfo`` that fails until ``healthy`` is set."""

    def __init__(self) -> None:
        self.healthy = False
        self.calls = 0

    def __call__(self, host: str, port: int, family: int, kind: int) -> Any:
        self.calls += 1
        if not self.healthy:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return socket.getaddrinfo("127.0.0.1", port, family, kind)


def test_an_unresolvable_host_is_retried_at_each_flush_and_counts_are_kept(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    resolver = FlakyResolver()
    x = StatsdExporter(
        "statsd.example", receiver.port, resolver=resolver, start=False, timer_sample_rate=0
    )
    m = x.bind_chain("c", ["L1"])
    m.record_get("L1", True, 0.0)
    with caplog.at_level(logging.WARNING, logger="cachechain.statsd"):
        assert x.flush() is False
        assert x.flush() is False
    stats = x.stats()
    assert (stats.resolve_failures, stats.resolved, stats.packets_sent) == (2, False, 0)
    assert len([r for r in caplog.records if "cannot resolve" in r.getMessage()]) == 1
    m.record_get("L1", True, 0.0)
    resolver.healthy = True
    assert flushed(x, receiver) == ["cache_chain.c.L1.hits:2|c"]
    assert x.stats().resolved
    x.close()


def test_send_errors_are_counted_not_raised(receiver: Receiver) -> None:
    x = make(receiver, timer_sample_rate=0)
    m = x.bind_chain("c", ["L1"])
    m.record_get("L1", True, 0.0)
    assert x.flush()

    class BrokenSocket:
        def sendto(self, data: bytes, addr: Any) -> int:
            raise OSError(105, "No buffer space available")

        def close(self) -> None:
            pass

    real = x._sock
    x._sock = BrokenSocket()  # type: ignore[assignment]
    m.record_get("L1", True, 0.0)
    assert x.flush()
    assert x.stats().send_errors == 1
    x._sock = real
    x.close()


def test_a_chain_is_unaffected_by_a_daemon_that_is_down_or_unresolvable() -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    down = StatsdExporter("127.0.0.1", port, flush_interval=0.01, environ={})
    nowhere = StatsdExporter("nonexistent.invalid", 8125, flush_interval=0.01, environ={})
    for x in (down, nowhere):
        with Chain([MemoryLayer("L1"), MemoryLayer("L2")], metrics=x) as chain:
            for i in range(2000):
                assert chain.set(f"k{i % 50}", i)
                assert chain.get(f"k{i % 50}") == i
                assert chain.get("absent") is None
            assert x.flush() in (True, False)
        x.close()
    assert down.stats().resolved is False  # closed
    assert nowhere.stats().resolve_failures >= 1
    assert nowhere.stats().packets_sent == 0


# -- options -------------------------------------------------------------------------------


def test_environment_variables_fill_in_the_options() -> None:
    env = {
        "STATSD_HOST": "10.1.2.3",
        "STATSD_PORT": "9125",
        "STATSD_PREFIX": "shop.cache",
        "STATSD_MAXUDPSIZE": "1432",
        "STATSD_IPV6": "1",
    }
    x = StatsdExporter(environ=env, start=False)
    assert (x.host, x.port, x.prefix, x.max_udp_size, x.ipv6) == (
        "10.1.2.3",
        9125,
        "shop.cache",
        1432,
        True,
    )
    assert "10.1.2.3:9125" in repr(x)
    # Options win over the environment.
    y = StatsdExporter(
        "127.0.0.1", 8125, "p", max_udp_size=512, ipv6=False, environ=env, start=False
    )
    assert (y.host, y.port, y.prefix, y.max_udp_size, y.ipv6) == (
        "127.0.0.1",
        8125,
        "p",
        512,
        False,
    )
    z = StatsdExporter(environ={}, start=False)
    assert (z.host, z.port, z.prefix, z.max_udp_size, z.ipv6) == (
        "localhost",
        8125,
        "cache_chain",
        1432,
        False,
    )
    assert (x.max_packets, z.max_packets) == (100, 100)
    for e in (x, y, z):
        e.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"host": ""}, "host must be a host name"),
        ({"host": "a b"}, "host must be a host name"),
        ({"port": 0}, "port must be an int in 1-65535"),
        ({"port": "http"}, "port must be an int in 1-65535"),
        ({"port": True}, "port must be an int in 1-65535"),
        ({"prefix": 3}, "prefix must be a str"),
        ({"tags": "maybe"}, "tags must be true or false"),
        ({"flush_interval": 0}, "flush_interval must be a number of seconds"),
        ({"flush_interval": float("nan")}, "flush_interval must be a number of seconds"),
        ({"timer_sample_rate": 1.5}, "timer_sample_rate must be 0"),
        ({"timer_sample_rate": True}, "timer_sample_rate must be 0"),
        ({"max_udp_size": 10}, "max_udp_size must be an int in 64-65000"),
        ({"max_samples": 0}, "max_samples must be an int"),
        ({"ipv6": 2}, "ipv6 must be true or false"),
        ({"resolver": "dns"}, "resolver must be callable"),
        ({"environ": {"STATSD_PORT": "x"}}, "STATSD_PORT must be an int"),
        ({"environ": {"STATSD_HOST": " "}}, "STATSD_HOST must be a host name"),
        ({"environ": {"STATSD_IPV6": "sometimes"}}, "STATSD_IPV6 must be true or false"),
        ({"environ": {"STATSD_MAXUDPSIZE": "9"}}, "STATSD_MAXUDPSIZE must be an int"),
    ],
)
def test_bad_options_are_refused_with_the_field_named(
    options: dict[str, Any], message: str
) -> None:
    options.setdefault("environ", {})
    with pytest.raises(ConfigError, match=message):
        StatsdExporter(start=False, **options)


def test_the_string_forms_of_booleans_and_ints_are_accepted() -> None:
    x = StatsdExporter(port=" 8125 ", tags="yes", ipv6="off", environ={}, start=False)  # type: ignore[arg-type]
    assert (x.port, x.tags, x.ipv6) == (8125, True, False)
    x.close()


def test_the_view_is_a_metrics_collector_and_the_package_exports_lazily() -> None:
    x = StatsdExporter(environ={}, start=False)
    assert isinstance(x.bind_chain("c", ["L1"]), MetricsCollector)
    assert cachechain_statsd.StatsdExporter is StatsdExporter
    assert cachechain_statsd.StatsdExporterStats is exporter_module.StatsdExporterStats
    with pytest.raises(AttributeError):
        _ = cachechain_statsd.Nope  # type: ignore[attr-defined]
    x.close()


def test_after_fork_the_child_starts_fresh_and_does_not_resend_the_parents_counts(
    receiver: Receiver,
) -> None:
    x = make(receiver, timer_sample_rate=1.0)
    m = x.bind_chain("c", ["L1"])
    m.record_first_layer_hit("L1", 0.001)
    x._after_fork()  # what os.register_at_fork runs in a child
    assert x._thread is not None and x._thread.is_alive()
    m.record_first_layer_hit("L1", 0.002)
    assert parse(flushed(x, receiver)) == {
        "cache_chain.c.L1.hits": ["1|c"],
        "cache_chain.c.requests.hit.L1": ["1|c"],
        "cache_chain.c.L1.operation_duration.get": ["2.000000|ms"],
        "cache_chain.c.request_duration.hit": ["2.000000|ms"],
    }
    x.close(timeout=5)


# -- sampled hit timing (cachechain's HitSampler) --------------------------------------------


# A period below 64 samples first-layer hits one in 64 (hits 1 and 65 of 100 timed, each
# sent as standing for 64); 1.0: every hit. Timers off: the first hit asks for a sample
# (its count, 0, is a multiple of any period), which is timed and dropped.
@pytest.mark.parametrize(
    ("rate", "timed", "sent"), [(0.25, 2, 2), (0.01, 1, 1), (1.0, 100, 100), (0, 1, 0)]
)
def test_a_chain_times_only_the_first_layer_hits_whose_duration_is_kept(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, rate: float, timed: int, sent: int
) -> None:
    from cachechain import _chain as chain_module

    reads: list[float] = []

    def clock() -> float:
        reads.append(1.0)
        return float(len(reads)) * 1e-6

    monkeypatch.setattr(chain_module, "_perf", clock)
    x = make(receiver, timer_sample_rate=rate)
    chain = Chain([MemoryLayer("L1")], name="web", metrics=x, coherence=False)
    chain.set("k", 1)
    reads.clear()
    for _ in range(100):
        assert chain.get("k") == 1
    assert len(reads) == 2 * timed  # two clock reads per timed hit, none for the others
    got = parse(flushed(x, receiver))
    assert got["cache_chain.web.L1.hits"] == ["100|c"]
    assert got["cache_chain.web.requests.hit.L1"] == ["100|c"]
    timers = got.get("cache_chain.web.request_duration.hit", [])
    assert len(timers) == sent
    # Each value sent stands for the hits it was kept for, so that StatsD counts them.
    sent_rate = 1.0 if rate == 1.0 else min(rate, 1 / 64)
    assert all(t.endswith("|ms") if rate == 1.0 else t.endswith(f"|@{sent_rate:g}") for t in timers)
    chain.close()
    x.close()
