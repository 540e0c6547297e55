"""Metrics exporters by name: cachechain's own, and the collector a ``metrics`` spec asks for.

An *exporter* is a factory that builds a :class:`~cachechain.metrics.MetricsCollector`
from keyword options. Exporters have names (``prometheus``, ``memory``, ``none``,
``statsd``...) so that a configuration can pick one without importing anything.
Plugins provide them (:mod:`cachechain._plugins`: the hook, entry points, errors);
cachechain's own are registered by a plugin of cachechain's own, through the same hook.

:class:`ExporterManager` builds what a spec (parsed by :mod:`cachechain._exporter_spec`)
describes; the module's functions share one manager. Importing this module imports no
plugin: the first lookup loads every entry point, once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from typing import Any

from ._close import close_quietly
from ._declarative import describe, import_path, keyword_options, with_field
from ._errors import ConfigError
from ._exporter_spec import ExporterSpec, is_collector, parse_exporters
from ._plugins import (
    BUILTIN_PLUGIN,
    ENTRY_POINT_GROUP,
    ExporterInfo,
    ExporterPlugins,
    ExporterRegistry,
    hookimpl,
)
from .metrics._base import SEED_METHODS, NoOpCollector

__all__ = [
    "ENTRY_POINT_GROUP",  # also here for cachechain-statsd's tests
    "ExporterManager",
    "available_exporters",
    "create_exporter",
    "get_manager",
    "register_plugin",
    "reset_exporters",
]


# -- built-in exporters -------------------------------------------------------------------


def _prometheus_factory(
    namespace: str = "cache_chain",
    buckets: Sequence[float] | None = None,
    registry: Any = "default",
    multiprocess: bool | None = None,
    flush_interval: float = 1.0,
    sample_hits: int | None = None,
) -> Any:
    """Build a :class:`~cachechain.PrometheusCollector`.

    ``registry``: ``"default"`` (prometheus-client's global registry, which its HTTP
    server and WSGI app expose), ``None`` (none: call ``register`` yourself), a
    ``"module:attr"`` path to a ``CollectorRegistry``, or a registry object.
    ``multiprocess``, ``flush_interval`` (seconds) and ``sample_hits`` (one
    first-layer hit in that many is timed; ``None``: the collector's default) are
    passed on as they are.
    """
    try:
        from .metrics._prometheus import PrometheusCollector
    except ImportError as exc:
        raise ConfigError(
            "the prometheus exporter needs prometheus-client: "
            f"pip install 'cachechain[prometheus]' ({describe(exc)})"
        ) from exc
    if isinstance(registry, str):
        if registry == "default":
            from prometheus_client import REGISTRY

            registry = REGISTRY
        else:
            registry = import_path(registry, "registry")
    kwargs: dict[str, Any] = {"buckets": buckets} if buckets is not None else {}
    if sample_hits is not None:
        kwargs["sample_hits"] = sample_hits
    return PrometheusCollector(
        namespace,
        registry=registry,
        multiprocess=multiprocess,
        flush_interval=flush_interval,
        **kwargs,
    )


def _memory_factory(sample_hits: int | None = None) -> Any:
    """Build a :class:`~cachechain.MemoryCollector` (``sample_hits``: one first-layer
    hit in that many is timed; ``None``: the collector's default, 1: every hit)."""
    from .metrics._memory import MemoryCollector

    if sample_hits is None:
        return MemoryCollector()
    return MemoryCollector(sample_hits=sample_hits)


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


def _cachechain_version() -> str:
    try:
        return metadata.version("cachechain")
    except metadata.PackageNotFoundError:  # running from a source tree
        from . import __version__

        return __version__


# -- building collectors ------------------------------------------------------------------


class ExporterManager(ExporterPlugins):
    """The exporters by name: the plugins (with cachechain's own exporters when
    ``builtins``), and :meth:`create`, which builds the collector a spec describes.

    ``entry_points`` returns the entry points to load (default: those of the group
    ``cachechain.exporters`` in the installed distributions). Thread-safe. Most code uses
    the module's functions, which share one manager (:func:`get_manager`).
    """

    def __init__(
        self,
        *,
        entry_points: Callable[[], Iterable[Any]] | None = None,
        builtins: bool = True,
    ) -> None:
        super().__init__(entry_points=entry_points)
        if builtins:
            self.register(
                _BuiltinExporters(),
                BUILTIN_PLUGIN,
                distribution="cachechain",
                version=_cachechain_version(),
            )

    def create(
        self,
        spec: Any = None,
        *,
        environ: Mapping[str, str] | None = None,
        borrowed: list[Any] | None = None,
    ) -> Any:
        """Build the collector that ``spec`` describes; see :func:`create_exporter` and
        :meth:`build`."""
        return self.build(parse_exporters(spec, environ=environ), borrowed=borrowed)

    def build(self, specs: Iterable[ExporterSpec], *, borrowed: list[Any] | None = None) -> Any:
        """Build the collector of parsed ``specs``: none gives a
        :class:`~cachechain.metrics.NoOpCollector`, several a
        :class:`~cachechain.FanoutCollector`. If one fails, those made before it are
        closed again. ``borrowed``, when given, receives every collector object handed
        over as it is (an object, or a ``"module:attr"`` naming an instance) rather than
        made here: such a collector may serve others, so its user must not close it.
        Raises the errors listed by :func:`create_exporter`.
        """
        made: list[Any] = []
        mine: list[Any] = []  # the collectors handed over as they are: never closed here
        try:
            for one in specs:
                made.append(self._create_one(one, mine))
        except BaseException:
            for collector in made:
                if not any(collector is b for b in mine):
                    close_quietly(collector)
            raise
        if borrowed is not None:
            borrowed.extend(mine)
        if len(made) == 1:
            return made[0]
        active = [c for c in made if type(c) is not NoOpCollector]
        if len(active) < 2:
            return active[0] if active else NoOpCollector()
        from .metrics._fanout import FanoutCollector

        return FanoutCollector(*active)

    def _create_one(self, spec: ExporterSpec, borrowed: list[Any]) -> Any:
        target = spec.target
        if not isinstance(target, str):  # a collector object
            borrowed.append(target)
            return target
        field = f"{spec.field}.exporter"
        if ":" not in target:
            return _call_factory(self.get(target, field=field).factory, spec, target)
        obj = import_path(target, field)
        if callable(obj) and not is_collector(obj):
            return _call_factory(obj, spec, target)
        if spec.options:
            raise ConfigError(
                f"{spec.field}.options: {target!r} is a collector instance, which takes no "
                f"options; point at a class or factory instead"
            )
        if not is_collector(obj):
            raise ConfigError(
                f"{field}: {target!r} is neither a collector nor a callable that returns one"
            )
        borrowed.append(obj)
        return obj


def _call_factory(factory: Callable[..., Any], spec: ExporterSpec, label: str) -> Any:
    """``factory(**spec.options)``, checked: the options it accepts, what it raises, and
    that it returns a collector (what it returned is closed again if not)."""
    field, options = spec.field, spec.options
    accepted, open_ended = keyword_options(factory)
    for key in options:
        if key not in accepted and not open_ended:
            listed = ", ".join(accepted) or "none"
            raise ConfigError(
                f"{field}.options.{key} is not an option of exporter {label!r} (options: {listed})"
            )
    try:
        collector = factory(**options)
    except (ValueError, TypeError) as exc:  # ConfigError included: a bad option
        raise ConfigError(with_field(f"{field}.options", str(exc), options)) from exc
    except Exception as exc:
        raise ConfigError(
            f"{field}: exporter {label!r} could not be created: {describe(exc)}"
        ) from exc
    if not is_collector(collector):
        close_quietly(collector)
        missing = [m for m in SEED_METHODS if not callable(getattr(collector, m, None))]
        raise ConfigError(
            f"{field}: exporter {label!r} returned {collector!r}, which is not a "
            f"metrics collector (it lacks {', '.join(missing)})"
        )
    return collector


# -- the shared manager -------------------------------------------------------------------

_manager: ExporterManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> ExporterManager:
    """Return the process-wide :class:`ExporterManager`, creating it on first use."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = ExporterManager()
        return _manager


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
    """Return the usable exporters, sorted by name (loading the plugins on first use).

    A name that two plugins claim is left out (``cachechain plugins`` lists it)."""
    return list(get_manager().report().exporters)


def create_exporter(spec: Any = None, *, environ: Mapping[str, str] | None = None) -> Any:
    """Build a metrics collector from a declarative ``spec``.

    ``spec`` is one of:

    - an exporter name: ``"statsd"``, ``"prometheus"``, ``"memory"``, ``"none"``;
    - ``"package.module:attr"``: a collector class or factory (called with the
      options), or a collector instance (no options);
    - a mapping ``{"exporter": NAME, "options": {...}}``;
    - a list of the above: every collector gets every metric (fan-out);
    - a collector object, returned as it is;
    - ``None``: the ``CACHECHAIN_EXPORTER`` environment variable (in ``environ``,
      default ``os.environ``) names the exporter(s), comma-separated; unset means none.

    ``none`` gives a :class:`~cachechain.metrics.NoOpCollector` (metrics off, at no
    cost). Loads the plugins on first use. Raises
    :class:`~cachechain.exporters.UnknownExporterError`,
    :class:`~cachechain.exporters.ExporterConflictError`, or
    :class:`~cachechain.ConfigError` naming the field for a bad spec or option.
    """
    return get_manager().create(spec, environ=environ)
