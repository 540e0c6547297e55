"""The exporter against a real StatsD daemon (Etsy's), found through its entry point."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import timeit
from typing import Any

import pytest
from cachechain import Chain, LayerConfig, MemoryLayer
from cachechain._exporters import (
    ENTRY_POINT_GROUP,
    ExporterManager,
    create_exporter,
)
from cachechain.metrics._base import MetricsCollector

from cachechain_statsd.exporter import StatsdExporter

_PREFIXES = iter(f"t{n}" for n in range(1_000_000))


def fresh_prefix() -> str:
    """A prefix no other test uses: the daemon is shared by the session."""
    return next(_PREFIXES)


def test_the_plugin_is_installed_and_found_through_its_entry_point() -> None:
    eps = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    ours = [ep for ep in eps if ep.value == "cachechain_statsd.plugin"]
    assert ours, f"cachechain-statsd is not installed (entry points: {eps})"
    assert ours[0].name == "statsd"
    info = ExporterManager().get("statsd")
    assert (info.distribution, info.version, info.plugin) == (
        "cachechain-statsd",
        importlib.metadata.version("cachechain-statsd"),
        "statsd",
    )
    assert not info.builtin


def run_workload(chain: Chain) -> dict[str, int]:
    """A fixed mix of operations; returns what it did."""
    l2 = chain.layers[1]
    for i in range(30):
        l2.set(f"only-l2-{i}", i, None)  # will be L2 hits, then L1 hits after backfill
    done = {"sets": 0, "deletes": 0, "l1_hits": 0, "l1_misses": 0, "l2_hits": 0, "l2_misses": 0}
    for i in range(50):
        assert chain.set(f"k{i}", i)
        done["sets"] += 1
    assert chain.flush(5.0)  # L2 is write-behind: its writer has written them all
    for _ in range(4):
        for i in range(50):
            assert chain.get(f"k{i}") == i
            done["l1_hits"] += 1
    for i in range(30):
        assert chain.get(f"only-l2-{i}") == i
        done["l1_misses"] += 1
        done["l2_hits"] += 1
    for i in range(30):
        assert chain.get(f"only-l2-{i}") == i
        done["l1_hits"] += 1
    for i in range(20):
        assert chain.get(f"absent-{i}") is None
        done["l1_misses"] += 1
        done["l2_misses"] += 1
    for i in range(10):
        assert chain.delete(f"k{i}")
        done["deletes"] += 1
    assert chain.flush(5.0)
    return done


@pytest.mark.parametrize("tags", [False, True], ids=["plain", "tags"])
def test_a_config_naming_statsd_sends_counts_the_daemon_agrees_with(
    daemon: Any, tags: bool
) -> None:
    prefix = fresh_prefix()
    bad_before = daemon.bad_lines_seen()
    packets_before = daemon.packets_received()
    exporter = create_exporter(
        {
            "exporter": "statsd",
            "options": {
                "host": "127.0.0.1",
                "port": daemon.port,
                "prefix": prefix,
                "tags": tags,
                "timer_sample_rate": 1.0,
                "flush_interval": 0.05,
            },
        }
    )
    assert isinstance(exporter, StatsdExporter)
    chain = Chain(
        [MemoryLayer("L1"), LayerConfig(MemoryLayer("L2"), write_behind=True)],
        name="web",
        metrics=exporter,
    )
    done = run_workload(chain)
    chain.close()
    exporter.close(timeout=5)
    stats = exporter.stats()
    assert stats.send_errors == 0 and stats.dropped_samples == 0
    daemon.wait_for_packets(packets_before + stats.packets_sent)

    counters = daemon.counters()
    timers = daemon.timers()
    gauges = daemon.gauges()

    def name(metric: str, layer: str | None = None, **labels: str) -> str:
        if tags:
            parts = ["chain=web"] + ([f"layer={layer}"] if layer else [])
            parts += [f"{k}={v}" for k, v in labels.items()]
            return ";".join([f"{prefix}.{metric}", *parts])
        path = ["web"] + ([layer] if layer else []) + [metric, *labels.values()]
        return ".".join([prefix, *path])

    gets = done["l1_hits"] + done["l1_misses"]
    assert counters[name("hits", "L1")] == done["l1_hits"]
    assert counters[name("misses", "L1")] == done["l1_misses"]
    assert counters[name("hits", "L2")] == done["l2_hits"]
    assert counters[name("misses", "L2")] == done["l2_misses"]
    assert counters[name("requests", result="hit", served_by="L1")] == done["l1_hits"]
    assert counters[name("requests", result="hit", served_by="L2")] == done["l2_hits"]
    assert counters[name("requests", result="miss", served_by="none")] == done["l2_misses"]
    # Sets, deletes and backfills reach L1 synchronously; L2 is written behind, by its
    # async writer.
    l1_sets = counters[name("operations", "L1", operation="set", result="success")]
    assert l1_sets == done["sets"] + done["l2_hits"]
    l1_deletes = counters[name("operations", "L1", operation="delete", result="success")]
    assert l1_deletes == done["deletes"]
    writes = done["sets"] + done["deletes"]
    assert counters[name("async_writes", "L2", result="success")] == writes
    assert len(timers[name("async_write_duration", "L2")]) == writes
    ours = [k for k in counters if k.startswith(f"{prefix}.")]
    assert not [k for k in ours if "failure" in k or "errors" in k or "dropped" in k]
    assert gauges[name("queue_depth", "L2")] == 0
    # Timers: one value per get of each layer at sample rate 1, in milliseconds.
    assert len(timers[name("operation_duration", "L1", operation="get")]) == gets
    assert len(timers[name("operation_duration", "L2", operation="get")]) == (
        done["l2_hits"] + done["l2_misses"]
    )
    assert len(timers[name("request_duration", result="hit")]) == (
        done["l1_hits"] + done["l2_hits"]
    )
    assert all(0 <= v < 1000 for v in timers[name("operation_duration", "L1", operation="get")])
    assert gauges[name("queue_capacity", "L2")] == 1000
    assert daemon.bad_lines_seen() == bad_before, daemon.log_text()


def test_sampled_timers_are_scaled_back_by_the_daemon(daemon: Any) -> None:
    prefix = fresh_prefix()
    packets_before = daemon.packets_received()
    x = StatsdExporter("127.0.0.1", daemon.port, prefix, timer_sample_rate=0.25, start=False)
    m = x.bind_chain("c", ["L1"])
    for _ in range(400):
        m.record_first_layer_hit("L1", 0.0001)
    x.close()
    daemon.wait_for_packets(packets_before + x.stats().packets_sent)
    assert daemon.counters()[f"{prefix}.c.L1.hits"] == 400
    assert len(daemon.timers()[f"{prefix}.c.L1.operation_duration.get"]) == 100


def test_an_exporter_left_open_sends_its_counts_at_interpreter_exit(daemon: Any) -> None:
    prefix = fresh_prefix()
    packets_before = daemon.packets_received()
    script = textwrap.dedent(
        f"""
        from cachechain import Chain, LayerConfig, MemoryLayer
        from cachechain._exporters import create_exporter
        x = create_exporter({{"exporter": "statsd", "options": {{
            "host": "127.0.0.1", "port": {daemon.port}, "prefix": "{prefix}",
            "flush_interval": 3600}}}})
        chain = Chain([MemoryLayer("L1")], metrics=x)
        chain.set("k", 1)
        for _ in range(77):
            chain.get("k")
        print("done")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done" and "Traceback" not in out.stderr
    daemon.wait_until(
        lambda: daemon.counters().get(f"{prefix}.default.L1.hits") == 77,
        10,
        "the counts sent at exit",
    )
    assert daemon.packets_received() > packets_before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_sends_its_own_counts_and_not_its_parents(daemon: Any) -> None:
    prefix = fresh_prefix()
    script = textwrap.dedent(
        f"""
        import os
        from cachechain_statsd.exporter import StatsdExporter
        x = StatsdExporter("127.0.0.1", {daemon.port}, "{prefix}", flush_interval=3600)
        m = x.bind_chain("c", ["L1"])
        for _ in range(5):
            m.record_get("L1", True, 0.0)
        pid = os.fork()
        if pid == 0:
            for _ in range(3):
                m.record_get("L1", False, 0.0)
            x.close(timeout=5)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        x.close(timeout=5)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    daemon.wait_until(
        lambda: (
            daemon.counters().get(f"{prefix}.c.L1.misses") == 3
            and daemon.counters().get(f"{prefix}.c.L1.hits") == 5
        ),
        10,
        "the parent's 5 hits and the child's 3 misses",
    )
    assert daemon.counters()[f"{prefix}.c.L1.hits"] == 5  # not sent twice


_FULL_SPEED_WORKER = """
import json, os, sys, time
from cachechain import Chain, MemoryLayer
from cachechain._exporters import create_exporter

os.nice(19)  # the daemon keeps its CPU: three of these would starve it on two cores
port, prefix, name, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
x = create_exporter({"exporter": "statsd", "options": {
    "host": "127.0.0.1", "port": port, "prefix": prefix, "flush_interval": 0.2}})
chain = Chain([MemoryLayer("L1"), MemoryLayer("L2")], name=name, metrics=x)
keys = [f"k{i}" for i in range(64)]
done = {"hits": 0, "misses": 0, "sets": 0, "deletes": 0}
for k in keys:
    chain.set(k, 1)
done["sets"] += len(keys)
print("ready", flush=True)
sys.stdin.readline()  # the parent's go: every process starts at once
get, set_, delete = chain.get, chain.set, chain.delete
end = time.monotonic() + seconds
while time.monotonic() < end:
    for k in keys:
        get(k)
    done["hits"] += len(keys)
    get("absent")
    get("absent too")
    done["misses"] += 2
    set_("k1", 2)
    delete("gone")
    done["sets"] += 1
    done["deletes"] += 1
chain.close()
x.close(timeout=10)
print(json.dumps({"done": done, "stats": x.stats().__dict__}), flush=True)
"""


def udp_drops(port: int) -> int | None:
    """Datagrams the kernel dropped at the loopback UDP socket bound to ``port`` (its
    receive buffer was full), from ``/proc/net/udp``; None where that is not readable."""
    try:
        with open("/proc/net/udp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    for row in rows:
        if int(row[1].rsplit(":", 1)[1], 16) == port:
            return int(row[-1])
    return None


def test_three_processes_at_full_speed_lose_no_count(daemon: Any) -> None:
    """Issue 13: each flush used to send every value in one unpaced burst of about a
    thousand datagrams, which overran the daemon's socket buffer (up to 44% lost, 7.6%
    of request counts with three processes) while the exporter saw no error. Now the
    counters the daemon received are exactly what three chains driven at full speed
    did, and every datagram sent arrives.

    The workers run at the lowest CPU priority. The promise is about the exporter's
    bursts against a daemon that has its CPU (the README: "with a core to itself"); on a
    two-core machine three busy senders at equal priority starved the daemon itself, and
    it lost up to 55 of 831 datagrams for that reason alone."""
    prefix = fresh_prefix()
    bad_before = daemon.bad_lines_seen()
    packets_before = daemon.packets_received()
    drops_before = udp_drops(daemon.port)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FULL_SPEED_WORKER, str(daemon.port), prefix, f"w{i}", "2.0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and "Traceback" not in err, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    sent = sum(r["stats"]["packets_sent"] for r in results)
    with contextlib.suppress(AssertionError):  # what is lost never comes: compare then
        daemon.wait_for_packets(packets_before + sent, timeout=10)
    counters = daemon.counters()
    drops = udp_drops(daemon.port)
    dropped = "unknown" if drops is None or drops_before is None else drops - drops_before
    report = (
        f"sent {sent} datagrams, daemon got {daemon.packets_received() - packets_before}, "
        f"its socket's buffer dropped {dropped}"
    )
    for i, r in enumerate(results):
        done, stats = r["done"], r["stats"]
        assert stats["send_errors"] == 0, stats
        assert done["hits"] > 10_000, done  # it ran (about 10^6 a second, unloaded)
        assert stats["dropped_samples"] > 0, stats  # more values than the budget
        c = f"{prefix}.w{i}"
        expected = {
            f"{c}.L1.hits": done["hits"],
            f"{c}.L1.misses": done["misses"],
            f"{c}.L2.misses": done["misses"],
            f"{c}.requests.hit.L1": done["hits"],
            f"{c}.requests.miss.none": done["misses"],
            f"{c}.L1.operations.set.success": done["sets"],
            f"{c}.L2.operations.set.success": done["sets"],
            f"{c}.L1.operations.delete.success": done["deletes"],
            f"{c}.L2.operations.delete.success": done["deletes"],
        }
        assert {k: counters.get(k) for k in expected} == expected, report
    assert daemon.packets_received() - packets_before == sent, report
    assert daemon.bad_lines_seen() == bad_before, daemon.log_text()


def closed_udp_port() -> int:
    """A loopback UDP port nothing listens on (it was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmptyCollector(MetricsCollector):
    """Records nothing, but makes the chain time its calls (the metrics-on path)."""

    def record_first_layer_hit(self, layer: str, duration: float) -> None:
        pass


def test_a_daemon_down_or_a_host_that_does_not_resolve_adds_no_io_to_a_get(
    daemon: Any,
) -> None:
    """Chain.get of a key in L1 with the StatsD exporter sending to a real daemon,
    against the same with the daemon down or its host unresolvable: nothing on the
    request path waits for the network (a lookup or a blocking send would cost micro-
    to milliseconds, tens to thousands of times a hit; the bound leaves room for a
    loaded machine). The best of interleaved rounds is compared. The speed goal itself
    (the exporter's cost against ``metrics=None``) is in benchmarks/run.py, section
    ``metrics``, not here."""
    # Measure the code, not a coverage tracer (this thread's, or the sending thread's).
    trace, thread_trace = sys.gettrace(), threading.gettrace()
    sys.settrace(None)
    threading.settrace(None)  # type: ignore[arg-type]
    try:
        x = StatsdExporter("127.0.0.1", daemon.port, fresh_prefix(), flush_interval=0.1)
        down = StatsdExporter("127.0.0.1", closed_udp_port(), flush_interval=0.1, environ={})
        nowhere = StatsdExporter("nonexistent.invalid", 8125, flush_interval=0.1, environ={})
        contenders = {
            "none": Chain([MemoryLayer("L1")]),
            "empty collector": Chain([MemoryLayer("L1")], metrics=EmptyCollector()),
            "statsd": Chain([MemoryLayer("L1")], metrics=x),
            "statsd, daemon down": Chain([MemoryLayer("L1")], metrics=down),
            "statsd, unresolvable": Chain([MemoryLayer("L1")], metrics=nowhere),
        }
        best: dict[str, float] = {}
        for chain in contenders.values():
            chain.set("k", 1)
        labels = list(contenders)
        for round_ in range(30):  # interleaved, in an order that rotates every round
            for label in labels[round_ % len(labels) :] + labels[: round_ % len(labels)]:
                get = contenders[label].get
                ns = timeit.timeit(lambda get=get: get("k"), number=10_000) / 10_000 * 1e9
                best[label] = min(best.get(label, ns), ns)
        for chain in contenders.values():
            assert chain.get("k") == 1
            chain.close()
        for exporter in (x, down, nowhere):
            exporter.close()
    finally:
        sys.settrace(trace)
        threading.settrace(thread_trace)  # type: ignore[arg-type]
    report = ", ".join(f"{k} {v:.0f} ns" for k, v in best.items())
    print(f"L1 hit: {report}")
    assert x.stats().send_errors == 0
    assert best["statsd, daemon down"] <= best["statsd"] * 3, report
    assert best["statsd, unresolvable"] <= best["statsd"] * 3, report
    assert nowhere.stats().resolve_failures >= 1 and nowhere.stats().packets_sent == 0
