"""Log a failure at WARNING the first time, at DEBUG after: one helper for the library.

A cache that fails on every request must not flood the log, and its operators must
still see the first failure of each kind. :class:`LogOnce` keeps the kinds it has
warned about; :meth:`LogOnce.forget` makes a kind warn again (a layer that recovered).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable

from . import _fork

__all__ = ["LogOnce"]


class LogOnce:
    """Warn once per key on ``logger``, then log at DEBUG. Thread-safe."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()
        _fork.track(self)

    def first(self, key: Hashable) -> bool:
        """Return True the first time ``key`` is seen (since it was last forgotten)."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True

    def __call__(self, key: Hashable, msg: str, *args: object, debug: str | None = None) -> bool:
        """Log ``msg % args`` at WARNING the first time ``key`` is seen, else ``debug``
        (default: the same message) at DEBUG. Return whether it warned."""
        if self.first(key):
            self._logger.warning(msg, *args)
            return True
        if self._logger.isEnabledFor(logging.DEBUG):
            self._logger.debug(debug if debug is not None else msg, *args)
        return False

    def forget(self, match: Callable[[Hashable], bool] | None = None) -> None:
        """Warn again for the keys ``match`` accepts (every key when None)."""
        with self._lock:
            self._seen = set() if match is None else {k for k in self._seen if not match(k)}

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
