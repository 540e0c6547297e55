"""Chain.get_many's one-step reader for the usual chain (``_chain_batch.PairBatch``):
taken exactly where it applies, and giving what ``read_through`` gives, backfills,
failures and held keys included (issue 14, item 2), on a real memcached."""

from __future__ import annotations

from typing import Any

import pytest

from cachechain import Chain, CoherenceConfig, MemcachedLayer, MemoryCollector, MemoryLayer
from cachechain._chain_batch import PairBatch
from cachechain._config import LayerConfig
from cachechain._namespace import RESERVED_PREFIX
from tests.support.servers import MemcachedProcess
from tests.test_lease import settled
from tests.test_memcached_layer import CallSpy

KEYS = ["plain:1", "plain:2", "with space", "~tilde", "x" * 300, "ünï", "absent"]


def two(memcached: MemcachedProcess, **kw: Any) -> Chain:
    return Chain([MemoryLayer("L1", maxsize=100), MemcachedLayer("L2", memcached.address)], **kw)


def test_the_usual_chain_reads_batches_in_one_step(memcached: MemcachedProcess) -> None:
    for kw in ({}, {"coherence": False}):
        chain = two(memcached, **kw)
        try:
            assert isinstance(chain._pair_batch, PairBatch)
        finally:
            chain.close()
    plain = Chain(
        [
            MemoryLayer("L1"),
            LayerConfig(layer=MemcachedLayer("L2", memcached.address), resilient=False),
        ]
    )
    try:
        assert isinstance(plain._pair_batch, PairBatch)
    finally:
        plain.close()


def test_other_chains_read_through_every_tier(memcached: MemcachedProcess) -> None:
    metered = two(memcached, metrics=MemoryCollector())
    three = Chain([MemoryLayer("L1"), MemoryLayer("L1b"), MemcachedLayer("L2", memcached.address)])
    memory_only = Chain([MemoryLayer("L1"), MemoryLayer("L2")])
    try:
        assert metered._pair_batch is None
        assert three._pair_batch is None
        assert memory_only._pair_batch is None
    finally:
        for c in (metered, three, memory_only):
            c.close()


@pytest.mark.parametrize("coherence", [True, False])
def test_it_gives_what_read_through_gives(memcached: MemcachedProcess, coherence: bool) -> None:
    # With coherence, a loose bound and each chain's first journal read done: a late
    # poll or that read would empty L1 mid-test. The values go to memcached alone (no
    # publication, which would empty the other chain's L1 when its poll lands).
    config: Any = CoherenceConfig(bound=30.0) if coherence else False
    fused, general = two(memcached, coherence=config), two(memcached, coherence=config)
    general._pair_batch = None  # the general path, for comparison
    try:
        if coherence:
            settled(fused)
            settled(general)
        assert fused.layers[1].set_many({k: {"v": k} for k in KEYS[:-1]}, ttl=60) == []
        for chain in (fused, general):
            chain._first.layer.clear()  # type: ignore[attr-defined]
            chain._first.layer.set("plain:1", "l1 copy")  # an L1 hit among the misses
        want = {"plain:1": "l1 copy", **{k: {"v": k} for k in KEYS[1:-1]}}
        assert fused.get_many(KEYS) == general.get_many(KEYS) == want
        # every L2 hit was backfilled into L1, with its TTL
        l1 = fused._first.layer.get_many_with_ttl(KEYS)  # type: ignore[attr-defined]
        assert {k: v for k, (v, _) in l1.items()} == want
        assert all(
            ttl is not None and 0 < ttl <= 60 for k, (_, ttl) in l1.items() if k != "plain:1"
        )
        # an all-L1 batch never asks memcached (a spy on the reader's batch read, not
        # memcached's stats: the journals of every chain on this server poll it too)
        pair = fused._pair_batch
        assert pair is not None
        asked: list[Any] = []
        under = pair._under
        pair._under = lambda prefix, keys: asked.append(keys) or under(prefix, keys)
        assert fused.get_many(KEYS[:2]) == {"plain:1": "l1 copy", "plain:2": {"v": "plain:2"}}
        assert asked == []
        assert fused.get_many(KEYS) == want and asked == [[KEYS[-1]]]  # the spy sees reads
    finally:
        fused.close()
        general.close()


def test_a_counter_is_read_but_not_backfilled(memcached: MemcachedProcess) -> None:
    chain = two(memcached)
    try:
        assert chain.add("n", 0)
        assert chain.incr("n") == 1
        assert chain.get_many(["n"]) == {"n": 1}
        assert chain._first.layer.get_many_with_ttl(["n"]) == {}  # type: ignore[attr-defined]
    finally:
        chain.close()


def test_a_failing_memcached_serves_l1_and_is_counted(own_memcached: MemcachedProcess) -> None:
    # Without coherence: with it, a poll that finds memcached gone (late, on a loaded
    # machine, before the read) rightly sets L1 aside (failed on 3.10 under load).
    chain = two(own_memcached, coherence=False)
    try:
        chain.set_many({"a": 1, "b": 2})
        chain._first.layer.delete("b")  # type: ignore[attr-defined]
        own_memcached.stop()
        assert chain.get_many(["a", "b"]) == {"a": 1}  # never raises
        assert chain.health().layer("L2").last_error is not None
    finally:
        chain.close(timeout=1.0)


def test_keys_the_writer_holds_are_neither_read_nor_backfilled(
    memcached: MemcachedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = two(memcached, coherence=False)  # L1's contents are checked: no poll empties it
    try:
        chain.set_many({"a": 1, "b": 2})
        chain._first.layer.clear()  # type: ignore[attr-defined]
        tier = chain._tiers[1]
        monkeypatch.setattr(type(tier), "held", lambda self, keys: frozenset({"b"} & set(keys)))
        assert chain.get_many(["a", "b"]) == {"a": 1}
        assert chain._first.layer.get_many_with_ttl(["a", "b"]).keys() == {"a"}  # type: ignore[attr-defined]
    finally:
        chain.close()


def test_an_empty_batch_asks_no_layer_nor_breaker(
    memcached: MemcachedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = two(memcached)
    try:
        breaker = chain.breakers["L2"]
        rejected, state = breaker.rejected, breaker.state
        spy = CallSpy(monkeypatch)  # every command sent but the journals' (they poll)
        assert chain.get_many([]) == {}
        assert (breaker.rejected, breaker.state) == (rejected, state)
        assert spy.calls == []
        chain.get_many(["x"])
        assert [c[0] for c in spy.calls] == ["get_many"]  # the spy sees a read
    finally:
        chain.close()


class Sloppy(MemoryLayer):
    """Answers with a key nobody asked for."""

    def get_many_with_ttl(self, keys: Any) -> Any:
        found = super().get_many_with_ttl(keys)
        found["never-asked"] = ("x", None)
        return found


class Broken(MemoryLayer):
    """Answers with something that is not ``(value, ttl)`` pairs."""

    def get_many_with_ttl(self, keys: Any) -> Any:
        return {k: "not a pair" for k in keys}


@pytest.mark.parametrize("cls", [Sloppy, Broken])
def test_the_first_layers_answer_is_checked(memcached: MemcachedProcess, cls: type) -> None:
    chain = Chain([cls("L1"), MemcachedLayer("L2", memcached.address)], coherence=False)
    try:
        assert isinstance(chain._pair_batch, PairBatch)
        chain.set("a", 1)
        assert chain.get_many(["a", "b"]) == {"a": 1}
        assert (chain.health().layer("L1").last_error is not None) == (cls is Broken)
    finally:
        chain.close()


def test_a_patched_batch_read_is_honoured(
    memcached: MemcachedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    original = MemcachedLayer.get_many_with_ttl

    def traced(self: MemcachedLayer, keys: Any) -> Any:
        keys = list(keys)
        if not any(k.startswith(RESERVED_PREFIX) for k in keys):  # not a journal's poll
            calls.append(keys)
        return original(self, keys)

    monkeypatch.setattr(MemcachedLayer, "get_many_with_ttl", traced)
    for coherence in (False, True):
        chain = two(memcached, coherence=coherence)
        try:
            chain.set("p", 1)
            chain._first.layer.clear()  # type: ignore[attr-defined]
            assert chain.get_many(["p"]) == {"p": 1}
        finally:
            chain.close()
    assert len(calls) == 2
