#!/usr/bin/env python3
"""cachechain's benchmark suite: ``python benchmarks/run.py [--quick] [--json FILE]``.

Measures cachechain's hot paths next to what its users would pick instead, side by side
in ONE process: every section builds its contenders, then runs them interleaved in
rounds (each round times every contender on ``n`` calls, in a rotating order, with the
garbage collector off), and reports the median and the best of the per-round means, in
nanoseconds per call. Goals are ratios between contenders of the same run; remote
timings on a shared machine swing 2-4x between runs, so never compare across runs.

A missed goal is printed, not raised: the exit status is 0 after a complete run, 2 when
the run could not happen (no memcached binary, a section crashed) and 3 when one of the
honesty checks failed (for example an "L2 hit" that did not reach memcached), because
then the numbers do not measure what their labels say. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import inspect
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: A small, typical cached value: a JSON-able dict of about 80 bytes.
VALUE: dict[str, Any] = {"id": 12345, "name": "benchmark user", "tags": ["a", "b"], "n": 0.5}

_perf_ns = time.perf_counter_ns


def steady_chain(layers: list[Any]) -> Any:
    """A chain of ``layers`` with coherence on, whose checks of what L1 holds cannot be
    undone behind their back: it has made its journal's first read (which drops every
    L1 entry: what was cached before may predate entries it skipped), and its bound is
    2 s (on a loaded machine a poll in flight past the default 100 ms bound makes the
    watchdog drop L1). What is timed is the same: the poll every 40 ms, the keys under
    the namespace generation."""
    from cachechain import Chain, CoherenceConfig

    chain = Chain(layers, coherence=CoherenceConfig(bound=2.0))
    journal: Any = chain.coherence.backplane if chain.coherence is not None else None
    deadline = time.monotonic() + 5.0
    while journal is not None and journal._last is None and time.monotonic() < deadline:
        time.sleep(0.005)  # the journal has no event to wait on; bounded
    return chain


# ------------------------------------------------------------------------ harness


@dataclass
class Contender:
    """One thing to time. ``run(n)`` performs the operation ``n`` times; ``before`` and
    ``after`` run untimed around each timed run (to prepare keys, drain queues)."""

    key: str
    label: str
    run: Callable[[int], object]
    before: Callable[[], object] | None = None
    after: Callable[[], object] | None = None


@dataclass
class Row:
    """The measured (or skipped) result of one contender."""

    key: str
    label: str
    samples: list[float] = field(default_factory=list)  # per-round mean, ns per call
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def best(self) -> float | None:
        return min(self.samples) if self.samples else None


@dataclass
class Goal:
    """A ratio ``median(num) / median(den)`` compared with ``limit`` (``op`` is "<=",
    "<", or "info" for a ratio shown without a verdict)."""

    text: str
    num: str
    den: str
    op: str
    limit: float | None = None
    ratio: float | None = None
    paired: float | None = None  # median of the per-round ratios
    best: float | None = None  # best / best
    ok: bool | None = None
    note: str = ""

    @property
    def target(self) -> str:
        if self.op == "info" or self.limit is None:
            return "(info)"
        return f"{self.op} {self.limit:.2f}x"

    def passes(self, value: float) -> bool:
        """Whether ``value`` meets the target."""
        limit = self.limit if self.limit is not None else 0.0
        return value <= limit if self.op == "<=" else value < limit

    @property
    def unstable(self) -> bool:
        """The three estimates (ratio of medians, paired, ratio of bests) disagree on
        the verdict (for an info ratio: spread by more than 10%): the machine was too
        noisy during this section to trust the number."""
        values = [v for v in (self.ratio, self.paired, self.best) if v is not None]
        if not values:
            return False
        if self.op == "info" or self.limit is None:
            return max(values) > 1.10 * min(values)
        return len({self.passes(v) for v in values}) > 1

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return f"skipped: {self.note}" if self.note else "skipped"
        if self.op == "info":
            return "info (unstable)" if self.unstable else "info"
        if self.unstable:
            says = ", ".join(
                f"{name} {'ok' if self.passes(v) else 'MISSED'}"
                for name, v in (("ratio", self.ratio), ("paired", self.paired), ("best", self.best))
                if v is not None
            )
            return f"UNSTABLE ({says})"
        return "ok" if self.ok else "MISSED"


@dataclass
class Check:
    """A yes/no fact that makes a section's numbers mean what their labels say."""

    text: str
    ok: bool
    detail: str = ""


@dataclass
class Section:
    sid: str
    title: str
    n: int = 0
    rounds: int = 0
    base: str | None = None  # the row the "x base" column divides by
    rows: list[Row] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    unit: str = "ns"  # what a sample measures: ns per call, or "B" (bytes per entry)

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)

    def skip(self, key: str, label: str, note: str) -> None:
        self.rows.append(Row(key, label, note=note))

    def check(self, text: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(text, bool(ok), detail))


@dataclass
class Ctx:
    host: str
    port: int
    rounds: int
    scale: float
    quick: bool
    server_pid: int | None = None  # the benchmark's own memcached

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def remote_rounds(self) -> int:
        """Sections that talk to memcached run 3x the rounds on a third of the calls:
        shorter rounds, so the contenders of a round see the same machine weather."""
        return self.rounds * 3

    def n(self, full: int, minimum: int = 10) -> int:
        return max(minimum, int(full * self.scale))


def measure(contenders: Sequence[Contender], n: int, rounds: int) -> dict[str, list[float]]:
    """Time every contender on ``n`` calls per round, interleaved, after one untimed
    warm-up round. The order rotates each round. Returns per-round ns per call."""
    samples: dict[str, list[float]] = {c.key: [] for c in contenders}
    order = list(contenders)
    for r in range(-1, rounds):
        shift = r % len(order)
        for c in order[shift:] + order[:shift]:
            if c.before is not None:
                c.before()
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                t0 = _perf_ns()
                c.run(n)
                elapsed = _perf_ns() - t0
            finally:
                if was_enabled:
                    gc.enable()
            if c.after is not None:
                c.after()
            if r >= 0:
                samples[c.key].append(elapsed / n)
    return samples


def run_section(sec: Section, contenders: Sequence[Contender], n: int, rounds: int) -> None:
    """Measure ``contenders`` into ``sec.rows`` (keeping skipped rows in place)."""
    sec.n, sec.rounds = n, rounds
    samples = measure(contenders, n, rounds)
    labels = {c.key: c.label for c in contenders}
    for key, values in samples.items():
        existing = sec.row(key)
        if existing is None:
            sec.rows.append(Row(key, labels[key], values))
        else:
            existing.samples = values


def evaluate(sec: Section) -> None:
    """Fill in each goal's ratios and verdict from the section's rows."""
    for goal in sec.goals:
        num, den = sec.row(goal.num), sec.row(goal.den)
        if num is None or den is None or not num.samples or not den.samples:
            missing = [r.label for r in (num, den) if r is not None and not r.samples and r.note]
            goal.note = goal.note or (f"{missing[0]} not measured" if missing else "no data")
            continue
        assert num.median is not None and den.median is not None
        goal.ratio = num.median / den.median
        assert num.best is not None and den.best is not None
        goal.best = num.best / den.best
        goal.paired = statistics.median(
            a / b for a, b in zip(num.samples, den.samples, strict=True)
        )
        if goal.op != "info":
            goal.ok = goal.passes(goal.ratio)


def loop(fn: Callable[[Any], object], arg: Any) -> Callable[[int], None]:
    """A runner calling ``fn(arg)`` ``n`` times."""

    def run(n: int) -> None:
        f, a = fn, arg
        for _ in repeat(None, n):
            f(a)

    return run


def alternate(fn: Callable[[Any], object], args: Sequence[Any]) -> Callable[[int], None]:
    """A runner calling ``fn(args[0])``, ``fn(args[1])``, ... in turn, ``n`` times."""
    width = len(args)

    def run(n: int) -> None:
        f, a, w = fn, args, width
        for i in range(n):
            f(a[i % w])

    return run


# ------------------------------------------------------------------------ memcached


def mc_client(ctx: Ctx) -> Any:
    """A pymemcache client configured like the ones MemcachedLayer pools."""
    from pymemcache.client.base import Client

    return Client(
        (ctx.host, ctx.port),
        default_noreply=False,
        connect_timeout=0.25,
        timeout=0.25,
        no_delay=True,
    )


def mc_stats(ctx: Ctx) -> dict[str, int]:
    """memcached's ``stats`` (the numeric ones, str keys), from a fresh connection."""
    client = mc_client(ctx)
    try:
        raw = client.stats()
    finally:
        client.close()
    out: dict[str, int] = {}
    for k, v in raw.items():
        name = k.decode() if isinstance(k, bytes) else str(k)
        if isinstance(v, int):
            out[name] = v
    return out


def mc_version(ctx: Ctx) -> str:
    client = mc_client(ctx)
    try:
        version = client.version()
    finally:
        client.close()
    return version.decode() if isinstance(version, bytes) else str(version)


class _Calls(list[tuple[bytes, int]]):
    """The retrieval commands of one thread; :attr:`others`: every other thread's."""

    def __init__(self) -> None:
        super().__init__()
        self.others: list[tuple[bytes, int]] = []


@contextmanager
def count_round_trips() -> Iterator[list[tuple[bytes, int]]]:
    """Count the memcached layer's retrieval commands (``get``/``gets``): each call of
    a connection's ``get_many`` or ``gets`` (``cachechain.layers._wire``) sends one
    command line and reads its whole reply, i.e. one round trip. Yields a list of
    ``(command, number of keys)`` sent by the calling thread; those of other threads
    (a coherence journal polling its generation key) go to the list's ``others``
    attribute."""
    from cachechain.layers import _wire
    from cachechain.layers._wire import Connection

    get_many, gets, get = Connection.get_many, Connection.gets, _wire.get
    calls = _Calls()
    me = threading.get_ident()

    def note(command: bytes, count: int) -> None:
        (calls if threading.get_ident() == me else calls.others).append((command, count))

    def spy_get_many(self: Any, keys: Any, *args: Any) -> Any:
        keys = list(keys)
        note(b"get", len(keys))
        return get_many(self, keys, *args)

    def spy_gets(self: Any, key: bytes, *args: Any) -> Any:
        note(b"gets", 1)
        return gets(self, key, *args)

    def spy_get(conn: Any, key: bytes, *args: Any) -> Any:
        note(b"get", 1)
        return get(conn, key, *args)

    Connection.get_many, Connection.gets = spy_get_many, spy_gets  # type: ignore[method-assign,assignment]
    _wire.get = spy_get  # type: ignore[assignment]
    try:
        yield calls
    finally:
        Connection.get_many, Connection.gets = get_many, gets  # type: ignore[method-assign]
        _wire.get = get


def _optional(module: str) -> tuple[Any, str]:
    """Import ``module``; return ``(module or None, reason it is missing)``."""
    try:
        return importlib.import_module(module), ""
    except ImportError as exc:
        return None, f"{module} not importable ({exc})"


# ------------------------------------------------------------------------ sections


def bench_l1_hit(ctx: Ctx) -> Section:
    from cachetools import LRUCache

    from cachechain.layers._base import MISSING
    from cachechain.layers._memcached import MemcachedLayer
    from cachechain.layers._memory import MemoryLayer

    sec = Section("l1_hit", "1. L1 hit: the key is in L1, metrics=None", base="lru_lock")
    key = "user:42"
    l1 = MemoryLayer("L1")
    chain = steady_chain([l1, MemcachedLayer("L2", ctx.address)])
    try:
        chain.set(key, VALUE)
        sec.check("Chain.get returns the value from L1", chain.get(key) == VALUE)
        sec.check("the key is in L1", l1.get(key) is not MISSING)

        plain = {key: VALUE}
        lru: LRUCache[str, Any] = LRUCache(10_000)
        lru[key] = VALUE
        lock = threading.Lock()

        def run_lru_lock(n: int) -> None:
            g, lk, k = lru.get, lock, key
            for _ in repeat(None, n):
                with lk:
                    g(k)

        contenders = [
            Contender("dict", "dict.get (floor, reference)", loop(plain.get, key)),
            Contender("layer", "MemoryLayer.get alone (reference)", loop(l1.get, key)),
            Contender("chain", "Chain.get, L1 hit", loop(chain.get, key)),
            Contender("lru_lock", "cachetools LRUCache.get under threading.Lock", run_lru_lock),
        ]
        dogpile, why = _optional("dogpile.cache")
        if dogpile is not None:
            region = dogpile.make_region().configure("dogpile.cache.memory")
            region.set(key, VALUE)
            sec.check("dogpile region returns the value", region.get(key) == VALUE)
            contenders.append(
                Contender("dogpile", "dogpile.cache memory region .get", loop(region.get, key))
            )
        else:
            sec.skip("dogpile", "dogpile.cache memory region .get", why)
        backends, why = _optional("flask_caching.backends")
        if backends is not None:
            simple = backends.SimpleCache(threshold=10_000, default_timeout=300)
            simple.set(key, VALUE)
            sec.check("Flask-Caching SimpleCache returns the value", simple.get(key) == VALUE)
            contenders.append(
                Contender("simple", "Flask-Caching SimpleCache.get", loop(simple.get, key))
            )
        else:
            sec.skip("simple", "Flask-Caching SimpleCache.get", why)

        run_section(sec, contenders, ctx.n(20_000), ctx.rounds)
        sec.goals += [
            Goal("Chain.get <= 2x locked LRUCache.get", "chain", "lru_lock", "<=", 2.0),
            Goal("Chain.get < dogpile memory region get", "chain", "dogpile", "<", 1.0),
            Goal("Chain.get < Flask-Caching SimpleCache.get", "chain", "simple", "<", 1.0),
        ]
    finally:
        chain.close()
    return sec


def _stand_in_remote(name: str) -> Any:
    """An in-process layer that a chain treats as remote (breaker, writer): the chain's
    own CPU cost on an L2 hit, without the network and the codec."""
    from cachechain.layers._memory import MemoryLayer

    class StandIn(MemoryLayer):
        local = False

    return StandIn(name)


def bench_l2_hit(ctx: Ctx) -> Section:
    sec = Section("l2_hit", "2. L2 hit: L1 misses, memcached hits (backfill included)")
    return _l2_hit(ctx, sec)


def _pin_to_one_cpu(pid: int) -> tuple[int, dict[int, set[int]]]:
    """Put this thread and every thread of process ``pid`` on one CPU (the last this
    thread may use). Returns the CPU and the CPU sets to restore with _restore_cpus.
    Raises OSError where affinity cannot be set."""
    tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    saved = {0: os.sched_getaffinity(0), **{t: os.sched_getaffinity(t) for t in tasks}}
    cpu = max(saved[0])
    try:
        for task in saved:
            with suppress(ProcessLookupError):  # a memcached thread that has ended
                os.sched_setaffinity(task, {cpu})
    except OSError:
        _restore_cpus(saved)
        raise
    return cpu, saved


def _restore_cpus(saved: dict[int, set[int]]) -> None:
    for task, cpus in saved.items():
        with suppress(OSError):  # that thread has gone: nothing to restore
            os.sched_setaffinity(task, cpus)


def bench_l2_hit_pinned(ctx: Ctx) -> Section:
    sec = Section("l2_hit_pinned", "2b. L2 hit, the benchmark and memcached pinned to one CPU")
    if ctx.server_pid is None or not hasattr(os, "sched_setaffinity"):
        sec.notes.append("skipped: needs Linux CPU affinity and the suite's own memcached")
        return sec
    sec.notes.append(
        "Section 2 again, with this thread and memcached's threads on one CPU: no "
        "wake-up of another CPU per round trip, so the round trip is short and steady "
        "(22-42 us on the hosts measured, against 100-150 us unpinned) and the chain's "
        "own cost weighs most."
    )
    try:
        cpu, saved = _pin_to_one_cpu(ctx.server_pid)
    except OSError as exc:  # a sandbox that forbids it
        sec.notes.append(f"skipped: cannot pin to one CPU ({exc})")
        return sec
    try:
        sec.notes.append(f"pinned to CPU {cpu}")
        return _l2_hit(ctx, sec)
    finally:
        _restore_cpus(saved)


def _l2_hit(ctx: Ctx, sec: Section) -> Section:
    from cachechain._chain import Chain
    from cachechain._config import LayerConfig
    from cachechain.layers._base import MISSING
    from cachechain.layers._memcached import MemcachedLayer, memcached_key
    from cachechain.layers._memory import MemoryLayer

    sec.base = "raw"
    sec.notes.append(
        "Each chain's L1 is MemoryLayer(maxsize=1) and the calls alternate two keys: the "
        "backfill of one key evicts the other, so every call is an honest L1 miss + L2 "
        "hit + synchronous L1 backfill (with one LRU eviction, as in a full L1). Checked "
        "below with memcached's get_hits. Nothing is subtracted."
    )
    sec.notes.append(
        "On an L2 hit the async writer is not on the path (the backfill goes to L1, "
        "which is written synchronously), so 'breaker+writer' is the breaker wrapper "
        "(ResilientLayer: breaker permit + slow-call clock reads) alone."
    )
    sec.notes.append(
        "The chains run with coherence on (the default): their keys carry the namespace "
        "generation, and the raw client and the bare layer read those same keys. Each "
        "chain's journal polls memcached every 40 ms in the background (2 get_hits per "
        "poll), which the get_hits check allows for."
    )
    keys = ["user:l2:0", "user:l2:1"]
    l2_breaker = MemcachedLayer("L2", ctx.address)
    l2_plain = MemcachedLayer("L2", ctx.address)
    l2_alone = MemcachedLayer("L2", ctx.address)
    with_breaker = Chain([MemoryLayer("L1", maxsize=1), l2_breaker])
    no_breaker = Chain([MemoryLayer("L1", maxsize=1), LayerConfig(layer=l2_plain, resilient=False)])
    stand_in = _stand_in_remote("L2")
    cpu_only = Chain([MemoryLayer("L1", maxsize=1), stand_in])
    coherence = with_breaker.coherence
    prefix = coherence.namespace.current() if coherence is not None else ""
    stored = [prefix + k for k in keys]  # the keys as memcached holds them
    mkeys = [memcached_key(k) for k in stored]
    raw = mc_client(ctx)
    try:
        for k in keys:
            with_breaker.set(k, VALUE)
            cpu_only.set(k, VALUE)
        sec.check("the chain with a breaker wraps L2 in one", "L2" in with_breaker.breakers)
        sec.check("the resilient=False chain has no breaker", not no_breaker.breakers)
        sec.check("raw Client.get reads the same stored bytes", raw.get(mkeys[0]) is not None)

        def verify(chain: Chain, what: str) -> None:
            calls = 100
            before = mc_stats(ctx)
            start = time.perf_counter()
            values = [chain.get(keys[i % 2]) for i in range(calls)]
            polls = 3 * ((time.perf_counter() - start) / 0.04 + 2)  # 3 chains' journals
            after = mc_stats(ctx)
            hits = after["get_hits"] - before["get_hits"]
            sec.check(
                f"{what}: every get missed L1 and hit memcached",
                calls <= hits <= calls + 2 * polls and all(v == VALUE for v in values),
                f"{calls} Chain.get calls -> {hits} memcached get_hits",
            )

        verify(with_breaker, "chain with breaker")
        verify(no_breaker, "chain without breaker")
        sec.check(
            "the stand-in L2 is behind a breaker too, and L1 misses every call",
            "L2" in cpu_only.breakers
            and cpu_only.get(keys[0]) == VALUE
            and cpu_only.layers[0].get(keys[1]) is MISSING,
        )

        contenders = [
            Contender("raw", "pymemcache Client.get (raw bytes)", alternate(raw.get, mkeys)),
            Contender(
                "layer",
                "MemcachedLayer.get_with_ttl alone (decodes; reference)",
                alternate(l2_alone.get_with_ttl, stored),
            ),
            Contender(
                "chain_plain",
                "Chain.get, L2 hit, L2 resilient=False (no breaker)",
                alternate(no_breaker.get, keys),
            ),
            Contender(
                "chain", "Chain.get, L2 hit (default: breaker)", alternate(with_breaker.get, keys)
            ),
            Contender(
                "stand_in",
                "in-process stand-in L2: its get_with_ttl alone (reference)",
                alternate(stand_in.get_with_ttl, keys),
            ),
            Contender(
                "cpu_only",
                "in-process stand-in L2: Chain.get, L2 hit (chain CPU cost)",
                alternate(cpu_only.get, keys),
            ),
        ]
        run_section(sec, contenders, ctx.n(300), ctx.remote_rounds)
        sec.goals += [
            Goal("Chain.get L2 hit <= 1.2x raw Client.get", "chain", "raw", "<=", 1.2),
            Goal("breaker+writer add <= 10% to an L2 hit", "chain", "chain_plain", "<=", 1.10),
        ]
    finally:
        with_breaker.close()
        no_breaker.close()
        cpu_only.close()
        l2_alone.close()
        raw.close()
    return sec


def bench_get_many(ctx: Ctx) -> Section:
    from cachechain._codecs import ENVELOPE_HEADER_SIZE
    from cachechain.layers._memcached import MemcachedLayer, memcached_key
    from cachechain.layers._memory import MemoryLayer

    sec = Section("get_many", "3. get_many of 100 keys: all in L2, none in L1", base="raw")
    sec.notes.append(
        "The chain's L1 is MemoryLayer(maxsize=100) and the calls alternate two batches of "
        "100 keys: backfilling one batch evicts the other, so each call misses L1 for all "
        "100 keys, reads them from memcached and backfills 100 entries (100 evictions)."
    )
    size = 100
    batches = [[f"item:{b}:{i}" for i in range(size)] for b in "ab"]
    l1 = MemoryLayer("L1", maxsize=size)
    chain = steady_chain([l1, MemcachedLayer("L2", ctx.address)])
    # The chain's keys carry its namespace generation (coherence on): the raw client and
    # the bare layer read those same keys, as in section 2.
    prefix = chain.coherence.namespace.current() if chain.coherence is not None else ""
    spaced = [[prefix + k for k in batch] for batch in batches]
    mbatches = [[memcached_key(k) for k in batch] for batch in spaced]
    l2_alone = MemcachedLayer("L2", ctx.address)
    raw = mc_client(ctx)
    try:
        chain.set_many(dict.fromkeys(batches[0] + batches[1], VALUE))
        sec.check(
            "the raw client and the bare layer read the chain's values",
            len(raw.get_many(mbatches[0])) == size
            and len(l2_alone.get_many_with_ttl(spaced[0])) == size,
        )
        l1.clear()
        l1.set_many(dict.fromkeys(batches[1], VALUE))  # L1 holds batch b, as in the loop
        sec.check(
            "before the call, L1 holds none of the batch", not l1.get_many_with_ttl(batches[0])
        )
        with count_round_trips() as fetches:  # the stats inside: another thread's
            before = mc_stats(ctx)  # polls between them are seen by the spy too
            found = chain.get_many(batches[0])
            after = mc_stats(ctx)
        gets = [f for f in fetches if f[0] in (b"get", b"gets")]
        # memcached counts every key asked, the journal's polls too (another thread). The
        # spy's window holds the stats' window: a poll just outside the latter is in
        # ``polled`` but not in the deltas, so the chain's share is between the two.
        polled = sum(count for _, count in fetches.others)  # type: ignore[attr-defined]
        cmd_get = after["cmd_get"] - before["cmd_get"]
        hits = after["get_hits"] - before["get_hits"]
        sec.check(
            "Chain.get_many(100 keys) is ONE memcached round trip",
            len(gets) == 1 and gets[0][1] == size,
            f"retrieval commands sent: {len(gets)} (keys per command: {[g[1] for g in gets]})",
        )
        sec.check(
            "memcached served all 100 keys",
            size <= cmd_get <= size + polled
            and size <= hits <= size + polled
            and len(found) == size,
            f"memcached stats delta: cmd_get={cmd_get}, get_hits={hits} (journal polls in "
            f"the window: up to {polled} keys); chain returned {len(found)} keys",
        )
        sec.check(
            "after the call, L1 holds the batch and none of the other",
            len(l1.get_many_with_ttl(batches[0])) == size and not l1.get_many_with_ttl(batches[1]),
        )

        header = ENVELOPE_HEADER_SIZE

        def raw_decoded(keys: Any) -> Any:  # the same bytes, the same JSON decoding
            return {k: json.loads(v[header:]) for k, v in raw.get_many(keys).items()}

        sec.check(
            "raw get_many + JSON decodes the chain's values",
            all(v == VALUE for v in raw_decoded(mbatches[0]).values()),
        )
        contenders = [
            Contender("raw", "pymemcache Client.get_many(100)", alternate(raw.get_many, mbatches)),
            Contender(
                "raw_json",
                "pymemcache get_many(100) + json.loads of each value (reference)",
                alternate(raw_decoded, mbatches),
            ),
            Contender(
                "layer",
                "MemcachedLayer.get_many_with_ttl(100) alone (reference)",
                alternate(l2_alone.get_many_with_ttl, spaced),
            ),
            Contender(
                "chain",
                "Chain.get_many(100): L1 miss, L2 hit, backfill",
                alternate(chain.get_many, batches),
            ),
        ]
        run_section(sec, contenders, ctx.n(60, minimum=3), ctx.remote_rounds)
        sec.goals.append(Goal("Chain.get_many <= 1.3x raw get_many", "chain", "raw", "<=", 1.3))
        sec.goals.append(
            Goal("Chain.get_many vs raw get_many + JSON decoding", "chain", "raw_json", "info")
        )
        sec.goals.append(
            Goal("  of which MemcachedLayer (decode of 100 values)", "layer", "raw", "info")
        )
    finally:
        chain.close()
        l2_alone.close()
        raw.close()
    return sec


def bench_breaker(ctx: Ctx) -> Section:
    from cachechain._breaker import CircuitBreaker

    sec = Section("breaker", "4. Circuit breaker, CLOSED state", base="cb")
    cb = CircuitBreaker("bench")
    lock = threading.Lock()

    def noop() -> None:
        return None

    def run_noop(n: int) -> None:
        f = noop
        for _ in repeat(None, n):
            f()

    def run_cb(n: int) -> None:
        acquire, success = cb.acquire, cb.on_success
        for _ in repeat(None, n):
            success(acquire())

    def run_call(n: int) -> None:
        call, f = cb.call, noop
        for _ in repeat(None, n):
            call(f)

    def run_lock(n: int) -> None:
        lk = lock
        for _ in repeat(None, n):
            with lk:
                pass

    contenders = [
        Contender("noop", "a no-op Python call (reference)", run_noop),
        Contender("lock", "with threading.Lock(): pass (reference)", run_lock),
        Contender("cb", "CircuitBreaker.acquire() + on_success()", run_cb),
        Contender("cb_call", "CircuitBreaker.call(noop)", run_call),
    ]
    pybreaker, _ = _optional("pybreaker")
    if pybreaker is not None:
        pb = pybreaker.CircuitBreaker()

        def run_pb(n: int) -> None:
            call, f = pb.call, noop
            for _ in repeat(None, n):
                call(f)

        contenders.append(Contender("pybreaker", "pybreaker CircuitBreaker.call(noop)", run_pb))
    else:
        sec.skip(
            "pybreaker",
            "pybreaker CircuitBreaker.call(noop)",
            "pybreaker is not installed (deliberately not installed; peers.md: its "
            "call(f) adds ~1,220 ns on this kind of machine)",
        )
    run_section(sec, contenders, ctx.n(100_000), ctx.rounds)
    sec.goals.append(Goal("CircuitBreaker.call vs pybreaker.call", "cb_call", "pybreaker", "info"))
    sec.check("the breaker stayed CLOSED", cb.state.name == "CLOSED")
    return sec


class _NullLayer:
    """The fastest possible layer for the writer's workers: writes nothing."""

    name = "null"
    local = False
    max_ttl = None

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        return None

    def delete(self, key: str) -> None:
        return None


def bench_writer(ctx: Ctx) -> Section:
    from concurrent.futures import ThreadPoolExecutor

    from cachechain._writer import AsyncWriter

    sec = Section("writer", "5. Async writer: the cost of one enqueue", base="submit")
    n = ctx.n(5_000)
    sec.notes.append(
        f"The writer's queue holds {2 * n} keys and is flushed (untimed) after each timed "
        f"run of {n} distinct keys, so it never fills; its one worker drains concurrently "
        "into a no-op layer. The executor has one worker too, and is waited on after each "
        "run. 'as a backfill' is the call the chain makes: set(..., max_wait=0.0)."
    )
    writer = AsyncWriter(_NullLayer(), queue_size=2 * n, workers=1)  # type: ignore[arg-type]
    executor = ThreadPoolExecutor(max_workers=1)
    keys = [f"w:{i}" for i in range(n)]
    try:

        def noop(_: object) -> None:
            return None

        def run_new(n: int) -> None:
            s, v = writer.set, VALUE
            for k in keys:
                s(k, v)

        def run_backfill(n: int) -> None:
            s, v = writer.set, VALUE
            for k in keys:
                s(k, v, None, max_wait=0.0)

        def run_same(n: int) -> None:
            s, v = writer.set, VALUE
            for _k in keys:
                s("hot", v)

        def run_submit(n: int) -> None:
            submit, f = executor.submit, noop
            for k in keys:
                submit(f, k)

        def drain_writer() -> None:
            writer.flush(10.0)

        def drain_executor() -> None:
            executor.submit(noop, None).result(10.0)  # one worker: FIFO

        contenders = [
            Contender(
                "submit", "ThreadPoolExecutor.submit(no-op)", run_submit, after=drain_executor
            ),
            Contender("new", "AsyncWriter.set, a new key each call", run_new, after=drain_writer),
            Contender(
                "backfill",
                "AsyncWriter.set(..., max_wait=0.0), new keys (as a backfill)",
                run_backfill,
                after=drain_writer,
            ),
            Contender(
                "same", "AsyncWriter.set, the same key (coalesced)", run_same, after=drain_writer
            ),
        ]
        run_section(sec, contenders, n, ctx.rounds)
        stats = writer.stats()
        sec.check(
            "the writer's queue never filled (nothing dropped)",
            stats.dropped == 0,
            f"written={stats.written}, coalesced={stats.coalesced}, dropped={stats.dropped}",
        )
        sec.goals += [
            Goal("AsyncWriter.set (new key) < submit", "new", "submit", "<", 1.0),
            Goal("AsyncWriter.set as a backfill < submit", "backfill", "submit", "<", 1.0),
        ]
    finally:
        writer.close(5.0)
        executor.shutdown(wait=True)
    return sec


def _prometheus_collector() -> tuple[Any, str]:
    """A cachechain PrometheusCollector on a private registry, or (None, why not)."""
    mod, why = _optional("cachechain.metrics._prometheus")
    if mod is None:
        return None, why
    cls = getattr(mod, "PrometheusCollector", None)
    if cls is None:
        return None, "cachechain.metrics.prometheus has no PrometheusCollector yet"
    from prometheus_client import CollectorRegistry

    params: Mapping[str, Any]
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    attempts: list[Callable[[], Any]] = []
    if "registry" in params:  # a private registry: no clash with the global one
        attempts.append(lambda: cls(registry=CollectorRegistry()))
        attempts.append(lambda: cls("cachechain_bench", registry=CollectorRegistry()))
    attempts.append(cls)
    error: Exception | None = None
    for attempt in attempts:
        try:
            return attempt(), ""
        except Exception as exc:
            error = error or exc
    return None, f"PrometheusCollector could not be built: {type(error).__name__}: {error}"


def bench_metrics(ctx: Ctx) -> Section:
    from cachetools import LRUCache

    from cachechain._chain import Chain
    from cachechain.layers._memcached import MemcachedLayer
    from cachechain.layers._memory import MemoryLayer

    sec = Section("metrics", "6. Metrics: an L1 hit with each collector", base="none")
    key = "user:42"
    chains: list[Chain] = []
    sinks: list[_UdpSink] = []

    def make(metrics: Any) -> Chain:
        chain = Chain([MemoryLayer("L1"), MemcachedLayer("L2", ctx.address)], metrics=metrics)
        chains.append(chain)
        chain.set(key, VALUE)
        return chain

    try:
        contenders = [
            Contender("none", "Chain.get, L1 hit, metrics=None", loop(make(None).get, key))
        ]
        mem_mod, why = _optional("cachechain.metrics._memory")
        if mem_mod is not None and hasattr(mem_mod, "MemoryCollector"):
            collector = mem_mod.MemoryCollector()
            chain = make(collector)
            contenders.append(
                Contender("memory", "Chain.get, L1 hit, MemoryCollector", loop(chain.get, key))
            )
        else:
            sec.skip("memory", "Chain.get, L1 hit, MemoryCollector", why or "no MemoryCollector")
        prom, why = _prometheus_collector()
        if prom is not None:
            chain = make(prom)
            contenders.append(
                Contender("prom", "Chain.get, L1 hit, PrometheusCollector", loop(chain.get, key))
            )
        else:
            sec.skip("prom", "Chain.get, L1 hit, PrometheusCollector", why)
        sink = _UdpSink()  # a StatsD "daemon" in another process: reads and drops
        sinks.append(sink)
        statsd_rows = (
            ("statsd", "StatsD exporter (selected by name), daemon up", "127.0.0.1", sink.port),
            ("statsd_down", "StatsD exporter, nothing listening", "127.0.0.1", free_udp_port()),
            ("statsd_dns", "StatsD exporter, host does not resolve", "statsd.invalid", 8125),
        )
        for ident, label, host, port in statsd_rows:
            exporter, why = _statsd_exporter(host, port)
            if exporter is None:
                sec.skip(ident, f"Chain.get, L1 hit, {label}", why)
                continue
            chain = make(exporter)
            contenders.append(Contender(ident, f"Chain.get, L1 hit, {label}", loop(chain.get, key)))

        lru: LRUCache[str, Any] = LRUCache(10_000)
        lru[key] = VALUE
        lock = threading.Lock()

        def run_lru_lock(n: int) -> None:
            g, lk, k = lru.get, lock, key
            for _ in repeat(None, n):
                with lk:
                    g(k)

        contenders.append(
            Contender("lru_lock", "LRUCache.get under Lock (reference)", run_lru_lock)
        )
        client, why = _optional("prometheus_client")
        if client is not None:
            registry = client.CollectorRegistry()
            hits = client.Counter("bench_hits", "hits", ["layer"], registry=registry)
            latency = client.Histogram(
                "bench_latency_seconds", "latency", ["layer", "op"], registry=registry
            )
            perf = time.perf_counter

            def run_naive(n: int) -> None:
                g, lk, k, c, h, p = lru.get, lock, key, hits, latency, perf
                for _ in repeat(None, n):
                    t0 = p()
                    with lk:
                        g(k)
                    d = p() - t0
                    c.labels("L1").inc()
                    h.labels("L1", "get").observe(d)
                    c.labels("L1").inc()
                    h.labels("L1", "get").observe(d)

            contenders.append(
                Contender(
                    "naive",
                    "naive prometheus: locked LRU get + 2x (Counter+Histogram)",
                    run_naive,
                )
            )
        else:
            sec.skip("naive", "naive prometheus around a locked LRU get", why)
        sec.notes.append(
            "naive prometheus = perf_counter() around a locked LRUCache.get, then "
            "Counter.labels('L1').inc() + Histogram.labels('L1','get').observe(d), twice "
            "(a layer-level and a chain-level pair, as a chain L1 hit records both)."
        )
        run_section(sec, contenders, ctx.n(20_000), ctx.rounds)
        sec.goals += [
            Goal("MemoryCollector <= 2x metrics=None", "memory", "none", "<=", 2.0),
            Goal("PrometheusCollector <= 1.3x metrics=None", "prom", "none", "<=", 1.3),
            Goal("PrometheusCollector vs naive prometheus", "prom", "naive", "info"),
            Goal("StatsD exporter <= 1.3x metrics=None", "statsd", "none", "<=", 1.3),
            Goal("StatsD, daemon down: no added latency", "statsd_down", "statsd", "<=", 1.1),
            Goal("StatsD, host unresolvable: no added latency", "statsd_dns", "statsd", "<=", 1.1),
        ]
    finally:
        for chain in chains:
            chain.close()
        for sink in sinks:
            sink.close()
    return sec


class _UdpSink:
    """A process that reads UDP datagrams on a loopback port and drops them."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import socket\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "s.bind(('127.0.0.1', 0))\n"
                "print(s.getsockname()[1], flush=True)\n"
                "while True:\n"
                "    s.recv(65536)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def free_udp_port() -> int:
    """A loopback UDP port with nothing bound to it a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _statsd_exporter(host: str, port: int) -> tuple[Any, str]:
    """The StatsD exporter as a user gets it (by name, through its entry point)."""
    try:
        from cachechain._exporters import create_exporter

        spec = {"exporter": "statsd", "options": {"host": host, "port": port}}
        return create_exporter(spec), ""
    except Exception as exc:  # not installed: pip install ./plugins/cachechain-statsd
        return None, f"{type(exc).__name__}: {exc}"


def bench_open_breaker(ctx: Ctx) -> Section:
    from cachechain._chain import Chain
    from cachechain._config import BreakerConfig, LayerConfig
    from cachechain.layers._memcached import MemcachedLayer
    from cachechain.layers._memory import MemoryLayer

    sec = Section(
        "open_breaker",
        "7. get_or_load of a key absent everywhere, L2's breaker open (issue 3)",
        base="no_l2",
    )
    n = ctx.n(400)
    sec.notes.append(
        "Every call uses a fresh key (prepared untimed), so each one misses L1 (maxsize "
        "1,000, full: one eviction per load), asks L2, runs the loader (returns a "
        "constant) and stores the value. Writers are flushed untimed after each run."
    )
    sec.notes.append(
        "With the breaker open, L2's get is refused at once (CircuitOpenError, no I/O) "
        "and the load's backfill to L2 is still queued, then dropped as circuit_open by "
        "the writer's worker."
    )
    opened = Chain(
        [
            MemoryLayer("L1", maxsize=1_000),
            LayerConfig(
                layer=MemcachedLayer("L2", ctx.address),
                breaker=BreakerConfig(reset_timeout=3_600.0),
            ),
        ]
    )
    alone = Chain([MemoryLayer("L1", maxsize=1_000)])
    up = Chain([MemoryLayer("L1", maxsize=1_000), MemcachedLayer("L2", ctx.address)])
    try:
        breaker = opened.breakers["L2"]
        quiet = logging.getLogger("cachechain")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the CLOSED -> OPEN warning is expected here
        try:
            for _ in range(BreakerConfig().max_failures):
                breaker.on_failure(breaker.acquire())
        finally:
            quiet.setLevel(level)
        sec.check("L2's breaker is OPEN", breaker.state.name == "OPEN")

        def loader() -> Any:
            return VALUE

        def contender(key: str, label: str, chain: Chain) -> Contender:
            state: dict[str, Any] = {"round": 0, "keys": []}

            def before() -> None:
                state["round"] += 1
                state["keys"] = [f"absent:{key}:{state['round']}:{i}" for i in range(n)]

            def run(n: int) -> None:
                load, f = chain.get_or_load, loader
                for k in state["keys"]:
                    load(k, f)

            def after() -> None:
                chain.flush(10.0)

            return Contender(key, label, run, before=before, after=after)

        contenders = [
            contender("no_l2", "get_or_load, chain without L2 (L1 only)", alone),
            contender("open", "get_or_load, L2 breaker OPEN", opened),
            contender("up", "get_or_load, L2 up: a real L2 miss (reference)", up),
        ]
        run_section(sec, contenders, n, ctx.remote_rounds)
        stats = breaker.stats()
        dropped = opened.writers["L2"].stats().dropped_by_reason.get("circuit_open", 0)
        sec.check(
            "L2's breaker stayed OPEN and refused the reads",
            stats.state.name == "OPEN" and stats.rejected >= n * ctx.remote_rounds,
            f"rejected={stats.rejected}, backfills dropped as circuit_open={dropped}",
        )
        sec.goals += [
            Goal("open breaker vs no L2 at all (~1x expected)", "open", "no_l2", "info"),
            Goal("open breaker vs a real L2 miss", "open", "up", "info"),
        ]
    finally:
        opened.close()
        alone.close()
        up.close()
    return sec


SECTIONS: dict[str, Callable[[Ctx], Section]] = {
    "l1_hit": bench_l1_hit,
    "l2_hit": bench_l2_hit,
    "l2_hit_pinned": bench_l2_hit_pinned,
    "get_many": bench_get_many,
    "breaker": bench_breaker,
    "writer": bench_writer,
    "metrics": bench_metrics,
    "open_breaker": bench_open_breaker,
}


def _sections_of_their_own() -> dict[str, Callable[[Ctx], Section]]:
    """The sections kept in modules next to this script (``coherence.py``: issue 10;
    ``loads.py``: issue 12; ``threads.py`` and ``frameworks.py``: issue 14), given this
    module as their harness."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import coherence
    import frameworks
    import loads
    import threads

    harness = sys.modules[__name__]
    return {
        **coherence.sections(harness),
        **loads.sections(harness),
        **threads.sections(harness),
        **frameworks.sections(harness),
    }


SECTIONS.update(_sections_of_their_own())


# ------------------------------------------------------------------------ output


def _ns(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(sec: Section) -> str:
    width = 62
    lines = [""]
    head = sec.title
    if sec.rounds:
        head += f"   [{sec.rounds} rounds x {sec.n:,} calls]"
    lines.append(head)
    if sec.error:
        lines.append(f"  SECTION FAILED: {sec.error}")
    base = sec.row(sec.base) if sec.base else None
    base_median = base.median if base is not None else None
    if sec.rows:
        median, best = f"median {sec.unit}", f"best {sec.unit}"
        lines.append(f"  {'contender':<{width}} {median:>10} {best:>10} {'x base':>7}")
        for row in sorted(sec.rows, key=lambda r: not r.samples):  # skipped rows last
            if not row.samples:
                lines.append(f"  {row.label:<{width}} {'skipped':>10}   {row.note}")
                continue
            assert row.median is not None
            rel = row.median / base_median if base_median else None
            mark = "  (base)" if row is base else ""
            lines.append(
                f"  {row.label:<{width}} {_ns(row.median):>10} {_ns(row.best):>10} "
                f"{_x(rel):>7}{mark}"
            )
    if sec.goals:
        lines.append(
            f"  {'goal (ratio = median/median)':<{width}} {'ratio':>10} {'paired':>10} "
            f"{'best':>7}   {'target':<9} verdict"
        )
        for goal in sec.goals:
            lines.append(
                f"  {goal.text:<{width}} {_x(goal.ratio):>10} {_x(goal.paired):>10} "
                f"{_x(goal.best):>7}   {goal.target:<9} {goal.verdict}"
            )
    for check in sec.checks:
        state = "ok" if check.ok else "FAILED"
        detail = f" ({check.detail})" if check.detail else ""
        lines.append(f"  check: {check.text}: {state}{detail}")
    lines.extend(f"  note: {note}" for note in sec.notes)
    return "\n".join(lines)


def summary(sections: Sequence[Section]) -> str:
    goals = [(s, g) for s in sections for g in s.goals if g.op != "info"]
    met = sum(1 for _, g in goals if g.ok and not g.unstable)
    missed = [(s, g) for s, g in goals if g.ok is False and not g.unstable]
    skipped = [(s, g) for s, g in goals if g.ratio is None]
    failed_checks = [(s, c) for s in sections for c in s.checks if not c.ok]
    broken = [s for s in sections if s.error]
    lines = ["", "Summary"]
    unstable = [(s, g) for s, g in goals if g.unstable]
    lines.append(
        f"  goals: {met} met, {len(missed)} missed, {len(skipped)} skipped, "
        f"{len(unstable)} unstable (of {len(goals)})"
    )
    for s, g in unstable:
        lines.append(
            f"  UNSTABLE [{s.sid}] {g.text}: ratio {_x(g.ratio)}, paired {_x(g.paired)}, "
            f"best {_x(g.best)} (target {g.target}): the estimates disagree, run again"
        )
    for s, g in missed:
        lines.append(f"  MISSED [{s.sid}] {g.text}: {_x(g.ratio)} (target {g.target})")
    for s, g in skipped:
        lines.append(f"  skipped [{s.sid}] {g.text}: {g.note}")
    checks = sum(len(s.checks) for s in sections)
    lines.append(f"  honesty checks: {checks - len(failed_checks)} of {checks} ok")
    for s, c in failed_checks:
        lines.append(f"  CHECK FAILED [{s.sid}] {c.text} {c.detail}")
    for s in broken:
        lines.append(f"  SECTION FAILED [{s.sid}] {s.error}")
    return "\n".join(lines)


def to_json(meta: dict[str, Any], sections: Sequence[Section]) -> dict[str, Any]:
    return {
        "meta": meta,
        "sections": [
            {
                "id": s.sid,
                "title": s.title,
                "calls_per_round": s.n,
                "rounds": s.rounds,
                "base": s.base,
                "error": s.error,
                "rows": [
                    {
                        "key": r.key,
                        "label": r.label,
                        "median_ns": r.median,
                        "best_ns": r.best,
                        "per_round_ns": r.samples,
                        "skipped": not r.samples,
                        "note": r.note,
                    }
                    for r in s.rows
                ],
                "goals": [
                    {
                        "text": g.text,
                        "numerator": g.num,
                        "denominator": g.den,
                        "op": g.op,
                        "limit": g.limit,
                        "ratio": g.ratio,
                        "paired_ratio": g.paired,
                        "best_ratio": g.best,
                        "unstable": g.unstable,
                        "ok": g.ok,
                        "verdict": g.verdict,
                    }
                    for g in s.goals
                ],
                "checks": [{"text": c.text, "ok": c.ok, "detail": c.detail} for c in s.checks],
                "notes": s.notes,
            }
            for s in sections
        ],
    }


# ------------------------------------------------------------------------ main


def _versions() -> dict[str, str]:
    out = {}
    for dist in (
        "cachetools",
        "pymemcache",
        "dogpile.cache",
        "Flask-Caching",
        "prometheus-client",
        "pybreaker",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _loop_overhead(n: int) -> float:
    """ns per iteration of an empty ``for _ in repeat(None, n)`` loop (median of 5)."""
    times = []
    for _ in range(5):
        t0 = _perf_ns()
        for _ in repeat(None, n):
            pass
        times.append((_perf_ns() - t0) / n)
    return statistics.median(times)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="cachechain benchmarks: contenders timed side by side in one process.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run (3 rounds, few calls)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per section (default 15, quick 3)"
    )
    parser.add_argument(
        "--only",
        metavar="SECTION",
        action="append",
        choices=sorted(SECTIONS),
        help="run only this section (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(ROOT))  # measure this checkout, not an installed copy
    # The suite reuses the tests' memcached launcher: see README.md for why.
    from tests.support.servers import MemcachedProcess

    # Show cachechain's warnings (an unexpected layer failure) in line with the table.
    logging.basicConfig(
        stream=sys.stdout, level=logging.WARNING, format="  log: %(name)s: %(message)s"
    )
    rounds = args.rounds or (3 if args.quick else 15)
    scale = 0.05 if args.quick else 1.0
    try:
        # One worker thread: memcached pins each connection to one of its threads, and
        # on a 2-CPU machine which thread a contender's connection lands on changes its
        # latency more than anything measured here. With one, every contender is equal.
        server = MemcachedProcess(threads=1).start()
    except (OSError, RuntimeError) as exc:
        print(f"cannot start memcached: {exc}", file=sys.stderr)
        return 2
    sections: list[Section] = []
    try:
        pid = server.proc.pid if server.proc is not None else None
        ctx = Ctx("127.0.0.1", server.port, rounds, scale, args.quick, pid)
        meta = {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "cpus": _cpu_count(),
            "memcached": mc_version(ctx),
            "memcached_address": ctx.address,
            "packages": _versions(),
            "cachechain_commit": _git_commit(),
            "quick": args.quick,
            "rounds": rounds,
            "loop_overhead_ns": _loop_overhead(200_000 if not args.quick else 20_000),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        print(
            f"cachechain benchmarks: Python {meta['python']}, memcached {meta['memcached']} "
            f"on {ctx.address}, {meta['cpus']} CPUs, commit {meta['cachechain_commit']}"
        )
        print(
            f"ns per call: median (and best) of {rounds} per-round means; contenders of a "
            "section are interleaved in every round; gc off while timing."
        )
        print(
            f"Every row includes the loop's own cost (~{meta['loop_overhead_ns']:.0f} ns per "
            "iteration). Compare within this run only; prefer the ratios."
        )
        if args.quick:
            print("QUICK RUN: a smoke test, the numbers are not meaningful.")
        for sid, bench in SECTIONS.items():
            if args.only and sid not in args.only:
                continue
            try:
                sec = bench(ctx)
            except Exception as exc:
                sec = Section(sid, f"{sid}: failed")
                sec.error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            evaluate(sec)
            sections.append(sec)
            print(render(sec), flush=True)
        meta["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    finally:
        server.stop()
    print(summary(sections))
    if args.json:
        path = Path(args.json)
        path.write_text(json.dumps(to_json(meta, sections), indent=2) + "\n")
        print(f"\nresults written to {path}")
    if any(s.error for s in sections):
        return 2
    if any(not c.ok for s in sections for c in s.checks):
        return 3
    return 0


def _cpu_count() -> int:
    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
