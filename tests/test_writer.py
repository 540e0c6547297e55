"""AsyncWriter: bounded write-behind with coalescing, per-key order, close and exit drains.

Fault-matrix rows 17-22 and 29 of ``reliability.md``. Fake layers block on Events; the
tests wait on Events, queues and futures with bounds, never on sleeps.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import math
import os
import queue
import random
import select
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cachechain import _fork as fork_module
from cachechain import _writer as writer_module
from cachechain._config import WriterConfig
from cachechain._errors import ChainClosedError, CircuitOpenError, ConfigError
from cachechain._writer import DROP_REASONS, AsyncWriter, WriterStats
from cachechain.layers._base import MISSING, BaseLayer
from tests.support.fakes import FakeClock

ROOT = Path(__file__).resolve().parents[1]
#: Upper bound (seconds) for any wait in these tests; only reached when a test fails.
SAFETY = 10.0
_NEVER = threading.Event()


class FakeLayer(BaseLayer):
    """A dict-backed layer that records writes and can block, fail or jitter on demand.

    ``gates[key]`` (or ``gate_all``) makes a write of that key wait until the Event is
    set; ``fail[key]`` is raised by a write of that key; ``entered`` and ``done`` receive
    ``(kind, key)`` when a write starts and when it has been applied.
    """

    def __init__(self, name: str = "L2", *, jitter: bool = False) -> None:
        super().__init__(name)
        self.data: dict[str, Any] = {}
        self.ops: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()
        self.gates: dict[str, threading.Event] = {}
        self.gate_all: threading.Event | None = None
        self.fail: dict[str, BaseException] = {}
        self.entered: queue.Queue[tuple[str, str]] = queue.Queue()
        self.done: queue.Queue[tuple[str, str]] = queue.Queue()
        self.jitter = jitter

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        with self.lock:
            return (self.data[key], None) if key in self.data else (MISSING, None)

    def _enter(self, kind: str, key: str) -> None:
        self.entered.put((kind, key))
        gate = self.gates.get(key) or self.gate_all
        if gate is not None:
            assert gate.wait(SAFETY), f"gate of {key!r} never opened"
        if self.jitter:
            roll = random.random()
            if roll < 0.01:
                _NEVER.wait(random.random() * 0.001)
            elif roll < 0.2:
                _NEVER.wait(0)
        exc = self.fail.get(key)
        if exc is not None:
            raise exc

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        self._enter("set", key)
        with self.lock:
            self.data[key] = value
            self.ops.append(("set", key, value))
        self.done.put(("set", key))

    def delete(self, key: str) -> None:
        self._enter("delete", key)
        with self.lock:
            self.data.pop(key, None)
            self.ops.append(("delete", key, None))
        self.done.put(("delete", key))

    def release(self) -> None:
        for gate in self.gates.values():
            gate.set()
        if self.gate_all is not None:
            self.gate_all.set()

    def ops_of(self, key: str) -> list[str]:
        with self.lock:
            return [kind for kind, k, _ in self.ops if k == key]


class RecordingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that keeps the future of every task submitted to it."""

    def __init__(self, max_workers: int = 2) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="test-writer")
        self.futures: list[concurrent.futures.Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future = super().submit(fn, *args, **kwargs)
        self.futures.append(future)
        return future


class ParkingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A pool that accepts tasks and never runs them (a stand-in for a pool whose threads
    are gone, as in a forked child)."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.tasks: list[Callable[..., Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.tasks.append(fn)
        return concurrent.futures.Future()


class SignalClock:
    """A monotonic clock that sets ``read`` when a watched thread reads it.

    The writer reads its clock under its lock right before it waits (for room, for a
    close deadline), so ``read`` tells another thread "the waiter is about to wait", and
    nothing that needs the lock can happen before that wait has begun. Worker threads
    (which read the clock to time writes) are not watched.
    """

    def __init__(self) -> None:
        self.read = threading.Event()
        self._watched: set[int] = set()

    def watch_me(self) -> None:
        self._watched.add(threading.get_ident())

    def __call__(self) -> float:
        if threading.get_ident() in self._watched:
            self.read.set()
        return time.monotonic()


def release_when(event: threading.Event, action: Callable[[], None]) -> threading.Thread:
    """Start a thread that runs ``action`` once ``event`` is set."""

    def run() -> None:
        if event.wait(SAFETY):
            action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture()
def make_writer() -> Iterator[Callable[..., AsyncWriter]]:
    """Build writers; at teardown open every gate and close every writer."""
    made: list[AsyncWriter] = []

    def make(layer: FakeLayer | None = None, **kwargs: Any) -> AsyncWriter:
        writer = AsyncWriter(layer if layer is not None else FakeLayer(), **kwargs)
        made.append(writer)
        return writer

    yield make
    for writer in made:
        layer = writer.layer
        if isinstance(layer, FakeLayer):
            layer.release()
        writer.close(SAFETY)


def hold_first_write(writer: AsyncWriter, layer: FakeLayer, key: str = "held") -> threading.Event:
    """Queue a set of ``key`` and return once a worker is blocked writing it."""
    gate = layer.gates[key] = threading.Event()
    assert writer.set(key, "held-value")
    assert layer.entered.get(timeout=SAFETY) == ("set", key)
    return gate


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("queue_size", 0),
        ("queue_size", 1.5),
        ("queue_size", True),
        ("max_wait", -1),
        ("max_wait", math.inf),
        ("max_wait", math.nan),
        ("max_wait", "1"),
        ("workers", 0),
        ("workers", None),
        ("idle_timeout", 0),
        ("idle_timeout", -0.5),
        ("retry_delay", 0),
        ("max_retry_delay", math.inf),
        ("executor", "pool"),
        ("clock", 3.0),
        ("max_repairs", 0),
        ("max_repairs", 2.5),
        ("on_overflow", 3),
    ],
)
def test_invalid_config_raises_config_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        AsyncWriter(FakeLayer(), **{field: value})


def test_a_layer_without_name_or_write_methods_is_rejected() -> None:
    with pytest.raises(ConfigError, match="layer"):
        AsyncWriter(object())  # type: ignore[arg-type]


def test_invalid_call_arguments_raise_config_error(make_writer: Callable[..., AsyncWriter]) -> None:
    writer = make_writer()
    with pytest.raises(ConfigError, match="max_wait"):
        writer.set("k", 1, max_wait=-1)
    with pytest.raises(ConfigError, match="timeout"):
        writer.flush(timeout=math.nan)
    with pytest.raises(ConfigError, match="timeout"):
        writer.close(timeout=-1)
    assert not writer.closed


# ---------------------------------------------------------------------- basics


def test_sets_and_deletes_reach_the_layer(make_writer: Callable[..., AsyncWriter]) -> None:
    layer = FakeLayer()
    writer = make_writer(layer)
    assert writer.layer is layer
    layer.data["gone"] = "old"
    assert writer.set("a", 1, 30) is True
    assert writer.set("b", 2) is True
    writer.delete("gone")
    assert writer.flush(SAFETY)
    assert layer.data == {"a": 1, "b": 2}
    stats = writer.stats()
    assert stats == WriterStats(
        depth=0,
        capacity=1000,
        inflight=0,
        written=3,
        failed=0,
        coalesced=0,
        dropped=0,
        dropped_by_reason=dict.fromkeys(DROP_REASONS, 0),
    )
    assert "L2" in repr(writer) and "open" in repr(writer)


def test_stats_show_depth_inflight_and_capacity(make_writer: Callable[..., AsyncWriter]) -> None:
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=5)
    gate = hold_first_write(writer, layer)
    writer.set("a", 1)
    writer.delete("b")
    stats = writer.stats()
    assert (stats.depth, stats.inflight, stats.capacity) == (2, 1, 5)
    assert (stats.written, stats.dropped) == (0, 0)
    gate.set()
    assert writer.flush(SAFETY)
    stats = writer.stats()
    assert (stats.depth, stats.inflight, stats.written) == (0, 0, 3)


# ---------------------------------------------------------------------- ordering (row 18)


def test_a_key_in_flight_is_not_taken_by_another_worker(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    writer = make_writer(layer, workers=2)
    gate = hold_first_write(writer, layer, "k")
    writer.delete("k")  # queued behind the in-flight set of "k"
    writer.set("j", 2)  # queued after it
    # The free worker must skip "k" (in flight) and write "j".
    assert layer.done.get(timeout=SAFETY) == ("set", "j")
    assert layer.ops_of("k") == []
    gate.set()
    assert writer.flush(SAFETY)
    assert layer.ops_of("k") == ["set", "delete"]
    assert "k" not in layer.data and layer.data["j"] == 2


def test_ten_thousand_set_then_delete_pairs_leave_no_key_behind(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer(jitter=True)
    writer = make_writer(layer, workers=4, queue_size=100_000)
    producers, pairs = 4, 2_500
    start = threading.Barrier(producers)

    def produce(p: int) -> None:
        start.wait(SAFETY)
        for i in range(pairs):
            # Half the pairs use distinct keys, half reuse 16 hot keys per producer.
            key = f"p{p}-d{i}" if i % 2 == 0 else f"p{p}-r{i % 16}"
            assert writer.set(key, (p, i))
            if random.random() < 0.2:
                _NEVER.wait(0.0001)  # lets a worker take the set before its delete comes
            writer.delete(key)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SAFETY * 3)
        assert not thread.is_alive()
    assert writer.flush(SAFETY * 3)
    assert layer.data == {}
    stats = writer.stats()
    assert (stats.failed, stats.dropped, stats.depth, stats.inflight) == (0, 0, 0, 0)
    # Every op was either written or coalesced away, and the race was exercised: many
    # sets reached the layer before their delete did.
    assert stats.written + stats.coalesced == producers * pairs * 2
    sets_written = sum(1 for kind, _, _ in layer.ops if kind == "set")
    assert sets_written > 500


# ---------------------------------------------------------------------- full queue (row 17)


def test_a_full_queue_drops_new_sets_but_never_deletes(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=3)
    gate = hold_first_write(writer, layer)
    for key in ("b", "c", "d"):
        assert writer.set(key, key)
    started = time.monotonic()
    assert writer.set("e", "e") is False  # default max_wait 0: no wait at all
    assert time.monotonic() - started < 1.0
    assert writer.set("b", "b2") is True  # coalesces with the queued set of "b"
    writer.delete("x")  # a delete past the bound is queued anyway
    writer.delete("c")  # replaces the queued set of "c"
    stats = writer.stats()
    assert stats.depth == 4 and stats.capacity == 3
    assert stats.dropped_by_reason["queue_full"] == 1 and stats.dropped == 1
    assert stats.coalesced == 2
    layer.data["x"] = "stale"
    gate.set()
    assert writer.flush(SAFETY)
    assert layer.data == {"held": "held-value", "b": "b2", "d": "d"}
    assert layer.ops_of("e") == [] and layer.ops_of("c") == ["delete"]
    assert writer.stats().dropped == 1


def test_same_key_sets_coalesce_and_are_never_dropped(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=1)
    gate = hold_first_write(writer, layer)
    for i in range(1000):
        assert writer.set("hot", i) is True
    stats = writer.stats()
    assert (stats.depth, stats.coalesced, stats.dropped) == (1, 999, 0)
    gate.set()
    assert writer.flush(SAFETY)
    assert layer.ops_of("hot") == ["set"] and layer.data["hot"] == 999


def test_max_wait_bounds_the_wait_then_drops(make_writer: Callable[..., AsyncWriter]) -> None:
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=1, max_wait=0.05)
    gate = hold_first_write(writer, layer)
    assert writer.set("b", 1)
    started = time.monotonic()
    assert writer.set("c", 1) is False  # the writer's default wait
    waited = time.monotonic() - started
    assert 0.045 <= waited < 2.0
    started = time.monotonic()
    assert writer.set("d", 1, max_wait=0.02) is False  # a per-call wait
    waited = time.monotonic() - started
    assert 0.015 <= waited < 2.0
    started = time.monotonic()
    assert writer.set("e", 1, max_wait=0) is False  # no wait at all
    assert time.monotonic() - started < 0.5
    assert writer.stats().dropped_by_reason["queue_full"] == 3
    gate.set()
    assert writer.flush(SAFETY)
    assert set(layer.data) == {"held", "b"}


def test_a_set_that_gets_room_during_its_wait_is_queued(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    clock = SignalClock()
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=1, clock=clock)
    gate = hold_first_write(writer, layer)
    assert writer.set("b", 1)
    release_when(clock.read, gate.set)  # frees a slot only once the set below waits
    clock.watch_me()
    started = time.monotonic()
    assert writer.set("c", 3, max_wait=SAFETY) is True
    assert time.monotonic() - started < SAFETY / 2
    assert writer.flush(SAFETY)
    assert layer.data == {"held": "held-value", "b": 1, "c": 3}
    assert writer.stats().dropped == 0


def test_a_waiting_set_coalesces_with_a_delete_queued_during_its_wait(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    clock = SignalClock()
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=1, clock=clock)
    gate = hold_first_write(writer, layer)
    gate_b = layer.gates["b"] = threading.Event()
    assert writer.set("b", 1)
    results: list[bool] = []

    def waiter() -> None:
        clock.watch_me()
        results.append(writer.set("c", 3, max_wait=SAFETY))

    thread = threading.Thread(target=waiter)
    thread.start()
    assert clock.read.wait(SAFETY)
    writer.delete("c")  # queued past the bound while the set of "c" waits
    gate.set()  # the worker takes "b" (and blocks on it): the waiter wakes, "c" is queued
    thread.join(SAFETY)
    gate_b.set()
    assert results == [True]
    assert writer.flush(SAFETY)
    assert layer.ops_of("c") == ["set"]
    assert layer.data["c"] == 3  # the set replaced the delete queued before it went in
    assert writer.stats().coalesced == 1


def test_a_set_waiting_for_room_is_dropped_as_closed_when_the_writer_closes(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    clock = SignalClock()
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=1, clock=clock)
    gate = hold_first_write(writer, layer)
    assert writer.set("b", 1)
    results: list[bool] = []

    def waiter() -> None:
        clock.watch_me()
        results.append(writer.set("c", 3, max_wait=SAFETY))

    thread = threading.Thread(target=waiter)
    thread.start()
    assert clock.read.wait(SAFETY)
    assert writer.close(timeout=0) == 1  # "b" was still queued
    thread.join(SAFETY)
    assert results == [False]
    gate.set()
    assert writer.flush(SAFETY)
    assert writer.stats().dropped_by_reason == {"queue_full": 0, "circuit_open": 0, "closed": 2}


# ---------------------------------------------------------------------- cancel


def test_cancel_removes_only_a_queued_set(make_writer: Callable[..., AsyncWriter]) -> None:
    layer = FakeLayer()
    writer = make_writer(layer)
    gate = hold_first_write(writer, layer)
    writer.set("b", 1)
    writer.delete("c")
    assert writer.cancel("b") is True
    assert writer.cancel("b") is False  # nothing queued any more
    assert writer.cancel("c") is False  # deletes are never cancelled
    assert writer.cancel("held") is False  # in flight, not queued
    assert writer.cancel("nope") is False
    assert writer.stats().depth == 1
    gate.set()
    assert writer.flush(SAFETY)
    assert layer.ops_of("b") == [] and layer.ops_of("c") == ["delete"]
    assert writer.stats().dropped == 0


def test_a_cancel_makes_room_for_a_waiting_set(make_writer: Callable[..., AsyncWriter]) -> None:
    clock = SignalClock()
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=1, clock=clock)
    gate = hold_first_write(writer, layer)
    assert writer.set("b", 1)
    results: list[bool] = []

    def waiter() -> None:
        clock.watch_me()
        results.append(writer.set("c", 3, max_wait=SAFETY))

    thread = threading.Thread(target=waiter)
    thread.start()
    assert clock.read.wait(SAFETY)
    assert writer.cancel("b") is True
    thread.join(SAFETY)
    assert results == [True]
    gate.set()
    assert writer.flush(SAFETY)
    assert layer.data == {"held": "held-value", "c": 3}


def test_cancelling_the_last_queued_set_completes_a_flush(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    parked = ParkingExecutor()  # no worker ever runs: only cancel can empty the queue
    writer = make_writer(executor=parked)
    writer.set("a", 1)
    assert writer.flush(timeout=0) is False
    assert writer.cancel("a") is True
    assert writer.flush(timeout=0) is True
    assert len(parked.tasks) == 1


# ---------------------------------------------------------------------- failures (rows 19, 22)


def test_a_failing_write_is_counted_and_logged_and_the_worker_continues(
    make_writer: Callable[..., AsyncWriter], caplog: pytest.LogCaptureFixture
) -> None:
    layer = FakeLayer()
    layer.fail = {
        "bad1": RuntimeError("boom"),
        "bad2": RuntimeError("boom again"),
        "bad3": KeyError("other"),
    }
    # No retry round during the test: the repairs wait for the flush below.
    writer = make_writer(layer, workers=1, retry_delay=600, max_retry_delay=600)
    with caplog.at_level(logging.DEBUG, logger="cachechain.writer"):
        for key in ("bad1", "bad2", "ok1", "bad3", "ok2"):
            writer.set(key, key)
        writer.delete("bad1")
        # Four writes fail, then the flush tries the three keys' repair deletes: they
        # fail too, and wait for a retry.
        assert not writer.flush(SAFETY)
    assert layer.data == {"ok1": "ok1", "ok2": "ok2"}
    stats = writer.stats()
    assert (stats.written, stats.failed, stats.dropped, stats.repairing) == (2, 7, 0, 3)
    assert writer.holding(["bad1", "bad2", "bad3", "ok1"]) == {"bad1", "bad2", "bad3"}
    records = [r for r in caplog.records if r.name == "cachechain.writer"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    debugs = [r for r in records if r.levelno == logging.DEBUG]
    assert len(warnings) == 2  # once per exception type
    assert "RuntimeError" in warnings[0].getMessage() and "boom" in warnings[0].getMessage()
    assert "KeyError" in warnings[1].getMessage()
    assert len(debugs) == 5  # the second RuntimeError set, the delete, three repairs
    assert all("L2" in r.getMessage() for r in records)
    layer.fail.clear()
    assert writer.flush(SAFETY)  # the repairs are made at once
    assert writer.stats().repairing == 0 and not writer.holding(["bad1", "bad2", "bad3"])
    assert sorted(op[:2] for op in layer.ops[-3:]) == [
        ("delete", k) for k in ("bad1", "bad2", "bad3")
    ]


def test_a_write_refused_by_an_open_breaker_leaves_a_repair(
    make_writer: Callable[..., AsyncWriter], caplog: pytest.LogCaptureFixture
) -> None:
    layer = FakeLayer()
    layer.fail = {"a": CircuitOpenError("open", layer="L2"), "b": CircuitOpenError("open")}
    writer = make_writer(layer, retry_delay=600, max_retry_delay=600)
    with caplog.at_level(logging.DEBUG, logger="cachechain.writer"):
        writer.set("a", 1)
        writer.delete("b")
        writer.set("c", 1)
        assert not writer.flush(SAFETY)
    stats = writer.stats()
    # The refused set is dropped; the refused delete is not: both keys get a repair.
    assert stats.dropped_by_reason["circuit_open"] == 1 and stats.dropped == 1
    assert (stats.failed, stats.written, stats.repairing) == (0, 1, 2)
    assert not [r for r in caplog.records if r.name == "cachechain.writer"]
    layer.fail.clear()  # the breaker closed
    assert writer.flush(SAFETY)
    assert "a" not in layer.data and "b" not in layer.data and layer.data["c"] == 1


class Fatal(BaseException):
    """Not an Exception: the drain task ends with it, after counting the write."""


def test_a_base_exception_ends_the_drain_task_and_another_takes_over(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    layer.fail = {"fatal": Fatal()}
    pool = RecordingExecutor()
    try:
        writer = make_writer(layer, executor=pool, retry_delay=600, max_retry_delay=600)
        gate = hold_first_write(writer, layer, "fatal")
        writer.set("after", 2)  # queued for the only drain task, which is about to end
        gate.set()
        assert isinstance(pool.futures[0].exception(timeout=SAFETY), Fatal)
        # A new task takes over the queued write at once ...
        assert layer.done.get(timeout=SAFETY) == ("set", "after")
        assert len(pool.futures) == 2
        # ... and the interrupted write left a repair, which lands once it can.
        assert writer.stats().repairing == 1 and writer.holds("fatal")
        layer.fail.clear()
        assert writer.flush(SAFETY)
        assert layer.data == {"after": 2} and not writer.holds("fatal")
        writer.set("later", 3)
        assert writer.flush(SAFETY)
        assert layer.data == {"after": 2, "later": 3}
    finally:
        pool.shutdown(wait=False)


def test_max_retry_delay_below_retry_delay_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_retry_delay must be >= retry_delay"):
        AsyncWriter(FakeLayer(), retry_delay=1.0, max_retry_delay=0.5)


# ---------------------------------------------------------------------- repairs


class FlakyLayer(FakeLayer):
    """Fails the first ``failures`` deletes, recording when each was tried (monotonic
    seconds); ``landed`` is set when a delete succeeds."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.tried: list[float] = []
        self.landed = threading.Event()

    def delete(self, key: str) -> None:
        self.tried.append(time.monotonic())
        if len(self.tried) <= self.failures:
            raise ConnectionResetError("down")
        super().delete(key)
        self.landed.set()


def test_a_failed_delete_is_retried_with_backoff_until_it_lands(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FlakyLayer(failures=3)
    layer.data["k"] = "old"
    writer = make_writer(layer, retry_delay=0.02, max_retry_delay=0.05)
    writer.delete("k")
    assert layer.landed.wait(SAFETY)  # no flush: the writer retried on its own
    assert "k" not in layer.data
    gaps = [b - a for a, b in itertools.pairwise(layer.tried)]
    # Each failure waits longer (doubling, capped): 0.02, 0.04, then 0.05 s at least.
    assert len(gaps) == 3
    assert gaps[0] >= 0.02 * 0.99 and gaps[1] >= 0.04 * 0.99 and gaps[2] >= 0.05 * 0.99
    assert writer.flush(SAFETY)
    stats = writer.stats()
    assert (stats.failed, stats.written, stats.repairing) == (3, 1, 0)
    assert not writer.holds("k")


class TimedLayer(FakeLayer):
    """Records ``(key, monotonic seconds)`` when each delete is tried."""

    def __init__(self) -> None:
        super().__init__()
        self.tried: list[tuple[str, float]] = []

    def delete(self, key: str) -> None:
        self.tried.append((key, time.monotonic()))
        super().delete(key)


def test_a_retry_round_sends_one_repair_and_each_that_lands_starts_the_next(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = TimedLayer()
    keys = ["a", "b", "c"]
    layer.fail = {k: ConnectionResetError("down") for k in keys}
    writer = make_writer(layer, retry_delay=0.03, max_retry_delay=0.03)
    for key in keys:
        writer.delete(key)
    for _ in range(len(keys) + 4):  # the first attempts, made at once, then 4 rounds
        assert layer.entered.get(timeout=SAFETY)[0] == "delete"
    # One repair per round, in turn, a round apart: not all three per round.
    probes = layer.tried[len(keys) : len(keys) + 4]
    assert [k for k, _ in probes] == ["a", "b", "c", "a"]
    assert all(b - a >= 0.03 * 0.99 for (_, a), (_, b) in itertools.pairwise(probes))
    layer.fail.clear()  # back: the next probe lands, and the others follow at once
    landed = {layer.done.get(timeout=SAFETY)[1] for _ in keys}
    assert landed == set(keys)
    assert writer.flush(SAFETY) and writer.stats().repairing == 0


def test_a_set_that_waited_for_room_is_held_once_queued(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    """The older write of a key ends while a newer set of it waits for room: the newer
    one must still hold the key once it is queued (else a chain would read the layer's
    older value and copy it up)."""
    clock = SignalClock()
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=1, clock=clock)
    gate_a = hold_first_write(writer, layer, "a")  # "a" v1 in flight
    layer.gates["b"] = gate_b = threading.Event()
    assert writer.set("b", 1)  # the queue is full
    results: list[bool] = []

    def waiter() -> None:
        clock.watch_me()
        results.append(writer.set("a", 2, max_wait=SAFETY))

    thread = threading.Thread(target=waiter)
    thread.start()
    assert clock.read.wait(SAFETY)  # "a" v2 waits for room
    gate_a.set()  # "a" v1 lands (its key released), then "b" is taken: room for "a" v2
    assert layer.entered.get(timeout=SAFETY) == ("set", "b")
    thread.join(SAFETY)
    assert results == [True]
    assert writer.holds("a")  # queued behind "b", not yet written: held
    gate_b.set()
    assert writer.flush(SAFETY)
    assert layer.data == {"a": 2, "b": 1} and not writer.holds("a")


def test_repairs_are_retried_while_the_queue_stays_busy(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = TimedLayer()
    layer.fail = {"k": ConnectionResetError("down")}
    layer.data["k"] = "old"
    writer = make_writer(layer, retry_delay=0.02, max_retry_delay=0.02)
    writer.delete("k")
    assert layer.entered.get(timeout=SAFETY) == ("delete", "k")
    del layer.fail["k"]
    # Keep the queue busy: each write is held until the next one is queued, so the
    # worker never finds the queue empty. The repair must still get its turn.
    previous: threading.Event | None = None
    for i in range(20_000):
        layer.gates[f"w{i}"] = gate = threading.Event()
        writer.set(f"w{i}", i)
        if previous is not None:
            previous.set()
        previous = gate
        while layer.entered.get(timeout=SAFETY)[1] != f"w{i}":
            pass  # the repair went by
        if "k" not in layer.data:
            break
    assert previous is not None
    previous.set()
    assert "k" not in layer.data, "the repair never ran while the queue was busy"
    assert writer.flush(SAFETY)


def test_with_several_workers_a_round_still_sends_one_repair(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = TimedLayer()
    keys = ["a", "b", "c", "d"]
    layer.fail = {k: ConnectionResetError("down") for k in keys}
    writer = make_writer(layer, workers=4, retry_delay=0.03, max_retry_delay=0.03)
    for key in keys:
        writer.delete(key)
    for _ in range(len(keys) + 4):  # the first attempts, then 4 rounds
        assert layer.entered.get(timeout=SAFETY)[0] == "delete"
    probes = layer.tried[len(keys) : len(keys) + 4]
    assert sorted(k for k, _ in probes) == keys  # one each, in turn
    assert all(b - a >= 0.03 * 0.99 for (_, a), (_, b) in itertools.pairwise(probes))
    layer.fail.clear()
    assert writer.flush(SAFETY)


def test_a_key_is_held_until_its_repair_lands_and_a_newer_write_replaces_it(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    layer.fail = {"k": ConnectionResetError("down")}
    writer = make_writer(layer, retry_delay=600, max_retry_delay=600)
    assert writer.set("k", 1)
    assert not writer.flush(SAFETY)
    assert writer.holds("k") and writer.holding(["k", "x"]) == {"k"}
    assert writer.stats().repairing == 1
    assert not writer.settle("k", 0.0)  # a delete of it waits: queue behind it
    layer.gates["k"] = gate = threading.Event()
    while not layer.entered.empty():  # forget the earlier attempts
        layer.entered.get_nowait()
    assert writer.set("k", 2)  # replaces the repair: its value is newer
    assert layer.entered.get(timeout=SAFETY) == ("set", "k")  # held at the gate
    assert writer.stats().repairing == 0 and writer.holds("k")
    layer.fail.clear()
    gate.set()
    assert writer.flush(SAFETY)
    assert layer.data == {"k": 2} and layer.ops_of("k")[-1] == "set"
    assert not writer.holds("k") and writer.settle("k", 0.0)


def test_a_cancelled_set_that_replaced_a_round_s_repair_does_not_stop_the_rounds(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    """A round's repair delete is replaced by a set, which is then cancelled (a chain
    writing the key synchronously): the round is over, and later repairs still get
    their rounds."""
    clock = FakeClock()  # rounds become due only when the test moves it
    layer = FakeLayer()
    layer.fail = {"k": ConnectionResetError("down")}
    writer = make_writer(layer, clock=clock, retry_delay=0.01, max_retry_delay=0.01)
    writer.delete("k")
    assert not writer.flush(SAFETY)  # the delete and its repair failed: a repair waits
    while not layer.entered.empty():  # forget those attempts
        layer.entered.get_nowait()
    gate_a = hold_first_write(writer, layer, "a")
    layer.gates["b"] = gate_b = threading.Event()
    assert writer.set("b", 1)
    clock.advance(5)  # the round is due
    gate_a.set()  # the worker starts the round (k's repair queued after b), takes b
    assert layer.entered.get(timeout=SAFETY) == ("set", "b")
    assert writer.set("k", 2)  # replaces the round's repair delete ...
    assert writer.cancel("k")  # ... and is cancelled
    del layer.fail["k"]
    gate_b.set()
    layer.fail["m"] = ConnectionResetError("down")
    writer.delete("m")
    assert not writer.flush(SAFETY)  # "m" waits for a round
    del layer.fail["m"]
    clock.advance(5)
    while layer.done.get(timeout=SAFETY) != ("delete", "m"):
        pass  # a round sent the repair of "m" on its own
    assert writer.flush(SAFETY) and not writer.holds("m")


def test_close_tries_each_repair_once_more_and_counts_the_rest(
    make_writer: Callable[..., AsyncWriter], caplog: pytest.LogCaptureFixture
) -> None:
    layer = FakeLayer()
    layer.data.update(a="old", b="old")
    layer.fail = {"a": ConnectionResetError("down"), "b": ConnectionResetError("down")}
    writer = make_writer(layer, retry_delay=600, max_retry_delay=600)
    writer.delete("a")
    writer.delete("b")
    assert not writer.flush(SAFETY)
    del layer.fail["b"]
    with caplog.at_level(logging.WARNING, logger="cachechain.writer"):
        assert writer.close(SAFETY) == 1
    assert layer.data == {"a": "old"}
    stats = writer.stats()
    assert stats.dropped_by_reason["closed"] == 1 and stats.repairing == 0
    assert not writer.holds("a") and not writer.holds("b")
    assert any("closed with 1 deletes not made" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- workers and executor


def test_an_idle_worker_ends_after_idle_timeout_and_a_new_one_starts(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    pool = RecordingExecutor()
    try:
        writer = make_writer(layer, executor=pool, idle_timeout=0.05)
        writer.set("a", 1)
        done, _ = concurrent.futures.wait(pool.futures, timeout=SAFETY)
        assert len(done) == 1  # the drain task ended on its own once idle
        writer.set("b", 2)
        assert writer.flush(SAFETY)
        assert layer.data == {"a": 1, "b": 2} and len(pool.futures) == 2
        writer.close(SAFETY)
        pool.submit(lambda: None).result(SAFETY)  # a given executor is not shut down
    finally:
        pool.shutdown(wait=False)


def test_an_idle_worker_is_woken_rather_than_a_new_task_submitted(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    pool = RecordingExecutor(max_workers=4)
    try:
        writer = make_writer(layer, executor=pool, workers=4, idle_timeout=SAFETY)
        for round_ in range(20):
            writer.set(f"k{round_}", round_)
            assert layer.done.get(timeout=SAFETY) == ("set", f"k{round_}")
        # One drain task, once started, stays idle and is woken for each new write.
        assert len(pool.futures) <= 4
        assert writer.flush(SAFETY) and len(layer.data) == 20
    finally:
        pool.shutdown(wait=False)


def test_workers_write_in_parallel(make_writer: Callable[..., AsyncWriter]) -> None:
    layer = FakeLayer()
    writer = make_writer(layer, workers=3)
    layer.gate_all = threading.Event()
    for key in ("a", "b", "c"):
        writer.set(key, key)
    # All three writes are in the layer at once, blocked on the same gate.
    entered = {layer.entered.get(timeout=SAFETY)[1] for _ in range(3)}
    assert entered == {"a", "b", "c"}
    assert writer.stats().inflight == 3
    layer.gate_all.set()
    assert writer.flush(SAFETY)
    assert writer.stats().inflight == 0
    names = {t.name.rsplit("_", 1)[0] for t in threading.enumerate()}
    assert "cachechain-writer-L2" in names


def test_a_shut_down_executor_drops_queued_writes_as_closed(
    make_writer: Callable[..., AsyncWriter], caplog: pytest.LogCaptureFixture
) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    pool.shutdown()
    writer = make_writer(executor=pool)
    with caplog.at_level(logging.WARNING, logger="cachechain.writer"):
        assert writer.set("a", 1) is False
        writer.delete("b")
    # The set is lost; the delete is kept (as a repair), so "b" stays held: a chain
    # will not read it from this layer, whose writer can no longer write anything.
    stats = writer.stats()
    assert (stats.dropped_by_reason["closed"], stats.depth, stats.repairing) == (1, 0, 1)
    assert writer.holds("b") and not writer.holds("a")
    assert "refused" in caplog.records[0].getMessage()
    assert not writer.flush(SAFETY)


# ---------------------------------------------------------------------- flush


def test_flush_waits_for_queued_and_in_flight_writes(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    writer = make_writer(layer)
    assert writer.flush() is True  # nothing to wait for
    gate = hold_first_write(writer, layer)
    writer.set("b", 1)
    started = time.monotonic()
    assert writer.flush(timeout=0.05) is False
    assert 0.045 <= time.monotonic() - started < 2.0
    done: list[bool] = []
    thread = threading.Thread(target=lambda: done.append(writer.flush()))
    thread.start()
    gate.set()
    thread.join(SAFETY)
    assert done == [True]
    assert set(layer.data) == {"held", "b"}


# ---------------------------------------------------------------------- close (row 20)


def test_close_drains_within_its_deadline_and_counts_the_rest(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    layer.gates["k3"] = threading.Event()
    writer = make_writer(layer, workers=1)
    for i in range(10):
        writer.set(f"k{i}", i)
    while layer.entered.get(timeout=SAFETY) != ("set", "k3"):
        pass  # k0..k2 are written; the worker is now blocked on k3
    started = time.monotonic()
    assert writer.close(timeout=0.1) == 6  # k4..k9: k3 is in flight at the deadline
    took = time.monotonic() - started
    assert 0.09 <= took < 2.0
    assert writer.closed and "closed" in repr(writer)
    with pytest.raises(ChainClosedError):
        writer.set("late", 1)
    with pytest.raises(ChainClosedError):
        writer.delete("late")
    assert writer.cancel("k9") is False
    assert writer.close() == 0  # idempotent
    layer.gates["k3"].set()
    assert writer.flush(SAFETY)  # the in-flight write finishes and is counted
    stats = writer.stats()
    assert (stats.written, stats.depth, stats.inflight) == (4, 0, 0)
    assert stats.dropped_by_reason == {"queue_full": 0, "circuit_open": 0, "closed": 6}
    assert set(layer.data) == {"k0", "k1", "k2", "k3"}


def test_close_drains_a_full_queue_in_time(make_writer: Callable[..., AsyncWriter]) -> None:
    clock = SignalClock()
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=50, workers=2, clock=clock)
    layer.gate_all = threading.Event()
    writer.set("k0", 0)
    writer.set("k1", 1)
    assert {layer.entered.get(timeout=SAFETY)[1] for _ in range(2)} == {"k0", "k1"}
    for i in range(2, 52):
        assert writer.set(f"k{i}", i)
    assert writer.set("over", 0) is False
    release_when(clock.read, layer.gate_all.set)  # unblock the layer once close() starts
    clock.watch_me()
    started = time.monotonic()
    assert writer.close(timeout=SAFETY) == 0
    assert time.monotonic() - started < SAFETY / 2
    assert len(layer.data) == 52
    stats = writer.stats()
    assert (stats.written, stats.dropped) == (52, 1)


def test_close_with_zero_timeout_drops_everything_queued(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    writer = make_writer(layer)
    gate = hold_first_write(writer, layer)
    for i in range(5):
        writer.set(f"k{i}", i)
    writer.delete("d")
    assert writer.close(timeout=0) == 6
    gate.set()
    assert writer.flush(SAFETY)
    assert set(layer.data) == {"held"}


def test_close_of_an_unused_writer_creates_no_executor() -> None:
    writer = AsyncWriter(FakeLayer())
    assert writer.close() == 0
    assert writer._executor is None
    assert writer.flush(0)


# ---------------------------------------------------------------------- exit (row 21)

EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, json, sys, threading, time

    from cachechain.layers._base import MISSING, BaseLayer
    from cachechain._writer import AsyncWriter

    delay, count, exit_timeout, idle = (float(a) for a in sys.argv[1:5])
    never = threading.Event()

    class SlowLayer(BaseLayer):
        def __init__(self):
            super().__init__("slow")
            self.written = []

        def get_with_ttl(self, key):
            return MISSING, None

        def set(self, key, value, ttl=None):
            never.wait(delay)  # the latency of a remote write
            self.written.append(key)

        def delete(self, key):
            never.wait(delay)
            self.written.append(key)

    layer = SlowLayer()
    writer = AsyncWriter(layer, queue_size=int(count), workers=2, idle_timeout=idle)
    writer.exit_timeout = exit_timeout

    def report():  # atexit handlers run after threading's exit hooks
        stats = writer.stats()
        print(json.dumps({
            "exit_seconds": time.monotonic() - END,
            "layer_writes": len(layer.written),
            "written": stats.written,
            "dropped": stats.dropped_by_reason,
            "depth": stats.depth,
            "inflight": stats.inflight,
            "closed": writer.closed,
            "queued_at_exit": QUEUED_AT_EXIT,
        }))

    atexit.register(report)
    for i in range(int(count) - 1):
        writer.set(f"k{i}", i)
    writer.delete("gone")
    QUEUED_AT_EXIT = writer.stats().depth
    END = time.monotonic()
    """
)


def run_exit_script(
    tmp_path: Path,
    delay: float,
    count: int,
    exit_timeout: float,
    idle: float,
    *,
    timeout: float = 60,
) -> tuple[dict[str, Any], float]:
    """Run EXIT_SCRIPT (``count`` writes queued, then the interpreter exits without
    ``close``) and return its report, printed by an atexit handler, and the wall time."""
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), str(delay), str(count), str(exit_timeout), str(idle)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
    )
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout), wall


def test_interpreter_exit_drains_pending_writes_within_the_bound(tmp_path: Path) -> None:
    delay, count, bound = 0.05, 200, 0.3
    report, wall = run_exit_script(tmp_path, delay, count, bound, idle=60)
    assert report["closed"] is True
    assert report["written"] == report["layer_writes"]
    # Two workers at 50 ms per write fit about 12 writes in 0.3 s.
    assert 2 <= report["written"] < count
    assert report["written"] + report["dropped"]["closed"] == count
    assert report["depth"] == 0 and report["inflight"] == 0
    # The bound, plus at most the write in flight at the deadline, plus scheduling slack.
    assert bound * 0.9 <= report["exit_seconds"] < bound + delay + 0.5
    assert wall < 10


def test_interpreter_exit_writes_everything_that_fits_without_waiting_for_idle_workers(
    tmp_path: Path,
) -> None:
    report, _ = run_exit_script(tmp_path, delay=0.0, count=500, exit_timeout=5.0, idle=60.0)
    assert report["written"] == report["layer_writes"] == 500
    assert report["dropped"] == {"queue_full": 0, "circuit_open": 0, "closed": 0}
    # Neither the 60 s idle wait of the workers nor the 5 s bound is waited out.
    assert report["exit_seconds"] < 2.0


def test_exit_drain_in_process_stops_intake_and_counts_the_rest(
    make_writer: Callable[..., AsyncWriter], caplog: pytest.LogCaptureFixture
) -> None:
    layer = FakeLayer()
    writer = make_writer(layer)
    gate = hold_first_write(writer, layer)
    writer.set("a", 1)
    writer.exit_timeout = 0.02
    broken = make_writer(FakeLayer("broken"))
    broken.exit_timeout = "soon"  # type: ignore[assignment]
    done = make_writer(FakeLayer("done"))
    done.close()
    with caplog.at_level(logging.DEBUG, logger="cachechain.writer"):
        writer_module._exit_drain([writer, broken, done])
    assert writer.closed and writer.stats().dropped_by_reason["closed"] == 1
    with pytest.raises(ChainClosedError):
        writer.set("b", 1)
    assert any("could not stop" in r.getMessage() for r in caplog.records)
    gate.set()
    assert writer.flush(SAFETY)


def test_exit_drain_logs_a_writer_that_fails_to_drain(
    make_writer: Callable[..., AsyncWriter],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = make_writer()

    def boom(deadline: float) -> int:
        raise RuntimeError("drain failed")

    monkeypatch.setattr(writer, "_finish_stop", boom)
    with caplog.at_level(logging.DEBUG, logger="cachechain.writer"):
        writer_module._exit_drain([writer])
    assert any("could not drain" in r.getMessage() for r in caplog.records)


def test_the_exit_hook_runs_before_concurrent_futures_joins_its_threads(tmp_path: Path) -> None:
    # Checked by what exit does, not by how the hook is registered (3.13 wraps threading's
    # exit hooks in a lambda, 3.12 and earlier in a functools.partial). The workers wait
    # out a 60 s idle timeout unless told that the writer closed, and concurrent.futures'
    # own exit hook joins them: were ours to run after it (or as a plain atexit handler),
    # exit would hang until this test's timeout, or the report (an atexit handler) would
    # find the writer open and writes missing.
    report, wall = run_exit_script(
        tmp_path, delay=0.01, count=50, exit_timeout=30.0, idle=60.0, timeout=30
    )
    assert report["queued_at_exit"] > 0  # the exit hook had work to do
    assert report["closed"] is True
    assert report["written"] == report["layer_writes"] == 50
    assert report["dropped"] == {"queue_full": 0, "circuit_open": 0, "closed": 0}
    assert report["depth"] == 0 and report["inflight"] == 0
    assert wall < 20


class ExitingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A pool whose threads run on but that starts no new one once ``exiting`` is set:
    concurrent.futures while the interpreter exits on Python 3.12.0-3.12.2."""

    def __init__(self) -> None:
        super().__init__(max_workers=4, thread_name_prefix="test-exiting")
        self.exiting = False
        self.refused = 0
        self.on_refuse: Callable[[], object] = lambda: None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if self.exiting:
            self.refused += 1
            self.on_refuse()
            raise RuntimeError("can't create new thread at interpreter shutdown")
        return super().submit(fn, *args, **kwargs)


def test_the_exit_drain_makes_do_with_the_workers_it_has(
    make_writer: Callable[..., AsyncWriter], caplog: pytest.LogCaptureFixture
) -> None:
    layer = FakeLayer()
    executor = ExitingExecutor()
    writer = make_writer(layer, workers=2, executor=executor)
    gate = hold_first_write(writer, layer)  # one worker, busy
    executor.exiting = True
    with caplog.at_level(logging.DEBUG, logger="cachechain.writer"):
        # No second worker can start: these wait for the busy one.
        assert writer.set("a", 1) and writer.set("b", 2)
        caplog.clear()
        # The busy worker goes on once the exit drain has asked for another.
        executor.on_refuse = gate.set
        writer.exit_timeout = SAFETY
        writer_module._exit_drain([writer])
    assert executor.refused == 3
    assert layer.data == {"held": "held-value", "a": 1, "b": 2}
    stats = writer.stats()
    assert (stats.written, stats.dropped, stats.depth) == (3, 0, 0)
    # Exit prints nothing: the refusal is no news there, and is logged at DEBUG only.
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG] == []
    assert any("refused a worker" in r.getMessage() for r in caplog.records)
    executor.shutdown()


# ---------------------------------------------------------------------- fork (row 29)


def test_reinit_after_fork_gives_fresh_state() -> None:
    parked = ParkingExecutor()  # the "parent's" pool: its tasks never run in the child
    layer = FakeLayer()
    writer = AsyncWriter(layer, executor=parked)
    try:
        writer.set("a", 1)
        writer.set("a", 2)
        old_lock = writer._lock
        old_lock.acquire()  # as if another thread held it at the fork
        writer._after_fork()
        assert writer._lock is not old_lock
        stats = writer.stats()
        assert (stats.depth, stats.inflight, stats.coalesced, stats.written) == (0, 0, 0, 0)
        writer.set("child", 3)
        assert writer.flush(SAFETY)
        assert layer.data == {"child": 3} and len(parked.tasks) == 1
    finally:
        writer.close(SAFETY)


def test_the_process_hooks_act_on_every_live_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = FakeLayer()
    writer = AsyncWriter(layer, executor=ParkingExecutor())
    # Only this writer is "live" here: the hooks must not touch other tests' writers.
    assert writer in fork_module._TRACKED
    monkeypatch.setattr(writer_module, "_LIVE", weakref.WeakSet([writer]))
    monkeypatch.setattr(fork_module, "_TRACKED", weakref.WeakSet([writer]))
    monkeypatch.setattr(fork_module, "_AFTER_IN_CHILD", [])
    writer.set("a", 1)
    fork_module.after_fork_in_child()
    assert writer.stats().depth == 0 and writer._executor is None
    writer.exit_timeout = SAFETY
    writer.set("b", 2)
    writer_module._at_exit()
    assert writer.closed and layer.data == {"b": 2}
    assert writer.stats().dropped == 0
    writer.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_gets_a_fresh_queue_lock_and_workers(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    writer = make_writer(layer, workers=1)
    gate = hold_first_write(writer, layer)  # a worker thread is blocked in a write
    writer.set("queued", 1)
    holding, unlock = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with writer._lock:
            holding.set()
            unlock.wait(SAFETY)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert holding.wait(SAFETY)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; coverage does not follow the fork
        code = 1
        try:
            os.close(read_fd)
            result: dict[str, Any] = {}
            try:
                stats = writer.stats()  # would hang forever on the inherited held lock
                result["stats"] = [stats.depth, stats.inflight, stats.written]
                result["queued"] = writer.set("child", 2)
                result["flushed"] = writer.flush(SAFETY)
                result["data"] = sorted(layer.data)
                result["dropped"] = writer.close(SAFETY)
            except BaseException as exc:
                result["error"] = repr(exc)
            os.write(write_fd, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], SAFETY * 2)
        assert ready, "the child did not answer"
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        unlock.set()
        holder.join(SAFETY)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result = json.loads(b"".join(chunks))
    assert result == {
        "stats": [0, 0, 0],
        "queued": True,
        "flushed": True,
        "data": ["child"],
        "dropped": 0,
    }
    # The parent still writes its own queue, and only that.
    gate.set()
    assert writer.flush(SAFETY)
    assert layer.data == {"held": "held-value", "queued": 1}


# ---------------------------------------------------------------------- settle, observer


def test_settle_cancels_a_queued_set_and_waits_for_a_write_in_flight(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    writer = make_writer(layer)
    gate = hold_first_write(writer, layer)
    writer.set("queued", 1)
    assert writer.settle("queued", 0) is True  # cancelled: nothing of it is left
    assert writer.settle("absent", 0) is True
    writer.delete("del")
    assert writer.settle("del", 0) is False  # a queued delete is never cancelled
    assert writer.settle("held", 0.01) is False  # still in flight at the deadline
    settled: list[bool] = []
    waiter = threading.Thread(target=lambda: settled.append(writer.settle("held", SAFETY)))
    waiter.start()
    gate.set()  # the write in flight ends: the waiter is woken
    waiter.join(SAFETY)
    assert settled == [True]
    assert writer.flush(SAFETY)
    assert layer.ops_of("queued") == []


class RecordingObserver:
    def __init__(self, writer: AsyncWriter) -> None:
        self.writer = writer
        self.events: list[tuple[str, Any]] = []

    def dropped(self, reason: str, count: int) -> None:
        self.writer.stats()  # calling back into the writer must not deadlock
        self.events.append(("dropped", (reason, count)))

    def written(self, success: bool, duration: float) -> None:
        self.writer.stats()
        self.events.append(("written", success))

    def depth(self, depth: int) -> None:
        self.events.append(("depth", depth))


def test_the_observer_is_told_of_writes_and_drops_outside_the_lock(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    writer = make_writer(layer, queue_size=1)
    observer = RecordingObserver(writer)
    writer.observer = observer
    gate = hold_first_write(writer, layer)
    assert writer.set("a", 1)
    assert writer.set("b", 2) is False  # the queue holds one key: dropped
    gate.set()
    assert writer.flush(SAFETY)
    kinds = [kind for kind, _ in observer.events]
    assert ("dropped", ("queue_full", 1)) in observer.events
    assert kinds.count("written") == 2
    assert kinds.count("depth") == 2
    assert writer.close(SAFETY) == 0


def test_an_observer_that_raises_is_logged_and_harms_nothing(
    make_writer: Callable[..., AsyncWriter], caplog: pytest.LogCaptureFixture
) -> None:
    class Raising:
        def dropped(self, reason: str, count: int) -> None:
            raise RuntimeError("observer down")

        written = depth = dropped  # type: ignore[assignment]

    layer = FakeLayer()
    writer = make_writer(layer)
    writer.observer = Raising()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        assert writer.set("a", 1)
        assert writer.flush(SAFETY)
    assert layer.ops_of("a") == ["set"]
    assert any("observer raised" in r.getMessage() for r in caplog.records)


def test_repair_after_close_is_counted_as_dropped(make_writer: Callable[..., AsyncWriter]) -> None:
    layer = FakeLayer()
    writer = make_writer(layer, retry_delay=600, max_retry_delay=600)
    assert writer.repair("k") is True and writer.holds("k")
    assert writer.close(SAFETY) == 0  # close tries it once more: it lands
    assert layer.ops_of("k") == ["delete"]
    assert writer.repair("j") is False
    assert writer.stats().dropped_by_reason["closed"] == 1
    assert not writer.holds("j")


def test_a_failed_write_leaves_no_repair_when_a_newer_one_is_queued(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    layer = FakeLayer()
    layer.fail = {"k": ConnectionResetError("down")}
    writer = make_writer(layer, retry_delay=600, max_retry_delay=600)
    gate = hold_first_write(writer, layer, "k")  # v1 in flight, about to fail
    assert writer.set("k", "v2")  # queued meanwhile: it replaces whatever v1 leaves
    del layer.fail["k"]
    gate.set()
    assert writer.flush(SAFETY)
    assert layer.data == {"k": "v2"} and writer.stats().repairing == 0


# ---------------------------------------------------------------------- the cap on repairs


class DownLayer(FakeLayer):
    """Every write raises ConnectionResetError while ``down`` (after recording that it
    was tried in ``entered``)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    def _enter(self, kind: str, key: str) -> None:
        super()._enter(kind, key)
        if self.down:
            raise ConnectionResetError("down")


class Handler:
    """An overflow handler: returns ``answer`` (or raises it), puts the number of each
    call in ``calls`` as it returns; ``entered`` is set when a call starts, which then
    waits for ``gate`` if one is set."""

    def __init__(self, answer: bool | BaseException = False) -> None:
        self.answer = answer
        self.count = 0
        self.calls: queue.Queue[int] = queue.Queue()
        self.entered = threading.Event()
        self.gate: threading.Event | None = None

    def __call__(self) -> bool:
        self.count += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(SAFETY)
        self.calls.put(self.count)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def overflow(writer: AsyncWriter, keys: int) -> None:
    """Owe ``keys`` repairs (one past max_repairs overflows the writer)."""
    for i in range(keys):
        assert writer.repair(f"k{i}")


def test_past_max_repairs_the_writer_overflows_and_holds_every_key(
    make_writer: Callable[..., AsyncWriter], caplog: pytest.LogCaptureFixture
) -> None:
    writer = make_writer(DownLayer(), max_repairs=5, retry_delay=600, max_retry_delay=600)
    with caplog.at_level(logging.WARNING, logger="cachechain.writer"):
        overflow(writer, 5)
        assert writer.stats().repairing == 5 and not writer.overflowed
        assert not writer.holds("other") and writer.holding(["k0", "other"]) == {"k0"}
        overflow(writer, 50_000)  # a long outage: memory stays bounded
    stats = writer.stats()
    assert stats.overflowed and writer.overflowed and stats.overflows == 1
    assert stats.repairing == 0 and not writer._held  # no key kept
    assert writer.holds("other") and writer.holding(["a", "b"]) == {"a", "b"}
    assert not writer.flush(SAFETY)  # no handler: it stays overflowed
    assert writer.holds("other") and writer.stats().overflows == 1
    warned = [r.getMessage() for r in caplog.records if "repair deletes pending" in r.getMessage()]
    assert len(warned) == 1 and "more than 5" in warned[0] and "no overflow handler" in warned[0]


def test_failed_queued_writes_count_toward_the_cap(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    writer = make_writer(DownLayer(), max_repairs=3, retry_delay=600, max_retry_delay=600)
    for i in range(10):
        assert writer.set(f"s{i}", i)
    assert not writer.flush(SAFETY)  # every set failed, then every repair
    stats = writer.stats()
    assert stats.overflowed and stats.repairing == 0 and stats.failed >= 10
    assert not writer._held


def test_the_overflow_handler_runs_on_the_repair_backoff_and_ends_the_overflow(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    clock = FakeClock()  # rounds become due only when the test moves it
    layer = DownLayer()
    handler = Handler(answer=False)
    writer = make_writer(
        layer,
        clock=clock,
        max_repairs=2,
        retry_delay=0.01,
        max_retry_delay=0.01,
        on_overflow=handler,
    )
    assert writer.overflow_handler is handler
    overflow(writer, 3)
    assert writer.overflowed and handler.count == 0  # the repairs' round is not due
    clock.advance(1)
    assert handler.calls.get(timeout=SAFETY) == 1  # down: not handled
    assert writer.overflowed and writer.holds("k0")
    layer.down = False
    handler.answer = True
    clock.advance(1)
    assert handler.calls.get(timeout=SAFETY) == 2
    assert writer.flush(SAFETY)  # waits for the round to end
    assert not writer.overflowed and not writer.holds("k0") and handler.count == 2
    stats = writer.stats()
    assert stats.overflows == 1 and stats.repairing == 0
    assert layer.ops == []  # no key-by-key delete was sent for the given-up repairs


def test_flush_calls_the_overflow_handler_once_whatever_the_backoff(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    handler = Handler(answer=False)
    writer = make_writer(
        DownLayer(), max_repairs=1, retry_delay=600, max_retry_delay=600, on_overflow=handler
    )
    overflow(writer, 2)
    assert not writer.flush(SAFETY)
    assert handler.count == 1
    assert not writer.flush(SAFETY)
    assert handler.count == 2  # once per flush, not twice
    handler.answer = True
    assert writer.flush(SAFETY)
    assert handler.count == 3 and not writer.overflowed


def test_without_a_handler_the_layer_stays_unread_until_one_is_set(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    writer = make_writer(DownLayer(), max_repairs=1, retry_delay=0.01, max_retry_delay=0.01)
    overflow(writer, 2)
    assert not writer.flush(SAFETY) and writer.holds("x")
    with pytest.raises(ConfigError, match="overflow_handler"):
        writer.overflow_handler = 3  # type: ignore[assignment]
    handler = Handler(answer=True)
    writer.overflow_handler = handler
    assert handler.calls.get(timeout=SAFETY) == 1  # the rounds start on their own
    assert writer.flush(SAFETY) and not writer.holds("x")


def test_a_repair_that_arrives_while_the_handler_runs_is_kept_key_by_key(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    """The handler may have acted before that write failed: the layer may keep an older
    value of the key, so it still owes a delete once the overflow ends."""
    layer = DownLayer()
    handler = Handler(answer=True)
    handler.gate = threading.Event()
    writer = make_writer(
        layer, max_repairs=1, retry_delay=0.01, max_retry_delay=0.01, on_overflow=handler
    )
    overflow(writer, 2)
    assert handler.entered.wait(SAFETY)  # the round is running
    assert writer.repair("late")
    assert writer.stats().repairing == 1 and writer.holds("late")
    layer.down = False
    handler.gate.set()
    assert writer.flush(SAFETY)
    assert not writer.overflowed and not writer.holds("late")
    assert layer.ops_of("late") == ["delete"] and layer.ops_of("k0") == []


def test_a_handler_that_raises_is_logged_and_leaves_the_writer_overflowed(
    make_writer: Callable[..., AsyncWriter], caplog: pytest.LogCaptureFixture
) -> None:
    handler = Handler(answer=RuntimeError("boom"))
    writer = make_writer(
        DownLayer(), max_repairs=1, retry_delay=600, max_retry_delay=600, on_overflow=handler
    )
    overflow(writer, 2)
    with caplog.at_level(logging.WARNING, logger="cachechain.writer"):
        assert not writer.flush(SAFETY)
    assert handler.count == 1 and writer.overflowed
    assert any("overflow handler raised" in r.getMessage() for r in caplog.records)


def test_close_tries_the_overflow_handler_once_more_then_gives_up(
    make_writer: Callable[..., AsyncWriter], caplog: pytest.LogCaptureFixture
) -> None:
    handler = Handler(answer=False)
    writer = make_writer(
        DownLayer(), max_repairs=1, retry_delay=600, max_retry_delay=600, on_overflow=handler
    )
    overflow(writer, 2)
    with caplog.at_level(logging.WARNING, logger="cachechain.writer"):
        writer.close(SAFETY)
    assert handler.count == 1
    assert not writer.overflowed and not writer.holds("x")
    assert any("closed while the layer awaited" in r.getMessage() for r in caplog.records)
    handled = Handler(answer=True)
    other = make_writer(
        DownLayer(), max_repairs=1, retry_delay=600, max_retry_delay=600, on_overflow=handled
    )
    overflow(other, 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cachechain.writer"):
        other.close(SAFETY)
    assert handled.count == 1
    assert not any("closed while" in r.getMessage() for r in caplog.records)


def test_flush_waits_for_an_overflow_round_in_progress(
    make_writer: Callable[..., AsyncWriter],
) -> None:
    """A round in progress when flush is called: flush waits for its end, and calls the
    handler no second time."""
    handler = Handler(answer=True)
    handler.gate = threading.Event()
    writer = make_writer(
        DownLayer(), max_repairs=1, retry_delay=0.01, max_retry_delay=0.01, on_overflow=handler
    )
    overflow(writer, 2)
    assert handler.entered.wait(SAFETY)
    release_when(writer_waits_idle(writer), handler.gate.set)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(writer.flush(SAFETY)))
    flusher.start()
    flusher.join(SAFETY)
    assert result == [True] and handler.count == 1


def writer_waits_idle(writer: AsyncWriter) -> threading.Event:
    """An Event set once some thread waits on the writer's idle condition."""
    waiting = threading.Event()
    condition = writer._idle
    original = condition.wait

    def wait(timeout: float | None = None) -> bool:
        waiting.set()
        return original(timeout)

    condition.wait = wait  # type: ignore[method-assign]
    return waiting


def test_max_repairs_and_the_handler_come_from_the_config() -> None:
    with pytest.raises(ConfigError, match=r"writer\.max_repairs"):
        WriterConfig(max_repairs=0)
    assert WriterConfig().max_repairs == 10_000
    handler = Handler()
    writer = AsyncWriter.from_config(FakeLayer(), WriterConfig(max_repairs=7), on_overflow=handler)
    try:
        assert writer._max_repairs == 7 and writer.overflow_handler is handler
        assert AsyncWriter.from_config(FakeLayer(), WriterConfig()).overflow_handler is None
    finally:
        writer.close(SAFETY)


def test_a_forked_child_starts_without_the_parents_overflow() -> None:
    handler = Handler(answer=False)
    writer = AsyncWriter(
        DownLayer(), max_repairs=1, retry_delay=600, max_retry_delay=600, on_overflow=handler
    )
    try:
        overflow(writer, 2)
        assert writer.overflowed
        writer._after_fork()
        assert not writer.overflowed and not writer.holds("k0")  # the parent handles it
        assert writer.overflow_handler is handler and writer.stats().overflows == 0
    finally:
        writer.close(SAFETY)
