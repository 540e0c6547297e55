"""The layer contract: what the chain asks of every cache layer.

A layer stores values under ``str`` keys (any ``str``, empty included) with a
per-entry time to live in seconds. A miss is not an exception: ``get`` returns the
:data:`MISSING` sentinel, and a stored falsy value (``0``, ``""``, ``None``) is a hit.
A layer raises only for a failure (a :class:`~cachechain.LayerError` or anything
its backend raises) or for input it cannot take (:class:`~cachechain.InvalidKeyError`,
:class:`~cachechain.InvalidValueError`, the latter for a TTL that is not a finite
number of seconds ``> 0`` too). It is called from many threads at once.

Beyond :class:`CacheLayer`, a layer may offer optional capabilities, each a small
runtime-checkable protocol (``isinstance`` tells): :class:`SupportsTimeout`,
:class:`SupportsStats`, :class:`SupportsClear`, and the atomic operations a chain runs
on its shared layer, :class:`SupportsAdd`, :class:`SupportsCounters` and
:class:`SupportsTouch`, and :class:`SupportsLease` (one loader per key across
processes, :class:`Lease`).

Layers know nothing of the chain, the breakers or the metrics. Write a new layer by
subclassing :class:`BaseLayer` and implementing ``get_with_ttl``, ``set`` and
``delete``; the batch methods default to loops over those. Wrap a layer by subclassing
:class:`~cachechain.layers.LayerProxy`. Check a layer against the contract with
:class:`cachechain.testing.CacheLayerTests`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

from .._errors import ConfigError, InvalidValueError
from .._validate import check_seconds, check_ttl

__all__ = [
    "MISSING",
    "BaseLayer",
    "CacheLayer",
    "Entry",
    "Lease",
    "SupportsAdd",
    "SupportsClear",
    "SupportsCounters",
    "SupportsLease",
    "SupportsStats",
    "SupportsTimeout",
    "SupportsTouch",
    "check_ttl",
]


class _Missing:
    """The type of :data:`MISSING`; there is exactly one instance."""

    __slots__ = ()
    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "MISSING"


#: Returned by a layer's ``get`` on a miss. Compare with ``is``.
MISSING: Final[Any] = _Missing()

#: A hit with its remaining time to live: ``(value, ttl)``, where ``ttl`` is in seconds,
#: ``None`` when the entry never expires, or ``0.0`` when the layer cannot tell (see
#: :meth:`CacheLayer.get_with_ttl`).
Entry = tuple[Any, "float | None"]


@runtime_checkable
class CacheLayer(Protocol):
    """What a cache layer provides. TTLs are seconds (``float``); ``None`` means the
    layer's default TTL on writes and "never expires" on reads."""

    @property
    def name(self) -> str:
        """The layer's name, used in metrics labels and logs (for example ``"L1"``)."""

    @property
    def local(self) -> bool:
        """True for an in-process layer, which the chain writes synchronously and does
        not wrap in a circuit breaker by default."""

    @property
    def max_ttl(self) -> float | None:
        """The longest TTL (seconds) this layer stores; longer ones are capped. ``None``:
        no cap."""

    def get(self, key: str) -> Any:
        """Return the value stored under ``key``, or :data:`MISSING`."""

    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """Return ``(value, remaining_ttl_seconds_or_None)``, or ``(MISSING, None)``.

        A remaining TTL of ``0.0`` means the layer holds the value but cannot tell for
        how long (a memcached counter has no expiry of its own): whoever reads it must
        not keep a copy (the chain serves it but does not backfill it)."""

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Return the hits among ``keys`` as a dict; misses are absent."""

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Return the hits among ``keys`` with their remaining TTLs (``0.0``: unknown,
        as in :meth:`get_with_ttl`); misses are absent."""

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (``None``: the layer's default), capped
        at :attr:`max_ttl`.

        Raises :class:`~cachechain.InvalidValueError` for a value it cannot
        store or a TTL that is not a finite number of seconds ``> 0``, or a layer error
        when the backend fails. A layer that refuses a value must not go on serving an
        older value of ``key`` (delete it, best effort).
        """

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store every item it can; return the keys whose values could not be stored
        because they were invalid for this layer (``[]`` when all were stored; their
        older values are gone too). A backend failure raises, and so does an invalid
        TTL (:class:`~cachechain.InvalidValueError`)."""

    def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key is not an error."""

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key in ``keys``."""

    def close(self) -> None:
        """Release the layer's resources (connections). Idempotent."""


@runtime_checkable
class SupportsTimeout(Protocol):
    """An optional capability: a layer that bounds its own calls, in seconds.

    The chain waits at most ``timeout`` for a write of a key in flight before it writes
    the key again, and the breaker wrapper the chain puts around a remote layer counts
    a call slower than that (plus ``connect_timeout`` and ``pool_timeout``
    attributes, if any: a call may wait for a pooled connection, then connect) as a
    failure. Without it the chain waits a default and counts no slow calls."""

    @property
    def timeout(self) -> float | None:
        """The layer's per-call timeout in seconds, or ``None`` for none."""


@runtime_checkable
class SupportsStats(Protocol):
    """An optional capability: a layer that reports figures.

    Before each metrics read the chain calls :meth:`stats` and exports the ``entries``
    and ``evictions`` attributes of the result when they are ``int`` (entries held now;
    evictions since the layer was built, never decreasing). Other attributes are the
    layer's own business."""

    def stats(self) -> Any:
        """A point-in-time view of the layer's figures; quick (it runs before every
        metrics read)."""


@runtime_checkable
class SupportsClear(Protocol):
    """An optional capability: a layer that can drop every entry it holds at once."""

    def clear(self) -> None:
        """Remove every entry of this layer (of this process, for an in-process one)."""


@runtime_checkable
class SupportsAdd(Protocol):
    """An optional capability: store a value only if the key is absent, atomically for
    everyone sharing the layer (memcached's ``add``). A chain runs :meth:`Chain.add
    <cachechain.Chain.add>` on its shared layer through it."""

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``: the layer's
        default, capped at ``max_ttl``) unless the layer holds a live value of ``key``;
        return whether it stored it. Raises as :meth:`CacheLayer.set` does."""


@runtime_checkable
class SupportsCounters(Protocol):
    """An optional capability: atomic counters (memcached's ``incr``/``decr``).

    A counter is a signed 64-bit ``int``: memcached's unsigned 64-bit number read as
    two's complement. ``incr`` adds modulo 2**64 (past ``2**63 - 1`` it wraps to
    ``-2**63``; ``incr(key, 2**64 - d)`` subtracts ``d``); ``decr`` subtracts but never
    takes a counter that is not negative below 0. A stored ``int`` (not a ``bool``) in
    ``[-2**63, 2**63)`` or a ``str`` of decimal digits in that range becomes a counter
    on its first ``incr``/``decr``; a read of the key then returns the ``int``. See
    :mod:`cachechain.layers._counters`."""

    def incr(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` (an ``int``, ``0 <= delta < 2**64``) to the counter ``key``
        and return the new value; None when the key is absent (nothing is created).
        Raises :class:`~cachechain.InvalidValueError` for a bad ``delta`` or a value
        that cannot be a counter, and a layer error when the backend fails (the change
        may then have been made or not)."""

    def decr(self, key: str, delta: int = 1) -> int | None:
        """Subtract ``delta`` from the counter ``key`` (a counter that is not negative
        stops at 0) and return the new value; None when the key is absent. Raises as
        :meth:`incr` does."""


@runtime_checkable
class SupportsTouch(Protocol):
    """An optional capability: give an entry a new TTL without rewriting its value."""

    def touch(self, key: str, ttl: float | None = None) -> bool:
        """Make the live entry ``key`` expire ``ttl`` seconds from now (``None``: the
        layer's default, capped at ``max_ttl``); return False when the layer holds no
        live entry of ``key``. Raises :class:`~cachechain.InvalidValueError` for an
        invalid TTL, and a layer error when the backend fails."""


class Lease:
    """What :meth:`SupportsLease.lease` found, in one of three states:

    - :attr:`won`: this caller holds the lease: it loads the value and stores it (a
      write of the key ends the lease; with :meth:`store` when :attr:`stores`), or
      calls :meth:`release` if it cannot;
    - a live value (:attr:`value` is not :data:`MISSING`, :attr:`ttl` its remaining
      seconds as :meth:`CacheLayer.get_with_ttl` gives them): the key was filled;
    - neither (:attr:`held`): another client holds the lease; wait for its value.

    ``store`` (for a lease won) is what :meth:`store` calls; a layer that gives none
    leaves the holder to store its value with a plain write.
    """

    __slots__ = ("_release", "_store", "ttl", "value", "won")

    def __init__(
        self,
        *,
        won: bool = False,
        value: Any = MISSING,
        ttl: float | None = None,
        release: Callable[[], object] | None = None,
        store: Callable[[Any, float | None], bool] | None = None,
    ) -> None:
        self.won = won
        self.value = value
        self.ttl = ttl
        self._release = release
        self._store = store

    @property
    def stores(self) -> bool:
        """Whether :meth:`store` can store this lease's value (a lease won on a layer
        that checks the lease is still the key's version)."""
        return self._store is not None

    def store(self, value: Any, ttl: float | None) -> bool:
        """Store ``value`` for ``ttl`` seconds (``None``: the layer's default) in place of
        the lease this caller won, only if the key is still in the state the lease
        found it: True when stored, False when a write or a delete of the key came
        since (the value, loaded before it, may be older: it is not stored, as in
        memcached's leases against stale sets), or when the lease's item is gone for
        another reason (evicted; on memcached, a lease past its TTL is stored over
        with ``add`` instead). Once it has answered, :meth:`release` does nothing.
        Raises :class:`~cachechain.InvalidValueError` for a value the layer refuses, a layer
        error when the backend fails (the value is then retracted if it landed), and
        ``TypeError`` for a lease that does not :attr:`store <stores>`."""
        if self._store is None:
            raise TypeError("this lease does not store values: write the key instead")
        stored = self._store(value, ttl)
        self._release = None  # answered: the lease is over, stored or ended by a change
        return stored

    @property
    def held(self) -> bool:
        """Whether another client holds the lease (neither won nor filled)."""
        return not self.won and self.value is MISSING

    def release(self) -> None:
        """End a lease this caller won without storing a value (its load failed), so
        the next client wins at once instead of after the lease's TTL; only this
        caller's lease is ended, never a later one or a value. Does nothing for a lease
        not won. Raises a layer error when the backend fails (the lease then ends at
        its TTL)."""
        if self._release is not None:
            self._release()

    def __repr__(self) -> str:
        state = "won" if self.won else "held" if self.held else f"value={self.value!r}"
        return f"<Lease {state}>"


@runtime_checkable
class SupportsLease(Protocol):
    """An optional capability: a lease to fill a missing key, one holder at a time for
    everyone sharing the layer (memcached's ``mg <key> N<ttl>``: the one client that
    gets ``W`` fills the key; see :mod:`cachechain.layers._memcached_lease`). A chain's
    ``get_or_load`` takes it on its shared layer, so that one process runs the loader
    while the others wait for its value (:mod:`cachechain._lease`)."""

    def lease(self, key: str, ttl: float) -> Lease | None:
        """Ask for the lease to fill ``key`` for ``ttl`` seconds (a holder that dies
        blocks nobody past it): a :class:`Lease` won, held by another client, or the
        key's live value found instead; None when the layer cannot lease the key now
        (the caller loads as if there were no lease). While a lease is held the key
        reads as a miss for every reader. Raises
        :class:`~cachechain.InvalidValueError` for a ``ttl`` that is not a finite
        number of seconds ``> 0``, and a layer error when the backend fails."""


class BaseLayer(abc.ABC):
    """A convenient base for layers: implement ``get_with_ttl``, ``set`` and ``delete``.

    ``default_ttl`` applies when a write gives no TTL (``None``: entries do not expire);
    ``max_ttl`` caps every TTL (``None``: no cap). Both are seconds.
    """

    local: bool = False

    def __init__(
        self, name: str, *, default_ttl: float | None = None, max_ttl: float | None = None
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty str, got {name!r}")
        self._name = name
        self.default_ttl = check_ttl(default_ttl, field="default_ttl")
        self._max_ttl = check_ttl(max_ttl, field="max_ttl")

    @property
    def name(self) -> str:
        """The layer's name, as given to the constructor."""
        return self._name

    @property
    def max_ttl(self) -> float | None:
        """The longest TTL (seconds) this layer stores, or ``None`` for no cap."""
        return self._max_ttl

    def effective_ttl(self, ttl: float | None) -> float | None:
        """Resolve a write's TTL: the layer default when ``None``, capped by ``max_ttl``.

        Raises :class:`~cachechain.InvalidValueError` for a TTL that is not a
        positive finite number.
        """
        if ttl is None:
            ttl = self.default_ttl
        elif ttl.__class__ is float and 0.0 < ttl < math.inf:
            pass  # the usual case: a TTL the chain checked already
        elif isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < math.inf:
            ttl = check_seconds(ttl, "ttl", error=InvalidValueError)  # raises for every such ttl
        if ttl is not None and self._max_ttl is not None and ttl > self._max_ttl:
            return self._max_ttl
        return ttl

    def get(self, key: str) -> Any:
        """Return the value stored under ``key``, or :data:`MISSING`."""
        return self.get_with_ttl(key)[0]

    @abc.abstractmethod
    def get_with_ttl(self, key: str) -> tuple[Any, float | None]:
        """Return ``(value, remaining_ttl)``, or ``(MISSING, None)`` on a miss."""

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Return the hits among ``keys``; the default asks for each key in turn."""
        return {k: v for k, (v, _) in self.get_many_with_ttl(keys).items()}

    def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[Any, float | None]]:
        """Return the hits among ``keys`` with their remaining TTLs (seconds)."""
        found: dict[str, tuple[Any, float | None]] = {}
        for key in keys:
            entry = self.get_with_ttl(key)
            if entry[0] is not MISSING:
                found[key] = entry
        return found

    @abc.abstractmethod
    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds."""

    def set_many(self, items: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store each item; return the keys whose values were invalid for this layer."""
        rejected: list[str] = []
        for key, value in items.items():
            try:
                self.set(key, value, ttl)
            except InvalidValueError:
                rejected.append(key)
        return rejected

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``."""

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove each key in turn."""
        for key in keys:
            self.delete(key)

    def close(self) -> None:  # noqa: B027 - a no-op default is the point
        """Release resources; the default has none."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r}>"
