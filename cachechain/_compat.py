"""Old import paths, kept for one release with a :class:`DeprecationWarning`.

Version 0.2 made the implementation modules private (``cachechain._chain``,
``cachechain.layers._memory``...) behind re-exporting packages, and gave each public
name one import path. Two kinds of old path still work until 0.3, both through a
module-level ``__getattr__`` made here, which returns the object and warns once per
call site, naming where the name lives now:

- each old module (``cachechain.chain``, ``cachechain.layers.memory``...) is a stub
  whose ``__getattr__`` is :func:`moved`;
- a package that used to export a name it no longer does (``cachechain.AsyncWriter``,
  ``cachechain.layers.MemoryLayer``...) gets its ``__getattr__`` from
  :func:`package_getattr`, which also serves the names a package loads lazily.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["moved", "package_getattr", "public_home"]

# The packages whose ``__all__`` is the public surface, in the order a name is looked
# up: the first that lists a name is its one import path.
_PUBLIC = (
    "cachechain",
    "cachechain.layers",
    "cachechain.metrics",
    "cachechain.exporters",
    "cachechain.testing",
)


def public_home(name: str) -> str | None:
    """The public module that exports ``name`` (``"cachechain"``...), or None when the
    name is internal."""
    for module_name in _PUBLIC:
        module = importlib.import_module(module_name)
        if name in getattr(module, "__all__", ()) or name in getattr(module, "_LAZY_EXPORTS", ()):
            return module_name
    return None


def _forward(old: str, name: str, module: str, target: str, *, stub: bool) -> Any:
    """Return ``module.target``, warning that ``old.name`` is deprecated (``stub``:
    the whole module ``old`` goes)."""
    value = getattr(importlib.import_module(module), target)  # AttributeError as usual
    home = public_home(target)
    if home is None:
        where = "it is internal and will go away"
    else:
        where = f"import it from {home}" + (f" as {target}" if target != name else "")
    warnings.warn(
        f"{old}.{name} is deprecated since cachechain 0.2 "
        + (f"(module {old} is removed in 0.3)" if stub else "and goes in 0.3")
        + f": {where}",
        DeprecationWarning,
        stacklevel=3,
    )
    return value


def moved(old: str, new: str, renamed: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the stub ``old``: attributes come from module
    ``new`` (under their new name where ``renamed`` maps one), each with a
    :class:`DeprecationWarning` that names their public home. Raises
    :class:`AttributeError` for a name ``new`` does not have."""
    renamed = dict(renamed or {})

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        return _forward(old, name, new, renamed.get(name, name), stub=True)

    return __getattr__


def package_getattr(
    package: str,
    deprecated: Mapping[str, str],
    lazy: Mapping[str, str] | None = None,
    stubs: Iterable[str] = (),
) -> Callable[[str], Any]:
    """A package ``__getattr__``: ``lazy`` maps names imported on first use to their
    module (no warning); ``deprecated`` maps names the package no longer exports to
    ``"module"`` or ``"module:attr"`` (a warning names their public home); ``stubs``
    are the package's deprecated 0.1 submodules, which 0.1 imported with the package
    (so ``cachechain.errors.ConfigError`` works after a bare ``import cachechain``;
    the stub's own ``__getattr__`` warns). Raises :class:`AttributeError` for any
    other name."""
    lazy = dict(lazy or {})
    deprecated = dict(deprecated)
    stubs = frozenset(stubs)

    def __getattr__(name: str) -> Any:
        if name in stubs:
            return importlib.import_module(f"{package}.{name}")
        if name in lazy:
            return getattr(importlib.import_module(lazy[name]), name)
        if name in deprecated:
            module, _, attr = deprecated[name].partition(":")
            return _forward(package, name, module, attr or name, stub=False)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
