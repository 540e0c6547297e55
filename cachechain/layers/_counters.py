"""Counters: the arithmetic every layer's ``incr``/``decr`` shares, and memcached's form.

A counter is memcached's: an unsigned 64-bit number that ``incr`` adds to modulo 2**64
and ``decr`` subtracts from, stopping at 0. cachechain reads that number as a signed
64-bit one (two's complement), so a counter holds an ``int`` in ``[-2**63, 2**63)``:

- ``incr(delta)`` (``0 <= delta < 2**64``) adds ``delta`` modulo 2**64: past
  ``2**63 - 1`` it wraps to ``-2**63``, and ``incr(2**64 - d)`` subtracts ``d`` with no
  floor (how the chain's ``decr(..., floor=False)`` is made, natively on memcached);
- ``decr(delta)`` subtracts ``delta`` but never takes a counter that is not negative
  below 0 (memcached's own ``decr``); a negative counter just goes down.

A value that is not yet a counter becomes one on its first ``incr``/``decr`` when it is
an ``int`` (not a ``bool``) in that range, or a ``str`` of ASCII decimal digits (an
optional ``-`` first) in that range: ``set("n", "5")`` then ``incr("n")`` gives 6. Any
other value is refused with :class:`~cachechain.InvalidValueError`.

On memcached a counter is stored as the decimal digits of the unsigned number (what
memcached's ``incr`` works on) with the client flag :data:`COUNTER_FLAG` (2,
pymemcache's ``FLAG_INTEGER``), and carries no envelope, so no expiry of its own: the
layer reports its remaining TTL as unknown (``0.0``, see the layer contract).
:class:`RawCounter` marks such bytes between the wire and the layer.
"""

from __future__ import annotations

from typing import Any, Final

from .._errors import CorruptValueError, InvalidValueError

__all__ = [
    "COUNTER_FLAG",
    "COUNTER_FLAG_BYTES",
    "RawCounter",
    "check_delta",
    "countable",
    "decr_value",
    "incr_value",
    "raw",
    "read_raw",
]

#: memcached client flag of a stored counter (pymemcache's ``FLAG_INTEGER``).
COUNTER_FLAG: Final = 2
#: :data:`COUNTER_FLAG` as it appears in a ``VALUE`` reply line.
COUNTER_FLAG_BYTES: Final = b"2"

_MOD: Final = 1 << 64
_HALF: Final = 1 << 63
#: Longest decimal form of a counter: 20 digits, or a sign and 19.
_MAX_DIGITS: Final = 20


class RawCounter(bytes):
    """The bytes of a counter as memcached holds it (decimal digits of the unsigned
    number, maybe padded with spaces by memcached's ``decr``): what a read of a value
    with the :data:`COUNTER_FLAG` flag returns, and what a write stores with it."""

    __slots__ = ()


def raw(value: int) -> RawCounter:
    """The stored form of counter ``value`` (a signed 64-bit ``int``)."""
    return RawCounter(str(value % _MOD).encode("ascii"))


def read_raw(data: bytes) -> int:
    """The counter that memcached's bytes ``data`` hold, as a signed ``int``. Raises
    :class:`~cachechain.CorruptValueError` for anything but decimal digits (trailing
    spaces allowed) of a number below 2**64."""
    digits = bytes(data).rstrip(b" ")
    if not digits.isdigit() or len(digits) > _MAX_DIGITS or int(digits) >= _MOD:
        raise CorruptValueError(f"stored counter is not a 64-bit number: {bytes(data)[:40]!r}")
    unsigned = int(digits)
    return unsigned - _MOD if unsigned >= _HALF else unsigned


def check_delta(delta: object, field: str = "delta") -> int:
    """Return ``delta`` if it is an ``int`` (not a ``bool``) with ``0 <= delta <
    2**64``; raise :class:`~cachechain.InvalidValueError` naming ``field`` otherwise."""
    if isinstance(delta, bool) or not isinstance(delta, int) or not 0 <= delta < _MOD:
        raise InvalidValueError(f"{field} must be an int in [0, 2**64), got {delta!r}")
    return int(delta)


def countable(value: Any) -> int | None:
    """``value`` as a counter (a signed 64-bit ``int``), or None when it cannot be one:
    an ``int`` that is not a ``bool``, or a ``str`` of ASCII decimal digits with an
    optional ``-`` first, in ``[-2**63, 2**63)``."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int and not (isinstance(value, str) and _is_decimal(value)):
        return None
    number = int(value)
    return number if -_HALF <= number < _HALF else None


def _is_decimal(text: str) -> bool:
    body = text[1:] if text.startswith("-") else text
    return 0 < len(body) <= _MAX_DIGITS and body.isascii() and body.isdigit()


def incr_value(value: int, delta: int) -> int:
    """``value + delta`` modulo 2**64, as a signed 64-bit ``int`` (memcached's ``incr``
    read as two's complement)."""
    unsigned = (value + delta) % _MOD
    return unsigned - _MOD if unsigned >= _HALF else unsigned


def decr_value(value: int, delta: int) -> int:
    """memcached's ``decr`` of ``value`` by ``delta`` on the unsigned form: a counter
    that is not negative stops at 0; a negative one goes down (modulo 2**64)."""
    unsigned = max(value % _MOD - delta, 0)
    return unsigned - _MOD if unsigned >= _HALF else unsigned
