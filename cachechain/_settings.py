"""Declarative configuration: a plain mapping (Django settings, TOML, JSON) -> ChainConfig.

The mapping describes a whole chain::

    CACHECHAIN = {
        "name": "web",
        "layers": [
            {"type": "memory", "name": "L1", "maxsize": 10_000, "default_ttl": 30},
            {
                "type": "memcached", "name": "L2",
                "servers": ["10.0.0.5:11211", "10.0.0.6:11211"],
                "key_prefix": "shop:", "timeout": 0.1, "connect_timeout": 0.1,
                "breaker": {"max_failures": 5, "reset_timeout": 10},
                "writer": {"queue_size": 1000}, "write_behind": False,
            },
        ],
        "breaker": {"max_failures": 5, "reset_timeout": 10.0},   # defaults of every layer
        "writer": {"queue_size": 1000, "max_wait": 0.0, "workers": 1},
        "coherence": {"bound": 0.1},        # or True (the default) / False
        "load": {"fail_safe": True, "soft_timeout": 0.1, "eager_refresh": 0.8},
        "metrics": {"exporter": "statsd", "options": {"host": "127.0.0.1"}},
    }

Top-level keys: ``name`` (default ``"default"``), ``layers`` (required, fastest
first), ``breaker`` and ``writer`` (the defaults, see
:class:`~cachechain.BreakerConfig` and :class:`~cachechain.WriterConfig`),
``coherence`` (``True``, the default, ``False``, or the fields of
:class:`~cachechain.CoherenceConfig`), ``load`` (the fields of
:class:`~cachechain.LoadConfig`: the defaults of ``get_or_load`` and ``cached``,
fail-safe, loader timeouts, eager refresh) and ``metrics`` (see
:func:`cachechain.exporters.create_exporter`: a name, a ``{"exporter": ...,
"options": ...}`` mapping, a ``"module:attr"`` path or a list of them for fan-out;
absent or ``None``: the ``CACHECHAIN_EXPORTER`` environment variable decides, and
metrics are off when it is unset).

Each layer: ``type`` (``memory``, ``memcached``, or ``"package.module:Class"`` for a
layer class of your own, called with ``name`` and the options), ``name`` (default
``L1``, ``L2``... by position), the layer's own options (the keyword arguments of its
class: for example ``maxsize``, ``default_ttl``, ``servers``, ``timeout``), and the
chain's settings for it: ``resilient``, ``breaker``, ``call_timeout`` (the
:class:`~cachechain.LayerConfig` ``timeout``: the longest a call may take,
seconds), ``write_behind`` and ``writer``. A memcached ``codec`` is ``"json"``,
``"tagged_json"``, ``{"type": "signed_pickle", "secret": "..."}`` or ``"package.module:attr"``.

Every error is a :class:`~cachechain.ConfigError` whose message starts with the
path of the field: ``layers[1].timeout must be a number of seconds > 0, got -1``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ._close import close_quietly
from ._config import (
    BreakerConfig,
    ChainConfig,
    CoherenceConfig,
    LayerConfig,
    LoadConfig,
    WriterConfig,
)
from ._declarative import import_path, keyword_options, reject_unknown, with_field
from ._errors import ConfigError
from ._exporter_spec import ExporterSpec, parse_exporters
from ._exporters import get_manager
from ._validate import check_optional_seconds

__all__ = ["LAYER_TYPES", "chain_config_from_file", "chain_config_from_mapping"]

_TOP_KEYS = ("name", "layers", "breaker", "writer", "coherence", "load", "metrics")
_CHAIN_LAYER_KEYS = (
    "type",
    "name",
    "resilient",
    "breaker",
    "call_timeout",
    "write_behind",
    "writer",
)
#: Constructor parameters that make no sense in a declarative config.
_HIDDEN = frozenset({"self", "name", "clock", "monotonic"})


def _memory_layer() -> Callable[..., Any]:
    from .layers._memory import MemoryLayer

    return MemoryLayer


def _memcached_layer() -> Callable[..., Any]:
    from .layers._memcached import MemcachedLayer

    return MemcachedLayer


#: The built-in layer types, by the name a config gives in ``type``.
LAYER_TYPES: Mapping[str, Callable[[], Callable[..., Any]]] = {
    "memory": _memory_layer,
    "memcached": _memcached_layer,
}


def chain_config_from_mapping(
    mapping: Mapping[str, Any], *, environ: Mapping[str, str] | None = None
) -> ChainConfig:
    """Validate ``mapping`` and build the :class:`~cachechain.ChainConfig` it
    describes, with its layers and metrics collector created.

    ``environ`` (default ``os.environ``) is read for ``CACHECHAIN_EXPORTER`` when the
    mapping names no exporter. Everything is validated before anything with a thread
    or socket is made; if a later step fails, what was made is closed again. The chain
    owns (closes) the collector only when the mapping made it: a collector object, or a
    ``"module:attr"`` naming one, may serve other chains and is never closed. Raises
    :class:`~cachechain.ConfigError` naming the field, and its subclasses
    :class:`~cachechain.exporters.UnknownExporterError` and
    :class:`~cachechain.exporters.ExporterConflictError`.
    """
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"a chain config must be a mapping, got {type(mapping).__name__}")
    reject_unknown("", mapping, _TOP_KEYS, "chain setting")
    name = mapping.get("name", "default")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name must be a non-empty str, got {name!r}")
    breaker = _dataclass_from(BreakerConfig, mapping.get("breaker"), "breaker", "")
    writer = _dataclass_from(WriterConfig, mapping.get("writer"), "writer", "")
    coherence = _coherence(mapping.get("coherence", True))
    load = _dataclass_from(LoadConfig, mapping.get("load"), "load", "")
    plans = _plan_layers(mapping.get("layers"))
    exporters = parse_exporters(mapping.get("metrics"), environ=environ)
    layers, collector, owned = _build(plans, exporters)
    return ChainConfig(
        layers=layers,
        name=name,
        metrics_collector=collector,
        breaker=breaker,
        writer=writer,
        coherence=coherence,
        owns_collector=owned,
        load=load,
    )


def _coherence(value: Any) -> CoherenceConfig:
    """The ``coherence`` setting: a bool or a mapping of :class:`CoherenceConfig` fields."""
    if isinstance(value, bool):
        return CoherenceConfig.of(value)
    return _dataclass_from(CoherenceConfig, value, "coherence", "")  # type: ignore[no-any-return]


def chain_config_from_file(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> ChainConfig:
    """Read a chain config from a ``.json`` or ``.toml`` file (TOML needs Python 3.11+
    or the ``tomli`` package) and build it with :func:`chain_config_from_mapping`.

    A TOML file may hold the chain at the top level or in a ``[cachechain]`` table.
    Raises :class:`~cachechain.ConfigError` for a file that cannot be read or
    parsed, or a bad value; ``OSError`` propagates for a missing file.
    """
    file = Path(path)
    text = file.read_text(encoding="utf-8")
    data: Any
    try:
        if file.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{file}: not valid {file.suffix or 'JSON'}: {exc}") from exc
    if isinstance(data, Mapping) and "layers" not in data and "cachechain" in data:
        data = data["cachechain"]
    return chain_config_from_mapping(data, environ=environ)


# -- helpers ------------------------------------------------------------------------------


def _build(
    plans: Sequence[_LayerPlan], exporters: Sequence[ExporterSpec]
) -> tuple[list[LayerConfig], Any, bool]:
    """Make the layers, then the collector; close the layers again if a step fails.
    Return them and whether the chain owns the collector (it made every part of it)."""
    built: list[LayerConfig] = []
    borrowed: list[Any] = []  # collector objects the mapping hands over: not the chain's
    try:
        for plan in plans:
            built.append(plan.build())
        collector = get_manager().build(exporters, borrowed=borrowed)
    except BaseException:
        for done in built:
            close_quietly(done.layer)
        raise
    return built, collector, not borrowed


def _dataclass_from(cls: Any, value: Any, field: str, prefix: str) -> Any:
    """Build a BreakerConfig/WriterConfig/CoherenceConfig/LoadConfig from a mapping
    (``None``: the defaults)."""
    path = f"{prefix}{field}"
    if value is None:
        return None if prefix else cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must be a mapping of {field} settings, got {value!r}")
    names = [f.name for f in fields(cls)]
    reject_unknown(path, value, names, f"{field} setting")
    try:
        return cls(**value)
    except ConfigError as exc:
        message = str(exc)
        if prefix and message.startswith(f"{field}."):
            message = prefix + message
        raise ConfigError(message) from exc


def _check_bool(value: Any, path: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        allowed = "true, false or null" if optional else "true or false"
        raise ConfigError(f"{path} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class _LayerPlan:
    """A validated layer entry, built later by :meth:`build`."""

    index: int
    name: str
    factory: Callable[..., Any]
    label: str
    options: dict[str, Any]
    settings: dict[str, Any]

    def build(self) -> LayerConfig:
        path = f"layers[{self.index}]"
        options = dict(self.options)
        if "codec" in options:
            options["codec"] = _codec(options["codec"], f"{path}.codec")
        try:
            layer = self.factory(self.name, **options)
        except ConfigError as exc:
            raise ConfigError(with_field(path, str(exc), ["name", *options])) from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: the {self.label} layer refused its options: {exc}") from exc
        try:
            return LayerConfig(layer=layer, **self.settings)
        except ConfigError as exc:
            close_quietly(layer)
            raise ConfigError(f"{path}: {exc}") from exc


def _plan_layers(raw: Any) -> list[_LayerPlan]:
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ConfigError(f"layers must be a list of layer mappings, got {raw!r}")
    if not raw:
        raise ConfigError("layers must list at least one layer")
    plans = [_plan_layer(index, entry) for index, entry in enumerate(raw)]
    seen: dict[str, int] = {}
    for plan in plans:
        if plan.name in seen:
            raise ConfigError(
                f"layers[{plan.index}].name {plan.name!r} is used by layers[{seen[plan.name]}] too"
            )
        seen[plan.name] = plan.index
    return plans


def _plan_layer(index: int, entry: Any) -> _LayerPlan:
    path = f"layers[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{path} must be a mapping with a 'type', got {entry!r}")
    kind = entry.get("type")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(
            f"{path}.type must be 'memory', 'memcached' or 'package.module:Class', got {kind!r}"
        )
    factory = _layer_factory(kind, path)
    name = entry.get("name", f"L{index + 1}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}.name must be a non-empty str, got {name!r}")
    options = _layer_options(entry, factory, kind, path)
    return _LayerPlan(index, name, factory, kind, options, _chain_settings(entry, path))


def _layer_factory(kind: str, path: str) -> Callable[..., Any]:
    """The class (or factory) of a layer ``type``: a built-in name or a path."""
    if ":" in kind:
        factory: Callable[..., Any] = import_path(kind, f"{path}.type")
        if not callable(factory):
            raise ConfigError(f"{path}.type: {kind!r} is not a class or callable")
        return factory
    if kind in LAYER_TYPES:
        return LAYER_TYPES[kind]()
    raise ConfigError(
        f"{path}.type must be one of {', '.join(repr(k) for k in LAYER_TYPES)} or "
        f"'package.module:Class', got {kind!r}"
    )


def _layer_options(
    entry: Mapping[Any, Any], factory: Callable[..., Any], kind: str, path: str
) -> dict[str, Any]:
    """The entry's options for the layer's constructor (all but the chain's settings)."""
    accepted, open_ended = keyword_options(factory, _HIDDEN)
    options: dict[str, Any] = {}
    for key, value in entry.items():
        if key in _CHAIN_LAYER_KEYS:
            continue
        if not isinstance(key, str) or (key not in accepted and not open_ended):
            listed = ", ".join([*_CHAIN_LAYER_KEYS, *accepted])
            raise ConfigError(
                f"{path}.{key} is not a setting of a {kind} layer (settings: {listed})"
            )
        options[key] = value
    return options


def _chain_settings(entry: Mapping[Any, Any], path: str) -> dict[str, Any]:
    """The entry's settings for the chain: the keyword arguments of its LayerConfig."""
    settings: dict[str, Any] = {}
    if "resilient" in entry:
        _check_bool(entry["resilient"], f"{path}.resilient", optional=True)
        settings["resilient"] = entry["resilient"]
    if "write_behind" in entry:
        _check_bool(entry["write_behind"], f"{path}.write_behind", optional=False)
        settings["write_behind"] = entry["write_behind"]
    timeout = entry.get("call_timeout")
    try:
        settings["timeout"] = check_optional_seconds(timeout, f"{path}.call_timeout")
    except ConfigError:  # worded for a config file: null, not None
        raise ConfigError(
            f"{path}.call_timeout must be a number of seconds > 0 or null, got {timeout!r}"
        ) from None
    settings["breaker"] = _dataclass_from(
        BreakerConfig, entry.get("breaker"), "breaker", f"{path}."
    )
    settings["writer"] = _dataclass_from(WriterConfig, entry.get("writer"), "writer", f"{path}.")
    return settings


def _codec(value: Any, path: str) -> Any:
    from ._codecs import JsonCodec, SignedPickleCodec, TaggedJsonCodec

    if isinstance(value, str) and ":" not in value:
        value = {"type": value}
    if isinstance(value, str):
        obj = import_path(value, path)
        return obj() if isinstance(obj, type) else obj
    if not isinstance(value, Mapping):
        return value  # a codec object, from a Python config
    kind = value.get("type")
    if kind == "json":
        reject_unknown(path, value, ("type",), "json codec setting")
        return JsonCodec()
    if kind == "tagged_json":
        reject_unknown(path, value, ("type",), "tagged_json codec setting")
        return TaggedJsonCodec()
    if kind != "signed_pickle":
        raise ConfigError(
            f"{path}.type must be 'json', 'tagged_json' or 'signed_pickle' (or give "
            f"'package.module:attr'), got {kind!r}"
        )
    reject_unknown(path, value, ("type", "secret"), "signed_pickle codec setting")
    secret = value.get("secret")
    if not isinstance(secret, str) or not secret:
        raise ConfigError(f"{path}.secret must be a non-empty str, got {secret!r}")
    try:
        return SignedPickleCodec(secret)
    except ConfigError as exc:
        raise ConfigError(with_field(path, str(exc), ["secret"])) from exc
