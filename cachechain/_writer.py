"""Write-behind for the lower layers of a chain: :class:`AsyncWriter`.

A chain writes its local layer synchronously and hands writes for each lower (remote)
layer to one :class:`AsyncWriter`, so a page view never waits for memcached to store a
value. The writer keeps its own bounded queue rather than one executor task per write:

- one pending operation per key (last write wins): a new ``set``/``delete`` of a key that
  is still queued replaces that operation in place, so a hot key cannot fill the queue;
- per-key order: a key being written by a worker is not taken by another worker until
  that write ends, so a ``delete`` is never overtaken by an older ``set`` of the key;
- a bounded queue of ``queue_size`` distinct keys: when it is full a ``set`` of a new key
  waits at most ``max_wait`` seconds for room and is then dropped and counted. A
  ``delete`` is never dropped: it replaces a queued ``set`` of the key, or is queued even
  when the queue is full (so deletes may take the queue past ``queue_size``);
- up to ``workers`` "drain" tasks run on a ``ThreadPoolExecutor``; each takes the oldest
  queued key that no other worker is writing, writes it, and repeats, and ends after
  ``idle_timeout`` seconds without work. Under load an enqueue is a dict insert under a
  lock, far cheaper than ``ThreadPoolExecutor.submit``;
- a write that raises is counted and logged (at WARNING once per exception type per
  writer, then at DEBUG) and the worker carries on; a set refused by an open circuit
  breaker (:class:`~cachechain.CircuitOpenError`) is counted as dropped;
- a layer that missed a write may keep an older value of the key, so a write that fails
  or is refused (a value refused as invalid included: the layer's own delete of the old
  value is best effort) leaves a *repair*: a delete of the key, retried with a backoff
  from ``retry_delay`` to ``max_retry_delay`` seconds until it lands. Each retry round
  sends one repair, and one that lands starts the next at once, so a layer still down
  gets one call per round however many keys wait. Until then the key is held
  (:meth:`AsyncWriter.holds`), so a chain neither serves nor copies up the layer's value
  of it. A newer set or delete of the key replaces its repair;
- at most ``max_repairs`` repairs wait, so a long outage does not grow memory. Past
  the cap the writer *overflows*: it gives up the key-by-key repairs and handles the
  layer as a whole. While overflowed it holds every key (a chain reads nothing from
  the layer, which may keep an older value of any key) and, on the same backoff, calls
  its overflow handler (:attr:`AsyncWriter.overflow_handler`, for a chain's shared
  layer: move the namespace generation, so no process reads a value written before);
  the first call that returns True ends the overflow. Without a handler the layer
  stays unread until one is set or the writer is closed;
- :meth:`AsyncWriter.close` stops intake and drains within one deadline; at interpreter
  exit without ``close`` every live writer is drained for at most
  :attr:`AsyncWriter.exit_timeout` seconds, before ``concurrent.futures`` joins its
  threads, and the rest is counted as dropped;
- after ``os.fork()`` the child's writers get fresh locks, an empty queue (the parent
  writes its own pending operations), zeroed counters and no executor (one is created
  when first needed).

The queue is :class:`~cachechain._writequeue.WriteQueue` and the retry rounds are
:class:`~cachechain._repairs.RepairSchedule`, both plain logic; this module is the thread
shell around them: the lock and its conditions, the workers, the observer, close and
flush, and the exit and fork hooks.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from . import _fork
from ._errors import ChainClosedError, CircuitOpenError, ConfigError
from ._logonce import LogOnce
from ._repairs import RepairSchedule
from ._validate import check_callable, check_count, check_seconds
from ._writequeue import COALESCED, DELETE, DELETE_OP, FULL, QUEUED, SET, Op, WriteQueue
from .layers._base import CacheLayer

if TYPE_CHECKING:
    from ._config import WriterConfig

__all__ = ["DROP_REASONS", "AsyncWriter", "WriterObserver", "WriterStats"]

log = logging.getLogger("cachechain.writer")

#: The reasons a queued or offered write is dropped (a closed set, used as metrics labels):
#: ``queue_full`` (a set of a new key found the queue full for its whole wait),
#: ``circuit_open`` (the layer's breaker refused the write), ``closed`` (the writer was
#: closed, or the interpreter exited, before the write could be made).
DROP_REASONS: Final = ("queue_full", "circuit_open", "closed")

_NOTHING: Final[frozenset[str]] = frozenset()
_NO_HANDLER: Final = "it has no overflow handler: not until one is set or the writer closes"
_INF: Final = math.inf

# Outcomes of one write, as seen by a drain task.
_WRITTEN: Final = 0
_FAILED: Final = 1
_REFUSED: Final = 2

#: An event for the observer: ``("dropped", reason, count)``, ``("written", success,
#: seconds)`` or ``("depth", depth, None)``.
_Event = tuple[str, Any, Any]


@dataclass(frozen=True)
class WriterStats:
    """A point-in-time view of an :class:`AsyncWriter`.

    - ``depth``: operations queued and not yet taken by a worker;
    - ``capacity``: the queue bound (``queue_size``) for sets of new keys;
    - ``inflight``: writes a worker is making right now;
    - ``written`` / ``failed``: writes that the layer accepted / that raised;
    - ``coalesced``: operations that replaced a queued operation of the same key;
    - ``dropped``: operations never written, the sum of ``dropped_by_reason``, a dict
      with every reason of :data:`DROP_REASONS` as a key;
    - ``repairing``: keys whose repair delete waits to be retried (see the module
      docstring): the layer may hold an older value of each;
    - ``overflowed``: more than ``max_repairs`` repairs were owed, and the layer awaits
      its handling as a whole (it is not read meanwhile: see
      :attr:`AsyncWriter.overflow_handler`); ``overflows``: how many times that began.

    Counters start at zero when the writer is created (and again in a forked child).
    """

    depth: int
    capacity: int
    inflight: int
    written: int
    failed: int
    coalesced: int
    dropped: int
    dropped_by_reason: dict[str, int]
    repairing: int = 0
    overflowed: bool = False
    overflows: int = 0


class WriterObserver(Protocol):
    """Told what a writer did; set as :attr:`AsyncWriter.observer` (the chain sets one
    that feeds its metrics). Called outside the writer's lock, from the thread that
    caused the event; must not block and should not raise (what it raises is logged)."""

    def dropped(self, reason: str, count: int) -> None:
        """``count`` operations were dropped for ``reason`` (one of DROP_REASONS)."""

    def written(self, success: bool, duration: float) -> None:
        """One write was made (``success``) or failed, in ``duration`` seconds."""

    def depth(self, depth: int) -> None:
        """The queue holds ``depth`` operations after a write, repair deletes waiting
        for a retry included."""


class _Tally:
    """The counters of one writer and the events its observer has yet to be told.

    Every counter changes here, with the writer's lock held; the events are taken under
    the lock (:meth:`take`) and delivered once it is released (:meth:`deliver`).
    """

    __slots__ = (
        "_queue",
        "_repairs",
        "coalesced",
        "dropped",
        "events",
        "failed",
        "observer",
        "write_seconds",
        "written",
    )

    def __init__(self, queue: WriteQueue, repairs: RepairSchedule) -> None:
        self._queue = queue
        self._repairs = repairs
        self.observer: WriterObserver | None = None
        self.written = 0
        self.failed = 0
        self.coalesced = 0
        self.write_seconds = 0.0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.events: list[_Event] = []

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` operations dropped for ``reason`` (one of DROP_REASONS)."""
        self.dropped[reason] += count
        if self.observer is not None:
            self.events.append(("dropped", reason, count))

    def result(self, success: bool, duration: float) -> None:
        """Count one write made (``success``) or failed, which took ``duration`` seconds."""
        if success:
            self.written += 1
        else:
            self.failed += 1
        self.write_seconds += duration
        if self.observer is not None:
            self.events.append(("written", success, duration))
            self.events.append(("depth", len(self._queue) + len(self._repairs), None))

    def take(self) -> list[_Event]:
        """Take the events for the observer (lock held); :meth:`deliver` them later."""
        events = self.events
        if events:
            self.events = []
        return events

    def deliver(self, events: list[_Event], name: str) -> None:
        """Tell the observer about ``events`` (lock not held); what it raises is logged."""
        observer = self.observer
        if observer is None or not events:
            return
        try:
            for kind, a, b in events:
                if kind == "dropped":
                    observer.dropped(a, b)
                elif kind == "written":
                    observer.written(a, b)
                else:
                    observer.depth(a)
        except Exception:
            log.exception("cachechain writer for layer %r: its observer raised", name)


class _RepairRounds:
    """The repairs a writer owes its layer: the keys it holds for them, the retry rounds
    its workers run, and the overflow past ``max_repairs`` (see the module docstring).
    A base of :class:`_WriterWorkers`; every method runs with the writer's lock held
    unless its docstring says "lock not held"."""

    # State, set by _WriterWorkers._init_state and AsyncWriter.__init__.
    _name: str
    _lock: threading.Lock
    _idle: threading.Condition
    _queue: WriteQueue
    _repairs: RepairSchedule
    _tally: _Tally
    _abandon: bool
    #: Called by an overflow round; True once the layer was handled as a whole.
    _overflow_handler: Callable[[], bool] | None

    def _release(self, key: str) -> None:
        """Stop holding ``key`` if it is no longer queued, in flight or awaiting a retry."""
        if key not in self._repairs.waiting:
            self._queue.release(key)

    def _schedule_repair(self, key: str) -> bool:
        """After a failed or refused write of ``key``: keep a delete of it for the next
        retry round, unless a newer operation of it is queued. Past ``max_repairs`` the
        layer is handled as a whole instead (the writer overflows: see the module
        docstring). Returns whether a worker must run a round for it."""
        if self._queue.queued(key):
            return False  # the newer operation replaces the key's value (or deletes it)
        if self._abandon:  # closed and drained: nobody will retry it
            self._tally.drop("closed")
            return False
        repairs = self._repairs
        was = repairs.overflowed
        for given_up in repairs.add(key):  # (overflowed is set before they are let go)
            self._queue.release(given_up)
        if repairs.overflowed and not was:
            log.warning(
                "cachechain writer for layer %r: more than %d repair deletes pending; the "
                "layer is not read until it is handled as a whole (%s)",
                self._name,
                repairs.max_repairs,
                "by its overflow handler" if self._overflow_handler else _NO_HANDLER,
            )
            return True
        return key in repairs.waiting

    def _requeue_repairs(self, *, overflow: bool = True) -> None:
        """Queue every repair delete awaiting a retry, to be tried now (flush, close),
        and (``overflow``) ask for an overflow round now if the writer has a handler. A
        key queued meanwhile keeps its newer operation. Deletes take no queue room."""
        for key in self._repairs.take_all():
            self._queue.queue_delete(key)
        if overflow and self._overflow_handler is not None:
            self._repairs.hurry()

    def _start_round(self) -> None:
        """Start a retry round: the oldest repair joins the queue, busy or not (each that
        lands brings the next forward, so a layer still down gets one call per round)."""
        key = self._repairs.start_round()
        if key is not None:
            self._queue.queue_delete(key)

    def _rounds_pending(self) -> bool:
        """Whether retry rounds are to come: repairs wait, or the writer is overflowed
        and has a handler to call."""
        repairs = self._repairs
        return bool(repairs.waiting) or (repairs.overflowed and self._overflow_handler is not None)

    def _overflow_busy(self) -> bool:
        """Whether an overflow round is in progress, or was asked for now and a worker
        will start it (flush and close wait for it)."""
        repairs = self._repairs
        return repairs.handling or (repairs.hurried and self._overflow_handler is not None)

    def _handle_overflow(self, handler: Callable[[], bool]) -> None:
        """Run an overflow round: call ``handler`` (the lock is released around the
        call) and end the round with what it returned (an exception is a False,
        logged)."""
        for key in self._repairs.start_overflow():  # covered by this round
            self._queue.release(key)
        self._lock.release()
        handled = False
        try:
            handled = bool(handler())
        except Exception:
            log.warning(
                "cachechain writer for layer %r: its overflow handler raised",
                self._name,
                exc_info=True,
            )
        finally:
            self._lock.acquire()
            if not self._abandon:  # else close() gave up meanwhile and forgot it all
                over = self._repairs.end_overflow(handled)
                if over:
                    log.warning(
                        "cachechain writer for layer %r: the layer was handled as a whole; "
                        "it is read again",
                        self._name,
                    )
            if self._queue.idle():
                self._idle.notify_all()


class _WriterWorkers(_RepairRounds):
    """The worker side of :class:`AsyncWriter`: its shared state, the drain tasks and
    their lifecycle on the executor, the retry rounds they run, and stopping (close,
    interpreter exit, a forked child).

    :class:`AsyncWriter` adds what callers call. A method here runs with the writer's
    lock held unless its docstring says "lock not held".
    """

    _max_repairs: int

    # Settings, set by AsyncWriter.__init__ (see there).
    _layer: CacheLayer
    _name: str
    _clock: Callable[[], float]
    _queue_size: int
    _max_wait: float
    _workers: int
    _idle_timeout: float
    _min_retry: float
    _max_retry: float
    _given_executor: Executor | None
    #: Intake stopped: set/delete raise ChainClosedError.
    _closed: bool
    #: Draining is over: workers take nothing more.
    _abandon: bool

    def _init_state(self) -> None:
        """Create the locks, the queue, the repairs and the counters (at creation and in
        a forked child; lock not held)."""
        self._lock = threading.Lock()
        #: Notified when work is queued, for idle workers.
        self._work = threading.Condition(self._lock)
        #: Notified when a queue slot frees up, for sets waiting for room.
        self._room = threading.Condition(self._lock)
        #: Notified when nothing is queued or in flight, for flush and close.
        self._idle = threading.Condition(self._lock)
        #: Notified when a write ends while some thread waits in settle().
        self._settled = threading.Condition(self._lock)
        self._settlers = 0
        self._queue = WriteQueue(self._queue_size)
        #: Every key queued, in flight or awaiting a repair (WriteQueue.held, which this
        #: writer holds for its repairs too): holds() is one lock-free lookup in it. A key
        #: is queued or awaits a repair, never both, so a key the queue lets go of (a
        #: cancelled set) has no repair to keep it held.
        self._held = self._queue.held
        self._repairs = RepairSchedule(
            self._min_retry, self._max_retry, self._clock, self._max_repairs
        )
        self._keeper = False  # an idle worker stays for the retry rounds
        self._running = 0
        self._idle_workers = 0
        self._room_waiters = 0
        self._executor: Executor | None = self._given_executor
        self._tally = _Tally(self._queue, self._repairs)
        self._log_once = LogOnce(log)  # failed writes: WARNING once per exception type

    # ------------------------------------------------------------------ workers

    def _wake_worker(self) -> Executor | None:
        """Make sure a worker will see new work.

        Wakes an idle worker if there is one; otherwise reserves a new drain task if
        fewer than ``workers`` run, and returns the executor to submit it to (outside the
        lock) with :meth:`_submit`.
        """
        if self._idle_workers:
            self._work.notify()
            return None
        if self._running < self._workers:
            return self._start_workers(1)
        return None

    def _start_workers(self, count: int) -> Executor | None:
        """Reserve ``count`` drain tasks and return the executor, or None."""
        if count <= 0:
            return None
        executor = self._executor
        if executor is None:
            executor = self._executor = ThreadPoolExecutor(
                max_workers=self._workers,
                thread_name_prefix=f"cachechain-writer-{self._name}",
            )
        self._running += count
        return executor

    def _submit(self, executor: Executor, *, warn: bool = True) -> bool:
        """Submit one reserved drain task (lock not held); return False if queued
        operations were lost.

        An executor that was shut down (or the interpreter's shutdown) refuses tasks. If
        no worker is left to drain the queue, its operations are dropped (reason
        ``closed``) rather than left to wait forever, and False is returned. The refusal
        is logged at WARNING (``warn``), or at DEBUG (the exit drain: see
        :func:`_exit_drain`).
        """
        try:
            executor.submit(self._drain)
        except RuntimeError as exc:
            with self._lock:
                self._running -= 1
                lost = self._drop_orphaned_queue() if self._running == 0 else 0
                events = self._tally.take()
            self._tally.deliver(events, self._name)
            log.log(
                logging.WARNING if warn else logging.DEBUG,
                "cachechain writer for layer %r: its executor refused a worker (%s); "
                "%d queued writes dropped",
                self._name,
                exc,
                lost,
            )
            return lost == 0
        return True

    def _drop_orphaned_queue(self) -> int:
        """No worker can run: drop the queued sets (reason ``closed``) and keep the
        deletes as repairs, so their keys stay held. Returns the number of sets lost."""
        items = self._queue.pop_all()
        if not items:
            return 0
        lost = 0
        for key, op in items:
            self._repairs.withdraw(key)
            if op[0] is DELETE:
                self._schedule_repair(key)
                self._release(key)  # given up by an overflow: the next round covers it
            else:
                lost += 1
                self._release(key)
        self._tally.drop("closed", lost)
        self._room.notify_all()
        if self._queue.idle():
            self._idle.notify_all()
        return lost

    def _drain(self) -> None:
        """A drain task: write queued operations until idle for ``idle_timeout`` seconds
        (lock not held)."""
        executor: Executor | None = None
        events: list[_Event] = []
        try:
            with self._lock:
                try:
                    self._drain_locked()
                finally:
                    self._running -= 1
                    # A task ended by an exception must not leave work with no worker.
                    orphaned = (
                        (self._rounds_pending() or bool(len(self._queue)))
                        and self._running == 0
                        and not self._closed
                        and not self._abandon
                    )
                    executor = self._start_workers(1) if orphaned else None
                    events = self._tally.take()
        finally:
            self._tally.deliver(events, self._name)
            if executor is not None:
                self._submit(executor)

    def _drain_locked(self) -> None:
        """The loop of a drain task (the lock is released around each write)."""
        repairs = self._repairs
        take = self._queue.take
        while not self._abandon:
            if (repairs.waiting or repairs.overflowed) and repairs.due():
                if not repairs.overflowed:
                    self._start_round()  # a round is due: its repair joins the queue
                elif self._overflow_handler is not None:
                    self._handle_overflow(self._overflow_handler)
                    continue
            item = take()
            if item is not None:
                self._write(item[0], item[1])
            elif self._closed or not self._idle_wait():
                return

    def _idle_wait(self) -> bool:
        """Wait for work as an idle worker; return False when the task should
        end: nothing came within ``idle_timeout`` seconds and no repair needs it. One idle
        worker at a time stays for the retry rounds, waking when the next is due."""
        repairs = self._repairs
        wait = self._idle_timeout
        keeper = self._rounds_pending() and not self._keeper
        if keeper:  # this worker stays for the rounds; others may end
            self._keeper = True
            wait = repairs.idle_wait(wait)
        self._idle_workers += 1
        try:
            notified = self._work.wait(wait)
        finally:
            self._idle_workers -= 1
            if keeper:
                self._keeper = False
        return notified or self._queue.ready() or (keeper and self._rounds_pending())

    def _write(self, key: str, op: Op) -> None:
        """Make the write of ``key`` just taken (the lock is released around the call)."""
        if self._room_waiters:
            self._room.notify()
        lock = self._lock
        clock = self._clock
        lock.release()
        outcome = _FAILED
        start = clock()
        try:
            if op[0] is SET:
                self._layer.set(key, op[1], op[2])
            else:
                self._layer.delete(key)
            outcome = _WRITTEN
        except CircuitOpenError:
            outcome = _REFUSED
        except Exception as exc:
            self._log_failure(key, op, exc)
        finally:
            duration = clock() - start
            lock.acquire()
            self._write_ended(key, op, outcome, duration)

    def _write_ended(self, key: str, op: Op, outcome: int, duration: float) -> None:
        """Count the write of ``key`` that ended, leave a repair if it did not land, and
        wake whoever waits for it (the lock is released while the observer is told)."""
        repairs = self._repairs
        if key == repairs.probe:  # the round is over: schedule the next one
            repairs.end_round(key, outcome == _WRITTEN)
        if outcome == _WRITTEN:
            self._tally.result(True, duration)
        else:
            if outcome == _FAILED:
                self._tally.result(False, duration)
            elif op[0] is SET:  # a refused delete is not dropped
                self._tally.drop("circuit_open")
            self._schedule_repair(key)
        events = self._tally.take()
        if events:  # told before the write counts as done (flush, settle)
            self._lock.release()
            self._tally.deliver(events, self._name)
            self._lock.acquire()
        self._queue.done(key, keep=key in repairs.waiting)
        if self._settlers:
            self._settled.notify_all()
        if self._queue.idle():
            self._idle.notify_all()

    def _log_failure(self, key: str, op: Op, exc: Exception) -> None:
        """Log a failed write (lock not held): WARNING for the first of its type on this
        writer, then DEBUG."""
        kind = type(exc)
        args: dict[str, object] = {
            "layer": self._name,
            "op": op[0],
            "key": key,
            "type": kind.__qualname__,
            "error": exc,
        }
        self._log_once(
            (kind.__module__, kind.__qualname__),
            "cachechain writer for layer %(layer)r: a %(op)s failed: %(type)s: %(error)s "
            "(further %(type)s errors of this writer are logged at DEBUG)",
            args,
            debug="cachechain writer for layer %(layer)r: %(op)s of key %(key)r failed: "
            "%(type)s: %(error)s",
        )

    # ------------------------------------------------------------------ stopping

    def _wait_until_idle(self, deadline: float | None, *, until_abandoned: bool = False) -> bool:
        """Wait until nothing is queued or in flight (or, with
        ``until_abandoned``, another close gave up draining); False at ``deadline``
        (clock seconds; None: no deadline)."""
        while (not self._queue.idle() or self._overflow_busy()) and not (
            until_abandoned and self._abandon
        ):
            if deadline is None:
                self._idle.wait()
                continue
            remaining = deadline - self._clock()
            if remaining <= 0 or not self._idle.wait(remaining):
                return False
        return True

    def _begin_stop(self, timeout: float, *, warn: bool = True) -> float:
        """Stop intake, make sure workers drain, and return the deadline (clock seconds).
        A worker the executor refuses is logged at WARNING (``warn``) or DEBUG (at
        interpreter exit). Lock not held."""
        with self._lock:
            deadline = self._clock() + timeout
            self._closed = True
            if not self._abandon:
                self._requeue_repairs()  # one last try
            self._work.notify_all()
            self._room.notify_all()
            wanted = 0
            if not self._abandon:
                work = len(self._queue) + self._overflow_busy()
                wanted = min(self._workers - self._running, work)
            executor = self._start_workers(wanted)
        for _ in range(wanted):
            if executor is not None and not self._submit(executor, warn=warn):
                break  # the queue was dropped: no point in more workers
        return deadline

    def _finish_stop(self, deadline: float, *, warn: bool = True) -> int:
        """Wait for the queue to drain until ``deadline``; drop and count what is left,
        logging deletes not made at WARNING (``warn``) or DEBUG (at interpreter exit).
        Returns the number dropped. Lock not held."""
        with self._lock:
            self._wait_until_idle(deadline, until_abandoned=True)
            self._abandon = True
            items = self._queue.pop_all()
            lost = len(items)
            unmade = sum(1 for _, op in items if op[0] is DELETE)
            if lost:
                self._tally.drop("closed", lost)
            overflowed = self._repairs.overflowed
            unrepaired = self._repairs.clear()
            if overflowed:
                log.log(
                    logging.WARNING if warn else logging.DEBUG,
                    "cachechain writer for layer %r: closed while the layer awaited its "
                    "overflow handler; it may serve older values of any key until they expire",
                    self._name,
                )
            if unrepaired:
                self._tally.drop("closed", unrepaired)
                lost += unrepaired
            if unmade + unrepaired:
                log.log(
                    logging.WARNING if warn else logging.DEBUG,
                    "cachechain writer for layer %r: closed with %d deletes not made; the "
                    "layer may serve older values of those keys until they expire",
                    self._name,
                    unmade + unrepaired,
                )
            self._queue.release_all()
            self._work.notify_all()
            self._room.notify_all()
            self._idle.notify_all()
            return lost

    def _after_fork(self) -> None:
        """In a forked child (lock not held: it may be a copy of one held by a thread that
        does not exist there): fresh locks, an empty queue, zero counters, no executor.

        The parent writes its own queued operations. A given executor is not used in the
        child (its threads do not exist there); the writer creates its own when needed.
        """
        observer = self._tally.observer
        self._given_executor = None
        self._init_state()
        self._tally.observer = observer


class _WriterIntake(_WriterWorkers):
    """The intake helpers of :class:`AsyncWriter` (the writer's lock held): a set
    waiting for room in a full queue, a queued set cancelled."""

    def _closed_error(self) -> ChainClosedError:
        return ChainClosedError(f"the writer for layer {self._name!r} is closed")

    def _offer_when_room(self, key: str, op: Op, max_wait: float | None) -> int:
        """A set of ``key`` found the queue full: wait for room, then offer it again.
        Returns what :meth:`WriteQueue.offer` did, or FULL when the set was dropped (then
        counted, and the key released)."""
        wait = self._max_wait if max_wait is None else max_wait
        reason = self._wait_for_room(key, wait)
        if reason is not None:
            self._tally.drop(reason)
            self._release(key)
            return FULL
        # An older write of the key may have ended (and released it) while this one
        # waited: offer() holds it again before it is queued.
        outcome = self._queue.offer(key, op)
        if self._room_waiters and self._queue.has_room():
            self._room.notify()  # room is left: pass it on to another waiting set
        return outcome

    def _wait_for_room(self, key: str, wait: float) -> str | None:
        """Wait up to ``wait`` seconds until a set of ``key`` can be queued. Returns None
        when there is room (or ``key`` got queued meanwhile, to coalesce with), else the
        drop reason."""
        if wait <= 0:
            return "queue_full"
        deadline = self._clock() + wait
        self._room_waiters += 1
        try:
            while True:
                remaining = deadline - self._clock()
                timed_out = remaining <= 0 or not self._room.wait(remaining)
                if self._closed:
                    return "closed"
                if self._queue.has_room(key):
                    return None
                if timed_out:
                    return "queue_full"
        finally:
            self._room_waiters -= 1

    def delete_queued_sets(self) -> int:
        """Turn every set queued and not taken by a worker yet into a delete of its key
        (a clear makes them stale: none may land after it, and if the clear fails the
        deletes still leave no older value behind). Writes in flight are not affected.
        Returns how many sets were turned; they are not counted as dropped."""
        with self._lock:
            return self._queue.sets_to_deletes()

    def _unqueue_set(self, key: str) -> bool:
        """Remove a queued set of ``key`` that no worker has taken; return whether there
        was one. Wakes a set waiting for room, and flush when idle."""
        if not self._queue.cancel_set(key):
            return False
        self._repairs.withdraw(key)  # it may have replaced the repair of a retry round
        if self._room_waiters:
            self._room.notify()
        if self._queue.idle():
            self._idle.notify_all()
        return True


class AsyncWriter(_WriterIntake):
    """Writes ``set``/``delete`` operations to one cache layer in the background.

    ``layer`` is the lower layer this writer feeds (one writer per layer).
    ``queue_size`` bounds the number of distinct keys queued for a ``set`` to be taken
    (deletes are never refused and may exceed it). ``max_wait`` is the default number of
    seconds a ``set`` of a new key waits for room in a full queue (0: none) before it is
    dropped. ``workers`` is the number of concurrent writes. ``idle_timeout`` is how
    long (seconds) an idle worker waits for work before its task ends. ``executor`` is a
    thread pool to run the workers on; by default the writer creates its own (named
    ``cachechain-writer-<layer name>``) when first needed and shuts it down on
    :meth:`close`; a given executor is never shut down by the writer. ``retry_delay``
    and ``max_retry_delay`` (seconds) bound the backoff between rounds of repair
    deletes (see the module docstring). ``max_repairs`` caps the repair deletes that
    wait; past it the writer *overflows* and handles the layer as a whole through
    ``on_overflow`` (see :attr:`overflow_handler`). ``clock`` returns monotonic
    seconds; it times deadlines, backoffs and write durations and exists for tests.

    All methods are thread-safe. Raises :class:`~cachechain.ConfigError` naming
    the field for an invalid argument.
    """

    #: Seconds that pending writes get to drain at interpreter exit when the writer was
    #: not closed. Set it on the class or on an instance. The writes that do not fit are
    #: counted as dropped (reason ``closed``). A write already in progress at the bound
    #: still runs to its end (bounded by the layer's own timeouts) before the process
    #: exits, because ``concurrent.futures`` joins its threads.
    exit_timeout: float = 2.0

    def __init__(
        self,
        layer: CacheLayer,
        *,
        queue_size: int = 1000,
        max_wait: float = 0.0,
        workers: int = 1,
        idle_timeout: float = 1.0,
        retry_delay: float = 0.05,
        max_retry_delay: float = 2.0,
        max_repairs: int = 10_000,
        on_overflow: Callable[[], bool] | None = None,
        executor: ThreadPoolExecutor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        name = getattr(layer, "name", None)
        if (
            not isinstance(name, str)
            or not callable(getattr(layer, "set", None))
            or not callable(getattr(layer, "delete", None))
        ):
            raise ConfigError(f"layer must be a CacheLayer with a str name, got {layer!r}")
        self._queue_size = check_count(queue_size, "queue_size")
        self._max_wait = check_seconds(max_wait, "max_wait", zero_ok=True)
        self._workers = check_count(workers, "workers")
        self._idle_timeout = check_seconds(idle_timeout, "idle_timeout")
        self._min_retry = check_seconds(retry_delay, "retry_delay")
        self._max_retry = check_seconds(max_retry_delay, "max_retry_delay")
        if self._max_retry < self._min_retry:
            raise ConfigError(
                f"max_retry_delay must be >= retry_delay ({self._min_retry}), "
                f"got {max_retry_delay!r}"
            )
        if executor is not None and not isinstance(executor, ThreadPoolExecutor):
            raise ConfigError(f"executor must be a ThreadPoolExecutor or None, got {executor!r}")
        if not callable(clock):
            raise ConfigError(f"clock must be a callable returning seconds, got {clock!r}")
        self._max_repairs = check_count(max_repairs, "max_repairs")
        if on_overflow is not None:
            check_callable(on_overflow, "on_overflow")
        self._overflow_handler = on_overflow
        self._layer = layer
        self._name = name
        self._clock = clock
        self._given_executor = executor
        self._closed = False
        self._abandon = False
        self._init_state()
        _LIVE.add(self)
        _fork.track(self)

    @classmethod
    def from_config(
        cls,
        layer: CacheLayer,
        config: WriterConfig,
        *,
        on_overflow: Callable[[], bool] | None = None,
    ) -> AsyncWriter:
        """The async writer of ``layer`` with the settings of ``config`` (a
        :class:`~cachechain.WriterConfig`) and the overflow handler ``on_overflow``
        (see :attr:`overflow_handler`). Raises :class:`~cachechain.ConfigError` for a
        layer that is not a :class:`~cachechain.layers.CacheLayer`."""
        return cls(
            layer,
            queue_size=config.queue_size,
            max_wait=config.max_wait,
            workers=config.workers,
            retry_delay=config.retry_delay,
            max_retry_delay=config.max_retry_delay,
            max_repairs=config.max_repairs,
            on_overflow=on_overflow,
        )

    # ------------------------------------------------------------------ public API

    @property
    def layer(self) -> CacheLayer:
        """The layer this writer writes to."""
        return self._layer

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or the interpreter began to exit)."""
        return self._closed

    @property
    def observer(self) -> WriterObserver | None:
        """Told about drops and write results, outside the lock (see
        :class:`WriterObserver`); None (the default) for nobody. Settable."""
        return self._tally.observer

    @observer.setter
    def observer(self, observer: WriterObserver | None) -> None:
        self._tally.observer = observer

    @property
    def overflow_handler(self) -> Callable[[], bool] | None:
        """What handles the layer as a whole once the writer overflowed: a callable
        taking no argument that returns True when it did (for a shared layer, the
        chain moves the namespace generation there, so no process reads any value
        written before), and False or raises (logged) when it could not (the layer is
        down). Settable; None (the default) for none.

        The writer overflows when more than ``max_repairs`` repair deletes wait: it
        gives them up and, while overflowed, :meth:`holds` every key (a chain reads
        nothing from the layer, which may keep older values of any key) and
        :meth:`flush` returns False. It calls the handler on its repair backoff
        schedule, one call at a time, from a worker thread and without its lock; the
        first call that returns True ends the overflow. Without a handler the writer
        stays overflowed, its layer unread, until one is set or it is closed. Raises
        :class:`~cachechain.ConfigError` for a value that is neither callable nor None.
        """
        return self._overflow_handler

    @overflow_handler.setter
    def overflow_handler(self, handler: Callable[[], bool] | None) -> None:
        if handler is not None:
            check_callable(handler, "overflow_handler")
        executor = None
        with self._lock:
            self._overflow_handler = handler
            if self._repairs.overflowed and not self._closed:
                executor = self._wake_worker()  # its rounds may start
            self._idle.notify_all()  # a flush waiting for a round of no handler
        if executor is not None:
            self._submit(executor)

    @property
    def overflowed(self) -> bool:
        """Whether the writer overflowed and its layer awaits its
        :attr:`overflow_handler` (it is not read meanwhile)."""
        return self._repairs.overflowed

    def set(
        self, key: str, value: Any, ttl: float | None = None, *, max_wait: float | None = None
    ) -> bool:
        """Queue ``layer.set(key, value, ttl)``; return True if queued or coalesced.

        ``ttl`` is passed to the layer as is (seconds, ``None`` for its default). If
        ``key`` is already queued, its operation is replaced (last write wins). When the
        queue holds ``queue_size`` distinct keys, a set of a new key waits at most
        ``max_wait`` seconds (``None``: the writer's default; 0: no wait) for room; if
        none frees up it is dropped, counted under reason ``queue_full``, and False is
        returned. It never blocks longer. A set waiting for room when the writer is
        closed is dropped (reason ``closed``).

        Raises :class:`~cachechain.ChainClosedError` after :meth:`close`, and
        :class:`~cachechain.ConfigError` for an invalid ``max_wait``.
        """
        if max_wait is not None and not (max_wait.__class__ is float and 0.0 <= max_wait < _INF):
            # (a finite float >= 0, as the chain's backfills pass, needs no conversion)
            max_wait = check_seconds(max_wait, "max_wait", zero_ok=True)
        op: Op = (SET, value, ttl)
        executor = None
        with self._lock:
            if self._closed:
                raise self._closed_error()
            outcome = self._queue.offer(key, op)
            if outcome == FULL:
                outcome = self._offer_when_room(key, op, max_wait)
                if outcome == FULL:  # dropped
                    events = self._tally.take()
            if outcome == QUEUED:
                if self._repairs.waiting:
                    self._repairs.discard(key)  # this set replaces the key's repair
                executor = self._wake_worker()
            elif outcome == COALESCED:
                self._tally.coalesced += 1
                return True
        if executor is not None:
            return self._submit(executor)
        if outcome == FULL:
            self._tally.deliver(events, self._name)
            return False
        return True

    def delete(self, key: str) -> None:
        """Queue ``layer.delete(key)``. Never dropped for lack of room.

        A queued set of ``key`` is replaced by the delete; otherwise the delete is queued
        even when the queue is full, so deletes may take the queue past ``queue_size``.
        Raises :class:`~cachechain.ChainClosedError` after :meth:`close`.
        """
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._queue.offer(key, DELETE_OP) == COALESCED:
                self._tally.coalesced += 1
                return
            if self._repairs.waiting:
                self._repairs.discard(key)  # tried now rather than at the next round
            executor = self._wake_worker()
        if executor is not None:
            self._submit(executor)

    def repair(self, key: str) -> bool:
        """The layer missed a write of ``key`` (it failed or refused it) and may keep an
        older value: delete the key there at the next retry round, and hold it until
        then (see the module docstring). Unlike :meth:`delete` it waits for the round,
        so a layer that is down is not asked again at once for every key.

        A queued operation of ``key`` is left to do the job (if it fails, it leaves a
        repair in turn). Past ``max_repairs`` waiting repairs, or while the writer is
        overflowed, the key is covered by the layer's handling as a whole instead (see
        :attr:`overflow_handler`). Returns False, counting it as dropped (reason
        ``closed``), when the writer is closed; True otherwise.
        """
        executor = None
        with self._lock:
            closed = self._closed
            if closed:
                self._tally.drop("closed")
            elif not self._queue.queued(key) and key not in self._repairs:
                self._queue.hold(key)
                if self._schedule_repair(key):
                    executor = self._wake_worker()  # someone must run the round
            events = self._tally.take()
        self._tally.deliver(events, self._name)
        if executor is not None:
            self._submit(executor)
        return not closed

    def cancel(self, key: str) -> bool:
        """Remove a queued set of ``key`` that no worker has taken yet.

        Returns True if one was removed; False if ``key`` has no queued operation, or
        its queued operation is a delete (never cancelled). A write already in flight is
        not affected. For a caller that writes the key synchronously next: a set that
        had replaced a repair delete of the key (see :meth:`repair`) takes that repair
        with it. Not counted as dropped.
        """
        with self._lock:
            return self._unqueue_set(key)

    def holding(self, keys: Iterable[str]) -> frozenset[str]:
        """Return those of ``keys`` that have an operation queued, being written, or a
        repair delete waiting to be retried.

        Such a key's value in the layer may be older than the chain's: a chain reading
        it must neither serve it nor copy it into the layers above. Lock-free (it runs
        on every L1 miss): a key joins the held set before it enters the queue, and
        leaves it only once it is neither queued, in flight nor awaiting a retry. While
        the writer is :attr:`overflowed`, every key is held.
        """
        held = self._held
        repairs = self._repairs
        if not held and not repairs.overflowed:
            return _NOTHING
        wanted = tuple(keys)
        found = frozenset(key for key in wanted if key in held)
        # Read after the held set: an overflow is flagged before it lets keys go.
        return frozenset(wanted) if repairs.overflowed else found

    def holds(self, key: str) -> bool:
        """Whether ``key`` is held (see :meth:`holding`): one lock-free set lookup (and
        one attribute read when it is not held)."""
        return key in self._held or self._repairs.overflowed

    def settle(self, key: str, timeout: float) -> bool:
        """Make way for a synchronous write of ``key``: cancel its queued set and wait
        until no worker is writing it (at most ``timeout`` seconds).

        Returns True when nothing of ``key`` is queued or in flight any more, so a write
        made now cannot be overtaken by an older one from this writer; False if a write
        of it is still in flight at the deadline, or a delete of it is queued or awaits
        a retry (then the caller should queue its own operation instead, which replaces
        that delete or follows it).
        """
        queue = self._queue
        with self._lock:
            self._unqueue_set(key)
            if key in self._repairs:
                return False
            if not queue.in_flight(key):
                return not queue.queued(key)
            deadline = self._clock() + timeout
            self._settlers += 1
            try:
                while queue.in_flight(key):
                    remaining = deadline - self._clock()
                    if remaining <= 0 or not self._settled.wait(remaining):
                        break
            finally:
                self._settlers -= 1
            return key not in self._held

    def flush(self, timeout: float | None = None) -> bool:
        """Make every queued write now, then every repair delete (those waiting for a
        retry and those the writes just left), once each, and wait for them; while the
        writer is :attr:`overflowed`, call its overflow handler now too, once.

        Returns True if at the end, within ``timeout`` seconds (``None``: as long as it
        takes), nothing is queued, in flight or awaiting a retry and the writer is not
        overflowed: the layer has taken every write handed to this writer (a write it
        failed was then repaired). False otherwise, for instance while the layer is
        down, or while overflowed with no handler. Writes that were dropped count as
        done. Raises :class:`~cachechain.ConfigError` for an invalid ``timeout``.
        """
        if timeout is not None:
            timeout = check_seconds(timeout, "timeout", zero_ok=True)
        deadline = None if timeout is None else self._clock() + timeout
        for attempt in range(2):  # the queue with the waiting repairs, then the new repairs
            with self._lock:
                repairs = self._repairs
                if not repairs.waiting and self._queue.idle() and not repairs.overflowed:
                    break
                executor = None
                if not self._abandon:
                    self._requeue_repairs(overflow=not attempt)  # the handler once
                    if len(self._queue) or self._overflow_busy():
                        executor = self._wake_worker()
            if executor is not None:
                self._submit(executor)
            with self._lock:
                if not self._wait_until_idle(deadline):
                    break
        return not self._held and not self._repairs.overflowed

    def close(self, timeout: float = 5.0) -> int:
        """Stop intake, drain within ``timeout`` seconds, and return how many were dropped.

        After the call starts, :meth:`set` and :meth:`delete` raise
        :class:`~cachechain.ChainClosedError`. Queued writes keep being made until
        the one deadline ``timeout`` seconds from now; those still queued then are
        counted as dropped (reason ``closed``) and their number is returned; repair
        deletes get one more try, and those that still fail are counted the same way
        and logged (the layer may keep an older value of those keys until it expires).
        Writes in flight at the deadline are left to finish and are counted as written
        or failed.
        Shuts down the executor if the writer created it, without waiting for its
        threads. Idempotent: a later call returns 0. Raises
        :class:`~cachechain.ConfigError` for an invalid ``timeout``.
        """
        timeout = check_seconds(timeout, "timeout", zero_ok=True)
        deadline = self._begin_stop(timeout)
        dropped = self._finish_stop(deadline)
        with self._lock:
            executor = self._executor if self._given_executor is None else None
            events = self._tally.take()
        self._tally.deliver(events, self._name)
        if executor is not None:
            # Drain tasks still queued in the pool see the writer closed and end at once.
            executor.shutdown(wait=False)
        return dropped

    def stats(self) -> WriterStats:
        """Return the queue depth, bound, in-flight count and the counters."""
        with self._lock:
            tally = self._tally
            dropped = dict(tally.dropped)
            return WriterStats(
                depth=len(self._queue),
                capacity=self._queue_size,
                inflight=self._queue.inflight_count(),
                written=tally.written,
                failed=tally.failed,
                coalesced=tally.coalesced,
                dropped=sum(dropped.values()),
                dropped_by_reason=dropped,
                repairing=len(self._repairs),
                overflowed=self._repairs.overflowed,
                overflows=self._repairs.overflows,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AsyncWriter layer={self._name!r} {state} depth={len(self._queue)}>"


# ---------------------------------------------------------------------- exit hook

#: Every writer not yet garbage collected, for the exit hook.
_LIVE: weakref.WeakSet[AsyncWriter] = weakref.WeakSet()


def _exit_drain(writers: Iterable[AsyncWriter]) -> None:
    """Stop intake of ``writers``, drain them concurrently, each for its exit_timeout.

    Each writer drains with the workers it can get: Python 3.12.0-3.12.2 start no new
    thread once the interpreter exits (threading's exit hooks included), so there only
    the workers already running drain, and the extra ones refused are no news. Never
    raises, and logs only at DEBUG, so exit prints nothing.
    """
    started: list[tuple[AsyncWriter, float]] = []
    for writer in writers:
        try:
            if not writer._abandon:
                deadline = writer._begin_stop(writer.exit_timeout, warn=False)
                started.append((writer, deadline))
        except Exception:
            log.debug("cachechain writer %r: could not stop at exit", writer, exc_info=True)
    for writer, deadline in started:
        try:
            dropped = writer._finish_stop(deadline, warn=False)
            if dropped:
                log.debug("cachechain writer %r: %d writes dropped at exit", writer, dropped)
        except Exception:
            log.debug("cachechain writer %r: could not drain at exit", writer, exc_info=True)


def _at_exit() -> None:
    """Drain every live writer before concurrent.futures joins its worker threads."""
    _exit_drain(list(_LIVE))


def _install_exit_hook() -> None:
    # threading's exit hooks run in reverse order of registration, when the main thread
    # ends and before atexit handlers (3.10-3.13; 3.13 wraps each hook in a lambda, 3.12
    # and earlier in a functools.partial). concurrent.futures.thread registered its own
    # (which refuses new tasks, then joins every pool thread) when it was imported above,
    # so ours runs first, while the pools still accept and run drain tasks. The
    # subprocess tests in tests/test_writer.py check this end to end.
    register: Callable[[Callable[[], None]], None] | None
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("threading._register_atexit is not available")
        register(_at_exit)
    except RuntimeError:  # pragma: no cover - other interpreters, or import at shutdown
        atexit.register(_at_exit)


_install_exit_hook()
