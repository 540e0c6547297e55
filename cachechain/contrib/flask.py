"""cachechain as a Flask-Caching backend.

Configure Flask-Caching with it; ``CACHE_OPTIONS`` is the chain mapping of
:func:`cachechain.chain_config_from_mapping`::

    app.config.update(
        SECRET_KEY="...",                      # keys the memcached layer's signed pickle
        CACHE_TYPE="cachechain.contrib.flask.CachechainBackend",
        CACHE_DEFAULT_TIMEOUT=300,             # seconds; 0 = never expires
        CACHE_KEY_PREFIX="shop:",              # prefixes every key (default "flask_cache_")
        CACHE_OPTIONS={
            "name": "web",
            "layers": [
                {"type": "memory", "name": "L1", "maxsize": 10_000, "max_ttl": 30},
                {"type": "memcached", "name": "L2", "servers": ["10.0.0.5:11211"],
                 "timeout": 0.1, "connect_timeout": 0.1},
            ],
        },
    )
    cache = Cache(app)

then use ``@cache.cached``, ``@cache.memoize`` and ``cache.get``/``cache.set`` as with
any backend (with ``from cachechain.contrib.flask import Cache`` in place of
Flask-Caching's, the decorators load once across threads and workers and take
fail-safe options: see below). What to know:

- **One chain per backend.** Flask-Caching builds one backend per ``Cache`` and
  application (``init_app``), shared by every thread; it owns one thread-safe
  :class:`~cachechain.Chain`, closed at interpreter exit or by :meth:`close`.
- **Failures never reach the view**: a layer that is down, slow or returns garbage is a
  miss; a write it missed is counted and logged. ``CACHE_IGNORE_ERRORS`` is accepted
  and has no effect: ``delete_many`` never raises for a cache failure, it returns the
  keys whose deletion every layer confirmed.
- **Values** are copies (see :mod:`cachechain.contrib`). A ``memcached`` layer without
  a ``codec`` gets a signed pickle codec keyed by the app's ``SECRET_KEY``, so cached
  ``Response`` objects and memoized results of any picklable type reach memcached.
  Without a ``SECRET_KEY`` such a layer gets :class:`~cachechain.TaggedJsonCodec`
  (logged at WARNING when the backend is built), which never unpickles what it reads:
  JSON values, ``bytes``, tuples, sets, dicts with non-``str`` keys, dates and times,
  ``Decimal`` and ``UUID`` reach memcached; other values (a ``Response``, instances of
  the application's classes) stay in the in-process layer, and ``set`` returns False
  for them (``add`` too: it needs memcached).
- **Timeouts** follow Flask-Caching: ``None`` is ``CACHE_DEFAULT_TIMEOUT``, ``0``
  never expires (stored as :data:`~cachechain.contrib.NO_EXPIRY_TTL`), a
  :class:`~datetime.timedelta` is taken to the microsecond, and a negative timeout does
  not cache (``set`` removes the key). Each layer's ``max_ttl`` caps every timeout.
- **Keys** must be ``str``; ``CACHE_KEY_PREFIX`` is put in front of each, as by
  Flask-Caching's Redis and memcached backends.
- **Atomic across processes**: ``add``, ``inc`` and ``dec`` run on the chain's shared
  layer (memcached; the last layer of an in-process-only chain) with its own commands
  (:meth:`Chain.add <cachechain.Chain.add>`...): ``add`` has one winner per key among
  all workers, and counts are never lost between them (cachelib's own ``inc`` on
  memcached reads, then writes). ``inc`` of a missing key starts it at ``delta``
  (with ``add``, so two workers cannot both start it); counters are signed 64-bit
  integers and may go below 0, and keep their timeout. While memcached cannot be
  reached, ``add`` stores nothing and returns False and ``inc``/``dec`` return
  ``None`` (cachelib's "backend error"); an ``inc`` that timed out may still have
  counted on memcached, so it is never retried, nor taken for a missing key and
  started again (:meth:`Chain.incr <cachechain.Chain.incr>` with ``strict=True``): a
  call counts at most once. On a stored value that is not an integer, they
  do what cachelib does, ``(value or 0) + delta`` then ``set``, not atomically.
- **Decorators that load once**: ``flask_caching.Cache``'s ``cached`` and ``memoize``
  read with ``get``, call the function and write with ``set``, so every thread and
  worker that misses calls it. Use :class:`Cache` from this module instead (same
  arguments): its decorators call the function through
  :meth:`CachechainBackend.get_or_load` (:meth:`Chain.get_or_load
  <cachechain.Chain.get_or_load>`): once per key among the threads, and the workers
  (memcached's lease), and with ``fail_safe``, ``soft_timeout``, ``hard_timeout`` and
  ``lease`` per decorator, their defaults in ``CACHE_OPTIONS["load"]``
  (:class:`~cachechain.LoadConfig`). Not ``eager_refresh``: a hit is answered by
  Flask-Caching's own read. A ``forced_update`` (or ``is_stale``) stores through
  Flask-Caching's ``set``: that entry keeps no fail-safe copy.
- ``clear()`` empties the cache for every process sharing the memcached
  (:meth:`Chain.clear <cachechain.Chain.clear>`: the namespace generation moves, so
  other applications' keys on the same servers stay) and returns True; False while
  memcached cannot be reached (this process's in-process layers are emptied anyway).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import inspect
import math
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any, cast

import flask_caching
from flask import Flask
from flask_caching import CachedResponse
from flask_caching.backends.base import BaseCache
from werkzeug.exceptions import HTTPException

from .._chain import Chain
from .._chain_atomic import UnconfirmedError
from .._errors import ConfigError, InvalidValueError, Uncacheable
from .._validate import check_key
from ..layers._base import MISSING
from . import (
    NO_EXPIRY_TTL,
    NOT_A_COUNTER,
    _add,
    _close_at_exit,
    _count,
    _delete,
    _form_of,
    _with_default_codec,
    log,
)

__all__ = ["Cache", "CachechainBackend"]


class CachechainBackend(BaseCache):
    """A Flask-Caching backend over a cachechain :class:`~cachechain.Chain`.

    ``options`` is the chain mapping of :func:`cachechain.chain_config_from_mapping`
    (Flask-Caching's ``CACHE_OPTIONS``). ``default_timeout`` (seconds, or a
    ``timedelta``; ``0`` never expires) applies when a write gives no timeout;
    ``key_prefix`` is put in front of every key; ``secret`` keys the signed pickle
    codec of ``memcached`` layers that name no ``codec`` (``None`` or empty: they get
    :class:`~cachechain.TaggedJsonCodec`). ``ignore_delete_many_errors`` is
    accepted for Flask-Caching's sake and has no effect (nothing here raises for a cache
    failure).

    Raises :class:`~cachechain.ConfigError`, naming the field, for bad options.
    """

    def __init__(
        self,
        options: Mapping[str, Any],
        *,
        default_timeout: int | dt.timedelta = 300,
        key_prefix: str = "",
        secret: str | bytes | None = None,
        ignore_delete_many_errors: bool = False,
    ) -> None:
        if isinstance(default_timeout, dt.timedelta):  # as Flask-Caching: whole seconds, up
            default_timeout = math.ceil(default_timeout.total_seconds())
        # Flask-Caching 2.4 (the newest for Python 3.10) takes no ignore_delete_many_errors;
        # set it as 2.5 does.
        super().__init__(default_timeout=default_timeout)  # type: ignore[no-untyped-call,unused-ignore]
        self.ignore_delete_many_errors = ignore_delete_many_errors
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"CACHE_OPTIONS must be a cachechain chain mapping, got {type(options).__name__}"
            )
        if not isinstance(key_prefix, str):
            raise ConfigError(f"CACHE_KEY_PREFIX must be a str, got {key_prefix!r}")
        resolved, tagged = _with_default_codec(options, secret)
        try:
            chain = Chain.from_config(resolved)
        except ConfigError as exc:
            raise ConfigError(f"CACHE_OPTIONS: {exc}") from exc
        for name in tagged:
            log.warning(
                "memcached layer %r has no codec and the app has no SECRET_KEY: it stores "
                "tagged JSON (JSON values, bytes, tuples, sets, dates and times, Decimal, "
                "UUID); other values, such as Response objects, stay in the in-process "
                "layer. Set SECRET_KEY (signed pickle) or give the layer a codec",
                name,
            )
        self._chain = chain
        self._form = _form_of(chain)
        self._prefix = key_prefix
        _close_at_exit(chain)

    @classmethod
    def factory(
        cls,
        app: Flask,
        config: dict[str, Any],
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> CachechainBackend:
        """Build the backend as Flask-Caching does for ``CACHE_TYPE``: ``kwargs`` holds
        ``default_timeout``, ``ignore_delete_many_errors`` and the keys of
        ``CACHE_OPTIONS`` (the chain mapping); the key prefix is ``CACHE_KEY_PREFIX`` and
        the codec secret the app's ``SECRET_KEY``. Raises
        :class:`~cachechain.ConfigError` for ``CACHE_ARGS`` (unused: put settings
        in ``CACHE_OPTIONS``) or bad options."""
        if args:
            raise ConfigError(
                f"CACHE_ARGS is not used by {cls.__name__}: put the chain settings in "
                f"CACHE_OPTIONS, got {args!r}"
            )
        options = dict(kwargs)
        default_timeout = options.pop("default_timeout", 300)
        ignore = bool(options.pop("ignore_delete_many_errors", False))
        return cls(
            options,
            default_timeout=default_timeout,
            key_prefix=config.get("CACHE_KEY_PREFIX") or "",
            secret=app.config.get("SECRET_KEY") or None,
            ignore_delete_many_errors=ignore,
        )

    # -- helpers ------------------------------------------------------------------

    @property
    def chain(self) -> Chain:
        """The :class:`~cachechain.Chain` of this backend (for metrics, breakers,
        ``get_or_load``). Its keys carry the key prefix and its values are the stored
        forms described in :mod:`cachechain.contrib`."""
        return self._chain

    def _key(self, key: str) -> str:
        check_key(key)
        return self._prefix + key

    def _ttl(self, timeout: int | float | dt.timedelta | None) -> float | None:
        """Flask-Caching's timeout as the chain's TTL in seconds; ``None`` for "do not
        cache"."""
        if timeout is None:
            timeout = self.default_timeout
        if isinstance(timeout, dt.timedelta):
            timeout = timeout.total_seconds()
        if timeout == 0:
            return NO_EXPIRY_TTL
        if timeout < 0:
            return None
        return min(float(timeout), NO_EXPIRY_TTL)

    # -- reads --------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """Return the value cached under ``key`` (a fresh copy), or ``None``. A layer
        failure is a miss. Inside a call of a function decorated by :class:`Cache`,
        the key of a miss is remembered (see :class:`_Frame`)."""
        value = self._form.read(self._chain, self._key(key), None)
        frame = getattr(_frames, "frame", None)
        if frame is not None:  # the last read before the call decides
            frame.missed = key if value is None else None
        return value

    def get_many(self, *keys: str) -> list[Any]:
        """Return the values of ``keys`` in order, ``None`` for each miss (one batch per
        layer)."""
        made = [self._key(k) for k in keys]
        found = self._chain.get_many(made)
        values: list[Any] = []
        for made_key in made:
            stored = found.get(made_key, MISSING)
            value = MISSING if stored is MISSING else self._form.decode(stored)
            values.append(None if value is MISSING else value)
        return values

    def has(self, key: str) -> bool:
        """Return whether some reachable layer holds ``key`` (a cached ``None`` too)."""
        return self._chain.get(self._key(key), MISSING) is not MISSING

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], Any],
        timeout: int | float | dt.timedelta | None = None,
        **options: Any,
    ) -> Any:
        """Return the value cached under ``key`` (a copy), or call ``loader()`` once
        (per key, among this process's threads and, with the lease, the workers sharing
        memcached), cache its result for ``timeout`` (as :meth:`set` takes it) and
        return it: :meth:`Chain.get_or_load <cachechain.Chain.get_or_load>` with its
        ``options`` (``fail_safe``, ``soft_timeout``, ``hard_timeout``,
        ``eager_refresh``, ``lease``; their defaults are ``CACHE_OPTIONS["load"]``).
        A negative timeout caches nothing (``loader()`` is called). Raises what
        ``loader()`` raises (unless a fail-safe value replaces it), and
        :class:`~cachechain.InvalidValueError` for a bad option."""
        ttl = self._ttl(timeout)
        if ttl is None:
            return loader()
        form = self._form
        stored = self._chain.get_or_load(
            self._key(key), lambda: form.encode(loader()), ttl, **options
        )
        value = form.decode(stored)
        return loader() if value is MISSING else value  # bytes that no longer unpickle

    # -- writes -------------------------------------------------------------------

    def set(self, key: str, value: Any, timeout: int | float | dt.timedelta | None = None) -> bool:
        """Store ``value`` under ``key`` in every layer for ``timeout`` seconds (see the
        module docstring); a negative timeout removes the key instead. Return True when
        every layer took it, False when some layer failed or refused it (the others
        still hold it). Raises :class:`pickle.PicklingError` for a value that cannot be
        pickled. Inside a call of a function decorated by :class:`Cache`, the key its
        ``get_or_load`` stored already is not written again."""
        frame = getattr(_frames, "frame", None)
        if frame is not None and key == frame.stored:
            return True
        stored = self._form.encode(value)
        key = self._key(key)
        ttl = self._ttl(timeout)
        if ttl is None:
            return self._chain.delete(key)
        return self._chain.set(key, stored, ttl)

    def add(self, key: str, value: Any, timeout: int | float | dt.timedelta | None = None) -> bool:
        """Store ``value`` only if memcached (the chain's shared layer) does not hold
        ``key``, atomically across processes; return True when it was stored, False
        when the key was there or memcached could not be reached (nothing is stored
        then). A negative timeout stores nothing and returns whether the key is absent.
        """
        stored = self._form.encode(value)
        key = self._key(key)
        return _add(self._chain, key, stored, self._ttl(timeout))

    def set_many(
        self, mapping: Mapping[str, Any], timeout: int | float | dt.timedelta | None = None
    ) -> list[Any]:
        """Store every item (one batch per layer); return the keys that were set: all of
        them when every layer took the batch, else none (the chain reports per batch;
        the values are still in the layers that took them)."""
        encode = self._form.encode
        items = {self._key(k): encode(v) for k, v in mapping.items()}
        ttl = self._ttl(timeout)
        if ttl is None:
            ok = self._chain.delete_many(list(items))
        else:
            ok = self._chain.set_many(items, ttl)
        return list(mapping) if ok else []

    def delete(self, key: str) -> bool:
        """Remove ``key`` from every layer; return True when it was cached and every
        layer confirmed the delete."""
        return _delete(self._chain, self._key(key))

    def delete_many(self, *keys: str) -> list[Any]:
        """Remove ``keys`` from every layer (one batch per layer); return them all when
        every layer confirmed, else none. Never raises for a cache failure."""
        if self._chain.delete_many([self._key(k) for k in keys]):
            return list(keys)
        return []

    def inc(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` (an ``int``; a negative one subtracts, below 0 too) to the
        counter ``key`` in memcached, atomically across processes, and return the new
        value; a missing key starts at ``delta`` (stored with ``add`` for the default
        timeout). Return ``None`` when memcached could not be reached or did not answer
        (counted and logged by the chain): the count may then have been made, so
        nothing is retried, and a call counts at most once. A stored ``str`` of
        decimal digits counts as an integer, atomically, as memcached's own ``incr``
        does (``set(k, "5")`` then ``inc(k)`` returns 6, and the key then holds the int
        6; cachelib's ``SimpleCache`` raises :class:`TypeError` there). Any other value
        that is not an integer counts as cachelib says, ``(value or 0) + delta``,
        stored with ``set`` (not atomically; ``+`` raises :class:`TypeError` for other
        ``str`` values)."""
        made = self._key(key)
        chain = self._chain
        try:  # strict: a failed incr or add is not "absent", whatever it returned
            counted = _count(chain, made, delta, strict=True)
            if counted is None:  # absent: start the counter
                ttl = self._ttl(None)
                if ttl is not None and chain.add(made, delta, ttl, strict=True):
                    return delta
                counted = _count(chain, made, delta, strict=True)  # another started it
        except UnconfirmedError:
            return None
        if counted is NOT_A_COUNTER:
            current = self._form.read(chain, made, None)
            value = (current or 0) + delta
            return value if self.set(key, value) else None
        return cast("int | None", counted)

    def dec(self, key: str, delta: int = 1) -> int | None:
        """Subtract ``delta``: :meth:`inc` with ``-delta`` (a missing key starts at
        ``-delta``)."""
        return self.inc(key, -delta)

    # -- lifecycle ----------------------------------------------------------------

    def clear(self) -> bool:
        """Empty the cache for every process sharing its memcached
        (:meth:`Chain.clear <cachechain.Chain.clear>`); return True, or False when
        memcached could not be reached (this process's in-process layers are emptied
        anyway; counted and logged by the chain)."""
        return self._chain.clear()

    def close(self, timeout: float = 5.0) -> int:
        """Close the chain, draining its queued writes within ``timeout`` seconds; return
        how many were dropped. Later calls raise
        :class:`~cachechain.ChainClosedError`. Also done at interpreter exit."""
        return self._chain.close(timeout)


# -- Flask-Caching's decorators, loading through the chain ----------------------------

#: The loader options of ``Chain.get_or_load`` that the decorators of :class:`Cache` take.
LOAD_OPTIONS = ("fail_safe", "soft_timeout", "hard_timeout", "eager_refresh", "lease")


#: The call of a function decorated by :class:`Cache` running on this thread (its
#: ``frame``: a :class:`_Frame`), read by :class:`CachechainBackend`'s ``get`` and
#: ``set``: Flask-Caching's decorators call the backend's (before 2.5 directly).
_frames = threading.local()


class _Frame:
    """One call of a function decorated by :class:`Cache` (``loading``), on this
    thread: the key its cache read missed (then its call goes through
    ``get_or_load``), and the key that ``get_or_load`` stored (Flask-Caching's own
    ``set`` of it is skipped)."""

    __slots__ = ("loading", "missed", "stored")

    def __init__(self, loading: _Loading) -> None:
        self.loading = loading
        self.missed: str | None = None
        self.stored: str | None = None


class Cache(flask_caching.Cache):
    """Flask-Caching's ``Cache`` whose ``cached`` and ``memoize`` call the decorated
    function through :meth:`CachechainBackend.get_or_load` when the app's backend is a
    :class:`CachechainBackend`: one call per key however many threads, and with the
    lease however many workers, miss at once; and, with the decorator's own
    ``fail_safe``, ``soft_timeout``, ``hard_timeout`` and ``lease`` (or
    ``CACHE_OPTIONS["load"]``), fail-safe values and loader timeouts (a timed load runs
    the function on another thread, in a copy of the request's context). Everything
    else is Flask-Caching's (keys, ``unless``, ``forced_update``, ``cache_none``,
    ``CachedResponse`` timeouts, signals, ``delete_memoized``...). What Flask-Caching
    keeps out of the cache (a result its ``response_filter`` refuses, ``None`` without
    ``cache_none``, an ``HTTPException``, which ``cached`` stores itself) is not a
    failure: no fail-safe value replaces it. Another backend: the decorators are
    Flask-Caching's, unchanged (a loader option given to one then raises
    :class:`~cachechain.ConfigError` when the decorated function misses).
    ``eager_refresh`` raises :class:`~cachechain.InvalidValueError`: a hit is answered
    by Flask-Caching's own read, which never reaches ``get_or_load``.

    Use it in place of ``flask_caching.Cache``::

        from cachechain.contrib.flask import Cache
        cache = Cache(app)

        @cache.memoize(60, fail_safe=True, soft_timeout=0.2)
        def profile(uid): ...

    A bad loader option raises :class:`~cachechain.InvalidValueError` when the
    decorated function is called.
    """

    def cached(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
        """Flask-Caching's ``cached`` (same arguments), plus the loader options of
        :meth:`Chain.get_or_load <cachechain.Chain.get_or_load>` as keywords."""
        options = _options(kwargs)
        bound = _bind(flask_caching.Cache.cached, self, args, kwargs)
        decorator = super().cached(*args, **kwargs)
        return self._loading(decorator, options, bound)

    def memoize(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
        """Flask-Caching's ``memoize`` (same arguments), plus the loader options of
        :meth:`Chain.get_or_load <cachechain.Chain.get_or_load>` as keywords."""
        options = _options(kwargs)
        bound = _bind(flask_caching.Cache.memoize, self, args, kwargs)
        decorator = super().memoize(*args, **kwargs)
        return self._loading(decorator, options, bound)

    def _loading(
        self,
        decorator: Callable[[Callable[..., Any]], Any],
        options: dict[str, Any],
        bound: dict[str, Any],
    ) -> Callable[[Callable[..., Any]], Any]:
        keep = bound.get("response_filter")
        cache_none = bool(bound.get("cache_none", False))

        def decorate(fn: Callable[..., Any]) -> Any:
            inner = decorator(fn)
            return _Loading(self, inner, options, keep, cache_none)

        return decorate

    # -- the hooks Flask-Caching's decorators call ----------------------------------

    def _memoize_version(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Flask-Caching's, but a memoized function's version never expires with its
        values (stored with timeout 0): a new version would move every key, and the
        fail-safe value of a key with it. Versions are one per function (and instance);
        ``delete_memoized`` still replaces them."""
        kwargs["timeout"] = 0
        return super()._memoize_version(f, *args, **kwargs)

    def _call_fn(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Typed here: Flask-Caching before 2.5 does not annotate its _call_fn.
        call: Callable[..., Any] = super()._call_fn
        frame = getattr(_frames, "frame", None)
        if frame is None:
            return call(fn, *args, **kwargs)
        backend = self.cache
        if not isinstance(backend, CachechainBackend):
            if frame.loading.options:
                raise ConfigError(
                    f"the loader options {sorted(frame.loading.options)} of a decorator of "
                    "cachechain.contrib.flask.Cache need CACHE_TYPE "
                    f"'cachechain.contrib.flask.CachechainBackend', not {type(backend).__name__}"
                )
            return call(fn, *args, **kwargs)
        if frame.missed is None:  # no miss read (unless, forced_update): a plain call
            return call(fn, *args, **kwargs)
        key, frame.missed = frame.missed, None
        loading = frame.loading
        # A timed load runs on another thread: it gets this one's app and request.
        context = contextvars.copy_context()

        def load() -> Any:
            try:
                value = context.copy().run(call, fn, *args, **kwargs)
            except HTTPException as exc:  # Flask-Caching's answer, not a failure
                raise _Refused(exc, raised=True) from exc
            if inspect.isgenerator(value):  # as Flask-Caching stores one
                value = _joined(value)
            if loading.refuses(value):
                raise _Refused(value)
            return value

        try:
            value = backend.get_or_load(key, load, loading.timeout(), **loading.options)
        except _Refused as refused:
            if refused.raised:
                raise refused.value from None  # as a direct call would (cached stores it)
            frame.stored = key  # nor by Flask-Caching's set (it would store a None)
            return refused.value
        if not (isinstance(value, CachedResponse) and value.timeout):
            frame.stored = key  # else Flask-Caching's set stores it for its own timeout
        return value


def _joined(generator: Any) -> Any:
    """What Flask-Caching caches for a generator: its chunks joined (``str`` or
    ``bytes``), else their list."""
    chunks = list(generator)
    if all(isinstance(chunk, str) for chunk in chunks):
        return "".join(chunks)
    if all(isinstance(chunk, bytes) for chunk in chunks):
        return b"".join(chunks)
    return chunks


class _Refused(Uncacheable):
    """A decorated function's result that stays out of the cache and is not a failure
    (no fail-safe value replaces it): refused by its ``response_filter``, ``None``
    without ``cache_none`` (Flask-Caching never serves it), or an ``HTTPException``
    it raised (``raised``: raised again to the caller, as Flask-Caching does)."""

    def __init__(self, value: Any, *, raised: bool = False) -> None:
        super().__init__(value)
        self.raised = raised


class _Loading:
    """A function decorated by :class:`Cache`: Flask-Caching's decorated function
    (``inner``), called inside a :class:`_Frame`. Attributes are Flask-Caching's
    (``uncached``, ``cache_timeout``, ``make_cache_key``...): read and written through."""

    def __init__(
        self,
        cache: Cache,
        inner: Any,
        options: dict[str, Any],
        response_filter: Callable[[Any], bool] | None,
        cache_none: bool,
    ) -> None:
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "_filter", response_filter)
        object.__setattr__(self, "_cache_none", cache_none)
        for name in functools.WRAPPER_ASSIGNMENTS:  # __module__, __name__, __doc__...
            with contextlib.suppress(AttributeError):
                object.__setattr__(self, name, getattr(inner, name))
        object.__setattr__(self, "__wrapped__", inner)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        """As a function: a method when read from an instance (or a class method's
        class, as Flask-Caching's own decorated functions)."""
        return self if instance is None else types.MethodType(self, instance)

    def __repr__(self) -> str:
        return repr(self._inner)

    def timeout(self) -> Any:
        """The decorated function's timeout now (Flask-Caching's ``cache_timeout``,
        which may be changed after decoration)."""
        timeout = self._inner.cache_timeout
        if isinstance(timeout, str):  # as Flask-Caching's decorators read it
            timeout = int(timeout)
        if isinstance(timeout, dt.timedelta):
            return math.ceil(timeout.total_seconds())
        return timeout

    def refuses(self, value: Any) -> bool:
        """Whether ``value`` stays out of the cache: refused by the response filter, or
        ``None`` without ``cache_none`` (Flask-Caching never serves it then)."""
        if value is None and not self._cache_none:
            return True
        keep = self._filter
        return keep is not None and not keep(value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        frames = _frames
        outer = getattr(frames, "frame", None)
        frames.frame = _Frame(self)
        try:
            return self._inner(*args, **kwargs)
        finally:
            frames.frame = outer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The loader options among a decorator's ``kwargs`` (removed from them). Raises
    :class:`~cachechain.InvalidValueError` for ``eager_refresh``: a hit is answered by
    Flask-Caching's own read, which never reaches ``get_or_load``, so a refresh could
    never start."""
    if kwargs.get("eager_refresh") is not None:
        raise InvalidValueError(
            "eager_refresh is not available on Flask-Caching's decorators (their hits "
            "never reach get_or_load): decorate with the chain's cached() instead"
        )
    return {n: kwargs.pop(n) for n in LOAD_OPTIONS if n in kwargs}


def _bind(method: Callable[..., Any], cache: Cache, args: Any, kwargs: Any) -> dict[str, Any]:
    """The arguments of a call of Flask-Caching's ``method``, by name."""
    bound = inspect.signature(method).bind(cache, *args, **kwargs)
    return dict(bound.arguments)
