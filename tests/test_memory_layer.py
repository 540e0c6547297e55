"""MemoryLayer: bounded LRU with per-entry TTLs on an injected monotonic clock."""

from __future__ import annotations

import threading

import pytest

from cachechain import MISSING, ConfigError, InvalidValueError, MemoryLayer
from cachechain.layers import CacheLayer, SupportsClear, SupportsStats, SupportsTimeout
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


class EvictingLock:
    """A lock that, when taken, first lets another "thread" remove ``key``: the race
    between a read's lock-free membership test and its locked read, made certain."""

    def __init__(self, layer: MemoryLayer, key: str) -> None:
        self.layer, self.key, self.lock, self.armed = layer, key, threading.Lock(), True

    def __enter__(self) -> None:
        if self.armed:
            self.armed = False
            self.layer.delete(self.key)  # takes this lock, disarmed, and releases it
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


@pytest.mark.parametrize("read", ["get", "get_with_ttl"])
def test_a_key_evicted_between_the_membership_test_and_the_read_is_a_miss(read: str) -> None:
    layer = MemoryLayer(maxsize=4)
    layer.set("k", "v", ttl=60)
    real_lock = layer._lock
    racing = EvictingLock(layer, "k")
    racing.lock = real_lock
    layer._lock = racing  # type: ignore[assignment]
    result = getattr(layer, read)("k")
    assert result == (MISSING if read == "get" else (MISSING, None))
    assert not racing.armed  # the race did happen
    layer._lock = real_lock
    assert layer.get("k") is MISSING and len(layer) == 0


def test_a_miss_reads_nothing_under_the_lock() -> None:
    layer = MemoryLayer(maxsize=4)
    layer._lock = None  # type: ignore[assignment]  # taking it would raise
    assert layer.get("absent") is MISSING
    assert layer.get_with_ttl("absent") == (MISSING, None)
