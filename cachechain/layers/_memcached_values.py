"""The values of :class:`~cachechain.MemcachedLayer`: envelopes in and out.

Every value is stored in a :class:`~cachechain._codecs.Envelope` of the layer's codec
(made once, with the layer: it knows whether the codec binds its payloads to a
context). A codec that signs gets the envelope's header and the memcached key as its
context, so a signed entry whose expiry was edited, or that was copied under another
key, reads as corrupt: counted in the layer's ``stats().corrupt_values``, a miss for
a chain.

The layer keeps stamped entries (``get_or_load``'s fail-safe copies,
:mod:`cachechain.layers._stamps`): a :class:`~cachechain.layers._stamps.Stamped`
value goes into a stamped envelope (memcached keeps it for the whole TTL, the header
says until when it is fresh), and reads see it only while it is fresh, unless the
thread reads stamps.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._codecs import EXPIRED, CorruptValueError, Envelope
from .._errors import InvalidValueError
from ._base import MISSING
from ._counters import RawCounter, read_raw
from ._stamps import Found, Stamped, stamps_wanted

__all__ = ["MemcachedValues", "exptime"]

#: memcached reads an expiry above 30 days (in seconds) as an absolute unix time.
_RELATIVE_EXPIRY_LIMIT = 30 * 24 * 3600
#: The largest absolute expiry memcached parses (a signed 32-bit time).
_MAX_ABSOLUTE_EXPIRY = 2**31 - 1


def exptime(ttl: float, expires_at: float) -> int:
    """memcached's exptime for an entry that lives ``ttl`` seconds, until unix time
    ``expires_at``: the TTL rounded up to whole seconds, or past 30 days the absolute
    time (0, no expiry, past 2038: the envelope still expires the entry)."""
    if ttl <= _RELATIVE_EXPIRY_LIMIT:
        return math.ceil(ttl)
    absolute = math.ceil(expires_at)
    return absolute if absolute <= _MAX_ABSOLUTE_EXPIRY else 0


class MemcachedValues:
    """Encoding and decoding for :class:`~cachechain.MemcachedLayer` (a base class of
    it), and the count of corrupt reads. The layer sets the attributes below."""

    _envelope: Envelope
    _max_value_size: int
    _clock: Callable[[], float]
    #: Takes :class:`~cachechain.layers._stamps.Stamped` values (see the module).
    keeps_stamps = True
    _stats_lock: threading.Lock
    _corrupt: int

    if TYPE_CHECKING:

        @property
        def name(self) -> str: ...

    def _decode(self, data: bytes, mkey: bytes, now: float) -> tuple[Any, float | None]:
        """Unpack an envelope read under ``mkey`` (a signed payload must be bound to it
        and to the header); ``(MISSING, None)`` if its expiry (a stamped entry's
        logical one) has passed. While the thread reads stamps, a stamped entry is
        ``(Found, physical seconds left)``, fresh or not, until its physical expiry. A counter
        is its ``int`` with an unknown remaining TTL, ``0.0``: it has no envelope, and
        ``0.0`` keeps the chain from copying it up for longer than it may live.
        Raises CorruptValueError, counted, for bytes that cannot be decoded. Empty
        bytes are a miss: the stub of a lease (the layer never stores them)."""
        plain = self._envelope.read_plain(data)  # the usual case, in one step
        if plain is not None:
            expires_at = plain[1]
            if expires_at is None:
                return plain
            if expires_at > now:
                return plain[0], expires_at - now
            return MISSING, None
        if not data:
            return MISSING, None
        try:
            if data.__class__ is RawCounter:
                return read_raw(data), 0.0
            value, expires_at, fresh_until, origin = self._envelope.read(data, mkey)
        except CorruptValueError as exc:
            self._corrupted(exc)
            raise
        if origin is not None and stamps_wanted():  # get_or_load's fail-safe read
            assert fresh_until is not None  # a stamped envelope has both
            left = None if expires_at is None else expires_at - now
            if left is not None and left <= 0:
                return MISSING, None
            return Found(value, fresh_until - now, origin), left
        if fresh_until is None:
            return value, None
        remaining = fresh_until - now
        if remaining <= 0:
            return MISSING, None
        return value, remaining

    def _decode_many(
        self,
        raw: Mapping[bytes, bytes],
        keys: Mapping[bytes, str],
        found: dict[str, tuple[Any, float | None]],
        now: float,
    ) -> None:
        """Put into ``found``, under its key in ``keys`` (memcached key -> key), the
        ``(value, remaining seconds or None)`` of each live entry of ``raw`` (bytes read
        by memcached key), as :meth:`_decode` reads them, corrupt ones left out
        (counted). Plain JSON envelopes are read in one pass
        (:meth:`~cachechain._codecs.Envelope.read_plain_many`: a batch of 100 costs
        about half as much); every other one through :meth:`_decode`."""
        plains = self._envelope.read_plain_many(list(raw.values()), now)
        for mkey, plain in zip(raw, plains, strict=True):
            if plain is None:
                try:
                    entry = self._decode(raw[mkey], mkey, now)
                except CorruptValueError:
                    continue
                if entry[0] is not MISSING:
                    found[keys[mkey]] = entry
            elif plain is not EXPIRED:
                found[keys[mkey]] = plain  # type: ignore[assignment]

    def _corrupted(self, exc: CorruptValueError) -> None:
        """Count a read of stored bytes that could not be decoded (see ``stats``)."""
        with self._stats_lock:
            self._corrupt += 1
        exc.layer = self.name

    def _encode(self, value: Any, mkey: bytes, expires_at: float | None) -> bytes:
        """The envelope of ``value`` stored under ``mkey`` until ``expires_at`` (unix
        seconds, None: never). Raises InvalidValueError for a value the codec refuses
        or one over ``max_value_size``. A :class:`~cachechain.layers._stamps.Stamped`
        value gets a stamped envelope: fresh for its ``fresh`` seconds from now, at
        most until ``expires_at``."""
        if value.__class__ is Stamped:
            fresh_until = self._clock() + value.fresh
            if expires_at is not None and expires_at < fresh_until:
                fresh_until = expires_at
            data = self._envelope.pack(
                value.value, expires_at, mkey, fresh_until=fresh_until, ttl=value.origin
            )
        else:
            data = self._envelope.pack(value, expires_at, mkey)
        if len(data) > self._max_value_size:
            raise InvalidValueError(
                f"layer {self.name!r}: encoded value is {len(data)} bytes, "
                f"more than max_value_size={self._max_value_size}"
            )
        return data

    def check_value(self, value: Any) -> None:
        """Raise :class:`~cachechain.InvalidValueError` if ``set`` would refuse
        ``value`` (the codec cannot encode it, or its envelope exceeds
        ``max_value_size``); no I/O, nothing stored. It encodes the value: a chain calls
        it only before queuing a set for this layer, so that ``set()`` returns False for
        a value the layer will refuse, as a synchronous write does."""
        self._encode(value, b"", None)
