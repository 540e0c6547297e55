"""A signal handled in a request thread never leaves a lock of cachechain held.

Python runs signal handlers in the main thread, between two bytecodes; a handler that
raises (Ctrl-C, Celery's soft time limit, an alarm-based request timeout) raises there.
``lock.acquire()`` then ``try``/``finally`` has such a point between the acquire and the
``try`` (on 3.11, right as the C call returns): an exception there left the lock held
for good, and every later write of the process hung on it (found by review: 14 of 137
interrupts of ``MemoryLayer.set``, 89 of 225 of ``MutationFence.if_unchanged``). ``with``
has no such point. Each case below calls a function on the main thread while another
thread interrupts it at random moments; the handler raises only when the interrupted
frame is the function's own, and then the lock must be free.
"""

from __future__ import annotations

import _thread
import random
import signal
import threading
import time
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

import pytest

from cachechain import MemoryLayer
from cachechain._fence import MutationFence
from cachechain._journal import MemcachedJournal
from cachechain._namespace import Namespace
from tests.support.fakes import FakeLayer

SECONDS = 1.0  # of interrupts per case


class Interrupted(Exception):
    pass


def interrupted(call: Callable[[], object], codes: set[CodeType], lock: Any) -> tuple[int, int]:
    """Call ``call`` again and again for :data:`SECONDS` under random interrupts; return
    how many raised in one of ``codes`` and how many of those left ``lock`` held."""
    raised = leaked = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        if frame is not None and frame.f_code in codes:
            raise Interrupted

    stop = threading.Event()

    def interrupter() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            stop.wait(rng.random() * 0.0002)
            _thread.interrupt_main()

    previous = signal.signal(signal.SIGINT, handler)
    thread = threading.Thread(target=interrupter, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            try:
                call()
            except Interrupted:
                raised += 1
                if lock.locked():
                    leaked += 1
                    lock.release()
    finally:
        stop.set()
        thread.join()
        for _ in range(3):  # a last interrupt still pending goes to our handler
            time.sleep(0.001)
        signal.signal(signal.SIGINT, previous)
    return raised, leaked


def layer_cases() -> list[tuple[str, Callable[[], object], set[CodeType], Any]]:
    layer = MemoryLayer(maxsize=8, default_ttl=None)
    lock = layer._lock

    def read() -> None:  # fills the read buffer: every 64th read replays it
        for _ in range(64):
            layer.get("k")

    layer.set("k", 1)
    return [
        ("MemoryLayer.set", lambda: layer.set("k", 1), {MemoryLayer.set.__code__}, lock),
        ("MemoryLayer.fill", lambda: layer.fill("k", 1, 5.0), {MemoryLayer.fill.__code__}, lock),
        (
            "MemoryLayer._replay",
            read,
            {MemoryLayer._replay.__code__, MemoryLayer._replay_locked.__code__},
            lock,
        ),
    ]


def fence_cases() -> list[tuple[str, Callable[[], object], set[CodeType], Any]]:
    fence = MutationFence()

    def mutation() -> None:
        stripe = fence.begin("k")
        fence.end(stripe)

    def backfill() -> None:
        fence.if_unchanged(fence.ticket("k"), lambda: None)

    codes = {MutationFence.begin.__code__, MutationFence.end.__code__}
    return [
        ("MutationFence.begin/end", mutation, codes, fence._lock),
        (
            "MutationFence.if_unchanged",
            backfill,
            {MutationFence.if_unchanged.__code__},
            fence._lock,
        ),
    ]


def journal_cases() -> list[tuple[str, Callable[[], object], set[CodeType], Any]]:
    store = FakeLayer("L2")
    journal = MemcachedJournal(store, Namespace(store), interval=0.04, bound=0.1)
    return [
        (
            "MemcachedJournal.publish",
            lambda: journal.publish(["k"]),
            {MemcachedJournal.publish.__code__},
            journal._lock,
        )
    ]


CASES = layer_cases() + fence_cases() + journal_cases()


@pytest.mark.parametrize(("name", "call", "codes", "lock"), CASES, ids=[c[0] for c in CASES])
def test_an_interrupt_never_leaves_the_lock_held(
    name: str, call: Callable[[], object], codes: set[CodeType], lock: Any
) -> None:
    raised, leaked = interrupted(call, codes, lock)
    assert raised > 0, f"{name}: no interrupt landed in the function (the test saw nothing)"
    assert leaked == 0, f"{name}: {leaked} of {raised} interrupts left the lock held"
