"""Issue 11, item 1 and "Done when": no read returns a value older than an acknowledged
mutation, while memcached pauses, dies, restarts, and writes are held back in the
network past their timeout; checked at every read, not only after ``flush()``.

The model and its checker are in :mod:`tests.support.stalemodel`: every value says
which mutation attempt wrote it, every acknowledged mutation (a ``set``/``delete``/``add``
that returned True, an ``incr`` that returned a count) raises the key's floor, and a
read may return a miss or a value at least as new as its floor, never an older one. A
mutation that failed is unknown until a later acknowledged one. Each key's mutations
are serialised by the test (one owner thread, or the key's lock for the 8 shared keys),
so the acknowledged order is known.

"Processes" are chains in this process, each with its own pool and coherence on: ``A``
(an L1 over memcached, through a :class:`FaultProxy`), ``B`` (an L1 over memcached),
``C`` (memcached only), plus ``raw``, a bare :class:`MemcachedLayer` reading the
namespaced key as C's namespace names it (memcached itself). Which acknowledged
mutations a read must see:

- through the chain that made it: at once;
- through ``C`` or ``raw``: at once once it *landed* (synchronous, or, for a write the
  chain queued behind an older write of the key and still acknowledged, once its
  writer let go of the key);
- through another chain's L1: once it landed :data:`LAG` seconds ago (the coherence
  bound, plus slack); how late those L1s were told is reported as a figure.

An odd read is reported with its likely cause (:func:`_cause`): a *ghost* (a write
that returned False landed after a later acknowledged mutation: item 1), a *late
queued write* (a write acknowledged while queued landed after a later acknowledged
one), or *not told* (a mutation through C, which has no L1, never reached the other
chains' L1s).

Randomness is seeded (``CACHECHAIN_MODEL_SEED`` replays the operations; the seed is in
every failure message); faults are injected by the test and waited for on counts or
events, never on sleeps: a fault lasts until enough mutations failed in it.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from cachechain import (
    MISSING,
    BreakerConfig,
    Chain,
    CircuitBreaker,
    CircuitState,
    CoherenceConfig,
    LayerConfig,
    MemcachedLayer,
    MemoryLayer,
    WriterConfig,
)
from cachechain._resilience import unwrapped
from tests.support.faultproxy import FaultProxy
from tests.support.servers import MemcachedProcess
from tests.support.stalemodel import Ack, Checker, KeyModel, Odd, decode, encode

pytestmark = pytest.mark.memcached

#: The coherence bound of every chain here (CoherenceConfig's default), seconds.
BOUND = 0.1
#: How long another process's L1 may still serve a value an acknowledged mutation
#: replaced: the bound plus one poll interval and a socket timeout of slack for the
#: poller under 16 busy threads (seconds). Reads within it through another L1 are not
#: judged against that mutation; reads through the mutating chain, C and raw always are.
LAG = BOUND + 0.04 + 0.1 + 0.1
#: Socket timeout of the stress run's memcached layers (seconds).
TIMEOUT = 0.1
#: How long the fault proxy holds a write back (seconds): far past TIMEOUT.
HOLD = 0.6
WORKERS = 16
OWNED_PER_WORKER = 3
SHARED_KEYS = 8
#: Mutations that must fail inside a pause or an outage before it ends.
FAILED_IN_FAULT = 24
#: Acknowledged mutations that must follow each fault (recovery) before the next.
ACKED_AFTER_FAULT = 400
#: Writes the proxy holds back in the hold phase.
HELD_WRITES = 6
#: Bound on any wait for a count or a server (never reached when passing), seconds.
WAIT = 10.0


def _seed() -> int:
    fixed = os.environ.get("CACHECHAIN_MODEL_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(2**32)


def _pool(chain: Chain) -> Any:
    """The memcached pool of ``chain``'s shared layer (its writes in doubt: ``fates``)."""
    layer: Any = unwrapped(chain.layers[-1])
    return layer._pool


def _memcached_layer(address: str, timeout: float, name: str = "L2") -> MemcachedLayer:
    return MemcachedLayer(
        name,
        address,
        timeout=timeout,
        connect_timeout=timeout,
        pool_size=32,
        pool_timeout=0.5,
    )


def _chain(name: str, address: str, *, l1: bool, timeout: float) -> Chain:
    """One "process": an L1 (if ``l1``) over memcached at ``address``, coherence on,
    a breaker that lets a trial through every 0.1 s, repairs retried quickly."""
    l2 = LayerConfig(layer=_memcached_layer(address, timeout))
    layers: list[Any] = [MemoryLayer("L1", maxsize=10_000), l2] if l1 else [l2]
    return Chain(
        layers,
        name=name,
        breaker=BreakerConfig(max_failures=5, reset_timeout=0.1),
        writer=WriterConfig(retry_delay=0.02, max_retry_delay=0.2),
        coherence=CoherenceConfig(bound=BOUND),
    )


def _set_of(names: Sequence[str]) -> Callable[[bytes], bool]:
    """Match a client segment that is a ``set`` of one of ``names`` (namespaced:
    ``<generation>/<name>``), not of the journal's keys."""
    wanted = {name.encode() for name in names}

    def match(segment: bytes) -> bool:
        if not segment.startswith(b"set "):
            return False
        key = segment.split(b" ", 2)[1]
        return key.rsplit(b"/", 1)[-1] in wanted and not key.startswith(b"__cachechain__")

    return match


class RawReader:
    """Reads memcached itself, with no chain in between, under the namespace prefix
    that ``chain`` uses (a miss while that prefix is unknown)."""

    name = "raw"

    def __init__(self, address: str, chain: Chain) -> None:
        self.layer = _memcached_layer(address, TIMEOUT, "raw")
        assert chain.coherence is not None
        self.namespace = chain.coherence.namespace

    def get(self, key: str, default: Any = None) -> Any:
        prefix = self.namespace.prefix
        if prefix is None:
            return default
        try:
            found = self.layer.get(prefix + key)
        except Exception:  # an outage: a miss, as a chain would serve
            return default
        return default if found is MISSING else found

    def close(self) -> None:
        self.layer.close()


@dataclass(frozen=True)
class Reader:
    """A way to read: ``get(key)`` of ``process``; ``lag``: see :meth:`KeyModel.floor`."""

    process: str
    get: Callable[[str], Any]
    lag: float


# ------------------------------------------------------------------ the focused test


@pytest.fixture()
def held_set() -> Iterator[tuple[MemcachedProcess, FaultProxy]]:
    server = MemcachedProcess().start()
    proxy = FaultProxy(("127.0.0.1", server.port)).start()
    try:
        yield server, proxy
        assert proxy.errors == []
    finally:
        proxy.stop()
        server.stop()


def test_a_set_held_past_its_timeout_never_undoes_a_later_delete(
    held_set: tuple[MemcachedProcess, FaultProxy],
) -> None:
    """Item 1 as reported: the fault proxy holds one ``set`` 0.6 s while its timeout is
    0.25 s; ``set -> False``, then ``delete``. Once the delete landed no read, in this
    process (A) or another one (B, without the proxy; ``raw``: memcached itself), may
    return the held value or the one before it. (Before the fix the delete was sent at
    once and acknowledged, and the held set undid it 0.35 s later.)"""
    server, proxy = held_set
    timeout, key = 0.25, "ghost"
    a = _chain("A", proxy.address, l1=True, timeout=timeout)
    b = _chain("B", server.address, l1=True, timeout=timeout)
    raw = RawReader(server.address, b)
    try:
        assert a.set(key, "v0", 60) is True
        assert b.get("other") is None  # B knows the namespace (and has no copy of key)
        proxy.hold_requests(_set_of([key]), HOLD)
        started = time.monotonic()
        assert a.set(key, "v1", 60) is False, "the held set was acknowledged"
        assert time.monotonic() - started < HOLD, "the set waited for the held segment"
        assert proxy.stats().held == 1
        # The delete cannot be sent while the set is in doubt (memcached could run the
        # set after it): it is queued behind the set's repair and answers False until it
        # lands; flush() returns once it did, and the held set ran before it.
        deleted = a.delete(key)
        assert a.flush(5.0), "the delete never landed"
        assert proxy.stats().held_replies == 1, "the delete landed before the held set"
        assert deleted is False  # it could not be made at once: not acknowledged
        wrong: list[tuple[str, str, Any]] = []

        def read_all(when: str) -> None:
            for name, reader in (("A", a.get), ("B", b.get), ("raw", raw.get)):
                value = reader(key)
                if value is not None:
                    wrong.append((when, name, value))

        read_all("right after the delete landed")
        assert b.flush(5.0)
        read_all("after flush()")
        assert wrong == [], f"the deleted key came back: {wrong}"
    finally:
        for chain in (a, b):
            chain.close(2.0)
        raw.close()


# ------------------------------------------------------------------- the stress model


class Run:
    """The stress run: memcached, the proxy, the chains, the keys and the checker."""

    def __init__(self, server: MemcachedProcess, proxy: FaultProxy, seed: int) -> None:
        self.server = server
        self.proxy = proxy
        self.seed = seed
        self.checker = Checker()
        self.stop = threading.Event()
        self.errors: list[str] = []
        #: Ages (s) of the acknowledged mutations that reads through another chain's L1
        #: did not see yet, past BOUND (allowed up to LAG).
        self.past_bound: list[float] = []
        self.unflushed: list[str] = []
        #: When each (process, key) was last seen with a failed write that may still
        #: show (see :meth:`in_doubt`), monotonic seconds.
        self.doubt_seen: dict[tuple[str, str], float] = {}
        self.a = _chain("A", proxy.address, l1=True, timeout=TIMEOUT)
        self.b = _chain("B", server.address, l1=True, timeout=TIMEOUT)
        self.c = _chain("C", server.address, l1=False, timeout=TIMEOUT)
        self.chains = (self.a, self.b, self.c)
        self.by_name = {chain.name: chain for chain in self.chains}
        self.raw = RawReader(server.address, self.c)
        self.readers = (
            Reader("A", self.a.get, LAG),
            Reader("B", self.b.get, LAG),
            Reader("C", self.c.get, 0.0),
            Reader("raw", self.raw.get, 0.0),
        )
        names = [f"s{i}" for i in range(SHARED_KEYS)]
        names += [f"o{w}.{i}" for w in range(WORKERS) for i in range(OWNED_PER_WORKER)]
        self.keys = {name: KeyModel(i + 1, name) for i, name in enumerate(names)}
        self.shared = [self.keys[f"s{i}"] for i in range(SHARED_KEYS)]

    def close(self) -> None:
        for chain in self.chains:
            chain.close(2.0)
        self.raw.close()

    # -- one worker ---------------------------------------------------------------

    def worker(self, w: int) -> None:
        rnd = random.Random(self.seed * 1000 + w)
        home = self.chains[w % len(self.chains)]
        owned = [self.keys[f"o{w}.{i}"] for i in range(OWNED_PER_WORKER)]
        try:
            while not self.stop.is_set():
                model = rnd.choice(owned) if rnd.random() < 0.5 else rnd.choice(self.shared)
                op = rnd.random()
                if op < 0.45:
                    self.read(rnd.choice(self.readers), model)
                elif op < 0.5:
                    self.read_many(rnd.choice(self.readers[:3]), rnd.sample(self.shared, 3))
                else:
                    self.mutate(home, model, rnd.random())
        except BaseException as exc:
            self.errors.append(f"worker {w}: {exc!r}")
            self.stop.set()

    def held(self, process: str, key: str) -> bool:
        """Whether ``process``'s writer still holds a write of ``key`` (it has not
        reached memcached yet). C has no writer: its only layer is written in line."""
        writer = self.by_name[process].writers.get("L2")
        return writer is not None and writer.holds(key)

    def in_doubt(self, name: str) -> list[str]:
        """The processes whose failed write of key ``name`` may still show, by
        docs/design.md ("Writes in doubt"): their memcached pool holds a write of it in
        doubt (it timed out after it was sent, and the reaper has not had the answer to
        its retraction, the ``delete`` sent behind it; see ``layers/_fates.py``), or
        their writer still holds the key (the repair queued when the write failed has
        not landed, so the key is not published yet, and another process's L1 keeps a
        copy of the late value it read meanwhile), or either was so less than LAG ago
        (that copy is dropped within the bound of the publication)."""
        suffix = b"/" + name.encode()  # the key as memcached holds it: <generation>/name
        now = time.monotonic()
        seen = self.doubt_seen
        out = []
        for chain in self.chains:
            if self.held(chain.name, name) or any(
                k.endswith(suffix) for k in list(_pool(chain).fates.held)
            ):
                seen[(chain.name, name)] = now
            if now - seen.get((chain.name, name), -math.inf) < LAG:
                out.append(chain.name)
        return out

    def read(self, reader: Reader, model: KeyModel) -> None:
        floor = model.floor(reader.process, reader.lag, self.held)
        bound = model.floor(reader.process, BOUND, self.held) if reader.lag > BOUND else None
        doubt = self.in_doubt(model.name)
        started = time.monotonic()
        value = reader.get(model.name)
        self.checker.judge(reader.process, model, floor, started, value, doubt)
        self.note_lag(floor, bound, started, value)

    def note_lag(self, floor: Ack | None, bound: Ack | None, started: float, value: Any) -> None:
        """Note a value older than what landed BOUND seconds before the read, yet not
        older than its ``floor`` (within LAG): how late this chain's L1 was told."""
        decoded = decode(value)
        if bound is None or decoded is None or bound.landed_at is None:
            return
        if decoded[1] < bound.version and (floor is None or decoded[1] >= floor.version):
            self.past_bound.append(started - bound.landed_at)

    def read_many(self, reader: Reader, models: list[KeyModel]) -> None:
        chain = self.by_name[reader.process]
        floors = [m.floor(reader.process, reader.lag, self.held) for m in models]
        bounds = [m.floor(reader.process, BOUND, self.held) for m in models]
        doubts = [self.in_doubt(m.name) for m in models]
        started = time.monotonic()
        found = chain.get_many([m.name for m in models])
        for model, floor, bound, doubt in zip(models, floors, bounds, doubts, strict=True):
            value = found.get(model.name)
            self.checker.judge(reader.process, model, floor, started, value, doubt)
            if reader.lag > BOUND:
                self.note_lag(floor, bound, started, value)

    def mutate(self, chain: Chain, model: KeyModel, pick: float) -> None:
        op = "set" if pick < 0.45 else "delete" if pick < 0.65 else "add" if pick < 0.75 else "incr"
        with model.lock:  # the owner's keys are never contended; shared ones are
            floor = model.floor(chain.name, 0.0, self.held)
            seq = model.begin(op, chain.name)
            if op == "incr":
                count = chain.incr(model.name, 1)
                ack = None if count is None else decode(count)
                if count is not None:
                    self.checker.judge_count(chain.name, model, floor, count)
                version = None if ack is None else ack[1]
                outcome = repr(count)
            else:
                if op == "set":
                    done = chain.set(model.name, encode(model.key_id, seq), 60)
                elif op == "add":
                    done = chain.add(model.name, encode(model.key_id, seq), 60)
                else:
                    done = chain.delete(model.name)
                version = (seq, 0) if done else None
                outcome = repr(done)
            model.end(seq, outcome, version, queued=self.held(chain.name, model.name))
        if version is None:
            self.checker.unknown()
        else:
            self.checker.acked()

    # -- the faults -------------------------------------------------------------

    def wait(self, what: str, predicate: Callable[[Checker], bool]) -> None:
        if not self.checker.wait_for(lambda c: predicate(c) or self.stop.is_set(), WAIT):
            raise AssertionError(f"seed {self.seed}: timed out waiting for {what}")
        if self.errors:
            raise AssertionError(f"seed {self.seed}: {self.errors}")

    def run_until_acked(self, phase: str) -> None:
        self.checker.phase = phase
        target = self.checker.acks + ACKED_AFTER_FAULT
        self.wait(
            f"{ACKED_AFTER_FAULT} acknowledged mutations ({phase})", lambda c: c.acks >= target
        )

    def until_failed(self, phase: str) -> None:
        self.checker.phase = phase
        target = self.checker.unknowns + FAILED_IN_FAULT
        self.wait(f"{FAILED_IN_FAULT} failed mutations ({phase})", lambda c: c.unknowns >= target)

    def pause(self, phase: str) -> None:
        proc = self.server.proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)
        try:
            self.until_failed(phase)
        finally:
            proc.send_signal(signal.SIGCONT)

    def kill_and_restart(self, phase: str) -> None:
        self.server.stop()
        try:
            self.until_failed(phase)
        finally:
            self.server.start()  # polls the new process until it answers (bounded)

    def hold_writes(self, phase: str) -> None:
        self.checker.phase = phase
        self.proxy.hold_requests(_set_of(list(self.keys)), HOLD, HELD_WRITES)
        if not self.proxy.wait_until(lambda s: s.held_replies >= HELD_WRITES, WAIT):
            raise AssertionError(f"seed {self.seed}: the held writes never reached memcached")

    def script(self) -> None:
        self.run_until_acked("warm-up")
        self.pause("memcached paused")
        self.run_until_acked("after the pause")
        self.hold_writes("writes held by the proxy")
        self.run_until_acked("after the held writes")
        self.kill_and_restart("memcached killed")
        self.run_until_acked("after the restart")
        self.pause("memcached paused again")
        self.run_until_acked("after the second pause")

    def final_reads(self) -> None:
        """After the workers stopped and every chain flushed: each key through every
        reader (other L1s judged once the bound has passed, as during the run)."""
        self.checker.phase = "after flush()"
        for chain in self.chains:
            if not chain.flush(5.0):  # a breaker still open refuses it: wait for it once
                _closed(chain.breakers["L2"], WAIT)
                if not chain.flush(5.0):
                    writer, breaker = chain.writers["L2"], chain.breakers["L2"]
                    self.unflushed.append(f"{chain.name} ({writer.stats()}, {breaker.state!r})")
        for model in self.keys.values():
            for reader in self.readers:
                self.read(reader, model)


def _closed(breaker: CircuitBreaker, timeout: float) -> bool:
    """Wait (at most ``timeout`` s) until ``breaker`` is closed: the writer's repair
    rounds make its trial calls."""
    closed = threading.Event()

    def listener(name: str, old: CircuitState, new: CircuitState) -> None:
        if new is CircuitState.CLOSED:
            closed.set()

    breaker.add_listener(listener)
    return breaker.state is CircuitState.CLOSED or closed.wait(timeout)


def _cause(odd: Odd) -> str:
    """The likely cause of an odd read, from what the model knows of its mutations."""
    made, floor = odd.got_attempt, odd.floor
    if made is None or floor is None:
        return "unexplained value"
    if not made.acked:
        return "ghost: a write that returned False landed after a later acknowledged mutation"
    if made.queued:
        chain = "its own chain's" if made.process == floor.process else "another chain's"
        return (
            "late queued write: a write acknowledged while its chain's writer held the key "
            f"landed after {chain} later acknowledged mutation"
        )
    if odd.reader in ("A", "B") and floor.process == "C" and odd.reader != floor.process:
        return "not told: C (no L1) changed the key, the reader's L1 kept the old value"
    return "other"


def _report(run: Run, elapsed: float) -> str:
    """The run's figures, and each odd read grouped by cause and phase, with examples."""
    c, odd = run.checker, run.checker.odd
    lag = max(run.past_bound, default=0.0)
    lines = [
        f"seed {run.seed} (replay: CACHECHAIN_MODEL_SEED={run.seed}); {elapsed:.1f}s; "
        f"{c.reads} reads ({c.hits} hits), {c.acks} acknowledged and {c.unknowns} failed "
        f"mutations; {len(run.past_bound)} reads through another chain's L1 past the "
        f"{BOUND}s bound (latest {lag:.3f}s, allowed up to {LAG:.2f}s); chains that did "
        f"not flush: {run.unflushed or 'none'}; {c.in_doubt_reads} reads of a failed "
        f"write while it could still show; {len(odd)} reads broke the model"
    ]
    groups: dict[str, list[Odd]] = {}
    for o in odd:
        groups.setdefault(_cause(o), []).append(o)
    for cause, members in sorted(groups.items(), key=lambda g: -len(g[1])):
        phases: dict[str, int] = {}
        for o in members:
            where = f"{o.kind} via {o.reader} in {o.phase!r}"
            phases[where] = phases.get(where, 0) + 1
        behind = [o.floor.version[0] - o.got[0] for o in members if o.floor and o.got]
        lines.append(f"{len(members)} x {cause} (up to {max(behind, default=0)} attempts behind)")
        lines += [f"    {n} x {where}" for where, n in sorted(phases.items())]
        lines += [f"    e.g. {o.describe(c.t0)}" for o in members[:3]]
    return "\n".join(lines)


def test_16_threads_through_pauses_kills_and_held_writes_never_read_a_stale_value() -> None:
    """The threaded model of "Done when": 16 threads on 3 chains over one memcached
    (A through the fault proxy) set, delete, add, incr and read their own keys and 8
    shared ones while memcached is paused (SIGSTOP), the proxy holds writes past their
    timeout, memcached is killed and restarted, and paused again. Every read, at
    every moment, returns a miss or a value at least as new as what was acknowledged
    before it began; not only after ``flush()``."""
    seed = _seed()
    server = MemcachedProcess().start()
    proxy = FaultProxy(("127.0.0.1", server.port)).start()
    run = Run(server, proxy, seed)
    threads = [
        threading.Thread(target=run.worker, args=(w,), name=f"model-{w}", daemon=True)
        for w in range(WORKERS)
    ]
    started = time.monotonic()
    try:
        for t in threads:
            t.start()
        run.script()
    finally:
        run.stop.set()
        for t in threads:
            t.join(WAIT)
        proc = server.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a failed pause must not outlive the test
    try:
        assert not [t.name for t in threads if t.is_alive()], f"seed {seed}: workers hung"
        assert run.errors == [], f"seed {seed}: {run.errors}"
        run.final_reads()
        assert proxy.errors == []
    finally:
        run.close()
        proxy.stop()
        server.stop()
    report = _report(run, time.monotonic() - started)
    print(report)
    assert run.checker.odd == [] and run.unflushed == [], report
