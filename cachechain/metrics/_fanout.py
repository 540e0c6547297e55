"""FanoutCollector: one chain reporting to several collectors at once.

For example a :class:`~cachechain.MemoryCollector` for an admin page and
a :class:`~cachechain.PrometheusCollector` for monitoring. Each child
sits behind its own :class:`~cachechain.metrics.CollectorGuard`, so a child that
raises is counted and logged once, and the others still get every call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ._base import RECORD_METHODS, CollectorGuard, MetricsCollector

__all__ = ["FanoutCollector"]

log = logging.getLogger("cachechain.metrics")


def _fan(calls: tuple[Callable[..., None], ...]) -> Callable[..., None]:
    if len(calls) == 1:
        return calls[0]
    if len(calls) == 2:
        first, second = calls

        def both(*args: Any) -> None:
            first(*args)
            second(*args)

        return both

    def every(*args: Any) -> None:
        for call in calls:
            call(*args)

    return every


class FanoutCollector(MetricsCollector):
    """Forwards every call to each of ``collectors``, in order.

    Children may be any collectors, duck-typed ones with only the seed's eight methods
    included (the missing ones are skipped). :meth:`bind_chain` binds each child to the
    chain and returns a fan-out of the bound children. What a child raises never
    reaches the caller nor stops the other children: it is counted
    (:attr:`failures`) and logged once per child. Raises ``TypeError`` when a child
    lacks one of the seed's methods.
    """

    def __init__(self, *collectors: Any) -> None:
        self.collectors: tuple[Any, ...] = collectors
        self._guards = tuple(CollectorGuard(c) for c in collectors)
        #: Where failures are counted: these guards, or those of the fan-out this one
        #: was bound from (so the collector given to a chain counts what the chain saw).
        self._counted = self._guards
        for name in RECORD_METHODS:
            setattr(self, name, _fan(tuple(getattr(g, name) for g in self._guards)))

    @property
    def failures(self) -> int:
        """How many calls into the children raised, all children together."""
        return sum(g.failures for g in self._counted)

    def bind_chain(self, chain: str, layers: Sequence[str]) -> MetricsCollector:
        """Return a fan-out of each child bound to the chain (a child without
        ``bind_chain``, or whose ``bind_chain`` raised, is used as it is). What its
        children raise is counted in this fan-out's :attr:`failures`, and logged once
        per child however many chains are bound."""
        bound = []
        for child, guard in zip(self.collectors, self._guards, strict=True):
            bind = getattr(child, "bind_chain", None)
            if bind is not None:
                try:
                    child = bind(chain, tuple(layers))
                except Exception as exc:
                    guard.failed(exc)
            bound.append(child)
        fan = FanoutCollector(*bound)
        for guard, counted in zip(fan._guards, self._counted, strict=True):
            guard.failed = counted.failed  # type: ignore[method-assign]
        fan._counted = self._counted
        return fan

    def add_refresh_hook(self, fn: Callable[[], object]) -> None:
        """Register ``fn`` with every child that reads (each calls it before its own
        reads; what it records reaches every child)."""
        for child, guard in zip(self.collectors, self._guards, strict=True):
            add = getattr(child, "add_refresh_hook", None)
            if add is not None:
                try:
                    add(fn)
                except Exception as exc:
                    guard.failed(exc)

    def add_info(self, metric: str, labels: Sequence[str]) -> None:
        """Forward the info series to every child that has ``add_info`` (see
        :meth:`MetricsCollector.add_info`); what a child raises is counted and logged
        once."""
        for child, guard in zip(self.collectors, self._guards, strict=True):
            add = getattr(child, "add_info", None)
            if add is not None:
                try:
                    add(metric, labels)
                except Exception as exc:
                    guard.failed(exc)

    def close(self) -> None:
        """Close every child that has ``close()`` (flushing what it buffers); what a
        child raises is counted and logged once, and the others are still closed."""
        for child, guard in zip(self.collectors, self._guards, strict=True):
            close = getattr(child, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:
                    guard.failed(exc)

    def __repr__(self) -> str:
        return f"<FanoutCollector {list(self.collectors)!r}>"
