"""The chain over a real memcached: fallback, backfill, bad values, batches, pools."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pymemcache.client.base import Client

from cachechain import MISSING, Chain, LayerConfig, MemcachedLayer, MemoryLayer
from cachechain.layers._memcached import memcached_key
from cachechain.layers._wire import Connection
from cachechain.metrics._memory import MemoryCollector
from tests.support.fakes import FakeClock
from tests.support.faultproxy import FaultProxy
from tests.support.servers import MemcachedProcess

pytestmark = pytest.mark.memcached


def raw_client(server: MemcachedProcess) -> Client:
    return Client(("127.0.0.1", server.port), connect_timeout=1, timeout=1)


def test_fallback_and_backfill_through_memcached_keep_the_remaining_ttl(
    memcached: MemcachedProcess,
) -> None:
    wall = FakeClock(start=1_700_000_000.0)
    mono = FakeClock()
    l1 = MemoryLayer("L1", clock=mono)
    l2 = MemcachedLayer("L2", memcached.address, clock=wall)
    with Chain([l1, l2], coherence=False) as chain:
        l2.set("user:1", {"name": "Ada"}, ttl=100)
        wall.advance(40)
        assert chain.get("user:1") == {"name": "Ada"}
        value, ttl = l1.get_with_ttl("user:1")
        assert value == {"name": "Ada"}
        assert ttl == pytest.approx(60, abs=0.01)
        assert chain.get("nobody") is None


def test_set_and_delete_reach_memcached(memcached: MemcachedProcess) -> None:
    l1, l2 = MemoryLayer("L1"), MemcachedLayer("L2", memcached.address)
    with Chain([l1, l2], coherence=False) as chain:
        assert chain.set("k", [1, 2, 3], ttl=30)
        assert l2.get("k") == [1, 2, 3]
        assert chain.delete("k")
        assert l2.get("k") is MISSING
        assert l1.get("k") is MISSING


@pytest.mark.parametrize("value", [object(), b"x" * (2 * 1024 * 1024)], ids=["not-json", "two-mib"])
def test_a_value_memcached_cannot_take_stays_in_l1_and_is_counted(
    memcached: MemcachedProcess, value: Any
) -> None:
    collector = MemoryCollector()
    l1, l2 = MemoryLayer("L1"), MemcachedLayer("L2", memcached.address)
    # Without coherence: a poll could empty L1 (the value's only copy), and l2 reads the
    # chain's keys as they are (no namespace).
    with Chain([l1, l2], metrics=collector, coherence=False) as chain:
        assert chain.set("big", value) is False
        assert chain.get("big") is value
        assert l2.get("big") is MISSING
        snap = collector.snapshot()
        assert snap.layer_metrics["L2"].errors_by_type == {"serialization": 1}
        assert chain.breakers["L2"].stats().consecutive_failures == 0


@pytest.mark.parametrize(
    "raw",
    [b"not an envelope", b"\xc1\x01" + b"\x00" * 8 + b"{bad json", b"\x80\x04K\x01."],
    ids=["garbage", "bad-json", "bare-pickle"],
)
def test_corrupt_bytes_in_memcached_are_a_counted_miss(
    memcached: MemcachedProcess, raw: bytes
) -> None:
    collector = MemoryCollector()
    l1, l2 = MemoryLayer("L1"), MemcachedLayer("L2", memcached.address)
    raw_client(memcached).set(memcached_key("k"), raw, noreply=False)
    with Chain([l1, l2], metrics=collector, coherence=False) as chain:
        assert chain.get("k", "default") == "default"
        assert chain.get_or_load("k", lambda: "reloaded") == "reloaded"
        snap = collector.snapshot()
        assert snap.layer_metrics["L2"].errors_by_type["serialization"] >= 1
        assert chain.breakers["L2"].state.name == "CLOSED"


def test_get_many_is_one_round_trip_per_layer(
    memcached: MemcachedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    l1, l2 = MemoryLayer("L1"), MemcachedLayer("L2", memcached.address)
    keys = [f"k{i}" for i in range(100)]
    l2.set_many({k: i for i, k in enumerate(keys)}, ttl=60)
    calls: list[int] = []
    real = Connection.get_many

    def spy(self: Connection, keys: Any, *args: Any) -> Any:
        calls.append(len(keys))
        return real(self, keys, *args)

    monkeypatch.setattr(Connection, "get_many", spy)
    before = _stats(memcached)
    with Chain([l1, l2], coherence=False) as chain:
        found = chain.get_many([*keys, "missing"])
    after = _stats(memcached)
    assert found == {k: i for i, k in enumerate(keys)}
    assert calls == [101]  # one "get k1 k2 ..." command for all keys
    assert after["get_hits"] - before["get_hits"] == 100
    assert l1.get_many(keys) == found  # backfilled


def test_more_threads_than_pooled_connections_never_fail(memcached: MemcachedProcess) -> None:
    # The pool is tested, not latency: deadlines loose enough for a loaded CI machine,
    # where 8 threads can wait more than the default 0.25 s for the GIL.
    l2 = MemcachedLayer("L2", memcached.address, pool_size=4, pool_timeout=10.0, timeout=10.0)
    chain = Chain([MemoryLayer("L1", maxsize=1), l2], coherence=False)
    for i in range(50):
        l2.set(f"k{i}", i, ttl=60)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    wrong: list[Any] = []

    def worker(n: int) -> None:
        barrier.wait()
        try:
            for r in range(200):
                i = (n * 7 + r) % 50
                value = chain.get(f"k{i}")
                if value != i:
                    wrong.append((i, value))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    chain.close()
    assert errors == []
    assert wrong == []
    assert l2.stats().pool_exhausted == 0


def test_key_injection_through_the_chain_flushes_nothing(memcached: MemcachedProcess) -> None:
    with Chain(
        [MemoryLayer("L1"), MemcachedLayer("L2", memcached.address)], coherence=False
    ) as chain:
        chain.set("sentinel", "alive", ttl=60)
        evil = "x\r\nflush_all\r\nset y 0 0 1\r\nz"
        assert chain.set(evil, "v", ttl=60)
        chain.get_many([evil, "sentinel"])
        assert chain.delete(evil)
        assert raw_client(memcached).get(memcached_key("sentinel")) is not None


def test_a_write_behind_layer_gets_sets_through_its_writer(memcached: MemcachedProcess) -> None:
    l2 = MemcachedLayer("L2", memcached.address)
    with Chain(
        [MemoryLayer("L1"), LayerConfig(layer=l2, write_behind=True)], coherence=False
    ) as chain:
        for i in range(100):
            assert chain.set(f"k{i}", i, ttl=60)
        chain.delete("k5")
        assert chain.flush(10)
        assert l2.get("k99") == 99
        assert l2.get("k5") is MISSING
        assert chain.writers["L2"].stats().written >= 100


def _stats(server: MemcachedProcess) -> dict[str, int]:
    raw = server.raw(b"stats\r\n").decode()
    out = {}
    for line in raw.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STAT" and parts[2].isdigit():
            out[parts[1]] = int(parts[2])
    return out


@pytest.mark.parametrize("write_behind", [False, True], ids=["sync", "write-behind"])
def test_a_refused_write_leaves_no_older_value_in_memcached(
    memcached: MemcachedProcess, write_behind: bool
) -> None:
    """v1 is stored, then v2 cannot be (not JSON, too large): memcached must not go on
    serving v1 to other processes once L1 forgets the key."""
    l2 = MemcachedLayer("L2", memcached.address)
    other_process = MemcachedLayer("elsewhere", memcached.address)
    config = LayerConfig(layer=l2, write_behind=write_behind)
    with Chain([MemoryLayer("L1"), config], coherence=False) as chain:
        assert chain.set("k", "v1") and chain.set_many({"a": 1, "b": 2})
        assert chain.flush(10)
        assert other_process.get("k") == "v1"
        unstorable = {1, 2}  # a set: JSON cannot encode it
        chain.set("k", unstorable)
        chain.set_many({"a": unstorable, "b": b"x" * (2 * 1024 * 1024)})
        assert chain.flush(10)
        assert chain.get("k") == unstorable  # L1 still serves it in this process
        assert other_process.get_many(["k", "a", "b"]) == {}
    other_process.close()


@pytest.mark.parametrize("operation", ["delete", "set"])
def test_a_write_memcached_missed_is_repaired_once_it_answers_again(
    memcached: MemcachedProcess, operation: str
) -> None:
    """memcached keeps v1 while it cannot be reached: no process may be served v1 after
    the chain deleted or replaced it, once memcached answers again."""
    other_process = MemcachedLayer("elsewhere", memcached.address)
    with FaultProxy(("127.0.0.1", memcached.port)) as proxy:
        l2 = MemcachedLayer("L2", proxy.address, timeout=0.2, connect_timeout=0.2)
        with Chain(
            [MemoryLayer("L1"), LayerConfig(layer=l2, resilient=False)], coherence=False
        ) as chain:
            assert chain.set("k", "v1")
            proxy.reset()  # every connection is reset as soon as it sends
            if operation == "delete":
                assert chain.delete("k") is False
            else:
                assert chain.set("k", "v2") is False
                chain.layers[0].delete("k")  # as if L1 evicted it
            assert other_process.get("k") == "v1"  # memcached still has it ...
            assert chain.get("k") is None  # ... but this chain does not serve it
            assert chain.writers["L2"].holds("k")
            proxy.pass_through()
            assert chain.flush(10)  # the repair delete lands
            assert other_process.get("k") is MISSING
            assert not chain.writers["L2"].holds("k")
            assert chain.set("k", "v3") and other_process.get("k") == "v3"
    assert proxy.errors == []
    other_process.close()
