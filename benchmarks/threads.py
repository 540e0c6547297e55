"""Benchmark sections of issue 14: items 1 (``threads``: L1 hits of one key from 1 to 16
threads of one process, for ``Chain.get``, cachetools' ``LRUCache.get`` under a lock,
and ``dict.get``) and 4 (``memory``: bytes per entry, see :func:`bench_memory`).

Each contender is one implementation at one thread count: its threads are started and
parked on a barrier before the timed run (untimed), the timed run releases them and
joins them, and a row's "ns per call" is the wall time divided by the hits of all the
threads together (the inverse of hits per second). Unpinned: the threads run on every
CPU the process may use, where a lock taken by every read makes a convoy.

Registered by ``run.py`` (``_sections_of_their_own``), which hands over its harness.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from itertools import repeat
from typing import Any

__all__ = ["sections"]

THREADS = (1, 2, 4, 8, 16)


def sections(h: Any) -> dict[str, Callable[[Any], Any]]:
    """The sections, by id, bound to run.py's harness module ``h``."""
    return {
        "threads": lambda ctx: bench_threads(h, ctx),
        "memory": lambda ctx: bench_memory(h, ctx),
    }


class _Crew:
    """``count`` threads that each call ``read(key)`` a share of ``n`` times once
    released: :meth:`park` (untimed) starts them on a barrier, :meth:`run` (timed)
    releases and joins them."""

    def __init__(self, read: Callable[[str], object], key: str, count: int) -> None:
        self.read, self.key, self.count = read, key, count
        self.threads: list[threading.Thread] = []
        self.start = threading.Barrier(count + 1)
        self.calls = 0

    def park(self, n: int) -> None:
        share = max(1, n // self.count)
        self.calls = share * self.count
        self.start = threading.Barrier(self.count + 1)

        def work() -> None:
            read, key = self.read, self.key
            self.start.wait()
            for _ in repeat(None, share):
                read(key)

        self.threads = [threading.Thread(target=work) for _ in range(self.count)]
        for t in self.threads:
            t.start()

    def run(self, n: int) -> None:
        self.start.wait()
        for t in self.threads:
            t.join()


def bench_threads(h: Any, ctx: Any) -> Any:
    from cachetools import LRUCache

    from cachechain import Chain, MemoryLayer

    sec = h.Section(
        "threads",
        "14. L1 hits of one key from N threads (ns per hit = wall / all threads' hits)",
        base="chain_1",
    )
    sec.notes.append(
        "Chain([MemoryLayer]) with metrics=None; each row's threads share one key and "
        "the work (n hits in all), parked on a barrier before the timed run. Unpinned: "
        "with a lock on every read, threads on several CPUs convoy on it (the GIL's "
        "hand-offs); MemoryLayer reads take no lock (a read buffer replayed under a "
        "lock a reader takes only when it sees it free, see cachechain/layers/_memory.py)."
    )
    key = "user:42"
    chain = Chain([MemoryLayer("L1")])
    chain.set(key, h.VALUE)
    lru: LRUCache[str, Any] = LRUCache(10_000)
    lru[key] = h.VALUE
    lock = threading.Lock()
    plain = {key: h.VALUE}

    def locked_get(k: str) -> Any:
        with lock:
            return lru.get(k)

    sec.check("Chain.get hits L1", chain.get(key) == h.VALUE)
    n = ctx.n(200_000)
    contenders = []
    for name, label, read in (
        ("chain", "Chain.get", chain.get),
        ("lru", "LRUCache.get under a lock", locked_get),
        ("dict", "dict.get", plain.get),
    ):
        for count in THREADS:
            crew = _Crew(read, key, count)
            contenders.append(
                h.Contender(
                    f"{name}_{count}",
                    f"{label}, {count} thread{'s' if count > 1 else ''}",
                    crew.run,
                    before=lambda crew=crew: crew.park(n),
                )
            )
    try:
        h.run_section(sec, contenders, n, ctx.rounds)
    finally:
        chain.close()
    sec.goals += [
        h.Goal("Chain.get, 16 threads: >= 0.8x the hits/s of 1", "chain_16", "chain_1", "<=", 1.25),
        h.Goal("Chain.get, 8 threads: >= 0.8x the hits/s of 1", "chain_8", "chain_1", "<=", 1.25),
        h.Goal(
            "Chain.get, 1 thread <= 1.42x a locked LRUCache.get (the figure before)",
            "chain_1",
            "lru_1",
            "<=",
            1.42,
        ),
        h.Goal("locked LRUCache.get, 16 threads vs 1 (info)", "lru_16", "lru_1", "info"),
        h.Goal("dict.get, 16 threads vs 1 (info)", "dict_16", "dict_1", "info"),
    ]
    return sec


def bench_memory(h: Any, ctx: Any) -> Any:
    """Issue 14, item 4: bytes per entry of 100,000 string entries (tracemalloc), a
    MemoryLayer with and without a TTL (and stamped) against cachetools and a dict, and
    the layer's entries before 0.3 (cachetools' LRUCache of ``(value, expiry)``
    tuples)."""
    import gc
    import time
    import tracemalloc

    from cachetools import LRUCache, TTLCache

    from cachechain import MemoryLayer
    from cachechain.layers._stamps import Stamped

    sec = h.Section("memory", "17. Memory per entry: 100,000 str entries (tracemalloc)", base="lru")
    sec.unit = "B"
    sec.notes.append(
        "Keys and values are made before the measure: a row is what its container adds "
        "per entry (its hash table, order links, entry objects, expiry floats). Rounds "
        "repeat the build: the figure is deterministic. MemoryLayer keeps one OrderedDict "
        "of the value (no TTL) or a float subclass, the expiry, holding the value (48 B; "
        "a stamped entry: 64 B and its physical expiry's float); the ratios move with how "
        "full the hash tables are at n (docs/design.md, 'Memory per entry')."
    )
    # Never fewer than 50,000 (a quick run's 10,000 would be another figure, not a
    # smaller sample of this one): the ratios move with how full the hash tables are,
    # and 50,000 fill them as 100,000 do.
    n = ctx.n(100_000, minimum=50_000)
    keys = [f"key:{i}" for i in range(n)]
    values = [f"value:{i}" for i in range(n)]

    def build_dict() -> Any:
        return dict(zip(keys, values, strict=True))

    def build_lru() -> Any:
        cache: LRUCache[str, str] = LRUCache(n)
        for k, v in zip(keys, values, strict=True):
            cache[k] = v
        return cache

    def build_ttl() -> Any:
        cache: TTLCache[str, str] = TTLCache(n, 300)
        for k, v in zip(keys, values, strict=True):
            cache[k] = v
        return cache

    def build_tuples() -> Any:
        cache: LRUCache[str, tuple[str, float]] = LRUCache(n)
        now = time.monotonic()
        for k, v in zip(keys, values, strict=True):
            cache[k] = (v, now + 300.0)
        return cache

    def build_layer(ttl: float | None, stamped: bool = False) -> Callable[[], Any]:
        def build() -> Any:
            layer = MemoryLayer("L1", maxsize=n, default_ttl=None)
            for k, v in zip(keys, values, strict=True):
                layer.set(k, Stamped(v, 60.0, 60.0) if stamped else v, ttl)
            return layer

        return build

    builds = {
        "dict": ("dict", build_dict),
        "lru": ("cachetools LRUCache", build_lru),
        "ttlcache": ("cachetools TTLCache (ttl 300 s)", build_ttl),
        "layer_ttl": ("MemoryLayer, every entry with a TTL", build_layer(300.0)),
        "layer": ("MemoryLayer, no TTL", build_layer(None)),
        "layer_stamped": ("MemoryLayer, every entry stamped (fail-safe)", build_layer(360.0, True)),
        "tuples": ("LRUCache of (value, expiry) tuples (MemoryLayer before)", build_tuples),
    }
    for key, (label, build) in builds.items():
        row = h.Row(key, label)
        for _ in range(max(1, min(ctx.rounds, 3))):
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            kept = build()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            row.samples.append((after - before) / n)
            del kept
        sec.rows.append(row)
    sec.check(
        "every container holds every entry",
        len(build_lru()) == n and len(build_layer(300.0)()) == n,
    )
    sec.goals += [
        h.Goal("MemoryLayer, TTLs, <= 1.3x cachetools LRUCache", "layer_ttl", "lru", "<=", 1.3),
        h.Goal("MemoryLayer, TTLs, vs cachetools TTLCache", "layer_ttl", "ttlcache", "info"),
        h.Goal("MemoryLayer, no TTL, vs cachetools LRUCache", "layer", "lru", "info"),
        h.Goal("MemoryLayer, TTLs, vs its entries before", "layer_ttl", "tuples", "info"),
    ]
    return sec
