"""Fork safety in one place.

A process that forks while other threads run (gunicorn with ``--preload``, for one)
gives the child copies of every lock in the state it had, but none of the threads: a
lock another thread held stays held forever in the child. This module is the only
caller of :func:`os.register_at_fork` in cachechain:

- objects that own locks call :func:`track` and implement ``_after_fork()``, which runs
  in a forked child to give them fresh locks and forget work of threads that do not
  exist there (objects are held weakly);
- module-level state registers plain functions with :func:`at_fork` (``before`` runs in
  the parent before the fork, ``after_in_parent`` and ``after_in_child`` after it).

A hook that raises is logged and does not stop the others.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["after_fork_in_child", "at_fork", "track"]

log = logging.getLogger("cachechain")

_TRACKED: weakref.WeakSet[Any] = weakref.WeakSet()
_BEFORE: list[Callable[[], None]] = []
_AFTER_IN_PARENT: list[Callable[[], None]] = []
_AFTER_IN_CHILD: list[Callable[[], None]] = []


def track(obj: Any) -> None:
    """Call ``obj._after_fork()`` in every forked child while ``obj`` lives."""
    _TRACKED.add(obj)


def at_fork(
    *,
    before: Callable[[], None] | None = None,
    after_in_parent: Callable[[], None] | None = None,
    after_in_child: Callable[[], None] | None = None,
) -> None:
    """Register module-level fork hooks (run in registration order; ``before`` hooks in
    reverse order, as :func:`os.register_at_fork` does)."""
    if before is not None:
        _BEFORE.insert(0, before)
    if after_in_parent is not None:
        _AFTER_IN_PARENT.append(after_in_parent)
    if after_in_child is not None:
        _AFTER_IN_CHILD.append(after_in_child)


def _run(hooks: list[Callable[[], None]]) -> None:
    for hook in list(hooks):
        try:
            hook()
        except Exception:  # pragma: no cover - a hook must never break the fork
            log.exception("cachechain: fork hook %r failed", hook)


def _before() -> None:
    _run(_BEFORE)


def _after_in_parent() -> None:
    _run(_AFTER_IN_PARENT)


def after_fork_in_child() -> None:
    """Reset every tracked object, then run the ``after_in_child`` hooks (runs in the
    child right after ``os.fork``)."""
    for obj in list(_TRACKED):
        try:
            obj._after_fork()
        except Exception:  # pragma: no cover - a reset must never break the child
            log.exception("cachechain: could not reset %r after fork", obj)
    _run(_AFTER_IN_CHILD)


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent only on Windows
    os.register_at_fork(
        before=_before, after_in_parent=_after_in_parent, after_in_child=after_fork_in_child
    )
