"""Loader timeouts and background loads (issue 12, item 2).

A caller waits ``soft_timeout`` (with a fail-safe value) or ``hard_timeout`` at most,
counted from the start of the load, whether it started the load or joined it; the
load goes on in the background, bounded per chain, and ``close()`` waits for it within
its deadline. The chain's clock is a :class:`FakeClock` (it decides how much of a
budget is spent); a caller's wait itself is real, bounded by the timeouts under test.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from cachechain import MISSING, Chain, LoadTimeoutError, MemoryCollector, MemoryLayer
from cachechain._config import LoadConfig
from cachechain.testing import FakeClock

TTL = 10.0


class Slow:
    """A loader that blocks until :attr:`release` is set (10 s at most)."""

    def __init__(self, value: Any = "new", *, error: Exception | None = None) -> None:
        self.value = value
        self.error = error
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> Any:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(10), "the test never released the loader"
        if self.error is not None:
            raise self.error
        return self.value


def chain_with(clock: FakeClock, metrics: Any = None, **load: Any) -> Chain:
    return Chain(
        [MemoryLayer("L1", clock=clock), MemoryLayer("L2", clock=clock)],
        load=LoadConfig(**load),
        clock=clock,
        coherence=False,
        metrics=metrics,
    )


def expired(chain: Chain, clock: FakeClock, key: str = "k") -> None:
    """Store ``old`` under ``key`` with a fail-safe copy, then let it expire."""
    chain.get_or_load(key, lambda: "old", ttl=TTL, fail_safe=True)
    clock.advance(TTL + 1)


def test_hard_timeout_without_a_fail_safe_value_raises_and_the_load_goes_on() -> None:
    clock = FakeClock()
    chain = chain_with(clock, hard_timeout=0.05)
    slow = Slow()
    began = time.monotonic()
    with pytest.raises(LoadTimeoutError, match="hard_timeout"):
        chain.get_or_load("k", slow, ttl=TTL)
    assert 0.04 <= time.monotonic() - began < 1.0
    slow.release.set()
    assert chain._loads.background.wait_idle(5)
    assert chain.get("k") == "new"  # stored when it arrived
    chain.close()


def test_hard_timeout_with_a_fail_safe_value_serves_it() -> None:
    clock = FakeClock()
    collector = MemoryCollector()
    chain = chain_with(clock, collector, hard_timeout=0.05)
    expired(chain, clock)
    slow = Slow()
    assert chain.get_or_load("k", slow, ttl=TTL, fail_safe=True) == "old"
    slow.release.set()
    assert chain._loads.background.wait_idle(5)
    assert chain.get("k") == "new"
    assert collector.snapshot().chain_metrics.fail_safe_by_reason == {"hard_timeout": 1}
    chain.close()


def test_a_load_that_ends_in_time_is_returned() -> None:
    clock = FakeClock()
    chain = chain_with(clock, fail_safe=True, soft_timeout=5.0, hard_timeout=10.0)
    expired(chain, clock)
    slow = Slow()
    slow.release.set()  # no wait at all
    assert chain.get_or_load("k", slow, ttl=TTL) == "new"
    chain.close()


def test_a_joining_caller_obeys_its_own_hard_timeout() -> None:
    """The leader loads without timeouts, on its own thread; a caller that joins with
    ``hard_timeout`` stops waiting at it, and the leader still gets the value."""
    clock = FakeClock()
    chain = chain_with(clock)
    slow = Slow()
    got: list[Any] = []
    leader = threading.Thread(target=lambda: got.append(chain.get_or_load("k", slow, ttl=TTL)))
    leader.start()
    assert slow.entered.wait(5)
    with pytest.raises(LoadTimeoutError):
        chain.get_or_load("k", slow, ttl=TTL, hard_timeout=0.05)
    slow.release.set()
    leader.join(5)
    assert got == ["new"]
    assert slow.calls == 1
    chain.close()


def test_timeouts_count_from_the_start_of_the_load() -> None:
    """A caller that joins a load begun 1 s ago (on the chain's clock) with a soft
    timeout of 1 s gets the fail-safe value at once (counted from its own start, it
    would wait 1 s: far from what a loaded machine adds to a call)."""
    clock = FakeClock()
    chain = chain_with(clock, fail_safe=True, soft_timeout=1.0)
    expired(chain, clock)
    slow = Slow()
    assert chain.get_or_load("k", slow, ttl=TTL) == "old"  # the leader: 1 s
    clock.advance(1.0)
    began = time.monotonic()
    assert chain.get_or_load("k", slow, ttl=TTL) == "old"  # joins: nothing left to wait
    assert time.monotonic() - began < 0.5
    assert slow.calls == 1
    slow.release.set()
    assert chain._loads.background.wait_idle(5)
    chain.close()


def test_a_failing_background_load_serves_the_fail_safe_value_to_its_waiters() -> None:
    clock = FakeClock()
    chain = chain_with(clock, fail_safe=True, soft_timeout=5.0)
    expired(chain, clock)
    slow = Slow(error=ConnectionError("down"))
    values: list[Any] = []
    waiter = threading.Thread(target=lambda: values.append(chain.get_or_load("k", slow, ttl=TTL)))
    waiter.start()
    assert slow.entered.wait(5)
    slow.release.set()
    waiter.join(5)
    assert values == ["old"]
    assert chain._loads.throttle.holds("k")  # not called again for the throttle
    chain.close()


def test_a_failing_background_load_reaches_a_waiter_without_a_value() -> None:
    clock = FakeClock()
    chain = chain_with(clock, hard_timeout=5.0)
    slow = Slow(error=ConnectionError("down"))
    slow.release.set()
    with pytest.raises(ConnectionError):
        chain.get_or_load("k", slow, ttl=TTL)
    chain.close()


def test_background_loads_are_bounded_and_counted() -> None:
    clock = FakeClock()
    collector = MemoryCollector()
    chain = chain_with(clock, collector, max_background_loads=1, hard_timeout=0.02)
    expired(chain, clock, "b")
    slow = Slow()
    with pytest.raises(LoadTimeoutError):
        chain.get_or_load("a", slow, ttl=TTL)  # runs on, holding the only slot
    assert chain._loads.background.running == 1
    other = Slow()
    with pytest.raises(LoadTimeoutError, match="no room"):
        chain.get_or_load("c", other, ttl=TTL)
    assert chain.get_or_load("b", other, ttl=TTL, fail_safe=True) == "old"
    assert other.calls == 0
    slow.release.set()
    assert chain._loads.background.wait_idle(5)
    assert chain._loads.background.running == 0
    figures = collector.snapshot().chain_metrics
    # stored: the first load of "b" (a timed load too) and "a"
    assert figures.background_loads_by_outcome == {"rejected": 2, "stored": 2}
    assert figures.fail_safe_by_reason == {"hard_timeout": 1}  # no room: as a timeout
    for thread in threading.enumerate():  # each ends right after it counted itself out
        if thread.name == "cachechain-load-default":
            thread.join(5)
    assert not [t for t in threading.enumerate() if t.name == "cachechain-load-default"]
    chain.close()


def test_close_waits_for_background_loads_within_its_deadline() -> None:
    clock = FakeClock()
    chain = chain_with(clock, hard_timeout=0.01)
    slow = Slow()
    with pytest.raises(LoadTimeoutError):
        chain.get_or_load("k", slow, ttl=TTL)
    background = chain._loads.background
    closing = threading.Event()
    wait = background.close

    def spied_close(timeout: float) -> int:
        closing.set()
        return wait(timeout)

    background.close = spied_close  # type: ignore[method-assign]
    closer = threading.Thread(target=chain.close, args=(5,))
    closer.start()
    assert closing.wait(5)
    slow.release.set()  # the load ends while close() waits for it
    closer.join(5)
    assert not closer.is_alive()
    assert chain.layers[0].get("k") == "new"  # its value was stored
    assert chain.layers[1].get("k") == "new"  # and written below before the writer closed


def test_close_abandons_a_load_past_its_deadline() -> None:
    clock = FakeClock()
    collector = MemoryCollector()
    chain = chain_with(clock, collector, hard_timeout=0.01)
    slow = Slow()
    with pytest.raises(LoadTimeoutError):
        chain.get_or_load("k", slow, ttl=TTL)
    began = time.monotonic()
    chain.close(0.05)
    assert time.monotonic() - began < 1.0
    slow.release.set()
    # The abandoned thread ends by itself; wait for it through the counter it keeps.
    assert chain._loads.background.wait_idle(5)
    assert chain.layers[0].get_with_ttl("k") == (MISSING, None)  # nothing stored
    assert collector.snapshot().chain_metrics.background_loads_by_outcome == {"abandoned": 1}


def test_after_close_no_background_load_starts() -> None:
    clock = FakeClock()
    chain = chain_with(clock, eager_refresh=0.5)
    chain.get_or_load("k", lambda: "v", ttl=TTL)
    chain.close()
    assert not chain._loads.background.start(lambda: None)
