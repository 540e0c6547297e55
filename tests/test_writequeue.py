"""WriteQueue: the keyed, coalescing, bounded queue of an AsyncWriter, without threads."""

from __future__ import annotations

from cachechain._writequeue import (
    COALESCED,
    DELETE_OP,
    FULL,
    QUEUED,
    SET,
    Op,
    WriteQueue,
)


def set_op(value: object, ttl: float | None = None) -> Op:
    return (SET, value, ttl)


def drain(queue: WriteQueue) -> list[tuple[str, Op]]:
    """Take and finish every queued operation, in order."""
    taken = []
    while (item := queue.take()) is not None:
        taken.append(item)
        queue.done(item[0])
    return taken


def test_operations_come_out_first_in_first_out() -> None:
    queue = WriteQueue(10)
    assert queue.offer("a", set_op(1)) == QUEUED
    assert queue.offer("b", DELETE_OP) == QUEUED
    assert queue.offer("c", set_op(3, 30.0)) == QUEUED
    assert len(queue) == 3
    assert drain(queue) == [("a", set_op(1)), ("b", DELETE_OP), ("c", set_op(3, 30.0))]
    assert len(queue) == 0 and queue.idle() and not queue.held


def test_the_last_write_of_a_key_wins_and_keeps_the_first_arrival_s_turn() -> None:
    queue = WriteQueue(10)
    queue.offer("a", set_op(1))
    queue.offer("b", set_op(2))
    assert queue.offer("a", set_op(10)) == COALESCED
    assert queue.offer("b", DELETE_OP) == COALESCED
    assert queue.offer("b", set_op(20)) == COALESCED
    assert len(queue) == 2
    assert drain(queue) == [("a", set_op(10)), ("b", set_op(20))]


def test_a_full_queue_refuses_sets_of_new_keys_but_holds_them() -> None:
    queue = WriteQueue(2)
    queue.offer("a", set_op(1))
    queue.offer("b", set_op(2))
    assert not queue.has_room() and not queue.has_room("c")
    assert queue.offer("c", set_op(3)) == FULL
    assert not queue.queued("c") and "c" in queue.held  # held while its caller waits
    assert queue.has_room("a")  # a set of a queued key only replaces its operation
    assert queue.offer("a", set_op(10)) == COALESCED
    queue.release("c")  # the caller gave up
    assert "c" not in queue.held and len(queue) == 2


def test_deletes_are_never_refused_and_may_exceed_the_bound() -> None:
    queue = WriteQueue(1)
    queue.offer("a", set_op(1))
    assert queue.offer("b", DELETE_OP) == QUEUED
    assert queue.offer("c", DELETE_OP) == QUEUED
    assert len(queue) == 3 and queue.capacity == 1
    assert queue.offer("d", set_op(4)) == FULL  # sets still see the bound
    queue.release("d")
    assert [key for key, _ in drain(queue)] == ["a", "b", "c"]


def test_room_frees_up_as_operations_are_taken() -> None:
    queue = WriteQueue(1)
    queue.offer("a", set_op(1))
    assert not queue.has_room("b")
    assert queue.take() == ("a", set_op(1))
    assert queue.has_room("b")  # a key in flight takes no room
    assert queue.offer("b", set_op(2)) == QUEUED


def test_a_key_in_flight_is_not_taken_again_until_done() -> None:
    queue = WriteQueue(10)
    queue.offer("k", set_op(1))
    queue.offer("j", set_op(2))
    assert queue.take() == ("k", set_op(1))
    assert queue.in_flight("k") and queue.inflight_count() == 1
    queue.offer("k", DELETE_OP)  # queued behind the write in flight
    assert queue.take() == ("j", set_op(2))  # "k" is skipped: in flight
    assert queue.take() is None and not queue.ready()
    queue.done("j")
    assert queue.take() is None  # "k" still in flight
    queue.done("k")
    assert queue.ready()
    assert queue.take() == ("k", DELETE_OP)
    queue.done("k")
    assert queue.idle() and not queue.held


def test_a_key_is_held_from_its_offer_until_its_last_write_is_done() -> None:
    queue = WriteQueue(10)
    queue.offer("k", set_op(1))
    assert queue.held == {"k"}
    queue.take()
    queue.offer("k", set_op(2))  # a newer write while one is in flight
    queue.done("k")
    assert queue.held == {"k"}  # still queued
    queue.take()
    queue.done("k", keep=True)  # e.g. a repair follows: the owner keeps holding it
    assert queue.held == {"k"} and queue.idle()
    queue.release("k")
    assert not queue.held


def test_hold_and_release_for_keys_the_owner_keeps() -> None:
    queue = WriteQueue(10)
    queue.hold("r")
    assert queue.held == {"r"} and queue.idle()
    queue.offer("r", DELETE_OP)
    queue.release("r")  # queued: still held
    assert "r" in queue.held
    queue.take()
    queue.release("r")  # in flight: still held
    assert "r" in queue.held
    queue.done("r")
    assert not queue.held


def test_the_held_set_is_one_object_for_lock_free_readers() -> None:
    queue = WriteQueue(10)
    held = queue.held
    queue.offer("a", set_op(1))
    queue.hold("b")
    queue.pop_all()
    queue.release_all()
    assert queue.held is held and not held


def test_cancel_set_removes_only_a_queued_set() -> None:
    queue = WriteQueue(10)
    queue.offer("s", set_op(1))
    queue.offer("d", DELETE_OP)
    queue.offer("f", set_op(3))
    queue.take()  # "s" in flight
    queue.offer("s", set_op(2))
    assert queue.cancel_set("s")  # the queued one; the write in flight goes on
    assert "s" in queue.held and queue.in_flight("s")
    assert not queue.cancel_set("d")  # deletes are never cancelled
    assert not queue.cancel_set("absent")
    assert queue.cancel_set("f") and "f" not in queue.held
    assert not queue.cancel_set("f")
    queue.done("s")
    assert queue.held == {"d"}


def test_queue_delete_keeps_a_newer_operation() -> None:
    queue = WriteQueue(1)
    queue.offer("a", set_op(1))
    assert not queue.queue_delete("a")  # the queued set is newer than the repair
    assert queue.queue_delete("b")  # never full
    assert not queue.queue_delete("b")
    assert queue.held == {"a", "b"}
    assert drain(queue) == [("a", set_op(1)), ("b", DELETE_OP)]


def test_pop_all_leaves_the_keys_held_until_released() -> None:
    queue = WriteQueue(10)
    queue.offer("a", set_op(1))
    queue.offer("b", DELETE_OP)
    queue.offer("c", set_op(3))
    queue.take()  # "a" in flight
    assert queue.pop_all() == [("b", DELETE_OP), ("c", set_op(3))]
    assert len(queue) == 0 and not queue.idle()
    assert queue.held == {"a", "b", "c"}
    queue.release("c")
    assert queue.held == {"a", "b"}
    queue.release_all()  # keeps only what is queued or in flight
    assert queue.held == {"a"}
    queue.done("a")
    assert queue.idle() and not queue.held


def test_repr_shows_the_counts() -> None:
    queue = WriteQueue(5)
    queue.offer("a", set_op(1))
    assert repr(queue) == "<WriteQueue queued=1 inflight=0 held=1 capacity=5>"
