"""Names ``cachechain.exporters`` exported in 0.1 and no longer does: reachable through
its deprecation ``__getattr__`` until 0.3, defined here from their current homes."""

from __future__ import annotations

from collections.abc import Mapping

from ._exporter_spec import ENV_VAR
from ._exporters import get_manager
from ._plugins import _KNOWN_PACKAGES, _PROJECT, ExporterHooks, ExporterReport

__all__ = ["ENV_VAR", "KNOWN_EXPORTER_PACKAGES", "PROJECT_NAME", "ExporterSpecs", "exporter_report"]

#: The pluggy project name.
PROJECT_NAME = _PROJECT
#: Exporters cachechain knows of but does not ship: name -> the package to install.
KNOWN_EXPORTER_PACKAGES: Mapping[str, str] = _KNOWN_PACKAGES
#: The hook specifications (renamed ``ExporterHooks``).
ExporterSpecs = ExporterHooks


def exporter_report() -> ExporterReport:
    """What the exporter plugins registered and what failed (``get_manager().report()``)."""
    return get_manager().report()
