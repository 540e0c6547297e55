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
  breaker (:class:`~cachechain.errors.CircuitOpenError`) is counted as dropped;
- a layer that missed a write may keep an older value of the key, so a write that fails
  or is refused (a value refused as invalid included: the layer's own delete of the old
  value is best effort) leaves a *repair*: a delete of the key, retried with a backoff
  from ``retry_delay`` to ``max_retry_delay`` seconds until it lands. Each retry round
  sends one repair, and one that lands starts the next at once, so a layer still down
  gets one call per round however many keys wait. Until then the key is held
  (:meth:`AsyncWriter.holds`), so a chain neither serves nor copies up the layer's value
  of it. A newer set or delete of the key replaces its repair;
- :meth:`AsyncWriter.close` stops intake and drains within one deadline; at interpreter
  exit without ``close`` every live writer is drained for at most
  :attr:`AsyncWriter.exit_timeout` seconds, before ``concurrent.futures`` joins its
  threads, and the rest is counted as dropped;
- after ``os.fork()`` the child's writers get fresh locks, an empty queue (the parent
  writes its own pending operations), zeroed counters and no executor (one is created
  when first needed).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from ._errors import ChainClosedError, CircuitOpenError, ConfigError
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

_SET: Final = "set"
_DELETE: Final = "delete"
#: A queued operation: ``(kind, value, ttl)``. Every delete is this one tuple.
_Op = tuple[str, Any, "float | None"]
_DELETE_OP: Final[_Op] = (_DELETE, None, None)
_NOTHING: Final[frozenset[str]] = frozenset()

# Outcomes of one write, as seen by the drain loop.
_WRITTEN: Final = 0
_FAILED: Final = 1
_REFUSED: Final = 2


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
      docstring): the layer may hold an older value of each.

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


def _check_seconds(value: object, field: str, *, allow_zero: bool = True) -> float:
    """Return ``value`` as float seconds, or raise ConfigError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field} must be a finite number of seconds {bound}, got {value!r}")
    return seconds


def _check_count(value: object, field: str) -> int:
    """Return ``value`` if it is an int >= 1, else raise ConfigError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field} must be an int >= 1, got {value!r}")
    return value


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


class AsyncWriter:
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
    deletes (see the module docstring). ``clock`` returns monotonic seconds; it times
    deadlines, backoffs and write durations and exists for tests.

    All methods are thread-safe. Raises :class:`~cachechain.errors.ConfigError` naming
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
        self._queue_size = _check_count(queue_size, "queue_size")
        self._max_wait = _check_seconds(max_wait, "max_wait")
        self._workers = _check_count(workers, "workers")
        self._idle_timeout = _check_seconds(idle_timeout, "idle_timeout", allow_zero=False)
        self._min_retry = _check_seconds(retry_delay, "retry_delay", allow_zero=False)
        self._max_retry = _check_seconds(max_retry_delay, "max_retry_delay", allow_zero=False)
        if self._max_retry < self._min_retry:
            raise ConfigError(
                f"max_retry_delay must be >= retry_delay ({self._min_retry}), "
                f"got {max_retry_delay!r}"
            )
        if executor is not None and not isinstance(executor, ThreadPoolExecutor):
            raise ConfigError(f"executor must be a ThreadPoolExecutor or None, got {executor!r}")
        if not callable(clock):
            raise ConfigError(f"clock must be a callable returning seconds, got {clock!r}")
        self._layer = layer
        self._name = name
        self._clock = clock
        self._given_executor: Executor | None = executor
        #: Told about drops and write results, outside the lock (see WriterObserver).
        self.observer: WriterObserver | None = None
        #: Intake stopped: set/delete raise ChainClosedError.
        self._closed = False
        #: Draining is over: workers take nothing more.
        self._abandon = False
        self._init_state()
        with _LIVE_LOCK:
            _LIVE.add(self)

    @classmethod
    def from_config(cls, layer: CacheLayer, config: WriterConfig) -> AsyncWriter:
        """The async writer of ``layer`` with the settings of ``config`` (a
        :class:`~cachechain.WriterConfig`). Raises :class:`~cachechain.ConfigError`
        for a layer that is not a :class:`~cachechain.layers.CacheLayer`."""
        return cls(
            layer,
            queue_size=config.queue_size,
            max_wait=config.max_wait,
            workers=config.workers,
            retry_delay=config.retry_delay,
            max_retry_delay=config.max_retry_delay,
        )

    def _init_state(self) -> None:
        """Create the locks, the queue and the counters (at creation and after a fork)."""
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
        self._pending: OrderedDict[str, _Op] = OrderedDict()
        self._inflight: set[str] = set()
        #: Keys whose repair delete waits for the next retry round (see the docstring).
        self._retry: dict[str, None] = {}
        self._retry_at = 0.0  # clock seconds: when the next round may start
        self._retry_delay = self._min_retry  # the wait after the next failure
        self._probe: str | None = None  # the repair a round is trying now
        self._keeper = False  # an idle worker stays for the retry rounds
        #: Every key in _pending, _inflight or _retry: added before a key enters one of
        #: them, removed after it has left all three (lock held), so holds() is one
        #: lock-free lookup that never misses a key moving between them.
        self._held: set[str] = set()
        self._running = 0
        self._idle_workers = 0
        self._room_waiters = 0
        self._executor: Executor | None = self._given_executor
        self._written = 0
        self._failed = 0
        self._coalesced = 0
        self._write_seconds = 0.0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._logged_types: set[type[BaseException]] = set()
        #: Events for the observer, delivered once the lock is released.
        self._events: list[tuple[str, Any, Any]] = []

    # ------------------------------------------------------------------ public API

    @property
    def layer(self) -> CacheLayer:
        """The layer this writer writes to."""
        return self._layer

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or the interpreter began to exit)."""
        return self._closed

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

        Raises :class:`~cachechain.errors.ChainClosedError` after :meth:`close`, and
        :class:`~cachechain.errors.ConfigError` for an invalid ``max_wait``.
        """
        if max_wait is not None:
            max_wait = _check_seconds(max_wait, "max_wait")
        op: _Op = (_SET, value, ttl)
        with self._lock:
            if self._closed:
                raise self._closed_error()
            pending = self._pending
            if key in pending:
                pending[key] = op
                self._count_coalesced()
                return True
            self._held.add(key)  # before it is queued (see _held); undone if dropped
            if len(pending) >= self._queue_size:
                wait = self._max_wait if max_wait is None else max_wait
                reason = self._wait_for_room(key, wait)
                if reason is not None:
                    self._count_drop(reason)
                    self._release(key)
                    events = self._take_events()
                elif key in pending:
                    pending[key] = op
                    self._count_coalesced()
                    self._pass_room_on()
                    return True
                else:
                    # An older write of the key may have ended (and released it) while
                    # this one waited: hold it again before it is queued.
                    self._held.add(key)
                    pending[key] = op
                    self._pass_room_on()
            else:
                reason = None
                pending[key] = op
            if reason is None:
                self._retry.pop(key, None)  # this set replaces the key's repair
            executor = None if reason is not None else self._wake_worker()
        if reason is not None:
            self._deliver(events)
            return False
        if executor is not None:
            return self._submit(executor)
        return True

    def delete(self, key: str) -> None:
        """Queue ``layer.delete(key)``. Never dropped for lack of room.

        A queued set of ``key`` is replaced by the delete; otherwise the delete is queued
        even when the queue is full, so deletes may take the queue past ``queue_size``.
        Raises :class:`~cachechain.errors.ChainClosedError` after :meth:`close`.
        """
        with self._lock:
            if self._closed:
                raise self._closed_error()
            pending = self._pending
            if key in pending:
                pending[key] = _DELETE_OP
                self._count_coalesced()
                return
            self._held.add(key)
            pending[key] = _DELETE_OP
            self._retry.pop(key, None)  # tried now rather than at the next round
            executor = self._wake_worker()
        if executor is not None:
            self._submit(executor)

    def repair(self, key: str) -> bool:
        """The layer missed a write of ``key`` (it failed or refused it) and may keep an
        older value: delete the key there at the next retry round, and hold it until
        then (see the module docstring). Unlike :meth:`delete` it waits for the round,
        so a layer that is down is not asked again at once for every key.

        A queued operation of ``key`` is left to do the job (if it fails, it leaves a
        repair in turn). Returns False, counting it as dropped (reason ``closed``), when
        the writer is closed; True otherwise.
        """
        executor = None
        with self._lock:
            closed = self._closed
            if closed:
                self._count_drop("closed")
            elif key not in self._pending and key not in self._retry:
                self._held.add(key)
                self._schedule_repair(key)
                executor = self._wake_worker()  # someone must run the round
            events = self._take_events()
        self._deliver(events)
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
        leaves it only once it is neither queued, in flight nor awaiting a retry.
        """
        held = self._held
        if not held:
            return _NOTHING
        return frozenset(key for key in keys if key in held)

    def holds(self, key: str) -> bool:
        """Whether ``key`` is held (see :meth:`holding`): one lock-free set lookup."""
        return key in self._held

    def settle(self, key: str, timeout: float) -> bool:
        """Make way for a synchronous write of ``key``: cancel its queued set and wait
        until no worker is writing it (at most ``timeout`` seconds).

        Returns True when nothing of ``key`` is queued or in flight any more, so a write
        made now cannot be overtaken by an older one from this writer; False if a write
        of it is still in flight at the deadline, or a delete of it is queued or awaits
        a retry (then the caller should queue its own operation instead, which replaces
        that delete or follows it).
        """
        with self._lock:
            self._unqueue_set(key)
            if key in self._retry:
                return False
            if key not in self._inflight:
                return key not in self._pending
            deadline = self._clock() + timeout
            self._settlers += 1
            try:
                while key in self._inflight:
                    remaining = deadline - self._clock()
                    if remaining <= 0 or not self._settled.wait(remaining):
                        break
            finally:
                self._settlers -= 1
            return key not in self._held

    def flush(self, timeout: float | None = None) -> bool:
        """Make every queued write now, then every repair delete (those waiting for a
        retry and those the writes just left), once each, and wait for them.

        Returns True if at the end, within ``timeout`` seconds (``None``: as long as it
        takes), nothing is queued, in flight or awaiting a retry: the layer has taken
        every write handed to this writer (a write it failed was then repaired). False
        otherwise, for instance while the layer is down. Writes that were dropped count
        as done. Raises :class:`~cachechain.errors.ConfigError` for an invalid
        ``timeout``.
        """
        if timeout is not None:
            timeout = _check_seconds(timeout, "timeout")
        deadline = None if timeout is None else self._clock() + timeout
        for _ in range(2):  # the queue with the waiting repairs, then the new repairs
            with self._lock:
                if not self._retry and not self._pending and not self._inflight:
                    break
                executor = None
                if not self._abandon:
                    self._requeue_repairs()
                    if self._pending:
                        executor = self._wake_worker()
            if executor is not None:
                self._submit(executor)
            with self._lock:
                while self._pending or self._inflight:
                    if deadline is None:
                        self._idle.wait()
                        continue
                    remaining = deadline - self._clock()
                    if remaining <= 0 or not self._idle.wait(remaining):
                        return not self._held
        return not self._held

    def close(self, timeout: float = 5.0) -> int:
        """Stop intake, drain within ``timeout`` seconds, and return how many were dropped.

        After the call starts, :meth:`set` and :meth:`delete` raise
        :class:`~cachechain.errors.ChainClosedError`. Queued writes keep being made until
        the one deadline ``timeout`` seconds from now; those still queued then are
        counted as dropped (reason ``closed``) and their number is returned; repair
        deletes get one more try, and those that still fail are counted the same way
        and logged (the layer may keep an older value of those keys until it expires).
        Writes in flight at the deadline are left to finish and are counted as written
        or failed.
        Shuts down the executor if the writer created it, without waiting for its
        threads. Idempotent: a later call returns 0. Raises
        :class:`~cachechain.errors.ConfigError` for an invalid ``timeout``.
        """
        timeout = _check_seconds(timeout, "timeout")
        deadline = self._begin_stop(timeout)
        dropped = self._finish_stop(deadline)
        with self._lock:
            executor = self._executor if self._given_executor is None else None
            events = self._take_events()
        self._deliver(events)
        if executor is not None:
            # Drain tasks still queued in the pool see the writer closed and end at once.
            executor.shutdown(wait=False)
        return dropped

    def stats(self) -> WriterStats:
        """Return the queue depth, bound, in-flight count and the counters."""
        with self._lock:
            dropped = dict(self._dropped)
            return WriterStats(
                depth=len(self._pending),
                capacity=self._queue_size,
                inflight=len(self._inflight),
                written=self._written,
                failed=self._failed,
                coalesced=self._coalesced,
                dropped=sum(dropped.values()),
                dropped_by_reason=dropped,
                repairing=len(self._retry),
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AsyncWriter layer={self._name!r} {state} depth={len(self._pending)}>"

    # ------------------------------------------------------------------ counting
    # Every counter changes in exactly one of these methods, always with self._lock held;
    # metrics hooks go here (keep them cheap and non-blocking: the lock is held).

    def _count_drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` operations dropped for ``reason`` (one of DROP_REASONS)."""
        self._dropped[reason] += count
        if self.observer is not None:
            self._events.append(("dropped", reason, count))

    def _count_result(self, success: bool, duration: float) -> None:
        """Count one write made (``success``) or failed, which took ``duration`` seconds."""
        if success:
            self._written += 1
        else:
            self._failed += 1
        self._write_seconds += duration
        if self.observer is not None:
            self._events.append(("written", success, duration))
            self._events.append(("depth", len(self._pending) + len(self._retry), None))

    def _take_events(self) -> list[tuple[str, Any, Any]]:
        """Take the events for the observer (lock held); deliver them once released."""
        events = self._events
        if events:
            self._events = []
        return events

    def _deliver(self, events: list[tuple[str, Any, Any]]) -> None:
        """Tell the observer about ``events`` (lock not held); its errors are logged."""
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
            log.exception("cachechain writer for layer %r: its observer raised", self._name)

    def _count_coalesced(self) -> None:
        """Count one operation that replaced a queued operation of the same key."""
        self._coalesced += 1

    # ------------------------------------------------------------------ internals

    def _closed_error(self) -> ChainClosedError:
        return ChainClosedError(f"the writer for layer {self._name!r} is closed")

    def _unqueue_set(self, key: str) -> bool:
        """Remove a queued set of ``key`` that no worker has taken (lock held); return
        whether there was one. Wakes a set waiting for room, and flush when idle."""
        op = self._pending.get(key)
        if op is None or op[0] is not _SET:
            return False
        del self._pending[key]
        self._release(key)
        if self._room_waiters:
            self._room.notify()
        if not self._pending and not self._inflight:
            self._idle.notify_all()
        return True

    def _release(self, key: str) -> None:
        """Stop holding ``key`` if it is no longer queued, in flight or awaiting a
        retry (lock held)."""
        if key not in self._pending and key not in self._inflight and key not in self._retry:
            self._held.discard(key)

    def _requeue_repairs(self, *, probe: bool = False) -> None:
        """Queue the repair deletes awaiting a retry, to be tried now (lock held): all of
        them, or with ``probe`` the oldest alone (a retry round sends one; each that
        lands brings the next forward, so a layer still down gets one call per round,
        not one per key). A key queued meanwhile keeps its newer operation. Deletes take
        no queue room."""
        retry = self._retry
        if not retry:
            return
        pending = self._pending
        if probe:
            key = next(iter(retry))
            del retry[key]
            if key not in pending:  # (they are disjoint; a newer operation would win)
                pending[key] = _DELETE_OP
            self._probe = key  # one round at a time: its outcome schedules the next
            return
        for key in retry:
            if key not in pending:
                pending[key] = _DELETE_OP
        retry.clear()

    def _schedule_repair(self, key: str) -> None:
        """After a failed or refused write of ``key``: keep a delete of it for the next
        retry round, unless a newer operation of it is queued (lock held)."""
        if key in self._pending:
            return  # the newer operation replaces the key's value (or deletes it)
        if self._abandon:  # closed and drained: nobody will retry it
            self._count_drop("closed")
            return
        self._retry[key] = None
        if self._probe is None and self._retry_at <= self._clock():
            self._end_round(False)  # no round scheduled: back off from the last delay

    def _end_round(self, landed: bool) -> None:
        """Schedule the next retry round (lock held): at once after a repair landed (the
        layer answers), else after the current delay, which then doubles (capped)."""
        if landed:
            self._retry_delay = self._min_retry
            self._retry_at = 0.0
        else:
            self._retry_at = self._clock() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self._max_retry)

    def _wait_for_room(self, key: str, wait: float) -> str | None:
        """Wait (lock held) up to ``wait`` seconds until ``key`` can be queued.

        Returns None when there is room (or ``key`` got queued meanwhile, to coalesce
        with), else the drop reason.
        """
        if wait <= 0:
            return "queue_full"
        deadline = self._clock() + wait
        pending = self._pending
        self._room_waiters += 1
        try:
            while True:
                remaining = deadline - self._clock()
                timed_out = remaining <= 0 or not self._room.wait(remaining)
                if self._closed:
                    return "closed"
                if key in pending or len(pending) < self._queue_size:
                    return None
                if timed_out:
                    return "queue_full"
        finally:
            self._room_waiters -= 1

    def _pass_room_on(self) -> None:
        """After a waiting set went in, wake another waiter if room is left (lock held)."""
        if self._room_waiters and len(self._pending) < self._queue_size:
            self._room.notify()

    def _wake_worker(self) -> Executor | None:
        """Make sure a worker will see new work (lock held).

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
        """Reserve ``count`` drain tasks (lock held) and return the executor, or None."""
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

    def _submit(self, executor: Executor) -> bool:
        """Submit one reserved drain task; return False if queued operations were lost.

        An executor that was shut down (or the interpreter's shutdown) refuses tasks. If
        no worker is left to drain the queue, its operations are dropped (reason
        ``closed``) rather than left to wait forever, and False is returned.
        """
        try:
            executor.submit(self._drain)
        except RuntimeError as exc:
            with self._lock:
                self._running -= 1
                lost = 0
                if self._running == 0 and self._pending:
                    dropped = list(self._pending.items())
                    self._pending.clear()
                    lost = 0
                    for key, op in dropped:
                        if op[0] is _DELETE:  # keep it: the key stays held, unread there
                            self._retry[key] = None
                        else:
                            lost += 1
                            self._release(key)
                    self._count_drop("closed", lost)
                    self._room.notify_all()
                    if not self._inflight:
                        self._idle.notify_all()
                events = self._take_events()
            self._deliver(events)
            log.warning(
                "cachechain writer for layer %r: its executor refused a worker (%s); "
                "%d queued writes dropped",
                self._name,
                exc,
                lost,
            )
            return lost == 0
        return True

    def _next_key(self) -> str | None:
        """The oldest queued key that no worker is writing, or None (lock held)."""
        inflight = self._inflight
        if not inflight:
            return next(iter(self._pending), None)
        for key in self._pending:
            if key not in inflight:
                return key
        return None

    def _drain(self) -> None:
        """A drain task: write queued operations until idle for ``idle_timeout`` seconds."""
        lock = self._lock
        pending = self._pending
        inflight = self._inflight
        layer = self._layer
        clock = self._clock
        executor: Executor | None = None
        events: list[tuple[str, Any, Any]] = []
        try:
            with lock:
                try:
                    while not self._abandon:
                        # A retry round is due: its repair joins the queue, busy or not.
                        if self._retry and self._probe is None and self._retry_at <= clock():
                            self._requeue_repairs(probe=True)
                        key = self._next_key()
                        if key is None:
                            if self._closed:
                                return
                            wait = self._idle_timeout
                            keeper = bool(self._retry) and not self._keeper
                            if keeper:  # this worker stays for the rounds; others may end
                                self._keeper = True
                                if self._probe is None:
                                    wait = min(wait, max(self._retry_at - clock(), self._min_retry))
                            self._idle_workers += 1
                            try:
                                notified = self._work.wait(wait)
                            finally:
                                self._idle_workers -= 1
                                if keeper:
                                    self._keeper = False
                            idle = not notified and self._next_key() is None
                            if idle and not (keeper and self._retry):
                                return
                            continue
                        inflight.add(key)
                        op = pending.pop(key)
                        if self._room_waiters:
                            self._room.notify()
                        lock.release()
                        outcome = _FAILED
                        start = clock()
                        try:
                            if op[0] is _SET:
                                layer.set(key, op[1], op[2])
                            else:
                                layer.delete(key)
                            outcome = _WRITTEN
                        except CircuitOpenError:
                            outcome = _REFUSED
                        except Exception as exc:
                            self._log_failure(key, op, exc)
                        finally:
                            duration = clock() - start
                            lock.acquire()
                            probe = key == self._probe
                            if probe:  # the round is over: schedule the next one
                                self._probe = None
                                self._end_round(outcome == _WRITTEN)
                            if outcome == _WRITTEN:
                                self._count_result(True, duration)
                            else:
                                if outcome == _FAILED:
                                    self._count_result(False, duration)
                                elif op[0] is _SET:  # a refused delete is not dropped
                                    self._count_drop("circuit_open")
                                self._schedule_repair(key)
                            events = self._take_events()
                            if events:  # told before the write counts as done (flush, settle)
                                lock.release()
                                self._deliver(events)
                                lock.acquire()
                            inflight.discard(key)
                            self._release(key)
                            if self._settlers:
                                self._settled.notify_all()
                            if not pending and not inflight:
                                self._idle.notify_all()
                finally:
                    self._running -= 1
                    # A task ended by an exception must not leave work with no worker.
                    orphaned = (
                        bool(self._retry or self._pending)
                        and self._running == 0
                        and not self._closed
                        and not self._abandon
                    )
                    executor = self._start_workers(1) if orphaned else None
                    events = self._take_events()
        finally:
            self._deliver(events)
            if executor is not None:
                self._submit(executor)

    def _log_failure(self, key: str, op: _Op, exc: Exception) -> None:
        """Log a failed write: WARNING for the first of its type on this writer, then DEBUG."""
        kind = type(exc)
        if kind in self._logged_types:
            log.debug(
                "cachechain writer for layer %r: %s of key %r failed: %s: %s",
                self._name,
                op[0],
                key,
                kind.__qualname__,
                exc,
            )
            return
        self._logged_types.add(kind)
        log.warning(
            "cachechain writer for layer %r: a %s failed: %s: %s "
            "(further %s errors of this writer are logged at DEBUG)",
            self._name,
            op[0],
            kind.__qualname__,
            exc,
            kind.__qualname__,
        )

    def _begin_stop(self, timeout: float) -> float:
        """Stop intake, make sure workers drain, and return the deadline (clock seconds)."""
        with self._lock:
            deadline = self._clock() + timeout
            self._closed = True
            if not self._abandon:
                self._requeue_repairs()  # one last try
            self._work.notify_all()
            self._room.notify_all()
            wanted = 0 if self._abandon else min(self._workers - self._running, len(self._pending))
            executor = self._start_workers(wanted)
        for _ in range(wanted):
            if executor is not None and not self._submit(executor):
                break  # the queue was dropped: no point in more workers
        return deadline

    def _finish_stop(self, deadline: float, *, warn: bool = True) -> int:
        """Wait for the queue to drain until ``deadline``; drop and count what is left,
        logging deletes not made at WARNING (``warn``) or DEBUG (at interpreter exit)."""
        with self._lock:
            while (self._pending or self._inflight) and not self._abandon:
                remaining = deadline - self._clock()
                if remaining <= 0 or not self._idle.wait(remaining):
                    break
            self._abandon = True
            lost = len(self._pending)
            unmade = sum(1 for op in self._pending.values() if op[0] is _DELETE)
            if lost:
                self._pending.clear()
                self._count_drop("closed", lost)
            unrepaired = len(self._retry)
            if unrepaired:
                self._retry.clear()
                self._count_drop("closed", unrepaired)
                lost += unrepaired
            if unmade + unrepaired:
                log.log(
                    logging.WARNING if warn else logging.DEBUG,
                    "cachechain writer for layer %r: closed with %d deletes not made; the "
                    "layer may serve older values of those keys until they expire",
                    self._name,
                    unmade + unrepaired,
                )
            self._held.intersection_update(self._inflight)
            self._work.notify_all()
            self._room.notify_all()
            self._idle.notify_all()
            return lost

    def _reinit_after_fork(self) -> None:
        """In a forked child: fresh locks, an empty queue, zero counters, no executor.

        The parent writes its own queued operations. A given executor is not used in the
        child (its threads do not exist there); the writer creates its own when needed.
        """
        self._given_executor = None
        self._init_state()


# ---------------------------------------------------------------------- process hooks

#: Every writer not yet garbage collected, for the exit and fork hooks.
_LIVE: weakref.WeakSet[AsyncWriter] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _exit_drain(writers: Iterable[AsyncWriter]) -> None:
    """Stop intake of ``writers``, drain them concurrently, each for its exit_timeout.

    Never raises: a failure is logged at DEBUG, so exit prints no traceback.
    """
    started: list[tuple[AsyncWriter, float]] = []
    for writer in writers:
        try:
            if not writer._abandon:
                started.append((writer, writer._begin_stop(writer.exit_timeout)))
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


def _after_fork_in_child() -> None:
    """Give every writer in a forked child fresh locks, queue and executor."""
    global _LIVE_LOCK
    _LIVE_LOCK = threading.Lock()
    for writer in list(_LIVE):
        writer._reinit_after_fork()


def _install_hooks() -> None:
    # threading's exit hooks run in reverse order of registration, when the main thread
    # ends and before atexit handlers. concurrent.futures.thread registered its own
    # (which refuses new tasks, then joins every pool thread) when it was imported above,
    # so ours runs first, while the pools still accept and run drain tasks.
    register: Callable[[Callable[[], None]], None] | None
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("threading._register_atexit is not available")
        register(_at_exit)
    except RuntimeError:  # pragma: no cover - other interpreters, or import at shutdown
        atexit.register(_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)


_install_hooks()
