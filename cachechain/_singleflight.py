"""Single flight: run a function once per key however many threads ask at once.

Go's semantics (``golang.org/x/sync/singleflight``): while a call for a key is in
flight, every other caller for that key waits for it and gets the same result or the
same exception; nothing is remembered once the call ends, and the in-flight entry is
removed in ``finally`` whatever happens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Generic, TypeVar

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


class _Call(Generic[T]):
    __slots__ = ("done", "error", "owner", "result", "traceback", "waiters")

    def __init__(self) -> None:
        self.owner = threading.get_ident()  # the thread running the call
        # Created by the first waiter (under the group's lock): a load nobody joins
        # costs no Event.
        self.done: threading.Event | None = None
        self.result: T | None = None
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        self.waiters = 0


class SingleFlight(Generic[T]):
    """Coalesces concurrent calls by key. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, _Call[T]] = {}
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
                call = self._calls[key] = _Call()
                leader = True
            elif call.owner == threading.get_ident():
                raise ReentrantLoadError(
                    f"the loader of {key!r} asked for {key!r} itself: it would wait for "
                    "its own result for ever"
                )
            else:
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
            if call.error is not None:
                raise call.error.with_traceback(call.traceback)
            return call.result, True  # type: ignore[return-value]
        try:
            result = fn()
        except BaseException as exc:
            call.error = exc
            call.traceback = exc.__traceback__
            raise
        else:
            call.result = result
            return result, False
        finally:
            with self._lock:
                if self._calls.get(key) is call:
                    del self._calls[key]
                event = call.done
            if event is not None:
                event.set()

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
