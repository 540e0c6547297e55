"""RefreshHooks: the refresh hooks a reading collector calls before each read.

A chain registers one with its collector (:meth:`MetricsCollector.add_refresh_hook`)
to report figures it polls rather than pushes (queue depths, an in-process layer's
entries and evictions) just before the collector reads them: a snapshot, a scrape, a
flush. The accumulating collectors and the StatsD exporter keep theirs here.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

from .. import _fork

__all__ = ["RefreshHooks"]

Ref = Callable[[], "Callable[[], object] | None"]


class RefreshHooks:
    """A thread-safe list of refresh hooks.

    :meth:`add` keeps a bound method weakly (it goes when its object goes) and any
    other callable until it returns ``False``; :meth:`run` calls each hook, drops those
    that returned ``False`` or whose object is gone, and passes what a hook raises to
    ``on_error(hook, exc)`` (which must not raise) instead of raising it.
    """

    def __init__(self, on_error: Callable[[Callable[[], object], Exception], None]) -> None:
        self._on_error = on_error
        self._refs: list[Ref] = []
        self._lock = threading.Lock()
        _fork.track(self)

    def add(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` at each :meth:`run` from now on."""
        ref: Ref
        if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
            ref = weakref.WeakMethod(fn)
        else:

            def ref() -> Callable[[], object]:
                return fn

        with self._lock:
            self._refs.append(ref)

    def run(self) -> None:
        """Call every hook now, in the order they were added."""
        with self._lock:
            refs = list(self._refs)
        dead = []
        for ref in refs:
            fn = ref()
            if fn is None:
                dead.append(ref)
                continue
            try:
                if fn() is False:
                    dead.append(ref)
            except Exception as exc:
                self._on_error(fn, exc)
        if dead:
            with self._lock:
                self._refs = [r for r in self._refs if r not in dead]

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
