"""An example exporter: counts hits and misses per layer and logs the hit ratios.

Written against :class:`cachechain.metrics.MetricsCollector`: override the methods you
need, leave the others as they are (they do nothing). A collector is called on the
request path, so it only counts there; the logging happens at most once every
``interval`` seconds, on the call that finds the interval over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cachechain.metrics import MetricsCollector

__all__ = ["HitRatioExporter"]

log = logging.getLogger("cachechain.hit_ratio")


class HitRatioExporter(MetricsCollector):
    """Counts hits and misses per layer; logs ``layer=hit ratio`` every ``interval``
    seconds (0: never by itself; call :meth:`log_now`) on the logger
    ``cachechain.hit_ratio`` at ``level`` (a name such as ``"INFO"``). ``clock`` gives
    monotonic seconds. Raises ``ValueError`` for a negative interval or an unknown
    level."""

    def __init__(
        self,
        interval: float = 60.0,
        level: str = "INFO",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval >= 0:
            raise ValueError(f"interval must be a number of seconds >= 0, got {interval!r}")
        number = logging.getLevelName(str(level).upper())
        if not isinstance(number, int):
            raise ValueError(f"level must be a logging level name, got {level!r}")
        self.interval = float(interval)
        self.level = number
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        self._next = clock() + interval

    def record_get(self, layer: str, hit: bool, duration: float) -> None:
        """Count one hit or miss of ``layer``."""
        with self._lock:
            counts = self._counts.setdefault(layer, [0, 0])
            counts[0 if hit else 1] += 1
            due = self.interval > 0 and self._clock() >= self._next
            if due:
                self._next = self._clock() + self.interval
        if due:
            self.log_now()

    def hit_ratios(self) -> dict[str, float]:
        """Each layer's hits / (hits + misses) so far."""
        with self._lock:
            return {layer: h / (h + m) for layer, (h, m) in self._counts.items() if h + m}

    def log_now(self) -> str:
        """Log the hit ratios now; return the logged line."""
        ratios = self.hit_ratios()
        line = " ".join(f"{layer}={ratio:.3f}" for layer, ratio in sorted(ratios.items()))
        log.log(self.level, "cache hit ratios: %s", line or "no gets yet")
        return line
