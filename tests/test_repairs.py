"""RepairSchedule: when an AsyncWriter retries its repair deletes, without threads."""

from __future__ import annotations

import pytest

from cachechain._repairs import RepairSchedule
from tests.support.fakes import FakeClock


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


def schedule(
    clock: FakeClock, retry: float = 1.0, max_retry: float = 5.0, max_repairs: int = 10_000
) -> RepairSchedule:
    return RepairSchedule(retry, max_retry, clock, max_repairs)


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
    repairs = schedule(clock, max_repairs=1)
    repairs.add("a")
    repairs.add("b")
    assert repr(repairs) == "<RepairSchedule waiting=0 probe=None delay=2.0 overflowed>"


# -- the cap: past max_repairs the layer is handled as a whole ----------------------------


def test_past_max_repairs_every_repair_is_given_up_and_the_schedule_overflows(
    clock: FakeClock,
) -> None:
    repairs = schedule(clock, max_repairs=3)
    assert repairs.max_repairs == 3
    for key in ("a", "b", "c"):
        assert repairs.add(key) == ()
    assert repairs.add("a") == ()  # a key waits once: still 3
    assert not repairs.overflowed
    assert list(repairs.add("d")) == ["a", "b", "c", "d"]  # for the caller to let go
    assert repairs.overflowed and repairs.overflows == 1 and len(repairs) == 0
    for i in range(10_000):  # covered by the next overflow round: nothing is kept
        assert list(repairs.add(f"k{i}")) == [f"k{i}"]
    assert len(repairs) == 0 and repairs.overflows == 1


def test_overflow_rounds_keep_the_backoff_and_one_runs_at_a_time(clock: FakeClock) -> None:
    repairs = schedule(clock, retry=1.0, max_retry=4.0, max_repairs=1)
    repairs.add("a")  # the first round in 1 s
    repairs.add("b")  # overflows: the rounds keep that schedule
    assert not repairs.due()
    waits = []
    for _ in range(4):
        started = clock.now
        while not repairs.due():
            clock.advance(0.5)
        waits.append(clock.now - started)
        assert repairs.start_overflow() == []
        assert repairs.handling and not repairs.due()
        assert not repairs.end_overflow(handled=False)
    assert waits == [1.0, 2.0, 4.0, 4.0]
    clock.advance(4)
    repairs.start_overflow()
    clock.advance(100)
    assert not repairs.due()  # one round at a time
    assert repairs.overflowed and repairs.overflows == 1


def test_a_handled_round_ends_the_overflow_and_resets_the_backoff(clock: FakeClock) -> None:
    repairs = schedule(clock, retry=1.0, max_retry=8.0, max_repairs=1)
    repairs.add("a")
    repairs.add("b")
    clock.advance(1)
    repairs.start_overflow()
    assert repairs.end_overflow(handled=True)
    assert not repairs.overflowed and not repairs.due()  # nothing waits
    assert repairs.add("c") == ()  # kept one by one again, after retry_delay
    assert not repairs.due()
    clock.advance(1)
    assert repairs.due() and repairs.start_round() == "c"


def test_repairs_that_arrive_during_a_round_are_kept_one_by_one(clock: FakeClock) -> None:
    """The handler may have acted before those writes failed: they still owe a delete."""
    repairs = schedule(clock, retry=1.0, max_retry=8.0, max_repairs=2)
    for key in ("a", "b", "c"):
        repairs.add(key)
    assert repairs.add("early") == ("early",)  # before the round: the round covers it
    clock.advance(1)
    repairs.start_overflow()
    assert repairs.add("late") == ()  # during the round: kept
    assert "late" in repairs
    assert repairs.end_overflow(handled=True)
    assert list(repairs.waiting) == ["late"]
    assert repairs.due() and repairs.start_round() == "late"  # at once


def test_repairs_kept_during_a_failed_round_are_covered_by_the_next(clock: FakeClock) -> None:
    repairs = schedule(clock, max_repairs=1)
    repairs.add("a")
    repairs.add("b")
    clock.advance(1)
    repairs.start_overflow()
    repairs.add("late")
    assert not repairs.end_overflow(handled=False)
    assert "late" in repairs  # still held for now...
    clock.advance(2)
    assert repairs.start_overflow() == ["late"]  # ...and given up to the next round


def test_passing_the_cap_during_a_round_renews_the_overflow(clock: FakeClock) -> None:
    repairs = schedule(clock, max_repairs=2)
    for key in ("a", "b", "c"):
        repairs.add(key)
    clock.advance(1)
    repairs.start_overflow()
    repairs.add("x")
    repairs.add("y")
    assert list(repairs.add("z")) == ["x", "y", "z"]
    assert not repairs.end_overflow(handled=True)  # those may predate nothing it did
    assert repairs.overflowed and repairs.overflows == 1  # the same overflow
    assert repairs.due()  # the layer answers: the next round at once
    repairs.start_overflow()
    assert repairs.end_overflow(handled=True) and not repairs.overflowed


def test_hurry_asks_for_an_overflow_round_now(clock: FakeClock) -> None:
    repairs = schedule(clock, retry=60.0, max_retry=60.0, max_repairs=1)
    assert not repairs.hurry()  # not overflowed: nothing to hurry
    repairs.add("a")
    repairs.add("b")
    assert not repairs.due()  # 60 s away
    assert repairs.hurry() and repairs.hurried and repairs.due()
    repairs.start_overflow()
    assert not repairs.hurried
    assert not repairs.hurry()  # a round in progress is the answer already
    repairs.end_overflow(handled=False)
    assert not repairs.due()  # backed off again
    assert repairs.idle_wait(30.0) == 30.0


def test_a_round_of_repairs_in_progress_delays_the_overflow_round(clock: FakeClock) -> None:
    repairs = schedule(clock, max_repairs=2)
    repairs.add("a")
    repairs.add("b")
    clock.advance(1)
    assert repairs.start_round() == "a"  # the delete of "a" is on its way
    repairs.add("c")
    repairs.add("d")  # 3 waiting: overflows
    assert repairs.overflowed and repairs.hurry()
    assert not repairs.due()  # the round of "a" has not ended
    assert repairs.end_round("a", landed=True)
    assert repairs.due()


def test_idle_wait_while_an_overflow_round_runs_and_clear_forgets_the_overflow(
    clock: FakeClock,
) -> None:
    repairs = schedule(clock, max_repairs=1)
    repairs.add("a")
    repairs.add("b")
    clock.advance(1)
    repairs.start_overflow()
    repairs.add("late")
    assert repairs.idle_wait(30.0) == 30.0  # the round's end schedules the next
    assert repairs.clear() == 1
    assert not repairs.overflowed and not repairs.handling and not repairs.due()
    assert repairs.add("k") == ()
