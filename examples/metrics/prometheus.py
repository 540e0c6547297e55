"""Prometheus metrics for a cachechain chain: the seed's example, in Python.

Builds an in-process L1 over an L2 (memcached with ``--memcached HOST:PORT``, else a
second in-process layer), reports to a :class:`PrometheusCollector` registered on its
own ``CollectorRegistry``, serves ``/metrics`` on ``--port`` (0: a free port; the URL is
printed), drives traffic from a few threads for ``--seconds``, then exits::

    python examples/metrics/prometheus.py --port 9100 --seconds 30
    curl -s localhost:9100/metrics | grep cache_chain_requests_total

``--hold`` keeps serving after the traffic until stdin is closed (the tests scrape the
final figures that way). Under gunicorn with several workers, see ``docs/metrics.md``:
set ``PROMETHEUS_MULTIPROC_DIR`` and scrape through ``MultiProcessCollector`` instead.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import threading
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from cachechain import Chain, MemoryLayer, PrometheusCollector, serve_metrics
from cachechain.layers import CacheLayer


def build_chain(memcached: str | None, collector: PrometheusCollector) -> Chain:
    """L1 in-process over L2 (memcached at ``memcached``, else in-process)."""
    l2: CacheLayer
    if memcached:
        from cachechain import MemcachedLayer

        l2 = MemcachedLayer("L2", memcached, key_prefix="example:", timeout=0.1)
    else:
        l2 = MemoryLayer("L2", maxsize=10_000, default_ttl=600)
    l1 = MemoryLayer("L1", maxsize=200, default_ttl=30)
    return Chain([l1, l2], name="example", metrics=collector)


def drive(chain: Chain, seconds: float, threads: int, keys: int) -> int:
    """Read a skewed key set through ``get_or_load`` from ``threads`` threads for
    ``seconds``, with a few sets and deletes; return the number of reads."""
    stop = threading.Event()
    counts = [0] * threads

    def load(key: str) -> dict[str, int]:
        return {"price": len(key)}

    def worker(n: int) -> None:
        rnd = random.Random(n)
        while not stop.is_set():
            key = f"item:{int(rnd.paretovariate(1.2)) % keys}"
            chain.get_or_load(key, functools.partial(load, key), ttl=60)
            counts[n] += 1
            if counts[n] % 500 == 0:
                chain.delete(key)
            elif counts[n] % 97 == 0:
                chain.set(key, {"price": 0}, ttl=60)

    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in pool:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="port of /metrics (0: free)")
    parser.add_argument("--addr", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to drive traffic")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--keys", type=int, default=2_000)
    parser.add_argument("--memcached", metavar="HOST:PORT", help="memcached as L2")
    parser.add_argument("--namespace", default="cache_chain")
    parser.add_argument(
        "--hold", action="store_true", help="after the traffic, serve until stdin closes"
    )
    args = parser.parse_args(argv)

    registry = CollectorRegistry()
    collector = PrometheusCollector(args.namespace, registry=registry)
    chain = build_chain(args.memcached, collector)
    server = serve_metrics(registry, args.port, args.addr)
    print(f"serving {server.url}", flush=True)
    try:
        started = time.monotonic()
        reads = drive(chain, args.seconds, args.threads, args.keys)
        elapsed = time.monotonic() - started
        chain.flush(timeout=2.0)
        print(f"traffic done: {reads} reads in {elapsed:.1f} s", flush=True)
        if args.hold:
            sys.stdin.read()
    finally:
        chain.close()
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
