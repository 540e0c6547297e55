"""Background loads: loader calls that run apart from their callers, bounded per chain.

A load runs on a thread of its own when its caller may stop waiting for it (a soft or
hard timeout) or nobody waits for it at all (an eager refresh). :class:`BackgroundLoads`
starts one daemon thread per such load, at most ``limit`` at once (a load that finds
no room is not started: the caller decides what that means), counts them, and lets
``Chain.close()`` wait for them within its deadline; those still running then are
abandoned (their threads end when their loaders return; nothing they load is stored).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from . import _fork

__all__ = ["BackgroundLoads"]


class BackgroundLoads:
    """At most ``limit`` functions running at once, each on its own daemon thread named
    after the chain (``name``). Thread-safe and fork-safe (a child starts with none)."""

    def __init__(self, name: str, limit: int) -> None:
        self._name = f"cachechain-load-{name}"
        self._limit = limit
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = 0
        self._closed = False
        _fork.track(self)

    def _after_fork(self) -> None:
        """In a forked child: no load runs (their threads are gone), a fresh lock."""
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = 0

    @property
    def running(self) -> int:
        """How many functions are running now."""
        return self._running

    @property
    def limit(self) -> int:
        """The most that may run at once."""
        return self._limit

    def start(self, fn: Callable[[], object]) -> bool:
        """Run ``fn()`` on a new daemon thread; return False, without running it, when
        ``limit`` are running already, after :meth:`close`, or when the thread cannot
        be started. ``fn`` handles its own errors (what it raises goes to
        :func:`threading.excepthook`)."""
        with self._lock:
            if self._closed or self._running >= self._limit:
                return False
            self._running += 1
        thread = threading.Thread(target=self._run, args=(fn,), name=self._name, daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread": no room after all
            self._ended()
            return False
        return True

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        finally:
            self._ended()

    def _ended(self) -> None:
        with self._lock:
            self._running -= 1
            if not self._running:
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until nothing runs, ``timeout`` seconds at most (``None``: no limit);
        return whether nothing runs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def close(self, timeout: float) -> int:
        """Start nothing more, wait ``timeout`` seconds at most for what runs, and
        return how many are still running (abandoned: the caller must not store what
        they load)."""
        with self._lock:
            self._closed = True
        self.wait_idle(timeout)
        return self._running
