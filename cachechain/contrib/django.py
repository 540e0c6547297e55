"""cachechain as a Django cache backend.

Configure it in ``settings.py``; ``OPTIONS`` is the chain mapping of
:func:`cachechain.chain_config_from_mapping`::

    CACHES = {
        "default": {
            "BACKEND": "cachechain.contrib.django.CachechainCache",
            "TIMEOUT": 300,               # Django's default timeout, seconds
            "KEY_PREFIX": "shop",         # Django's key prefix and VERSION work as usual
            "OPTIONS": {
                "name": "web",
                "layers": [
                    {"type": "memory", "name": "L1", "maxsize": 10_000, "max_ttl": 30},
                    {"type": "memcached", "name": "L2", "servers": ["10.0.0.5:11211"],
                     "timeout": 0.1, "connect_timeout": 0.1},
                ],
            },
        }
    }

then use ``django.core.cache.cache``, ``cache_page`` and the cache middleware as with
any backend. What to know:

- **One chain per process and configuration.** Django creates a backend object per
  thread and alias; all the backends built from the same ``LOCATION`` and ``OPTIONS``
  in a process share one thread-safe :class:`~cachechain.Chain` (one in-process layer,
  one memcached pool, one set of breakers and metrics). ``LOCATION`` is only a name:
  give two aliases different ``LOCATION`` values to give them separate chains.
  ``close()``, which Django calls at the end of every request, leaves the shared chain
  open; the chains are closed at interpreter exit, or by :func:`close_chains`.
- **Failures never reach the view.** A layer that is down, slow or returns garbage is a
  miss (and a write it missed is counted and logged), as everywhere in cachechain.
  ``incr``/``decr`` still raise :class:`ValueError` for a key that memcached does not
  have or while it cannot be reached, as Django specifies for a missing key.
- **Values** are copies, and a ``memcached`` layer without a ``codec`` gets a signed
  pickle codec keyed by ``SECRET_KEY`` (see :mod:`cachechain.contrib`): cached
  ``HttpResponse`` objects (``cache_page``) and any picklable value work out of the box.
  Set ``"codec": {"type": "signed_pickle", "secret": "..."}`` to use another secret.
- **Timeouts** follow Django: ``DEFAULT_TIMEOUT`` is the backend's ``TIMEOUT``; ``None``
  never expires (stored as :data:`~cachechain.contrib.NO_EXPIRY_TTL`); ``0`` or a
  negative timeout does not cache (``set`` removes the key). Each layer's ``max_ttl``
  caps every timeout.
- **Keys**: Django's ``KEY_PREFIX``, ``VERSION`` and ``KEY_FUNCTION`` apply. Every
  ``str`` key is accepted without :class:`~django.core.cache.CacheKeyWarning`:
  cachechain maps keys memcached cannot take (long, spaces, non-ASCII) to safe hashed
  ones. A ``KEY_FUNCTION`` that returns anything but a ``str`` raises
  :class:`~django.core.cache.backends.base.InvalidCacheKey`.
- **Atomic across processes**: ``add``, ``incr``, ``decr`` and ``touch`` run on the
  chain's shared layer (memcached; the last layer of an in-process-only chain) with
  its own commands (:meth:`Chain.add <cachechain.Chain.add>`...). ``add`` has exactly
  one winner per key among all workers, so it works as a lock; counts are never lost
  between workers. Counters are signed 64-bit integers: ``decr`` may go below 0, as
  with Django's local-memory and Redis caches (Django's memcached backends stop at 0),
  and a counter keeps its timeout. While memcached cannot be reached, ``add`` stores
  nothing and returns False (no lock is granted), ``incr``/``decr`` raise
  :class:`ValueError` and ``touch`` returns False. On a stored value that is not an
  integer (a float, ``None``, a non-numeric ``str``), ``incr`` does what Django's
  local-memory cache does, ``value + delta`` then ``set``, not atomically.
- ``get_or_set`` runs its callable default once per key per process however many
  threads miss at once (cachechain's single flight), then stores it with ``add``:
  workers that miss at once all return the one value that won.
- ``clear()`` empties this process's in-process layers only; memcached is not flushed
  (see :mod:`cachechain.contrib`). Bump ``VERSION`` to drop every entry at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from asgiref.sync import sync_to_async
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, InvalidCacheKey
from django.core.exceptions import ImproperlyConfigured

from .. import _fork
from .._chain import Chain
from .._errors import ConfigError
from ..layers._base import MISSING
from . import (
    NO_EXPIRY_TTL,
    NOT_A_COUNTER,
    _add,
    _clear_local_layers,
    _close_at_exit,
    _count,
    _decode,
    _delete,
    _encode,
    _exiting,
    _needs_default_codec,
    _read,
    _with_default_codec,
)

__all__ = ["CachechainCache", "close_chains"]


class _Shared:
    """What the backends of one configuration share in a process: the chain."""

    __slots__ = ("chain",)

    def __init__(self, chain: Chain) -> None:
        self.chain = chain


_SHARED: dict[Hashable, _Shared] = {}
_SHARED_LOCK = threading.Lock()


def _freeze(value: Any) -> Hashable:
    """A hashable, comparable form of an ``OPTIONS`` value, for the registry key.
    Objects that are not plain data (a codec, a collector) count by identity."""
    if isinstance(value, Mapping):
        pairs = sorted(((repr(k), _freeze(v)) for k, v in value.items()), key=lambda kv: kv[0])
        return ("map", tuple(pairs))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_freeze(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value).__qualname__, value)


def _secret_key() -> str | bytes:
    from django.conf import settings

    try:
        secret: str | bytes = settings.SECRET_KEY
    except ImproperlyConfigured as exc:
        raise ImproperlyConfigured(
            "cachechain: a memcached layer without a 'codec' is given a signed pickle "
            f"codec keyed by SECRET_KEY, which is not usable ({exc}). Set SECRET_KEY, or "
            "give the layer a codec in OPTIONS"
        ) from exc
    return secret


def _shared_for(location: str, options: Mapping[str, Any]) -> _Shared:
    """Return the shared chain of this configuration in this process, building it on
    first use (and again after :func:`close_chains`)."""
    secret = _secret_key() if _needs_default_codec(options) else None
    fingerprint = (location, _freeze(options), secret)
    with _SHARED_LOCK:
        shared = _SHARED.get(fingerprint)
        if shared is None or (shared.chain.closed and not _exiting()):
            resolved, _ = _with_default_codec(options, secret)
            try:
                chain = Chain.from_config(resolved)
            except ConfigError as exc:
                where = f"LOCATION {location!r}" if location else "a cachechain cache"
                raise ConfigError(f"CACHES OPTIONS of {where}: {exc}") from exc
            shared = _SHARED[fingerprint] = _Shared(chain)
            _close_at_exit(chain)
    return shared


def close_chains(timeout: float = 5.0) -> int:
    """Close every chain the Django backends of this process share, draining their
    queued writes within ``timeout`` seconds each; return how many writes were dropped.

    Call it at shutdown, or between tests, when no request is running: a backend used
    afterwards builds a new chain (with an empty in-process layer). Chains are also
    closed at interpreter exit without it.
    """
    with _SHARED_LOCK:
        shared = list(_SHARED.values())
        _SHARED.clear()
    return sum(s.chain.close(timeout) for s in shared)


def _after_fork_in_child() -> None:  # pragma: no cover - runs in a forked child
    """A registry lock held by another thread at fork time would never be released in
    the child: give it a fresh one."""
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()


_fork.at_fork(after_in_child=_after_fork_in_child)


class CachechainCache(BaseCache):  # type: ignore[misc]  # django ships no type hints
    """A Django cache backend over a cachechain :class:`~cachechain.Chain`.

    ``location`` is the ``LOCATION`` setting (only a name, see the module docstring);
    ``params`` are the other settings of the alias, whose ``OPTIONS`` is the chain
    mapping of :func:`cachechain.chain_config_from_mapping`. Timeouts are seconds
    (``int`` or ``float``).

    Raises :class:`~cachechain.ConfigError`, naming the field, for bad
    ``OPTIONS``, and :class:`~django.core.exceptions.ImproperlyConfigured` when a
    memcached layer needs ``SECRET_KEY`` for its default codec and it is not set.
    """

    def __init__(self, location: str, params: Mapping[str, Any]) -> None:
        options = params.get("OPTIONS") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"CACHES OPTIONS must be a cachechain chain mapping, got {type(options).__name__}"
            )
        super().__init__(params)
        self._location = location or ""
        self._options: Mapping[str, Any] = options
        self._shared = _shared_for(self._location, options)

    # -- helpers ------------------------------------------------------------------

    @property
    def chain(self) -> Chain:
        """The :class:`~cachechain.Chain` this backend shares with the other backends of
        its configuration in this process (for metrics, breakers, ``get_or_load``).
        Its keys are Django's made keys (see :meth:`make_key`) and its values are the
        stored forms described in :mod:`cachechain.contrib`."""
        return self._live().chain

    def _live(self) -> _Shared:
        shared = self._shared
        if shared.chain.closed:  # closed by close_chains(): share the new one
            shared = self._shared = _shared_for(self._location, self._options)
        return shared

    def _ttl(self, timeout: Any) -> float | None:
        """Django's timeout as the chain's TTL in seconds; ``None`` for "do not cache"."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return NO_EXPIRY_TTL
        if timeout <= 0:
            return None
        return min(float(timeout), NO_EXPIRY_TTL)

    def validate_key(self, key: Any) -> None:
        """Check a made key: any ``str`` is fine (keys memcached cannot take are mapped
        to safe hashed ones, so no :class:`~django.core.cache.CacheKeyWarning` is
        issued). Raises :class:`~django.core.cache.backends.base.InvalidCacheKey` for a
        key that is not a ``str`` (a ``KEY_FUNCTION`` returning something else)."""
        if not isinstance(key, str):
            raise InvalidCacheKey(
                f"cache keys must be str, got {type(key).__name__}: check KEY_FUNCTION"
            )

    # -- reads --------------------------------------------------------------------

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """Return the value cached under ``key`` (a fresh copy), or ``default``. A layer
        failure is a miss."""
        key = self.make_and_validate_key(key, version=version)
        return _read(self._live().chain, key, default)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """Return ``{key: value}`` for the ``keys`` that are cached (one batch per layer);
        missing keys are absent."""
        made = {self.make_and_validate_key(k, version=version): k for k in keys}
        found: dict[Any, Any] = {}
        for made_key, stored in self._live().chain.get_many(list(made)).items():
            value = _decode(stored)
            if value is not MISSING:
                found[made[made_key]] = value
        return found

    def has_key(self, key: Any, version: int | None = None) -> bool:
        """Return whether some reachable layer holds ``key``."""
        key = self.make_and_validate_key(key, version=version)
        return self._live().chain.get(key, MISSING) is not MISSING

    def get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any:
        """Return the value cached under ``key``; on a miss, store ``default`` (or the
        result of calling it) for ``timeout`` with :meth:`add` and return the value
        that won: the workers that miss at once all get the same one.

        A callable ``default`` runs once per key in this process however many threads
        miss at once; the others wait for its result (or its exception, which is
        raised to each of them and cached for none). With a timeout of ``0`` or less,
        or while memcached cannot be reached, nothing is stored and the computed value
        is returned.
        """
        made = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        chain = self._live().chain
        if ttl is not None:

            def load() -> Any:
                stored = _encode(default() if callable(default) else default)
                if chain.add(made, stored, ttl):
                    return stored
                return chain.get(made, stored)  # another worker's value won the add

            value = _decode(chain.get_or_load(made, load, ttl))
            if value is not MISSING:
                return value
        else:
            stored = chain.get(made, MISSING)
            if stored is not MISSING:
                value = _decode(stored)
                if value is not MISSING:
                    return value
        # Not cacheable now (timeout <= 0), or the cached bytes could not be unpickled.
        value = default() if callable(default) else default
        if ttl is not None:
            chain.set(made, _encode(value), ttl)
        return value

    # -- writes -------------------------------------------------------------------

    def set(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> None:
        """Store ``value`` under ``key`` in every layer for ``timeout`` seconds (see the
        module docstring); a timeout of ``0`` or less removes the key instead. Raises
        :class:`pickle.PicklingError` for a value that cannot be pickled; a layer that
        fails is skipped (counted and logged by the chain)."""
        stored = _encode(value)
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        chain = self._live().chain
        if ttl is None:
            chain.delete(key)
        else:
            chain.set(key, stored, ttl)

    def add(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        """Store ``value`` only if memcached (the chain's shared layer) does not hold
        ``key``, atomically across processes: a lock has one owner. Return True when it
        was stored; False when the key was there, or when memcached could not be
        reached (nothing is stored then). A timeout of ``0`` or less stores nothing and
        returns whether the key is absent."""
        stored = _encode(value)
        key = self.make_and_validate_key(key, version=version)
        return _add(self._live().chain, key, stored, self._ttl(timeout))

    def set_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        """Store every item (one batch per layer); return the keys that failed: none
        when every layer took the batch, else every key of it (the chain reports per
        batch; the values are still in the layers that took them)."""
        items = {
            self.make_and_validate_key(k, version=version): (k, _encode(v)) for k, v in data.items()
        }
        ttl = self._ttl(timeout)
        chain = self._live().chain
        if ttl is None:
            chain.delete_many(list(items))
            return []
        if chain.set_many({mk: stored for mk, (_, stored) in items.items()}, ttl):
            return []
        return [k for k, _ in items.values()]

    def delete(self, key: Any, version: int | None = None) -> bool:
        """Remove ``key`` from every layer; return True when it was cached and every
        layer confirmed the delete, False when it was not cached or some layer could
        not be reached (the chain still never drops a delete it queued)."""
        key = self.make_and_validate_key(key, version=version)
        return _delete(self._live().chain, key)

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """Remove every key in ``keys`` from every layer (one batch per layer)."""
        made = [self.make_and_validate_key(k, version=version) for k in keys]
        self._live().chain.delete_many(made)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        """Give ``key`` a new ``timeout`` in memcached (the chain's shared layer; this
        process's in-process copy is re-timed too) without rewriting its value; return
        False when memcached does not hold it or cannot be reached. A timeout of ``0``
        or less removes it (True when it was cached)."""
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        chain = self._live().chain
        if ttl is None:
            return _delete(chain, key)
        return chain.touch(key, ttl)

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Add ``delta`` (an ``int``; a negative one subtracts, below 0 too) to the
        counter ``key`` in memcached, atomically across processes, and return the new
        value; the counter keeps its timeout. Raises :class:`ValueError` when
        memcached does not hold ``key`` or cannot be reached (Django's contract for a
        missing key). A stored value that is not an integer is read, ``value + delta``
        stored for the default timeout and returned, not atomically (what ``+`` raises,
        :class:`TypeError` for ``None`` or a ``str``, propagates)."""
        made = self.make_and_validate_key(key, version=version)
        chain = self._live().chain
        counted = _count(chain, made, delta)
        if counted is NOT_A_COUNTER:
            value = _read(chain, made, MISSING)
            if value is MISSING:  # bytes that no longer unpickle: a miss
                raise ValueError(f"Key '{key}' not found")
            new_value = value + delta
            self.set(key, new_value, version=version)
            return new_value
        if counted is None:
            raise ValueError(f"Key '{key}' not found")
        return counted

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Subtract ``delta``: :meth:`incr` with ``-delta`` (same errors, same atomicity)."""
        return self.incr(key, -delta, version=version)

    # -- lifecycle ----------------------------------------------------------------

    def clear(self) -> None:
        """Empty this process's in-process layers. Memcached is not flushed, and other
        processes keep their in-process entries: bump ``VERSION`` to drop everything."""
        _clear_local_layers(self._live().chain)

    def close(self, **kwargs: Any) -> None:
        """Do nothing: Django calls this at the end of every request, and the chain is
        shared by every thread of the process and keeps its pooled connections. See
        :func:`close_chains`."""

    # -- async variants that Django's BaseCache builds from single-key calls -------
    # (aget, aset, aadd, adelete, atouch, aclear and aclose already call the methods
    # above through sync_to_async.)

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """:meth:`get_many`, from async code."""
        return await sync_to_async(self.get_many, thread_sensitive=True)(keys, version)

    async def aset_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        """:meth:`set_many`, from async code."""
        return await sync_to_async(self.set_many, thread_sensitive=True)(data, timeout, version)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """:meth:`delete_many`, from async code."""
        await sync_to_async(self.delete_many, thread_sensitive=True)(keys, version)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        """:meth:`has_key`, from async code."""
        return await sync_to_async(self.has_key, thread_sensitive=True)(key, version)

    async def aget_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any:
        """:meth:`get_or_set`, from async code (a callable ``default`` runs in a thread)."""
        call: Callable[..., Any] = self.get_or_set
        return await sync_to_async(call, thread_sensitive=True)(key, default, timeout, version)

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """:meth:`incr`, from async code."""
        return await sync_to_async(self.incr, thread_sensitive=True)(key, delta, version)

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """:meth:`decr`, from async code."""
        return await sync_to_async(self.decr, thread_sensitive=True)(key, delta, version)
