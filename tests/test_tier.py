"""Tiers on their own: what the factory builds from a LayerConfig, and each write
policy (synchronous, settle, write-behind, repair)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from cachechain import (
    BreakerConfig,
    LayerConfig,
    LayerUnavailableError,
    MemoryLayer,
    WriterConfig,
)
from cachechain._chain_metrics import Reporter
from cachechain._resilience import CircuitState, ResilientLayer
from cachechain._tier import (
    SETTLE_DEFAULT,
    SettlingTier,
    Tier,
    WriteBehindTier,
    build_tier,
    build_tiers,
    close_layers,
    close_writers,
    fill_of,
    flush,
    shortcut,
)
from cachechain.metrics._base import adapt
from cachechain.metrics._memory import MemoryCollector
from tests.support.fakes import FakeLayer

DEFAULTS: dict[str, Any] = {"breaker": BreakerConfig(), "writer": WriterConfig()}


def close(tiers: list[Tier], timeout: float) -> int:
    """Drain and close the writers, then close the layers, as ``Chain.close`` does
    (which publishes its last invalidations in between)."""
    lost = close_writers(tiers, timeout)
    close_layers(tiers)
    return lost


def tier_of(config: LayerConfig, index: int = 1, report: Reporter | None = None) -> Tier:
    return build_tier(index, config, report or Reporter(None), **DEFAULTS)


def metered(*names: str) -> tuple[Reporter, MemoryCollector]:
    collector = MemoryCollector()
    return Reporter(adapt(collector, "test", names)), collector


@pytest.fixture
def tiers() -> Iterator[list[Tier]]:
    made: list[Tier] = []
    yield made
    close(made, 5)


# -- the factory ------------------------------------------------------------------------


def test_the_first_layer_is_a_synchronous_tier_without_writer_or_breaker() -> None:
    l1 = MemoryLayer("L1")
    tier = tier_of(LayerConfig(layer=l1), index=0)
    assert type(tier) is Tier
    assert tier.layer is l1 and tier.writer is None and tier.breaker is None
    assert (tier.index, tier.name) == (0, "L1")


def test_a_remote_first_layer_gets_a_breaker_but_no_writer() -> None:
    tier = tier_of(LayerConfig(layer=FakeLayer("L1")), index=0)
    assert type(tier) is Tier and tier.writer is None
    assert isinstance(tier.layer, ResilientLayer) and tier.breaker is tier.layer.breaker


def test_a_remote_lower_layer_gets_a_breaker_and_a_writer(tiers: list[Tier]) -> None:
    l2 = FakeLayer("L2")
    tier = tier_of(LayerConfig(layer=l2))
    tiers.append(tier)
    assert type(tier) is SettlingTier
    assert isinstance(tier.layer, ResilientLayer) and tier.layer.layer is l2
    assert tier.breaker is tier.layer.breaker and tier.breaker.name == "L2"
    assert tier.writer is not None and tier.writer.stats().capacity == 1000


def test_a_layers_own_settings_win_over_the_chain_defaults(tiers: list[Tier]) -> None:
    config = LayerConfig(
        layer=FakeLayer("L2"),
        breaker=BreakerConfig(max_failures=2),
        writer=WriterConfig(queue_size=7),
        timeout=0.25,
    )
    tier = tier_of(config)
    tiers.append(tier)
    assert tier.breaker is not None
    breaker = tier.breaker
    breaker.on_failure(breaker.acquire())
    states = [breaker.state]
    breaker.on_failure(breaker.acquire())
    states.append(breaker.state)
    assert states == [CircuitState.CLOSED, CircuitState.OPEN]  # after 2, not 5
    assert tier.writer is not None and tier.writer.stats().capacity == 7
    assert isinstance(tier.layer, ResilientLayer) and tier.layer.timeout == 0.25
    assert (
        isinstance(tier, SettlingTier) and tier._settle == 0.25
    )  # a write waits for one in flight as long as a call may


def test_resilient_false_leaves_the_layer_bare(tiers: list[Tier]) -> None:
    l2 = FakeLayer("L2")
    tier = tier_of(LayerConfig(layer=l2, resilient=False))
    tiers.append(tier)
    assert tier.layer is l2 and tier.breaker is None
    assert (
        isinstance(tier, SettlingTier) and tier._settle == SETTLE_DEFAULT
    )  # no timeout of its own


def test_a_layer_already_resilient_keeps_its_breaker(tiers: list[Tier]) -> None:
    wrapped = ResilientLayer(FakeLayer("L2"))
    tier = tier_of(LayerConfig(layer=wrapped))
    tiers.append(tier)
    assert tier.layer is wrapped and tier.breaker is wrapped.breaker


def test_write_behind_makes_a_write_behind_tier(tiers: list[Tier]) -> None:
    config = LayerConfig(layer=FakeLayer("L2"), write_behind=True)
    tier = tier_of(config)
    tiers.append(tier)
    assert type(tier) is WriteBehindTier


def test_the_breaker_reports_its_changes_to_the_chains_reporter(
    tiers: list[Tier], caplog: pytest.LogCaptureFixture
) -> None:
    report, collector = metered("L2")
    tier = tier_of(LayerConfig(layer=FakeLayer("L2"), breaker=BreakerConfig(max_failures=1)))
    tiers.append(tier)
    tier = tier_of(
        LayerConfig(layer=FakeLayer("L3"), breaker=BreakerConfig(max_failures=1)),
        index=2,
        report=report,
    )
    tiers.append(tier)
    assert tier.breaker is not None
    with caplog.at_level(logging.WARNING):
        tier.breaker.on_failure(tier.breaker.acquire())
    assert "circuit breaker of cache layer 'L3': CLOSED -> OPEN" in caplog.text
    assert collector.snapshot().layer_metrics["L3"].circuit_state == 1


def test_build_tiers_numbers_them_fastest_first() -> None:
    configs = [LayerConfig(layer=MemoryLayer("A")), LayerConfig(layer=MemoryLayer("B"))]
    made = build_tiers(configs, Reporter(None), **DEFAULTS)
    try:
        assert [(t.index, t.name, type(t)) for t in made] == [
            (0, "A", Tier),
            (1, "B", SettlingTier),
        ]
    finally:
        close(made, 5)


# -- the synchronous policy ---------------------------------------------------------------


def test_a_synchronous_tier_writes_at_once_and_reports_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    report, collector = metered("L1")
    layer = FakeLayer("L1", local=True)
    tier = tier_of(LayerConfig(layer=layer), index=0, report=report)
    assert tier.set("k", 1, 60) and layer.data["k"][0] == 1
    assert tier.set_many({"a": 1}, 60) and tier.delete_many(["a"])
    assert tier.delete("k") and "k" not in layer.data
    tier.fill("f", 2, 60)
    assert layer.data["f"][0] == 2
    layer.fail = LayerUnavailableError("down")
    with caplog.at_level(logging.DEBUG):
        assert tier.set("k", 1, 60) is False
        assert tier.delete("k") is False
        tier.fill("k", 1, 60)  # never raises
    snap = collector.snapshot().layer_metrics["L1"]
    assert snap.errors == 3 and snap.errors_by_type == {"connection": 3}
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage()[:36] for r in warned] == [
        "cache layer 'L1' failed on set (Laye",
        "cache layer 'L1' failed on delete (L",
    ]


def test_the_close_of_a_layer_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Unclosable(MemoryLayer):
        def close(self) -> None:
            raise OSError("stuck")

    tier = tier_of(LayerConfig(layer=Unclosable("L1")), index=0)
    with caplog.at_level(logging.WARNING):
        tier.close()
    assert "cache layer 'L1' failed on close" in caplog.text


# -- reads --------------------------------------------------------------------------------


def test_read_many_keeps_only_pairs_of_the_keys_asked_for_and_times_them() -> None:
    class Sloppy(FakeLayer):
        def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, Any]]:
            answer = super().get_many_with_ttl(keys)
            answer["never-asked"] = ("x", None)
            return answer

    report, collector = metered("L1")
    layer = Sloppy("L1", local=True)
    layer.set("a", 1, 60)
    tier = tier_of(LayerConfig(layer=layer), index=0, report=report)
    hits = tier.read_many(["a", "b"])
    assert list(hits) == ["a"] and hits["a"][0] == 1 and hits["a"][1] == pytest.approx(60)
    assert tier.read_many([]) == {}
    assert layer.ops("get_many") == [["a", "b"]]  # the empty read asked nothing
    snap = collector.snapshot().layer_metrics["L1"]
    assert (snap.hits, snap.misses) == (1, 1)


def test_read_many_treats_a_malformed_answer_as_a_failure() -> None:
    class Broken(FakeLayer):
        def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, Any]:
            return {k: "not a pair" for k in keys}

    report, collector = metered("L1")
    tier = tier_of(LayerConfig(layer=Broken("L1", local=True)), index=0, report=report)
    assert tier.read_many(["a"]) == {}
    assert collector.snapshot().layer_metrics["L1"].errors == 1


def test_held_keys_are_those_the_writer_holds(tiers: list[Tier]) -> None:
    first = tier_of(LayerConfig(layer=MemoryLayer("L1")), index=0)
    assert first.held(["a"]) == frozenset()
    l2 = FakeLayer("L2")
    l2.block_delete = release = threading.Event()
    tier = tier_of(LayerConfig(layer=l2, write_behind=True))
    tiers.append(tier)
    assert tier.delete("a") is True  # queued, blocked in the layer
    assert tier.held(["a", "b"]) == frozenset({"a"})
    release.set()
    assert flush([tier], 5)
    assert tier.held(["a", "b"]) == frozenset()


# -- the settle policy --------------------------------------------------------------------


def test_a_lower_tier_writes_synchronously_when_nothing_of_the_key_is_in_flight(
    tiers: list[Tier],
) -> None:
    l2 = FakeLayer("L2")
    tier = tier_of(LayerConfig(layer=l2))
    tiers.append(tier)
    assert tier.set("k", 1, 60) is True
    assert l2.ops("set") == ["k"]  # made by this thread, before set returned
    assert tier.set_many({"a": 1, "b": 2}, 60) is True
    assert l2.ops("set_many") == [["a", "b"]]  # one batch
    assert tier.delete_many(["a", "b"]) is True
    assert l2.ops("delete_many") == [["a", "b"]]
    assert tier.writer is not None and tier.writer.stats().written == 0


def test_a_set_behind_a_write_of_its_key_still_in_flight_becomes_a_delete(
    tiers: list[Tier],
) -> None:
    """Queued with its value, the set would be acknowledged before it lands and could
    land after another process's later write of the key: the layer gets a delete
    after the older write instead, and the set answers False."""
    l2 = FakeLayer("L2")
    l2.block_set = release = threading.Event()
    tier = tier_of(LayerConfig(layer=l2, timeout=0.01))
    tiers.append(tier)
    tier.fill("k", "old", 60)  # a backfill, now in flight
    assert l2.write_entered.wait(5)
    assert tier.set("k", "new", 60) is False  # waited 0.01 s: a delete queued behind it
    assert tier.delete("k") is False  # queued too: not made yet
    assert tier.delete("j") is True  # another key: synchronous (blocked on set only)
    release.set()
    assert flush([tier], 5)
    assert "k" not in l2.data
    assert l2.ops("set") == ["k"]  # only the backfill: the new value was never queued


def test_a_backfill_is_queued_and_skipped_while_the_breaker_refuses(tiers: list[Tier]) -> None:
    l2 = FakeLayer("L2")
    tier = tier_of(LayerConfig(layer=l2, breaker=BreakerConfig(max_failures=1)))
    tiers.append(tier)
    tier.fill("k", 1, 60)
    assert flush([tier], 5) and l2.data["k"][0] == 1
    assert tier.breaker is not None and tier.writer is not None
    tier.breaker.on_failure(tier.breaker.acquire())  # open
    tier.fill("j", 2, 60)
    assert tier.writer.stats().depth == 0 and not tier.writer.holds("j")


def test_a_write_the_layer_missed_becomes_a_repair_delete(tiers: list[Tier]) -> None:
    l2 = FakeLayer("L2")
    slow = WriterConfig(retry_delay=600, max_retry_delay=600)
    tier = tier_of(LayerConfig(layer=l2, resilient=False, writer=slow))
    tiers.append(tier)
    l2.data["k"] = ("old", None)
    l2.fail = LayerUnavailableError("down")
    assert tier.set("k", "new", 60) is False
    assert tier.set_many({"a": 1}, 60) is False
    assert tier.writer is not None
    assert tier.writer.holds("k") and tier.writer.holds("a")
    assert tier.writer.stats().repairing == 2
    l2.fail = None
    assert flush([tier], 5)
    assert "k" not in l2.data and not tier.writer.holds("k")


def test_keys_set_many_rejects_are_repaired(tiers: list[Tier]) -> None:
    class Picky(FakeLayer):
        def set_many(self, items: Any, ttl: float | None = None) -> list[str]:
            super().set_many({k: v for k, v in items.items() if k != "bad"}, ttl)
            return ["bad"]

    layer = Picky("L2")
    slow = WriterConfig(retry_delay=600, max_retry_delay=600)
    tier = tier_of(LayerConfig(layer=layer, resilient=False, writer=slow))
    tiers.append(tier)
    assert tier.set_many({"good": 1, "bad": 2}, 60) is False
    assert tier.writer is not None
    assert tier.writer.holding(["good", "bad"]) == frozenset({"bad"})


def test_a_closed_writer_makes_routed_writes_fail_quietly() -> None:
    l2 = FakeLayer("L2")
    l2.block_set = release = threading.Event()
    tier = tier_of(LayerConfig(layer=l2, write_behind=True))
    assert tier.writer is not None
    release.set()
    assert close([tier], 5) == 0
    assert tier.set("k", 1, 60) is False  # the writer refuses: no exception
    assert tier.delete("k") is False
    assert tier.set_many({"k": 1}, 60) is False
    tier.fill("k", 1, 60)
    assert l2.closed


# -- the write-behind policy ----------------------------------------------------------------


def test_a_write_behind_tier_queues_every_write(tiers: list[Tier]) -> None:
    l2 = FakeLayer("L2")
    l2.block_set = release = threading.Event()
    tier = tier_of(LayerConfig(layer=l2, write_behind=True))
    tiers.append(tier)
    assert tier.set("k", 1, 60) is True  # returned while the layer is blocked
    assert tier.set_many({"a": 1, "b": 2}, 60) is True
    assert tier.delete_many(["b"]) is True
    assert l2.ops("set_many") == [] and l2.ops("delete_many") == []
    release.set()
    assert flush([tier], 5)
    assert {k: v[0] for k, v in l2.data.items()} == {"k": 1, "a": 1}


def test_a_set_that_finds_the_queue_full_becomes_a_delete(tiers: list[Tier]) -> None:
    l2 = FakeLayer("L2")
    l2.block_set = release = threading.Event()
    l2.data["k"] = ("old", None)
    config = LayerConfig(layer=l2, write_behind=True, writer=WriterConfig(queue_size=1))
    tier = tier_of(config)
    tiers.append(tier)
    assert tier.set("busy", 1, 60) is True
    assert l2.write_entered.wait(5)  # in flight
    assert tier.set("full", 2, 60) is True  # queued: the queue is full now
    assert tier.set("k", "new", 60) is False  # dropped, and a delete queued instead
    release.set()
    assert flush([tier], 5)
    assert "k" not in l2.data


def test_a_new_policy_is_one_subclass(tiers: list[Tier]) -> None:
    """For example: deletes queued, sets synchronous."""

    class QueuedDeletes(SettlingTier):
        def route_set(self, key: str, value: Any, ttl: float | None) -> bool | None:
            return None

        def _must_queue(self, key: str) -> bool:
            return True

    l2 = FakeLayer("L2")
    l2.block_delete = release = threading.Event()
    plain = tier_of(LayerConfig(layer=l2, resilient=False))
    assert plain.writer is not None
    tier = QueuedDeletes(1, l2, Reporter(None), None, plain.writer, settle=1.0)
    tiers.append(tier)
    assert tier.delete("k") is False and l2.ops("delete") == []  # queued: not made yet
    assert tier.set("j", 1, 60) is True and l2.ops("set") == ["j"]
    release.set()
    assert flush([tier], 5) and l2.ops("delete") == ["k"]


def test_flush_and_close_cover_every_tier_with_a_writer() -> None:
    """``flush``, ``close_writers`` and ``close_layers`` reach every tier."""
    l2, l3 = FakeLayer("L2"), FakeLayer("L3")
    made = [
        tier_of(LayerConfig(layer=MemoryLayer("L1")), index=0),
        tier_of(LayerConfig(layer=l2, write_behind=True)),
        tier_of(LayerConfig(layer=l3, write_behind=True), index=2),
    ]
    made[1].set("a", 1, 60)
    made[2].set("b", 2, 60)
    assert flush(made, 5)
    assert l2.data["a"][0] == 1 and l3.data["b"][0] == 2
    l3.block_set = threading.Event()  # never released: the write cannot be made
    made[2].set("c", 3, 60)
    assert l3.write_entered.wait(5)
    made[2].set("d", 4, 60)  # queued behind "c"
    assert close(made, 0.05) == 1  # "d" was dropped
    l3.block_set.set()
    assert l2.closed and l3.closed


# -- a first layer's shortcuts never bypass a subclass's own writes -----------------------


class AuditedL1(MemoryLayer):
    """A user's L1 that audits every write in its ``set`` (and ``set_many``)."""

    def __init__(self) -> None:
        super().__init__("L1")
        self.audited: list[str] = []

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        self.audited.append(key)
        super().set(key, value, ttl)


class FillingL1(AuditedL1):
    """An audited L1 that also defines the fast write, ``fill``, of its own."""

    def fill(self, key: str, value: Any, ttl: float | None) -> None:
        self.audited.append(f"fill:{key}")
        super().set(key, value, ttl)


def test_shortcut_is_refused_when_a_subclass_overrides_what_it_bypasses() -> None:
    plain, audited, filling = MemoryLayer("L1"), AuditedL1(), FillingL1()
    assert shortcut(plain, "fill", "set") == plain.fill
    assert fill_of(plain) == plain.fill
    assert shortcut(audited, "fill", "set") is None
    assert fill_of(audited) == audited.set
    assert shortcut(filling, "fill", "set") == filling.fill  # its own fill, below its set
    assert shortcut(filling, "fill_many", "set", "set_many", "fill") is None
    assert shortcut(FakeLayer("x"), "fill", "set") is None  # no such method


@pytest.mark.memcached
def test_a_subclass_set_sees_every_backfill(memcached: Any) -> None:
    """Noticed in session 10: a MemoryLayer subclass overriding ``set`` alone was bypassed by
    the chain's backfills (one key and a batch), which called ``MemoryLayer.fill`` and
    ``fill_many`` directly (so was ``add``, which now keeps nothing in L1: the backfill
    of the next ``get`` stores its value)."""
    from cachechain import Chain, MemcachedLayer

    prefix = f"{uuid.uuid4().hex[:8]}:"
    writer = Chain([MemcachedLayer("L2", memcached.address, key_prefix=prefix)], coherence=False)
    l1 = AuditedL1()
    chain = Chain([l1, MemcachedLayer("L2", memcached.address, key_prefix=prefix)], coherence=False)
    try:
        for key in ("one", "b1", "b2"):
            assert writer.set(key, key.upper())
        assert chain.get("one") == "ONE"  # an L2 hit, backfilled
        assert chain.get_many(["b1", "b2"]) == {"b1": "B1", "b2": "B2"}  # a batch
        assert chain.add("new", 1)
        assert sorted(l1.audited) == ["b1", "b2", "one"]
        assert chain.get("new") == 1 and l1.get("one") == "ONE"
        assert sorted(l1.audited) == ["b1", "b2", "new", "one"]  # the get's backfill
    finally:
        chain.close()
        writer.close()
