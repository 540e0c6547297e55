"""Fail-safe values, soft timeouts and eager refresh (issue 12, items 1-3 and 5).

The three scenarios of the issue's "Show it" come first: a database down for 30 s
(fake clock), a loader that takes 2 s under ``soft_timeout=0.1``, a hot key under 16
threads with ``eager_refresh=0.8``. Time-dependent steps run on injected clocks
(:class:`FakeClock`, for the layers and the chain); threads meet on barriers and
events. Only the soft-timeout test measures real time: a caller's wait is a real wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cachechain import (
    MISSING,
    Chain,
    InvalidValueError,
    MemoryCollector,
    MemoryLayer,
    ReentrantLoadError,
)
from cachechain._config import LoadConfig
from cachechain._errors import Uncacheable
from cachechain.testing import FakeClock, FakeLayer
from cachechain.testing._threads import run_together

TTL = 10.0


class Database:
    """A loader that counts its calls, fails while :attr:`down`, and can be held in the
    middle of a call (:attr:`hold`, released by :attr:`release`, 10 s at most)."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = False
        self.value = "v1"
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            self.calls += 1
        if self.hold:
            self.entered.set()
            assert self.release.wait(10), "the test never released the loader"
        if self.down:
            raise ConnectionError("database down")
        return self.value


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


def make_chain(clock: FakeClock, **load: Any) -> tuple[Chain, MemoryLayer, MemoryLayer]:
    """L1 over a second in-process layer that keeps stamps (it stands for memcached),
    both on ``clock``; the chain's own clock too."""
    l1 = MemoryLayer("L1", clock=clock)
    l2 = MemoryLayer("L2", clock=clock)
    chain = Chain([l1, l2], load=LoadConfig(**load), clock=clock, coherence=False)
    return chain, l1, l2


@pytest.fixture()
def closing() -> Iterator[list[Chain]]:
    chains: list[Chain] = []
    yield chains
    for chain in chains:
        chain.close(5)


# -- Show it: a database down for 30 s --------------------------------------------------


def test_a_database_down_for_30_s_reaches_no_caller_and_is_called_once_per_throttle(
    clock: FakeClock, closing: list[Chain]
) -> None:
    chain, _, _ = make_chain(clock, fail_safe=True, fail_safe_throttle=5.0)
    closing.append(chain)
    db = Database()
    assert chain.get_or_load("user:1", db, ttl=TTL) == "v1"
    clock.advance(TTL)  # expired: every call from now on wants a load
    db.down = True
    errors: list[BaseException] = []
    served: list[str] = []
    lock = threading.Lock()

    def caller(_: int) -> None:
        for _ in range(5):
            try:
                value = chain.get_or_load("user:1", db, ttl=TTL)
            except Exception as exc:  # what the test counts: errors reaching callers
                with lock:
                    errors.append(exc)
            else:
                with lock:
                    served.append(value)

    for _ in range(30):  # 30 s of outage, one second at a time, 8 threads x 5 calls each
        run_together(caller, 8)
        clock.advance(1.0)
    assert errors == []
    assert served == ["v1"] * (30 * 8 * 5)
    assert db.calls == 1 + 6  # the first load, then once per 5 s throttle period
    db.down = False
    db.value = "v2"
    assert chain.get_or_load("user:1", db, ttl=TTL) == "v2"  # the throttle ended at 40 s
    assert db.calls == 8
    assert chain.get("user:1") == "v2"


def test_the_outage_with_fail_safe_off_reaches_every_caller(clock: FakeClock) -> None:
    """The same outage without fail-safe (the default): the loader's error reaches the
    caller, and the loader is called on every request."""
    chain, _, _ = make_chain(clock)
    db = Database()
    chain.get_or_load("user:1", db, ttl=TTL)
    clock.advance(TTL)
    db.down = True
    for _ in range(3):
        with pytest.raises(ConnectionError):
            chain.get_or_load("user:1", db, ttl=TTL)
    assert db.calls == 4
    chain.close()


# -- Show it: a loader that takes 2 s with soft_timeout=0.1 -----------------------------


def test_a_slow_loader_serves_the_old_value_at_the_soft_timeout_and_stores_the_new(
    clock: FakeClock,
) -> None:
    collector = MemoryCollector()
    l1 = MemoryLayer("L1", clock=clock)
    l2 = MemoryLayer("L2", clock=clock)
    chain = Chain(
        [l1, l2],
        load=LoadConfig(fail_safe=True, soft_timeout=0.1),
        clock=clock,
        coherence=False,
        metrics=collector,
    )
    db = Database()
    chain.get_or_load("k", db, ttl=TTL)
    clock.advance(TTL + 1)
    db.value, db.hold = "v2", True  # the load now takes 2 s (until released)
    waits: list[float] = []
    values: list[str] = []
    lock = threading.Lock()

    def caller(_: int) -> None:
        began = time.monotonic()
        value = chain.get_or_load("k", db, ttl=TTL)
        with lock:
            waits.append(time.monotonic() - began)
            values.append(value)

    run_together(caller, 4)
    assert values == ["v1"] * 4
    assert all(0.09 <= w < 1.0 for w in waits), waits  # about 0.1 s each, not 2 s
    assert db.calls == 2  # one load for the four callers, still running
    assert chain.get("k") is None  # the old value is not fresh for anybody else
    db.release.set()  # the load ends
    assert chain._loads.background.wait_idle(5)
    assert chain.get("k") == "v2"  # stored when it arrived
    assert chain.flush(5)
    assert l2.get("k") == "v2"
    figures = collector.snapshot().chain_metrics
    assert figures.fail_safe_by_reason == {"soft_timeout": 4}
    assert figures.background_loads_by_outcome == {"stored": 1}
    chain.close()


def test_a_set_made_while_the_background_load_runs_wins(clock: FakeClock) -> None:
    chain, _, _ = make_chain(clock, fail_safe=True, soft_timeout=0.0)
    db = Database()
    chain.get_or_load("k", db, ttl=TTL)
    clock.advance(TTL + 1)
    db.value, db.hold = "loaded", True
    assert chain.get_or_load("k", db, ttl=TTL) == "v1"  # soft timeout 0: at once
    assert db.entered.wait(5)
    chain.set("k", "set meanwhile", ttl=TTL)
    db.release.set()
    assert chain._loads.background.wait_idle(5)
    assert chain.get("k") == "set meanwhile"
    chain.close()


# -- Show it: a hot key under 16 threads with eager_refresh=0.8 -------------------------


def test_a_hot_key_is_refreshed_in_the_background_and_no_caller_waits(
    clock: FakeClock,
) -> None:
    collector = MemoryCollector()
    l1 = MemoryLayer("L1", clock=clock)
    chain = Chain(
        [l1, MemoryLayer("L2", clock=clock)],
        load=LoadConfig(eager_refresh=0.8),
        clock=clock,
        coherence=False,
        metrics=collector,
    )
    db = Database()
    assert chain.get_or_load("hot", db, ttl=TTL) == "v1"  # the first load: waited for
    clock.advance(TTL * 0.85)  # past 80% of the TTL
    db.value, db.hold = "v2", True  # the refresh blocks until every caller is done
    values: list[str] = []
    lock = threading.Lock()

    def caller(_: int) -> None:
        for _ in range(200):
            value = chain.get_or_load("hot", db, ttl=TTL)
            with lock:
                values.append(value)

    run_together(caller, 16)  # would hang (10 s, then fail) if a caller waited
    assert values == ["v1"] * (16 * 200)
    assert db.entered.is_set()
    assert db.calls == 2  # one refresh for 3,200 hits past the refresh point
    db.release.set()
    assert chain._loads.background.wait_idle(5)
    assert chain.get_or_load("hot", db, ttl=TTL) == "v2"
    assert l1.get_fresh("hot")[1] == TTL  # a fresh TTL from the refresh
    figures = collector.snapshot().chain_metrics
    assert figures.eager_refreshes == 1
    assert figures.background_loads_by_outcome == {"stored": 1}
    assert figures.loads == 2
    chain.close()


def test_eager_refresh_waits_for_its_point(clock: FakeClock) -> None:
    chain, _, _ = make_chain(clock, eager_refresh=0.8)
    db = Database()
    chain.get_or_load("k", db, ttl=TTL)
    clock.advance(TTL * 0.75)
    assert chain.get_or_load("k", db, ttl=TTL) == "v1"
    assert chain._loads.background.wait_idle(5)
    assert db.calls == 1  # not yet
    clock.advance(TTL * 0.1)
    chain.get_or_load("k", db, ttl=TTL)
    assert chain._loads.background.wait_idle(5)
    assert db.calls == 2
    chain.close()


def test_a_failed_refresh_is_not_retried_on_every_hit(clock: FakeClock) -> None:
    chain, _, _ = make_chain(clock, eager_refresh=0.5, fail_safe_throttle=5.0)
    db = Database()
    chain.get_or_load("k", db, ttl=TTL)
    clock.advance(6.0)
    db.down = True
    for _ in range(20):
        assert chain.get_or_load("k", db, ttl=TTL) == "v1"
        assert chain._loads.background.wait_idle(5)
    assert db.calls == 2
    chain.close()


def test_eager_refresh_of_an_entry_without_a_stamp_uses_the_calls_ttl(clock: FakeClock) -> None:
    chain, _, _ = make_chain(clock)
    chain.set("k", "set", ttl=TTL)  # a plain entry: its TTL is not in it
    clock.advance(TTL * 0.9)
    db = Database()
    assert chain.get_or_load("k", db, ttl=TTL, eager_refresh=0.8) == "set"
    assert chain._loads.background.wait_idle(5)
    assert db.calls == 1
    assert chain.get("k") == "v1"
    chain.close()


# -- fail-safe semantics ----------------------------------------------------------------


def test_expired_copies_are_invisible_to_every_plain_read(clock: FakeClock) -> None:
    chain, l1, l2 = make_chain(clock, fail_safe=True)
    chain.get_or_load("k", lambda: "v1", ttl=TTL)
    clock.advance(TTL)
    assert chain.get("k") is None
    assert chain.get("k", "default") == "default"
    assert chain.get_many(["k"]) == {}
    for layer in (l1, l2):
        assert layer.get("k") is MISSING
        assert layer.get_with_ttl("k")[1] is None
        assert layer.get_many_with_ttl(["k"]) == {}
        assert len(layer) == 1  # still kept, for get_or_load
    assert chain.add("k", "added", ttl=TTL)  # an expired copy is not a value for add
    assert chain.get("k") == "added"
    chain.close()


def test_a_copy_older_than_fail_safe_max_age_is_not_served(clock: FakeClock) -> None:
    chain, _, _ = make_chain(clock, fail_safe=True, fail_safe_max_age=60.0)
    db = Database()
    chain.get_or_load("k", db, ttl=TTL)
    db.down = True
    clock.advance(TTL + 59)
    assert chain.get_or_load("k", db, ttl=TTL) == "v1"
    clock.advance(2)  # 61 s past its expiry: gone (also physically)
    with pytest.raises(ConnectionError):
        chain.get_or_load("k", db, ttl=TTL)
    chain.close()


def test_a_per_call_max_age_below_the_stored_one(clock: FakeClock) -> None:
    """A copy kept for 3600 s is still refused by a chain whose max age is shorter now
    (the age is checked at read time, not only by the physical TTL)."""
    long_chain, l1, l2 = make_chain(clock, fail_safe=True)
    long_chain.get_or_load("k", lambda: "v1", ttl=TTL)
    short = Chain([l1, l2], load=LoadConfig(fail_safe=True, fail_safe_max_age=5.0), clock=clock)
    clock.advance(TTL + 6)

    def down() -> str:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        short.get_or_load("k", down, ttl=TTL)
    assert long_chain.get_or_load("k", down, ttl=TTL) == "v1"
    long_chain.close()
    short.close()


def test_without_a_previous_value_the_error_reaches_the_caller(clock: FakeClock) -> None:
    chain, _, _ = make_chain(clock, fail_safe=True, soft_timeout=0.05, hard_timeout=1.0)
    db = Database()
    db.down = True
    with pytest.raises(ConnectionError):
        chain.get_or_load("never", db, ttl=TTL)
    chain.close()


def test_fail_safe_per_call_on_a_chain_where_it_is_off_and_the_reverse(
    clock: FakeClock,
) -> None:
    chain, _, _ = make_chain(clock)  # off by default
    db = Database()
    chain.get_or_load("k", db, ttl=TTL, fail_safe=True)  # stored with a fail-safe copy
    clock.advance(TTL + 1)
    db.down = True
    with pytest.raises(ConnectionError):
        chain.get_or_load("k", db, ttl=TTL)  # the chain's default: off
    assert chain.get_or_load("k", db, ttl=TTL, fail_safe=True) == "v1"
    chain.close()

    chain, _, _ = make_chain(clock, fail_safe=True)
    db = Database()
    chain.get_or_load("k", db, ttl=TTL)
    clock.advance(TTL + 1)
    db.down = True
    with pytest.raises(ConnectionError):
        chain.get_or_load("k", db, ttl=TTL, fail_safe=False)
    chain.close()


def test_the_fail_safe_copy_below_l1_serves_a_fresh_process(clock: FakeClock) -> None:
    """L1 lost the key (another process, a restart): the copy kept in the layer below
    serves; a fresh copy there is backfilled into L1 with its stamp."""
    chain, _, l2 = make_chain(clock, fail_safe=True)
    chain.get_or_load("k", lambda: "v1", ttl=TTL)
    assert chain.flush(5)
    on = LoadConfig(fail_safe=True)
    other = Chain([MemoryLayer("L1", clock=clock), l2], load=on, clock=clock)
    clock.advance(4)
    assert other.get_or_load("k", lambda: "unused", ttl=TTL) == "v1"  # fresh below
    value, fresh_left, origin = other.layers[0].get_fresh("k")  # type: ignore[attr-defined]
    assert (value, fresh_left, origin) == ("v1", TTL - 4, TTL)
    third = Chain([MemoryLayer("L1", clock=clock), l2], load=on, clock=clock)
    clock.advance(TTL)

    def down() -> str:
        raise ConnectionError("down")

    assert third.get_or_load("k", down, ttl=TTL) == "v1"  # expired below: fail-safe
    for c in (chain, other, third):
        c.close()


def test_a_layer_without_stamps_gets_plain_entries(clock: FakeClock) -> None:
    fake = FakeLayer("L2", clock=clock, local=True)
    on = LoadConfig(fail_safe=True)
    chain = Chain([MemoryLayer("L1", clock=clock), fake], load=on, clock=clock)
    chain.get_or_load("k", lambda: "v1", ttl=TTL)
    assert chain.flush(5)
    assert fake.data["k"] == ("v1", clock.now + TTL)  # the value itself, its plain TTL
    chain.close()


def test_layer_default_ttls_are_stamped_too(clock: FakeClock) -> None:
    l1 = MemoryLayer("L1", clock=clock, default_ttl=20.0)
    chain = Chain([l1], load=LoadConfig(fail_safe=True, fail_safe_max_age=100.0), clock=clock)
    chain.get_or_load("k", lambda: "v1")  # ttl None: the layer's default
    assert l1._data["k"] == ("v1", clock.now + 20.0, clock.now + 120.0, 20.0)
    chain.close()


def test_loader_errors_are_counted_by_reason(clock: FakeClock) -> None:
    collector = MemoryCollector()
    chain = Chain(
        [MemoryLayer("L1", clock=clock)],
        load=LoadConfig(fail_safe=True, fail_safe_throttle=5.0),
        clock=clock,
        metrics=collector,
    )
    db = Database()
    chain.get_or_load("k", db, ttl=TTL)
    clock.advance(TTL)
    db.down = True
    for _ in range(3):
        chain.get_or_load("k", db, ttl=TTL)
    figures = collector.snapshot().chain_metrics
    assert figures.fail_safe_by_reason == {"loader_error": 1, "throttled": 2}
    assert figures.fail_safe_served == 3
    assert figures.load_failures == 1
    chain.close()


def test_a_reentrant_loader_is_refused_not_served_a_fail_safe_value(clock: FakeClock) -> None:
    chain, _, _ = make_chain(clock, fail_safe=True, hard_timeout=5.0)
    chain.get_or_load("k", lambda: "v1", ttl=TTL)
    clock.advance(TTL + 1)

    def reenter() -> str:
        return str(chain.get_or_load("k", reenter, ttl=TTL))

    with pytest.raises(ReentrantLoadError):
        chain.get_or_load("k", reenter, ttl=TTL)
    chain.close()


def test_a_cycle_through_background_loads_is_refused(clock: FakeClock) -> None:
    """A loads B loads A, each on a background thread (hard timeouts): refused at
    once, not a wait for the hard timeouts."""
    chain, _, _ = make_chain(clock, hard_timeout=30.0)

    def load_a() -> str:
        return "a:" + str(chain.get_or_load("b", load_b, ttl=TTL))

    def load_b() -> str:
        return "b:" + str(chain.get_or_load("a", load_a, ttl=TTL))

    began = time.monotonic()
    with pytest.raises(ReentrantLoadError):
        chain.get_or_load("a", load_a, ttl=TTL)
    assert time.monotonic() - began < 5
    chain.close()


# -- the decorator and the front door ---------------------------------------------------


def test_cached_takes_the_options(clock: FakeClock) -> None:
    chain, _, _ = make_chain(clock)
    db = Database()

    @chain.cached(ttl=TTL, fail_safe=True)
    def user(n: int) -> str:
        return f"{db()}-{n}"

    assert user(1) == "v1-1"
    clock.advance(TTL + 1)
    db.down = True
    assert user(1) == "v1-1"
    chain.close()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("fail_safe", 1, "fail_safe must be a bool, got 1"),
        ("fail_safe", "yes", "fail_safe must be a bool"),
        ("soft_timeout", -1, "soft_timeout must be a finite number of seconds >= 0 or None"),
        ("soft_timeout", float("nan"), "soft_timeout must be a finite number"),
        ("soft_timeout", True, "soft_timeout must be a number of seconds"),
        ("hard_timeout", float("inf"), "hard_timeout must be a finite number"),
        ("hard_timeout", "1", "hard_timeout must be a number of seconds"),
        ("eager_refresh", 1.0, "eager_refresh must be a number in (0, 1) or None"),
        ("eager_refresh", 0, "eager_refresh must be a number in (0, 1)"),
        ("eager_refresh", False, "eager_refresh must be a number in (0, 1)"),
    ],
)
def test_bad_options_are_refused_at_the_front_door(
    clock: FakeClock, option: str, value: object, message: str
) -> None:
    chain, _, _ = make_chain(clock)
    called: list[int] = []
    for _ in range(2):  # the second time from the policies the chain remembers, if any
        with pytest.raises(InvalidValueError) as info:
            chain.get_or_load("k", lambda: called.append(1), ttl=TTL, **{option: value})
        assert message in str(info.value)
    with pytest.raises(InvalidValueError, match=option):
        chain.cached(ttl=TTL, **{option: value})  # at decoration, not at the first call
    assert called == []
    chain.close()


def test_valid_options_are_seconds_and_none_turns_one_off(clock: FakeClock) -> None:
    chain, _, _ = make_chain(clock, fail_safe=True, soft_timeout=0.5)
    policies = chain._loads.policies
    assert policies.resolve(True, 0, 2, 0.5).soft_timeout == 0.0  # type: ignore[union-attr]
    off = policies.resolve(False, None, None, None)
    assert off is None  # every feature off: the plain path
    chain.close()


def test_a_chain_rejects_a_load_setting_of_another_type() -> None:
    from cachechain import ConfigError

    with pytest.raises(ConfigError, match="load must be a LoadConfig"):
        Chain([MemoryLayer("L1")], load={"fail_safe": True})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="clock must be callable"):
        Chain([MemoryLayer("L1")], clock=3)  # type: ignore[arg-type]


def test_get_or_load_without_options_keeps_its_old_path(clock: FakeClock) -> None:
    """A chain whose features are all off takes the plain path: no stamps anywhere."""
    chain, l1, _ = make_chain(clock)
    chain.get_or_load("k", lambda: "v", ttl=TTL)
    assert l1._data["k"] == ("v", clock.now + TTL)
    chain.close()


def test_a_closed_chain_refuses_get_or_load_with_the_features_on(clock: FakeClock) -> None:
    from cachechain import ChainClosedError

    chain, _, _ = make_chain(clock, fail_safe=True, eager_refresh=0.8)
    chain.get_or_load("k", lambda: "v1", ttl=TTL)
    chain.close()
    with pytest.raises(ChainClosedError):
        chain.get_or_load("k", lambda: "v2", ttl=TTL)


def test_a_wrapped_first_layer_is_read_through_its_wrapper(clock: FakeClock) -> None:
    """L1 behind a breaker (``resilient=True``): its stamps are read in stamp reading
    mode through the wrapper, for eager refresh and for the fail-safe copy."""
    from cachechain import LayerConfig

    l1 = MemoryLayer("L1", clock=clock)
    chain = Chain(
        [LayerConfig(l1, resilient=True)],
        load=LoadConfig(fail_safe=True, eager_refresh=0.5),
        clock=clock,
    )
    db = Database()
    chain.get_or_load("k", db, ttl=TTL)
    clock.advance(TTL * 0.6)
    assert chain.get_or_load("k", db, ttl=TTL) == "v1"  # past the point: a refresh
    assert chain._loads.background.wait_idle(5)
    assert db.calls == 2
    clock.advance(TTL + 1)
    db.down = True
    assert chain.get_or_load("k", db, ttl=TTL) == "v1"  # the copy, through the wrapper
    chain.close()


def test_a_hit_below_past_its_refresh_point_starts_a_refresh(clock: FakeClock) -> None:
    chain, l1, _ = make_chain(clock, eager_refresh=0.5)
    db = Database()
    chain.get_or_load("k", db, ttl=TTL)
    assert chain.flush(5)
    l1.clear()  # L1 lost it: the hit comes from below, with its stamp
    clock.advance(TTL * 0.6)
    assert chain.get_or_load("k", db, ttl=TTL) == "v1"
    assert chain._loads.background.wait_idle(5)
    assert db.calls == 2
    chain.close()


def test_an_uncacheable_value_is_handed_over_not_failed_not_stored(clock: FakeClock) -> None:
    """``Uncacheable`` (what a framework backend raises for a response it must not
    cache): every caller gets it raised, nothing is stored, no fail-safe value replaces
    it and the loader is not throttled."""
    chain, _, _ = make_chain(clock, fail_safe=True, fail_safe_throttle=5.0)
    chain.get_or_load("k", lambda: "old", ttl=TTL)
    clock.advance(TTL)  # expired: "old" is a fail-safe candidate

    def refuse() -> Any:
        raise Uncacheable("not this one")

    with pytest.raises(Uncacheable) as caught:
        chain.get_or_load("k", refuse, ttl=TTL)
    assert caught.value.value == "not this one"
    assert chain.get_or_load("k", lambda: "new", ttl=TTL) == "new"  # not throttled
    chain.close()
