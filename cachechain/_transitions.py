"""A circuit breaker's listeners, and the state changes waiting to be delivered to them.

:class:`Transitions` delivers each state change of a
:class:`~cachechain._breaker.CircuitBreaker` to its listeners in order, outside the
breaker's lock. The breaker queues a change (:meth:`Transitions.push`) under its lock,
then calls :meth:`Transitions.deliver` once it released it. One thread delivers at a
time; a thread that finds delivery under way leaves its changes to that thread, which
includes a listener calling back into the breaker: the change it causes is delivered
after it returns, with no deadlock. A listener that raises is logged (with its
traceback the first time, then at DEBUG) and the others still run.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING

from . import _fork
from ._validate import check_callable

if TYPE_CHECKING:
    from ._breaker import CircuitState, StateListener

__all__ = ["Transitions"]

logger = logging.getLogger("cachechain.breaker")


class Transitions:
    """The listeners of the breaker named ``name`` and its undelivered state changes.
    Thread-safe: it has its own lock, never held while a listener runs."""

    __slots__ = ("__weakref__", "_delivering", "_failed", "_lock", "_name", "_queue", "listeners")

    def __init__(self, name: str, listeners: tuple[StateListener, ...]) -> None:
        self._name = name
        #: Called as ``fn(name, old, new)``; replaced whole, so a reader needs no lock.
        self.listeners = listeners
        self._lock = threading.Lock()
        self._queue: deque[tuple[CircuitState, CircuitState]] = deque()
        self._delivering = False
        self._failed: list[StateListener] = []
        _fork.track(self)

    def push(self, old: CircuitState, new: CircuitState) -> None:
        """Queue the change from ``old`` to ``new`` (call :meth:`deliver` after)."""
        self._queue.append((old, new))

    def deliver(self) -> None:
        """Deliver the queued changes to the listeners, in order, unless another thread
        is delivering already (it delivers them). Exceptions a listener raises are
        logged; a ``BaseException`` that is not an ``Exception`` propagates."""
        if not self._queue:
            return
        while True:
            with self._lock:
                if self._delivering or not self._queue:
                    return
                self._delivering = True
                old, new = self._queue.popleft()
                listeners = self.listeners
            try:
                logger.debug("circuit breaker %r: %s -> %s", self._name, old.name, new.name)
                for fn in listeners:
                    try:
                        fn(self._name, old, new)
                    except Exception:
                        self._failed_listener(fn)
            finally:
                with self._lock:
                    self._delivering = False

    def add(self, fn: StateListener) -> None:
        """Call ``fn`` on every later change. Raises
        :class:`~cachechain.ConfigError` if ``fn`` is not callable."""
        check_callable(fn, "listener")
        with self._lock:
            self.listeners = (*self.listeners, fn)

    def remove(self, fn: StateListener) -> None:
        """Stop calling ``fn`` (its first registration, compared with ``==``); nothing
        happens if it is not registered."""
        with self._lock:
            listeners = list(self.listeners)
            if fn in listeners:
                listeners.remove(fn)
                self.listeners = tuple(listeners)

    def _failed_listener(self, fn: StateListener) -> None:
        """Log a listener's exception: with its traceback the first time, then quietly."""
        if any(f is fn for f in self._failed):
            logger.debug("circuit breaker %r: listener %r raised again", self._name, fn)
            return
        self._failed.append(fn)
        logger.exception(
            "circuit breaker %r: state listener %r raised (ignored; logged once)", self._name, fn
        )

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock; no thread is delivering there."""
        self._lock = threading.Lock()
        self._delivering = False
