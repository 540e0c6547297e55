"""MemcachedJournal: the default backplane, an invalidation ring in the shared memcached.

The ring lives in the chain's shared layer under the namespace's reserved keys (never
namespaced; ``__cachechain__/<codec tag>/``, see :mod:`cachechain._namespace`): a head
counter (``.../j/head``, the sequence number of the last entry reserved) and ``slots``
entries (``.../j/<seq % slots>``), each ``[seq, origin, published_at, keys]`` (``keys``
None: "drop everything", a publisher's overflow or an entry the layer refused).

One thread per journal:

1. **publishes** the keys this process changed (woken by the first of them, at most
   once per ``interval * PUBLISH_DELAY`` between polls): reserves as many
   sequence numbers as it has batches with one ``incr`` of the head and writes the
   entries with one ``set_many`` (at most :data:`BATCH` keys or :data:`BATCH_BYTES`
   of them per entry). A key whose write the shared layer has not taken yet
   (``held(key)``: its writer still holds it, a write-behind set or a repair) waits
   for a later round, so no process re-reads the old value after dropping its copy.
   A write never waits for the journal. Past ``max_pending`` keys the process
   publishes one "drop everything" entry instead.
2. **polls**: one ``get_many`` of the head, the generation key and the ``read_ahead``
   slots after the last sequence number seen (more round trips only while behind).
   Entries are delivered in order to the receiver, but those this journal published
   (its ``origin``). A new generation is adopted (:meth:`Namespace.adopt
   <cachechain._namespace.Namespace.adopt>`) and reported as
   :meth:`~cachechain._backplane.Receiver.cleared`.

The first read of the ring (at start, after a fork, after the ring was reset) starts
from its head and drops every local entry, since what was cached before it may
predate entries it skips.

**Losing track** drops every local entry (:meth:`~cachechain._backplane.Receiver.lost`)
rather than serving one past the bound (but for ``unreachable``, the receiver may set
them aside until a poll begun after it succeeds:
:meth:`~cachechain._backplane.Receiver.caught_up`): the ring overran the entries not read yet, an
entry stayed unwritten for ``bound`` seconds (its publisher died between the ``incr``
and the ``set_many``), the head vanished, went back or names another ring
(``flush_all``, a restart, an eviction: a new ring starts at a random multiple of
``2 ** 32``, see :func:`ring_start`), an entry is malformed, or no poll began
successfully for ``bound - interval * PUBLISH_DELAY - WATCH_TICK`` seconds, 70 ms by
default (the shared layer unreachable or stalled: a process-wide watchdog thread
notices while the poll, or a publication between polls, is still stuck in its socket
timeout; then again every ``bound`` while it lasts). A process paused (SIGSTOP, a long
GC) catches up from the ring when it resumes, within one interval.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from . import _fork
from ._backplane import Receiver
from ._config import PUBLISH_DELAY, WATCH_TICK, stuck_after
from ._errors import LayerUnavailableError
from ._logonce import LogOnce
from ._namespace import Namespace, bookkeeping_ttl
from .layers._base import CacheLayer

__all__ = ["BATCH", "BATCH_BYTES", "MemcachedJournal", "batches_of"]

logger = logging.getLogger("cachechain.coherence")
_log_once = LogOnce(logger)

#: Seconds an entry stays in memcached: far longer than any reader may lag.
ENTRY_TTL: Final = 300.0
#: Keys in one entry, and their characters at most (memcached's items are 1 MB).
BATCH: Final = 1000
BATCH_BYTES: Final = 400_000
_MAX_ROUNDS: Final = 64  # reads per poll while behind, before the next interval
#: A ring's sequence numbers start at a random multiple of ``2 ** RING_BITS``
#: (:func:`ring_start`): their high bits name the ring, so that a ring made again (its
#: head lost to a ``flush_all``, a restart, an eviction) is not taken for the one a
#: reader was following, even when the new head has reached the reader's last number.
RING_BITS: Final = 32


def ring_start() -> int:
    """The head of a new ring: a random multiple of ``2 ** RING_BITS`` below ``2 **
    62`` (memcached's counters are 64-bit unsigned)."""
    return secrets.randbits(62 - RING_BITS) << RING_BITS


def batches_of(keys: Sequence[str]) -> list[list[str]]:
    """``keys`` cut into entries of at most :data:`BATCH` keys and
    :data:`BATCH_BYTES` characters."""
    if len(keys) <= BATCH and sum(map(len, keys)) + 4 * len(keys) <= BATCH_BYTES:
        return [list(keys)] if keys else []  # the usual case: one entry, counted in C
    out: list[list[str]] = []
    batch: list[str] = []
    size = 0
    for key in keys:
        if batch and (len(batch) >= BATCH or size + len(key) > BATCH_BYTES):
            out.append(batch)
            batch, size = [], 0
        batch.append(key)
        size += len(key) + 4
    if batch:
        out.append(batch)
    return out


class _Watchdog:
    """One daemon thread per process that reports lost track for the journals whose
    poll is stuck in I/O (a partition: a read waits for its socket timeout, longer
    than the bound). It stops when no journal is left and starts again with the next."""

    def __init__(self) -> None:
        self._journals: weakref.WeakSet[MemcachedJournal] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._running = False
        _fork.track(self)

    def _after_fork(self) -> None:
        """In a forked child: no thread (journals register again as they restart)."""
        self._lock = threading.Lock()
        self._running = False
        self._journals = weakref.WeakSet()

    def watch(self, journal: MemcachedJournal) -> None:
        with self._lock:
            self._journals.add(journal)
            if self._running:
                return
            self._running = True
        threading.Thread(
            target=self._run, name="cachechain-coherence-watchdog", daemon=True
        ).start()

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_TICK)
            with self._lock:
                journals = list(self._journals)
                if not journals:
                    self._running = False
                    return
            for journal in journals:
                journal.check_stuck()


_WATCHDOG = _Watchdog()


class MemcachedJournal:
    """The invalidation ring of ``layer`` (the shared layer, unwrapped), a
    :class:`~cachechain._backplane.Backplane`.

    ``namespace`` is the layer's :class:`~cachechain._namespace.Namespace`: each poll
    reads its generation. ``keys``: False to neither publish nor read keys (the
    generation only); ``follow``: False to publish this process's keys without reading
    the others' (a chain without in-process layers above the shared one has nothing to
    drop, but the other processes' in-process layers must hear of its writes).
    ``interval`` and ``bound``
    are seconds (``interval < bound``); ``slots`` the ring's size; ``held(key)`` says
    whether a write of ``key`` has not reached the layer yet, ``overflowed()`` whether
    the layer's writer gave up key by key (it then holds every key, and its overflow
    handling moves the namespace generation instead); ``clock`` (monotonic)
    and ``wall`` (epoch) return seconds. Thread-safe; :meth:`poll` may be called
    directly (tests) instead of :meth:`start`.
    """

    def __init__(
        self,
        layer: CacheLayer,
        namespace: Namespace,
        *,
        keys: bool = True,
        follow: bool = True,
        interval: float = 0.04,
        bound: float = 0.1,
        slots: int = 1024,
        read_ahead: int = 8,
        max_pending: int = 10_000,
        held: Callable[[str], bool] = lambda key: False,
        overflowed: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._layer: Any = layer
        self._ns = namespace
        self._keys = keys
        self._follow = keys and follow
        self._interval = interval
        self._bound = bound
        self._slots = slots
        self._read_ahead = read_ahead
        self._max_pending = max_pending
        self._held = held
        self._overflowed = overflowed
        self._clock = clock
        self._wall = wall
        self._receiver: Receiver | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._reset_state()
        _fork.track(self)

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # keys are pending: publish them soon
        self._pending: dict[str, None] = {}
        self._overflow = False
        #: Keys held back at an overflow because their writes had not landed yet.
        self._held_over: dict[str, None] = {}
        self._origin = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._last: int | None = None  # the last sequence number applied
        self._gap_since: float | None = None
        self._last_ok = self._clock()
        self._troubled = False  # a poll is in flight, or the last one failed
        #: When the watchdog last reported ``unreachable``, until a poll begun after it
        #: succeeds (then the receiver is told it caught up); None otherwise.
        self._stalled_at: float | None = None
        self._head_key = self._ns.reserved + "j/head"

    def _slot(self, seq: int) -> str:
        return f"{self._ns.reserved}j/{seq % self._slots}"

    def _after_fork(self) -> None:
        """In a forked child: fresh locks and origin, nothing pending, the ring read
        again from its head, and the poller started again if it ran."""
        running = self._thread is not None and not self._closed
        self._thread = None
        self._reset_state()
        if running and self._receiver is not None:
            self.start(self._receiver)

    # -- the backplane --------------------------------------------------------------
    @property
    def bound(self) -> float:
        """Seconds within which a published key is invalidated everywhere (or track
        is lost and every local entry dropped)."""
        return self._bound

    @property
    def interval(self) -> float:
        """Seconds between two polls."""
        return self._interval

    def start(self, receiver: Receiver, *, thread: bool = True) -> None:
        """Deliver to ``receiver`` from a daemon thread polling every ``interval``
        (``thread=False``: no thread; the caller calls :meth:`poll`, as tests do)."""
        self._receiver = receiver
        if not thread:
            return
        poller = threading.Thread(target=self._run, name="cachechain-coherence", daemon=True)
        self._thread = poller
        poller.start()
        _WATCHDOG.watch(self)

    def check_stuck(self) -> None:
        """The watchdog's check, while a poll or a publication between polls is in
        flight, or the last poll failed: no poll began successfully for ``bound -
        interval * PUBLISH_DELAY - WATCH_TICK`` seconds (one stuck in I/O cannot say so
        itself): report lost track, then again every ``bound``. More than ``interval``
        (the configuration checks it), so a poll begun in time is never taken for a
        stuck one. A poller merely late (the process busy) is left alone. Never
        raises."""
        receiver = self._receiver
        if receiver is None or self._closed or not self._troubled:
            return
        now = self._clock()
        # Fresh as of the last good poll's start, less a publisher's delay; the
        # watchdog looks again one tick later: drop before that could exceed the bound.
        if now - self._last_ok > stuck_after(self._interval, self._bound):
            self._last_ok = now
            receiver.lost("unreachable")
            # After the receiver set its entries aside: a poll that ended in between
            # must not report a catch-up before there was anything to catch up.
            self._stalled_at = now

    def publish(self, keys: Sequence[str]) -> None:
        """Queue ``keys`` for the poller thread, which publishes them within
        :data:`PUBLISH_DELAY` of the ``interval`` (at once when idle). Never blocks on
        I/O, never raises."""
        if not self._keys:
            return
        with self._lock:  # never acquire() then try (see _fence's _WITH_ONLY)
            pending = self._pending
            if not pending:
                self._wake.set()
            for key in keys:
                pending[key] = None
            if len(pending) > self._max_pending:
                self._overflow_locked(pending)

    def _overflow_locked(self, pending: dict[str, None]) -> None:
        """Past ``max_pending`` keys (the journal's lock held): one "drop everything"
        entry instead of the keys, but for those whose writes have not landed yet.
        Those wait apart and are published once they land: the "drop everything" goes
        out before, and a process that dropped its copy could read the old value back
        meanwhile. None while the writer is overflowed: it holds every key then, and
        its overflow handling moves the namespace generation for every process."""
        if self._overflowed():
            self._held_over.clear()
        else:
            held = self._held
            self._held_over.update((key, None) for key in pending if held(key))
        pending.clear()
        self._overflow = True

    def close(self, timeout: float) -> None:
        """Stop the poller (waiting at most ``timeout`` seconds) and publish what is
        pending, once, best effort. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        try:
            self._publish_pending()
        except Exception as exc:
            _log_once(("publish", self._layer.name), "coherence: last publish failed: %r", exc)

    # -- one round ------------------------------------------------------------------
    def _run(self) -> None:
        """Poll every ``interval``; between polls, publish pending keys as soon as
        they come, at most once per ``interval * PUBLISH_DELAY`` (so a write burst
        costs a few round trips, not one per write)."""
        stop, wake, clock, interval = self._stop, self._wake, self._clock, self._interval
        gap = interval * PUBLISH_DELAY
        next_poll = clock() + interval
        while not stop.is_set():
            woke = wake.wait(max(0.0, next_poll - clock()))
            if stop.is_set():
                return
            began = clock()
            if began >= next_poll:
                self.poll()
                # At a fixed rate: a poll slowed down (the process busy, the GIL slow
                # to come back) does not push the next one back by its own length.
                next_poll = max(began + interval, clock() + gap)
            elif woke:
                wake.clear()
                self._publish_quietly()
                stop.wait(min(gap, max(0.0, next_poll - clock())))  # never past a poll

    def _publish_quietly(self) -> None:
        """Publish between polls. No poll runs while this is in flight, so the
        watchdog watches it as it watches a poll: one stuck in I/O reports lost track."""
        troubled = self._troubled
        self._troubled = True
        try:
            self._publish_pending()
        except Exception as exc:
            _log_once(("publish", self._layer.name), "coherence: publish failed: %r", exc)
        finally:
            self._troubled = troubled  # the next poll tells whether the layer answers

    def poll(self) -> None:
        """One round: publish what is pending, then read the generation and the ring,
        delivering to the receiver. Never raises: a failure is logged once and, once
        no round succeeded for ``bound`` seconds, reported as lost track."""
        receiver = self._receiver
        if receiver is None:
            return
        began = self._clock()
        self._troubled = True  # until this poll succeeds: in flight, or failed
        try:
            self._publish_pending()
            caught_up = self._read(receiver)
        except Exception as exc:
            _log_once(("poll", self._layer.name), "coherence: poll failed: %r", exc)
            self.check_stuck()
            return
        self._last_ok = max(self._last_ok, began)
        self._troubled = False
        stalled = self._stalled_at
        if caught_up and stalled is not None and began > stalled:
            self._stalled_at = None  # every entry published before it was read
            try:
                receiver.caught_up()
            except Exception as exc:
                _log_once(("caught_up", self._layer.name), "coherence: catch-up failed: %r", exc)

    def _take(self) -> tuple[list[str], bool]:
        """The pending keys whose writes landed (the others stay), and the overflow."""
        with self._lock:
            pending, overflow, over = self._pending, self._overflow, self._held_over
            if not pending and not overflow and not over:
                return [], False
            held = self._held
            ready = [k for k in pending if not held(k)]
            for key in ready:
                del pending[key]
            if over:
                landed = [k for k in over if not held(k)]
                for key in landed:
                    del over[key]
                ready += landed
            self._overflow = False
            return ready, overflow

    def _publish_pending(self) -> None:
        ready, overflow = self._take()
        if overflow:
            batches: list[list[str] | None] = [None]
        else:
            batches = list(batches_of(ready))
        if not batches:
            return
        try:
            self._write(batches)
        except Exception:
            with self._lock:  # try again next round
                if overflow:
                    self._overflow = True
                for key in ready:
                    self._pending[key] = None
            raise

    def _write(self, batches: Sequence[list[str] | None]) -> None:
        n = len(batches)
        top = self._layer.incr(self._head_key, n)
        if top is None:  # no head yet (or flushed): start one
            self._layer.add(self._head_key, ring_start(), bookkeeping_ttl(self._layer))
            top = self._layer.incr(self._head_key, n)
            if top is None:
                raise LayerUnavailableError("the journal head could not be created")
        first, now = top - n + 1, self._wall()
        entries = {
            self._slot(first + i): [first + i, self._origin, now, batch]
            for i, batch in enumerate(batches)
        }
        refused = self._layer.set_many(entries, ENTRY_TTL)
        if refused:  # too big for the layer: "drop everything" in its place, not a gap
            self._layer.set_many({k: [*entries[k][:3], None] for k in refused}, ENTRY_TTL)

    def _read(self, receiver: Receiver) -> bool:
        """Read the generation and the ring, delivering to ``receiver``; return whether
        every entry published before this read was delivered (the head reached, no
        slot awaited), not when rounds ran out or the journal closed."""
        epoch = self._ns.epoch
        got = self._get(self._last)
        if self._ns.adopt(got.get(self._ns.generation_key), epoch):
            self._last = None  # what was published before the clear is cleared too
            receiver.cleared()
        if not self._follow:
            return True
        for _ in range(_MAX_ROUNDS):
            if not self._apply(got, receiver):
                return self._gap_since is None  # at the head, unless a slot is awaited
            if self._stop.is_set():
                return False  # closed: no round trip after close() returned
            got = self._get(self._last)
        return False  # still behind the head

    def _get(self, last: int | None) -> Mapping[str, Any]:
        generation = self._ns.generation_key
        if not self._follow:
            return self._layer.get_many([generation])  # type: ignore[no-any-return]
        wanted = [self._head_key, generation]
        if last is not None:
            wanted += [self._slot(s) for s in range(last + 1, last + 1 + self._read_ahead)]
        return self._layer.get_many(wanted)  # type: ignore[no-any-return]

    def _apply(self, got: Mapping[str, Any], receiver: Receiver) -> bool:
        """Deliver the entries of one read; return whether more are to be read now."""
        head = got.get(self._head_key)
        if type(head) is not int:
            if self._last is not None:
                receiver.lost("reset")
            self._layer.add(self._head_key, ring_start(), bookkeeping_ttl(self._layer))
            self._last = None
            return False
        last = self._last
        # Another ring: the head went back, or its high bits changed (made again since
        # this reader's last read; once in 2**32 entries, the ring's own count crossing
        # into the next multiple is taken for one too, which costs one drop).
        new_ring = last is not None and (head < last or head >> RING_BITS != last >> RING_BITS)
        if last is None or new_ring or head == last or head - last > self._slots:
            self._gap_since = None  # a wait for a slot never outlives a restart
        if last is None:  # the first read (or after a reset): start from the head
            self._last = head
            receiver.cleared()  # what was cached before may predate entries skipped
            return False
        if new_ring:
            receiver.lost("reset")
            self._last = head
            return False
        if head - last > self._slots:
            receiver.lost("overrun")
            self._last = head
            return False
        return self._entries(got, head, receiver)

    def _entries(self, got: Mapping[str, Any], head: int, receiver: Receiver) -> bool:
        last = self._last or 0  # set by the caller: never None here
        for seq in range(last + 1, min(head, last + self._read_ahead) + 1):
            entry = got.get(self._slot(seq))
            found = _seq_of(entry)
            if found == seq:
                self._deliver(entry, receiver)
            elif found is not None and found > seq:
                receiver.lost("overrun")
                self._last = head
                return False
            elif not self._gap_expired():
                return False  # reserved, not written yet: read it again next round
            else:
                receiver.lost("gap")
            self._gap_since = None
            self._last = last = seq
        return last < head

    def _gap_expired(self) -> bool:
        now = self._clock()
        if self._gap_since is None:
            self._gap_since = now
        return now - self._gap_since > self._bound

    def _deliver(self, entry: Any, receiver: Receiver) -> None:
        _, origin, published_at, keys = entry
        if origin == self._origin:
            return
        if keys is None:
            receiver.lost("overflow")
            return
        if not all(type(k) is str for k in keys):
            receiver.lost("other")  # not keys this version can read: drop everything
            return
        lag = max(0.0, self._wall() - published_at) if isinstance(published_at, float) else 0.0
        receiver.invalidate(keys, lag)


def _seq_of(entry: object) -> int | None:
    """The sequence number of a well-formed ring entry, else None."""
    if (
        isinstance(entry, list)
        and len(entry) == 4
        and type(entry[0]) is int
        and (entry[3] is None or isinstance(entry[3], list))
    ):
        return entry[0]
    return None
