"""Argument checks, one wording for the whole library.

Every check returns the value normalised (``float`` seconds, ``int`` counts) or raises
with a message that names the field: ``"timeout must be a finite number of seconds > 0,
got -1"``. Settings errors raise :class:`~cachechain.ConfigError` (``error=`` lets a
caller raise another type, for example :class:`ValueError` for a call argument).
``bool`` is never a number here, although Python says it is an ``int``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import TypeVar

from ._errors import ConfigError, InvalidKeyError

T = TypeVar("T")

__all__ = [
    "check_callable",
    "check_count",
    "check_key",
    "check_optional_seconds",
    "check_positive",
    "check_positive_int",
    "check_rate",
    "check_seconds",
    "check_ttl",
]


def check_seconds(
    value: object,
    field: str,
    *,
    zero_ok: bool = False,
    none_ok: bool = False,
    error: type[Exception] = ConfigError,
) -> float:
    """Return ``value`` as a finite ``float`` number of seconds ``> 0`` (``>= 0`` when
    ``zero_ok``). Raises ``error`` naming ``field`` otherwise. For a ``None`` that is
    allowed, use :func:`check_optional_seconds`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        tail = " or None" if none_ok else ""
        raise error(f"{field} must be a number of seconds{tail}, got {value!r}")
    bound = ">= 0" if zero_ok else "> 0"
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_ok):
        tail = " or None" if none_ok else ""
        raise error(f"{field} must be a finite number of seconds {bound}{tail}, got {value!r}")
    return seconds


def check_optional_seconds(
    value: object, field: str, *, zero_ok: bool = False, error: type[Exception] = ConfigError
) -> float | None:
    """``None``, or ``value`` checked by :func:`check_seconds`."""
    if value is None:
        return None
    return check_seconds(value, field, zero_ok=zero_ok, none_ok=True, error=error)


def check_ttl(
    ttl: object, field: str = "ttl", *, error: type[Exception] = ConfigError
) -> float | None:
    """Return a TTL in seconds: ``None`` (the layer's default) or ``ttl`` as a finite
    ``float > 0``. Raises ``error`` (:class:`~cachechain.ConfigError` by default) naming
    ``field`` for anything else: a non-number, ``bool``, ``nan``, ``inf``, zero or a
    negative number."""
    return check_optional_seconds(ttl, field, error=error)


def check_count(
    value: object, field: str, *, minimum: int = 1, error: type[Exception] = ConfigError
) -> int:
    """Return ``value`` if it is an ``int >= minimum``; raise ``error`` naming ``field``
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(f"{field} must be an int >= {minimum}, got {value!r}")
    return value


def check_rate(value: object, field: str, *, error: type[Exception] = ConfigError) -> float | None:
    """``None``, or ``value`` as a ``float`` share in ``(0, 1]``; raise ``error`` naming
    ``field`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise error(f"{field} must be in (0, 1] or None, got {value!r}")
    return float(value)


def check_positive_int(value: object, field: str, *, error: type[Exception] = ConfigError) -> int:
    """Return ``value`` if it is an ``int > 0``; raise ``error`` naming ``field``
    otherwise. The same test as :func:`check_count` with ``minimum=1``, worded as the
    config dataclasses word it (``"breaker.window must be an int > 0, got 0"``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{field} must be an int > 0, got {value!r}")
    return value


def check_positive(value: object, field: str, *, error: type[Exception] = ConfigError) -> float:
    """Return ``value`` as a finite ``float > 0``, for a quantity that is not a duration
    (an exponent, a factor). Raises ``error`` naming ``field`` otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if 0 < number < math.inf:
            return number
    raise error(f"{field} must be a finite number > 0, got {value!r}")


def check_callable(value: T, field: str, *, error: type[Exception] = ConfigError) -> T:
    """Return ``value`` if it is callable (a clock, a listener); raise ``error`` naming
    ``field`` otherwise."""
    if not callable(value):
        raise error(f"{field} must be callable, got {value!r}")
    return value


def check_key(key: object) -> None:
    """Raise :class:`~cachechain.InvalidKeyError` unless ``key`` is a ``str``."""
    if type(key) is not str and not isinstance(key, str):
        if isinstance(key, Hashable):
            raise InvalidKeyError(f"cache keys must be str, got {type(key).__name__}: {key!r}")
        raise InvalidKeyError(f"cache keys must be str, got unhashable {type(key).__name__}")
