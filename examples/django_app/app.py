"""A one-file Django project whose views cache through cachechain.

    pip install -e '.[django]'
    memcached -l 127.0.0.1 -p 11211 &          # or set CACHECHAIN_MEMCACHED=HOST:PORT
    python examples/django_app/app.py runserver

``/`` shows a report cached with ``cache.get_or_set`` (computed once per minute, once
per process however many requests miss together); ``/page/`` is a whole page cached
with ``cache_page``. Both are kept in an in-process layer (at most 30 s) in front of
memcached. Stop memcached and reload: the pages still answer, from the in-process
layer or by computing again. Sessions are cache-backed
(``django.contrib.sessions.backends.cache``) through the same chain.

Under gunicorn (many processes over one memcached), from the repository root::

    gunicorn --chdir examples/django_app --workers 4 wsgi:application

Each worker's in-process layer drops what another worker changed (a set, a delete, a
``clear()``) within 100 ms: cachechain's coherence, on by default. Settings read from
the environment for ``scripts/load_workers.py``, which drives this app under gunicorn:
``CACHECHAIN_EXAMPLE_LOAD_ENDPOINTS=1`` mounts its test endpoints under ``/load/``
(they write and clear the cache: never in production, see ``load_views.py``);
``CACHECHAIN_EXAMPLE_BACKEND=stock`` swaps cachechain for Django's own
``PyMemcacheCache``, for comparison; sessions live in an alias of their own without
the in-process layer (see ``SESSIONS``:
a user's next request may reach another worker sooner than the 100 ms coherence bound,
so session data must be read from memcached; ``CACHECHAIN_EXAMPLE_SESSION_CACHE=default``
puts them in the L1 alias, to see what goes wrong);
``CACHECHAIN_EXAMPLE_MEMCACHED_TIMEOUT`` (seconds, default 0.1) bounds each memcached
call.
"""

from __future__ import annotations

import os
import sys
import time

import django
from django.conf import settings

MEMCACHED = os.environ.get("CACHECHAIN_MEMCACHED", "127.0.0.1:11211")
# Seconds a memcached call may take before it counts as failed.
MEMCACHED_TIMEOUT = float(os.environ.get("CACHECHAIN_EXAMPLE_MEMCACHED_TIMEOUT", "0.1"))
LOAD_ENDPOINTS = os.environ.get("CACHECHAIN_EXAMPLE_LOAD_ENDPOINTS") == "1"
BACKEND = os.environ.get("CACHECHAIN_EXAMPLE_BACKEND", "cachechain")
SESSION_CACHE = os.environ.get("CACHECHAIN_EXAMPLE_SESSION_CACHE", "shared")

CACHECHAIN = {
    "BACKEND": "cachechain.contrib.django.CachechainCache",
    "TIMEOUT": 300,
    "KEY_PREFIX": "example",
    "OPTIONS": {  # the mapping of cachechain.chain_config_from_mapping
        "name": "django-example",
        "layers": [
            # max_ttl caps what a worker keeps in memory; what another worker changes
            # is dropped from it within 100 ms (coherence, on by default).
            {"type": "memory", "name": "L1", "maxsize": 10_000, "max_ttl": 30},
            # No "codec": signed pickle keyed by SECRET_KEY, so cache_page's
            # HttpResponse objects reach memcached.
            {
                "type": "memcached",
                "name": "L2",
                "servers": [MEMCACHED],
                "timeout": MEMCACHED_TIMEOUT,
                "connect_timeout": MEMCACHED_TIMEOUT,
            },
        ],
    },
}
# Django's own memcached backend, only to compare (scripts/load_workers.py --backend stock).
STOCK = {
    "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
    "LOCATION": MEMCACHED,
    "TIMEOUT": 300,
    "KEY_PREFIX": "example",
}
# Sessions on an alias of their own with no in-process layer: every read of a session
# goes to memcached, so a request sees what the previous one wrote whichever worker
# served it (the in-process layers of the other workers drop a changed key within
# 100 ms only, and a user's requests can follow each other faster than that).
SESSIONS = {
    "BACKEND": "cachechain.contrib.django.CachechainCache",
    "KEY_PREFIX": "example-sessions",
    "OPTIONS": {"name": "django-example-sessions", "layers": CACHECHAIN["OPTIONS"]["layers"][1:]},
}
if BACKEND not in ("cachechain", "stock"):
    raise SystemExit(f"CACHECHAIN_EXAMPLE_BACKEND must be cachechain or stock, got {BACKEND!r}")
if SESSION_CACHE not in ("default", "shared"):
    raise SystemExit(
        f"CACHECHAIN_EXAMPLE_SESSION_CACHE must be default or shared, got {SESSION_CACHE!r}"
    )
CACHES = {"default": CACHECHAIN if BACKEND == "cachechain" else STOCK}
if SESSION_CACHE == "shared":
    CACHES["sessions"] = SESSIONS if BACKEND == "cachechain" else STOCK

settings.configure(
    DEBUG=False,
    # Also keys the signed pickle codec of the memcached layer: every process that
    # shares the memcached must use the same SECRET_KEY.
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-change-me"),
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
    INSTALLED_APPS=[],
    MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
    SESSION_ENGINE="django.contrib.sessions.backends.cache",
    SESSION_CACHE_ALIAS="sessions" if SESSION_CACHE == "shared" else "default",
    CACHES=CACHES,
    # Errors of views and cachechain's warnings on stderr (gunicorn's error log), with
    # their level; with DEBUG=False, Django's default logging would only mail errors.
    LOGGING={
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"level": {"format": "[%(levelname)s] %(name)s: %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "level"}},
        "loggers": {
            "django.request": {"handlers": ["stderr"], "level": "ERROR"},
            "cachechain": {"handlers": ["stderr"], "level": "WARNING"},
        },
    },
)
django.setup()

from django.core.cache import cache  # noqa: E402 - after settings.configure
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.urls import include, path  # noqa: E402
from django.views.decorators.cache import cache_page  # noqa: E402


def build_report() -> dict[str, object]:
    """Stands for an expensive query."""
    time.sleep(0.2)
    return {"generated_at": time.time(), "pid": os.getpid()}


def report(request: HttpRequest) -> HttpResponse:
    return JsonResponse(cache.get_or_set("report", build_report, 60))


@cache_page(30)
def page(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"<p>rendered at {time.time():.6f}</p>")


urlpatterns = [path("", report), path("page/", page)]
if LOAD_ENDPOINTS:
    urlpatterns.append(path("load/", include("load_views")))

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
