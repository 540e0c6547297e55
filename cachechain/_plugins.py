"""Exporter plugins: the pluggy hook, the registry it fills, entry-point discovery.

The hook (pluggy project ``cachechain``) is historic: a plugin registered at any time
has it called once, with every ``add`` credited to that plugin. Plugins of the
entry-point group ``cachechain.exporters`` are loaded once, by the first lookup. One
that fails to import or to register is a :class:`PluginLoadWarning` naming it, and the
others load; a name two plugins claim is unusable (:class:`ExporterConflictError`).
See :mod:`cachechain.exporters` for how a plugin is written and declared.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from ._declarative import describe
from ._errors import ConfigError

__all__ = [
    "BUILTIN_PLUGIN",
    "ENTRY_POINT_GROUP",
    "ExporterConflict",
    "ExporterConflictError",
    "ExporterFactory",
    "ExporterInfo",
    "ExporterPlugins",
    "ExporterRegistry",
    "ExporterReport",
    "PluginFailure",
    "PluginLoadWarning",
    "PluginOrigin",
    "UnknownExporterError",
    "hookimpl",
    "hookspec",
]

log = logging.getLogger("cachechain.exporters")

_PROJECT = "cachechain"
#: The entry-point group in which distributions declare exporter plugins.
ENTRY_POINT_GROUP = "cachechain.exporters"
#: The plugin name of cachechain's own exporters.
BUILTIN_PLUGIN = _PROJECT
#: Exporters that cachechain knows of but does not ship: name -> the package to install.
_KNOWN_PACKAGES = {"statsd": "cachechain-statsd"}

#: Marks the hook specifications of cachechain (pluggy project ``cachechain``).
hookspec = pluggy.HookspecMarker(_PROJECT)
#: Marks a plugin's implementation of ``cachechain_register_exporters``.
hookimpl = pluggy.HookimplMarker(_PROJECT)

#: Builds a collector from keyword options (the ``options`` of a configuration).
ExporterFactory = Callable[..., Any]

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class PluginLoadWarning(UserWarning):
    """An exporter plugin could not be imported or registered; the others still are."""


class UnknownExporterError(ConfigError):
    """No installed exporter has the requested name. The message lists the installed
    exporters, the package to install when the name is a known one, and the plugins
    that failed to load."""


class ExporterConflictError(ConfigError):
    """Two plugins registered an exporter under the same name; the message names both."""


class ExporterHooks:
    """The hook specifications of cachechain (pluggy project ``cachechain``)."""

    @hookspec(historic=True)
    def cachechain_register_exporters(self, registry: ExporterRegistry) -> None:
        """Register this plugin's exporters: call ``registry.add(name, factory,
        description=...)`` once per exporter.

        ``factory(**options)`` must return a collector (an object with the methods of
        :class:`~cachechain.metrics.MetricsCollector`; subclassing it is simplest). It
        should validate its options and raise :class:`~cachechain.ConfigError` naming
        the option (``"port must be ..."``). The hook is called once per plugin, when the
        plugin is registered.
        """


@dataclass(frozen=True)
class PluginOrigin:
    """Who registered something: the ``plugin`` name, and the ``distribution`` and
    ``version`` providing it (``None`` when unknown, for a plugin registered by code)."""

    plugin: str
    distribution: str | None
    version: str | None

    def describe(self) -> str:
        """``"plugin 'name' (distribution version)"``, as messages name a plugin."""
        if self.distribution:
            version = f" {self.version}" if self.version else ""
            return f"plugin {self.plugin!r} ({self.distribution}{version})"
        return f"plugin {self.plugin!r}"


@dataclass(frozen=True, kw_only=True)
class ExporterInfo(PluginOrigin):
    """One registered exporter: its ``name``, ``factory`` and one-line ``description``,
    and the plugin (with its distribution and version) that registered it."""

    name: str
    factory: ExporterFactory
    description: str

    @property
    def builtin(self) -> bool:
        """Whether cachechain itself provides this exporter."""
        return self.plugin == BUILTIN_PLUGIN


@dataclass(frozen=True, kw_only=True)
class PluginFailure(PluginOrigin):
    """A plugin that could not be imported or registered, and why (``error``)."""

    error: str


@dataclass(frozen=True)
class ExporterConflict:
    """An exporter ``name`` that several plugins registered (``claims``): unusable."""

    name: str
    claims: tuple[ExporterInfo, ...]

    def describe(self) -> str:
        """A one-line description naming every claimant."""
        who = " and ".join(c.describe() for c in self.claims)
        return f"exporter name {self.name!r} is registered by {who}"


@dataclass(frozen=True)
class ExporterReport:
    """What discovery found: usable ``exporters`` (sorted by name), ``conflicts``
    (names claimed twice, unusable) and plugin ``failures``."""

    exporters: tuple[ExporterInfo, ...]
    conflicts: tuple[ExporterConflict, ...]
    failures: tuple[PluginFailure, ...]


class ExporterRegistry:
    """Collects the exporters that plugins register; handed to the hook.

    Plugins call :meth:`add`. A plugin's registrations take effect only if its hook
    returns normally: one that raises registers nothing.
    """

    def __init__(self) -> None:
        self._claims: dict[str, list[ExporterInfo]] = {}
        self._origin: PluginOrigin | None = None
        self._pending: list[ExporterInfo] = []

    def add(self, name: str, factory: ExporterFactory, *, description: str = "") -> None:
        """Register ``factory`` as the exporter ``name``.

        ``name``: lower-case letters, digits, ``_`` and ``-``, starting with a letter,
        at most 64 characters. ``factory(**options)`` returns a collector.
        ``description`` is one line shown by ``cachechain plugins``. Raises
        ``ValueError`` for a bad name, a name this plugin registered already, or a
        factory that is not callable; ``RuntimeError`` outside the hook.
        """
        origin = self._origin
        if origin is None:
            raise RuntimeError(
                "ExporterRegistry.add() is called by the cachechain_register_exporters "
                "hook; register a plugin with cachechain.exporters.register_plugin()"
            )
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"exporter name must be lower-case letters, digits, '_' or '-', starting "
                f"with a letter, at most 64 characters; got {name!r}"
            )
        if not callable(factory):
            raise ValueError(f"the factory of exporter {name!r} is not callable: {factory!r}")
        if any(p.name == name for p in self._pending):
            raise ValueError(f"plugin {origin.plugin!r} registers exporter {name!r} twice")
        line = next(iter(str(description or "").strip().splitlines()), "")
        self._pending.append(
            ExporterInfo(**vars(origin), name=name, factory=factory, description=line)
        )

    @contextmanager
    def _collecting(self, origin: PluginOrigin) -> Iterator[None]:
        """Credit every ``add`` inside the block to ``origin``; keep them only if the
        block ends normally."""
        self._origin, self._pending = origin, []
        try:
            yield
            for info in self._pending:
                self._claims.setdefault(info.name, []).append(info)
        finally:
            self._origin, self._pending = None, []

    def _snapshot(self) -> tuple[tuple[ExporterInfo, ...], tuple[ExporterConflict, ...]]:
        claims = sorted(self._claims.items())
        usable = tuple(c[0] for _, c in claims if len(c) == 1)
        conflicts = tuple(ExporterConflict(n, tuple(c)) for n, c in claims if len(c) > 1)
        return usable, conflicts


def _default_entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _dist_of(ep: Any) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    try:
        return str(dist.metadata["Name"]), str(dist.version)
    except Exception:  # pragma: no cover - a distribution without metadata
        return None, None


class ExporterPlugins:
    """The exporter plugins: registration, entry-point discovery, lookup by name.

    ``entry_points`` returns the entry points to load (default: those of the group
    :data:`ENTRY_POINT_GROUP` in the installed distributions), once, on the first
    lookup. Thread-safe. ``pm`` is the pluggy plugin manager.
    """

    def __init__(self, *, entry_points: Callable[[], Iterable[Any]] | None = None) -> None:
        self._entry_points = entry_points or _default_entry_points
        self._lock = threading.RLock()
        self._loaded = False
        self._failures: list[PluginFailure] = []
        self.pm = pluggy.PluginManager(_PROJECT)
        self.pm.add_hookspecs(ExporterHooks)
        self._registry = ExporterRegistry()
        # A historic call: every plugin registered from now on has its hook called with
        # the registry at registration, so each add() is credited to its plugin.
        self.pm.hook.cachechain_register_exporters.call_historic(
            kwargs={"registry": self._registry}
        )

    def register(
        self,
        plugin: object,
        name: str | None = None,
        *,
        distribution: str | None = None,
        version: str | None = None,
    ) -> str:
        """Register ``plugin`` (a module or object with hook implementations) under
        ``name`` and call its hook; return the plugin's name.

        Raises ``ValueError`` when the plugin or its name is registered already, and
        whatever the plugin's hook raises (the plugin is then unregistered, with none
        of its exporters kept).
        """
        plugin_name = name or self.pm.get_canonical_name(plugin)
        with self._lock:
            if self.pm.has_plugin(plugin_name) or self.pm.is_registered(plugin):
                raise ValueError(f"plugin {plugin_name!r} is registered already")
            try:
                with self._registry._collecting(PluginOrigin(plugin_name, distribution, version)):
                    self.pm.register(plugin, plugin_name)
                    self.pm.check_pending()  # a misspelt hook name is an error
            except BaseException:
                if self.pm.is_registered(plugin):
                    self.pm.unregister(plugin)
                raise
        return plugin_name

    def load_entry_points(self) -> None:
        """Load and register every plugin of the entry-point group, once.

        A plugin that fails to import or to register is recorded, logged and warned
        about (:class:`PluginLoadWarning`) by name; the others load normally. A name
        claimed twice is logged as a warning.
        """
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            seen: set[tuple[str | None, str]] = set()
            for ep in self._entry_points():
                dist, version = _dist_of(ep)
                key = (dist.lower().replace("_", "-") if dist else None, str(ep.name))
                if key not in seen:  # else the same distribution found twice on sys.path
                    seen.add(key)
                    self._load(ep, dist, version)
            for conflict in self._registry._snapshot()[1]:
                log.warning(
                    "%s: the name is unusable until one is uninstalled", conflict.describe()
                )

    def _load(self, ep: Any, dist: str | None, version: str | None) -> None:
        name = str(ep.name)
        if self.pm.has_plugin(name):
            name = f"{name} ({dist})" if dist else f"{name} ({ep.value})"
        origin = PluginOrigin(name, dist, version)
        try:
            plugin = ep.load()
        except Exception as exc:
            self._failed(origin, f"import failed: {describe(exc)}")
            return
        try:
            self.register(plugin, name, distribution=dist, version=version)
        except Exception as exc:
            self._failed(origin, f"registration failed: {describe(exc)}")

    def _failed(self, origin: PluginOrigin, error: str) -> None:
        self._failures.append(PluginFailure(**vars(origin), error=error))
        message = (
            f"cachechain exporter {origin.describe()} could not be loaded and is skipped "
            f"(entry point group {ENTRY_POINT_GROUP!r}): {error}"
        )
        log.warning("%s", message)
        warnings.warn(message, PluginLoadWarning, stacklevel=5)

    def report(self) -> ExporterReport:
        """Load the plugins if needed; return the exporters, conflicts and failures."""
        self.load_entry_points()
        with self._lock:
            usable, conflicts = self._registry._snapshot()
            return ExporterReport(usable, conflicts, tuple(self._failures))

    def get(self, name: str, *, field: str = "metrics.exporter") -> ExporterInfo:
        """Return the exporter called ``name`` (loading the plugins on first use).

        Raises :class:`UnknownExporterError` (listing the installed exporters, the
        package to install for a known name, and plugins that failed to load) or
        :class:`ExporterConflictError` (naming the plugins that claim it), each
        prefixed with ``field``.
        """
        report = self.report()
        for info in report.exporters:
            if info.name == name:
                return info
        for conflict in report.conflicts:
            if conflict.name == name:
                raise ExporterConflictError(
                    f"{field}: {conflict.describe()}; uninstall one of them"
                )
        installed = ", ".join(i.name for i in report.exporters) or "none"
        message = f"{field}: unknown metrics exporter {name!r}; installed exporters: {installed}"
        package = _KNOWN_PACKAGES.get(name)
        if package:
            message += f". The {name!r} exporter is in a separate package: pip install {package}"
        if report.failures:
            broken = "; ".join(f"{f.describe()}: {f.error}" for f in report.failures)
            message += f". Plugins that failed to load: {broken}"
        raise UnknownExporterError(message)
