"""Issue 11, the chain's items: a mutation detaches the loads in flight (2), a loader
that asks for its own key is refused at once (7), a bad TTL is refused before anything
changes (8), and close() validates first, lets concurrent callers wait for the same
drain and keeps its deadline (9)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from cachechain import (
    Chain,
    InvalidValueError,
    LayerConfig,
    MemoryLayer,
    ReentrantLoadError,
)
from cachechain.testing import FakeLayer

BAD_TTLS = [float("nan"), float("inf"), -1, 0, True, "10", 10**400, [1]]


# -- 2. a mutation detaches the load in flight -------------------------------------------
@pytest.mark.parametrize("mutation", ["delete", "set", "delete_many", "set_many", "incr"])
def test_a_caller_after_a_mutation_never_gets_a_value_loaded_before_it(mutation: str) -> None:
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    with Chain([l1, l2], coherence=False) as chain:
        started, release = threading.Event(), threading.Event()
        old: list[Any] = []

        def slow_loader() -> str:
            started.set()
            assert release.wait(10)
            return "loaded-before"

        leader = threading.Thread(target=lambda: old.append(chain.get_or_load("k", slow_loader)))
        leader.start()
        assert started.wait(10)
        if mutation == "delete":
            assert chain.delete("k")
        elif mutation == "set":
            assert chain.set("other", 1) and chain.delete("k")
        elif mutation == "delete_many":
            assert chain.delete_many(["k", "x"])
        elif mutation == "set_many":
            assert chain.set_many({"k": "written"}) and chain.delete("k")
        else:
            l2.set("k", 5)
            assert chain.incr("k") == 6
            assert chain.delete("k")
        # Began after the mutation returned: its own load, not the one in flight.
        assert chain.get_or_load("k", lambda: "loaded-after") == "loaded-after"
        release.set()
        leader.join(10)
        assert old == ["loaded-before"]  # the caller that started it still gets it
        assert chain.get("k") == "loaded-after"  # and it was not cached over the new one


def test_clear_detaches_every_load_in_flight() -> None:
    with Chain([MemoryLayer("L1")]) as chain:
        started, release = threading.Event(), threading.Event()

        def slow_loader() -> str:
            started.set()
            assert release.wait(10)
            return "before"

        leader = threading.Thread(target=lambda: chain.get_or_load("k", slow_loader))
        leader.start()
        assert started.wait(10)
        assert chain.clear()
        assert chain.get_or_load("k", lambda: "after") == "after"
        release.set()
        leader.join(10)
        assert chain.get("k") == "after"


# -- 7. a loader that asks for its own key ------------------------------------------------
def test_a_loader_asking_for_its_own_key_is_refused_at_once() -> None:
    with Chain([MemoryLayer("L1")]) as chain:
        outcome: list[BaseException | str] = []

        def loader() -> str:
            return str(chain.get_or_load("k", loader))

        def run() -> None:
            try:
                outcome.append(chain.get_or_load("k", loader))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(5)
        assert not worker.is_alive(), "get_or_load of its own key hung"
        assert len(outcome) == 1 and isinstance(outcome[0], ReentrantLoadError)
        assert "'k'" in str(outcome[0])
        # Nothing stays stuck: the next caller loads normally.
        assert chain.get_or_load("k", lambda: "fine") == "fine"


def test_a_loader_may_load_other_keys_and_other_threads_still_join() -> None:
    with Chain([MemoryLayer("L1")]) as chain:
        assert chain.get_or_load("outer", lambda: chain.get_or_load("inner", lambda: 1) + 1) == 2
        assert chain.get("inner") == 1


# -- 8. a bad TTL is refused before anything changes --------------------------------------
@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
def test_a_bad_ttl_raises_naming_it_and_changes_nothing(ttl: Any) -> None:
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    with Chain([l1, l2], coherence=False) as chain:
        assert chain.set("k", "old", 60)
        calls = len(l2.calls)
        with pytest.raises(InvalidValueError, match=r"^ttl must be"):
            chain.set("k", "new", ttl)
        with pytest.raises(InvalidValueError, match=r"^ttl must be"):
            chain.set_many({"k": "new"}, ttl)
        with pytest.raises(InvalidValueError, match=r"^ttl must be"):
            chain.get_or_load("absent", lambda: "x", ttl)
        with pytest.raises(InvalidValueError, match=r"^ttl must be"):
            chain.cached(ttl)
        with pytest.raises(InvalidValueError, match=r"^ttl must be"):
            chain.add("fresh", 1, ttl)
        assert len(l2.calls) == calls  # no layer was touched
        assert chain.get("k") == "old" and l1.get("k") == "old"
        assert chain.get("absent") is None and chain.get("fresh") is None


# -- 9. close() ---------------------------------------------------------------------------
@pytest.mark.parametrize("timeout", ["x", -1, float("nan"), None, True])
def test_close_with_a_bad_timeout_raises_and_leaves_the_chain_open(timeout: Any) -> None:
    l2 = FakeLayer("L2")
    chain = Chain([MemoryLayer("L1"), l2], coherence=False)
    with pytest.raises(InvalidValueError, match=r"^timeout must be"):
        chain.close(timeout)
    assert not chain.closed and not l2.closed
    assert chain.set("k", 1) and chain.get("k") == 1
    assert chain.close(1.0) == 0
    assert chain.closed and l2.closed


def test_a_concurrent_close_waits_for_the_same_drain() -> None:
    l2 = FakeLayer("L2")
    gate = threading.Event()
    chain = Chain([MemoryLayer("L1"), LayerConfig(layer=l2, write_behind=True)], coherence=False)
    l2.block_set = gate
    assert chain.set("k", 1)
    assert l2.write_entered.wait(10)  # the writer is stuck in the layer's set
    results: dict[str, Any] = {}
    first_in = threading.Event()

    def close(name: str) -> None:
        if name == "second":
            assert first_in.wait(10)
        else:
            first_in.set()
        results[name] = (chain.close(10.0), l2.closed)

    threads = [threading.Thread(target=close, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    threads[1].join(0.5)
    assert threads[1].is_alive(), "the second close returned while the first still drains"
    gate.set()
    for t in threads:
        t.join(10)
    assert results["first"] == (0, True)
    assert results["second"] == (0, True)  # it returned after the drain: the layer is closed


def test_close_keeps_its_deadline_with_a_stuck_writer_and_busy_threads() -> None:
    l2 = FakeLayer("L2")
    l2.block_set = threading.Event()  # never released: every write-behind set hangs
    chain = Chain([MemoryLayer("L1"), LayerConfig(layer=l2, write_behind=True)], coherence=False)
    for i in range(50):
        chain.set(f"k{i}", i)
    stop = threading.Event()
    barrier = threading.Barrier(17)

    def busy() -> None:
        barrier.wait()
        while not stop.is_set():
            try:
                chain.get("k1")
                chain.set("k2", 2)
            except Exception:
                return

    workers = [threading.Thread(target=busy) for _ in range(16)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.monotonic()
    lost = chain.close(1.0)
    elapsed = time.monotonic() - start
    stop.set()
    for w in workers:
        w.join(10)
    l2.block_set.set()
    assert lost >= 1  # what the stuck writer held was dropped, and counted
    assert elapsed < 1.0 + 0.5, f"close(1.0) took {elapsed:.2f} s"
