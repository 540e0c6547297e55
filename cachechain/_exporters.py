"""Metrics exporters by name: pluggy hooks, entry-point discovery and ``create_exporter``.

An *exporter* is a factory that builds a :class:`~cachechain.metrics.MetricsCollector`
from keyword options. Exporters have names (``prometheus``, ``memory``, ``none``,
``statsd``...) so that a configuration can pick one without importing anything.

Plugins register exporters through one pluggy hook (project name ``cachechain``)::

    from cachechain.exporters import hookimpl

    @hookimpl
    def cachechain_register_exporters(registry):
        registry.add("mine", MyCollector, description="what it does")

and are found through the entry-point group ``cachechain.exporters`` of installed
distributions (in ``pyproject.toml``: ``[project.entry-points."cachechain.exporters"]``
``mine = "mypackage.plugin"``). The built-in exporters are registered through the same
hook, by a plugin of cachechain's own.

Discovery is lazy: importing :mod:`cachechain` (or this module) imports no plugin.
The first call that needs the exporters (:func:`create_exporter`,
:func:`available_exporters`, :func:`exporter_report`) loads every entry point once.
A plugin that fails to import or to register is reported with a
:class:`PluginLoadWarning` naming it, and the others load normally. Two plugins that
claim one name make that name unusable: asking for it raises
:class:`ExporterConflictError`, which names both.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from ._errors import ConfigError
from .metrics._base import SEED_METHODS, MetricsCollector, NoOpCollector

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "KNOWN_EXPORTER_PACKAGES",
    "PROJECT_NAME",
    "ExporterConflict",
    "ExporterConflictError",
    "ExporterFactory",
    "ExporterInfo",
    "ExporterManager",
    "ExporterRegistry",
    "ExporterReport",
    "ExporterSpecs",
    "PluginFailure",
    "PluginLoadWarning",
    "UnknownExporterError",
    "available_exporters",
    "create_exporter",
    "exporter_report",
    "get_manager",
    "hookimpl",
    "hookspec",
    "register_plugin",
    "reset_exporters",
]

log = logging.getLogger("cachechain.exporters")

#: pluggy's project name for cachechain's hooks.
PROJECT_NAME = "cachechain"
#: The entry-point group in which distributions declare exporter plugins.
ENTRY_POINT_GROUP = "cachechain.exporters"
#: The environment variable naming the exporter(s) when a configuration names none.
ENV_VAR = "CACHECHAIN_EXPORTER"
#: Exporters that cachechain knows of but does not ship: name -> the package to install.
KNOWN_EXPORTER_PACKAGES: Mapping[str, str] = {"statsd": "cachechain-statsd"}

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: Builds a collector from keyword options (the ``options`` of a configuration).
ExporterFactory = Callable[..., Any]

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class PluginLoadWarning(UserWarning):
    """An exporter plugin could not be loaded or registered; the others still are."""


class UnknownExporterError(ConfigError):
    """No installed exporter has the requested name. The message lists the installed
    exporters, and the package to install when the name is a known one."""


class ExporterConflictError(ConfigError):
    """Two plugins registered an exporter under the same name; the message names both."""


class ExporterSpecs:
    """The hook specifications of cachechain (pluggy project ``cachechain``)."""

    @hookspec(historic=True)
    def cachechain_register_exporters(self, registry: ExporterRegistry) -> None:
        """Register this plugin's exporters: call ``registry.add(name, factory,
        description=...)`` once per exporter.

        ``factory(**options)`` must return a collector (an object with the methods of
        :class:`~cachechain.metrics.MetricsCollector`; subclassing it is simplest). It
        should validate its options and raise :class:`~cachechain.errors.ConfigError`
        naming the option (``"port must be ..."``). The hook is called once per plugin,
        when the plugin is registered.
        """


@dataclass(frozen=True)
class ExporterInfo:
    """One registered exporter: its ``name``, ``factory`` and ``description``, the
    ``plugin`` that registered it, and the ``distribution`` and ``version`` providing
    that plugin (``None`` when unknown, for a plugin registered by code)."""

    name: str
    factory: ExporterFactory
    description: str
    plugin: str
    distribution: str | None
    version: str | None

    @property
    def builtin(self) -> bool:
        """Whether cachechain itself provides this exporter."""
        return self.plugin == _BUILTIN_PLUGIN

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description (the factory is left out)."""
        return {
            "name": self.name,
            "description": self.description,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
        }


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or registered, and why (``error``)."""

    plugin: str
    distribution: str | None
    version: str | None
    error: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "error": self.error,
        }


@dataclass(frozen=True)
class ExporterConflict:
    """An exporter ``name`` that several plugins registered (``claims``)."""

    name: str
    claims: tuple[ExporterInfo, ...]

    def describe(self) -> str:
        """A one-line description naming every claimant."""
        who = " and ".join(_origin(c) for c in self.claims)
        return f"exporter name {self.name!r} is registered by {who}"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {"name": self.name, "claims": [c.as_dict() for c in self.claims]}


@dataclass(frozen=True)
class ExporterReport:
    """What discovery found: usable ``exporters`` (sorted by name), ``conflicts``
    (names claimed twice, unusable) and plugin ``failures``."""

    exporters: tuple[ExporterInfo, ...]
    conflicts: tuple[ExporterConflict, ...]
    failures: tuple[PluginFailure, ...]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "exporters": [e.as_dict() for e in self.exporters],
            "conflicts": [c.as_dict() for c in self.conflicts],
            "failures": [f.as_dict() for f in self.failures],
        }


def _origin(info: ExporterInfo | PluginFailure) -> str:
    if info.distribution:
        version = f" {info.version}" if info.version else ""
        return f"plugin {info.plugin!r} ({info.distribution}{version})"
    return f"plugin {info.plugin!r}"


@dataclass(frozen=True)
class _Origin:
    plugin: str
    distribution: str | None
    version: str | None


class ExporterRegistry:
    """Collects the exporters that plugins register; handed to the hook.

    Plugins call :meth:`add`. A plugin's registrations take effect only if its hook
    returns normally: one that raises registers nothing.
    """

    def __init__(self) -> None:
        self._claims: dict[str, list[ExporterInfo]] = {}
        self._origin: _Origin | None = None
        self._pending: list[ExporterInfo] = []

    def add(self, name: str, factory: ExporterFactory, *, description: str = "") -> None:
        """Register ``factory`` as the exporter ``name``.

        ``name``: lower-case letters, digits, ``_`` and ``-``, starting with a letter,
        at most 64 characters. ``factory(**options)`` returns a collector.
        ``description`` is one line shown by ``cachechain plugins``. Raises
        ``ValueError`` for a bad name, a name this plugin registered already, or a
        factory that is not callable; ``RuntimeError`` outside the hook.
        """
        if self._origin is None:
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
            raise ValueError(f"plugin {self._origin.plugin!r} registers exporter {name!r} twice")
        self._pending.append(
            ExporterInfo(
                name=name,
                factory=factory,
                description=str(description).strip().splitlines()[0] if description else "",
                plugin=self._origin.plugin,
                distribution=self._origin.distribution,
                version=self._origin.version,
            )
        )

    @contextmanager
    def _collecting(self, origin: _Origin) -> Iterator[None]:
        """Attribute every ``add`` inside the block to ``origin``; keep them only if the
        block ends normally."""
        self._origin, self._pending = origin, []
        try:
            yield
            for info in self._pending:
                self._claims.setdefault(info.name, []).append(info)
        finally:
            self._origin, self._pending = None, []

    def _snapshot(self) -> tuple[tuple[ExporterInfo, ...], tuple[ExporterConflict, ...]]:
        usable = tuple(c[0] for n, c in sorted(self._claims.items()) if len(c) == 1)
        conflicts = tuple(
            ExporterConflict(n, tuple(c)) for n, c in sorted(self._claims.items()) if len(c) > 1
        )
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


def _cachechain_version() -> str:
    try:
        return metadata.version("cachechain")
    except metadata.PackageNotFoundError:  # running from a source tree
        from . import __version__

        return __version__


class ExporterManager:
    """The plugin manager of the exporters: discovery, registration and creation.

    ``entry_points`` returns the entry points to load (default: those of the group
    :data:`ENTRY_POINT_GROUP` in the installed distributions); ``builtins`` registers
    cachechain's own exporters. Thread-safe. Most code uses the module's functions,
    which share one manager (:func:`get_manager`).
    """

    def __init__(
        self,
        *,
        entry_points: Callable[[], Iterable[Any]] | None = None,
        builtins: bool = True,
    ) -> None:
        self._entry_points = entry_points or _default_entry_points
        self._lock = threading.RLock()
        self._loaded = False
        self._failures: list[PluginFailure] = []
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(ExporterSpecs)
        self._registry = ExporterRegistry()
        # A historic call: every plugin registered from now on has its hook called with
        # the registry at registration, so each add() is attributed to its plugin.
        self.pm.hook.cachechain_register_exporters.call_historic(
            kwargs={"registry": self._registry}
        )
        if builtins:
            self.register(
                _BuiltinExporters(),
                _BUILTIN_PLUGIN,
                distribution="cachechain",
                version=_cachechain_version(),
            )

    # -- registration -----------------------------------------------------------------
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
            origin = _Origin(plugin_name, distribution, version)
            try:
                with self._registry._collecting(origin):
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
        about (:class:`PluginLoadWarning`) by name; the others load normally.
        """
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            seen: set[tuple[str | None, str]] = set()
            for ep in self._entry_points():
                dist, version = _dist_of(ep)
                key = (dist.lower().replace("_", "-") if dist else None, str(ep.name))
                if key in seen:  # the same distribution found twice on sys.path
                    continue
                seen.add(key)
                name = str(ep.name)
                if self.pm.has_plugin(name):
                    name = f"{name} ({dist})" if dist else f"{name} ({ep.value})"
                try:
                    plugin = ep.load()
                except Exception as exc:
                    self._failed(name, dist, version, f"import failed: {_describe(exc)}")
                    continue
                try:
                    self.register(plugin, name, distribution=dist, version=version)
                except Exception as exc:
                    self._failed(name, dist, version, f"registration failed: {_describe(exc)}")
            for conflict in self._registry._snapshot()[1]:
                log.warning(
                    "%s: the name is unusable until one is uninstalled", conflict.describe()
                )

    def _failed(self, plugin: str, dist: str | None, version: str | None, error: str) -> None:
        failure = PluginFailure(plugin, dist, version, error)
        self._failures.append(failure)
        message = (
            f"cachechain exporter {_origin(failure)} could not be loaded and is skipped "
            f"(entry point group {ENTRY_POINT_GROUP!r}): {error}"
        )
        log.warning("%s", message)
        warnings.warn(message, PluginLoadWarning, stacklevel=4)

    # -- lookup -----------------------------------------------------------------------
    def report(self) -> ExporterReport:
        """Load the plugins if needed; return the exporters, conflicts and failures."""
        self.load_entry_points()
        with self._lock:
            usable, conflicts = self._registry._snapshot()
            return ExporterReport(usable, conflicts, tuple(self._failures))

    def get(self, name: str, *, field: str = "metrics.exporter") -> ExporterInfo:
        """Return the exporter called ``name``.

        Raises :class:`UnknownExporterError` (listing the installed exporters, the
        package to install for a known name, and plugins that failed to load) or
        :class:`ExporterConflictError` (naming the plugins that claim it).
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
        package = KNOWN_EXPORTER_PACKAGES.get(name)
        if package:
            message += f". The {name!r} exporter is in a separate package: pip install {package}"
        if report.failures:
            broken = "; ".join(f"{_origin(f)}: {f.error}" for f in report.failures)
            message += f". Plugins that failed to load: {broken}"
        raise UnknownExporterError(message)

    # -- creation ---------------------------------------------------------------------
    def create(
        self,
        spec: Any = None,
        *,
        environ: Mapping[str, str] | None = None,
        field: str = "metrics",
        borrowed: list[Any] | None = None,
    ) -> Any:
        """Build the collector that ``spec`` describes; see :func:`create_exporter`.

        ``borrowed``, when given, receives every collector object that ``spec`` hands
        over as it is (an object, or a ``"module:attr"`` naming an instance) rather than
        one created here: such a collector may serve others, so its user must not close
        it."""
        if spec is None:
            env = os.environ if environ is None else environ
            value = env.get(ENV_VAR, "").strip()
            if not value:
                return NoOpCollector()
            parts = [p.strip() for p in value.split(",") if p.strip()]
            spec = parts[0] if len(parts) == 1 else parts
            field = ENV_VAR
        if isinstance(spec, str):
            return self._create_named(spec, {}, field, borrowed)
        if isinstance(spec, Mapping):
            name, options = _parse_mapping(spec, field)
            return self._create_named(name, options, field, borrowed)
        if isinstance(spec, (list, tuple)):
            return self._create_fanout(spec, environ, field, borrowed)
        if _is_collector(spec):
            if borrowed is not None:
                borrowed.append(spec)
            return spec
        raise ConfigError(
            f"{field} must be an exporter name, a mapping like "
            f"{{'exporter': 'statsd', 'options': {{...}}}}, a list of those, or a collector; "
            f"got {spec!r}"
        )

    def _create_fanout(
        self,
        specs: Sequence[Any],
        environ: Mapping[str, str] | None,
        field: str,
        borrowed: list[Any] | None = None,
    ) -> Any:
        made: list[Any] = []
        mine: list[Any] = []  # the items handed over as they are: never closed here
        try:
            for index, item in enumerate(specs):
                if item is None or isinstance(item, (list, tuple)):
                    raise ConfigError(
                        f"{field}[{index}] must be an exporter name, a mapping or a "
                        f"collector, got {item!r}"
                    )
                made.append(
                    self.create(item, environ=environ, field=f"{field}[{index}]", borrowed=mine)
                )
        except BaseException:
            for collector in made:
                if not any(collector is b for b in mine):
                    _close_quietly(collector)
            raise
        if borrowed is not None:
            borrowed.extend(mine)
        active = [c for c in made if type(c) is not NoOpCollector]
        if not active:
            return NoOpCollector()
        if len(active) == 1:
            return active[0]
        from .metrics._fanout import FanoutCollector

        return FanoutCollector(*active)

    def _create_named(
        self,
        name: str,
        options: Mapping[str, Any],
        field: str,
        borrowed: list[Any] | None = None,
    ) -> Any:
        name = name.strip()
        if ":" in name:
            factory: Any = _import_path(name, f"{field}.exporter")
            label = name
            if not callable(factory) or _is_collector(factory):
                if options:
                    raise ConfigError(
                        f"{field}.options: {name!r} is a collector instance, which takes no "
                        f"options; point at a class or factory instead"
                    )
                if not _is_collector(factory):
                    raise ConfigError(
                        f"{field}.exporter: {name!r} is neither a collector nor a callable "
                        f"that returns one"
                    )
                if borrowed is not None:
                    borrowed.append(factory)
                return factory
        else:
            lowered = name.lower()
            factory = self.get(lowered, field=f"{field}.exporter").factory
            label = lowered
        _check_options(factory, options, label, field)
        try:
            collector = factory(**options)
        except (ValueError, TypeError) as exc:  # ConfigError included: a bad option
            raise ConfigError(_with_field(f"{field}.options", str(exc), options)) from exc
        except Exception as exc:
            raise ConfigError(
                f"{field}: exporter {label!r} could not be created: {_describe(exc)}"
            ) from exc
        if not _is_collector(collector):
            _close_quietly(collector)
            missing = [m for m in SEED_METHODS if not callable(getattr(collector, m, None))]
            raise ConfigError(
                f"{field}: exporter {label!r} returned {collector!r}, which is not a "
                f"metrics collector (it lacks {', '.join(missing)})"
            )
        return collector


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _is_collector(obj: Any) -> bool:
    if isinstance(obj, MetricsCollector):
        return True
    if isinstance(obj, type):
        return False
    return all(callable(getattr(obj, m, None)) for m in SEED_METHODS)


def _close_quietly(collector: Any) -> None:
    close = getattr(collector, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # pragma: no cover - best effort while reporting another error
            log.debug("closing %r failed", collector, exc_info=True)


def _parse_mapping(spec: Mapping[Any, Any], field: str) -> tuple[str, Mapping[str, Any]]:
    unknown = sorted(str(k) for k in spec if k not in ("exporter", "options"))
    if unknown:
        raise ConfigError(
            f"{field}.{unknown[0]} is not a metrics setting (settings: exporter, options)"
        )
    name = spec.get("exporter")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"{field}.exporter must be an exporter name or 'module:attr', got {name!r}"
        )
    options = spec.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{field}.options must be a mapping, got {options!r}")
    for key in options:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"{field}.options keys must be option names, got {key!r}")
    return name, dict(options)


def _check_options(factory: Any, options: Mapping[str, Any], label: str, field: str) -> None:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in options:
        if key not in accepted:
            listed = ", ".join(accepted) or "none"
            raise ConfigError(
                f"{field}.options.{key} is not an option of exporter {label!r} (options: {listed})"
            )


def _with_field(prefix: str, message: str, fields: Iterable[str]) -> str:
    """Prefix ``message`` with the config path: ``prefix.field ...`` when it starts with
    the name of one of ``fields``, else ``prefix: ...``."""
    for name in sorted(fields, key=len, reverse=True):
        if message.startswith(name) and message[len(name) : len(name) + 1] in (" ", ".", "[", ":"):
            return f"{prefix}.{message}"
    return f"{prefix}: {message}"


def _import_path(path: str, field: str) -> Any:
    """Import ``module:attr`` (``attr`` may be dotted)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{field}: {path!r} must look like 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"{field}: cannot import module {module_name!r} of {path!r}: {_describe(exc)}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"{field}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    return obj


# -- built-in exporters -------------------------------------------------------------------

_BUILTIN_PLUGIN = "cachechain"


def _prometheus_factory(
    namespace: str = "cache_chain",
    buckets: Sequence[float] | None = None,
    registry: Any = "default",
    multiprocess: bool | None = None,
    flush_interval: float = 1.0,
) -> Any:
    """Build a :class:`~cachechain.metrics.prometheus.PrometheusCollector`.

    ``registry``: ``"default"`` (prometheus-client's global registry, which its HTTP
    server and WSGI app expose), ``None`` (none: call ``register`` yourself), a
    ``"module:attr"`` path to a ``CollectorRegistry``, or a registry object.
    ``multiprocess`` and ``flush_interval`` (seconds) are passed on as they are.
    """
    try:
        from .metrics._prometheus import PrometheusCollector
    except ImportError as exc:
        raise ConfigError(
            "the prometheus exporter needs prometheus-client: "
            f"pip install 'cachechain[prometheus]' ({_describe(exc)})"
        ) from exc
    if isinstance(registry, str):
        if registry == "default":
            from prometheus_client import REGISTRY

            registry = REGISTRY
        else:
            registry = _import_path(registry, "registry")
    kwargs: dict[str, Any] = {
        "registry": registry,
        "multiprocess": multiprocess,
        "flush_interval": flush_interval,
    }
    if buckets is not None:
        kwargs["buckets"] = buckets
    return PrometheusCollector(namespace, **kwargs)


def _memory_factory() -> Any:
    """Build a :class:`~cachechain.metrics.memory.MemoryCollector`."""
    from .metrics._memory import MemoryCollector

    return MemoryCollector()


def _none_factory() -> NoOpCollector:
    """Metrics off: the chain then does not even read the clock."""
    return NoOpCollector()


class _BuiltinExporters:
    """cachechain's own plugin: the built-in exporters, registered like any other."""

    @hookimpl
    def cachechain_register_exporters(self, registry: ExporterRegistry) -> None:
        registry.add(
            "prometheus",
            _prometheus_factory,
            description="Prometheus metrics through prometheus-client (cachechain[prometheus])",
        )
        registry.add(
            "memory",
            _memory_factory,
            description="In-process counters and latency histograms, for tests and demos",
        )
        registry.add("none", _none_factory, description="No metrics, at no cost")


# -- the shared manager -------------------------------------------------------------------

_manager: ExporterManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> ExporterManager:
    """Return the process-wide :class:`ExporterManager`, creating it on first use."""
    global _manager
    manager = _manager
    if manager is None:
        with _manager_lock:
            if _manager is None:
                _manager = ExporterManager()
            manager = _manager
    return manager


def reset_exporters() -> None:
    """Forget the discovered plugins; the next use scans the entry points again (for
    tests, or after installing a plugin in a running process)."""
    global _manager
    with _manager_lock:
        _manager = None


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object or module (with a ``cachechain_register_exporters``
    hook implementation) without an entry point; return its name.

    Raises ``ValueError`` when it is registered already, and what its hook raises.
    """
    return get_manager().register(plugin, name)


def available_exporters() -> list[ExporterInfo]:
    """Return the usable exporters, sorted by name (loading the plugins on first use)."""
    return list(get_manager().report().exporters)


def exporter_report() -> ExporterReport:
    """Return the usable exporters, the conflicting names and the plugins that failed."""
    return get_manager().report()


def create_exporter(spec: Any = None, *, environ: Mapping[str, str] | None = None) -> Any:
    """Build a metrics collector from a declarative ``spec``.

    ``spec`` is one of:

    - an exporter name: ``"statsd"``, ``"prometheus"``, ``"memory"``, ``"none"``;
    - ``"package.module:attr"``: a collector class or factory (called with the
      options), or a collector instance (no options);
    - a mapping ``{"exporter": NAME, "options": {...}}``;
    - a list of the above: every collector gets every metric (fan-out);
    - a collector object, returned as it is;
    - ``None``: the :data:`ENV_VAR` environment variable (in ``environ``, default
      ``os.environ``) names the exporter(s), comma-separated; unset means none.

    ``none`` gives a :class:`~cachechain.metrics.NoOpCollector` (metrics off, at no
    cost). Raises :class:`UnknownExporterError`, :class:`ExporterConflictError`, or
    :class:`~cachechain.errors.ConfigError` naming the field for a bad spec or option.
    """
    return get_manager().create(spec, environ=environ)
