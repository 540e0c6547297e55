"""cachechain as a Django cache backend.

Configure it in ``settings.py``. The default set-up, an in-process layer over
memcached, takes the memcached servers from ``LOCATION``, as Django's memcached
backends do (``"host:port"``, several separated by ``;`` or ``,``, or a list)::

    CACHES = {
        "default": {
            "BACKEND": "cachechain.contrib.django.CachechainCache",
            "LOCATION": "10.0.0.5:11211",
        }
    }

is ``L1`` (``{"type": "memory", "maxsize": 10_000, "max_ttl": 30}``) over ``L2`` (a
``memcached`` layer on those servers); ``OPTIONS`` may add the other keys of the
chain mapping of :func:`cachechain.chain_config_from_mapping` (``name``, ``breaker``,
``writer``, ``metrics``, ``coherence``, and ``load``: the defaults of ``get_or_set``,
fail-safe values, loader timeouts, eager refresh and the lease). To choose the layers, give them in
``OPTIONS["layers"]``, with their servers, and no ``LOCATION`` (one given anyway
raises :class:`~cachechain.ConfigError`: it would be ignored)::

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
  one memcached pool, one set of breakers and metrics). Two aliases on the same
  memcached are one store, as with Django's memcached backends: give them different
  ``KEY_PREFIX`` values to keep their keys apart (and a different ``OPTIONS["name"]``
  to give them separate chains and metrics). ``close()``, which Django calls at the
  end of every request, leaves the shared chain open; the chains are closed at
  interpreter exit, or by :func:`close_chains`.
- **Failures never reach the view.** A layer that is down, slow or returns garbage is a
  miss (and a write it missed is counted and logged), as everywhere in cachechain.
  ``incr``/``decr`` are the exception: they raise :class:`ValueError` for a key that
  memcached does not have, as Django specifies for a missing key, and
  :class:`~cachechain.UnconfirmedError` while memcached cannot be reached or does not
  answer (the count may have been made), as Django's own memcached backends raise
  their client's error.
- **Values** are copies, and a ``memcached`` layer without a ``codec`` gets a signed
  pickle codec keyed by ``SECRET_KEY`` (see :mod:`cachechain.contrib`): cached
  ``HttpResponse`` objects (``cache_page``) and any picklable value work out of the box.
  Set ``"codec": {"type": "signed_pickle", "secret": "..."}`` to use another secret.
  Django needs a ``SECRET_KEY``; without one, such a layer raises
  :class:`~django.core.exceptions.ImproperlyConfigured` when the backend is built.
- **Timeouts** follow Django: ``DEFAULT_TIMEOUT`` is the backend's ``TIMEOUT``; ``None``
  never expires (stored as :data:`~cachechain.contrib.NO_EXPIRY_TTL`); ``0`` or a
  negative timeout does not cache (``set`` removes the key). Each layer's ``max_ttl``
  caps every timeout.
- **Keys**: Django's ``KEY_PREFIX``, ``VERSION`` and ``KEY_FUNCTION`` apply. Every
  ``str`` key works: cachechain maps keys memcached cannot take (longer than 250
  characters, spaces, control characters) to safe hashed ones. Such a key still
  raises a :class:`~django.core.cache.CacheKeyWarning`, as with Django's local-memory,
  file and database caches, because it would fail on Django's memcached backends; the
  warning is about portability, silence it with
  ``warnings.simplefilter("ignore", CacheKeyWarning)``. A ``KEY_FUNCTION`` that
  returns anything but a ``str`` raises
  :class:`~django.core.cache.backends.base.InvalidCacheKey`.
- **Atomic across processes**: ``add``, ``incr``, ``decr`` and ``touch`` run on the
  chain's shared layer (memcached; the last layer of an in-process-only chain) with
  its own commands (:meth:`Chain.add <cachechain.Chain.add>`...). ``add`` has exactly
  one winner per key among all workers, so it works as a lock; counts are never lost
  between workers. Counters are signed 64-bit integers: ``decr`` may go below 0, as
  with Django's local-memory and Redis caches (Django's memcached backends stop at 0),
  and a counter keeps its timeout. While memcached cannot be reached, ``add`` stores
  nothing and returns False (no lock is granted), ``incr``/``decr`` raise
  :class:`~cachechain.UnconfirmedError` (not a ``ValueError``: a failed ``incr`` may
  have counted, and must not be taken for a missing key) and ``touch`` returns False.
  On a stored value that is not an integer (a float, ``None``, a non-numeric
  ``str``), ``incr`` does what Django's local-memory cache does, ``value + delta``
  then ``set``, not atomically.
- ``get_or_set`` runs its callable default once per key per process however many
  threads miss at once (cachechain's single flight), and once among the workers
  (memcached's lease), then stores it with ``add``: workers that miss at once all
  return the one value that won. ``OPTIONS["load"]`` gives it fail-safe values, loader
  timeouts and eager refresh (see :meth:`CachechainCache.get_or_set`).
- ``clear()`` empties the cache for every process sharing the memcached
  (:meth:`Chain.clear <cachechain.Chain.clear>`: the namespace generation moves, so
  other applications' keys on the same servers stay), where Django's memcached
  backends run ``flush_all``; ``cache.chain.clear(flush=True)`` does that too.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Final

from asgiref.sync import sync_to_async
from django.core.cache.backends.base import (
    DEFAULT_TIMEOUT,
    MEMCACHE_MAX_KEY_LENGTH,
    BaseCache,
    CacheKeyWarning,
    InvalidCacheKey,
    memcache_key_warnings,
)
from django.core.exceptions import ImproperlyConfigured

from .. import _fork
from .._chain import Chain
from .._errors import ConfigError
from ..layers._base import MISSING
from . import (
    NO_EXPIRY_TTL,
    NOT_A_COUNTER,
    _add,
    _close_at_exit,
    _count,
    _delete,
    _exiting,
    _form_of,
    _needs_default_codec,
    _with_default_codec,
)
from ._values import ValueForm

__all__ = ["DEFAULT_L1", "CachechainCache", "chain_options", "close_chains"]

#: Finds a character Django's ``memcache_key_warnings`` warns about (a fast first
#: check: Django's own loops over every character).
_MEMCACHED_UNSAFE: Final = re.compile("[\x00-\x20\x7f]").search


class _Shared:
    """What the backends of one configuration share in a process: the chain, and the
    form its values are stored in."""

    __slots__ = ("chain", "form")

    def __init__(self, chain: Chain, form: ValueForm) -> None:
        self.chain = chain
        self.form = form


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


#: The in-process layer of the default set-up (``LOCATION`` without ``OPTIONS["layers"]``).
DEFAULT_L1: Final[Mapping[str, Any]] = {
    "type": "memory",
    "name": "L1",
    "maxsize": 10_000,
    "max_ttl": 30,
}


def _servers(location: Any) -> list[str]:
    """``LOCATION`` as memcached server specs, split as Django's memcached backends
    split it (``;`` or ``,``)."""
    if isinstance(location, str):
        return [spec.strip() for spec in re.split("[;,]", location) if spec.strip()]
    if isinstance(location, (list, tuple)) and all(isinstance(s, str) for s in location):
        return list(location)
    raise ConfigError(
        f"CACHES LOCATION must be memcached servers ('host:port', several separated by "
        f"';' or ',', or a list of them), got {location!r}"
    )


def chain_options(location: Any, options: Mapping[str, Any]) -> Mapping[str, Any]:
    """The chain mapping of an alias: ``OPTIONS`` when it gives ``layers`` (then
    ``LOCATION`` must be empty), else ``OPTIONS`` with the default set-up's layers:
    :data:`DEFAULT_L1` over a ``memcached`` layer ``L2`` on the servers of
    ``LOCATION``. Raises :class:`~cachechain.ConfigError` for a ``LOCATION`` beside
    ``OPTIONS["layers"]``, and for neither."""
    if "layers" in options:
        if location:
            raise ConfigError(
                f"CACHES LOCATION {location!r} is not used when OPTIONS gives 'layers': "
                "put the memcached servers in the memcached layer's 'servers' and remove "
                "LOCATION (or remove OPTIONS['layers'] for the default set-up on LOCATION)"
            )
        return options
    if not location:
        raise ConfigError(
            "CACHES of a cachechain cache needs LOCATION (the memcached servers, as for "
            "Django's PyMemcacheCache) or OPTIONS['layers'] (the chain's layers)"
        )
    l2 = {"type": "memcached", "name": "L2", "servers": _servers(location)}
    return {**options, "layers": [dict(DEFAULT_L1), l2]}


def _shared_for(options: Mapping[str, Any]) -> _Shared:
    """Return the shared chain of the chain mapping ``options`` in this process,
    building it on first use (and again after :func:`close_chains`)."""
    secret = _secret_key() if _needs_default_codec(options) else None
    fingerprint = (_freeze(options), secret)
    with _SHARED_LOCK:
        shared = _SHARED.get(fingerprint)
        if shared is None or (shared.chain.closed and not _exiting()):
            resolved, _ = _with_default_codec(options, secret)
            try:
                chain = Chain.from_config(resolved)
            except ConfigError as exc:
                raise ConfigError(f"CACHES OPTIONS of a cachechain cache: {exc}") from exc
            shared = _SHARED[fingerprint] = _Shared(chain, _form_of(chain))
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

    ``location`` is the ``LOCATION`` setting (the memcached servers of the default
    set-up, see the module docstring); ``params`` are the other settings of the
    alias, whose ``OPTIONS`` is the chain mapping of
    :func:`cachechain.chain_config_from_mapping` (its ``layers`` may come from
    ``LOCATION``). Timeouts are seconds (``int`` or ``float``).

    Raises :class:`~cachechain.ConfigError`, naming the field, for bad ``OPTIONS``
    or ``LOCATION`` (see :func:`chain_options`), and
    :class:`~django.core.exceptions.ImproperlyConfigured` when a memcached layer needs
    ``SECRET_KEY`` for its default codec and it is not set.
    """

    def __init__(self, location: str, params: Mapping[str, Any]) -> None:
        options = params.get("OPTIONS") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"CACHES OPTIONS must be a cachechain chain mapping, got {type(options).__name__}"
            )
        super().__init__(params)
        self._options = chain_options(location, options)
        self._shared = _shared_for(self._options)

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
            shared = self._shared = _shared_for(self._options)
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
        """Check a made key: any ``str`` works (keys memcached cannot take are mapped
        to safe hashed ones), and one that Django's memcached backends would refuse
        (longer than 250 characters, a space or a control character) raises
        :class:`~django.core.cache.CacheKeyWarning`, as Django's generic backends do.
        Raises :class:`~django.core.cache.backends.base.InvalidCacheKey` for a key
        that is not a ``str`` (a ``KEY_FUNCTION`` returning something else)."""
        if not isinstance(key, str):
            raise InvalidCacheKey(
                f"cache keys must be str, got {type(key).__name__}: check KEY_FUNCTION"
            )
        if len(key) > MEMCACHE_MAX_KEY_LENGTH or _MEMCACHED_UNSAFE(key) is not None:
            for warning in memcache_key_warnings(key):
                # 4: the caller of get(), set()... (through make_and_validate_key)
                warnings.warn(warning, CacheKeyWarning, stacklevel=4)

    # -- reads --------------------------------------------------------------------

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """Return the value cached under ``key`` (a fresh copy), or ``default``. A layer
        failure is a miss."""
        key = self.make_and_validate_key(key, version=version)
        shared = self._live()
        return shared.form.read(shared.chain, key, default)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """Return ``{key: value}`` for the ``keys`` that are cached (one batch per layer);
        missing keys are absent."""
        made = {self.make_and_validate_key(k, version=version): k for k in keys}
        found: dict[Any, Any] = {}
        shared = self._live()
        for made_key, stored in shared.chain.get_many(list(made)).items():
            value = shared.form.decode(stored)
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
        raised to each of them and cached for none), and once among the workers that
        share memcached (the chain's lease): the others wait for its value. With a
        timeout of ``0`` or less, or while memcached cannot be reached, nothing is
        stored and the computed value is returned.

        ``OPTIONS["load"]`` (:class:`~cachechain.LoadConfig`) applies: with
        ``fail_safe`` the previous value is returned when ``default`` raises (or, with
        ``soft_timeout``, takes too long); with it or ``eager_refresh`` on, the value is
        stored by :meth:`Chain.get_or_load <cachechain.Chain.get_or_load>` itself
        (stamped, so that it can serve as a fail-safe value later), not with ``add``.
        """
        made = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        shared = self._live()
        chain, form = shared.chain, shared.form
        if ttl is not None:
            policy = chain._loads.policies.default
            stamped = policy is not None and policy.stamps

            def load() -> Any:
                stored = form.encode(default() if callable(default) else default)
                if stamped:  # get_or_load stores it, stamped; the lease serializes workers
                    return stored
                if chain.add(made, stored, ttl):
                    return stored
                return chain.get(made, stored)  # another worker's value won the add

            value = form.decode(chain.get_or_load(made, load, ttl))
            if value is not MISSING:
                return value
        else:
            value = form.read(chain, made, MISSING)
            if value is not MISSING:
                return value
        # Not cacheable now (timeout <= 0), or the cached bytes could not be unpickled.
        value = default() if callable(default) else default
        if ttl is not None:
            chain.set(made, form.encode(value), ttl)
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
        shared = self._live()
        stored = shared.form.encode(value)
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is None:
            shared.chain.delete(key)
        else:
            shared.chain.set(key, stored, ttl)

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
        shared = self._live()
        stored = shared.form.encode(value)
        key = self.make_and_validate_key(key, version=version)
        return _add(shared.chain, key, stored, self._ttl(timeout))

    def set_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        """Store every item (one batch per layer); return the keys that failed: none
        when every layer took the batch, else every key of it (the chain reports per
        batch; the values are still in the layers that took them)."""
        shared = self._live()
        encode = shared.form.encode
        items = {
            self.make_and_validate_key(k, version=version): (k, encode(v)) for k, v in data.items()
        }
        ttl = self._ttl(timeout)
        chain = shared.chain
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
        memcached does not hold ``key`` (Django's contract for a missing key), and
        :class:`~cachechain.UnconfirmedError` (a :class:`~cachechain.LayerError`, not a
        ``ValueError``) when memcached could not be reached or did not answer: the
        count may then have been made, so a caller that creates the key on
        ``ValueError`` never counts twice; Django's ``PyMemcacheCache`` raises its
        client's error likewise. A stored value that is not an integer is read,
        ``value + delta`` stored for the default timeout and returned, not atomically
        (what ``+`` raises, :class:`TypeError` for ``None`` or a ``str``, propagates)."""
        made = self.make_and_validate_key(key, version=version)
        shared = self._live()
        counted = _count(shared.chain, made, delta, strict=True)
        if counted is NOT_A_COUNTER:
            value = shared.form.read(shared.chain, made, MISSING)
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
        """Empty the cache for every process sharing its memcached
        (:meth:`Chain.clear <cachechain.Chain.clear>`: the namespace generation moves;
        other applications' keys on the same servers stay). While memcached cannot be
        reached only this process's in-process layers are emptied (counted and logged
        by the chain)."""
        self._live().chain.clear()

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
