"""Tools of the declarative configuration: messages that name their field, objects named
by a ``"package.module:attr"`` path, and the keyword options a factory accepts.

Shared by the settings loader (layers, codecs), the ``metrics`` spec parser and the
exporters, so that every config error reads the same: it starts with the path of the
field (``layers[1].timeout must be ...``, ``metrics.options.port must be ...``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from ._errors import ConfigError

__all__ = ["describe", "import_path", "keyword_options", "reject_unknown", "with_field"]


def describe(exc: BaseException) -> str:
    """``"TypeName: message"``: an exception as a config message quotes it."""
    return f"{type(exc).__name__}: {exc}"


def with_field(prefix: str, message: str, fields: Iterable[str]) -> str:
    """Prefix ``message`` with the config path: ``prefix.field ...`` when it starts with
    the name of one of ``fields``, else ``prefix: ...``."""
    for name in sorted(fields, key=len, reverse=True):
        if message.startswith(name) and message[len(name) : len(name) + 1] in (" ", ".", "[", ":"):
            return f"{prefix}.{message}"
    return f"{prefix}: {message}"


def reject_unknown(
    path: str, mapping: Mapping[Any, Any], allowed: Sequence[str], what: str
) -> None:
    """Raise :class:`~cachechain.ConfigError` for the first key of ``mapping`` not in
    ``allowed``: ``"path.key is not a WHAT (settings: a, b)"``."""
    for key in mapping:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where} is not a {what} (settings: {', '.join(allowed)})")


def import_path(path: str, field: str) -> Any:
    """Import ``"package.module:attr"`` (``attr`` may be dotted) and return the object.

    Raises :class:`~cachechain.ConfigError` prefixed with ``field`` for a malformed
    path, a module that fails to import (quoting its error) or a missing attribute.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{field}: {path!r} must look like 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"{field}: cannot import module {module_name!r} of {path!r}: {describe(exc)}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"{field}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    return obj


def keyword_options(
    factory: Callable[..., Any], hidden: Collection[str] = ()
) -> tuple[list[str], bool]:
    """The option names ``factory`` accepts by keyword (less ``hidden``), and whether it
    takes any keyword at all (``**kwargs``, or a signature Python cannot read)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - a callable without a signature
        return [], True
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    names = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in hidden
    ]
    return names, open_ended
