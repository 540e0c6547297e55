"""``cachechain demo``: a chain under a skewed, multi-threaded read load.

Builds an in-process L1 over a second layer (memcached when an address is given, else
an in-process stand-in that behaves like a remote layer: breaker, timeout and async
writer included), drives a Zipf-like workload of ``get_or_load`` calls from several
threads, prints a progress line, and ends with per-layer hits, misses and latency.

``--fault stop`` or ``--fault blackhole`` makes the second layer fail part way through
(refusing every call, or hanging each call until its timeout), so that the breaker is
seen to open, the load to fall through to L1 and the loader, and the breaker to close
again once the fault ends.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ._chain import Chain
from ._config import BreakerConfig, LayerConfig
from ._errors import LayerTimeoutError, LayerUnavailableError
from .layers._base import CacheLayer
from .layers._memory import MemoryLayer
from .metrics._memory import MemoryCollector
from .metrics._types import MetricsSnapshot

__all__ = ["DemoOptions", "FaultyLayer", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs: durations in seconds; ``fault`` is None, "stop" or
    "blackhole", active from ``fault_at`` to ``fault_at + fault_for`` (fractions of
    ``seconds``)."""

    seconds: float = 5.0
    threads: int = 8
    keys: int = 20_000
    skew: float = 1.1
    memcached: str | None = None
    fault: str | None = None
    fault_at: float = 0.3
    fault_for: float = 0.3
    timeout: float = 0.1
    metrics_port: int | None = None
    seed: int = 1


class FaultyLayer:
    """Wraps a layer and, while a fault is on, fails every call the way a dead
    ("stop": connection refused at once) or black-holed ("blackhole": no answer until
    the timeout) server would. For demonstrations; tests use a real TCP fault proxy."""

    def __init__(self, layer: CacheLayer, timeout: float) -> None:
        self.layer = layer
        self.timeout = timeout
        self.fault: str | None = None
        self._never = threading.Event()

    @property
    def name(self) -> str:
        """The wrapped layer's name."""
        return self.layer.name

    local = False

    @property
    def max_ttl(self) -> float | None:
        """The wrapped layer's max TTL."""
        return self.layer.max_ttl

    def _check(self) -> None:
        fault = self.fault
        if fault == "stop":
            raise LayerUnavailableError("connection refused (demo fault)", layer=self.name)
        if fault == "blackhole":
            self._never.wait(self.timeout)
            raise LayerTimeoutError("timed out (demo fault)", layer=self.name)

    def get(self, key: str) -> Any:
        """The wrapped ``get``, unless a fault is on."""
        self._check()
        return self.layer.get(key)

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """The wrapped ``get_with_ttl``, unless a fault is on."""
        self._check()
        return self.layer.get_with_ttl(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The wrapped ``get_many``, unless a fault is on."""
        self._check()
        return self.layer.get_many(keys)

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """The wrapped ``get_many_with_ttl``, unless a fault is on."""
        self._check()
        return self.layer.get_many_with_ttl(keys)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """The wrapped ``set``, unless a fault is on."""
        self._check()
        self.layer.set(key, value, ttl)

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """The wrapped ``set_many``, unless a fault is on."""
        self._check()
        return self.layer.set_many(items, ttl)

    def delete(self, key: str) -> None:
        """The wrapped ``delete``, unless a fault is on."""
        self._check()
        self.layer.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        """The wrapped ``delete_many``, unless a fault is on."""
        self._check()
        self.layer.delete_many(keys)

    def close(self) -> None:
        """Close the wrapped layer and end any fault."""
        self.fault = None
        self._never.set()
        self.layer.close()


def _second_layer(options: DemoOptions) -> CacheLayer:
    if options.memcached:
        from .layers._memcached import MemcachedLayer

        return MemcachedLayer(
            "L2",
            options.memcached,
            key_prefix="cachechain-demo:",
            timeout=options.timeout,
            connect_timeout=options.timeout,
        )
    return MemoryLayer("L2", maxsize=max(options.keys, 1), default_ttl=600)


def _zipf_cum_weights(n: int, skew: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (i + 1) ** skew for i in range(n)))


def run_demo(options: DemoOptions, out: TextIO | None = None) -> MetricsSnapshot:
    """Run the demo and print to ``out`` (default: standard output); return the final
    metrics snapshot.

    Raises :class:`~cachechain.errors.ConfigError` for a bad memcached address.
    """
    if out is None:
        out = sys.stdout
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("    %(name)s: %(message)s"))
    logger = logging.getLogger("cachechain")
    logger.addHandler(handler)
    try:
        return _run(options, out)
    finally:
        logger.removeHandler(handler)


def _run(options: DemoOptions, out: TextIO) -> MetricsSnapshot:
    collector = MemoryCollector()
    metrics: Any = collector
    if options.metrics_port is not None:
        from .metrics._fanout import FanoutCollector
        from .metrics._prometheus import PrometheusCollector

        metrics = FanoutCollector(collector, PrometheusCollector())
    l2 = FaultyLayer(_second_layer(options), options.timeout)
    l1 = MemoryLayer("L1", maxsize=max(options.keys // 10, 1), default_ttl=30)
    breaker = BreakerConfig(max_failures=5, reset_timeout=max(options.seconds / 10, 0.2))
    chain = Chain(
        [l1, LayerConfig(layer=l2, timeout=options.timeout, breaker=breaker)],
        name="demo",
        metrics=metrics,
    )
    server = None
    if options.metrics_port is not None:
        from .metrics._prometheus import start_demo_exporter

        server = start_demo_exporter(chain, options.metrics_port, out)

    keys = [f"item:{i}" for i in range(options.keys)]
    cum = _zipf_cum_weights(options.keys, options.skew)
    stop = threading.Event()
    loads = itertools.count()
    errors: list[BaseException] = []

    def loader_for(key: str) -> Any:
        def load() -> Any:
            next(loads)
            stop.wait(0.0005)  # a fast database query
            return {"key": key, "price": len(key)}

        return load

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while not stop.is_set():
                for key in rnd.choices(keys, cum_weights=cum, k=256):
                    value = chain.get_or_load(key, loader_for(key), ttl=300)
                    if value["key"] != key:
                        raise AssertionError(f"wrong value for {key}: {value!r}")
        except BaseException as exc:  # shown at the end; the demo must not hide a bug
            errors.append(exc)

    started = time.monotonic()
    threads = [
        threading.Thread(target=worker, args=(options.seed + i,), daemon=True)
        for i in range(options.threads)
    ]
    for t in threads:
        t.start()
    fault_start = started + options.seconds * options.fault_at
    fault_end = fault_start + options.seconds * options.fault_for
    out.write(
        f"cachechain demo: {options.threads} threads, {options.keys:,} keys (Zipf "
        f"s={options.skew}), L1 in-process over L2 "
        f"{'memcached ' + options.memcached if options.memcached else '(in-process stand-in)'}"
        f"{', fault: ' + options.fault if options.fault else ''}\n"
    )
    tick = threading.Event()
    while True:
        now = time.monotonic()
        if options.fault and fault_start <= now < fault_end and l2.fault is None:
            l2.fault = options.fault
            out.write(f"\n--> fault on: L2 {options.fault}\n")
        elif l2.fault is not None and now >= fault_end:
            l2.fault = None
            out.write("\n--> fault off: L2 is back\n")
        _progress(out, now - started, collector.snapshot(), chain)
        if now - started >= options.seconds:
            break
        tick.wait(min(0.5, max(0.0, options.seconds - (now - started))))
    stop.set()
    for t in threads:
        t.join(5)
    lost = chain.close(timeout=2.0)
    if server is not None:
        server.shutdown()
    snap = collector.snapshot()
    _summary(out, snap, time.monotonic() - started, next(loads), lost)
    if errors:
        raise errors[0]
    return snap


def _progress(out: TextIO, elapsed: float, snap: MetricsSnapshot, chain: Chain) -> None:
    ch = snap.chain_metrics
    gets = ch.total_hits + ch.total_misses
    by = ch.hits_by_layer
    pct = (lambda n: 100.0 * n / gets) if gets else (lambda n: 0.0)
    states = " ".join(f"{n}:{b.state.name.lower()}" for n, b in chain.breakers.items())
    depth = sum(w.stats().depth for w in chain.writers.values())
    out.write(
        f"[{elapsed:5.1f}s] {gets:>9,} gets | L1 {pct(by.get(0, 0)):5.1f}% "
        f"L2 {pct(by.get(1, 0)):5.1f}% loader {pct(ch.total_misses):5.1f}% | "
        f"breaker {states} | queue {depth}\n"
    )
    out.flush()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def _summary(out: TextIO, snap: MetricsSnapshot, elapsed: float, loads: int, lost: int) -> None:
    ch = snap.chain_metrics
    gets = ch.total_hits + ch.total_misses
    out.write(
        f"\n{gets:,} gets in {elapsed:.1f} s ({gets / max(elapsed, 1e-9):,.0f}/s), "
        f"{loads:,} loader calls, {ch.singleflight_shared:,} shared loads, "
        f"{lost} writes lost at close\n\n"
    )
    header = (
        f"{'layer':<6} {'hits':>10} {'misses':>10} {'hit %':>6} {'errors':>7} "
        f"{'rejected':>8} {'p50 ms':>8} {'p99 ms':>8} {'opens':>5}"
    )
    out.write(header + "\n" + "-" * len(header) + "\n")
    for name, lm in snap.layer_metrics.items():
        lat = lm.get_latency
        out.write(
            f"{name:<6} {lm.hits:>10,} {lm.misses:>10,} {100 * lm.hit_ratio:>6.1f} "
            f"{lm.errors:>7,} {lm.circuit_rejected:>8,} {_ms(lat.p50):>8} {_ms(lat.p99):>8} "
            f"{lm.circuit_opens:>5}\n"
        )
    lat = ch.latency
    out.write(
        f"{'chain':<6} {ch.total_hits:>10,} {ch.total_misses:>10,} "
        f"{100 * ch.total_hits / max(gets, 1):>6.1f} {'':>7} {'':>8} "
        f"{_ms(lat.p50):>8} {_ms(lat.p99):>8}\n"
    )
    out.flush()
