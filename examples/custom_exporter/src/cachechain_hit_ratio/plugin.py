"""Registers the ``hit-ratio`` exporter with cachechain (entry point of this example)."""

from __future__ import annotations

from cachechain.exporters import ExporterRegistry, hookimpl

from . import HitRatioExporter


@hookimpl
def cachechain_register_exporters(registry: ExporterRegistry) -> None:
    """Register ``hit-ratio``: ``{"exporter": "hit-ratio", "options": {"interval": 60}}``."""
    registry.add(
        "hit-ratio",
        HitRatioExporter,
        description="Logs each layer's hit ratio every `interval` seconds (an example)",
    )
