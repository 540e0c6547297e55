"""Exporter plugins: the pluggy hooks, and metrics exporters by name.

A plugin registers exporters through one hook::

    from cachechain.exporters import ExporterRegistry, hookimpl

    @hookimpl
    def cachechain_register_exporters(registry: ExporterRegistry) -> None:
        registry.add("mine", MyCollector, description="what it does")

and declares its module under the entry-point group :data:`ENTRY_POINT_GROUP`
(``cachechain.exporters``) in its ``pyproject.toml``::

    [project.entry-points."cachechain.exporters"]
    mine = "mypackage.plugin"

A configuration then picks the exporter by name (``"metrics": "mine"``, or
:func:`create_exporter`). Importing cachechain imports no plugin: the entry points are
loaded once, on the first lookup. A plugin that fails to import or to register is a
:class:`PluginLoadWarning` naming it, and the others still load; a name two plugins
claim is unusable (:class:`ExporterConflictError` names both). ``cachechain plugins``
lists what is installed.
"""

from __future__ import annotations

from ._compat import package_getattr
from ._exporters import available_exporters, create_exporter, register_plugin
from ._plugins import (
    ENTRY_POINT_GROUP,
    ExporterConflictError,
    ExporterInfo,
    ExporterRegistry,
    PluginLoadWarning,
    UnknownExporterError,
    hookimpl,
    hookspec,
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

# Names this module exported in 0.1 that are internal now (removed in 0.3).
__getattr__ = package_getattr(
    "cachechain.exporters",
    {
        "ExporterConflict": "cachechain._plugins",
        "ExporterFactory": "cachechain._plugins",
        "ExporterReport": "cachechain._plugins",
        "PluginFailure": "cachechain._plugins",
        "ExporterManager": "cachechain._exporters",
        "get_manager": "cachechain._exporters",
        "reset_exporters": "cachechain._exporters",
        "exporter_report": "cachechain._exporters_legacy",
        "ENV_VAR": "cachechain._exporters_legacy",
        "PROJECT_NAME": "cachechain._exporters_legacy",
        "KNOWN_EXPORTER_PACKAGES": "cachechain._exporters_legacy",
        "ExporterSpecs": "cachechain._exporters_legacy",
    },
)
