"""The mutation fence on its own: tickets, mutations, and "backfill only if unchanged"
(docs/design.md, "Consistency between reads, backfills and mutations")."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import pytest

from cachechain._fence import MutationFence


def keys_in_one_stripe(n: int) -> list[str]:
    """``n`` distinct keys that share a stripe."""
    first = "k0"
    stripe = hash(first) & 63
    found = [first]
    i = 1
    while len(found) < n:
        key = f"k{i}"
        if hash(key) & 63 == stripe:
            found.append(key)
        i += 1
    return found


def key_in_another_stripe(key: str) -> str:
    return next(f"o{i}" for i in range(10_000) if hash(f"o{i}") & 63 != hash(key) & 63)


def test_a_backfill_with_a_ticket_and_no_mutation_since_runs() -> None:
    fence = MutationFence()
    ticket = fence.ticket("k")
    assert ticket is not None
    calls: list[tuple[Any, ...]] = []
    assert fence.if_unchanged(ticket, lambda *a: calls.append(a), 1, 2) is True
    assert calls == [(1, 2)]
    assert fence.if_unchanged(ticket, calls.append, 3) is True  # a ticket stays good


def test_a_mutation_since_the_ticket_refuses_the_backfill() -> None:
    fence = MutationFence()
    ticket = fence.ticket("k")
    with fence.mutating(["k"], lambda: None):
        pass
    calls: list[int] = []
    assert fence.if_unchanged(ticket, calls.append, 1) is False
    assert calls == []
    assert fence.if_unchanged(fence.ticket("k"), calls.append, 2) is True  # a new ticket
    assert calls == [2]


def test_no_ticket_while_a_mutation_of_the_stripe_is_in_progress() -> None:
    fence = MutationFence()
    same, other = keys_in_one_stripe(2)[1], key_in_another_stripe("k0")
    with fence.mutating(["k0"], lambda: None):
        assert fence.ticket("k0") is None
        assert fence.ticket(same) is None  # a stripe, not a key
        assert fence.ticket(other) is not None
    assert fence.ticket("k0") is not None
    assert fence.if_unchanged(None, pytest.fail) is False


def test_a_batch_ticket_taken_during_a_mutation_is_refused_during_and_after_it() -> None:
    """``tickets()`` gives a key a ticket while its stripe is being mutated (a copy of
    the sequence numbers): ``if_unchanged`` refuses it while the mutation runs and
    after it ended; another stripe's ticket stays good."""
    fence = MutationFence()
    other = key_in_another_stripe("k0")
    calls: list[str] = []
    with fence.mutating(["k0"], lambda: None):
        tickets = fence.tickets()
        assert tickets["k0"] is not None
        assert fence.if_unchanged(tickets["k0"], pytest.fail) is False  # running
        assert fence.if_unchanged_many(tickets, {"k0": "k0"}, pytest.fail) == 0
    assert fence.if_unchanged(tickets["k0"], pytest.fail) is False  # ended: bumped
    assert fence.if_unchanged_many(tickets, {"k0": "k0"}, pytest.fail) == 0
    assert fence.if_unchanged(tickets[other], calls.append, other) is True
    assert tickets[other] == fence.ticket(other)
    assert calls == [other]


def test_a_ticket_taken_before_a_mutation_began_is_refused_while_it_runs() -> None:
    fence = MutationFence()
    ticket = fence.ticket("k")
    with fence.mutating(["k"], lambda: None):
        assert fence.if_unchanged(ticket, pytest.fail) is False


def test_a_mutation_of_another_stripe_leaves_the_ticket_good() -> None:
    fence = MutationFence()
    other = key_in_another_stripe("k")
    ticket = fence.ticket("k")
    with fence.mutating([other], lambda: None):
        assert fence.if_unchanged(ticket, lambda: None) is True
    assert fence.if_unchanged(ticket, lambda: None) is True


def test_the_end_of_a_mutation_runs_then_under_the_lock_and_keeps_its_result() -> None:
    fence = MutationFence()
    seen: list[bool] = []

    def then() -> str:
        seen.append(fence._lock.locked())
        assert fence.ticket("a") is not None  # the stripes have ended already
        return "written"

    with fence.mutating(["a", "b"], then) as mutation:
        assert seen == []  # not before the block ends
        assert fence.ticket("a") is None and fence.ticket("b") is None
    assert seen == [True]
    assert mutation.result == "written"


def test_a_backfill_runs_under_the_lock() -> None:
    fence = MutationFence()
    seen: list[bool] = []
    assert fence.if_unchanged(fence.ticket("k"), lambda: seen.append(fence._lock.locked()))
    assert seen == [True]


def test_a_block_that_raises_still_ends_the_mutation_and_writes_the_first_layer() -> None:
    fence = MutationFence()
    ends: list[str] = []
    with pytest.raises(KeyError), fence.mutating(["k"], lambda: ends.append("end")):
        raise KeyError("boom")
    assert ends == ["end"]
    assert fence.ticket("k") is not None  # not left active


def test_what_then_raises_propagates_and_the_stripes_are_ended() -> None:
    fence = MutationFence()

    def then() -> None:
        raise RuntimeError("layer down")

    with pytest.raises(RuntimeError), fence.mutating(["k"], then):
        pass
    assert fence.ticket("k") is not None
    assert not fence._lock.locked()


def test_what_a_backfill_raises_propagates_and_releases_the_lock() -> None:
    fence = MutationFence()

    def fill() -> None:
        raise RuntimeError("L1 full")

    with pytest.raises(RuntimeError):
        fence.if_unchanged(fence.ticket("k"), fill)
    assert not fence._lock.locked()


def test_keys_sharing_a_stripe_make_one_mutation_of_it() -> None:
    fence = MutationFence()
    keys = keys_in_one_stripe(3)
    ticket = fence.ticket(keys[0])
    with fence.mutating(keys, lambda: None):
        assert fence.ticket(keys[0]) is None
    assert fence.ticket(keys[0]) is not None  # not stuck at a count above zero
    assert fence.if_unchanged(ticket, pytest.fail) is False


def test_overlapping_mutations_keep_the_stripe_busy_until_the_last_ends() -> None:
    fence = MutationFence()
    first = fence.mutating(["k"], lambda: 1)
    second = fence.mutating(["k"], lambda: 2)
    with first:
        pass
    assert fence.ticket("k") is None  # the second is still in progress
    with second:
        pass
    assert (first.result, second.result) == (1, 2)
    assert fence.ticket("k") is not None


def test_a_forked_child_forgets_the_mutations_of_the_parents_threads() -> None:
    fence = MutationFence()
    fence.mutating(["k"], lambda: None)  # begun by a thread that does not exist there
    assert fence.ticket("k") is None
    fence._after_fork()
    assert fence.ticket("k") is not None
    assert not fence._lock.locked()


# -- threads ---------------------------------------------------------------------------


def run(*targets: Callable[[], object]) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
        assert not t.is_alive()


def test_a_read_that_saw_the_old_value_never_writes_it_back_after_the_mutation() -> None:
    """The race the fence exists for: a reader reads the old value below, a set replaces
    it (below, then in the first layer), then the reader backfills."""
    fence = MutationFence()
    lower: dict[str, str] = {"k": "old"}
    first: dict[str, str] = {}
    read, mutated = threading.Event(), threading.Event()

    def reader() -> None:
        ticket = fence.ticket("k")
        value = lower["k"]
        read.set()
        assert mutated.wait(10)
        fence.if_unchanged(ticket, first.__setitem__, "k", value)

    def writer() -> None:
        assert read.wait(10)
        with fence.mutating(["k"], lambda: first.__setitem__("k", "new")):
            lower["k"] = "new"
        mutated.set()

    run(reader, writer)
    assert first == {"k": "new"}


def test_a_read_during_a_mutation_never_backfills() -> None:
    fence = MutationFence()
    lower: dict[str, str] = {"k": "old"}
    first: dict[str, str] = {}
    begun, read = threading.Event(), threading.Event()
    refused: list[bool] = []

    def writer() -> None:
        with fence.mutating(["k"], lambda: first.pop("k", None)):
            begun.set()
            assert read.wait(10)
            del lower["k"]

    def reader() -> None:
        assert begun.wait(10)
        ticket = fence.ticket("k")
        value = lower["k"]  # still the old value: the delete has not reached it
        read.set()
        refused.append(not fence.if_unchanged(ticket, first.__setitem__, "k", value))

    run(writer, reader)
    assert refused == [True]
    assert first == {} and lower == {}


def test_a_mutation_ends_after_a_backfill_already_under_way() -> None:
    """A backfill that passed the check writes the first layer under the lock; the
    mutation that begins meanwhile waits for it, so its own write comes last."""
    fence = MutationFence()
    first: dict[str, str] = {}
    order: list[str] = []
    filling, release, done = threading.Event(), threading.Event(), threading.Event()

    def fill(value: str) -> None:
        filling.set()
        assert release.wait(10)
        first["k"] = value
        order.append("backfill")

    def end() -> None:
        first["k"] = "new"
        order.append("mutation")

    def reader() -> None:
        assert fence.if_unchanged(fence.ticket("k"), fill, "old")

    def writer() -> None:
        assert filling.wait(10)
        with fence.mutating(["k"], end):
            pass
        done.set()

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    assert filling.wait(10)
    assert not done.wait(0.05)  # the mutation cannot begin while the backfill runs
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["backfill", "mutation"]
    assert first == {"k": "new"}


def test_many_readers_and_writers_leave_the_first_layer_in_step_with_the_lower() -> None:
    """Writers set increasing values below and in the first layer; readers copy what
    they read below into the first layer through the fence. Once all are done, the
    first layer has no value older than the lower layer's."""
    fence = MutationFence()
    keys = [*keys_in_one_stripe(2), key_in_another_stripe("k0")]
    lower: dict[str, int] = dict.fromkeys(keys, 0)
    first: dict[str, int] = {}
    start = threading.Barrier(8)

    def writer(key: str) -> Callable[[], None]:
        def go() -> None:
            start.wait(10)
            for i in range(1, 300):
                with fence.mutating([key], functools.partial(first.__setitem__, key, i)):
                    lower[key] = i

        return go

    def reader() -> None:
        start.wait(10)
        for i in range(900):
            key = keys[i % len(keys)]
            ticket = fence.ticket(key)
            value = lower[key]
            fence.if_unchanged(ticket, first.__setitem__, key, value)

    run(*(writer(k) for k in keys), *(reader for _ in range(5)))
    assert first == lower == dict.fromkeys(keys, 299)


def test_a_batch_backfill_passes_only_the_unchanged_keys_under_one_lock() -> None:
    """``if_unchanged_many`` (``Chain.get_many``'s batch backfill, issue 14): one call
    with the items whose stripe saw no mutation since their ticket."""
    fence = MutationFence()
    stay, moved = "stay", key_in_another_stripe("stay")
    tickets = fence.tickets()
    with fence.mutating([moved], lambda: None):
        pass  # a write of ``moved`` after its ticket was taken
    held: list[bool] = []
    got: list[dict[str, str]] = []

    def fill(items: dict[str, str]) -> None:
        held.append(fence._lock.locked())
        got.append(dict(items))

    hits = {stay: stay, moved: moved}
    assert fence.if_unchanged_many(tickets, hits, fill) == 1
    assert got == [{stay: stay}] and held == [True]
    assert fence.if_unchanged_many(tickets, {moved: moved}, fill) == 0
    assert got == [{stay: stay}]  # not called for nothing


def test_a_batch_backfill_with_no_stripe_moved_passes_the_hits_themselves() -> None:
    """The usual batch backfill (issue 14): no stripe moved since the tickets and none
    is being mutated, so ``fn`` gets the caller's mapping, not a filtered copy."""
    fence = MutationFence()
    tickets = fence.tickets()
    hits = {f"k{i}": i for i in range(100)}
    got: list[object] = []
    assert fence.if_unchanged_many(tickets, hits, got.append) == 100
    assert got == [hits] and got[0] is hits


def test_a_batch_backfill_refuses_a_stripe_mutated_since_before_the_tickets() -> None:
    """A mutation in progress when the tickets were taken has not bumped its stripe
    yet: the sequence numbers are all as taken, and its key is still refused (the
    fast path also asks that no stripe be active)."""
    fence = MutationFence()
    other = key_in_another_stripe("k0")
    got: list[dict[str, int]] = []
    with fence.mutating(["k0"], lambda: None):
        tickets = fence.tickets()
        assert fence.if_unchanged_many(tickets, {"k0": 0, other: 1}, got.append) == 1
    assert got == [{other: 1}]
