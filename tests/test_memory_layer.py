"""MemoryLayer: bounded LRU with per-entry TTLs on an injected monotonic clock."""

from __future__ import annotations

import gc
import sys
import threading
import tracemalloc
from typing import Any

import pytest
from cachetools import LRUCache
from hypothesis import given
from hypothesis import strategies as st

from cachechain import MISSING, ConfigError, InvalidValueError, MemoryLayer
from cachechain.layers import CacheLayer, SupportsClear, SupportsStats, SupportsTimeout, _memory
from cachechain.layers._memory import _LRU
from cachechain.layers._stamps import Stamped
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
    old = layer._entries["k"]
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
    assert len(layer._reads) == _memory._REPLAY_AT - 1 and next(iter(layer._entries)) == "a"
    layer.get("b")  # the 64th read: replayed, each key moved once (a, then b)
    assert len(layer._reads) == 0
    assert list(layer._entries) == ["c", "a", "b"]


def test_a_miss_reads_nothing_under_the_lock() -> None:
    layer = MemoryLayer(maxsize=4)
    layer._lock = None  # type: ignore[assignment]  # taking it would raise
    assert layer.get("absent") is MISSING
    assert layer.get_with_ttl("absent") == (MISSING, None)


def test_fill_many_stores_each_item_with_its_own_ttl() -> None:
    clock = FakeClock()
    layer = MemoryLayer(maxsize=3, default_ttl=100.0, max_ttl=50.0, clock=clock)
    layer.set("old", 0)
    layer.fill_many({"a": (1, 10.0), "b": (2, None), "c": (3, 500.0)})
    assert layer.get_with_ttl("a") == (1, 10.0)
    assert layer.get_with_ttl("b") == (2, 50.0)  # the default, capped by max_ttl
    assert layer.get_with_ttl("c") == (3, 50.0)  # capped
    assert layer.get("old") is MISSING and layer.stats().evictions == 1  # LRU evicted
    with pytest.raises(InvalidValueError):
        layer.fill_many({"d": (4, float("inf"))})
    assert layer.get("d") is MISSING


def test_fill_many_skips_what_has_no_known_time_left() -> None:
    """A lower layer's ``0.0`` (a memcached counter: it cannot tell) or a TTL already
    spent is not copied up: the copy must not outlive its source. The other items of
    the batch are stored."""
    layer = MemoryLayer(maxsize=8, default_ttl=None)
    spent = {"zero": 0.0, "below": -1.0, "nan": float("nan"), "int": 0, "int_below": -3}
    layer.fill_many({**{key: (1, ttl) for key, ttl in spent.items()}, "kept": (2, 10.0)})
    assert all(layer.get(key) is MISSING for key in spent)
    assert layer.get("kept") == 2 and len(layer) == 1


def test_a_batch_read_of_keys_none_held_asks_nothing_else() -> None:
    layer = MemoryLayer(maxsize=8, default_ttl=None)
    layer.set("a", 1)
    assert layer.get_many_with_ttl(["x", "y"]) == {}
    assert layer.get_many_with_ttl(["x", "a", "y"]) == {"a": (1, None)}
    assert layer.get_many_with_ttl(()) == {}
    # Any iterable of keys still reads every key once (a generator is not used up).
    assert layer.get_many_with_ttl(k for k in ("a", "x")) == {"a": (1, None)}  # type: ignore[arg-type]


def test_a_batch_fill_keeps_the_lru_order_and_count() -> None:
    """``fill_many`` puts each item in turn: an existing key moves to the recent end, a
    new one evicts the least recent entry when the layer is full, counted."""
    layer = MemoryLayer(maxsize=4, default_ttl=None)
    layer.set("a", 1)
    layer.set("b", 2)
    layer.fill_many({"c": (3, None), "a": (10, None), "d": (4, None), "e": (5, None)})
    assert len(layer) == 4  # b (the least recent) made room for e
    # a (held) took its new value in place and moved to the recent end before the new
    # keys joined: the batch's items were all used at once.
    assert list(layer._entries) == ["a", "c", "d", "e"] and layer.get("b") is MISSING
    assert layer.get("a") == 10 and layer.stats().evictions == 1
    layer.set("f", 6)  # the least recent now: c (a was just read)
    assert layer.get("c") is MISSING and len(layer) == 4
    layer.delete("d")
    assert len(layer) == 3
    layer.fill_many({f"k{i}": (i, None) for i in range(10)})
    assert list(layer._entries) == ["k6", "k7", "k8", "k9"]
    assert layer.stats().evictions == 2 + 9


@given(
    st.integers(min_value=1, max_value=6),
    st.lists(st.integers(0, 9), max_size=8, unique=True),
    st.lists(st.integers(0, 9), max_size=12, unique=True),
)
def test_a_batch_put_ends_as_puts_in_turn_would(
    maxsize: int, before: list[int], batch: list[int]
) -> None:
    """``_LRU.put_many`` (one step, issue 14) keeps the entries, with their values,
    that a ``put`` of each item in turn keeps: the entries that were there before in
    their order, then the batch's (held keys first: their order among themselves is
    free, as they were all used at once); and it counts as evicted the entries that
    left (puts in turn may count more: a held key evicted, then put again; a batch
    larger than the layer is put in turn)."""
    one_step, in_turn = _LRU(maxsize), _LRU(maxsize)
    for lru in (one_step, in_turn):
        for key in before:
            lru.put(str(key), key)
        lru.evictions = 0
    kept = set(one_step.entries)
    items = {str(key): -key for key in batch}
    one_step.put_many(items)
    for key, item in items.items():
        in_turn.put(key, item)
    assert dict(one_step.entries) == dict(in_turn.entries)
    assert len(one_step.entries) <= maxsize
    order = list(one_step.entries)
    older = [key for key in order if key not in items]
    assert older == [key for key in in_turn.entries if key not in items]
    assert order[: len(older)] == older  # the batch is the most recent
    left = kept | set(items)
    if len(items) > maxsize:  # put item by item
        assert one_step.evictions == in_turn.evictions
    else:
        assert one_step.evictions == len(left) - len(one_step.entries) <= in_turn.evictions


def test_a_batch_rewrite_never_hides_a_held_key_from_a_reader() -> None:
    """Found by review: ``put_many`` deleted the held keys before putting them back,
    so a lock-free reader in between missed a key that was only being rewritten (and
    a chain's load could then overwrite a ``set_many`` that had returned)."""
    layer = MemoryLayer(maxsize=10_000, default_ttl=None)
    keys = [f"k{i}" for i in range(2_000)]
    layer.set_many(dict.fromkeys(keys, 0))
    stop = threading.Event()
    misses: list[str] = []

    def read() -> None:
        while not stop.is_set():
            if layer.get("k1000") is MISSING:
                misses.append("k1000")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(1, 40):
            layer.set_many(dict.fromkeys(keys, round_))
            layer.fill_many({key: (round_, 60.0) for key in keys})
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(old)
    assert misses == []


def test_a_set_keeps_the_lru_order_and_count() -> None:
    layer = MemoryLayer(maxsize=2, default_ttl=None)
    for key in ("a", "b", "a", "c", "d"):
        layer.set(key, key)
        assert len(layer) <= 2
    assert list(layer._entries) == ["c", "d"] and layer.stats().evictions == 2
    layer.delete("c")
    layer.set_many({"e": 1, "f": 2})  # f evicts d
    stats = layer.stats()
    assert list(layer._entries) == ["e", "f"] and (stats.entries, stats.evictions) == (2, 3)


def test_add_replays_the_reads_before_it_evicts() -> None:
    """Found by review: ``add`` evicted without the reads since the last replay."""
    layer = MemoryLayer(maxsize=2, default_ttl=None)
    layer.set("a", 1)
    layer.set("b", 2)
    assert layer.get("a") == 1  # read: recent
    assert layer.add("c", 3)
    assert list(layer._entries) == ["a", "c"] and layer.get("b") is MISSING


# -- the entries: a value, an _Expiring or a _Stamp (issue 14, item 4) ------------------


@pytest.mark.parametrize(
    "value",
    [("v", 1.0), ("v", None), ("v", 1.0, 2.0, 3.0), 0.5, float("inf"), None, (), "s"],
)
@pytest.mark.parametrize("ttl", [None, 10.0])
def test_any_value_round_trips_as_itself(value: object, ttl: float | None) -> None:
    """A value that looks like an entry of the old representation (a tuple, a float)
    is the caller's value, never read as an expiry: entries are told by their private
    types."""
    clock = FakeClock()
    layer = MemoryLayer(clock=clock, default_ttl=None)
    layer.set("k", value, ttl)
    layer.fill_many({"f": (value, ttl)})
    layer.set_many({"m": value}, ttl)
    for key in ("k", "f", "m"):
        assert layer.get(key) is value
        assert layer.get_with_ttl(key) == (value, ttl)
        assert layer.get_fresh(key) == (value, ttl, None)
        assert layer.get_many_with_ttl([key]) == {key: (value, ttl)}
    clock.advance(10**6)
    assert layer.expire() == (0 if ttl is None else 3)
    assert (layer.get("k") is value) == (ttl is None)


def test_entries_are_the_value_or_an_expiring_float() -> None:
    clock = FakeClock()
    layer = MemoryLayer(clock=clock, default_ttl=None)
    layer.set("plain", "v")
    layer.set("timed", "v", 5.0)
    layer.set("stamped", Stamped("v", 2.0, 3.0), 5.0)
    plain, timed, stamped = (layer._entries[k] for k in ("plain", "timed", "stamped"))
    assert plain == "v"
    assert type(timed) is _memory._Expiring and (timed, timed.value) == (clock() + 5, "v")
    assert type(stamped) is _memory._Stamp and stamped == clock() + 2
    assert layer._data["timed"] == ("v", clock() + 5.0)  # the tuple view, for tests
    assert layer._data["stamped"] == ("v", clock() + 2.0, clock() + 5.0, 3.0)
    assert layer._data["plain"] == ("v", None) and list(layer._data) == list(layer._entries)


def test_counters_and_touch_store_new_entries_with_the_expiry_they_keep() -> None:
    """``incr`` keeps the expiry, ``touch`` replaces it: each stores a new entry (a
    lock-free reader holding the old one sees it whole)."""
    clock = FakeClock()
    layer = MemoryLayer(clock=clock, default_ttl=None)
    layer.set("n", 5, 10.0)
    layer.set("forever", "7")
    before = layer._entries["n"]
    assert layer.incr("n", 2) == 7 and layer.decr("forever") == 6
    assert before.value == 5 and layer._entries["n"] is not before  # never changed
    assert layer.get_with_ttl("n") == (7, 10.0) and layer.get_with_ttl("forever") == (6, None)
    assert layer.touch("n") and layer.get_with_ttl("n") == (7, None)  # default: no TTL
    assert layer.touch("forever", 3.0) and layer.get_with_ttl("forever") == (6, 3.0)
    clock.advance(3)
    assert layer.incr("forever") is None and not layer.touch("forever")
    assert layer.add("forever", 1) and layer.get("forever") == 1
    assert not layer.add("n", 1) and layer.get("n") == 7
    layer.set("s", "x", 1.0)
    with pytest.raises(InvalidValueError, match=r"not a counter .*\): str$"):  # the value's type
        layer.incr("s")


def test_a_reader_never_pairs_a_value_with_another_writes_expiry() -> None:
    """A value stored while lock-free readers read: the writer's clock runs 10 s
    behind the readers', so every "old" entry it stores (TTL 5 s) has expired for them
    and every "new" one (TTL 50 s) has 40 s left. A reader that paired a value with
    the expiry of another write (an old value with a new expiry) would serve an
    expired "old" as fresh, or report a wrong TTL."""
    writing = threading.local()

    def clock() -> float:
        return 90.0 if getattr(writing, "on", False) else 100.0

    layer = MemoryLayer(maxsize=8, clock=clock, default_ttl=None)
    rounds = 20_000
    start = threading.Barrier(3)
    seen: list[object] = []
    finished: list[str] = []

    def write() -> None:
        writing.on = True
        start.wait()
        for i in range(rounds):
            if i % 2:
                layer.set("k", "old", 5.0)
            else:
                layer.fill_many({"k": ("new", 50.0)})
        finished.append("writer")

    def read() -> None:
        start.wait()
        for _ in range(rounds):  # replays the read buffer too, while the writer writes
            for value, ttl in (layer.get_with_ttl("k"), layer.get_fresh("k")[:2]):
                if value is not MISSING and (value, ttl) != ("new", 40.0):
                    seen.append((value, ttl))
            value = layer.get("k")
            if value not in (MISSING, "new"):
                seen.append(value)
        finished.append("reader")

    threads = [threading.Thread(target=f) for f in (write, read, read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen == []
    assert sorted(finished) == ["reader", "reader", "writer"], "a thread raised"
    layer.set("k", "last", None)
    assert layer.get("k") == "last" and list(layer._entries) == ["k"]


def _bytes_per_entry(build: Any, n: int) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(kept) == n
    return (after - before) / n


def test_an_entry_with_a_ttl_costs_at_most_1_3x_an_lru_cache_entry() -> None:
    """Issue 14, item 4: with a TTL on every entry, at most 1.3x the bytes per entry
    of cachetools' ``LRUCache`` (1.62x before). 50,000 entries fill the hash tables as
    the benchmark's 100,000 do (section 17): the ratio moves with how full they are,
    1.07x here, up to 1.32x at 10,000-20,000 (docs/design.md, "Memory per entry")."""
    n = 50_000
    keys = [f"key:{i}" for i in range(n)]
    values = [f"value:{i}" for i in range(n)]

    def lru() -> Any:
        cache: LRUCache[str, str] = LRUCache(n)
        for k, v in zip(keys, values, strict=True):
            cache[k] = v
        return cache

    def layer(ttl: float | None) -> Any:
        def build() -> MemoryLayer:
            built = MemoryLayer(maxsize=n, default_ttl=None)
            for k, v in zip(keys, values, strict=True):
                built.set(k, v, ttl)
            return built

        return build

    base = _bytes_per_entry(lru, n)
    assert _bytes_per_entry(layer(300.0), n) <= 1.3 * base
    assert _bytes_per_entry(layer(None), n) <= base


def test_fill_stores_a_lower_layers_value_as_set_would() -> None:
    """A chain's backfill of one value (``fill``): the TTL a lower layer gave, capped by
    ``max_ttl``; ``None`` takes ``default_ttl``; anything else goes through ``set``'s
    checks."""

    clock = FakeClock()
    layer = MemoryLayer("L1", maxsize=2, default_ttl=30.0, max_ttl=60.0, clock=clock)
    layer.fill("a", (1, 2), 10.0)
    layer.fill("b", "v", None)
    layer.fill("c", 3, 600.0)  # evicts a (maxsize 2)
    assert layer.get_with_ttl("a") == (MISSING, None)
    assert layer.get_with_ttl("b") == ("v", 30.0)
    assert layer.get_with_ttl("c") == (3, 60.0)
    layer.fill("d", 4, 5)  # an int TTL: set's path
    assert layer.get_with_ttl("d") == (4, 5.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidValueError):
            layer.fill("e", 5, bad)
    assert layer.get("e") is MISSING
