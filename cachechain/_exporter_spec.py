"""The ``metrics`` setting, parsed: which exporters a configuration asks for.

Part of the settings code. The value is one of: an exporter name (``"statsd"``), a
``"package.module:attr"`` path, a mapping ``{"exporter": ..., "options": {...}}``, a
list of those (fan-out), a collector object, or ``None``: then the ``CACHECHAIN_EXPORTER``
environment variable names the exporter(s), comma-separated, and unset means none.
:func:`parse_exporters` checks its shape and returns one :class:`ExporterSpec` per
exporter; nothing is imported or created here (see :mod:`cachechain._exporters`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._declarative import reject_unknown
from ._errors import ConfigError
from .metrics._base import SEED_METHODS, MetricsCollector

__all__ = ["ENV_VAR", "ExporterSpec", "is_collector", "parse_exporters"]

#: The environment variable naming the exporter(s) when a configuration names none.
ENV_VAR = "CACHECHAIN_EXPORTER"


@dataclass(frozen=True)
class ExporterSpec:
    """One exporter a configuration asks for.

    ``field`` is its path in messages (``metrics``, ``metrics[1]``,
    ``CACHECHAIN_EXPORTER``); ``target`` is an exporter name (stripped, lower-case), a
    ``"module:attr"`` path, or a collector object handed over as it is; ``options`` are
    the keyword options of the exporter's factory.
    """

    field: str
    target: Any
    options: Mapping[str, Any]


def is_collector(obj: Any) -> bool:
    """Whether ``obj`` is a metrics collector: a :class:`~cachechain.metrics.MetricsCollector`
    or an object (not a class) with every method of the seed's collector."""
    if isinstance(obj, MetricsCollector):
        return True
    if isinstance(obj, type):
        return False
    return all(callable(getattr(obj, m, None)) for m in SEED_METHODS)


def parse_exporters(
    spec: Any, *, environ: Mapping[str, str] | None = None, field: str = "metrics"
) -> tuple[ExporterSpec, ...]:
    """Check the ``metrics`` value ``spec`` and return the exporters it asks for, in
    order (none: metrics off).

    ``environ`` (default ``os.environ``) is read for :data:`ENV_VAR` when ``spec`` is
    ``None``. Raises :class:`~cachechain.ConfigError` naming the field of a value of the
    wrong shape.
    """
    if spec is None:
        env = os.environ if environ is None else environ
        names = [n.strip() for n in env.get(ENV_VAR, "").split(",") if n.strip()]
        if len(names) == 1:
            return (_one(names[0], ENV_VAR),)
        spec, field = names, ENV_VAR
    if not isinstance(spec, (list, tuple)):
        return (_one(spec, field),)
    specs = []
    for index, item in enumerate(spec):
        if item is None or isinstance(item, (list, tuple)):
            raise ConfigError(
                f"{field}[{index}] must be an exporter name, a mapping or a collector, got {item!r}"
            )
        specs.append(_one(item, f"{field}[{index}]"))
    return tuple(specs)


def _one(spec: Any, field: str) -> ExporterSpec:
    if isinstance(spec, str):
        return ExporterSpec(field, _target(spec), {})
    if isinstance(spec, Mapping):
        return _from_mapping(spec, field)
    if is_collector(spec):
        return ExporterSpec(field, spec, {})
    raise ConfigError(
        f"{field} must be an exporter name, a mapping like "
        f"{{'exporter': 'statsd', 'options': {{...}}}}, a list of those, or a collector; "
        f"got {spec!r}"
    )


def _target(name: str) -> str:
    """Exporter names are case-insensitive; ``module:attr`` paths are not."""
    name = name.strip()
    return name if ":" in name else name.lower()


def _from_mapping(spec: Mapping[Any, Any], field: str) -> ExporterSpec:
    reject_unknown(field, spec, ("exporter", "options"), "metrics setting")
    name = spec.get("exporter")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"{field}.exporter must be an exporter name or 'module:attr', got {name!r}"
        )
    options = spec.get("options")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{field}.options must be a mapping, got {options!r}")
    for key in options:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"{field}.options keys must be option names, got {key!r}")
    return ExporterSpec(field, _target(name), dict(options))
