"""LayerProxy: a cache layer that hands the whole layer contract to another layer.

A wrapper (a circuit breaker, a fault injector, a call recorder) subclasses
:class:`LayerProxy` and overrides only what it changes. Every data operation goes
through one method, :meth:`LayerProxy._forward`, so a wrapper that acts around each
call (check a fault, time it, count it) overrides that alone.

Only the :class:`~cachechain.layers.CacheLayer` contract is forwarded: the optional
capabilities (:class:`~cachechain.layers.SupportsTimeout`,
:class:`~cachechain.layers.SupportsStats`, :class:`~cachechain.layers.SupportsClear`,
and the atomic :class:`~cachechain.layers.SupportsAdd`,
:class:`~cachechain.layers.SupportsCounters`, :class:`~cachechain.layers.SupportsTouch`)
and :class:`~cachechain.layers.SupportsLease`) are not, so a proxy has one only when
its own class says so (the chain's breaker and namespace wrappers forward the atomic
ones and the lease).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from .._errors import ConfigError
from ._base import CacheLayer

__all__ = ["LayerProxy"]

T = TypeVar("T")


class LayerProxy:
    """A :class:`~cachechain.layers.CacheLayer` that forwards every call to ``layer``.

    ``name``, ``local`` and ``max_ttl`` are the wrapped layer's; ``get``,
    ``get_with_ttl``, ``get_many``, ``get_many_with_ttl``, ``set``, ``set_many``,
    ``delete`` and ``delete_many`` run through :meth:`_forward`; ``close`` closes the
    wrapped layer directly. Each returns, and raises, what the wrapped layer does.

    Raises :class:`~cachechain.ConfigError` when ``layer`` does not implement
    :class:`~cachechain.layers.CacheLayer`.
    """

    def __init__(self, layer: CacheLayer) -> None:
        if not isinstance(layer, CacheLayer):
            raise ConfigError(f"layer must implement CacheLayer, got {layer!r}")
        self._layer = layer

    def _forward(self, method: Callable[..., T], *args: Any) -> T:
        """Run one operation: ``method`` is the wrapped layer's bound method (its
        ``__name__`` says which), ``args`` the caller's arguments. The default just
        calls it; override to act around every operation, and return what the
        operation returns."""
        return method(*args)

    @property
    def layer(self) -> CacheLayer:
        """The wrapped layer."""
        return self._layer

    @property
    def name(self) -> str:
        """The wrapped layer's name."""
        return self._layer.name

    @property
    def local(self) -> bool:
        """The wrapped layer's ``local`` flag."""
        return self._layer.local

    @property
    def max_ttl(self) -> float | None:
        """The wrapped layer's TTL cap in seconds (``None``: no cap)."""
        return self._layer.max_ttl

    def get(self, key: str) -> Any:
        """Return the value under ``key``, or :data:`~cachechain.MISSING`."""
        return self._forward(self._layer.get, key)

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """Return ``(value, remaining_ttl_seconds_or_None)``, or ``(MISSING, None)``."""
        return self._forward(self._layer.get_with_ttl, key)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Return the hits among ``keys``; misses are absent."""
        return self._forward(self._layer.get_many, keys)

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Return the hits among ``keys`` with their remaining TTLs (seconds)."""
        return self._forward(self._layer.get_many_with_ttl, keys)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (``None``: the layer's default)."""
        self._forward(self._layer.set, key, value, ttl)

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store every item the layer can; return the keys it rejected as invalid."""
        return self._forward(self._layer.set_many, items, ttl)

    def delete(self, key: str) -> None:
        """Remove ``key``; an absent key is not an error."""
        self._forward(self._layer.delete, key)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key in ``keys``."""
        self._forward(self._layer.delete_many, keys)

    def close(self) -> None:
        """Close the wrapped layer (not through :meth:`_forward`). Idempotent when the
        wrapped layer's ``close`` is."""
        self._layer.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._layer!r}>"
