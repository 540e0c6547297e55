"""Django settings for running Django's cache tests against one backend.

The backend comes from ``CACHECHAIN_FW_BACKEND`` (see :mod:`tests.frameworks.backends`).
The test classes in :mod:`tests.frameworks.django_cache_tests` override ``CACHES`` with
every alias the suite uses pointing at :data:`CACHE_PARAMS`; the ``default`` here is
the same backend, for anything that runs outside those overrides. The rest mirrors
what Django's ``tests/runtests.py`` and ``tests/test_sqlite.py`` set for these tests:
an in-memory SQLite database (``BaseCacheTests`` caches model instances), the test
app ``cache`` (Django's ``tests/cache`` package, on ``sys.path``), the Django template
engine (``TestWithTemplateResponse``) and ``LANGUAGE_CODE = "en"``.
"""

from __future__ import annotations

from typing import Any

from tests.frameworks.backends import (
    DJANGO_BACKENDS,
    SECRET_KEY,
    chain_options,
    memcached_address,
    selected_backend,
)


def backend_params(backend: str) -> dict[str, Any]:
    """``BACKEND``, ``LOCATION`` and ``OPTIONS`` of an alias on ``backend``."""
    if backend == "locmem":
        return {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    if backend == "pymemcache":
        return {
            "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
            "LOCATION": memcached_address(),
        }
    if backend == "cachechain-location":  # the default set-up: L1 over LOCATION's memcached
        return {
            "BACKEND": "cachechain.contrib.django.CachechainCache",
            "LOCATION": memcached_address(),
        }
    return {
        "BACKEND": "cachechain.contrib.django.CachechainCache",
        "OPTIONS": chain_options(backend),
    }


BACKEND_NAME = selected_backend(DJANGO_BACKENDS)
CACHE_PARAMS = backend_params(BACKEND_NAME)

CACHES = {"default": dict(CACHE_PARAMS)}
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = ["cache"]
SECRET_KEY = SECRET_KEY
USE_TZ = False
LANGUAGE_CODE = "en"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": False,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
MIDDLEWARE: list[str] = []
LOGGING_CONFIG = None
