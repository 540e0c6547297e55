"""RepairSchedule: when an AsyncWriter retries its repair deletes, without threads."""

from __future__ import annotations

import pytest

from cachechain._repairs import RepairSchedule
from tests.support.fakes import FakeClock


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


def schedule(clock: FakeClock, retry: float = 1.0, max_retry: float = 5.0) -> RepairSchedule:
    return RepairSchedule(retry, max_retry, clock)


def test_the_first_repair_waits_retry_delay(clock: FakeClock) -> None:
    repairs = schedule(clock)
    assert not repairs.due()
    repairs.add("k")
    assert "k" in repairs and len(repairs) == 1
    assert not repairs.due()
    clock.advance(0.999)
    assert not repairs.due()
    clock.advance(0.001)
    assert repairs.due()


def test_a_round_sends_the_oldest_repair_and_one_round_runs_at_a_time(
    clock: FakeClock,
) -> None:
    repairs = schedule(clock)
    for key in ("a", "b", "c"):
        repairs.add(key)
    repairs.add("a")  # waits once, keeps its turn
    assert list(repairs.waiting) == ["a", "b", "c"]
    clock.advance(1)
    assert repairs.start_round() == "a"
    assert repairs.probe == "a" and "a" not in repairs and len(repairs) == 2
    clock.advance(100)
    assert not repairs.due()  # the round in progress has not ended


def test_failed_rounds_back_off_doubling_up_to_max_retry_delay(clock: FakeClock) -> None:
    repairs = schedule(clock, retry=1.0, max_retry=5.0)
    repairs.add("k")  # the next round in 1 s; then 2, 4, 5, 5
    waits = []
    for _ in range(5):
        started = clock.now
        while not repairs.due():
            clock.advance(0.5)
        waits.append(clock.now - started)
        assert repairs.start_round() == "k"
        assert repairs.end_round("k", landed=False)
        repairs.add("k")  # the failed repair waits again
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_landed_repair_starts_the_next_round_at_once_and_resets_the_backoff(
    clock: FakeClock,
) -> None:
    repairs = schedule(clock, retry=1.0, max_retry=8.0)
    repairs.add("a")
    repairs.add("b")
    clock.advance(1)
    assert repairs.start_round() == "a"
    assert repairs.end_round("a", landed=False)
    repairs.add("a")
    assert not repairs.due()  # backed off by 2 s
    clock.advance(2)
    assert repairs.start_round() == "b"
    assert repairs.end_round("b", landed=True)
    assert repairs.due()  # at once, without the clock moving
    assert repairs.start_round() == "a"
    assert repairs.end_round("a", landed=False)
    repairs.add("a")
    clock.advance(0.999)
    assert not repairs.due()  # the backoff restarted from retry_delay
    clock.advance(0.001)
    assert repairs.due()


def test_a_repair_added_during_a_round_does_not_reschedule_it(clock: FakeClock) -> None:
    repairs = schedule(clock)
    repairs.add("a")
    clock.advance(1)
    repairs.start_round()
    repairs.add("b")
    assert repairs.end_round("a", landed=True)
    assert repairs.due() and repairs.start_round() == "b"


def test_end_round_ignores_other_keys(clock: FakeClock) -> None:
    repairs = schedule(clock)
    repairs.add("a")
    clock.advance(1)
    repairs.start_round()
    assert not repairs.end_round("other", landed=True)
    assert repairs.probe == "a"
    assert repairs.end_round("a", landed=True) and repairs.probe is None
    assert not repairs.end_round("a", landed=True)  # the round is over already


def test_a_withdrawn_round_ends_without_changing_the_backoff(clock: FakeClock) -> None:
    repairs = schedule(clock)
    repairs.add("a")
    repairs.add("b")
    clock.advance(1)
    repairs.start_round()
    repairs.withdraw("b")  # not the round's key: nothing happens
    assert repairs.probe == "a"
    repairs.withdraw("a")
    assert repairs.probe is None
    assert repairs.due() and repairs.start_round() == "b"


def test_discard_forgets_a_waiting_repair_only(clock: FakeClock) -> None:
    repairs = schedule(clock)
    repairs.add("a")
    repairs.add("b")
    clock.advance(1)
    repairs.start_round()  # "a"
    assert not repairs.discard("a")  # in the round, not waiting
    assert repairs.probe == "a"
    assert repairs.discard("b") and not repairs.discard("b")
    assert len(repairs) == 0 and not repairs.due()


def test_take_all_and_clear(clock: FakeClock) -> None:
    repairs = schedule(clock)
    for key in ("a", "b", "c"):
        repairs.add(key)
    clock.advance(1)
    repairs.start_round()  # "a"
    assert repairs.take_all() == ["b", "c"]
    assert len(repairs) == 0 and repairs.probe == "a"  # the round goes on
    repairs.add("d")
    assert repairs.clear() == 1
    assert len(repairs) == 0 and repairs.probe is None
    assert repairs.start_round() is None


def test_idle_wait_is_the_time_to_the_next_round_within_bounds(clock: FakeClock) -> None:
    repairs = schedule(clock, retry=1.0, max_retry=8.0)
    assert repairs.idle_wait(30.0) == 1.0  # nothing scheduled: retry_delay at least
    repairs.add("a")  # due in 1 s
    repairs.add("b")
    clock.advance(1)
    repairs.start_round()
    assert repairs.idle_wait(30.0) == 30.0  # the round's end schedules the next
    repairs.end_round("a", landed=False)  # due in 2 s
    assert repairs.idle_wait(30.0) == 2.0
    assert repairs.idle_wait(0.5) == 0.5
    clock.advance(1.75)
    assert repairs.idle_wait(30.0) == 1.0  # never below retry_delay


def test_repr_shows_the_state(clock: FakeClock) -> None:
    repairs = schedule(clock)
    repairs.add("a")
    assert repr(repairs) == "<RepairSchedule waiting=1 probe=None delay=2.0>"
