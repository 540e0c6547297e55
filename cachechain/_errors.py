"""The exceptions cachechain raises, and how a failure is classified for metrics.

Every error derives from :class:`CacheError`. Each class has an ``error_type``: one of
the bounded label values used by the metrics (``timeout``, ``connection``,
``serialization``, ``invalid_input``, ``backend``, ``other``), and ``trips_breaker``,
which says whether the failure speaks about the health of the backend (and so counts
toward opening a circuit breaker) or only about the call itself.

``Chain.get`` never raises a :class:`LayerError`: a failing layer is skipped as a miss
and counted. The errors reach callers only from the layers used directly, or as
programmer errors (an invalid key, a closed chain, a bad configuration).
"""

from __future__ import annotations

import socket
from typing import Any

__all__ = [
    "CacheError",
    "ChainClosedError",
    "CircuitOpenError",
    "ConfigError",
    "CorruptValueError",
    "InvalidKeyError",
    "InvalidValueError",
    "LayerError",
    "LayerTimeoutError",
    "LayerUnavailableError",
    "PoolExhaustedError",
    "Uncacheable",
    "WriteInDoubtError",
    "classify_error",
    "trips_breaker",
]

#: The ``error_type`` label values, a closed set.
ERROR_TYPES = ("timeout", "connection", "serialization", "invalid_input", "backend", "other")


class CacheError(Exception):
    """Base class of every error cachechain raises."""

    error_type: str = "other"
    trips_breaker: bool = True


class InvalidKeyError(CacheError, ValueError):
    """A key is not a ``str``, or is one that no layer can store (for example empty).

    Raised before any I/O; never counts against a layer's circuit breaker.
    """

    error_type = "invalid_input"
    trips_breaker = False


class InvalidValueError(CacheError, ValueError):
    """A value cannot be stored by a layer: its codec cannot encode it, or it is too large.

    The chain keeps such a value in the layers that can hold it and skips the others.
    Never counts against a circuit breaker.
    """

    error_type = "serialization"
    trips_breaker = False


class ConfigError(CacheError, ValueError):
    """A configuration value is invalid; the message names the field and what is wrong."""

    error_type = "invalid_input"
    trips_breaker = False


class ChainClosedError(CacheError, RuntimeError):
    """The chain (or writer, or layer) was closed and cannot be used any more."""

    error_type = "other"
    trips_breaker = False


class LayerError(CacheError):
    """A layer's backend failed to answer a call (the layer's own fault, not the caller's)."""

    error_type = "backend"

    def __init__(self, message: str, *, layer: str | None = None) -> None:
        super().__init__(message)
        #: The name of the layer that failed, when known.
        self.layer = layer


class LayerUnavailableError(LayerError):
    """The backend could not be reached (connection refused, reset or closed)."""

    error_type = "connection"


class LayerTimeoutError(LayerError, TimeoutError):
    """The backend did not answer within the configured timeout (seconds)."""

    error_type = "timeout"


class WriteInDoubtError(LayerTimeoutError):
    """A write of this key was refused without any I/O because an earlier write of the
    same key, from this process, timed out after it was sent and memcached has not yet
    answered it: sending now could let that older write land after this one.

    The earlier write's connection is kept until memcached answers it (or closes it),
    and the key is released then. A write that waited for that until its own deadline
    (seconds) raises this error. Its timeout was counted already, so it does not trip
    the circuit breaker.
    """

    trips_breaker = False


class CircuitOpenError(LayerUnavailableError):
    """The layer's circuit breaker is open: the call was refused without any I/O.

    It does not count as a new failure of the breaker that refused it.
    """

    error_type = "connection"
    trips_breaker = False


class CorruptValueError(LayerError):
    """Stored bytes could not be read back: a wrong envelope, another codec's data, a
    bad signature, or a payload the codec rejects.

    The chain counts it and treats the entry as a miss. It says nothing about the
    backend's health, so it never trips a circuit breaker.
    """

    error_type = "serialization"
    trips_breaker = False


class PoolExhaustedError(LayerUnavailableError):
    """Every pooled connection stayed busy for the whole pool wait (seconds).

    A sign of load in this process, not of a sick backend: it does not trip the breaker.
    """

    error_type = "connection"
    trips_breaker = False


def classify_error(exc: BaseException) -> str:
    """Return the ``error_type`` metrics label for any exception.

    cachechain's own errors carry their type; for others, timeouts map to ``timeout``,
    socket and connection errors to ``connection``, encoding errors to
    ``serialization``, and anything else to ``other``.
    """
    if isinstance(exc, CacheError):
        return exc.error_type
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(exc, (ConnectionError, OSError, EOFError)):
        return "connection"
    if isinstance(exc, (TypeError, ValueError, UnicodeError)):
        return "serialization"
    return "other"


def trips_breaker(exc: BaseException) -> bool:
    """Return whether ``exc`` is evidence that a backend is unhealthy.

    Invalid input, an open circuit and an exhausted pool are not; anything else that a
    layer raises (including exceptions cachechain does not know) is.
    """
    if isinstance(exc, CacheError):
        return exc.trips_breaker
    return True


class Uncacheable(Exception):
    """Raised by a loader to hand ``value`` to the callers of ``get_or_load`` without
    caching it: it is not stored, it is not a failure (no fail-safe value replaces it,
    the throttle is not held), and every caller waiting for that load gets it raised
    too (for the framework backends: a response a filter refuses, an HTTP error)."""

    def __init__(self, value: Any) -> None:
        super().__init__("a value not to cache")
        self.value = value
