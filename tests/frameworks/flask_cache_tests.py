"""Flask-Caching's and cachelib's generic backend tests (from their sdists) on one backend.

Run by pytest with ``tests/frameworks/pytest.ini`` (``tests.frameworks.run`` does it),
the backend named by ``CACHECHAIN_FW_BACKEND``:

- :class:`TestFlaskCachingGeneric`: Flask-Caching's ``GenericCacheTests``
  (``tests/test_backend_cache.py``), the tests every Flask-Caching backend class of that
  file inherits. ``_can_use_fast_sleep`` and ``_guaranteed_deletes`` are set as that
  file sets them: fake clock for ``SimpleCache`` only, deletes not guaranteed for
  memcached.
- :class:`TestCachelibGeneric`: cachelib's generic mixins (``CommonTests``,
  ``ClearTests``, ``HasTests``, ``DeleteManyWithPrefixTests``, ``SerializerTests``),
  which cachelib's own test classes combine per backend. All five run on every
  backend here; ``SimpleCache`` has no key prefix, so its factory drops ``key_prefix``.

The backends are made as the suites make theirs: ``SimpleCache`` and ``MemcachedCache``
(over a ``pymemcache`` client with pickle serde: cachelib's pylibmc and
python-memcached are not test dependencies of this project) directly, and cachechain
the way an application gets it: a Flask app with ``CACHE_TYPE``, ``CACHE_OPTIONS``,
``CACHE_KEY_PREFIX``, ``SECRET_KEY`` (none for ``cachechain-nosecret``) and
``flask_caching.Cache``. As the suites do for memcached, a shared-store backend is
emptied with ``clear()`` when it is made and after the test; with
``CACHECHAIN_FW_FLUSH=1`` memcached is also flushed before each test.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import cachelib.file
import cachelib.simple
import pytest
from flask import Flask
from flask_caching import Cache
from flask_caching.backends import MemcachedCache, SimpleCache

from tests.frameworks.backends import (
    CACHELIB_HELPERS,
    FLASK_BACKENDS,
    SECRET_KEY,
    chain_options,
    flush_memcached,
    flush_requested,
    memcached_address,
    needs_memcached,
    sdist_tests_dir,
    selected_backend,
)

BACKEND = selected_backend(FLASK_BACKENDS)


def _load_suites() -> tuple[types.ModuleType, tuple[type, ...]]:
    """Import Flask-Caching's ``test_backend_cache`` and cachelib's mixins from the
    extracted sdists. cachelib's helpers import ``TestData`` from cachelib's
    ``conftest``, which imports pytest-xprocess for server fixtures not used here: a
    stand-in module takes its place when it is not installed."""
    flask_dir = sdist_tests_dir("flask-caching")
    cachelib_dir = sdist_tests_dir("cachelib")
    for directory in (flask_dir, cachelib_dir):
        if not directory.is_dir():
            raise RuntimeError(f"{directory} is missing: run scripts/framework_suites.sh")
        sys.path.insert(0, str(directory))
    if importlib.util.find_spec("xprocess") is None:
        stand_in = types.ModuleType("xprocess")
        stand_in.ProcessStarter = object  # type: ignore[attr-defined]
        sys.modules["xprocess"] = stand_in
    # pytest rewrites the asserts of the modules it collects; these are imported
    pytest.register_assert_rewrite(*CACHELIB_HELPERS, "test_backend_cache")
    spec = importlib.util.spec_from_file_location("conftest", cachelib_dir / "conftest.py")
    assert spec is not None and spec.loader is not None
    cachelib_conftest = importlib.util.module_from_spec(spec)
    sys.modules["conftest"] = cachelib_conftest
    spec.loader.exec_module(cachelib_conftest)
    mixins = tuple(
        getattr(importlib.import_module(module), name)
        for module, name in (
            ("common", "CommonTests"),
            ("clear", "ClearTests"),
            ("has", "HasTests"),
            ("delete_many_with_prefix", "DeleteManyWithPrefixTests"),
            ("serializer", "SerializerTests"),
        )
    )
    return importlib.import_module("test_backend_cache"), mixins


_flask_suite, _cachelib = _load_suites()


class _Factory:
    """Makes backends of the kind under test, and closes them after the test."""

    def __init__(self) -> None:
        self._cleanups: list[Callable[[], Any]] = []

    def __call__(self, **kwargs: Any) -> Any:
        key_prefix = kwargs.pop("key_prefix", None)
        ignore = kwargs.pop("ignore_delete_many_errors", False)
        if kwargs:
            raise TypeError(f"unexpected factory arguments {kwargs}")
        if BACKEND == "simple":
            return SimpleCache(ignore_delete_many_errors=ignore)
        backend = (
            self._memcached(key_prefix, ignore)
            if BACKEND == "memcached"
            else self._cachechain(key_prefix, ignore)
        )
        backend.clear()  # as the suites' memcached factories do
        self._cleanups.append(backend.clear)
        return backend

    def _memcached(self, key_prefix: str | None, ignore: bool) -> Any:
        from pymemcache.client.base import Client
        from pymemcache.serde import pickle_serde

        host, _, port = memcached_address().rpartition(":")
        client = Client((host, int(port)), serde=pickle_serde, default_noreply=False)
        self._cleanups.append(client.close)
        return MemcachedCache(
            servers=client, key_prefix=key_prefix, ignore_delete_many_errors=ignore
        )

    def _cachechain(self, key_prefix: str | None, ignore: bool) -> Any:
        app = Flask("cachechain_framework_suites")
        app.config.update(
            CACHE_TYPE="cachechain.contrib.flask.CachechainBackend",
            CACHE_OPTIONS=chain_options(BACKEND),
            CACHE_IGNORE_ERRORS=ignore,
        )
        if key_prefix is not None:
            app.config["CACHE_KEY_PREFIX"] = key_prefix
        if BACKEND != "cachechain-nosecret":
            app.config["SECRET_KEY"] = SECRET_KEY
        cache = Cache(app)
        backend = app.extensions["cache"][cache]
        self._cleanups.append(backend.close)
        return backend

    def close(self) -> None:
        """Empty and close what was made, latest first."""
        while self._cleanups:
            self._cleanups.pop()()


@pytest.fixture(autouse=True)
def _flush_first() -> None:
    """Flush memcached before each test when ``CACHECHAIN_FW_FLUSH=1``."""
    if flush_requested() and needs_memcached(BACKEND):
        flush_memcached()


@pytest.fixture
def factory() -> Iterator[_Factory]:
    made = _Factory()
    yield made
    made.close()


class _Clock:
    """Flask-Caching's fake clock (its ``tests/conftest.py``), for ``SimpleCache``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    """As Flask-Caching's fixture: cachelib does ``from time import time``."""
    fake = _Clock(1_700_000_000.0)
    monkeypatch.setattr(cachelib.simple, "time", fake)
    monkeypatch.setattr(cachelib.file, "time", fake)
    return fake


class TestFlaskCachingGeneric(_flask_suite.GenericCacheTests):  # type: ignore[misc,name-defined]
    """Flask-Caching's ``GenericCacheTests`` on the backend under test."""

    _can_use_fast_sleep = BACKEND == "simple"
    _guaranteed_deletes = BACKEND != "memcached"

    @pytest.fixture
    def make_cache(self, factory: _Factory) -> _Factory:
        return factory


class _CachelibFactory:
    @pytest.fixture(autouse=True)
    def _cache_factory(self, request: pytest.FixtureRequest, factory: _Factory) -> None:
        # as cachelib's test modules do: the mixins call self.cache_factory(**kwargs)
        request.cls.cache_factory = lambda _self, **kwargs: factory(**kwargs)


TestCachelibGeneric = type(
    "TestCachelibGeneric",
    (_CachelibFactory, *_cachelib),
    {"__module__": __name__, "__doc__": "cachelib's generic mixins on the backend under test."},
)
