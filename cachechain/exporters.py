"""Exporter plugins: the pluggy hooks, and exporters by name.

A plugin registers exporters through one hook::

    from cachechain.exporters import ExporterRegistry, hookimpl

    @hookimpl
    def cachechain_register_exporters(registry: ExporterRegistry) -> None:
        registry.add("mine", MyCollector, description="what it does")

and declares its module under the entry-point group ``cachechain.exporters``. See
:mod:`cachechain._exporters` for discovery and the errors it reports.
"""

from __future__ import annotations

from ._exporters import (
    ENTRY_POINT_GROUP,
    ExporterConflictError,
    ExporterInfo,
    ExporterRegistry,
    PluginLoadWarning,
    UnknownExporterError,
    available_exporters,
    create_exporter,
    hookimpl,
    hookspec,
    register_plugin,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ExporterConflictError",
    "ExporterInfo",
    "ExporterRegistry",
    "PluginLoadWarning",
    "UnknownExporterError",
    "available_exporters",
    "create_exporter",
    "hookimpl",
    "hookspec",
    "register_plugin",
]
