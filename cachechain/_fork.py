"""Fork safety in one place.

A process that forks while other threads run (gunicorn with ``--preload``, for one)
gives the child copies of every lock in the state it had, but none of the threads: a
lock another thread held stays held forever in the child. Objects that own locks call
:func:`track` and implement ``_after_fork()``, which :func:`after_fork_in_child` calls
in a forked child to give them fresh locks and forget work of threads that do not
exist there. Objects are held weakly.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

__all__ = ["after_fork_in_child", "track"]

log = logging.getLogger("cachechain")

_TRACKED: weakref.WeakSet[Any] = weakref.WeakSet()


def track(obj: Any) -> None:
    """Call ``obj._after_fork()`` in every forked child while ``obj`` lives."""
    _TRACKED.add(obj)


def after_fork_in_child() -> None:
    """Reset every tracked object (runs in the child right after ``os.fork``)."""
    for obj in list(_TRACKED):
        try:
            obj._after_fork()
        except Exception:  # pragma: no cover - a reset must never break the child
            log.exception("cachechain: could not reset %r after fork", obj)


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent only on Windows
    os.register_at_fork(after_in_child=after_fork_in_child)
