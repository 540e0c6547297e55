"""Single flight: run a function once per key however many threads ask at once.

Go's semantics (``golang.org/x/sync/singleflight``): while a call for a key is in
flight, every other caller for that key waits for it and gets the same result or the
same exception; nothing is remembered once the call ends, and the in-flight entry is
removed in ``finally`` whatever happens.

:meth:`SingleFlight.do` runs the call on the caller's thread. A call that runs on
another thread (a load its callers may stop waiting for, an eager refresh) is made of
:meth:`~SingleFlight.join` or :meth:`~SingleFlight.lead` (register or join it),
:meth:`~SingleFlight.execute` (its body, on the thread that runs it) and
:meth:`~SingleFlight.outcome`; each caller waits on the call's ``done`` event as long
as it chooses. A call knows the keys being loaded by the thread that started it (its
*lineage*), so a loader that asks for a key it is itself loading, through any number
of such threads, is refused instead of waiting for itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

from . import _fork
from ._errors import CacheError

__all__ = ["LoadTimeoutError", "ReentrantLoadError", "SingleFlight"]

T = TypeVar("T")


class LoadTimeoutError(CacheError, TimeoutError):
    """A caller waited longer than its own ``wait_timeout`` (seconds) for a load that
    another thread is running. The load itself goes on."""

    trips_breaker = False


class ReentrantLoadError(CacheError, RuntimeError):
    """A loader asked for the key it is loading (``get_or_load`` of a key from inside
    that key's own loader, directly or through other calls): it would wait for itself
    for ever, so it is refused at once."""

    trips_breaker = False


#: A set of (single flight, key) pairs: the loads that the current thread runs inside.
_Lineage = frozenset[tuple[Any, str]]


class _Loading(threading.local):
    lineage: _Lineage = frozenset()


_loading = _Loading()


class _Call(Generic[T]):
    __slots__ = ("done", "error", "lineage", "owner", "result", "started", "traceback", "waiters")

    def __init__(self, started: float = 0.0) -> None:
        self.owner = threading.get_ident()  # the thread running the call
        # Created by the first waiter (under the group's lock): a load nobody joins
        # costs no Event.
        self.done: threading.Event | None = None
        self.result: T | None = None
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        self.waiters = 0
        #: When the call began (the group's clock, seconds).
        self.started = started
        #: The loads the thread that began it runs inside (see the module).
        self.lineage: _Lineage = _loading.lineage


class SingleFlight(Generic[T]):
    """Coalesces concurrent calls by key. Thread-safe. ``clock`` (monotonic seconds)
    stamps when each call began (:attr:`_Call.started`), for callers that wait a time
    measured from the start of the load."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, _Call[T]] = {}
        self._clock = clock
        _fork.track(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock and no calls (their threads are gone)."""
        self._lock = threading.Lock()
        self._calls = {}

    def do(
        self, key: str, fn: Callable[[], T], wait_timeout: float | None = None
    ) -> tuple[T, bool]:
        """Run ``fn`` for ``key`` unless a call is in flight; return ``(result, shared)``.

        ``shared`` is True for a caller that joined another thread's call. If ``fn``
        raises, every caller of that flight gets the exception (with the leader's
        traceback, not one that grows per waiter). A joining caller waits at most
        ``wait_timeout`` seconds (``None``: as long as the call takes), then raises
        :class:`LoadTimeoutError`. A call for ``key`` from inside ``fn`` itself (the
        same thread) raises :class:`ReentrantLoadError` at once instead of waiting
        for itself.
        """
        with self._lock:
            call = self._calls.get(key)
            if call is None:
                call = self._calls[key] = _Call(self._clock())
                leader = True
            else:
                self._check_reentry(key, call)
                call.waiters += 1
                leader = False
                if call.done is None:
                    call.done = threading.Event()
                done = call.done
        if not leader:
            if not done.wait(wait_timeout):
                raise LoadTimeoutError(
                    f"gave up after {wait_timeout} s waiting for the load of {key!r}"
                )
            return self.outcome(call), True
        return self.execute(key, call, fn), False

    def _check_reentry(self, key: str, call: _Call[T]) -> None:
        """Raise ReentrantLoadError when the calling thread runs inside the load of
        ``key`` (call it under the lock)."""
        if call.owner == threading.get_ident() or (self, key) in _loading.lineage:
            raise ReentrantLoadError(
                f"the loader of {key!r} asked for {key!r} itself: it would wait for "
                "its own result for ever"
            )

    def join(self, key: str) -> tuple[_Call[T], bool]:
        """Join the call in flight for ``key``, or register a new one; return it and
        whether it is new (then the caller must have it run: :meth:`execute` on some
        thread, or :meth:`fail`). Either way the call has its ``done`` event, to wait
        on, and :meth:`outcome` gives its result once it is set. Raises
        :class:`ReentrantLoadError` when the calling thread runs inside that load."""
        with self._lock:
            call = self._calls.get(key)
            if call is None:
                call = self._calls[key] = _Call(self._clock())
                call.done = threading.Event()
                return call, True
            self._check_reentry(key, call)
            call.waiters += 1
            if call.done is None:
                call.done = threading.Event()
            return call, False

    def lead(self, key: str) -> _Call[T] | None:
        """Register a new call for ``key`` and return it (the caller must have it run,
        as after :meth:`join`), or None when one is in flight already."""
        with self._lock:
            if key in self._calls:
                return None
            call = self._calls[key] = _Call(self._clock())
            return call

    def execute(self, key: str, call: _Call[T], fn: Callable[[], T]) -> T:
        """Run ``fn`` as the body of ``call`` (registered for ``key``) on the calling
        thread, which then runs inside that load (see the module); record its result
        or exception for the callers, end the call and wake them. Return what ``fn``
        returns; raise what it raises."""
        call.owner = threading.get_ident()
        outer = _loading.lineage
        _loading.lineage = call.lineage | {(self, key)}
        try:
            result = fn()
        except BaseException as exc:
            call.error = exc
            call.traceback = exc.__traceback__
            raise
        else:
            call.result = result
            return result
        finally:
            _loading.lineage = outer
            self._end(key, call)

    def fail(self, key: str, call: _Call[T], error: BaseException) -> None:
        """End ``call`` (registered for ``key``, never run) with ``error`` for its
        callers."""
        call.error = error
        self._end(key, call)

    def _end(self, key: str, call: _Call[T]) -> None:
        with self._lock:
            if self._calls.get(key) is call:
                del self._calls[key]
            event = call.done
        if event is not None:
            event.set()

    @staticmethod
    def outcome(call: _Call[T]) -> T:
        """The result of an ended ``call``; raises its exception instead (with the
        traceback it was raised with, not one that grows per caller)."""
        if call.error is not None:
            raise call.error.with_traceback(call.traceback)
        return call.result  # type: ignore[return-value]

    def forget(self, keys: Iterable[str]) -> None:
        """Detach the calls in flight for ``keys`` (Go's ``Forget``): later callers
        start a call of their own instead of joining one that began before (a ``set``
        or ``delete`` of the key made its result stale). Those already waiting still
        get its result. Lock-free when no call is in flight (every ``set`` calls it)."""
        if not self._calls:
            return
        with self._lock:
            calls = self._calls
            for key in keys:
                calls.pop(key, None)

    def forget_all(self) -> None:
        """:meth:`forget` every key (a ``clear``)."""
        with self._lock:
            self._calls = {}

    def in_flight(self) -> int:
        """Return how many keys have a call in flight right now."""
        with self._lock:
            return len(self._calls)
