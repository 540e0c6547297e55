"""Coherence across real processes (issue 10, points 2-3) over one real memcached.

Four worker processes (``multiprocessing``'s spawn context: fresh interpreters, as
gunicorn's workers are once forked) each hold a default chain, an in-process L1 over
memcached with coherence on, and obey commands sent through a pipe. A mutation made
in one of them must leave the other processes' L1 within the coherence bound (0.1 s);
the tests measure how long it took (from the mutation's return in the writer to the
key's absence from the reader's L1, by the machine's one wall clock) and assert it
against the bound plus :data:`SLACK` for a loaded 2-core CI. The figures are printed
(``pytest -s``) and kept in :data:`FIGURES`.

Waiting for another process is a bounded polling loop with a deadline (there is no
event to wait on across processes), never a bare sleep.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
from pymemcache.client.base import Client

from tests.support.faultproxy import FaultProxy
from tests.support.servers import MemcachedProcess
from tests.test_lease import settled

pytestmark = [
    pytest.mark.memcached,
    pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX only"),
]

_CTX = multiprocessing.get_context("spawn")

BOUND = 0.1  # the default coherence bound, seconds
#: What a loaded 2-core CI may add to the bound before a test fails (seconds).
SLACK = 1.0
#: Seconds a command to a worker may take before the test fails.
REPLY = 20.0
#: Measured figures (seconds), by regime, for the report.
FIGURES: dict[str, list[float]] = {}


# ------------------------------------------------------------------------ the worker


def _serve(conn: Connection, address: str, name: str) -> None:
    """A worker process: one default chain on ``address``; answer commands until
    ``stop``. Each reply is ``("ok", result)`` or ``("error", repr)``."""
    from cachechain import MISSING, Chain, MemcachedLayer, MemoryCollector, MemoryLayer

    collector = MemoryCollector()
    chain = Chain([MemoryLayer("L1"), MemcachedLayer("L2", address)], name=name, metrics=collector)
    l1, l2 = chain.layers[0], chain.layers[1]  # l2: namespaced, as the chain sends keys

    def in_l1(key: str) -> bool:
        return l1.get(key) is not MISSING

    def prime(key: str) -> tuple[Any, bool]:
        """Read ``key`` through the chain until its value is in L1 (within 5 s). One
        read is not always enough on a loaded machine: the journal's drop of every
        entry after a flush it has just seen, or a late poll's set-aside, may come
        between the read and its backfill (failed on 3.10 under a loaded matrix)."""
        deadline = time.monotonic() + 5.0
        while True:
            value = chain.get(key)
            if in_l1(key) or time.monotonic() > deadline:
                return value, in_l1(key)
            time.sleep(0.005)  # the journal's next poll, another thread's doing

    def watch(keys: list[str], timeout: float) -> float | None:
        """The wall-clock time at which none of ``keys`` was left in L1, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(in_l1(k) for k in keys):
                return time.time()
            time.sleep(0.0005)  # polling for another process's doing
        return None

    def op(name: str, *args: Any, **kwargs: Any) -> tuple[Any, float]:
        result = getattr(chain, name)(*args, **kwargs)
        return result, time.time()

    def figures() -> dict[str, Any]:
        m = collector.snapshot().chain_metrics
        return {
            "published": m.invalidations_published,
            "applied": m.invalidations_applied,
            "lag_max": m.invalidation_lag.max,
            "lost": dict(m.coherence_lost_by_reason),
        }

    commands: dict[str, Callable[..., Any]] = {
        "pid": os.getpid,
        "seed": lambda k, v: l2.set(k, v, 60),  # into memcached, nothing published
        "unseed": lambda k: l2.delete(k),
        "prime": prime,
        "l1_set": lambda k, v: l1.set(k, v, 600),
        "settle": lambda: settled(chain) is chain,
        "in_l1": in_l1,
        "get": lambda k: chain.get(k),
        "watch": watch,
        "op": op,
        "figures": figures,
    }
    while True:
        command, args = conn.recv()
        if command == "stop":
            chain.close()
            conn.send(("ok", None))
            return
        args, kwargs = args if command == "op" else (args, {})
        try:
            conn.send(("ok", commands[command](*args, **kwargs)))
        except BaseException as exc:  # reported to the test
            conn.send(("error", repr(exc)))


class Worker:
    """The test's handle on one worker process."""

    def __init__(self, address: str, name: str) -> None:
        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=_serve, args=(child, address, name), daemon=True)
        self.proc.start()
        self.name = name
        self.pid: int = self.call("pid")

    def send(self, command: str, *args: Any, **kwargs: Any) -> None:
        self.conn.send((command, (args, kwargs) if command == "op" else args))

    def reply(self, timeout: float = REPLY) -> Any:
        assert self.conn.poll(timeout), f"{self.name} did not answer in {timeout} s"
        status, result = self.conn.recv()
        assert status == "ok", f"{self.name}: {result}"
        return result

    def call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        self.send(command, *args, **kwargs)
        return self.reply()

    def stop(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it paused
            with contextlib.suppress(AssertionError, OSError):
                self.call("stop")
        self.proc.join(REPLY)
        if self.proc.is_alive():  # pragma: no cover - only on a hang
            self.proc.kill()
            self.proc.join(REPLY)


@pytest.fixture(scope="module")
def server() -> Iterator[MemcachedProcess]:
    """A memcached of this module's own: no other test flushes it under the workers."""
    mc = MemcachedProcess().start()
    yield mc
    mc.stop()


@pytest.fixture(scope="module")
def workers(server: MemcachedProcess) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for i in range(4):
            started.append(Worker(server.address, f"w{i}"))
        yield started
    finally:
        for w in started:
            w.stop()


def raw_client(server: MemcachedProcess) -> Client:
    """Another application's client. It waits for each reply (pymemcache's default
    ``noreply`` returns at once: memcached, with a worker thread per connection, could
    then run the set after a flush sent later on another connection; seen under load)."""
    return Client(("127.0.0.1", server.port), connect_timeout=2, timeout=2, default_noreply=False)


def prime(readers: list[Worker], key: str, expected: Any) -> None:
    for r in readers:
        value, cached = r.call("prime", key)
        assert (value, cached) == (expected, True), (r.name, value, cached)


def lags(
    writer: Worker,
    readers: list[Worker],
    keys: list[str],
    mutate: tuple[Any, ...],
    **kwargs: Any,
) -> Any:
    """Have ``readers`` watch ``keys`` leave their L1, make ``mutate`` (the chain
    method's name and arguments; ``kwargs`` its keyword arguments) in ``writer``;
    return its result and each reader's lag (seconds from the call's return to the
    keys' absence)."""
    for r in readers:
        r.send("watch", keys, BOUND + SLACK + 5.0)
    try:
        result, done = writer.call("op", *mutate, **kwargs)
    finally:
        gones = [r.reply() for r in readers]  # keep every pipe in step
    out = []
    for r, gone in zip(readers, gones, strict=True):
        assert gone is not None, f"{r.name} still serves {keys} from L1 after {BOUND + SLACK} s"
        out.append(max(0.0, gone - done))
    return result, out


def record(regime: str, values: list[float]) -> None:
    FIGURES.setdefault(regime, []).extend(values)


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (
        f"n={len(ordered)} p50={statistics.median(ordered) * 1000:.1f} ms "
        f"p99={p99 * 1000:.1f} ms max={ordered[-1] * 1000:.1f} ms"
    )


# ------------------------------------------------------------------------ the tests


OPERATIONS: list[tuple[str, Any, tuple[Any, ...], Any, Any]] = [
    # (name, seeded value, op arguments after the key, op result, value read after)
    ("set", "v1", ("v2", 60), True, "v2"),
    ("delete", "v1", (), True, None),
    ("incr", 5, (3,), 8, 8),
    ("touch", "v1", (120,), True, "v1"),
]


@pytest.mark.parametrize(("name", "seeded", "args", "result", "after"), OPERATIONS)
def test_a_mutation_in_one_process_leaves_every_other_l1_within_the_bound(
    workers: list[Worker], name: str, seeded: Any, args: tuple[Any, ...], result: Any, after: Any
) -> None:
    values: list[float] = []
    for round_ in range(4):  # each process writes once
        writer, readers = workers[round_], workers[:round_] + workers[round_ + 1 :]
        key = f"{name}:{round_}"
        writer.call("seed", key, seeded)
        prime(readers, key, seeded)
        got, measured = lags(writer, readers, [key], (name, key, *args))
        assert got == result
        values += measured
        for r in readers:
            assert r.call("get", key) == after
    record(name, values)
    print(f"\n{name}: invalidation lag {summary(values)}")
    assert max(values) <= BOUND + SLACK


def test_an_add_in_one_process_leaves_every_other_l1_within_the_bound(
    workers: list[Worker],
) -> None:
    """The others hold a copy that memcached no longer has (it expired there first):
    an ``add`` that wins the key must drop those copies."""
    writer, readers = workers[0], workers[1:]
    writer.call("seed", "lock", "old-owner")
    prime(readers, "lock", "old-owner")
    writer.call("unseed", "lock")  # gone from memcached, still in their L1s
    won, measured = lags(writer, readers, ["lock"], ("add", "lock", "new-owner", 60))
    assert won is True
    for r in readers:
        assert r.call("get", "lock") == "new-owner"
    record("add", measured)
    print(f"\nadd: invalidation lag {summary(measured)}")
    assert max(measured) <= BOUND + SLACK


def test_clear_in_one_process_empties_every_process_but_not_other_apps_keys(
    workers: list[Worker], server: MemcachedProcess
) -> None:
    raw = raw_client(server)
    try:
        assert raw.set(b"otherapp:key", b"theirs", expire=600)
        writer, readers = workers[1], [workers[0], *workers[2:]]
        keys = ["c:0", "c:1"]
        for key in keys:
            writer.call("seed", key, key)
            prime(readers, key, key)
        cleared, measured = lags(writer, readers, keys, ("clear",))
        assert cleared is True
        for r in workers:
            assert r.call("get", "c:0") is None  # nobody reads the old generation
        assert raw.get(b"otherapp:key") == b"theirs"
        record("clear", measured)
        print(f"\nclear: lag {summary(measured)}")
        assert max(measured) <= BOUND + SLACK
    finally:
        raw.close()


def test_clear_flush_empties_memcached_and_every_process(
    workers: list[Worker], server: MemcachedProcess
) -> None:
    raw = raw_client(server)
    try:
        assert raw.set(b"otherapp:key", b"theirs", expire=600)
        writer, readers = workers[2], [workers[0], workers[1], workers[3]]
        writer.call("seed", "f:0", "v")
        prime(readers, "f:0", "v")
        flushed, measured = lags(writer, readers, ["f:0"], ("clear",), flush=True)
        assert flushed is True
        assert raw.get(b"otherapp:key") is None  # flush_all: Django's behaviour
        for r in workers:
            assert r.call("get", "f:0") is None
        # Every process works again after the flush (a fresh generation and ring).
        writer.call("op", "set", "f:1", "after", 60)
        prime(readers, "f:1", "after")
        _, measured_after = lags(writer, readers, ["f:1"], ("delete", "f:1"))
        record("clear_flush", measured + measured_after)
        print(
            f"\nclear(flush=True): lag {summary(measured)}; then a delete {summary(measured_after)}"
        )
        assert max(measured + measured_after) <= BOUND + SLACK
    finally:
        raw.close()


def test_a_paused_process_catches_up_when_it_resumes(workers: list[Worker]) -> None:
    writer, paused = workers[3], workers[0]
    writer.call("seed", "p:0", "before")
    prime([paused], "p:0", "before")
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        writer.call("op", "set", "p:0", "after", 60)
        deadline = time.monotonic() + 3 * BOUND  # let the bound pass while it is stopped
        while time.monotonic() < deadline:
            time.sleep(0.01)
        paused.send("watch", ["p:0"], BOUND + SLACK + 5.0)  # read once it runs again
        resumed = time.time()
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    gone = paused.reply()
    assert gone is not None, "the resumed process kept serving the old value"
    catch_up = max(0.0, gone - resumed)
    record("paused", [catch_up])
    print(f"\npaused 0.3 s: L1 entry dropped {catch_up * 1000:.1f} ms after SIGCONT")
    assert paused.call("get", "p:0") == "after"
    assert catch_up <= BOUND + SLACK


@pytest.fixture()
def own_server() -> Iterator[MemcachedProcess]:
    """A memcached for one test: a process cut off mid-publication leaves a slot
    reserved and never written, a gap every other process on that ring would see."""
    mc = MemcachedProcess().start()
    yield mc
    mc.stop()


@pytest.mark.parametrize("cut", ["reset", "black_hole"])
def test_a_process_cut_off_from_memcached_drops_its_l1_within_the_bound(
    own_server: MemcachedProcess, cut: str
) -> None:
    """``reset``: memcached refuses at once (connection reset); ``black_hole``: it stops
    answering (a partition: every read waits for its 0.25 s socket timeout)."""
    with FaultProxy(("127.0.0.1", own_server.port)) as proxy:
        worker = Worker(proxy.address, f"cut-{cut}")
        try:
            worker.call("op", "set", "u:0", "v", 60)  # it reaches memcached: polls run
            # past the journal's first read, which drops every L1 entry (it could come
            # between the two calls below, or end the watch before the cut)
            assert worker.call("settle")
            worker.call("l1_set", "u:0", "v")
            assert worker.call("in_l1", "u:0")
            worker.send("watch", ["u:0"], BOUND + SLACK + 5.0)
            getattr(proxy, cut)()
            cut_at = time.time()
            gone = worker.reply()
            proxy.pass_through()
            assert gone is not None, f"L1 still served after the cut ({cut})"
            dropped = max(0.0, gone - cut_at)
            record(f"unreachable_{cut}", [dropped])
            print(f"\nmemcached cut ({cut}): L1 dropped {dropped * 1000:.1f} ms after the cut")
            lost = worker.call("figures")["lost"]
            assert lost.get("unreachable", 0) >= 1, lost
            assert dropped <= BOUND + SLACK
        finally:
            proxy.pass_through()
            worker.stop()


def test_the_receivers_counted_what_they_applied(workers: list[Worker]) -> None:
    """Runs after the others (file order): every process published and applied
    invalidations, with lags near the bound, and never lost track but for a late poll
    (the journal was never overrun)."""
    for w in workers:
        figures = w.call("figures")
        assert figures["published"] > 0, figures
        assert figures["applied"] > 0, figures
        assert figures["lag_max"] <= BOUND + SLACK, figures
        # w0 was paused (SIGSTOP) for 0.3 s: when a poll was in flight at that moment,
        # the watchdog rightly reports lost track as it resumes. Any worker's poll can
        # be late on a loaded machine (its poller waits for the CPU): "unreachable" too.
        allowed = ("reset", "unreachable")
        unexpected = {k: v for k, v in figures["lost"].items() if k not in allowed}
        assert not unexpected, (w.name, figures["lost"])
