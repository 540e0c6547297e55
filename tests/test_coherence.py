"""Coherence (issue 10, points 2-3): the invalidation journal, the namespace generation,
the namespaced layer, and a chain's ``clear()`` and receiver, without a poller thread
wherever the behaviour allows it.

The journals run over one :class:`FakeLayer` (the "memcached" every process shares)
with :class:`FakeClock` clocks, and the tests call :meth:`MemcachedJournal.poll`
themselves. A chain's journal is kept thread-less by the ``no_poller`` fixture
(``start`` only records the receiver), so its polls are the test's too. The few tests
that need the real poller thread say so and synchronise on events.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from cachechain import (
    MISSING,
    Chain,
    CoherenceConfig,
    ConfigError,
    LayerConfig,
    LayerTimeoutError,
    LayerUnavailableError,
    MemcachedLayer,
    MemoryCollector,
    MemoryLayer,
    SignedPickleCodec,
    _chain_clear,
)
from cachechain._journal import (
    _WATCHDOG,
    BATCH,
    BATCH_BYTES,
    RING_BITS,
    MemcachedJournal,
    batches_of,
)
from cachechain._namespace import Namespace, NamespacedLayer
from cachechain.layers._base import BaseLayer
from tests.support.fakes import FakeClock, FakeLayer
from tests.support.servers import MemcachedProcess

# Where a namespace over a layer without a codec (a FakeLayer) keeps its bookkeeping.
RESERVED = "__cachechain__/plain/"
GENERATION_KEY = RESERVED + "gen"
HEAD_KEY = RESERVED + "j/head"


def slot_key(seq: int, slots: int) -> str:
    return f"{RESERVED}j/{seq % slots}"


BOUND = 0.1
INTERVAL = 0.04
WAIT = 10.0  # seconds an event wait may take before the test fails


# -------------------------------------------------------------------------- helpers


class Recorder:
    """A :class:`~cachechain._backplane.Receiver` that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.lost_event = threading.Event()

    def invalidate(self, keys: Sequence[str], lag: float) -> None:
        self.events.append(("invalidate", list(keys), lag))

    def cleared(self) -> None:
        self.events.append(("cleared",))

    def lost(self, reason: str) -> None:
        self.events.append(("lost", reason))
        self.lost_event.set()

    def caught_up(self) -> None:
        self.events.append(("caught_up",))

    def take(self) -> list[tuple[Any, ...]]:
        """The events so far, forgotten."""
        out, self.events = self.events, []
        return out

    def keys(self) -> list[list[str]]:
        """The key lists of the invalidations so far, in order."""
        return [e[1] for e in self.events if e[0] == "invalidate"]


class Store(FakeLayer):
    """The shared layer of the tests: a FakeLayer that can be cleared (``flush_all``),
    can reject given values in ``set_many`` and can block ``get_many`` once armed."""

    def __init__(self, name: str = "L2", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.rejects: set[Any] = set()
        self.block_many: threading.Event | None = None
        self.many_entered = threading.Event()
        self.block_incr: threading.Event | None = None
        self.incr_entered = threading.Event()
        self.cleared = 0

    def clear(self) -> None:
        self._enter("clear", None)
        self.data.clear()
        self.cleared += 1

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        bad = [k for k, v in items.items() if repr(v) in self.rejects]
        super().set_many({k: v for k, v in items.items() if k not in bad}, ttl)
        return bad

    def incr(self, key: str, delta: int = 1) -> int | None:
        gate = self.block_incr
        if gate is not None:
            self.block_incr = None  # once
            self.incr_entered.set()
            gate.wait(WAIT)
        return super().incr(key, delta)

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        found = super().get_many_with_ttl(keys)
        gate = self.block_many
        if gate is not None:
            self.block_many = None  # once
            self.many_entered.set()
            gate.wait(WAIT)
        return found


class Process:
    """One "process" on the shared store: its namespace, its journal and a recorder.
    ``mono`` and ``wall`` are its clocks (default: the real ones)."""

    def __init__(
        self,
        store: Any,
        mono: FakeClock | None = None,
        wall: FakeClock | None = None,
        **kwargs: Any,
    ) -> None:
        self.ns = Namespace(store)
        self.rec = Recorder()
        kwargs.setdefault("interval", INTERVAL)
        kwargs.setdefault("bound", BOUND)
        if mono is not None:
            kwargs["clock"] = mono
        if wall is not None:
            kwargs["wall"] = wall
        self.journal = MemcachedJournal(store, self.ns, **kwargs)
        self.journal._receiver = self.rec  # poll() by hand instead of start()'s thread

    def join(self) -> None:
        """The first reads of the ring (the first one creates the head when absent),
        then forget what they reported."""
        self.journal.poll()
        self.journal.poll()
        assert ("cleared",) in self.rec.take()

    def publish(self, *keys: str) -> None:
        """Queue ``keys`` and publish them (a poll publishes first)."""
        self.journal.publish(list(keys))
        self.journal.poll()


@pytest.fixture()
def mono() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture()
def wall() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture()
def store(wall: FakeClock) -> Store:
    return Store(clock=wall)


@pytest.fixture()
def no_poller(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chains built in the test get a journal without its thread: the test polls."""

    def start(self: MemcachedJournal, receiver: Any) -> None:
        self._receiver = receiver

    monkeypatch.setattr(MemcachedJournal, "start", start)


def head(store: Store) -> Any:
    """The ring's head, counted from the ring's start (a random multiple of 2**32)."""
    return store.data[HEAD_KEY][0] % 2**RING_BITS


def seq(store: Store, n: int) -> int:
    """The sequence number of the ring's ``n``-th entry (as :func:`head` counts)."""
    return store.data[HEAD_KEY][0] - head(store) + n


# -------------------------------------------------------------------------- the journal


def test_a_published_key_reaches_another_process_with_its_lag(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    a.publish("k1", "k2")
    wall.advance(0.03)
    b.journal.poll()
    assert b.rec.take() == [("invalidate", ["k1", "k2"], pytest.approx(0.03))]
    b.journal.poll()
    assert b.rec.take() == []  # read once


def test_a_process_does_not_receive_its_own_entries(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a = Process(store, mono, wall)
    a.join()
    a.publish("mine")
    a.journal.poll()
    assert a.rec.take() == []
    assert head(store) == 1  # it was published all the same


@pytest.mark.parametrize(("below", "before_the_poll"), [(False, 0), (True, 0), (False, 2)])
def test_entries_given_numbers_a_process_had_reserved_are_delivered_to_it(
    store: Store, mono: FakeClock, wall: FakeClock, below: bool, before_the_poll: int
) -> None:
    """The head went back within one ring (a server that lost increments): the
    numbers a process reserved above it go to other processes, and their entries
    reach it, whether it polls before they reach its numbers or after. (A change that
    left a process's own numbers out of its polls lost them: found by review, and
    reverted.)"""
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    start = store.data[HEAD_KEY][0]
    if below:  # a's reader has passed start + 1 when the head goes back to start
        b.publish("b0")
        a.journal.poll()
        assert a.rec.keys() == [["b0"]]
        a.rec.take()
    a.journal.publish(["mine"])
    a.journal._publish_pending()  # reserved start + 1 (or + 2), not read yet
    store.data[HEAD_KEY] = (start, None)
    keys = [f"b{i}" for i in range(1, 4)]
    for key in keys[:before_the_poll]:
        b.publish(key)
    a.journal.poll()
    for key in keys[before_the_poll:]:
        b.publish(key)
    a.journal.poll()
    events = a.rec.take()
    assert [e[1] for e in events if e[0] == "invalidate"] == [[k] for k in keys]
    assert [e for e in events if e[0] == "lost"] == ([("lost", "reset")] if below else [])


def test_the_head_and_the_generation_outlive_the_layers_default_ttl(
    mono: FakeClock, wall: FakeClock
) -> None:
    """The journal's head and the namespace generation are stored for ten years, not
    the layer's ``default_ttl`` (300 s on memcached): the head's expiry made every
    process drop its in-process entries every five minutes (``lost("reset")``), and a
    process that fetched the generation just after its expiry made up a new one, so
    that it did not see what the others wrote (found by review)."""
    store = Store(clock=wall, default_ttl=300.0)
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    generation = a.ns.generation
    for _ in range(3):
        wall.advance(301.0)
        a.publish("k")
        b.journal.poll()
        assert b.rec.take() == [("invalidate", ["k"], 0.0)]  # the same ring, read on
        assert Namespace(store).current() == a.ns.prefix  # a newcomer: the same one
    assert a.ns.generation == b.ns.generation == generation
    assert a.rec.take() == []


def test_the_head_and_the_generation_never_expire_on_a_layer_without_a_default_ttl(
    mono: FakeClock, wall: FakeClock
) -> None:
    """A layer whose ``default_ttl`` is None keeps the bookkeeping keys for good, even
    with a ``max_ttl``, which caps TTLs but not "none" (a first fix stored them for
    ten years, which the cap turned into 60 s: found by review)."""
    store = Store(clock=wall, default_ttl=None, max_ttl=60.0)
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    assert store.data[HEAD_KEY][1] is None
    assert store.data[GENERATION_KEY][1] is None
    wall.advance(61.0)
    assert Namespace(store).current() == a.ns.prefix  # a process starting now
    a.publish("k")
    b.journal.poll()
    assert b.rec.take() == [("invalidate", ["k"], 0.0)]


def test_entries_are_delivered_in_order_whoever_published_them(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a, b, c = (Process(store, mono, wall) for _ in range(3))
    for p in (a, b, c):
        p.join()
    a.publish("x")
    c.publish("y")
    a.publish("z")
    b.journal.poll()
    assert b.rec.keys() == [["x"], ["y"], ["z"]]


def test_more_than_read_ahead_entries_are_read_in_one_poll(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a, b = Process(store, mono, wall), Process(store, mono, wall, read_ahead=2)
    a.join()
    b.join()
    for i in range(7):
        a.publish(f"k{i}")
    b.journal.poll()
    assert b.rec.keys() == [[f"k{i}"] for i in range(7)]


def test_a_batch_of_more_than_1000_keys_is_split_in_entries_read_in_order(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    keys = [f"key:{i}" for i in range(2 * BATCH + 500)]
    a.publish(*keys)
    assert head(store) == 3  # one incr reserved the three entries
    assert len(store.ops("incr")) == 1
    b.journal.poll()
    got = b.rec.keys()
    assert [len(k) for k in got] == [BATCH, BATCH, 500]
    assert [k for batch in got for k in batch] == keys


@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [5],
        [5] * BATCH,
        [5] * (BATCH + 1),
        [BATCH_BYTES // 2 - 4, BATCH_BYTES // 2 - 4],  # exactly full
        [BATCH_BYTES // 2 - 4, BATCH_BYTES // 2 - 3],  # one character over
        [BATCH_BYTES // 2, BATCH_BYTES // 2 - 10, 3],
        [BATCH_BYTES + 10, 1],  # a key longer than an entry still gets one
    ],
)
def test_batches_are_cut_at_the_key_and_size_limits(sizes: list[int]) -> None:
    keys = [f"{i}:" + "k" * max(0, n - len(f"{i}:")) for i, n in enumerate(sizes)]
    batches = batches_of(keys)
    assert [k for batch in batches for k in batch] == keys
    for i, batch in enumerate(batches):
        assert batch
        assert len(batch) <= BATCH
        fits = sum(len(k) + 4 for k in batch) - 4 <= BATCH_BYTES
        assert fits or len(batch) == 1
        if i + 1 < len(batches):  # cut only when the next key would not fit
            with_next = [*batch, batches[i + 1][0]]
            assert len(with_next) > BATCH or sum(len(k) + 4 for k in with_next) - 4 > BATCH_BYTES


def test_a_key_whose_write_is_still_held_is_published_once_released(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    held = {"slow"}
    a = Process(store, mono, wall, held=lambda key: key in held)
    b = Process(store, mono, wall)
    a.join()
    b.join()
    a.publish("slow", "fast")
    b.journal.poll()
    assert b.rec.keys() == [["fast"]]
    a.journal.poll()
    b.journal.poll()
    assert b.rec.keys() == [["fast"]]  # still held: not yet
    held.clear()
    a.journal.poll()
    b.journal.poll()
    assert b.rec.keys() == [["fast"], ["slow"]]


def test_past_max_pending_one_drop_everything_entry_is_published(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a = Process(store, mono, wall, max_pending=3)
    b = Process(store, mono, wall)
    a.join()
    b.join()
    a.journal.publish(["1", "2"])
    a.journal.publish(["3", "4"])  # 4 pending > 3: overflow
    a.journal.poll()
    assert head(store) == 1
    assert store.data[slot_key(1, 1024)][0][3] is None
    b.journal.poll()
    assert b.rec.take() == [("lost", "overflow")]


def test_an_overflow_keeps_the_keys_whose_writes_have_not_landed(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    """The "drop everything" of an overflow goes out at once; a key whose write had not
    landed yet (a write-behind set, a pending repair) must still be published once it
    lands, or a process that dropped its copy reads the old value back meanwhile and
    serves it for good. An overflow used to forget those keys with the others."""
    slow = [f"slow{i}" for i in range(5)]  # more than max_pending: a healthy writer
    held = set(slow)  # holds as many as its queue, its repairs and its deletes
    a = Process(store, mono, wall, max_pending=3, held=lambda key: key in held)
    b = Process(store, mono, wall)
    a.join()
    b.join()
    a.journal.publish(slow)  # 5 pending > 3: overflow
    a.journal.poll()
    b.journal.poll()
    assert b.rec.take() == [("lost", "overflow")]
    a.journal.poll()
    b.journal.poll()
    assert b.rec.take() == []  # still held: not yet
    held.clear()  # their writes landed
    a.journal.poll()
    b.journal.poll()
    assert b.rec.keys() == [slow]


def test_no_key_is_kept_at_an_overflow_while_the_writer_is_overflowed(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    """An overflowed writer holds every key (its overflow handling moves the namespace
    generation instead). Kept apart at each overflow, such keys grew without bound
    during an outage (290,029 keys, 27 MB, and 24 ms under the journal's lock per
    round after 300,000 writes): none is kept while the writer is overflowed."""
    a = Process(store, mono, wall, max_pending=3, held=lambda key: True, overflowed=lambda: True)
    a.journal.poll()
    a.journal.poll()
    for i in range(50):
        a.journal.publish([f"k{i}"])
        assert len(a.journal._held_over) == 0
    a.journal.poll()
    assert store.data[slot_key(1, 1024)][0][3] is None  # the "drop everything"


def test_a_publication_that_failed_is_made_again(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    store.fail = LayerUnavailableError("down")
    a.publish("k")  # the poll fails: "k" stays pending
    store.fail = None
    a.journal.poll()
    b.journal.poll()
    assert b.rec.keys() == [["k"]]


def test_a_reserved_slot_not_written_yet_is_waited_for_up_to_the_bound(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    store.incr(HEAD_KEY, 1)  # reserved by a publisher that has not written it (yet)
    a.publish("after")  # entry 2
    b.journal.poll()
    assert b.rec.take() == []  # entry 1 missing: entry 2 waits behind it
    mono.advance(BOUND * 0.9)
    b.journal.poll()
    assert b.rec.take() == []
    store.set_many({slot_key(1, 1024): [seq(store, 1), "late-writer", wall(), ["late"]]}, 300)
    b.journal.poll()
    assert b.rec.keys() == [["late"], ["after"]]  # written in time: no loss


def test_a_slot_left_unwritten_past_the_bound_is_a_gap(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    store.incr(HEAD_KEY, 1)  # its publisher died between the incr and the set_many
    a.publish("after")
    b.journal.poll()
    mono.advance(BOUND / 2)
    b.journal.poll()
    assert b.rec.take() == []
    mono.advance(BOUND / 2 + 0.001)
    b.journal.poll()
    assert b.rec.take() == [("lost", "gap"), ("invalidate", ["after"], 0.0)]
    mono.advance(BOUND * 5)
    a.publish("later")
    b.journal.poll()
    assert b.rec.take() == [("invalidate", ["later"], 0.0)]


def test_a_wait_for_a_slot_does_not_outlive_a_restart_from_the_head(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    """A reader saw a slot reserved and not written yet (an everyday sight: it read
    between a publisher's ``incr`` and its ``set_many``), then restarted from the head
    (another process cleared the cache). Long after, the next such sight must get its
    own ``bound`` of patience, not be called a gap at once (which drops every entry)."""
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    store.incr(HEAD_KEY, 1)  # a publication in progress...
    b.journal.poll()  # ...seen half-made
    assert a.ns.move()  # another process's clear(): b restarts from the head
    b.journal.poll()
    assert ("cleared",) in b.rec.take()
    mono.advance(BOUND * 10)
    b.journal.poll()
    store.incr(HEAD_KEY, 1)  # the next publication in progress, seen half-made
    b.journal.poll()
    assert b.rec.take() == [], "a slot seen missing for the first time was called a gap"


def test_a_ring_that_wrapped_past_the_reader_is_an_overrun(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a = Process(store, mono, wall, slots=4)
    b = Process(store, mono, wall, slots=4)
    a.join()
    b.join()
    for i in range(5):  # 5 entries in a ring of 4: entry 1 was overwritten
        a.publish(f"k{i}")
    b.journal.poll()
    assert b.rec.take() == [("lost", "overrun")]
    a.publish("next")
    b.journal.poll()
    assert b.rec.keys() == [["next"]]  # on track again, from the head


def test_a_slot_holding_a_later_lap_is_an_overrun(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a = Process(store, mono, wall, slots=4)
    b = Process(store, mono, wall, slots=4)
    a.join()
    b.join()
    a.publish("k0")
    # slot of entry 1 already rewritten by entry 5 (the head read is older than the slot)
    store.set_many({slot_key(5, 4): [seq(store, 5), "other", wall(), ["k4"]]}, 300)
    b.journal.poll()
    assert b.rec.take() == [("lost", "overrun")]


@pytest.mark.parametrize("how", ["vanished", "went_back"])
def test_a_head_that_vanished_or_went_back_is_a_reset(
    store: Store, mono: FakeClock, wall: FakeClock, how: str
) -> None:
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    for i in range(3):
        a.publish(f"k{i}")
    b.journal.poll()
    b.rec.take()
    if how == "vanished":
        del store.data[HEAD_KEY]
    else:
        store.data[HEAD_KEY] = (1, None)
    b.journal.poll()
    assert ("lost", "reset") in b.rec.take()
    b.journal.poll()
    b.rec.take()
    a.publish("again")
    b.journal.poll()
    assert b.rec.keys() == [["again"]]


def test_an_unreachable_layer_is_lost_track_after_the_bound_and_every_bound_after(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    b = Process(store, mono, wall)
    b.join()
    store.fail = LayerUnavailableError("down")
    b.journal.poll()
    assert b.rec.take() == []  # one failed poll is not lost track
    mono.advance(BOUND + 0.001)
    b.journal.poll()
    assert b.rec.take() == [("lost", "unreachable")]
    mono.advance(BOUND / 2)
    b.journal.poll()
    assert b.rec.take() == []
    mono.advance(BOUND / 2 + 0.001)
    b.journal.poll()
    assert b.rec.take() == [("lost", "unreachable")]  # again, while it lasts
    store.fail = None
    mono.advance(BOUND * 3)
    b.journal.poll()
    assert ("lost", "unreachable") not in b.rec.take()


def test_an_unreachable_layer_drops_before_an_entry_could_be_served_past_the_bound(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    """Polls every 40 ms, bound 100 ms: the last poll that succeeded is at t=0; the polls
    at 40 and 80 ms fail. An entry published just after t=0 is stale here from then
    on, and the next chance to drop it is the poll at 120 ms, past the bound: the poll
    at 80 ms must drop (lost track) already."""
    b = Process(store, mono, wall)
    b.join()
    store.fail = LayerUnavailableError("down")
    mono.advance(INTERVAL)
    b.journal.poll()
    mono.advance(INTERVAL)
    b.journal.poll()  # t = 80 ms; the next poll, at 120 ms, would be too late
    assert b.rec.take() == [("lost", "unreachable")]


def test_a_poll_stuck_on_an_unanswering_layer_still_drops_within_the_bound() -> None:
    """The poller thread, real clocks: memcached stops answering (a partition: every
    read waits for its socket timeout, 250 ms by default). Track must be reported lost
    within the bound while the read is still stuck, not when it times out."""
    store = Store()
    ns = Namespace(store)
    rec = Recorder()
    journal = MemcachedJournal(store, ns, interval=INTERVAL, bound=BOUND)
    journal.start(rec)
    try:
        gate = threading.Event()
        store.block_many = gate
        assert store.many_entered.wait(WAIT)
        rec.lost_event.clear()
        stuck = rec.lost_event.wait(2.0)  # 20 bounds; the read is still stuck
        gate.set()
        assert stuck, "no lost() while the poll was stuck in I/O for 2 s (bound 0.1 s)"
    finally:
        store.block_many = None
        journal.close(WAIT)


def test_a_publication_stuck_between_polls_still_drops_within_the_bound() -> None:
    """Between two polls the poller publishes this process's keys; no poll runs while
    that publication waits on memcached. It used to be invisible to the watchdog
    (which watched polls only): a process went on serving entries other processes had
    overwritten for as long as the publication's socket timeout (243-260 ms for the
    default 250 ms, bound 100 ms)."""
    store = Store()
    rec = Recorder()
    journal = MemcachedJournal(store, Namespace(store), interval=INTERVAL, bound=BOUND)
    journal._receiver = rec  # the test is the poller: the publication runs between polls
    journal.poll()
    journal.poll()
    assert rec.take() == [("cleared",)]
    _WATCHDOG.watch(journal)
    gate = threading.Event()
    store.block_incr = gate  # the publication's incr of the head hangs
    journal.publish(["k"])
    publisher = threading.Thread(target=journal._publish_quietly)
    publisher.start()
    try:
        assert store.incr_entered.wait(WAIT)
        stuck = rec.lost_event.wait(2.0)  # 20 bounds; the publication is still stuck
    finally:
        gate.set()
        publisher.join(WAIT)
        journal.close(WAIT)
    assert stuck, "no lost() while a publication was stuck in I/O for 2 s (bound 0.1 s)"
    assert ("lost", "unreachable") in rec.take()


def test_a_ring_made_again_up_to_the_readers_last_number_is_a_reset(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    """memcached flushed (another application's ``flush_all``) or restarted: the ring
    is made again by the next publication. When the new ring's head had reached a
    reader's last sequence number before the reader polled (a young ring: one
    publication is enough), the reader took it for the ring it followed and skipped
    its entries, serving the key they invalidated for good. A new ring starts at a
    random multiple of 2**32, so the reader sees another ring."""
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    a.publish("k0")
    b.journal.poll()
    assert b.rec.keys() == [["k0"]]
    store.clear()  # flush_all: the head, the entries and the generation are gone
    a.publish("k")  # the first entry of a new ring
    b.journal.poll()
    assert ("lost", "reset") in b.rec.take(), "an entry of the new ring was skipped"
    a.publish("k2")
    b.journal.poll()
    assert b.rec.keys() == [["k2"]]  # on track again, on the new ring


def test_a_closed_journal_reads_no_further_round_of_a_poll(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    """A poll behind the ring reads it in rounds (``read_ahead`` entries each). When
    close() returns while a round is in I/O (its join timed out), the poll reads no
    further round: the poller makes no round trip after close() but the one in flight
    (in the full suite such rounds landed in later tests' spies on memcached)."""
    a, b = Process(store, mono, wall), Process(store, mono, wall, read_ahead=2)
    a.join()
    b.join()
    for i in range(10):
        a.publish(f"k{i}")  # 10 entries: b reads them 2 per round
    gate = threading.Event()
    store.block_many = gate
    poller = threading.Thread(target=b.journal.poll)
    poller.start()
    assert store.many_entered.wait(WAIT)  # the first round is in I/O
    b.journal.close(0.0)
    before = len(store.calls)
    gate.set()
    poller.join(WAIT)
    assert not poller.is_alive()
    assert [op for op, _ in store.calls[before:] if op.startswith("get")] == []


def test_a_generation_moved_by_another_process_is_adopted_and_clears(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    before = b.ns.generation
    assert before is not None and before == a.ns.generation
    assert a.ns.move()
    b.journal.poll()
    assert b.ns.generation == a.ns.generation == before + 1
    assert b.ns.prefix == f"{before + 1:x}/"
    assert ("cleared",) in b.rec.take()
    a.publish("after-clear")
    b.journal.poll()
    assert b.rec.keys() == [["after-clear"]]


def test_a_lost_generation_key_is_stored_again_so_processes_stay_in_one_namespace(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    """memcached restarted (or was flushed): the generation key is gone, and so is
    everything written under it. The first process to poll stores the generation it
    knew again; a fresh one would split the processes, until each polled, between a
    new namespace and the old one (a value read through the old generation after a
    newer write through the new one: seen in the model test)."""
    a, b = Process(store, mono, wall), Process(store, mono, wall)
    a.join()
    b.join()
    known = a.ns.generation
    del store.data[GENERATION_KEY]
    a.journal.poll()
    assert a.ns.generation == b.ns.generation == known  # b has not polled: one namespace
    assert store.data[GENERATION_KEY][0] == known
    b.journal.poll()
    assert b.ns.generation == known
    # A process that never knew one takes what is there.
    c = Process(store, mono, wall)
    c.join()
    assert c.ns.generation == known


def test_a_clear_during_a_poll_is_not_undone_by_the_generation_the_poll_read(
    store: Store, mono: FakeClock, wall: FakeClock
) -> None:
    """``Coherence.clear`` moves the namespace (``incr``) while this process's poller
    has read the old generation and not adopted it yet: the poller must not take this
    process back to the old generation (its next reads would serve what the clear
    removed, until the next poll)."""
    b = Process(store, mono, wall)
    b.join()
    gate = threading.Event()
    store.block_many = gate
    poller = threading.Thread(target=b.journal.poll)
    poller.start()
    try:
        assert store.many_entered.wait(WAIT)  # the poll read the old generation
        assert b.ns.move()
        moved = b.ns.generation
    finally:
        gate.set()
        poller.join(WAIT)
    assert store.data[GENERATION_KEY][0] == moved
    assert b.ns.generation == moved, "the poll put the old generation back after a clear"


# -------------------------------------------------------------------------- the namespace


def test_the_generation_is_fetched_lazily_once(store: Store) -> None:
    ns = Namespace(store)
    assert store.calls == [] and ns.generation is None
    prefix = ns.current()
    assert ns.generation is not None and ns.generation > 0
    assert prefix == f"{ns.generation:x}/"
    calls = len(store.calls)
    assert ns.current() == prefix
    assert len(store.calls) == calls


def test_an_unknown_generation_is_a_layer_failure(store: Store) -> None:
    ns = Namespace(store)
    store.fail = LayerUnavailableError("down")
    with pytest.raises(LayerUnavailableError, match="namespace generation"):
        ns.current()
    layer = NamespacedLayer(store, ns)
    with pytest.raises(LayerUnavailableError):
        layer.get("k")
    store.fail = None
    layer.set("k", 1)  # known again once the layer answers
    assert layer.get("k") == 1


def test_two_processes_creating_the_generation_at_once_get_the_same(store: Store) -> None:
    class BothSawItAbsent(Store):
        """The generation reads absent for each of the first two fetches, as when two
        processes read before either added it."""

        absent = 2

        def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
            if key == GENERATION_KEY and self.absent:
                self.absent -= 1
                self._enter("get", key)
                return MISSING, None
            return super().get_with_ttl(key)

    shared = BothSawItAbsent()
    one, two = Namespace(shared), Namespace(shared)
    assert one.current() == two.current()
    assert len(shared.ops("add")) == 2  # both tried; the add decided


def test_a_move_never_adopts_the_old_generation_another_process_put_back(
    store: Store,
) -> None:
    """The generation key was lost (an eviction, the restart of the node holding it)
    while values stayed. Between this process's ``incr`` (which misses) and its storing
    a fresh generation, another process's poll puts back the generation it knew. The
    move used to ``add`` its fresh one, fail, and adopt what was there, the old
    generation: ``clear()`` returned True and every process kept reading the values
    written before it."""
    a, b = Namespace(store), Namespace(store)
    assert a.current() == b.current()
    old = a.generation
    assert old is not None and b.generation == old
    del store.data[GENERATION_KEY]
    real_incr = store.incr

    def incr(key: str, delta: int = 1) -> int | None:
        found = real_incr(key, delta)
        if key == GENERATION_KEY:
            b.adopt(None)  # b's poll found it gone and stored the one it knew
        return found

    store.incr = incr  # type: ignore[method-assign]
    assert a.move()
    assert a.generation != old
    assert store.data[GENERATION_KEY][0] == a.generation
    assert b.adopt(store.data[GENERATION_KEY][0])  # b's next poll: moved, b drops its L1


class Plain(BaseLayer):
    """A layer with none of the atomic operations."""

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        return MISSING, None

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        pass

    def delete(self, key: str) -> None:
        pass


def test_the_namespace_needs_add_and_counters() -> None:
    with pytest.raises(ConfigError, match="add and counters"):
        Namespace(Plain("plain"))


def test_a_namespaced_layer_prefixes_every_key_and_maps_batches_back(store: Store) -> None:
    ns = Namespace(store)
    layer = NamespacedLayer(store, ns)
    p = ns.current()
    layer.set("a", 1, 60)
    assert store.data[p + "a"][0] == 1 and "a" not in store.data
    assert layer.get("a") == 1
    assert layer.get_with_ttl("a") == (1, 60)
    store.rejects = {repr("bad")}
    assert layer.set_many({"b": 2, "c": "bad", "d": 4}, 60) == ["c"]
    assert layer.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": 2, "d": 4}
    assert layer.get_many_with_ttl(["b", "zz"]) == {"b": (2, 60)}
    assert layer.add("a", 9) is False and layer.add("n", 5) is True
    assert layer.incr("n", 2) == 7 and layer.decr("n") == 6
    assert layer.touch("n", 30) is True and layer.touch("zz") is False
    layer.delete("a")
    layer.delete_many(["b", "d"])
    assert layer.get_many(["a", "b", "d", "n"]) == {"n": 6}
    assert all(k.startswith(p) or k.startswith("__cachechain__/") for k in store.data)


@pytest.mark.parametrize(
    ("operation", "call"),
    [
        ("add", lambda layer: layer.add("k", 1)),
        ("incr", lambda layer: layer.incr("k")),
        ("decr", lambda layer: layer.decr("k")),
        ("touch", lambda layer: layer.touch("k", 1)),
    ],
)
def test_a_namespaced_layer_refuses_atomic_operations_its_layer_lacks(
    operation: str, call: Any
) -> None:
    layer = NamespacedLayer(Plain("plain"), Namespace(Store("gen")))
    with pytest.raises(ConfigError, match=operation):
        call(layer)


# -------------------------------------------------------------------------- the chain


def make_chain(
    store: Store, collector: MemoryCollector | None = None, **kwargs: Any
) -> tuple[Chain, MemoryLayer]:
    l1 = MemoryLayer("L1")
    return Chain([l1, store], metrics=collector, **kwargs), l1


def chain_journal(chain: Chain) -> MemcachedJournal:
    coherence = chain.coherence
    assert coherence is not None
    journal = coherence.backplane
    assert isinstance(journal, MemcachedJournal)
    return journal


def peer(store: Store) -> Process:
    """Another process on the chain's store, joined to the ring (real clocks)."""
    p = Process(store, FakeClock(1000.0), FakeClock(1_700_000_000.0))
    p.join()
    return p


@pytest.mark.usefixtures("no_poller")
def test_clear_moves_the_generation_and_empties_l1_but_not_other_apps_keys() -> None:
    store = Store()
    chain, l1 = make_chain(store)
    with chain:
        chain.set("k", "v", 60)
        ns = chain.coherence.namespace  # type: ignore[union-attr]
        before = ns.generation
        store.set("other-app:key", "theirs", 60)
        assert chain.clear() is True
        assert ns.generation == before + 1  # type: ignore[operator]
        assert store.data[GENERATION_KEY][0] == ns.generation
        assert l1.get("k") is MISSING
        assert chain.get("k") is None  # the old generation is never read again
        assert store.get("other-app:key") == "theirs"
        assert store.cleared == 0


@pytest.mark.usefixtures("no_poller")
def test_clear_with_the_shared_layer_down_returns_false_and_still_empties_l1() -> None:
    store = Store()
    collector = MemoryCollector()
    chain, l1 = make_chain(store, collector)
    with chain:
        chain.set("k", "v", 60)
        store.fail = LayerUnavailableError("down")
        assert chain.clear() is False
        assert l1.get("k") is MISSING
        assert collector.snapshot().layer_metrics["L2"].errors >= 1
        store.fail = None


@pytest.mark.usefixtures("no_poller")
def test_clear_flush_empties_the_whole_store() -> None:
    store = Store()
    chain, l1 = make_chain(store)
    with chain:
        chain.set("k", "v", 60)
        store.set("other-app:key", "theirs", 60)
        assert chain.clear(flush=True) is True
        assert store.cleared == 1
        assert "other-app:key" not in store.data
        assert l1.get("k") is MISSING and chain.get("k") is None
        chain.set("k2", "after", 60)  # a fresh generation works at once
        l1.clear()
        assert chain.get("k2") == "after"


@pytest.mark.usefixtures("no_poller")
def test_clear_flush_of_a_store_that_cannot_be_flushed_returns_false() -> None:
    store = FakeLayer("L2")  # no clear()
    l1 = MemoryLayer("L1")
    with Chain([l1, store]) as chain:
        chain.set("k", "v", 60)
        assert chain.clear(flush=True) is False
        assert l1.get("k") is MISSING


@pytest.mark.usefixtures("no_poller")
def test_a_mutation_publishes_its_keys_to_the_other_processes() -> None:
    store = Store()
    collector = MemoryCollector()
    chain, _ = make_chain(store, collector)
    with chain:
        other = peer(store)
        chain.set("s", 1, 60)
        chain.set_many({"m1": 1, "m2": 2}, 60)
        chain.delete("s")
        chain.delete_many(["m1"])
        chain_journal(chain).poll()
        other.journal.poll()
        assert other.rec.keys() == [["s", "m1", "m2"]]  # one entry, each key once
        assert collector.snapshot().chain_metrics.invalidations_published == 5


@pytest.mark.usefixtures("no_poller")
@pytest.mark.parametrize(
    ("operation", "key"),
    [
        (lambda c: c.add("k", 1, 60), "k"),
        (lambda c: c.incr("n"), "n"),
        (lambda c: c.decr("n"), "n"),
        (lambda c: c.decr("n", floor=False), "n"),
        (lambda c: c.touch("n", 60), "n"),
    ],
    ids=["add", "incr", "decr", "decr_nofloor", "touch"],
)
def test_an_atomic_operation_publishes_its_key(operation: Any, key: str) -> None:
    store = Store()
    chain, _ = make_chain(store)
    with chain:
        other = peer(store)
        chain.add("n", 5, 60)
        chain_journal(chain).poll()
        other.journal.poll()
        assert other.rec.keys() == [["n"]]
        other.rec.take()
        operation(chain)
        chain_journal(chain).poll()
        other.journal.poll()
        assert other.rec.keys() == [[key]]


@pytest.mark.usefixtures("no_poller")
def test_an_atomic_operation_that_did_nothing_publishes_nothing() -> None:
    store = Store()
    chain, _ = make_chain(store)
    with chain:
        other = peer(store)
        chain.set("k", "v", 60)
        chain_journal(chain).poll()
        other.journal.poll()
        other.rec.take()
        assert chain.add("k", "w", 60) is False
        assert chain.incr("absent") is None
        assert chain.touch("absent", 60) is False
        chain_journal(chain).poll()
        other.journal.poll()
        assert other.rec.keys() == []


class TimesOutAfterCounting(Store):
    """``incr`` and ``touch`` reach the store, then the reply is lost (a timeout)."""

    lose_replies = False

    def incr(self, key: str, delta: int = 1) -> int | None:
        count = super().incr(key, delta)
        if self.lose_replies:
            raise LayerTimeoutError("reply lost after the increment was made")
        return count

    def touch(self, key: str, ttl: float | None = None) -> bool:
        found = super().touch(key, ttl)
        if self.lose_replies:
            raise LayerTimeoutError("reply lost after the touch was made")
        return found


@pytest.mark.usefixtures("no_poller")
def test_an_atomic_operation_whose_reply_was_lost_still_publishes_its_key() -> None:
    """A timed-out ``incr`` "may still have been made" (its docstring): the other
    processes' copies of the counter may be stale from then on, so the key must be
    published as a ``set`` or ``delete`` that failed is."""
    store = TimesOutAfterCounting()
    chain, _ = make_chain(store, breaker=None)
    with chain:
        other = peer(store)
        chain.add("n", 5, 60)
        chain_journal(chain).poll()
        other.journal.poll()
        other.rec.take()
        store.lose_replies = True
        assert chain.incr("n") is None  # nothing invented...
        store.lose_replies = False
        assert store.get(chain.coherence.namespace.current() + "n") == 6  # type: ignore[union-attr]
        chain_journal(chain).poll()
        other.journal.poll()
        assert other.rec.keys() == [["n"]], "a count made in memcached was never published"


@pytest.mark.usefixtures("no_poller")
def test_a_write_behind_set_is_published_once_it_reached_memcached() -> None:
    """Published earlier, another process could drop its copy and read the old value
    back from memcached before the write lands."""
    store = Store()
    l1 = MemoryLayer("L1")
    chain = Chain([l1, LayerConfig(layer=store, write_behind=True)])
    with chain:
        other = peer(store)
        journal = chain_journal(chain)
        chain.coherence.namespace.current()  # type: ignore[union-attr]
        gate = threading.Event()
        store.block_set = gate
        try:
            assert chain.set("k", "new", 60)  # queued
            assert store.write_entered.wait(WAIT)  # the writer is on it, not done
            journal.poll()
            other.journal.poll()
            assert other.rec.keys() == []
        finally:
            gate.set()
        assert chain.flush(WAIT)
        journal.poll()
        other.journal.poll()
        assert other.rec.keys() == [["k"]]


def test_a_write_behind_set_still_queued_at_a_clear_never_lands_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """clear() gives the writers a second to make what they hold. A set still queued
    after that used to land once the generation had moved, in the new one: the value
    written before the clear was read after it, in every process. It is turned into a
    delete of its key instead."""
    monkeypatch.setattr(_chain_clear, "FLUSH_TIMEOUT", 0.05)
    store = Store()
    chain = Chain([MemoryLayer("L1"), LayerConfig(layer=store, write_behind=True)])
    with chain:
        gate = threading.Event()
        store.block_set = gate
        try:
            assert chain.set("slow", 1, 60)  # in flight (one writer thread), held up
            assert store.write_entered.wait(WAIT)
            assert chain.set("k", "before", 60)  # queued behind it
            assert chain.clear()
        finally:
            gate.set()
        assert chain.flush(WAIT)
        assert chain.get("k") is None


def test_a_load_that_ends_during_a_clear_stores_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A load begun before clear() that ends while the clear runs (its writers flushed,
    the generation not moved yet) used to pass the fence (the clear's mutation began
    only with its drop of L1) and queue its value for memcached, where it landed in
    the new generation. The whole clear is now one mutation of every key."""
    monkeypatch.setattr(_chain_clear, "FLUSH_TIMEOUT", 0.05)
    store = Store()
    chain = Chain([MemoryLayer("L1"), store])
    coherence = chain.coherence
    assert coherence is not None
    loading, release = threading.Event(), threading.Event()

    def loader() -> str:
        loading.set()
        release.wait(WAIT)
        return "loaded"

    got: list[Any] = []
    load = threading.Thread(target=lambda: got.append(chain.get_or_load("k", loader, 60)))
    real_move = Namespace.move

    def move(self: Namespace) -> bool:
        if self is coherence.namespace:
            release.set()  # the load ends now, before the generation moves
            load.join(WAIT)
        return real_move(self)

    gate = threading.Event()
    with chain:
        coherence.namespace.current()
        load.start()
        assert loading.wait(WAIT)
        store.block_set = gate
        try:
            chain._tiers[1].fill("slow", 1, 60)  # the writer's one thread, held up:
            assert store.write_entered.wait(WAIT)  # what the load queues waits behind it
            monkeypatch.setattr(Namespace, "move", move)
            assert chain.clear()
        finally:
            gate.set()
            release.set()
            load.join(WAIT)
        assert got == ["loaded"]
        assert chain.flush(WAIT)
        assert chain.get("k") is None


def test_a_write_behind_set_drained_by_close_is_published() -> None:
    """A gunicorn worker's last request writes behind, then the worker exits: close()
    drains the writer, and the key must be published once its write landed. close()
    used to publish first (skipping the key, still held by the writer) and drain after,
    so the other processes served the old value until its TTL."""
    store = Store()
    chain = Chain([MemoryLayer("L1"), LayerConfig(layer=store, write_behind=True)])
    other = peer(store)
    journal = chain_journal(chain)
    chain.coherence.namespace.current()  # type: ignore[union-attr]
    writer = chain._tiers[1].writer
    assert writer is not None
    closing = threading.Event()  # close() is draining the writer, or has published
    real_publish_close, real_writer_close = journal.close, writer.close

    def journal_close(timeout: float) -> None:
        real_publish_close(timeout)
        closing.set()

    def writer_close(timeout: float = 5.0) -> int:
        closing.set()
        return real_writer_close(timeout)

    journal.close = journal_close  # type: ignore[method-assign]
    writer.close = writer_close  # type: ignore[method-assign]
    gate = threading.Event()
    store.block_set = gate
    closer = threading.Thread(target=chain.close, args=(WAIT,))
    try:
        assert chain.set("k", "new", 60)  # queued
        assert store.write_entered.wait(WAIT)  # the writer is on it, not done
        closer.start()
        assert closing.wait(WAIT)
    finally:
        gate.set()
        if closer.is_alive() or closer.ident is not None:
            closer.join(WAIT)
        chain.close()
    other.journal.poll()
    assert other.rec.keys() == [["k"]]


@pytest.mark.usefixtures("no_poller")
def test_a_malformed_entry_does_not_stall_the_chains_journal() -> None:
    """An entry whose keys cannot be keys (another version's format, a bug in some
    process): the chain must get past it (dropping everything, since it cannot tell
    what changed), not fail every poll on it, and so drop its L1 every bound, until
    the ring wraps."""
    store = Store()
    chain, l1 = make_chain(store)
    with chain:
        journal = chain_journal(chain)
        journal.poll()
        journal.poll()
        other = peer(store)
        chain.set("after", "old", 60)
        seq = store.incr(HEAD_KEY, 1)
        assert seq is not None
        entry = [seq, "other-version", 1_700_000_000.0, [["not", "a key"]]]
        store.set_many({slot_key(seq, 1024): entry}, 300)
        other.publish("after")  # the next entry: "after" changed elsewhere
        for _ in range(3):
            journal.poll()
        assert l1.get("after") is MISSING, "the journal is stuck on the malformed entry"


@pytest.mark.usefixtures("no_poller")
def test_a_received_invalidation_removes_the_key_from_l1() -> None:
    store = Store()
    collector = MemoryCollector()
    chain, l1 = make_chain(store, collector)
    with chain:
        journal = chain_journal(chain)
        journal.poll()
        journal.poll()
        chain.set("k", "old", 60)
        chain.set("kept", "x", 60)
        other = peer(store)
        p = other.ns.current()
        store.set(p + "k", "new", 60)  # the other process's set...
        other.publish("k")  # ...and its publication
        journal.poll()
        assert l1.get("k") is MISSING
        assert l1.get("kept") == "x"
        assert chain.get("k") == "new"
        figures = collector.snapshot().chain_metrics
        assert figures.invalidations_applied == 1
        assert figures.invalidation_lag.count == 1


@pytest.mark.usefixtures("no_poller")
def test_a_backfill_in_flight_does_not_bring_back_an_invalidated_value() -> None:
    store = Store()
    chain, l1 = make_chain(store)
    with chain:
        journal = chain_journal(chain)
        journal.poll()
        journal.poll()
        other = peer(store)
        p = chain.coherence.namespace.current()  # type: ignore[union-attr]
        store.set(p + "k", "old", 60)
        gate = threading.Event()
        store.block_get = gate
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(chain.get("k")))
        reader.start()
        try:
            assert store.entered.wait(WAIT)  # read "old", ticket taken before
            store.block_get = None
            store.set(p + "k", "new", 60)
            other.publish("k")
            journal.poll()  # the invalidation lands while the read is in flight
        finally:
            gate.set()
            reader.join(WAIT)
        assert got == ["old"]
        assert l1.get("k") is MISSING, "the backfill brought the invalidated value back"
        assert chain.get("k") == "new"


@pytest.mark.usefixtures("no_poller")
def test_lost_track_and_a_remote_clear_empty_l1_and_are_counted() -> None:
    store = Store()
    collector = MemoryCollector()
    chain, l1 = make_chain(store, collector)
    with chain:
        journal = chain_journal(chain)
        journal.poll()
        journal.poll()
        chain.set("a", 1, 60)
        other = peer(store)
        other.journal._max_pending = 1
        other.journal.publish(["x", "y"])  # overflow: drop everything
        other.journal.poll()
        journal.poll()
        assert l1.get("a") is MISSING
        chain.set("b", 2, 60)
        assert other.ns.move()  # another process's clear()
        journal.poll()
        assert l1.get("b") is MISSING
        assert chain.get("b") is None
        figures = collector.snapshot().chain_metrics
        assert figures.coherence_lost == 1
        assert figures.coherence_lost_by_reason == {"overflow": 1}


@pytest.mark.usefixtures("no_poller")
def test_close_publishes_what_is_pending() -> None:
    store = Store()
    chain, _ = make_chain(store)
    other = peer(store)
    chain.set("last", 1, 60)
    chain.close()
    other.journal.poll()
    assert other.rec.keys() == [["last"]]


def _coherence_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "cachechain-coherence")


def test_coherence_false_means_no_namespace_and_no_thread() -> None:
    store = Store()
    before = _coherence_threads()
    with Chain([MemoryLayer("L1"), store], coherence=False) as chain:
        assert chain.coherence is None
        assert _coherence_threads() == before
        chain.set("k", 1, 60)
        assert store.data["k"][0] == 1  # not namespaced
        assert chain.clear() is False  # nothing can clear the shared layer for all


def test_coherence_on_starts_one_poller_that_close_stops() -> None:
    store = Store()
    before = _coherence_threads()
    chain = Chain([MemoryLayer("L1"), store])
    assert chain.coherence is not None and chain.coherence.tracking
    assert _coherence_threads() == before + 1
    chain.close()
    assert _coherence_threads() == before


@pytest.mark.usefixtures("no_poller")
def test_without_an_in_process_layer_the_chain_publishes_but_reads_no_entries() -> None:
    """A chain with no L1 (a memcached-only alias, a management command) must still tell
    the processes whose L1s hold the keys it changes; it has nothing to drop itself."""
    store = Store()
    with Chain([MemoryLayer("L1"), store]) as cached, Chain([store]) as plain:
        assert plain.coherence is not None and not plain.coherence.tracking
        chain_journal(cached).poll()  # the first read of the ring
        cached.set("k", 1, 60)
        chain_journal(cached).poll()
        assert cached.get("k") == 1 and cached.layers[0].get("k") == 1
        assert plain.set("k", 2, 60)
        assert plain.delete("other")
        chain_journal(plain).poll()
        assert HEAD_KEY in store.data  # published
        chain_journal(cached).poll()
        assert cached.layers[0].get("k") is MISSING  # dropped from the other's L1
        assert cached.get("k") == 2
        assert plain.clear() is True


@pytest.mark.usefixtures("no_poller")
def test_the_namespace_switched_off_keeps_l1s_coherent_or_is_refused() -> None:
    """``CoherenceConfig`` documents ``namespace`` and ``enabled`` as two settings:
    turning off the generation must not silently turn off the invalidations too."""
    store = Store()
    l1 = MemoryLayer("L1")
    try:
        chain = Chain([l1, store], coherence=CoherenceConfig(namespace=False))
    except ConfigError:
        return  # refused, saying why: acceptable
    with chain:
        assert chain.coherence is not None and chain.coherence.tracking, (
            "CoherenceConfig(namespace=False) turned the invalidations off without a word"
        )


def test_an_in_process_layer_without_clear_is_refused() -> None:
    with pytest.raises(ConfigError, match="clear"):
        Chain([FakeLayer("L1", local=True), Store()])
    Chain([FakeLayer("L1", local=True), Store()], coherence=False).close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0.1, "bound": 0.1}, r"coherence\.interval .* must be below"),
        # A poll begun in time must never look stuck to the watchdog, which drops L1
        # after bound - interval * PUBLISH_DELAY - WATCH_TICK without one.
        ({"interval": 0.065, "bound": 0.1}, r"interval \(0\.065\) must be below 0\.064"),
        ({"interval": 0.01, "bound": 0.02}, r"must be below 0 for coherence\.bound \(0\.02\)"),
        ({"interval": 0.0}, r"coherence\.interval"),
        ({"bound": -1.0}, r"coherence\.bound"),
        ({"bound": float("inf")}, r"coherence\.bound"),
        ({"slots": 0}, r"coherence\.slots"),
        ({"slots": 1.5}, r"coherence\.slots"),
        ({"enabled": "yes"}, r"coherence\.enabled must be a bool"),
        ({"namespace": 1}, r"coherence\.namespace must be a bool"),
    ],
)
def test_bad_coherence_settings_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CoherenceConfig(**kwargs)


def test_coherence_must_be_a_bool_or_a_config() -> None:
    with pytest.raises(ConfigError, match="coherence must be a bool"):
        Chain([MemoryLayer("L1"), Store()], coherence="on")  # type: ignore[arg-type]
    assert CoherenceConfig.of(True) == CoherenceConfig()
    off = CoherenceConfig.of(False)
    assert not off.enabled and not off.namespace


# -------------------------------------------------------------------------- on memcached


@pytest.fixture()
def fresh_memcached() -> Iterator[MemcachedProcess]:
    server = MemcachedProcess().start()
    yield server
    server.stop()


@pytest.mark.memcached
def test_two_applications_with_different_codecs_share_one_memcached(
    fresh_memcached: MemcachedProcess,
) -> None:
    """Two Django sites on one memcached, each with its own ``SECRET_KEY`` (each gets
    a SignedPickleCodec keyed by it; the same happens to one site during a rolling
    deploy that changes the key). Each must keep its L2 and its coherence: the
    generation and the ring of the other must not make every L2 call fail."""
    address = fresh_memcached.address
    collectors = MemoryCollector(), MemoryCollector()
    chains = [
        Chain(
            [MemoryLayer("L1"), MemcachedLayer("L2", address, codec=SignedPickleCodec(secret))],
            metrics=collector,
            name=name,
        )
        for name, secret, collector in zip(
            ("a", "b"), (b"a" * 32, b"b" * 32), collectors, strict=True
        )
    ]
    try:
        for i, chain in enumerate(chains):
            assert chain.set("k", i, 60)
        for i, chain in enumerate(chains):
            chain.layers[0].clear()  # type: ignore[attr-defined]
            assert chain.get("k") == i, f"chain {i} lost its memcached layer"
        for collector in collectors:
            errors = collector.snapshot().layer_metrics["L2"].errors
            assert errors == 0
    finally:
        for chain in chains:
            chain.close()


@pytest.mark.memcached
def test_a_batch_of_long_keys_is_published_not_lost(fresh_memcached: MemcachedProcess) -> None:
    """1,000 keys of 1,200 characters make an entry over memcached's 1 MB item: the
    entry is refused, and every other process waits the bound for it, then drops
    everything (lost track: "gap"). The batch must be split so that it fits."""
    address = fresh_memcached.address
    layer_a, layer_b = MemcachedLayer("L2", address), MemcachedLayer("L2", address)
    mono = FakeClock()
    a, b = Process(layer_a), Process(layer_b, mono)
    try:
        a.join()
        b.join()
        keys = [f"{i:04d}" + "k" * 1_196 for i in range(BATCH)]
        a.journal.publish(keys)
        a.journal.poll()
        b.journal.poll()
        mono.advance(BOUND * 2)  # any wait for an entry not written yet is over
        b.journal.poll()
        events = b.rec.take()
        assert ("lost", "gap") not in events, "the entry was too large for memcached"
        assert [k for e in events if e[0] == "invalidate" for k in e[1]] == keys
    finally:
        layer_a.close()
        layer_b.close()


@pytest.mark.memcached
def test_the_journal_round_trip_on_memcached(fresh_memcached: MemcachedProcess) -> None:
    layers = [MemcachedLayer("L2", fresh_memcached.address) for _ in range(2)]
    a, b = (Process(layer) for layer in layers)
    try:
        a.join()
        b.join()
        a.publish("x", "y")
        a.publish("z")
        b.journal.poll()
        assert b.rec.keys() == [["x", "y"], ["z"]]
        assert a.ns.move()
        b.journal.poll()
        assert b.ns.generation == a.ns.generation
        assert ("cleared",) in b.rec.take()
    finally:
        for layer in layers:
            layer.close()


@pytest.mark.memcached
def test_a_shared_layer_given_by_layer_config_is_namespaced(
    fresh_memcached: MemcachedProcess,
) -> None:
    """A chain whose shared layer is given through a LayerConfig is namespaced inside
    its breaker: the breaker sees the generation's fetch as a call of the layer."""
    l2 = MemcachedLayer("L2", fresh_memcached.address)
    with Chain([MemoryLayer("L1"), LayerConfig(layer=l2)]) as chain:
        assert chain.set("k", 1, 60)
        prefix = chain.coherence.namespace.current()  # type: ignore[union-attr]
        assert l2.get(prefix + "k") == 1


# ------------------------------------------------- a late backplane: set aside, not lost


def keys_in_distinct_stripes(count: int) -> list[str]:
    """``count`` keys of as many stripes of the fence (64 of them, by ``hash``)."""
    found: dict[int, str] = {}
    for i in range(10_000):
        found.setdefault(hash(f"s{i}") & 63, f"s{i}")
        if len(found) == count:
            break
    return list(found.values())


@contextlib.contextmanager
def settled(
    store: Store, entries: Mapping[str, Any], collector: MemoryCollector | None = None
) -> Iterator[tuple[Chain, MemoryLayer, MemcachedJournal]]:
    """A chain on ``store`` (its journal polled by the test: ``no_poller``) whose
    journal made its first reads, with ``entries`` set for 60 s and published."""
    chain, l1 = make_chain(store, collector)
    with chain:
        journal = chain_journal(chain)
        journal.poll()
        journal.poll()
        for key, value in entries.items():
            chain.set(key, value, 60)
        journal.poll()
        yield chain, l1, journal


def stall(journal: MemcachedJournal) -> None:
    """What the watchdog sees of a poll stuck past the bound: it reports unreachable."""
    journal._troubled = True
    journal._last_ok -= 10.0
    journal.check_stuck()


@pytest.mark.usefixtures("no_poller")
def test_a_late_poll_sets_l1_aside_and_one_begun_after_it_brings_back_the_untouched() -> None:
    """Lost track as ``unreachable`` (the poll was late: the process busy, the GIL slow
    to come back, the shared layer slow) serves nothing from L1 until a poll begun
    after it succeeds; then the entries come back but those whose stripe a change
    touched (delivered by that poll, or made here meanwhile). Before: every entry was
    dropped, and a busy process refilled its L1 from memcached after each late poll."""
    store = Store()
    collector = MemoryCollector()
    kept, remote, local, reread = keys_in_distinct_stripes(4)
    entries = dict.fromkeys((kept, remote, local, reread), "old")
    with settled(store, entries, collector) as (chain, l1, journal):
        other = peer(store)
        stall(journal)
        assert all(l1.get(key) is MISSING for key in (kept, remote, local, reread))
        assert chain.get(reread) == "old"  # read from the shared layer meanwhile
        p = other.ns.current()
        store.set(p + remote, "new", 60)
        other.publish(remote)  # another process's change, delivered late
        chain.set(local, "mine", 60)  # and one made here while set aside
        journal.poll()  # begun after the stall: caught up
        assert l1.get(kept) == "old"  # brought back
        assert l1.get(remote) is MISSING and chain.get(remote) == "new"
        assert l1.get(local) == "mine" and l1.get(reread) == "old"
        figures = collector.snapshot().chain_metrics
        assert figures.coherence_lost_by_reason == {"unreachable": 1}


@pytest.mark.usefixtures("no_poller")
def test_only_a_poll_begun_after_the_stall_brings_entries_back() -> None:
    """A poll in flight when the watchdog reported (it began before) may have read the
    ring before changes published since: it brings nothing back; the next one does."""
    store = Store()
    with settled(store, {"k": "v"}) as (_, l1, journal):
        stall(journal)
        journal._stalled_at = journal._clock() + 3600.0  # as if it came mid-poll
        journal.poll()
        assert l1.get("k") is MISSING
        journal._stalled_at = journal._clock() - 0.001
        journal.poll()
        assert l1.get("k") == "v"


@pytest.mark.usefixtures("no_poller")
def test_a_loss_of_track_while_set_aside_drops_what_was_set_aside() -> None:
    store = Store()
    with settled(store, {"k": "v"}) as (chain, l1, journal):
        stall(journal)
        other = peer(store)
        other.journal._max_pending = 1
        other.journal.publish(["x", "y"])  # overflow: changes were missed
        other.journal.poll()
        journal.poll()
        assert l1.get("k") is MISSING
        assert chain.coherence is not None and chain.coherence._aside is None


@pytest.mark.usefixtures("no_poller")
def test_a_second_stall_before_catching_up_drops_everything() -> None:
    """Late for a second bound (an outage rather than a busy moment): what was set
    aside goes too."""
    store = Store()
    with settled(store, {"first": 1}) as (chain, l1, journal):
        stall(journal)
        assert chain.get("first") == 1  # read again from the shared layer into L1
        stall(journal)  # still late, one bound later
        assert l1.get("first") is MISSING
        journal.poll()
        assert l1.get("first") is MISSING
        assert chain.coherence is not None and chain.coherence._aside is None


@pytest.mark.usefixtures("no_poller")
def test_a_clear_while_set_aside_brings_nothing_back() -> None:
    store = Store()
    with settled(store, {"k": "v"}) as (chain, l1, journal):
        stall(journal)
        assert chain.clear() is True
        journal.poll()
        assert l1.get("k") is MISSING and chain.get("k") is None


def test_set_aside_and_bring_back_keep_order_room_expiry_and_newer_entries() -> None:
    clock = FakeClock()
    layer = MemoryLayer(maxsize=4, default_ttl=None, clock=clock)
    for key in ("a", "b", "c"):
        layer.set(key, key.upper())
    layer.set("short", "S", 5.0)
    aside = layer.set_aside()
    assert len(layer) == 0 and list(aside) == ["a", "b", "c", "short"]
    layer.set("b", "newer")
    layer.set("d", "D")
    clock.advance(10.0)  # "short" expired meanwhile
    assert layer.bring_back(aside) == 2  # room for two: the most recent, c and a
    assert list(layer._entries) == ["a", "c", "b", "d"]
    assert layer.get("b") == "newer" and layer.get("short") is MISSING


@pytest.mark.usefixtures("no_poller")
def test_a_poll_that_did_not_reach_the_head_brings_nothing_back() -> None:
    """Found by review: a poll stops after its rounds (512 entries) or at a slot not
    written yet; one that began after the stall but stopped short had not delivered
    every change, and entries came back stale."""
    store = Store()
    with settled(store, {"victim": "old"}) as (chain, l1, journal):
        other = peer(store)
        stripe = hash("victim") & 63
        fillers = (f"filler{i}" for i in range(200_000))
        for key in [k for k in fillers if hash(k) & 63 != stripe][:600]:
            other.publish(key)  # a backlog longer than one poll reads
        p = other.ns.current()
        store.set(p + "victim", "new", 60)
        other.publish("victim")
        stall(journal)
        journal.poll()  # began after the stall, read 512 entries of 601
        assert l1.get("victim") is MISSING
        journal.poll()  # the rest, the victim's change included: caught up
        assert chain.get("victim") == "new"


@pytest.mark.usefixtures("no_poller")
def test_a_poll_that_waits_for_a_slot_brings_nothing_back() -> None:
    store = Store()
    with settled(store, {"victim": "old"}) as (chain, l1, journal):
        other = peer(store)
        store.incr(HEAD_KEY, 1)  # a publisher between its incr and its set_many
        p = other.ns.current()
        store.set(p + "victim", "new", 60)
        other.publish("victim")
        stall(journal)
        journal.poll()
        assert l1.get("victim") is MISSING and chain.get("victim") == "new"


@pytest.mark.usefixtures("no_poller")
def test_a_first_layer_that_fails_to_set_aside_is_emptied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: a failing ``set_aside`` left L1 serving past the bound."""
    store = Store()
    with settled(store, {"k": "v"}) as (_, l1, journal):

        def fail() -> None:
            raise MemoryError

        monkeypatch.setattr(l1, "set_aside", fail)
        stall(journal)
        assert l1.get("k") is MISSING


@pytest.mark.usefixtures("no_poller")
def test_a_poll_ending_between_the_stall_and_its_report_does_not_strand_the_entries() -> None:
    """Found by review: the watchdog marked the stall before the receiver set its
    entries aside; a poll that ended in between reported a catch-up of nothing, and
    the entries set aside then never came back."""
    store = Store()
    with settled(store, {"k": "v"}) as (chain, l1, journal):
        coherence = chain.coherence
        assert coherence is not None
        lost = coherence.lost

        def slow_lost(reason: str) -> None:  # a poll runs before the entries go aside
            journal.poll()
            lost(reason)

        coherence.lost = slow_lost  # type: ignore[method-assign]
        stall(journal)
        assert l1.get("k") is MISSING
        journal.poll()
        assert l1.get("k") == "v"


def test_setting_entries_aside_swaps_the_store_instead_of_copying_it() -> None:
    layer = MemoryLayer(maxsize=8, default_ttl=None)
    layer.set("a", 1)
    before = layer._entries
    aside = layer.set_aside()
    assert aside is before and layer._entries is not before and len(layer) == 0
    layer.set("b", 2)
    assert layer.get("b") == 2 and layer.get("a") is MISSING


@pytest.mark.usefixtures("no_poller")
def test_entries_come_back_in_chunks_in_their_order() -> None:
    """A catch-up brings entries back 512 at a time (each chunk one hold of the
    fence's lock), the most recent chunk first: the LRU order comes back whole."""
    store = Store()
    l1 = MemoryLayer("L1", maxsize=2_000)
    with Chain([l1, store]) as chain:
        journal = chain_journal(chain)
        journal.poll()
        journal.poll()
        keys = [f"k{i}" for i in range(1_500)]
        l1.set_many(dict.fromkeys(keys, 1))  # in the LRU order of ``keys``
        stall(journal)
        assert len(l1) == 0
        journal.poll()
        assert list(l1._entries) == keys
