"""Django's own cache tests (``tests/cache/tests.py`` of the Django sdist) on one backend.

Imported by :mod:`tests.frameworks.django_runner` after ``django.setup()``, with the
sdist's ``tests`` directory on ``sys.path`` (so ``cache.tests`` is Django's module and
``cache`` its test app). What runs, and how it is pointed at the backend under test
(:data:`tests.frameworks.django_settings.CACHE_PARAMS`):

- :class:`BackendCacheTests`: every test of Django's ``BaseCacheTests``, the generic
  contract every backend's test class inherits (Django's ``LocMemCacheTests``,
  ``PyMemcacheCacheTests``... add backend-specific tests, left out here so that all
  backends run the same tests). Every alias of Django's ``caches_setting_for_tests``
  is on the backend with the aliases' ``KEY_PREFIX``, ``VERSION`` and
  ``KEY_FUNCTION``; as Django does for memcached and Redis, the ``cull`` and
  ``zero_cull`` aliases (``MAX_ENTRIES``, ``CULL_FREQUENCY``) are left out for every
  backend but the local-memory one, so ``test_cull`` and friends are skipped
  ("Culling isn't implemented").
- The http-level classes (``cache_page``, the cache middleware, ``django.utils.cache``
  with and without i18n, ``TemplateResponse``, HEAD requests): subclasses of Django's
  own, whose ``CACHES`` override (``LocMemCache`` in Django) is rewritten alias by
  alias: same ``KEY_PREFIX``/``TIMEOUT``/``VERSION``, backend under test. In Django an
  alias with a ``LOCATION`` of its own (``CacheMiddlewareTest``'s ``other``) is a
  separate local-memory store; on the one memcached of the run it gets that
  ``LOCATION`` as its ``KEY_PREFIX`` (when it has none) instead, which keeps its keys
  apart as a store of its own would (``test_view_decorator`` counts on it).
  For ``locmem`` the classes run exactly as in Django.

With ``CACHECHAIN_FW_FLUSH=1`` memcached is flushed before every test (see
:mod:`tests.frameworks.backends`).
"""

from __future__ import annotations

from typing import Any

import django.test
from cache import tests as dj  # Django's tests/cache/tests.py, from the sdist
from django.test import override_settings

from tests.frameworks.backends import flush_memcached, flush_requested, needs_memcached
from tests.frameworks.django_settings import BACKEND_NAME, CACHE_PARAMS

_FLUSH = flush_requested() and needs_memcached(BACKEND_NAME)

#: The aliases left out, as Django leaves them out for memcached and Redis.
EXCLUDED_ALIASES: set[str] = (
    set() if BACKEND_NAME == "locmem" else set(dj.memcached_excluded_caches)
)


class _FlushFirst:
    """Flushes the run's memcached before each test when ``CACHECHAIN_FW_FLUSH=1``."""

    def setUp(self) -> None:
        if _FLUSH:
            flush_memcached()
        super().setUp()  # type: ignore[misc]


def _as_django_tests_it() -> dict[str, Any]:
    """What Django's own test class of a stock backend changes in ``BaseCacheTests``
    (for the reference runs; cachechain's backend gets the plain contract):
    ``PyMemcacheCacheTests`` expects pymemcache's error from ``incr`` of a non-number,
    and ``InvalidCacheKey`` rather than a ``CacheKeyWarning`` for keys memcached cannot
    take (``BaseMemcachedTests``)."""
    if BACKEND_NAME != "pymemcache":
        return {}
    memcached_tests = dj.BaseMemcachedTests.__dict__
    return {
        "incr_decr_type_error": dj.PyMemcacheCacheTests.incr_decr_type_error,
        "_perform_invalid_key_test": memcached_tests["_perform_invalid_key_test"],
        "test_invalid_with_version_key_length": memcached_tests[
            "test_invalid_with_version_key_length"
        ],
    }


BackendCacheTests = override_settings(
    CACHES=dj.caches_setting_for_tests(base=CACHE_PARAMS, exclude=EXCLUDED_ALIASES)
)(
    type(
        "BackendCacheTests",
        (_FlushFirst, dj.BaseCacheTests, django.test.TestCase),
        {
            "__module__": __name__,
            "__qualname__": "BackendCacheTests",
            "__doc__": "Django's ``BaseCacheTests``, every alias on the backend under test.",
            **_as_django_tests_it(),
        },
    )
)


def _on_backend(caches: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A ``CACHES`` setting of Django's tests with every alias on the backend under
    test; an alias that is a store of its own in Django (a ``LOCATION`` of its own)
    gets that ``LOCATION`` as its ``KEY_PREFIX`` when it has none."""
    if BACKEND_NAME == "locmem":
        return caches
    moved: dict[str, dict[str, Any]] = {}
    for alias, params in caches.items():
        kept = {k: v for k, v in params.items() if k not in ("BACKEND", "LOCATION", "OPTIONS")}
        kept.update(CACHE_PARAMS)
        location = params.get("LOCATION")
        if location and not params.get("KEY_PREFIX"):
            kept["KEY_PREFIX"] = location
        moved[alias] = kept
    return moved


def _http_class(name: str) -> type:
    """Django's test class ``name``, its ``CACHES`` override moved to the backend."""
    parent = getattr(dj, name)
    caches = parent._overridden_settings["CACHES"]
    cls = type(
        name,
        (_FlushFirst, parent),
        {"__module__": __name__, "__qualname__": name, "__doc__": parent.__doc__},
    )
    decorated: type = override_settings(CACHES=_on_backend(caches))(cls)
    return decorated


CacheUtils = _http_class("CacheUtils")
PrefixedCacheUtils = _http_class("PrefixedCacheUtils")
CacheHEADTest = _http_class("CacheHEADTest")
CacheI18nTest = _http_class("CacheI18nTest")
PrefixedCacheI18nTest = _http_class("PrefixedCacheI18nTest")
CacheMiddlewareTest = _http_class("CacheMiddlewareTest")
TestWithTemplateResponse = _http_class("TestWithTemplateResponse")
