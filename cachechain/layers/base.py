"""Deprecated alias of ``cachechain.layers._base`` (moved in 0.2, removed in 0.3).

Import public names from the package that exports them (see :mod:`cachechain`).
"""

from .._compat import moved

__getattr__ = moved("cachechain.layers.base", "cachechain.layers._base")
