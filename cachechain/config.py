"""Deprecated alias of ``cachechain._config`` (moved in 0.2, removed in 0.3).

Import public names from the package that exports them (see :mod:`cachechain`).
"""

from ._compat import moved

__getattr__ = moved("cachechain.config", "cachechain._config")
