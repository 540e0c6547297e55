"""MemoryLayer: bounded LRU with per-entry TTLs on an injected monotonic clock."""

from __future__ import annotations

import threading

import pytest

from cachechain import MISSING, ConfigError, InvalidValueError, MemoryLayer
from cachechain.layers import CacheLayer, SupportsClear, SupportsStats, SupportsTimeout, _memory
from tests.support.fakes import FakeClock


def test_it_is_a_local_cache_layer() -> None:
    layer = MemoryLayer("L1")
    assert isinstance(layer, CacheLayer)
    assert layer.local is True
    assert layer.name == "L1"
    assert "L1" in repr(layer)


def test_it_reports_stats_and_can_be_cleared() -> None:
    layer = MemoryLayer("L1", maxsize=10)
    assert isinstance(layer, SupportsStats)
    assert isinstance(layer, SupportsClear)
    assert not isinstance(layer, SupportsTimeout)
    layer.set("k", 1)
    assert layer.stats().entries == 1
    layer.clear()
    assert layer.stats().entries == 0


def test_entries_expire_on_their_own_ttl() -> None:
    clock = FakeClock()
    layer = MemoryLayer("L1", clock=clock, default_ttl=10)
    layer.set("short", 1, 5)
    layer.set("default", 2)
    clock.advance(4.9)
    assert layer.get_with_ttl("short") == (1, pytest.approx(0.1))
    clock.advance(0.1)
    assert layer.get_with_ttl("short") == (MISSING, None)
    assert layer.get("short") is MISSING
    assert layer.get("default") == 2
    clock.advance(5)
    assert layer.get_many_with_ttl(["default"]) == {}
    assert len(layer) == 0, "expired entries are removed when read"


def test_no_ttl_means_no_expiry_and_max_ttl_caps_every_ttl() -> None:
    clock = FakeClock()
    forever = MemoryLayer("A", clock=clock, default_ttl=None)
    forever.set("k", 1)
    clock.advance(10**9)
    assert forever.get_with_ttl("k") == (1, None)
    assert forever.get_many_with_ttl(["k"]) == {"k": (1, None)}
    capped = MemoryLayer("B", clock=clock, max_ttl=5)
    capped.set("k", 1, 3600)
    assert capped.get_with_ttl("k")[1] == pytest.approx(5)
    capped.set_many({"a": 1}, ttl=3600)
    assert capped.get_many_with_ttl(["a"])["a"][1] == pytest.approx(5)


def test_the_least_recently_used_entry_is_evicted_and_counted() -> None:
    layer = MemoryLayer("L1", maxsize=2)
    layer.set("a", 1)
    layer.set("b", 2)
    assert layer.get("a") == 1  # a is now the most recently used
    layer.set("c", 3)
    assert layer.get("b") is MISSING
    assert layer.get_many(["a", "c"]) == {"a": 1, "c": 3}
    stats = layer.stats()
    assert (stats.entries, stats.maxsize, stats.evictions) == (2, 2, 1)


def test_delete_clear_and_expire() -> None:
    clock = FakeClock()
    layer = MemoryLayer("L1", clock=clock)
    layer.set_many({"a": 1, "b": 2, "c": 3}, ttl=10)
    layer.set("d", 4, 100)
    layer.delete("a")
    layer.delete("absent")
    layer.delete_many(["b", "absent"])
    assert layer.get_many(["a", "b", "c", "d"]) == {"c": 3, "d": 4}
    clock.advance(20)
    assert layer.expire() == 1
    assert len(layer) == 1
    layer.clear()
    assert len(layer) == 0


def test_an_expired_read_does_not_remove_a_value_written_since() -> None:
    clock = FakeClock()
    layer = MemoryLayer("L1", clock=clock)
    layer.set("k", "old", 1)
    old = layer._data["k"]
    clock.advance(2)
    layer.set("k", "new", 10)
    layer._drop_if_same("k", old)  # what a reader of the expired "old" would do
    assert layer.get("k") == "new"


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan"), "10", True])
def test_a_bad_ttl_is_refused(ttl: object) -> None:
    with pytest.raises(InvalidValueError, match="ttl"):
        MemoryLayer("L1").set("k", 1, ttl)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"maxsize": 0}, "maxsize"),
        ({"maxsize": 1.5}, "maxsize"),
        ({"default_ttl": -1}, "default_ttl"),
        ({"max_ttl": 0}, "max_ttl"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        MemoryLayer(**kwargs)  # type: ignore[arg-type]


def test_concurrent_writers_and_readers_keep_it_bounded_and_consistent() -> None:
    layer = MemoryLayer("L1", maxsize=50)
    barrier = threading.Barrier(8)
    bad: list[object] = []

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(3000):
            key = f"k{(n * 13 + i) % 120}"
            if i % 3:
                value = layer.get(key)
                if value is not MISSING and not value.startswith(key + "="):
                    bad.append(value)
            else:
                layer.set(key, f"{key}={n}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert bad == []
    assert len(layer) <= 50
    assert layer.stats().evictions > 0


def test_a_hit_never_waits_for_the_lock() -> None:
    """Reads take no lock (issue 14): with the lock held elsewhere for the whole time,
    every read answers, and the read buffer stays bounded."""
    layer = MemoryLayer(maxsize=4)
    layer.set("k", "v", ttl=60)
    answered: list[object] = []
    done = threading.Event()

    def reads() -> None:
        for _ in range(3 * _memory._READS_KEPT):
            answered.append(layer.get("k"))
            answered.append(layer.get_with_ttl("k")[0])
            answered.append(layer.get_fresh("k")[0])
        answered.append(layer.get_many_with_ttl(["k", "absent"])["k"][0])
        done.set()

    assert layer._lock.acquire()  # a writer that does not let go meanwhile
    reader = threading.Thread(target=reads)
    try:
        reader.start()
        assert done.wait(10), "a read waited for the lock"
        assert len(layer._reads) <= _memory._READS_KEPT
    finally:
        layer._lock.release()
        reader.join(10)
    assert set(answered) == {"v"} and len(answered) == 9 * _memory._READS_KEPT + 1


def test_reads_are_replayed_into_the_lru_order_before_a_write_evicts() -> None:
    """A key read since the last replay is recent for the next eviction: the writer
    replays the read buffer before it writes."""
    layer = MemoryLayer(maxsize=3)
    for key in ("a", "b", "c"):
        layer.set(key, key)
    assert layer.get("a") == "a"  # buffered, not yet replayed (fewer than _REPLAY_AT)
    assert list(layer._reads) == ["a"]
    layer.set("d", "d")  # replays, then evicts the least recent: b, not a
    assert layer.get("a") == "a" and layer.get("b") is MISSING
    assert layer.stats().evictions == 1


def test_a_reader_replays_a_full_buffer_when_the_lock_is_free() -> None:
    layer = MemoryLayer(maxsize=3)
    for key in ("a", "b", "c"):
        layer.set(key, key)
    for _ in range(_memory._REPLAY_AT - 1):
        layer.get("a")
    assert len(layer._reads) == _memory._REPLAY_AT - 1 and next(iter(layer._order)) == "a"
    layer.get("b")  # the 64th read: replayed, each key moved once (a, then b)
    assert len(layer._reads) == 0
    assert list(layer._order) == ["c", "a", "b"]


def test_a_miss_reads_nothing_under_the_lock() -> None:
    layer = MemoryLayer(maxsize=4)
    layer._lock = None  # type: ignore[assignment]  # taking it would raise
    assert layer.get("absent") is MISSING
    assert layer.get_with_ttl("absent") == (MISSING, None)


def test_fill_many_stores_each_item_with_its_own_ttl() -> None:
    clock = FakeClock()
    layer = MemoryLayer(maxsize=3, default_ttl=100.0, max_ttl=50.0, clock=clock)
    layer.set("old", 0)
    layer.fill_many([("a", 1, 10.0), ("b", 2, None), ("c", 3, 500.0)])
    assert layer.get_with_ttl("a") == (1, 10.0)
    assert layer.get_with_ttl("b") == (2, 50.0)  # the default, capped by max_ttl
    assert layer.get_with_ttl("c") == (3, 50.0)  # capped
    assert layer.get("old") is MISSING and layer.stats().evictions == 1  # LRU evicted
    with pytest.raises(InvalidValueError):
        layer.fill_many([("d", 4, float("nan"))])
    assert layer.get("d") is MISSING


def test_a_batch_fill_keeps_cachetools_consistent() -> None:
    """``fill_many`` writes straight into cachetools' dict, order and count (where it
    keeps no sizes): cachetools' own operations must still agree with it."""
    layer = MemoryLayer(maxsize=4, default_ttl=None)
    layer.set("a", 1)
    layer.set("b", 2)
    layer.fill_many([("c", 3, None), ("a", 10, None), ("d", 4, None), ("e", 5, None)])
    data = layer._data
    assert data.currsize == len(data) == 4  # b (the least recent) made room for e
    assert list(layer._order) == ["c", "a", "d", "e"] and layer.get("b") is MISSING
    assert layer.get("a") == 10 and layer.stats().evictions == 1
    layer.set("f", 6)  # cachetools' own __setitem__ evicts the least recent, c
    assert layer.get("c") is MISSING and data.currsize == len(data) == 4
    layer.delete("d")
    assert data.currsize == len(data) == 3
    layer.fill_many([(f"k{i}", i, None) for i in range(10)])
    assert data.currsize == len(data) == 4 and layer.stats().evictions == 2 + 9


def test_a_set_keeps_cachetools_consistent() -> None:
    """``set`` writes straight into cachetools' dict, order and count too."""
    layer = MemoryLayer(maxsize=2, default_ttl=None)
    data = layer._data
    for key in ("a", "b", "a", "c", "d"):
        layer.set(key, key)
        assert data.currsize == len(data) == len(layer._order) <= 2
    assert list(layer._order) == ["c", "d"] and layer.stats().evictions == 2
    layer.delete("c")
    layer.set_many({"e": 1, "f": 2})  # cachetools' own __setitem__: evicts d
    assert list(layer._order) == ["e", "f"] and data.currsize == 2


def test_add_replays_the_reads_before_it_evicts() -> None:
    """Found by review: ``add`` evicted without the reads since the last replay."""
    layer = MemoryLayer(maxsize=2, default_ttl=None)
    layer.set("a", 1)
    layer.set("b", 2)
    assert layer.get("a") == 1  # read: recent
    assert layer.add("c", 3)
    assert list(layer._order) == ["a", "c"] and layer.get("b") is MISSING
