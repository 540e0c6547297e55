"""The ``Chain.cached`` decorator: a function's results cached through ``get_or_load``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from ._load_policy import DEFAULT

__all__ = ["cached"]

P = ParamSpec("P")
R = TypeVar("R")


class _Loading(Protocol):
    def get_or_load(
        self,
        key: str,
        loader: Callable[[], Any],
        ttl: float | None = None,
        *,
        fail_safe: Any = ...,
        soft_timeout: Any = ...,
        hard_timeout: Any = ...,
        eager_refresh: Any = ...,
        lease: Any = ...,
    ) -> Any:
        """The cached value of ``key``, or ``loader()``'s, cached for ``ttl`` seconds
        (with the loader options of ``Chain.get_or_load``)."""

    def delete(self, key: str) -> bool:
        """Remove ``key`` from the cache."""


#: The names of ``get_or_load``'s loader options, in the order ``cached`` takes them.
_OPTIONS = ("fail_safe", "soft_timeout", "hard_timeout", "eager_refresh", "lease")


def cached(
    cache: _Loading,
    ttl: float | None,
    key: Callable[..., str] | None,
    prefix: str | None,
    options: tuple[Any, ...] = (),
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A decorator caching a function's results in ``cache`` for ``ttl`` seconds, under
    ``key(*args, **kwargs)`` or else ``prefix`` (default: the function's module and
    qualified name) followed by the ``repr`` of the arguments. ``options`` are the
    values of ``fail_safe``, ``soft_timeout``, ``hard_timeout``, ``eager_refresh`` and
    ``lease`` given to every ``get_or_load`` (those left to the chain are not passed). The
    wrapper gains ``invalidate(*args, **kwargs)`` and ``cache_key(*args, **kwargs)``."""
    given = {n: v for n, v in zip(_OPTIONS, options, strict=False) if v is not DEFAULT}

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        base = prefix if prefix is not None else f"{fn.__module__}.{fn.__qualname__}"

        def make_key(*args: Any, **kwargs: Any) -> str:
            if key is not None:
                return key(*args, **kwargs)
            parts = [repr(a) for a in args]
            parts += [f"{k}={v!r}" for k, v in sorted(kwargs.items())]
            return f"{base}({', '.join(parts)})"

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return cast(
                R,
                cache.get_or_load(
                    make_key(*args, **kwargs), lambda: fn(*args, **kwargs), ttl, **given
                ),
            )

        def invalidate(*args: Any, **kwargs: Any) -> None:
            cache.delete(make_key(*args, **kwargs))

        wrapper.invalidate = invalidate  # type: ignore[attr-defined]
        wrapper.cache_key = make_key  # type: ignore[attr-defined]
        return wrapper

    return decorate
