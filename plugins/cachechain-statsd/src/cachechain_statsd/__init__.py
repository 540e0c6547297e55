"""cachechain-statsd: a StatsD exporter for cachechain's metrics.

Installing the distribution registers the exporter ``statsd`` (entry-point group
``cachechain.exporters``); select it by name in a chain config
(``"metrics": {"exporter": "statsd", "options": {...}}``), with
``CACHECHAIN_EXPORTER=statsd``, or build :class:`StatsdExporter` yourself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .exporter import StatsdExporter, StatsdExporterStats

__all__ = ["StatsdExporter", "StatsdExporterStats", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("StatsdExporter", "StatsdExporterStats"):
        from . import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
