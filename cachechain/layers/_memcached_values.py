"""The values of :class:`~cachechain.MemcachedLayer`: envelopes in and out.

Every value is stored in a :class:`~cachechain._codecs.Envelope` of the layer's codec
(made once, with the layer: it knows whether the codec binds its payloads to a
context). A codec that signs gets the envelope's header and the memcached key as its
context, so a signed entry whose expiry was edited, or that was copied under another
key, reads as corrupt: counted in the layer's ``stats().corrupt_values``, a miss for
a chain.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .._codecs import CorruptValueError, Envelope
from .._errors import InvalidValueError
from ._base import MISSING
from ._counters import RawCounter, read_raw

__all__ = ["MemcachedValues"]


class MemcachedValues:
    """Encoding and decoding for :class:`~cachechain.MemcachedLayer` (a base class of
    it), and the count of corrupt reads. The layer sets the attributes below."""

    _envelope: Envelope
    _max_value_size: int
    _stats_lock: threading.Lock
    _corrupt: int

    if TYPE_CHECKING:

        @property
        def name(self) -> str: ...

    def _decode(self, data: bytes, mkey: bytes, now: float) -> tuple[Any, float | None]:
        """Unpack an envelope read under ``mkey`` (a signed payload must be bound to it
        and to the header); ``(MISSING, None)`` if its expiry has passed. A counter
        is its ``int`` with an unknown remaining TTL, ``0.0``: it has no envelope, and
        ``0.0`` keeps the chain from copying it up for longer than it may live.
        Raises CorruptValueError, counted, for bytes that cannot be decoded."""
        try:
            if data.__class__ is RawCounter:
                return read_raw(data), 0.0
            value, expires_at = self._envelope.unpack(data, mkey)
        except CorruptValueError as exc:
            self._corrupted(exc)
            raise
        if expires_at is None:
            return value, None
        remaining = expires_at - now
        if remaining <= 0:
            return MISSING, None
        return value, remaining

    def _corrupted(self, exc: CorruptValueError) -> None:
        """Count a read of stored bytes that could not be decoded (see ``stats``)."""
        with self._stats_lock:
            self._corrupt += 1
        exc.layer = self.name

    def _encode(self, value: Any, mkey: bytes, expires_at: float | None) -> bytes:
        """The envelope of ``value`` stored under ``mkey`` until ``expires_at`` (unix
        seconds, None: never). Raises InvalidValueError for a value the codec refuses
        or one over ``max_value_size``."""
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
