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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

from ._chain import Chain
from ._config import BreakerConfig, LayerConfig
from ._errors import LayerTimeoutError, LayerUnavailableError
from .layers._base import CacheLayer
from .layers._memory import MemoryLayer
from .layers._proxy import LayerProxy
from .metrics._memory import MemoryCollector
from .metrics._types import MetricsSnapshot

__all__ = ["DemoOptions", "FaultyLayer", "run_demo"]

T = TypeVar("T")


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


class FaultyLayer(LayerProxy):
    """Wraps a layer and, while a fault is on, fails every call the way a dead
    ("stop": connection refused at once) or black-holed ("blackhole": no answer until
    the timeout) server would. For demonstrations; tests use a real TCP fault proxy.

    ``timeout`` (seconds) is how long a black-holed call hangs; ``fault`` (None,
    "stop" or "blackhole") may be changed at any time from any thread. Raises
    :class:`~cachechain.ConfigError` for a ``layer`` that is not a layer."""

    def __init__(self, layer: CacheLayer, timeout: float) -> None:
        super().__init__(layer)
        self.timeout = timeout
        self.fault: str | None = None
        self._never = threading.Event()

    @property
    def local(self) -> bool:
        """False: this layer stands for a remote server, whatever it wraps."""
        return False

    def _forward(self, method: Callable[..., T], *args: Any) -> T:
        """The wrapped operation, unless a fault is on: then raise
        :class:`~cachechain.LayerUnavailableError` at once ("stop") or
        :class:`~cachechain.LayerTimeoutError` after ``timeout`` ("blackhole")."""
        fault = self.fault
        if fault == "stop":
            raise LayerUnavailableError("connection refused (demo fault)", layer=self.name)
        if fault == "blackhole":
            self._never.wait(self.timeout)
            raise LayerTimeoutError("timed out (demo fault)", layer=self.name)
        return method(*args)

    def stats(self) -> Any:
        """The wrapped layer's ``stats()`` (the demo wraps layers that have one), so
        that its figures (connections, nodes down...) reach the metrics."""
        return self._layer.stats()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close the wrapped layer and end any fault."""
        self.fault = None
        self._never.set()
        self._layer.close()


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

    Raises :class:`~cachechain.ConfigError` for a bad memcached address.
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

    load = _Load(chain, options)
    started = time.monotonic()
    threads = [
        threading.Thread(target=load.worker, args=(options.seed + i,), daemon=True)
        for i in range(options.threads)
    ]
    for t in threads:
        t.start()
    _banner(out, options)
    _watch(options, out, started, l2, collector, chain)
    load.stop.set()
    for t in threads:
        t.join(5)
    lost = chain.close(timeout=2.0)
    if server is not None:
        server.shutdown()
    snap = collector.snapshot()
    _summary(out, snap, time.monotonic() - started, next(load.loads), lost)
    if load.errors:
        raise load.errors[0]
    return snap


class _Load:
    """The demo's workload: ``get_or_load`` of Zipf-distributed keys, from any number
    of :meth:`worker` threads until :attr:`stop` is set."""

    def __init__(self, chain: Chain, options: DemoOptions) -> None:
        self.chain = chain
        self.keys = [f"item:{i}" for i in range(options.keys)]
        self.cum = _zipf_cum_weights(options.keys, options.skew)
        self.stop = threading.Event()
        #: ``next()`` counts one loader call (and returns the count before it).
        self.loads = itertools.count()
        #: What the workers raised (a wrong value is an AssertionError).
        self.errors: list[BaseException] = []

    def loader_for(self, key: str) -> Callable[[], Any]:
        """A loader for ``key`` that takes about as long as a fast database query."""

        def load() -> Any:
            next(self.loads)
            self.stop.wait(0.0005)  # a fast database query
            return {"key": key, "price": len(key)}

        return load

    def worker(self, seed: int) -> None:
        """Read keys until :attr:`stop` is set; record what goes wrong in :attr:`errors`."""
        rnd = random.Random(seed)
        chain = self.chain
        try:
            while not self.stop.is_set():
                for key in rnd.choices(self.keys, cum_weights=self.cum, k=256):
                    value = chain.get_or_load(key, self.loader_for(key), ttl=300)
                    if value["key"] != key:
                        raise AssertionError(f"wrong value for {key}: {value!r}")
        except BaseException as exc:  # shown at the end; the demo must not hide a bug
            self.errors.append(exc)


def _banner(out: TextIO, options: DemoOptions) -> None:
    second = f"memcached {options.memcached}" if options.memcached else "(in-process stand-in)"
    fault = f", fault: {options.fault}" if options.fault else ""
    out.write(
        f"cachechain demo: {options.threads} threads, {options.keys:,} keys (Zipf "
        f"s={options.skew}), L1 in-process over L2 {second}{fault}\n"
    )


def _watch(
    options: DemoOptions,
    out: TextIO,
    started: float,
    l2: FaultyLayer,
    collector: MemoryCollector,
    chain: Chain,
) -> None:
    """Print progress every half second for ``options.seconds``, turning the fault on
    and off on time."""
    fault_start = started + options.seconds * options.fault_at
    fault_end = fault_start + options.seconds * options.fault_for
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
            return
        tick.wait(min(0.5, max(0.0, options.seconds - (now - started))))


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
