"""Old import paths, kept for one release with a :class:`DeprecationWarning`.

Version 0.2 made the implementation modules private (``cachechain._chain``,
``cachechain.layers._memory``...) behind re-exporting packages. Each old module
(``cachechain.chain``, ``cachechain.layers.memory``...) is now a stub whose module-level
``__getattr__`` comes from :func:`moved`: it returns the name from its new module and
warns once per name, saying where the name lives now. The stubs go in 0.3.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved", "public_home"]

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
        if name in getattr(module, "__all__", ()):
            return module_name
    return None


def moved(old: str, new: str, renamed: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the stub ``old``: attributes come from module
    ``new`` (under their new name where ``renamed`` maps one), each with a
    :class:`DeprecationWarning` that names their public home. Raises
    :class:`AttributeError` for a name ``new`` does not have."""
    renamed = dict(renamed or {})

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        target = renamed.get(name, name)
        value = getattr(importlib.import_module(new), target)  # AttributeError as usual
        home = public_home(target)
        if target != name and home:
            home = f"{home} as {target}"
        where = f"import it from {home}" if home else "it is internal and will go away"
        warnings.warn(
            f"{old}.{name} is deprecated since cachechain 0.2 ({old} is removed in 0.3): {where}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__
