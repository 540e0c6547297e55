"""The chain's behaviours from the seed: fallback, backfill, single flight, failures."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest

from cachechain import (
    MISSING,
    Chain,
    ChainClosedError,
    ChainConfig,
    ConfigError,
    InvalidKeyError,
    LayerConfig,
    LayerUnavailableError,
    LoadTimeoutError,
    MemoryLayer,
    WriterConfig,
)
from cachechain.metrics import MetricsCollector
from cachechain.metrics._memory import MemoryCollector
from tests.support.fakes import FakeClock, FakeLayer, wait_for_waiters


def memory_chain(n: int, **kw: Any) -> tuple[Chain, list[MemoryLayer]]:
    layers = [MemoryLayer(f"L{i + 1}") for i in range(n)]
    return Chain(layers, **kw), layers


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_fallback_finds_the_value_in_any_layer_and_backfills_the_ones_above(n: int) -> None:
    chain, layers = memory_chain(n)
    with chain:
        for depth in range(n):
            key = f"k{depth}"
            layers[depth].set(key, depth, 60)
            assert chain.get(key) == depth
            assert chain.flush(5)
            for upper in range(depth):
                assert layers[upper].get(key) == depth, (upper, depth)
            for lower in range(depth + 1, n):
                assert layers[lower].get(key) is MISSING
        assert chain.get("absent") is None
        assert chain.get("absent", "dflt") == "dflt"


def test_backfill_uses_the_remaining_ttl() -> None:
    clock = FakeClock()
    l1 = MemoryLayer("L1", clock=clock)
    l2 = FakeLayer("L2", local=True, clock=clock)
    with Chain([l1, l2]) as chain:
        l2.set("k", "v", 100)
        clock.advance(40)
        assert chain.get("k") == "v"
        value, ttl = l1.get_with_ttl("k")
        assert value == "v" and ttl == pytest.approx(60)
        clock.advance(61)
        assert l1.get("k") is MISSING


def test_backfill_never_exceeds_the_upper_layers_max_ttl() -> None:
    clock = FakeClock()
    l1 = MemoryLayer("L1", clock=clock, max_ttl=5)
    l2 = FakeLayer("L2", local=True, clock=clock)
    with Chain([l1, l2]) as chain:
        l2.set("k", "v", 100)
        assert chain.get("k") == "v"
        assert l1.get_with_ttl("k")[1] == pytest.approx(5)


def test_a_value_without_expiry_is_backfilled_with_the_upper_layers_default() -> None:
    clock = FakeClock()
    l1 = MemoryLayer("L1", clock=clock, default_ttl=30)
    l2 = FakeLayer("L2", local=True, clock=clock)
    with Chain([l1, l2]) as chain:
        l2.set("k", "v")  # no TTL: never expires
        assert chain.get("k") == "v"
        assert l1.get_with_ttl("k")[1] == pytest.approx(30)


def test_backfill_into_lower_upper_layers_goes_through_their_writers() -> None:
    l1, l2, l3 = MemoryLayer("L1"), FakeLayer("L2"), FakeLayer("L3")
    with Chain([l1, l2, l3], coherence=False) as chain:
        l3.set("k", "v", 60)
        assert chain.get("k") == "v"
        assert chain.flush(5)
        assert l2.get("k") == "v"
        assert chain.writers["L2"].stats().written == 1


def test_a_failing_layer_is_skipped_as_a_miss_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    l1, l2, l3 = MemoryLayer("L1"), FakeLayer("L2"), FakeLayer("L3")
    l3.set("k", "v", 60)
    l2.fail = LayerUnavailableError("down")
    with (
        Chain([l1, l2, l3], breaker=None, coherence=False) as chain,
        caplog.at_level(logging.DEBUG),
    ):
        assert chain.get("k") == "v"
        l1.delete("k")
        # L2 also failed to take the backfill of "k": its writer holds a repair delete
        # of "k", so the chain no longer reads "k" there at all.
        assert chain.writers["L2"].holds("k")
        assert chain.get("k") == "v"
        assert chain.get("other", 7) == 7
        assert chain.get("other", 7) == 7
    failures = [r for r in caplog.records if "'L2' failed on get" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_a_layer_raising_anything_never_reaches_the_caller() -> None:
    l1, l2 = FakeLayer("L1", local=True), FakeLayer("L2", local=True)
    l1.fail = RuntimeError("boom")
    l2.set("k", "v", 60)
    with Chain([l1, l2]) as chain:
        assert chain.get("k") == "v"
        assert chain.get_many(["k", "x"]) == {"k": "v"}
        assert chain.set("k2", 1) is False
        assert l2.get("k2") == 1
        assert chain.delete("k2") is False
        assert l2.get("k2") is MISSING


def test_set_and_delete_reach_every_layer() -> None:
    chain, layers = memory_chain(3)
    with chain:
        assert chain.set("k", {"a": 1}, ttl=30) is True
        assert all(layer.get("k") == {"a": 1} for layer in layers)
        assert chain.delete("k") is True
        assert all(layer.get("k") is MISSING for layer in layers)
        assert chain.set_many({"a": 1, "b": 2}) is True
        assert all(layer.get_many(["a", "b"]) == {"a": 1, "b": 2} for layer in layers)
        assert chain.delete_many(["a", "b"]) is True
        assert all(layer.get_many(["a", "b"]) == {} for layer in layers)


def test_delete_cancels_a_queued_backfill() -> None:
    l1, l2, l3 = MemoryLayer("L1"), FakeLayer("L2"), FakeLayer("L3")
    with Chain([l1, l2, l3], coherence=False) as chain:
        writer = chain.writers["L2"]
        gate = l2.block_set = threading.Event()
        l3.set("busy", 1, 60)
        l3.set("k", "old", 60)
        assert chain.get("busy") == 1  # the writer's worker now blocks on `busy`
        assert chain.get("k") == "old"  # backfill of k queued behind it
        assert writer.stats().depth >= 1
        assert chain.delete("k") is True
        gate.set()
        assert chain.flush(5)
        assert l2.data.get("k") is None
        assert l3.data.get("k") is None
        assert l1.get("k") is MISSING


def test_a_delete_during_a_read_prevents_the_stale_backfill() -> None:
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2", local=True)
    l2.set("k", "old", 60)
    gate = l2.block_get = threading.Event()
    with Chain([l1, l2]) as chain:
        results: list[Any] = []
        reader = threading.Thread(target=lambda: results.append(chain.get("k")))
        reader.start()
        assert l2.entered.wait(5)  # the reader has read "old" from L2
        assert chain.delete("k") is True
        gate.set()
        reader.join(5)
        assert results == ["old"]
        assert l1.get("k") is MISSING, "the stale value was backfilled after the delete"


def test_get_many_asks_each_layer_only_for_what_the_layers_above_missed() -> None:
    l1 = MemoryLayer("L1")
    l2, l3 = FakeLayer("L2", local=True), FakeLayer("L3", local=True)
    l1.set("a", 1)
    l2.set("b", 2)
    l3.set("c", 3)
    with Chain([l1, l2, l3]) as chain:
        assert chain.get_many(["a", "b", "c", "d", "a"]) == {"a": 1, "b": 2, "c": 3}
        assert l2.ops("get_many") == [["b", "c", "d"]]
        assert l3.ops("get_many") == [["c", "d"]]
        assert l1.get_many(["b", "c"]) == {"b": 2, "c": 3}  # backfilled
        assert chain.flush(5)
        assert l2.data["c"][0] == 3


def test_get_or_load_runs_the_loader_once_for_64_threads() -> None:
    chain, _ = memory_chain(2)
    calls = []
    release = threading.Event()

    def loader() -> str:
        calls.append(1)
        release.wait(10)
        return "loaded"

    results: list[Any] = []
    barrier = threading.Barrier(64)

    def worker() -> None:
        barrier.wait()
        results.append(chain.get_or_load("k", loader, ttl=60))

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    wait_for_waiters(chain, "k", 63)
    release.set()
    for t in threads:
        t.join(10)
    assert calls == [1]
    assert results == ["loaded"] * 64
    assert chain.get("k") == "loaded"
    chain.close()


def test_a_raising_loader_releases_every_waiter_and_caches_nothing() -> None:
    chain, _ = memory_chain(2)
    release = threading.Event()
    calls = []

    class LoadFailed(Exception):
        pass

    def loader() -> str:
        calls.append(1)
        release.wait(10)
        raise LoadFailed("db down")

    errors: list[BaseException] = []
    barrier = threading.Barrier(64)

    def worker() -> None:
        barrier.wait()
        try:
            chain.get_or_load("k", loader)
        except LoadFailed as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    wait_for_waiters(chain, "k", 63)
    release.set()
    for t in threads:
        t.join(10)
    assert calls == [1]
    assert len(errors) == 64
    assert chain._flight.in_flight() == 0
    assert chain.get("k", MISSING) is MISSING
    assert chain.get_or_load("k", lambda: "second") == "second"
    chain.close()


def test_a_waiter_with_its_own_timeout_gives_up_and_the_load_goes_on() -> None:
    chain, _ = memory_chain(1)
    started, release = threading.Event(), threading.Event()

    def loader() -> str:
        started.set()
        release.wait(10)
        return "late"

    leader = threading.Thread(target=lambda: chain.get_or_load("k", loader))
    leader.start()
    assert started.wait(5)
    with pytest.raises(LoadTimeoutError):
        chain.get_or_load("k", loader, wait_timeout=0.01)
    release.set()
    leader.join(5)
    assert chain.get("k") == "late"
    assert chain._flight.in_flight() == 0
    chain.close()


def test_a_loader_returning_none_is_cached() -> None:
    chain, _ = memory_chain(2)
    calls = []
    with chain:
        for _ in range(3):
            assert chain.get_or_load("k", lambda: calls.append(1)) is None
        assert calls == [1]


def test_a_loaded_value_is_not_cached_when_the_key_is_deleted_during_the_load() -> None:
    chain, layers = memory_chain(2)
    with chain:

        def loader() -> str:
            chain.delete("k")  # e.g. the row was updated while we read it
            return "stale"

        assert chain.get_or_load("k", loader) == "stale"
        assert chain.flush(5)
        assert all(layer.get("k") is MISSING for layer in layers)


def test_cached_decorator_and_invalidate() -> None:
    chain, _ = memory_chain(2)
    calls: list[tuple[int, int]] = []

    @chain.cached(ttl=60)
    def add(a: int, b: int = 0) -> int:
        calls.append((a, b))
        return a + b

    with chain:
        assert add(1, b=2) == 3
        assert add(1, b=2) == 3
        assert add(2) == 2
        assert calls == [(1, 2), (2, 0)]
        add.invalidate(1, b=2)  # type: ignore[attr-defined]
        assert add(1, b=2) == 3
        assert calls == [(1, 2), (2, 0), (1, 2)]
        assert "add(1, b=2)" in add.cache_key(1, b=2)  # type: ignore[attr-defined]

    @chain.cached(key=lambda user: f"user:{user}")
    def profile(user: str) -> str:
        return user.upper()

    assert profile.cache_key("bob") == "user:bob"  # type: ignore[attr-defined]


def test_invalid_keys_are_refused_with_a_clear_error() -> None:
    chain, _ = memory_chain(2)
    with chain:
        with pytest.raises(InvalidKeyError, match="must be str, got int"):
            chain.get(42)  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError, match="unhashable list"):
            chain.get(["a"])  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            chain.set(b"k", 1)  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            chain.get_many("abc")
        with pytest.raises(InvalidKeyError):
            chain.delete_many("abc")
        with pytest.raises(InvalidKeyError):
            chain.get_many(["ok", 3])  # type: ignore[list-item]
        # An unhashable key in a batch raised a bare TypeError (found by a review).
        with pytest.raises(InvalidKeyError, match="unhashable list"):
            chain.get_many([["k"]])  # type: ignore[list-item]
        with pytest.raises(InvalidKeyError, match="unhashable list"):
            chain.delete_many(["k", ["k"]])  # type: ignore[list-item]
        with pytest.raises(InvalidKeyError, match="unhashable list"):
            chain.get_many(k for k in ["a", ["b"]])  # type: ignore[misc]


def test_an_empty_chain_and_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least one layer"):
        Chain([])
    with pytest.raises(ConfigError, match="unique"):
        Chain([MemoryLayer("L1"), MemoryLayer("L1")])
    with pytest.raises(ConfigError, match="sequence"):
        Chain("L1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="name"):
        Chain([MemoryLayer()], name="")
    with pytest.raises(ConfigError, match="ChainConfig"):
        Chain.from_config([MemoryLayer()])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="CacheLayer"):
        LayerConfig(layer="nope")  # type: ignore[arg-type]


def test_a_closed_chain_refuses_every_call() -> None:
    chain, _ = memory_chain(2)
    chain.set("k", 1)
    assert chain.close() == 0
    assert chain.close() == 0
    assert chain.closed
    for call in (
        lambda: chain.get("k"),
        lambda: chain.get("absent"),
        lambda: chain.get_many(["k"]),
        lambda: chain.set("k", 2),
        lambda: chain.delete("k"),
        lambda: chain.set_many({"k": 2}),
        lambda: chain.delete_many(["k"]),
        lambda: chain.get_or_load("k", lambda: 1),
    ):
        with pytest.raises(ChainClosedError):
            call()


def test_from_config_builds_the_same_chain() -> None:
    l1, l2 = MemoryLayer("L1"), MemoryLayer("L2")
    l2.set("key", "value", 60)
    chain = Chain.from_config(ChainConfig(layers=[l1, LayerConfig(layer=l2)], name="web"))
    with chain:
        assert chain.name == "web"
        assert chain.get("key") == "value"
        assert [lay.name for lay in chain.layers] == ["L1", "L2"]
        assert "web" in repr(chain)


def test_remote_layers_are_wrapped_in_a_breaker_and_local_ones_are_not() -> None:
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    with Chain([l1, l2]) as chain:
        assert set(chain.breakers) == {"L2"}
    l3 = FakeLayer("L3")
    with Chain([MemoryLayer("A"), LayerConfig(layer=l3, resilient=False)]) as chain:
        assert chain.breakers == {}


@pytest.mark.parametrize("timeout", [None, 0.05], ids=["waits", "queues-behind"])
def test_a_delete_is_not_overtaken_by_a_backfill_already_in_flight(
    timeout: float | None,
) -> None:
    """The writer is writing an old value into L2 when the key is deleted: the delete
    either waits for that write (settle) or, past the layer's timeout, is queued behind
    it. Either way L2 ends without the key."""
    l1, l2, l3 = MemoryLayer("L1"), FakeLayer("L2"), FakeLayer("L3")
    entered, release = l2.write_entered, threading.Event()
    l2.block_set = release
    l3.set("k", "old", 60)
    with Chain([l1, LayerConfig(layer=l2, timeout=timeout), l3], coherence=False) as chain:
        assert chain.get("k") == "old"
        assert entered.wait(5)  # the backfill of "old" into L2 is in flight
        done = threading.Event()
        deleter = threading.Thread(target=lambda: (chain.delete("k"), done.set()))
        deleter.start()
        if timeout is None:
            assert not done.wait(0.05)  # the delete waits for the write in flight
        else:
            assert done.wait(5)  # it gave up waiting and queued itself behind
        release.set()
        deleter.join(5)
        assert chain.flush(5)
        assert "k" not in l2.data
        assert "k" not in l3.data
        assert l1.get("k") is MISSING


class ClosingCollector(MemoryCollector):
    """A collector with close(), built by name through a config mapping."""

    made: ClassVar[list[ClosingCollector]] = []

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        ClosingCollector.made.append(self)

    def close(self) -> None:
        self.closed = True


def test_from_config_takes_a_mapping_and_closes_the_collector_it_made() -> None:
    ClosingCollector.made.clear()
    config = {
        "name": "web",
        "layers": [{"type": "memory", "name": "L1"}, {"type": "memory", "name": "L2"}],
        "metrics": {"exporter": "tests.test_chain:ClosingCollector"},
    }
    chain = Chain.from_config(config)
    chain.set("k", 1)
    assert chain.get("k") == 1
    (collector,) = ClosingCollector.made
    assert collector.snapshot().chain_metrics.total_hits == 1
    chain.close()
    assert collector.closed
    with pytest.raises(ConfigError, match="layers"):
        Chain.from_config({"layers": []})


def test_a_collector_given_by_the_caller_is_not_closed_by_the_chain() -> None:
    collector = ClosingCollector()
    Chain.from_config(ChainConfig(layers=[MemoryLayer()], metrics_collector=collector)).close()
    assert not collector.closed


@pytest.mark.parametrize("read", ["get", "get_many"])
@pytest.mark.parametrize("state", ["in-flight", "queued"])
def test_a_read_never_backfills_a_value_whose_delete_the_writer_still_holds(
    state: str, read: str
) -> None:
    """A write-behind delete has returned, but its writer has not deleted the key from
    L2 yet. A read meanwhile may still find the old value in L2; it must not copy it
    into L1, where it would outlive the delete."""
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    entered, release = l2.write_entered, threading.Event()
    l2.set("k", "old", 60)
    l2.block_delete = release
    with Chain([l1, LayerConfig(layer=l2, write_behind=True)], coherence=False) as chain:
        if state == "queued":  # the worker is busy deleting another key
            assert chain.delete("other") is True
        assert chain.delete("k") is True
        assert entered.wait(5)
        if read == "get":  # may still see "old" in L2 (write-behind)
            assert chain.get("k") in (None, "old")
        else:
            assert chain.get_many(["k"]) in ({}, {"k": "old"})
        release.set()
        assert chain.flush(5)
        assert "k" not in l2.data
        assert l1.get("k") is MISSING, "the old value was backfilled after the delete"
        assert chain.get("k") is None


def test_a_read_never_backfills_an_older_value_than_a_queued_write_behind_set() -> None:
    """A write-behind set is still on its way to L2 when L1 loses the entry: a read
    meanwhile must not put L2's older value back into L1."""
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    entered, release = l2.write_entered, threading.Event()
    l2.block_set = release
    l2.data["k"] = ("old", None)
    with Chain([l1, LayerConfig(layer=l2, write_behind=True)]) as chain:
        assert chain.set("k", "new", 60) is True
        assert entered.wait(5)
        l1.delete("k")  # evicted or expired in L1
        chain.get("k")
        release.set()
        assert chain.flush(5)
        assert chain.get("k") == "new"


def test_a_read_never_copies_into_l2_a_value_whose_delete_l3_still_holds() -> None:
    """L2 was deleted synchronously, L3's delete is queued: a read that finds the old
    value in L3 must not write it back into L2 (where nothing would delete it again)."""
    l1, l2, l3 = MemoryLayer("L1"), FakeLayer("L2"), FakeLayer("L3")
    entered, release = l3.write_entered, threading.Event()
    l2.set("k", "old", 60)
    l3.set("k", "old", 60)
    l3.block_delete = release
    with Chain([l1, l2, LayerConfig(layer=l3, write_behind=True)], coherence=False) as chain:
        assert chain.delete("k") is True
        assert entered.wait(5)
        assert chain.get("k") in (None, "old")
        release.set()
        assert chain.flush(5)
        assert "k" not in l3.data
        assert "k" not in l2.data, "the old value was copied into L2 after the delete"
        assert chain.get("k") is None


@pytest.mark.parametrize("call", ["set", "set_many"])
def test_a_set_dropped_by_a_full_queue_leaves_no_older_value_below(call: str) -> None:
    """A write-behind set that finds the queue full is dropped (and reported); the older
    value in L2 must not outlive it, or every reader after L1 expires gets it back."""
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    entered, release = l2.write_entered, threading.Event()
    l2.block_set = release
    l2.data["k"] = ("old", None)
    config = LayerConfig(layer=l2, write_behind=True, writer=WriterConfig(queue_size=1))
    with Chain([l1, config], coherence=False) as chain:
        assert chain.set("busy", 1) is True  # in flight
        assert entered.wait(5)
        assert chain.set("full", 2) is True  # queued: the queue is full
        if call == "set":
            assert chain.set("k", "new") is False
        else:
            assert chain.set_many({"k": "new"}) is False
        assert chain.writers["L2"].stats().dropped_by_reason["queue_full"] == 1
        release.set()
        assert chain.flush(5)
        assert "k" not in l2.data, "the older value outlived the dropped set"
        l1.delete("k")  # expired in L1
        assert chain.get("k") is None


def test_refreshes_running_at_once_report_each_eviction_once() -> None:
    """Collectors call the chain's refresh hook from any thread (two scrapes at once):
    an eviction must be reported once, not once per refresh that saw it."""
    entered, release = threading.Event(), threading.Event()

    class Evictions(MetricsCollector):
        def __init__(self) -> None:
            self.reported: list[int] = []

        def record_evictions(self, layer: str, count: int) -> None:
            self.reported.append(count)
            if len(self.reported) == 1:  # the first refresh pauses here
                entered.set()
                release.wait(10)

    collector = Evictions()
    l1 = MemoryLayer("L1", maxsize=1)
    with Chain([l1], metrics=collector) as chain:
        l1.set("a", 1)
        l1.set("b", 2)  # evicts "a"
        first = threading.Thread(target=chain._refresh_metrics)
        first.start()
        assert entered.wait(5)
        second = threading.Thread(target=chain._refresh_metrics)
        second.start()
        second.join(5)
        assert not second.is_alive()
        release.set()
        first.join(5)
    assert sum(collector.reported) == 1


def test_a_failing_first_layer_is_counted_as_an_error_not_also_as_a_miss() -> None:
    collector = MemoryCollector()
    l1, l2 = FakeLayer("L1", local=True), MemoryLayer("L2")
    l1.fail = RuntimeError("boom")
    l2.set("k", "v", 60)
    with Chain([l1, l2], metrics=collector) as chain:
        assert chain.get("k") == "v"
        snap = collector.snapshot()
        assert snap.layer_metrics["L1"].errors == 2  # the get, then the backfill set
        assert snap.layer_metrics["L1"].misses == 0
        assert snap.layer_metrics["L2"].hits == 1
        assert snap.chain_metrics.total_hits == 1


def test_a_collector_whose_add_refresh_hook_raises_does_not_stop_the_chain() -> None:
    class NoHooks(MemoryCollector):
        def add_refresh_hook(self, fn: Any) -> None:
            raise RuntimeError("no hooks here")

    with Chain([MemoryLayer("L1")], metrics=NoHooks()) as chain:
        chain.set("k", 1)
        assert chain.get("k") == 1
        assert chain._m is not None and chain._m.failures == 1


class ClosingLayer(MemoryLayer):
    """A layer that remembers being closed, built by type from a config mapping."""

    made: ClassVar[list[ClosingLayer]] = []

    def __init__(self, name: str = "L1", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.was_closed = False
        ClosingLayer.made.append(self)

    def close(self) -> None:
        self.was_closed = True


def test_from_config_closes_what_the_mapping_made_when_the_chain_cannot_be_built() -> None:
    ClosingCollector.made.clear()
    ClosingLayer.made.clear()

    class Unbuildable(Chain):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("cannot build")

    config = {
        "layers": [{"type": "tests.test_chain:ClosingLayer", "name": "L1"}],
        "metrics": {"exporter": "tests.test_chain:ClosingCollector"},
    }
    with pytest.raises(RuntimeError, match="cannot build"):
        Unbuildable.from_config(config)
    assert [layer.was_closed for layer in ClosingLayer.made] == [True]
    assert [c.closed for c in ClosingCollector.made] == [True]


def test_get_many_treats_a_malformed_answer_as_a_layer_failure() -> None:
    class Sloppy(FakeLayer):
        def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, Any]]:
            answer = super().get_many_with_ttl(keys)
            answer["never-asked"] = ("x", None)  # extra keys are ignored
            return answer

    class Broken(FakeLayer):
        def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, Any]:
            return {k: "not a pair" for k in keys}

    sloppy, broken, l3 = Sloppy("L2", local=True), Broken("L3", local=True), MemoryLayer("L4")
    sloppy.set("a", 1, 60)
    l3.set("b", 2, 60)
    with Chain([MemoryLayer("L1"), sloppy, broken, l3]) as chain:
        assert chain.get_many(["a", "b"]) == {"a": 1, "b": 2}


# -- a lower layer that misses a write is repaired, and never read stale meanwhile ------


def test_a_delete_a_lower_layer_missed_is_retried_and_its_old_value_never_served() -> None:
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    with Chain([l1, LayerConfig(layer=l2, resilient=False)], coherence=False) as chain:
        assert chain.set("k", "v1", 60) and chain.set("j", "other", 60)
        l2.fail = LayerUnavailableError("down")  # until the end of the checks
        assert chain.delete("k") is False  # L2 could not be reached ...
        assert l2.data["k"][0] == "v1"  # ... and still has the old value
        writer = chain.writers["L2"]
        assert writer.holds("k")
        # Until the repair lands, this chain does not ask L2 for "k" at all.
        calls = len(l2.calls)
        assert chain.get("k", "gone") == "gone"
        assert chain.get_many(["k"]) == {}
        assert [c for c in l2.calls[calls:] if c[0].startswith("get")] == []
        l2.fail = None
        assert chain.flush(10)
        assert "k" not in l2.data and not writer.holds("k")
        l1.delete("j")
        assert chain.get("j") == "other"  # other keys are read from L2 as before


def test_a_set_a_lower_layer_missed_leaves_no_older_value_there() -> None:
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    with Chain([l1, LayerConfig(layer=l2, resilient=False)], coherence=False) as chain:
        assert chain.set("k", "v1", 60)
        l2.fail = LayerUnavailableError("down")
        assert chain.set("k", "v2", 60) is False
        assert chain.set_many({"a": 1, "b": 2}) is False
        l2.fail = None
        assert chain.get("k") == "v2"  # L1 took it
        l1.clear()  # as if evicted: L2's v1 must not come back
        assert chain.get("k") is None
        assert chain.get_many(["k", "a", "b"]) == {}
        assert chain.flush(10)
        assert l2.get_many(["k", "a", "b"]) == {}
        assert chain.set("k", "v3", 60) and l2.get("k") == "v3"
        l1.clear()
        assert chain.get("k") == "v3"


def test_get_many_reads_a_layer_only_for_the_keys_its_writer_does_not_hold() -> None:
    l1, l2, l3 = MemoryLayer("L1"), FakeLayer("L2"), FakeLayer("L3")
    with Chain(
        [l1, LayerConfig(layer=l2, resilient=False), LayerConfig(layer=l3, resilient=False)],
        coherence=False,
    ) as chain:
        assert chain.set_many({"a": 1, "b": 2}, 60)
        l2.fail = LayerUnavailableError("down")
        assert chain.delete("a") is False  # L3 and L1 lost "a"; L2 kept it
        l1.clear()
        before = len(l2.ops("get_many"))
        assert chain.get_many(["a", "b"]) == {"b": 2}  # "b" from L3: L2 is failing
        assert l2.ops("get_many")[before:] == [["b"]]  # L2 was not asked for "a"
        l2.fail = None
        assert chain.flush(10) and "a" not in l2.data


def test_repairs_waiting_for_a_retry_show_in_their_own_gauge() -> None:
    """Pending repairs are counted apart from the queue depth (issue 13, item 5)."""
    collector = MemoryCollector()
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    with Chain([l1, LayerConfig(layer=l2, resilient=False)], metrics=collector) as chain:
        l2.fail = LayerUnavailableError("down")
        assert chain.delete("a") is False and chain.delete("b") is False
        assert not chain.flush(10)  # both repairs failed again: they wait
        assert chain.writers["L2"].stats().repairing == 2
        layer = collector.snapshot().layer_metrics["L2"]
        assert layer.repairs_pending == 2 and layer.queue_depth == 0
        l2.fail = None
        assert chain.flush(10)
        assert collector.snapshot().layer_metrics["L2"].repairs_pending == 0


def test_repairs_the_chain_asks_for_wait_for_the_writers_retry_round() -> None:
    l1, l2 = MemoryLayer("L1"), FakeLayer("L2")
    slow_retries = WriterConfig(retry_delay=600, max_retry_delay=600)
    with Chain([l1, LayerConfig(layer=l2, resilient=False, writer=slow_retries)]) as chain:
        l2.fail = LayerUnavailableError("down")
        for i in range(50):
            assert chain.set(f"k{i}", i) is False
        # A layer that just failed is not asked again at once, once per key.
        assert l2.ops("delete") == []
        assert chain.writers["L2"].stats().repairing == 50
        l2.fail = None
        assert chain.flush(10)  # flush does not wait for the round
        assert len(l2.ops("delete")) == 50 and chain.writers["L2"].stats().repairing == 0


def test_a_key_held_in_one_layer_is_still_backfilled_into_the_others() -> None:
    l1, l2, l3 = MemoryLayer("L1"), FakeLayer("L2"), FakeLayer("L3")
    layers = [l1, LayerConfig(layer=l2, resilient=False), LayerConfig(layer=l3, resilient=False)]
    with Chain(
        layers, writer=WriterConfig(retry_delay=600, max_retry_delay=600), coherence=False
    ) as chain:
        l2.fail = LayerUnavailableError("down")
        assert chain.set("k", "v", 60) is False  # L3 and L1 took it; L2 holds a repair
        l1.clear()
        reads = len(l3.ops("get"))
        assert chain.get("k") == "v"  # from L3, copied into L1 (not into L2)
        assert chain.get("k") == "v"  # from L1
        assert len(l3.ops("get")) == reads + 1
        assert l2.ops("set") == ["k"]  # only the failed synchronous set
        l1.clear()
        assert chain.get_many(["k"]) == {"k": "v"}  # the same through get_many
        assert l1.get("k") == "v"
        l3.fail = LayerUnavailableError("down")
        assert chain.set("k", "w", 60) is False  # now both L2 and L3 hold a repair
        l1.clear()
        assert chain.get("k") is None and chain.get_many(["k"]) == {}


def test_metrics_collector_is_the_one_given_or_made_by_the_config() -> None:
    collector = MemoryCollector()
    with Chain([MemoryLayer("L1")], metrics=collector) as chain:
        assert chain.metrics_collector is collector
    with Chain([MemoryLayer("L1")]) as chain:
        assert chain.metrics_collector is None
    made = Chain.from_config({"layers": [{"type": "memory"}], "metrics": "memory"})
    assert isinstance(made.metrics_collector, MemoryCollector)
    made.close()


def test_a_batch_backfill_never_overwrites_a_write_made_during_the_read() -> None:
    """``get_many`` backfills a batch in one step (issue 14); a key written while the
    lower layer answered keeps the new value in L1, the others are backfilled."""
    l1 = MemoryLayer("L1")
    chain: Chain

    class Racing(MemoryLayer):
        def get_many_with_ttl(self, keys: Any) -> Any:
            found = super().get_many_with_ttl(keys)
            chain.set("b", "new")  # another thread's write, while the read is out
            return found

    l2 = Racing("L2")
    chain = Chain([l1, l2], coherence=False)
    # A key of another of the fence's 64 stripes than "b" (a write fences its stripe).
    a = next(k for k in (f"a{i}" for i in range(1000)) if hash(k) & 63 != hash("b") & 63)
    try:
        l2.set_many({a: "old a", "b": "old b"})
        assert chain.get_many([a, "b"]) == {a: "old a", "b": "old b"}
        assert l1.get(a) == "old a"  # backfilled
        assert l1.get("b") == "new"  # the write, not the older value read before it
    finally:
        chain.close()


def test_a_backfill_skipped_for_a_write_during_the_read_is_counted() -> None:
    """``cache_chain_backfills_skipped_total{reason="mutated"}`` (issue 13, item 5): a
    value read from L2 while the key was written is not copied into L1, and that is
    counted, by ``get`` and by ``get_many``."""
    collector = MemoryCollector()
    l1 = MemoryLayer("L1")
    chain: Chain

    class Racing(MemoryLayer):
        def get_with_ttl(self, key: str) -> Any:
            found = super().get_with_ttl(key)
            chain.delete(key)  # another thread's write, while the read is out
            return found

        def get_many_with_ttl(self, keys: Any) -> Any:
            found = super().get_many_with_ttl(keys)
            chain.delete("m")
            return found

    l2 = Racing("L2")
    chain = Chain([l1, l2], coherence=False, metrics=collector)
    try:
        l2.set("k", "old")
        assert chain.get("k") == "old" and l1.get("k") is MISSING
        l2.set("m", "old")
        assert chain.get_many(["m"]) == {"m": "old"} and l1.get("m") is MISSING
        layer = collector.snapshot().layer_metrics["L1"]
        assert layer.backfills_skipped_by_reason.get("mutated") == 2
    finally:
        chain.close()
